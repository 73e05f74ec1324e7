"""Mistakes after training get a clear answer: averaging checkpoints of different classes is refused
(unless --names-from says whose names to ship), and the messages of resume, val.py, model names,
--at-epoch, a full disk and diverging training say what is true and what to do."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import average
import train
import val
from models.yolo import build_model
from utils.errors import TrainingStopped, UserError
from utils.train import saver as saver_module
from utils.train.posthoc_sweep import updates_at_epoch
from utils.train.run import TrainingRun
from utils.train.saver import CheckpointWriter


def with_names(source: Path, target: Path, names: list[str]) -> Path:
    """A copy of checkpoint `source` whose class names are `names`."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["names"] = names
    torch.save(checkpoint, target)
    return target


@pytest.fixture
def renamed(tiny_run, tmp_path) -> tuple[Path, Path, list[str]]:
    """epoch0.pt as trained and epoch1.pt with its class names in reverse order, and the names as trained."""
    first = tmp_path / "a.pt"
    shutil.copy(tiny_run / "weights" / "epoch0.pt", first)
    names = list(torch.load(first, map_location="cpu", weights_only=True)["names"])
    return first, with_names(tiny_run / "weights" / "epoch1.pt", tmp_path / "b.pt", names[::-1]), names


def test_average_refuses_checkpoints_of_other_class_names(renamed, tmp_path):
    first, second, names = renamed
    with pytest.raises(UserError) as error:
        average.main(["--weights", str(first), str(second), "--out", str(tmp_path / "avg.pt")])
    message = str(error.value)
    assert f"{first} and {second} do not describe the same classes: class 0 is '{names[0]}'" in message
    assert "(the same names in another order)" in message and "--names-from FILE" in message
    assert not (tmp_path / "avg.pt").exists()


def test_average_names_from_ships_the_names_of_the_file_chosen(renamed, tmp_path, capsys):
    first, second, names = renamed
    out = tmp_path / "avg.pt"
    average.main(["--weights", str(first), str(second), "--out", str(out), "--names-from", str(second)])
    assert torch.load(out, map_location="cpu", weights_only=True)["names"] == names[::-1]
    assert f"the checkpoints name their classes differently; the average ships {second}'s" in capsys.readouterr().out
    with pytest.raises(UserError, match="--names-from x.pt is not one of --weights"):
        average.main(["--weights", str(first), str(second), "--out", str(out), "--names-from", "x.pt"])


def test_average_refuses_another_class_count(renamed, tmp_path):
    first, _, names = renamed
    fewer = with_names(first, tmp_path / "c.pt", names[:-1])
    with pytest.raises(UserError, match=f"do not describe the same classes: {len(names)} classes against"):
        average.main(["--weights", str(first), str(fewer), "--out", str(tmp_path / "avg.pt")])


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the finished tiny run in its own project folder."""
    return Path(shutil.copytree(tiny_run, tmp_path / "project" / "exp"))


def test_a_bare_resume_of_a_finished_run_names_its_checkpoint(run_copy, capsys):
    assert train.main(["--resume", "--project", str(run_copy.parent)]) == 0
    out = capsys.readouterr().out
    assert f"{run_copy / 'weights' / 'last.pt'} is from a finished run (2 epochs); nothing to resume" in out
    assert "True is from" not in out


def test_resume_of_a_run_folder_resumes_its_last_checkpoint(run_copy, tmp_path, capsys):
    assert train.main(["--resume", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert f"--resume {run_copy} is a folder: resuming its weights/last.pt" in out
    assert "is from a finished run" in out
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is a folder without weights/last.pt"):
        train.main(["--resume", str(tmp_path / "empty")])


def test_a_resumed_run_says_how_many_images_changed(tiny_run, tmp_path, caplog):
    """train.py records the run's files (data_files.txt) when it starts; resuming after an image
    changed, one was added and one removed says so, with the counts."""
    from utils.data.file_record import RECORD_NAME, record_data_files

    assert (tiny_run / RECORD_NAME).is_file()
    images = []
    for i in range(3):
        images.append(tmp_path / "images" / f"{i}.jpg")
        images[-1].parent.mkdir(exist_ok=True)
        images[-1].write_bytes(b"x" * (i + 1))
    scan = SimpleNamespace(image_files=images[:2])
    record_data_files(tmp_path, [("train", scan)], resumed=False)
    record_data_files(tmp_path, [("train", scan)], resumed=True)
    assert "the dataset changed" not in caplog.text
    images[0].write_bytes(b"changed")
    scan.image_files = [images[0], images[2]]
    record_data_files(tmp_path, [("train", scan)], resumed=True)
    assert "WARNING: the dataset changed since this run last trained (train: 1 changed, 1 added, 1 removed images" in (
        caplog.text
    )


def test_val_without_data_evaluates_the_dataset_the_run_trained_on(tiny_run, tiny_dataset, tmp_path, capsys):
    weights = tiny_run / "weights" / "best.pt"
    val.main(["--weights", str(weights), "--workers", "0", "--no-plots", "--project", str(tmp_path)])
    assert f"--data not given: evaluating on {tiny_dataset}, the dataset {weights} was trained on" in (
        capsys.readouterr().out
    )


def test_val_without_data_refuses_a_recorded_dataset_that_is_gone(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "weights" / "best.pt", map_location="cpu", weights_only=True)
    checkpoint["opt"]["data"] = str(tmp_path / "gone.yaml")
    weights = tmp_path / "moved.pt"
    torch.save(checkpoint, weights)
    with pytest.raises(
        UserError, match="gone.yaml, the dataset .* was trained on, is not found from here: give --data"
    ):
        val.main(["--weights", str(weights), "--workers", "0", "--no-plots", "--project", str(tmp_path)])


def test_an_unknown_model_name_lists_the_shipped_models_and_scales():
    with pytest.raises(UserError) as error:
        build_model("yolov9s.yaml")
    message = str(error.value)
    assert "no model YAML yolov9s.yaml: give a path, or one of the shipped models:" in message
    assert "yolov5s.yaml" in message and "yolov8{n,s,m,l,x}.yaml" in message and "yolov5{n,s,m,l,x}u.yaml" in message


def test_a_missing_at_epoch_lists_the_epochs_there_are(tmp_path):
    from utils.train.posthoc_sweep import epoch_ranges

    csv_path = tmp_path / "results.csv"
    csv_path.write_text("epoch,ema/updates\n" + "".join(f"{e},{10 * e}\n" for e in (0, 1, 2, 5)))
    with pytest.raises(UserError, match=r"--at-epoch 7: .* the run has epochs 0-2, 5, 9$"):
        updates_at_epoch(csv_path, 7, {9})
    assert epoch_ranges([]) == "none"


def test_a_full_disk_after_best_pt_names_it(tmp_path, monkeypatch):
    """The first epoch's best.pt is written, last.pt is not: best.pt is there to resume, not 'nothing'."""
    real_write = saver_module.atomic_write

    def full_disk_for_last(path: Path, data) -> None:
        if path.name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(saver_module, "atomic_write", full_disk_for_last)
    writer = CheckpointWriter(tmp_path / "weights", interval_minutes=0)
    weights = {"w": torch.zeros(2)}
    with pytest.raises(TrainingStopped) as error:
        writer.write({"model": weights, "ema": weights}, best=True)
    message = str(error.value)
    assert "no checkpoint of this run exists" not in message
    assert f"{writer.best_path} of this epoch was written whole" in message
    assert f"python train.py --resume {writer.best_path}" in message


class FillingFile:
    """A file being written on a disk with `room` bytes left: a write past them fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_a_disk_that_fills_while_a_checkpoint_streams_stops_training_keeping_the_files_whole(tmp_path, monkeypatch):
    """torch.save writes into the file as it goes: the disk filling halfway through is the disk's
    error (not torch's), training stops saying how to continue, and last.pt and best.pt stay whole."""
    writer = CheckpointWriter(tmp_path / "weights", interval_minutes=0)
    first = {"model": {"w": torch.zeros(4)}, "ema": {"w": torch.ones(4)}}
    writer.write(first, best=True)
    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillingFile(f, room=100_000) if "x" in mode else f  # atomic_write's temporaries

    monkeypatch.setattr("utils.atomic_write.open", open_on_a_full_disk, raising=False)
    weights = {"w": torch.arange(1_000_000, dtype=torch.float32)}  # 4 MB: the disk fills halfway
    with pytest.raises(TrainingStopped) as stopped:
        writer.write({"model": weights, "ema": weights}, best=True)
    message = str(stopped.value)
    assert "No space left on device" in message and f"the previous {writer.last_path} is intact" in message
    for path in (writer.last_path, writer.best_path):
        assert torch.equal(torch.load(path, weights_only=True)["ema"]["w"], first["ema"]["w"])
    assert not list(writer.weights_dir.glob(".*.tmp"))


def test_diverging_training_names_data_report_only_when_it_was_written(tmp_path):
    run = SimpleNamespace(
        loop=SimpleNamespace(bad_streak=3),
        config=SimpleNamespace(opt=SimpleNamespace(max_bad_steps=3)),
        run_dir=tmp_path,
        _last_checkpoint_name=lambda: "last.pt",
    )
    with pytest.raises(TrainingStopped) as error:
        TrainingRun.stop_if_diverging(run)
    assert "data_report.txt" not in str(error.value)
    (tmp_path / "data_report.txt").write_text("train\tcorrupt\tx.jpg: unreadable\n")
    with pytest.raises(TrainingStopped, match=f"check the data \\(see {tmp_path / 'data_report.txt'}\\)"):
        TrainingRun.stop_if_diverging(run)
