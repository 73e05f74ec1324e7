"""Dataset YAML (YOLOv5 format) -> DatasetConfig, with clear errors for every user mistake.

Keys: `path` (dataset root; relative paths are taken from the repository root, as YOLOv5
does), `train`, `val`, optional `test` (each a folder, an image-list .txt, or a list of
those, relative to `path`), `names` (a list, or a dict {0: name, ...}), optional `nc`.
Ours: `generate` names a built-in generator that writes the dataset on first use;
`download` is the command shown to the user when the images are missing (never run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from utils.config_files import REPO_ROOT, read_yaml, resolve_config_path
from utils.data.synthetic_shapes import ensure_shapes_dataset
from utils.errors import UserError
from utils.log import LOGGER

GENERATORS: dict[str, Callable[[Path], bool]] = {"shapes": ensure_shapes_dataset}


@dataclass(frozen=True)
class DatasetConfig:
    source: Path  # the YAML file
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    test: tuple[Path, ...]
    names: tuple[str, ...]

    @property
    def nc(self) -> int:
        return len(self.names)

    def num_classes(self, single_cls: bool) -> int:
        """The classes a model trains or is evaluated on: 1 with --single-cls."""
        return 1 if single_cls else self.nc


def load_dataset_config(name_or_path: str | Path, prepare: bool = True) -> DatasetConfig:
    """Read and check a dataset YAML. With `prepare`, generate a built-in dataset if it is absent,
    and fail with the download recipe if the images of train/val are missing."""
    path = resolve_config_path(name_or_path, "data")
    raw = read_yaml(path, "dataset YAML")
    if not isinstance(raw, dict):
        raise UserError(f"dataset YAML {path}: expected a mapping with train, val and names")
    missing = [k for k in ("train", "val", "names") if k not in raw]
    if missing:
        raise UserError(f"dataset YAML {path}: missing key(s) {', '.join(missing)}")

    names = _parse_names(raw["names"], path)
    if "nc" in raw and raw["nc"] != len(names):
        raise UserError(f"dataset YAML {path}: nc is {raw['nc']} but names lists {len(names)} classes")
    root = Path(raw.get("path") or ".")
    if not root.is_absolute():
        root = (REPO_ROOT / root).resolve()
    config = DatasetConfig(
        source=path,
        root=root,
        train=_split_paths(raw, "train", root, path),
        val=_split_paths(raw, "val", root, path),
        test=_split_paths(raw, "test", root, path) if raw.get("test") else (),
        names=names,
    )
    if prepare:
        _prepare(config, raw, path)
    return config


def _parse_names(names: object, path: Path) -> tuple[str, ...]:
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise UserError(f"dataset YAML {path}: names keys must be the class ids 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int, float)) for n in names):
        raise UserError(f"dataset YAML {path}: names must be a non-empty list or dict of class names")
    return tuple(str(n) for n in names)


def _split_paths(raw: dict, split: str, root: Path, path: Path) -> tuple[Path, ...]:
    entries = raw[split] if isinstance(raw[split], list) else [raw[split]]
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise UserError(f"dataset YAML {path}: {split} must be a path or a list of paths, got {raw[split]!r}")
    return tuple(Path(e) if Path(e).is_absolute() else root / e for e in entries)


def _prepare(config: DatasetConfig, raw: dict, path: Path) -> None:
    generator = raw.get("generate")
    if generator is not None:
        if generator not in GENERATORS:
            raise UserError(f"dataset YAML {path}: unknown generator {generator!r} (known: {', '.join(GENERATORS)})")
        try:
            generated = GENERATORS[generator](config.root)
        except FileExistsError as error:  # a folder of the user's is in the way: never overwrite it
            raise UserError(f"dataset YAML {path}: {error}") from None
        if generated:
            LOGGER.info(f"Generated the {generator} dataset in {config.root}")
    absent = [p for p in config.train + config.val if not p.exists()]
    if absent:
        recipe = raw.get("download")
        how = (
            f"Download it first (this is never done automatically): {recipe}"
            if isinstance(recipe, str)
            else "Put the images and labels there, or fix the paths in the YAML."
        )
        raise UserError(
            f"dataset {path.name}: not found at {config.root} (missing: {', '.join(str(p) for p in absent)}). {how}"
        )
