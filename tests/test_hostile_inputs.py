"""Hostile inputs: a corpus of bad files, malicious pickles, broken configs and checkpoints, NaN
losses and failed writes. Each gives counts, one clear message and exit status 2, never a traceback,
never lost progress, never a change to the user's files."""

from __future__ import annotations

import functools
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import average
import detect
import train
import val
from tests.conftest import run_script, tiny_train_args
from tests.test_labels import PLANTED, plant
from utils.config_files import REPO_ROOT
from utils.data.synthetic_shapes import CLASS_NAMES
from utils.errors import TrainingStopped, run_cli
from utils.train import loop as training_loop
from utils.train import saver


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def hostile_dataset(tiny_dataset, tmp_path) -> Path:
    """The tiny dataset's images plus one planted case of each of 17 kinds of bad file in train."""
    source = Path(yaml.safe_load(tiny_dataset.read_text())["path"])
    root = tmp_path / "hostile"
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("*.cache", "*.json"))
    for stem, (how, label, _) in PLANTED.items():
        plant(root / "images" / "train", stem, how, label)
    data = tmp_path / "hostile.yaml"
    data.write_text(
        yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val", "names": list(CLASS_NAMES)})
    )
    return data


@pytest.mark.slow
def test_training_on_a_hostile_corpus_counts_everything_and_touches_nothing(hostile_dataset, tiny_dataset, tmp_path):
    root = Path(yaml.safe_load(hostile_dataset.read_text())["path"])
    before = tree_digest(root)
    result = run_script(
        "train.py",
        "--data",
        str(hostile_dataset),
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--no-plots",
        "--project",
        str(tmp_path / "runs"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    base_labels = Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "labels" / "train"
    base_empty = sum(1 for p in base_labels.glob("*.txt") if not p.read_text().strip())  # 16 good images, some empty
    assert sum(kind != "found" for _, _, kind in PLANTED.values()) == 19  # kinds of bad file planted
    train_line = next(line for line in result.stdout.splitlines() if line.startswith("train: ") and "images," in line)
    assert train_line == (
        f"train: 37 images, {16 - base_empty + 4} labels found, 1 missing, {base_empty + 1} empty, "
        "15 corrupt (skipped); skipped: 1 NaN or infinite value, 2 class id out of range, 1 coordinates outside "
        "[0, 1], 1 image under 10 px, 1 negative or zero size, 1 non-numeric value, 1 truncated image, "
        "3 unreadable image, 1 unreadable label file, 1 unsupported format, 2 wrong number of columns; "
        "repaired: 1 boxes clipped to the image, 1 duplicate rows removed"
    )
    report = (tmp_path / "runs" / "exp" / "data_report.txt").read_text().splitlines()
    assert len(report) == 17 and all(line.startswith("train\t") for line in report)
    for stem, (_, _, kind) in PLANTED.items():
        if kind not in ("found", "missing", "empty"):
            assert any(line.split("\t")[1] == kind and stem in line for line in report), (stem, kind)
    after = tree_digest(root)
    assert after == before  # no file changed, none added: the label caches go to the cache folder


class Payload:
    """Unpickling this creates a file: the proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_malicious_pickles_are_refused_everywhere(tiny_dataset, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "yolov5s.pt"
    torch.save({"model": Payload(marker), "epoch": -1}, evil)
    for script, args in (
        ("train.py", ["--weights", str(evil), "--data", str(tiny_dataset)]),
        ("train.py", ["--resume", str(evil)]),
        ("val.py", ["--weights", str(evil), "--data", str(tiny_dataset)]),
    ):
        result = run_script(script, *args, "--project", str(tmp_path / "runs"))
        assert result.returncode == 2, (script, args, result.stderr)
        assert "full unpickling" in result.stderr and str(evil) in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not marker.exists()


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_bytes(
        content
        if isinstance(content, bytes)
        else (content if isinstance(content, str) else yaml.safe_dump(content)).encode()
    )
    return path


def broken_cases(tmp_path: Path, data: Path, checkpoint: Path) -> list[tuple[str, list[str], Path]]:
    """(entry point, arguments, the file the message must name)."""
    good_data = yaml.safe_load(data.read_text())
    good_hyp = yaml.safe_load((REPO_ROOT / "hyp" / "scratch-low.yaml").read_text())
    good_model = yaml.safe_load((REPO_ROOT / "models" / "yolov5n.yaml").read_text())
    state = torch.load(checkpoint, weights_only=True)
    cases = []
    for name, content in [
        ("data_missing.yaml", {k: v for k, v in good_data.items() if k != "val"}),
        ("data_nc.yaml", {**good_data, "nc": 3}),
        ("data_types.yaml", {**good_data, "names": 5}),
        ("data_syntax.yaml", "train: [images\n"),
    ]:
        path = write(tmp_path, name, content)
        cases.append(("train", ["--data", str(path)], path))
    for name, content in [
        ("hyp_missing.yaml", {k: v for k, v in good_hyp.items() if k != "lr0"}),
        ("hyp_types.yaml", {**good_hyp, "momentum": "fast"}),
    ]:
        path = write(tmp_path, name, content)
        cases.append(("train", ["--data", str(data), "--hyp", str(path)], path))
    for name, content in [
        ("model_block.yaml", {**good_model, "backbone": [[-1, 1, "Focus", [64, 3]]] + good_model["backbone"][1:]}),
        ("model_missing.yaml", {k: v for k, v in good_model.items() if k != "head"}),
        ("model_types.yaml", {**good_model, "width_multiple": "wide"}),
    ]:
        path = write(tmp_path, name, content)
        cases.append(("train", ["--data", str(data), "--cfg", str(path)], path))
    truncated = write(tmp_path, "truncated.pt", checkpoint.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    newer = tmp_path / "newer.pt"
    torch.save({**state, "format_version": 99}, newer)
    for path in (truncated, foreign, newer):
        cases += [
            ("train", ["--data", str(data), "--weights", str(path)], path),
            ("train", ["--resume", str(path)], path),
            ("val", ["--data", str(data), "--weights", str(path)], path),
        ]
    other_nc = write(tmp_path, "three_classes.yaml", {**good_data, "names": ["a", "b", "c"]})
    cases += [("val", ["--data", str(other_nc), "--weights", str(checkpoint)], checkpoint)]
    return cases


def test_broken_configs_and_checkpoints_exit_2_naming_the_file(tiny_dataset, tmp_path, capsys):
    project = tmp_path / "runs"
    assert (
        train.main(
            [
                "--data",
                str(tiny_dataset),
                "--epochs",
                "1",
                "--imgsz",
                "64",
                "--workers",
                "0",
                "--no-plots",
                "--project",
                str(project),
            ]
        )
        == 0
    )
    checkpoint = project / "exp" / "weights" / "last.pt"
    capsys.readouterr()
    entry = {"train": train.main, "val": val.main}
    for program, args, named in broken_cases(tmp_path, tiny_dataset, checkpoint):
        args = [*args, "--project", str(tmp_path / "more_runs")]
        with pytest.raises(SystemExit) as exit_info:
            run_cli(functools.partial(entry[program], args), f"{program}.py")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (program, args, err)
        assert str(named) in err and err.count("\n") == 1 and err.startswith(f"{program}.py: error: "), (args, err)


def poisoned(call_numbers: set[int] | None = None, from_call: int | None = None):
    """to_model_input that turns the images of some calls into NaN (the forward then poisons BatchNorm)."""
    calls = {"n": 0}
    real = training_loop.to_model_input

    def to_model_input(images, device, dtype=torch.float32):
        calls["n"] += 1
        x = real(images, device, dtype)
        if (call_numbers and calls["n"] in call_numbers) or (from_call and calls["n"] >= from_call):
            x = x * float("nan")
        return x

    return to_model_input


def test_nan_batches_skip_their_steps_and_never_reach_the_weights(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training_loop, "to_model_input", poisoned(call_numbers={2, 7}))
    assert train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "2")) == 0
    last = torch.load(tmp_path / "exp" / "weights" / "last.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in last[key].values() if t.dtype.is_floating_point), key
    output = capsys.readouterr().out  # train.py logs to stdout
    skipped = sum(
        int(line.split("WARNING: ")[1].split()[0])
        for line in output.splitlines()
        if "optimizer step(s) of this epoch skipped" in line
    )
    assert skipped == 2
    assert last["updates"] == last["loop"]["optimizer_steps"] - 2  # the EMA only counts taken steps


def test_a_run_of_bad_steps_stops_training_and_keeps_the_last_good_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(training_loop, "to_model_input", poisoned(from_call=5))  # from the second epoch on
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row had a non-finite") as stopped:
        train.main(tiny_train_args(tiny_dataset, tmp_path, "--epochs", "3", "--max-bad-steps", "3"))
    last_path = tmp_path / "exp" / "weights" / "last.pt"
    assert str(last_path) in str(stopped.value)
    last = torch.load(last_path, weights_only=True)
    # Epoch 1's two steps were skipped (so its checkpoint holds epoch 0's weights); the third bad step, in epoch 2,
    # stopped the run before anything non-finite could be written.
    assert last["epoch"] == 1 and last["loop"]["bad_streak"] == 2
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in last[key].values() if t.dtype.is_floating_point)


def test_failed_write_stops_training_and_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    real_write, writes = saver.atomic_write, {"n": 0}

    def write_until_the_disk_fills(path, data):
        writes["n"] += 1
        if writes["n"] > 2:  # epoch 0's best.pt and last.pt go through, then the disk is full
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(saver, "atomic_write", write_until_the_disk_fills)
    with pytest.raises(TrainingStopped) as stopped:
        train.main(
            [
                "--data",
                str(tiny_dataset),
                "--epochs",
                "3",
                "--imgsz",
                "64",
                "--workers",
                "0",
                "--no-plots",
                "--project",
                str(tmp_path),
            ]
        )
    last_path = tmp_path / "exp" / "weights" / "last.pt"
    message = str(stopped.value)
    assert "No space left on device" in message and f"--resume {last_path}" in message
    assert torch.load(last_path, weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("content", [b"", b"epoch: 3\nweights: best\n"], ids=["empty", "text"])
def test_a_file_that_is_no_checkpoint_is_one_clear_error_everywhere(content, tiny_run, tiny_dataset, tmp_path, capsys):
    """An empty file or a text file given as a checkpoint: one error line naming it, exit 2, for
    every command that reads checkpoints, with --trust-pickle too."""
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    other = str(tiny_run / "weights" / "last.pt")
    image = str(next((Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val").glob("*.jpg")))
    runs = ["--project", str(tmp_path / "runs")]
    cases = [
        (train.main, ["--data", str(tiny_dataset), "--weights", str(path), *runs]),
        (train.main, ["--data", str(tiny_dataset), "--weights", str(path), "--trust-pickle", *runs]),
        (train.main, ["--resume", str(path)]),
        (val.main, ["--data", str(tiny_dataset), "--weights", str(path), *runs]),
        (val.main, ["--data", str(tiny_dataset), "--weights", str(path), "--trust-pickle", *runs]),
        (detect.main, ["--weights", str(path), "--source", image, *runs]),
        (detect.main, ["--weights", str(path), "--source", image, "--trust-pickle", *runs]),
        (average.main, ["--weights", other, str(path), "--out", str(tmp_path / "avg.pt")]),
    ]
    for main, args in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(functools.partial(main, args), "x.py")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and str(path) in err, (args, err)
        assert ("empty (0 bytes)" if not content else "is not a checkpoint") in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "avg.pt").exists()
