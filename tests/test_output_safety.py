"""Where train.py, val.py, detect.py, export.py, average.py and Results.save write (utils/output_paths.py):
never over or into what they read, never two results to one file, and a location that cannot be written
is one clear error before any work. Each test checks that the user's files are byte for byte unchanged.

Read-only folders are real: made immutable with `chattr +i` (which binds root too), or a tmpfs mounted
read-only; where that is not allowed, the write probe (or open and unlink) is patched to fail as a
read-only filesystem does."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

import average
import detect
import export
import train
import val
from tests.conftest import run_script, tiny_train_args
from utils.atomic_write import atomic_write
from utils.errors import UserError
from utils.infer.predictor import Detector


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by relative path: equal before and after means nothing was written there."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def make_read_only(monkeypatch):
    """freeze(folder): nothing can be written in `folder` from now on, until the test ends."""
    frozen: list[Path] = []

    def freeze(folder: Path) -> None:
        if (
            shutil.which("chattr")
            and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        ):
            frozen.append(folder)
            return
        from utils import output_paths  # this filesystem keeps no attributes: fail the probe as EROFS does

        real = output_paths.tempfile.NamedTemporaryFile

        def probe(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(output_paths.tempfile, "NamedTemporaryFile", probe)

    yield freeze
    for folder in frozen:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture
def own_dataset(tiny_dataset, tmp_path) -> Path:
    """A copy of the tiny dataset that a test may watch for writes; returns its YAML."""
    root = tmp_path / "dataset"
    shutil.copytree(Path(yaml.safe_load(tiny_dataset.read_text())["path"]), root)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({**yaml.safe_load(tiny_dataset.read_text()), "path": str(root)}))
    return data


@pytest.fixture
def images(tiny_dataset, tmp_path) -> Path:
    """A folder of two of the user's images and a short video."""
    folder = tmp_path / "mine"
    folder.mkdir()
    val_images = sorted((Path(yaml.safe_load(tiny_dataset.read_text())["path"]) / "images" / "val").glob("*.jpg"))
    for image in val_images[:2]:
        shutil.copy(image, folder)
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for k in range(3):
        writer.write(np.full((48, 64, 3), 40 * k, np.uint8))
    writer.release()
    return folder


@pytest.fixture(scope="module")
def detector(tiny_run) -> Detector:
    return Detector(tiny_run / "weights" / "best.pt", conf_thres=0.0, max_det=1)


def detect_args(tiny_run: Path, source: Path, project: Path) -> list[str]:
    return ["--weights", str(tiny_run / "weights" / "best.pt"), "--source", str(source), "--project", str(project)]


# 1. The user's own files: no output folder is, holds or lies in what a command reads.


def test_detect_refuses_to_write_into_its_source_folder(tiny_run, images):
    before = contents(images)
    args = [*detect_args(tiny_run, images, images.parent), "--name", images.name, "--exist-ok", "--save-txt"]
    with pytest.raises(UserError, match=f"--project/--name {images} holds the input .*write them elsewhere"):
        detect.main(args)
    assert contents(images) == before


def test_detect_refuses_a_run_folder_inside_its_source_folder(tiny_run, images):
    before = contents(images)
    with pytest.raises(UserError, match=f"lies in or holds {images}, which is read as an input"):
        detect.main(detect_args(tiny_run, images, images))
    assert contents(images) == before and sorted(p.name for p in images.iterdir()) == sorted(before)


def test_results_save_refuses_the_folder_of_its_source_image(detector, images):
    before = contents(images)
    (result,) = detector(str(sorted(images.glob("*.jpg"))[0]))
    with pytest.raises(UserError, match=f"Results.save: {images} holds the input"):
        result.save(images)
    assert contents(images) == before


@pytest.mark.parametrize("script", ["train", "val"])
def test_train_and_val_refuse_a_run_folder_in_their_dataset(script, tiny_run, own_dataset):
    dataset = Path(yaml.safe_load(own_dataset.read_text())["path"])
    before = contents(dataset)
    images = dataset / "images"
    if script == "train":
        args = tiny_train_args(own_dataset, images, "--name", "train", "--exist-ok", "--epochs", "1")
    else:
        args = ["--weights", str(tiny_run / "weights" / "best.pt"), "--data", str(own_dataset), "--workers", "0"]
        args += ["--project", str(images), "--name", "val", "--exist-ok"]
    with pytest.raises(UserError, match=f"lies in or holds {images / script}, which is read as an input"):
        {"train": train, "val": val}[script].main(args)
    assert contents(dataset) == before


def test_train_refuses_a_run_folder_that_holds_its_weights(tiny_run, tiny_dataset, tmp_path):
    run = tmp_path / "exp"
    shutil.copytree(tiny_run, run)
    before = contents(run)
    args = tiny_train_args(tiny_dataset, tmp_path, "--name", "exp", "--exist-ok", "--epochs", "1")
    with pytest.raises(UserError, match=f"--project/--name {run} holds the input {run / 'weights' / 'best.pt'}"):
        train.main([*args, "--weights", str(run / "weights" / "best.pt")])
    assert contents(run) == before


def test_resuming_into_a_read_only_run_folder_is_one_clear_error(tiny_run, tmp_path, make_read_only):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for folder in (run, run / "weights"):
        make_read_only(folder)
    before = contents(run)
    with pytest.raises(UserError, match=f"the run folder {run} \\(--resume continues in it\\): cannot write in {run}"):
        train.main(["--resume", str(run / "weights" / "epoch0.pt")])
    assert contents(run) == before


# 4. Results of one batch never share a file: detect.py's naming rule (utils/infer/media_files.py).


def test_results_save_gives_each_array_and_pil_image_of_a_batch_its_own_file(detector, images, tmp_path):
    rgb = [cv2.imread(str(p))[..., ::-1].copy() for p in sorted(images.glob("*.jpg"))]
    results = detector([rgb[0], Image.fromarray(rgb[1])])
    saved = [r.save(tmp_path / "out") for r in results]
    assert [p.name for p in saved] == ["image0.jpg", "image1.jpg"]
    assert [cv2.imread(str(p)).shape for p in saved] == [image.shape for image in rgb]


def test_results_save_keeps_same_named_files_from_different_folders_apart(detector, images, tmp_path):
    first, second = sorted(images.glob("*.jpg"))
    for folder, image in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "x.jpg")
    results = detector([str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg")])
    saved = [r.save(tmp_path / "out") for r in results]
    assert [p.relative_to(tmp_path / "out").as_posix() for p in saved] == ["a/x.jpg", "b/x.jpg"]  # as detect.py
    assert not np.array_equal(cv2.imread(str(saved[0])), cv2.imread(str(saved[1])))


def test_results_save_never_replaces_a_file_by_a_default_name(detector, images, tmp_path):
    """Two calls of one script save arrays (both image0.jpg by their place in the batch) into one folder
    that already holds a file of the user's by that name: every image is kept, the user's file too."""
    rgb = [cv2.imread(str(p))[..., ::-1].copy() for p in sorted(images.glob("*.jpg"))]
    out = tmp_path / "out"
    out.mkdir()
    (out / "image0.jpg").write_bytes(b"the user's own")
    saved = [detector(image)[0].save(out) for image in rgb]
    assert [p.name for p in saved] == ["image0_2.jpg", "image0_3.jpg"]
    assert (out / "image0.jpg").read_bytes() == b"the user's own"
    assert [cv2.imread(str(p)).shape for p in saved] == [image.shape for image in rgb]
    assert detector(rgb[0])[0].save(out, "image0.jpg") == out / "image0.jpg"  # a name given is the name used


# 6. Output locations that cannot be written: one clear error before any work.


def script_args(script: str, tiny_run: Path, data: Path, images: Path, project: Path) -> list[str]:
    if script == "train":
        return tiny_train_args(data, project, "--epochs", "1")
    if script == "val":
        return ["--weights", str(tiny_run / "weights" / "best.pt"), "--data", str(data), "--project", str(project)]
    return detect_args(tiny_run, images, project)


@pytest.mark.parametrize("script", ["train", "val", "detect"])
def test_a_project_that_is_a_file_is_one_clear_error(script, tiny_run, tiny_dataset, images, tmp_path):
    project = tmp_path / "notes.txt"
    project.write_text("the user's notes\n")
    args = script_args(script, tiny_run, tiny_dataset, images, project)
    with pytest.raises(UserError, match=f"--project {project} is a file, not a folder"):
        {"train": train, "val": val, "detect": detect}[script].main(args)
    assert project.read_text() == "the user's notes\n"


@pytest.mark.parametrize("script", ["train", "val", "detect"])
def test_a_read_only_project_is_one_clear_error(script, tiny_run, tiny_dataset, images, tmp_path, make_read_only):
    project = tmp_path / "shared"
    project.mkdir()
    (project / "theirs.txt").write_text("kept\n")
    make_read_only(project)
    args = script_args(script, tiny_run, tiny_dataset, images, project)
    with pytest.raises(UserError, match=f"--project {project}: cannot write in {project} \\("):
        {"train": train, "val": val, "detect": detect}[script].main(args)
    assert contents(project) == {"theirs.txt": b"kept\n"}


def test_the_refusal_is_one_line_and_exit_status_2(tiny_run, images, tmp_path):
    project = tmp_path / "notes.txt"
    project.write_text("notes\n")
    done = run_script("detect.py", *detect_args(tiny_run, images, project))
    assert done.returncode == 2
    assert done.stderr == f"detect.py: error: --project {project} is a file, not a folder: give a folder to write in\n"


def test_export_next_to_a_read_only_checkpoint_is_refused_and_out_dir_writes_elsewhere(
    tiny_run, tmp_path, make_read_only
):
    folder = tmp_path / "read_only"
    folder.mkdir()
    shutil.copy(tiny_run / "weights" / "best.pt", folder)
    make_read_only(folder)
    before = contents(folder)
    with pytest.raises(UserError, match=f"{folder} \\(the folder of --weights; --out-dir writes elsewhere\\): cannot"):
        export.main(["--weights", str(folder / "best.pt")])
    assert export.main(["--weights", str(folder / "best.pt"), "--out-dir", str(tmp_path / "exports")]) == 0
    assert (tmp_path / "exports" / "best.torchscript").is_file()
    assert contents(folder) == before


def test_average_out_in_a_read_only_folder_is_refused_before_loading(tiny_run, tmp_path, make_read_only, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    make_read_only(folder)
    monkeypatch.setattr(average, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before --out was checked"))
    weights = [str(tiny_run / "weights" / f"epoch{e}.pt") for e in (0, 1)]
    with pytest.raises(UserError, match=f"--out {folder / 'avg.pt'}: its folder {folder}: cannot write in {folder}"):
        average.main(["--weights", *weights, "--out", str(folder / "avg.pt")])
    assert contents(folder) == {}


def test_a_failed_write_reports_its_own_error_not_its_clean_ups(tmp_path, monkeypatch):
    """On a read-only mount even removing the temporary that was never made fails: that must not hide why."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:  # no privilege to mount: fail both steps as a read-only mount does

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr("utils.atomic_write.open", read_only, raising=False)
        monkeypatch.setattr(Path, "unlink", read_only)
    try:
        with pytest.raises(OSError) as raised:
            atomic_write(folder / "last.pt", b"weights")
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(folder)], check=True)
    assert raised.value.errno == errno.EROFS and raised.value.__context__ is None  # the write's own error


# The rule as a whole: every command, on a world of the user's files it runs in.


def changed_paths(before: dict[str, bytes], after: dict[str, bytes]) -> set[str]:
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def test_no_command_writes_outside_its_run_folder_or_the_files_it_names(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    """train, val (with --save-json), detect, export (beside the weights and with --out-dir) and
    average, run in a folder of the user's dataset, weights and images, each with its cwd and $HOME
    there: every file added or changed lies in the command's run folder or is a file it names (an
    export beside --weights, YOLOv5's rule; average's --out), or in the project's cache folder."""
    world = tmp_path / "world"
    shutil.copytree(Path(yaml.safe_load(tiny_dataset.read_text())["path"]), world / "dataset")
    (world / "data.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load(tiny_dataset.read_text()), "path": str(world / "dataset")})
    )
    (world / "weights").mkdir()
    for name in ("best.pt", "epoch0.pt", "epoch1.pt"):
        shutil.copy(tiny_run / "weights" / name, world / "weights")
    shutil.copytree(world / "dataset" / "images" / "val", world / "images")
    monkeypatch.chdir(world)
    monkeypatch.setenv("HOME", str(world / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("EMA_YOLO_CACHE_DIR", str(world / "cache"))
    weights = "weights/best.pt"
    commands = [
        (train.main, [*tiny_train_args(Path("data.yaml"), Path("runs/train")), "--epochs", "1"], ["runs/train/exp"]),
        (val.main, ["--weights", weights, "--data", "data.yaml", "--project", "runs/val", "--save-json"], ["runs/val"]),
        (detect.main, ["--weights", weights, "--source", "images", "--project", "runs/d", "--save-txt"], ["runs/d"]),
        (export.main, ["--weights", weights], ["weights/best.torchscript"]),
        (export.main, ["--weights", weights, "--out-dir", "exports"], ["exports/best.torchscript"]),
        (average.main, ["--weights", "weights/epoch0.pt", "weights/epoch1.pt", "--out", "avg.pt"], ["avg.pt"]),
    ]
    for command, args, allowed in commands:
        before = contents(world)
        assert command(args) == 0, args
        changed = changed_paths(before, contents(world))
        assert changed, args  # the command wrote something: the audit saw it
        outside = {p for p in changed if not any(p == a or p.startswith(f"{a}/") for a in [*allowed, "cache"])}
        assert not outside, (args, sorted(outside))
    assert any((world / "cache" / "labels").iterdir())  # the label caches went to the cache folder
