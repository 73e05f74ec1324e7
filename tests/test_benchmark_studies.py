"""The benchmark studies cannot rot (issue 27): averaging_methods.py, averaging_study.py,
short_window_study.py, bench_posthoc.py and bench_process_states.py each run end to end at their
smallest configuration (the tiny generated dataset, 64 px, one seed, the fewest epochs, methods and
processes that still take each of the script's paths), so that an import error, a renamed option
or a changed checkpoint key fails here rather than for the next user. Each test checks the tables
the script prints (header, rows of numbers that agree with one another) and the plot it writes;
what the numbers come to is the benchmarks' business, not asserted."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import make_shapes_dataset, run_script
from tests.printed_tables import number, table

TINY_TRAINING = ("--imgsz", "64", "--batch-size", "4", "--workers", "0")  # the benchmarks' train.py options


def run_main(main: Callable[[], None], *args: str) -> str:
    """A benchmark's main() in this process with `args` as its command line, on one CPU thread (runs this small
    gain nothing from a second, and on a busy machine spin-waiting threads slow them several-fold); returns what
    it printed."""
    printed = io.StringIO()
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["benchmark", *args]
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # a script may pin its own
    return printed.getvalue()


def logs(folder: Path) -> str:
    """The ends of the training logs the benchmarks keep under `folder`."""
    return "".join(f"\n{path}:\n{path.read_text()[-3000:]}" for path in sorted(folder.rglob("*.log")))


@pytest.fixture(scope="module")
def study(tiny_dataset, tmp_path_factory) -> tuple[str, Path, Path]:
    """averaging_study.py at its smallest: one 1-epoch run tracking every average, one sweep width.
    Returns what it printed, its run folder (snapshots, power-0.07.pt: bench_posthoc's --run) and its plot."""
    from benchmarks.averaging_study import main

    project = tmp_path_factory.mktemp("averaging_study")
    plot = project / "plot.png"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OMP_NUM_THREADS", "1")  # its train.py run too, as run_main's work
            printed = run_main(
                main, "--data", str(tiny_dataset), *TINY_TRAINING, "--epochs", "1", "--seeds", "0",
                "--snapshots", "2", "--swa-epochs", "1", "--widths", "0.07", "--project", str(project),
                "--plot", str(plot),
            )  # fmt: skip
    except SystemExit as exit:  # its train.py run failed: the run's log says why
        pytest.fail(f"{exit}\n{logs(project)}")
    return printed, project / "e1_s0", plot


def test_averaging_study_prints_its_tables_and_writes_its_plot(study):
    printed, run_dir, plot = study
    rows = table(printed, "| weights | BatchNorm | seed 0 | mean | spread | vs raw (paired) |")
    assert len(rows) == 5 * 2, "every method in both BatchNorm modes"  # raw, ema, ema-images, posthoc, swa
    for row in rows:
        assert 0 <= number(row[2]) <= 1 and number(row[3]) == number(row[2]) and number(row[4]) == 0, row
    assert "sigma_rel 0.07" in next(row[0] for row in rows if row[0].startswith("post-hoc"))
    sweep = table(printed, "| sigma_rel | BN averaged | BN recomputed |")
    assert [number(row[0]) for row in sweep] == [0.07] and all(0 <= number(c) <= 1 for c in sweep[0][1:])
    ((seed, error, residual, tracked, rebuilt, difference),) = table(printed, "| seed | relative weight error |")
    assert seed == "0" and number(error) >= 0 and number(residual) >= 0
    assert number(difference) == pytest.approx(number(rebuilt) - number(tracked), abs=2e-4)
    assert (run_dir / "study.json").is_file()  # its evaluations cached for the next sitting
    assert plot.is_file() and plot.stat().st_size > 0 and f"plot: {plot}" in printed


def test_bench_posthoc_costs_a_model_and_rounds_a_runs_snapshots(study):
    from benchmarks.bench_posthoc import main

    printed = run_main(main, "--cfgs", "yolov5n.yaml", "--repeats", "1", "--run", str(study[1]))
    (cost,) = table(printed, "| model | floats per EMA | one snapshot (2 EMAs, fp32) |")
    assert cost[0] == "yolov5n" and all(number(cell) > 0 for cell in cost[1:]), cost
    rows = table(printed, "| snapshots stored as | relative weight error | mAP@0.5:0.95 |")
    assert [row[0] for row in rows] == ["float32", "float16", "bfloat16"]
    assert all(number(row[1]) >= 0 and 0 <= number(row[2]) <= 1 for row in rows), rows


def test_short_window_study_steps_full_and_short_windows(study, tmp_path):
    from benchmarks.short_window_study import VARIANTS, main

    # 72 images in batches of 16 accumulated to 64: a full window and a short one of 8 each epoch
    data = make_shapes_dataset(tmp_path, num_train=72, num_val=1, seed=2)
    weights = study[1] / "weights" / "last.pt"  # a trained checkpoint of the same classes: --weights
    printed = run_main(
        main, "--data", str(data), "--batch-size", "16", "--epochs", "1", "--imgsz", "64", "--threads", "1",
        "--weights", str(weights),
    )  # fmt: skip
    assert "window sizes [8, 64]; 1 short of 2 windows" in printed and f"from {weights}" in printed
    rows = table(printed, "| optimizer | variant | update, full window | update, short window | short / full |")
    assert [row[:2] for row in rows] == [[o, v] for o in ("SGD", "AdamW") for v in VARIANTS]
    for row in rows:
        full, short, ratio = map(number, row[2:5])
        assert full > 0 and short > 0 and ratio == pytest.approx(short / full, rel=0.01, abs=1e-3), row


def test_bench_process_states_measures_swap_and_grafting():
    result = run_script("benchmarks/bench_process_states.py", "--processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table(result.stdout, "| code | method | processes | last.pt | best.pt | last.rank*.pt files |")
    assert [row[:3] for row in rows] == [["this checkout", "swap", "2"], ["this checkout", "graft", "2"]]
    for row in rows:
        assert row[5].startswith("1 x "), f"one file beside last.pt, the other process's: {row}"
        sizes, growth, peak = [number(row[3]), number(row[4]), number(row[5][4:])], number(row[6]), number(row[7])
        assert all(size > 0 for size in sizes) and growth >= 0 and peak > 0, row


@pytest.mark.slow
def test_averaging_methods_trains_the_default_run(tiny_dataset, tmp_path):
    """The default run's accuracy and timing runs, and the table; the other methods differ only in
    train.py's options (SWAP's and grafting's torchrun runs: test_distributed_separate.py)."""
    result = run_script(
        "benchmarks/averaging_methods.py", "--data", str(tiny_dataset), *TINY_TRAINING,
        "--methods", "default", "--seeds", "0", "--epochs", "1", "--timing-epochs", "1",
        "--project", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + logs(tmp_path)
    rows = table(result.stdout, "| method | seed 0 | mean | vs default, paired mean (worst seed) | wall, s |")
    labels = [row[0] for row in rows]
    assert len(labels) == 1 and labels[0].startswith("default run")
    for row in rows:
        assert 0 <= number(row[1]) <= 1 and number(row[-2]) >= 0 and number(row[-1]) > 0, row
    assert rows[0][3] == "" and rows[0][-1] == "1.00x"
    assert (tmp_path / "timing.json").is_file()
