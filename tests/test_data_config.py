"""Dataset YAMLs: YOLOv5's format, the embedded generator, and clear errors (COCO absent, bad keys)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, run_script
from utils.data.config import load_dataset_config
from utils.data.synthetic_shapes import CLASS_NAMES
from utils.errors import UserError


def write(tmp_path: Path, content: dict | str) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def test_names_as_dict_or_list_and_paths(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "val.txt").write_text("")
    config = load_dataset_config(
        write(
            tmp_path,
            {"path": str(tmp_path), "train": "images/train", "val": ["val.txt"], "names": {0: "cat", 1: "dog"}},
        )
    )
    assert config.names == ("cat", "dog") and config.nc == 2
    assert config.train == (tmp_path / "images" / "train",) and config.val == (tmp_path / "val.txt",)
    config = load_dataset_config(
        write(
            tmp_path, {"path": str(tmp_path), "train": "images/train", "val": "images/train", "names": ["cat"], "nc": 1}
        )
    )
    assert config.names == ("cat",)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"train": "a", "names": ["x"]}, "missing key(s) val"),
        ({"train": "a", "val": "b", "names": ["x", "y"], "nc": 3}, "nc is 3 but names lists 2"),
        ({"train": "a", "val": "b", "names": {1: "x"}}, "class ids 0..0"),
        ({"train": 5, "val": "b", "names": ["x"]}, "train must be a path"),
        ({"train": "a", "val": "b", "names": ["x"], "generate": "voc"}, "unknown generator 'voc'"),
        ("train: [a\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_bad_dataset_yaml(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(UserError) as error:
        load_dataset_config(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_images_name_the_folder_and_the_recipe(tmp_path):
    path = write(
        tmp_path,
        {
            "path": str(tmp_path / "coco"),
            "train": "train2017.txt",
            "val": "val2017.txt",
            "names": ["person"],
            "download": "bash data/scripts/get_coco.sh",
        },
    )
    with pytest.raises(UserError) as error:
        load_dataset_config(path)
    text = str(error.value)
    assert (
        str(tmp_path / "coco") in text
        and "bash data/scripts/get_coco.sh" in text
        and "never done automatically" in text
    )


def test_shipped_coco_yaml_without_coco(tmp_path):
    config = load_dataset_config("coco.yaml", prepare=False)
    assert config.nc == 80 and config.names[0] == "person" and config.names[79] == "toothbrush"
    if config.root.exists():
        pytest.skip(f"COCO is present at {config.root}")
    result = run_script("train.py", "--data", "coco.yaml", "--project", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert str(config.root) in result.stderr and "data/scripts/get_coco.sh" in result.stderr
    assert not any(tmp_path.iterdir())  # no empty run folder is left behind


def test_shapes_yaml_matches_the_generator():
    raw = yaml.safe_load((REPO_ROOT / "data" / "shapes.yaml").read_text())
    assert [raw["names"][i] for i in range(len(raw["names"]))] == list(CLASS_NAMES)
    assert raw["generate"] == "shapes"


def test_generator_output_becomes_a_dataset(tmp_path, monkeypatch):
    import utils.data.config as data_config

    calls = []

    def fake_generator(root: Path) -> bool:  # stands in for the real one: records and builds the folders
        calls.append(root)
        (root / "images" / "train").mkdir(parents=True)
        (root / "images" / "val").mkdir(parents=True)
        return True

    monkeypatch.setitem(data_config.GENERATORS, "shapes", fake_generator)
    path = write(
        tmp_path,
        {
            "path": str(tmp_path / "gen"),
            "train": "images/train",
            "val": "images/val",
            "names": ["a"],
            "generate": "shapes",
        },
    )
    assert load_dataset_config(path).root == tmp_path / "gen" and calls == [tmp_path / "gen"]
