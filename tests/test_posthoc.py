"""Post-hoc EMA: snapshot schedule, profiles, least-squares reconstruction against a power EMA
tracked directly, and average.py --posthoc on a real run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import average as average_cli
from tests.conftest import REPO_ROOT, tiny_train_args
from tests.test_ema import Marker, step_weights
from utils.errors import UserError
from utils.train.ema import PowerEMA, power_exponent
from utils.train.posthoc import find_snapshots, least_squares_coefficients, power_profile, snapshot_epochs


def test_snapshots_are_evenly_spaced_and_end_with_training():
    assert snapshot_epochs(30, 20) == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29]
    assert snapshot_epochs(150, 20)[-1] == 149 and len(snapshot_epochs(150, 20)) == 20
    assert snapshot_epochs(3, 2) == [1, 2]
    assert snapshot_epochs(5, 10) == [0, 1, 2, 3, 4]  # at most one per epoch


def test_profile_is_the_power_ema_of_the_steps_so_far():
    weights = step_weights(lambda m: PowerEMA(m, 0.1), [8] * 40)  # after 40 steps
    profile = power_profile(power_exponent(0.1), 40, 60)
    np.testing.assert_allclose(profile[:40], weights, rtol=1e-9)
    assert not profile[40:].any() and profile.sum() == pytest.approx(1.0)


def reconstruction_error(snapshot_count: int, steps: int = 600, at: int | None = None) -> tuple[float, float]:
    """Relative error between the power EMA of width 0.07 tracked directly over `steps` marker
    steps (its weight for each step) and its reconstruction from `snapshot_count` evenly spaced
    snapshots of the 0.05 and 0.10 power EMAs taken at or before step `at`; and the fit's residual."""
    at = at or steps
    model = Marker(steps)
    stored, direct = (PowerEMA(model, 0.05), PowerEMA(model, 0.10)), PowerEMA(model, 0.07)
    due = {round((i + 1) * steps / snapshot_count) for i in range(snapshot_count)}
    snapshots, target = [], None
    for k in range(steps):
        model.set_step(k)
        for tracked in (*stored, direct):
            tracked.update(model, 16)
        if k + 1 in due and k + 1 <= at:
            snapshots += [(a.gamma, a.updates, a.module.w.clone()) for a in stored]
        if k + 1 == at:
            target = direct.module.w.clone()
    coefficients, residual = least_squares_coefficients([(g, t) for g, t, _ in snapshots], direct.gamma, at)
    rebuilt = sum(c * w for c, (_, _, w) in zip(coefficients, snapshots))
    return float((rebuilt - target).norm() / target.norm()), residual


@pytest.mark.parametrize("count, bound", [(20, 0.003), (10, 0.01)])
def test_reconstruction_matches_a_power_ema_tracked_directly(count, bound):
    """Step by step weights: 0.25% off with 20 snapshots (0.9% with 10), as the fit's residual says."""
    error, residual = reconstruction_error(count)
    print(f"{count} snapshots: relative error {error:.4%} (profile residual {residual:.4%})")
    assert error < bound and error == pytest.approx(residual, rel=1e-6)


def test_reconstruction_at_an_earlier_step():
    error, _ = reconstruction_error(20, at=420)
    assert error < 0.005


def train(tmp_path: Path, tiny_dataset: Path, *extra: str) -> Path:
    args = tiny_train_args(tiny_dataset, tmp_path, "--epochs", "4", "--name", "run", *extra)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "run"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def posthoc_run(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny run with 4 snapshots and the 0.07 power EMA tracked directly beside them."""
    return train(tmp_path_factory.mktemp("posthoc"), tiny_dataset, "--posthoc-ema", "4", "--average", "power-0.07")


@pytest.mark.slow
def test_reconstructed_run_average_equals_the_tracked_one(posthoc_run, tmp_path):
    """average.py --posthoc --sigma-rel 0.07 against the power-0.07 average the run tracked itself."""
    snapshots = sorted(p.name for p in (posthoc_run / "weights" / "posthoc").iterdir())
    assert snapshots == ["epoch0000.pt", "epoch0001.pt", "epoch0002.pt", "epoch0003.pt"]
    out = tmp_path / "rebuilt.pt"
    result = run_tool(
        "average.py", "--posthoc", str(posthoc_run), "--sigma-rel", "0.07", "--bn", "average", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    rebuilt = torch.load(out, weights_only=True)
    tracked = torch.load(posthoc_run / "weights" / "power-0.07.pt", weights_only=True)["ema"]
    floats = [k for k, v in tracked.items() if v.is_floating_point()]
    difference = sum((rebuilt["ema"][k].double() - tracked[k].double()).square().sum() for k in floats).sqrt()
    error = float(difference / sum(tracked[k].double().square().sum() for k in floats).sqrt())
    print(f"relative weight error of the reconstruction: {error:.2e}")
    assert error < 1e-3
    assert rebuilt["kind"] == "average" and rebuilt["posthoc"]["sigma_rel"] == 0.07


@pytest.mark.slow
def test_sweep_writes_the_best_and_val_reproduces_its_row(posthoc_run, tiny_dataset, tmp_path):
    out = tmp_path / "best.pt"
    sweep = run_tool(
        "average.py", "--posthoc", str(posthoc_run), "--sweep", "--sigma-rel", "0.05", "0.1", "0.2", "--out", str(out)
    )
    assert sweep.returncode == 0, sweep.stderr
    log = sweep.stdout + sweep.stderr
    best = re.search(r"\| ([0-9.]+) \(best\) \| [0-9.]+% \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", log)
    assert best, log
    assert (tmp_path / "best_sweep.png").stat().st_size > 0
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["posthoc"]["sigma_rel"] == float(best.group(1))
    val = run_tool("val.py", "--weights", str(out), "--data", str(tiny_dataset), "--no-plots")
    assert val.returncode == 0, val.stderr
    row = re.search(r"\s+all\s+\d+\s+\d+\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", val.stdout + val.stderr)
    assert row, val.stdout + val.stderr
    for swept, validated in zip(best.groups()[1:], row.groups()):
        assert float(swept) == pytest.approx(float(validated), abs=6e-4)  # val.py prints 3 digits


@pytest.mark.slow
def test_posthoc_refusals(posthoc_run, tiny_run, tiny_dataset, tmp_path):
    plain = tiny_run  # a run without snapshots
    cases = [
        (("--posthoc", str(plain), "--sigma-rel", "0.1"), "no post-hoc EMA snapshots"),
        (("--posthoc", str(tmp_path / "nowhere"), "--sigma-rel", "0.1"), "not a run folder"),
        (("--posthoc", str(posthoc_run)), "needs --sigma-rel"),
        (("--posthoc", str(posthoc_run), "--sigma-rel", "0.5"), "relative width must be in"),
        (("--posthoc", str(posthoc_run), "--sigma-rel", "0.05", "0.1"), "add --sweep"),
    ]
    # One through the command line (exit status 2, no traceback); the rest in this process (CI time).
    (first, message), *rest = cases
    result = run_tool("average.py", *first, "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    for args, message in rest:
        with pytest.raises(UserError, match=re.escape(message)):
            average_cli.main([*args, "--out", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
    snapshot = posthoc_run / "weights" / "posthoc" / "epoch0003.pt"
    for read in (posthoc_run / "weights" / "last.pt", snapshot):  # --out over an input of the run: refused
        before = read.read_bytes()
        with pytest.raises(UserError, match=f"--out {re.escape(str(read))} (is the input|lies in .*read as an input)"):
            average_cli.main(["--posthoc", str(posthoc_run), "--sigma-rel", "0.05", "--out", str(read)])
        assert read.read_bytes() == before
    result = run_tool("val.py", "--weights", str(snapshot), "--data", str(tiny_dataset), "--no-plots")
    assert result.returncode == 2 and "post-hoc EMA snapshot" in result.stderr


def test_find_snapshots_refuses_a_run_without_them(tmp_path):
    with pytest.raises(UserError, match="--posthoc-ema"):
        find_snapshots(tmp_path)
