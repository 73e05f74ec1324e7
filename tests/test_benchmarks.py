"""Benchmarks that cannot rot (issue 27): each script of benchmarks/ runs its smallest configuration end
to end (the tiny generated dataset and run, 64 px, yolov5n, a step or a repeat), so that an import
error, a renamed option or a changed library call fails here rather than for the next user. Each test
checks what the script prints (its table's rows, with numbers; no number is judged, timings least of
all) and that it exits cleanly.

The scripts run in this process as `python benchmarks/X.py ...` runs them (their __main__ block, a
fresh module each time: no interpreter start); the processes they start, they start as they do.

The reference packages' side runs against a stand-in venv: tests/reference/yolov5_standin/ (the
`yolov5` modules harness_yolov5.py imports, written on our library: bench_train.py --ref-venv runs the
harness's steps with it on PYTHONPATH, the val test imports it here) and standin_cli.py (the `yolov5
train` and `yolo train` commands of bench_accuracy.py). tests/reference/yolov5_api.py holds, in one
place, the module paths and call signatures the harness uses: the harness's source and the stand-in
are checked against it, and so is the real package when EMA_YOLO_REF_VENV names a venv holding
yolov5 7.0.14 (and ultralytics 8.4); the [real] tests then run every reference test against it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from benchmarks.references import reference_dataset, reference_environment
from tests.printed_tables import number, table
from tests.reference import yolov5_api
from utils.config_files import REPO_ROOT
from utils.peak_memory import cpu_peak_measurable

BENCHMARKS = REPO_ROOT / "benchmarks"
REFERENCE = Path(__file__).parent / "reference"
NO_REFERENCE_VENV = (
    "set EMA_YOLO_REF_VENV to a venv with yolov5==7.0.14 (and ultralytics 8.4 for bench_accuracy.py; "
    "benchmarks/bench_train.py says how to make one) to run this against the real package"
)


@pytest.fixture
def run_benchmark(monkeypatch, capsys):
    """Run benchmarks/SCRIPT with ARGS in this process as `python benchmarks/SCRIPT ARGS` would; returns what
    it printed (stdout)."""

    def run(script: str, *args: str) -> str:
        path = BENCHMARKS / script
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        monkeypatch.setattr(sys, "path", list(sys.path))  # each script puts the repository first
        capsys.readouterr()
        code = 0
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exit:
            code = exit.code
        printed = capsys.readouterr()
        assert code in (None, 0), f"{script} exited with {code}:\n{printed.out}\n{printed.err}"
        return printed.out

    return run


def json_line(output: str) -> dict:
    """The JSON line a harness prints last."""
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{output}"
    return json.loads(lines[-1])


def test_bench_checkpoint(run_benchmark):
    printed = run_benchmark("bench_checkpoint.py", "--cfg", "yolov5n.yaml", "--repeats", "1", "--all-averages")
    rows = table(printed, "| model ")
    assert [row[0] for row in rows] == ["yolov5n"]
    parameters, megabytes, write_ms, memory_mb, load_ms = (number(cell) for cell in rows[0][1:6])
    assert megabytes > 7 * parameters * 4 / 1e6  # model, EMA, 4 averages, SWA in fp32 at least
    assert write_ms > 0 and load_ms > 0 and memory_mb >= 0


def test_bench_checkpoint_size(run_benchmark):
    rows = table(run_benchmark("bench_checkpoint_size.py", "--cfg", "yolov5n.yaml"), "| model ")
    assert [row[0] for row in rows] == ["yolov5n"]
    ema, sgd, adamw, stripped, ratio = (number(cell) for cell in rows[0][2:7])
    assert adamw > sgd > stripped > 0  # AdamW keeps two moments, SGD one; best.pt keeps the EMA only
    assert 1 <= ratio < 1.1 and stripped == pytest.approx(ema, rel=0.1)


def test_bench_ema(run_benchmark):
    printed = run_benchmark(
        "bench_ema.py", "--models", "yolov5n.yaml", "--repeats", "1", "--rounds", "1", "--step-repeats", "1",
        "--imgsz", "32", "--batch", "16", "--amp", "off",
    )  # fmt: skip
    rows = table(printed, "| model ")
    assert [row[0] for row in rows] == ["yolov5n"] and rows[0][7] == "fp32"
    assert number(rows[0][1]) > 1e6 and all(number(cell) > 0 for cell in rows[0][2:6] + rows[0][8:])


@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux's resident-set peak (/proc/self/clear_refs)")
def test_bench_memory_bound(run_benchmark):
    printed = run_benchmark(
        "bench_memory_bound.py", "--cfgs", "yolov5n.yaml", "--sizes", "64", "--batch", "2",
        "--gpu-jobs", "yolov5n.yaml:2:a test GPU",
    )  # fmt: skip
    [row] = table(printed, "| model | imgsz ")
    assert row[:2] == ["yolov5n.yaml", "64"] and all(number(cell) > 0 for cell in row[2:])
    [job] = table(printed, "| job at 640 px")
    assert job[0] == "yolov5n.yaml batch 2" and number(job[1]) > 0 and job[2] == "a test GPU"


def test_bench_metrics_ours_equals_pycocotools(run_benchmark):
    printed = run_benchmark("bench_metrics.py", "--images", "20", "--preds", "10", "--classes", "3")
    rows = {row[0]: row for row in table(printed, "| method ")}
    reference, ours = rows["pycocotools COCOeval"], rows["ours (utils/eval/metrics.py)"]
    assert number(reference[4]) > 0 and ours[4:] == reference[4:]  # mAP50, mAP50-95 to 6 decimals
    assert number(ours[3]) >= 0 and number(reference[3]) >= 0  # memory (MB)


def test_bench_bn_recalibration(run_benchmark, tiny_run):
    printed = run_benchmark(
        "bench_bn_recalibration.py", "--weights", str(tiny_run / "weights" / "last.pt"), "--images", "4",
        "--seeds", "0", "--workers", "0",
    )  # fmt: skip
    [row] = table(printed, "| images | order seed ")
    assert row[:3] == ["4", "0", "4"]  # 4 images asked for, seed 0, 4 seen
    assert all(0 <= number(cell) <= 1 for cell in row[4:])  # P, R, mAPs


def test_bench_distributed_val(run_benchmark, tiny_run):
    """Two processes only (gloo, each spawned as the script spawns them): the one-process row would cost
    another interpreter start, and tests/test_distributed_validation.py compares the two."""
    printed = run_benchmark(
        "bench_distributed_val.py", "--weights", str(tiny_run / "weights" / "last.pt"), "--processes", "2",
        "--repeats", "1",
    )  # fmt: skip
    [row] = table(printed, "| processes ")
    assert row[0] == "2" and row[3] == "1.00x" and row[-1] == "yes"  # the first row is its own reference
    assert all(number(cell) >= 0 for cell in row[1:9])  # times, mAPs, val loss


def test_bench_export(run_benchmark, tiny_run, tiny_dataset):
    printed = run_benchmark(
        "bench_export.py", "--weights", str(tiny_run / "weights" / "best.pt"), "--data", str(tiny_dataset),
        "--include", "torchscript", "--shapes", "static", "--repeats", "1",
    )  # fmt: skip
    rows = table(printed, "| weights ")
    assert [row[:3] for row in rows] == [
        [".pt (fused)", "any", "rectangular"],
        [".pt (fused)", "any", "square"],
        [".torchscript", "1x3x64x64", "square"],
    ]
    assert abs(number(rows[2][5])) < 1e-3  # the trace computes what the model computes
    assert all(number(cell) >= 0 for row in rows for cell in (row[3], row[4], row[6]))


def test_harness_ours_val(run_benchmark, tiny_run, tiny_dataset):
    # --amp off: the tiny run trained with --amp auto, in bf16 on a CPU that times bf16 faster
    printed = run_benchmark(
        "harness_ours.py", "val", "--data", str(tiny_dataset), "--weights", str(tiny_run / "weights" / "best.pt"),
        "--imgsz", "64", "--batch", "4", "--workers", "0", "--amp", "off",
    )  # fmt: skip
    result = json_line(printed)
    assert result["framework"] == "ours" and result["images"] == 8 and result["precision"] == "fp32"
    assert result["seconds"] > 0 and 0 <= result["map50_95"] <= result["map50"] <= 1


# The reference packages' side: a stand-in venv, or the real one


def make_standin_venv(folder: Path) -> Path:
    """A folder laid out as a reference venv: bin/python runs our interpreter with the stand-in `yolov5`
    package (given our hyp and model YAMLs where the package ships its own) and the repository on
    PYTHONPATH; bin/yolov5 and bin/yolo are the stand-in training commands."""
    site = folder / "site"
    shutil.copytree(REFERENCE / "yolov5_standin", site, ignore=shutil.ignore_patterns("__pycache__"))
    package = site / "yolov5"
    (package / "data" / "hyps").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "hyp" / "scratch-low.yaml", package / "data" / "hyps" / "hyp.scratch-low.yaml")
    shutil.copy(REPO_ROOT / "models" / "yolov5n.yaml", package / "models" / "yolov5n.yaml")
    (folder / "bin").mkdir()
    python_path = os.pathsep.join([str(site), str(REPO_ROOT)])
    cli = f'"{sys.executable}" "{REFERENCE / "standin_cli.py"}"'
    commands = {"python": f'"{sys.executable}"', "yolov5": f"{cli} yolov5", "yolo": f"{cli} yolo"}
    for name, command in commands.items():
        script = folder / "bin" / name
        script.write_text(f'#!/bin/sh\nPYTHONPATH="{python_path}" exec {command} "$@"\n')
        script.chmod(0o755)
    return folder


class ReferenceVenv(NamedTuple):
    path: Path
    standin: bool


@pytest.fixture(scope="module")
def standin_venv(tmp_path_factory) -> Path:
    return make_standin_venv(tmp_path_factory.mktemp("standin_venv"))


@pytest.fixture
def standin_imports(standin_venv, monkeypatch):
    """The stand-in `yolov5` importable in this process during the test (an interpreter start saved), and
    forgotten after it."""
    monkeypatch.syspath_prepend(str(standin_venv / "site"))
    yield
    for name in [name for name in sys.modules if name.split(".")[0] == "yolov5"]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def real_venv() -> Path:
    """The venv EMA_YOLO_REF_VENV names (the test is skipped when it names none)."""
    if not os.environ.get("EMA_YOLO_REF_VENV"):
        pytest.skip(NO_REFERENCE_VENV)
    venv = Path(os.environ["EMA_YOLO_REF_VENV"])
    assert (venv / "bin" / "python").is_file(), f"EMA_YOLO_REF_VENV={venv}: no bin/python there"
    return venv


@pytest.fixture(scope="module", params=["stand-in", "real"])
def reference_venv(request) -> ReferenceVenv:
    """The stand-in venv, or the real one."""
    if request.param == "stand-in":
        return ReferenceVenv(request.getfixturevalue("standin_venv"), standin=True)
    return ReferenceVenv(request.getfixturevalue("real_venv"), standin=False)


def run_in_venv(venv: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`venv`'s python with `args`, in the environment the benchmarks give the references."""
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        env=reference_environment(workdir),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def module_attribute(node: ast.AST, modules: dict[str, str]) -> bool:
    """Whether `node` is `alias.name` for a module imported as `alias`."""
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules


def harness_uses() -> dict[str, dict[str, tuple[int, tuple[str, ...]] | None]]:
    """What harness_yolov5.py takes from `yolov5`, read from its source: module -> name -> (the number of
    positional arguments, the keyword names) of its call, or None where the name is only read."""
    tree = ast.parse((BENCHMARKS / "harness_yolov5.py").read_text())
    imported, modules = {}, {}  # local name -> (module, name); local name -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "yolov5":
            imported.update({alias.asname or alias.name: (node.module, alias.name) for alias in node.names})
        elif isinstance(node, ast.Import):
            modules.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "yolov5"})
    uses: dict = {}
    for node in ast.walk(tree):  # a call before its function's name: the call's arguments are kept
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            module, name = imported[node.func.id]
        elif isinstance(node, ast.Call) and module_attribute(node.func, modules):
            module, name = modules[node.func.value.id], node.func.attr
        elif module_attribute(node, modules):
            if node.attr != "__file__":  # every module has one
                uses.setdefault(modules[node.value.id], {}).setdefault(node.attr, None)
            continue
        else:
            continue
        uses.setdefault(module, {})[name] = (len(node.args), tuple(sorted(k.arg for k in node.keywords)))
    return uses


def test_the_yolov5_api_table_is_the_harness_and_the_standin(standin_imports):
    """tests/reference/yolov5_api.py describes the harness as it is (each import, each call's arguments), and
    the stand-in package has all of it."""
    described = {
        module: {name: call and (len(call[0]), tuple(sorted(call[1]))) for name, call in names.items()}
        for module, names in yolov5_api.USED.items()
    }
    assert harness_uses() == described
    assert yolov5_api.missing() == []


def test_the_real_yolov5_package_has_what_the_harness_uses(real_venv, tmp_path):
    result = run_in_venv(real_venv, tmp_path, str(REFERENCE / "yolov5_api.py"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_bench_train_side_by_side_with_yolov5(run_benchmark, reference_venv, tiny_dataset, tmp_path):
    """bench_train.py's step bench (harness_ours.py steps and harness_yolov5.py steps, each in its process)."""
    printed = run_benchmark(
        "bench_train.py", "--ref-venv", str(reference_venv.path), "--data", str(tiny_dataset), "--imgsz", "64",
        "--batch", "4", "--workers", "0", "--steps", "2", "--warmup", "1", "--repeats", "1", "--ours-variants",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    rows = table(printed, "| framework ")
    assert [row[0] for row in rows] == ["ours", "yolov5"]
    assert rows[1][1] == "fp32" and rows[1][4] == "1.00x"  # yolov5's speed against itself
    assert all(number(cell) >= 0 for row in rows for cell in row[2:])


def test_harness_yolov5_val(request, run_benchmark, reference_venv, tiny_dataset, tmp_path):
    """harness_yolov5.py val on the dataset copy bench_train.py gives it. The stand-in validates a checkpoint
    of ours, in this process; the real package one of its own (an untrained yolov5n: the harness, not the mAP,
    is tested), in its venv."""
    data_yaml, nc = reference_dataset(str(tiny_dataset), tmp_path)
    args = ["val", "--data-yaml", str(data_yaml), "--imgsz", "64", "--batch", "8", "--workers", "0"]
    if reference_venv.standin:
        request.getfixturevalue("standin_imports")
        weights = request.getfixturevalue("tiny_run") / "weights" / "best.pt"
        printed = run_benchmark("harness_yolov5.py", *args, "--weights", str(weights))
    else:
        weights = tmp_path / "yolov5n.pt"
        write = (  # an untrained yolov5n with what `yolov5 train` sets on the model it saves
            "import sys, pathlib, torch, yolov5; from yolov5.models.yolo import Model; "
            "cfg = pathlib.Path(yolov5.__file__).parent / 'models' / 'yolov5n.yaml'; nc = int(sys.argv[1]); "
            "model = Model(str(cfg), nc=nc); model.nc, model.names = nc, [str(i) for i in range(nc)]; "
            "torch.save({'model': model}, sys.argv[2])"
        )
        made = run_in_venv(reference_venv.path, tmp_path, "-c", write, str(nc), str(weights))
        assert made.returncode == 0, made.stderr[-3000:]
        harness = str(BENCHMARKS / "harness_yolov5.py")
        result = run_in_venv(reference_venv.path, tmp_path, harness, *args, "--weights", str(weights))
        assert result.returncode == 0, result.stderr[-3000:]
        printed = result.stdout
    measured = json_line(printed)
    assert measured["framework"].startswith("yolov5 7.0.14") and measured["images"] == 8
    assert measured["seconds"] > 0 and 0 <= measured["map50_95"] <= measured["map50"] <= 1


def test_bench_accuracy(run_benchmark, reference_venv, tiny_dataset, tmp_path):
    """bench_accuracy.py's races at one epoch, the reference runs by the venv's `yolo train` and `yolov5 train`.
    Our runs are kept from runs.json (--resume-bench), as a race run in parts keeps them: a train.py run
    would cost more than every other test here, and tests/test_train_cli.py runs train.py."""
    venv = str(reference_venv.path)
    if not (reference_venv.path / "bin" / "yolo").exists():
        pytest.skip(f"{venv} has no bin/yolo: ultralytics 8.4 is not installed there")
    ours = {"map50": [0.95], "map50_95": [0.9], "times": [5.0], "total": 6.0}  # reaches any 1-epoch reference
    (tmp_path / "runs.json").write_text(json.dumps({"ours yolo11n seed 0": ours, "ours yolov5n seed 0": ours}))
    printed = run_benchmark(
        "bench_accuracy.py", "--ultralytics-venv", venv, "--yolov5-venv", venv,
        "--models", "yolo11n:1", "--seeds", "0", "--yolov5n-epochs", "1", "--data", str(tiny_dataset),
        "--imgsz", "64", "--batch", "4", "--workers", "0", "--workdir", str(tmp_path), "--resume-bench",
    )  # fmt: skip
    rows = {row[0]: row for row in table(printed, "| run | epochs ")}
    assert set(rows) == {"ours yolo11n seed 0", "ultralytics yolo11n", "ours yolov5n seed 0", "yolov5 yolov5n"}
    assert all(row[1] == "1" and 0 <= number(row[5]) <= 1 for row in rows.values())  # final mAP50
    for name in ("ours yolo11n seed 0", "ours yolov5n seed 0"):
        assert re.fullmatch(r"\d+ s, epoch 1 \(\d+\.\d\d of its time\)", rows[name][-1]), rows[name]
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "runs.json").read_text())) == set(rows)  # the reference runs kept too


def scale_table(printed: str, columns: list[str]) -> dict[str, list[str]]:
    header = next(line for line in printed.splitlines() if line.startswith("| measure "))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == columns
    return {row[0]: row[1:] for row in table(printed, "| measure ")}


def test_bench_scale_ours(run_benchmark, tmp_path):
    printed = run_benchmark(
        "bench_scale.py", "--root", str(tmp_path / "coco_like"), "--images", "40", "--items", "32",
        "--items-2-workers", "0", "--items-pooled", "0", "--no-first-step", "--imgsz", "64",
        "--workdir", str(tmp_path / "work"),
    )  # fmt: skip
    rows = scale_table(printed, ["ours"])
    # Left out for CI time (the run against the real packages below has them): the 2-worker run, ours with
    # mosaic pools, and train.py's first steps.
    assert "loader images/s, 2 workers" not in rows and "train.py to its first optimizer step (s)" not in rows
    for measure in ("label scan, cold (s)", "label cache (MB)", "dataset bytes per image", "loader images/s, 1 worker"):
        assert number(rows[measure][0]) > 0, measure
    assert "MiB" in rows["worker private, warm-up -> end of 1-worker run"][0]  # read inside the worker
    figures = json.loads((tmp_path / "work" / "bench_scale.json").read_text())
    assert figures["cpu"]["model"] and figures["results"]["ours"]["scan_warm"]["warm"] is True
    assert not figures["results"]["ours"]["scan_cold"]["warm"]


def test_bench_scale_against_the_real_packages(run_benchmark, real_venv, tmp_path):
    printed = run_benchmark(
        "bench_scale.py", "--root", str(tmp_path / "coco_like"), "--images", "40", "--items", "32",
        "--items-2-workers", "16", "--items-pooled", "16", "--imgsz", "64", "--workdir", str(tmp_path / "work"),
        "--ref-venv", str(real_venv),
    )  # fmt: skip
    rows = scale_table(printed, ["ours", "yolov5", "ultralytics"])
    assert all(number(cell) > 0 for cell in rows["dataset bytes per image"])
    ours_only = (
        "loader images/s, 1 worker, ours with mosaic_pool 16",
        "train.py to its first optimizer step (s)",
        "--resume at 90% of an epoch to its first step (s)",
    )
    for measure in ours_only:
        assert number(rows[measure][0]) > 0 and rows[measure][1:] == ["-", "-"], measure
    figures = json.loads((tmp_path / "work" / "bench_scale.json").read_text())
    assert figures["results"]["ours"]["first_step"]["resume_batch"] == 2  # of 3 batches of 16: 40 images
    assert rows["loader images/s, 1 worker"][1].endswith("(1.00x)")  # yolov5 is the base
    assert not list((tmp_path / "coco_like" / "labels").glob("*.cache"))  # the references' caches stay outside
