"""Model YAML -> list of layers, through an explicit table of blocks.

Two formats are read, told apart by their keys:
- YOLOv5's (v6+/v7): `depth_multiple`, `width_multiple` and `anchors`; builds the anchor-based Detect.
- Ultralytics' (YOLOv5u, YOLOv8, YOLO11): no anchors, and usually `scales` of
  [depth, width, max_channels] per scale letter; builds the anchor-free Detect. The scale comes
  from the file name as in Ultralytics (`yolo11n.yaml` reads `yolo11.yaml` at scale n) and is
  recorded in the config as `scale`.

The YAML is parsed, never eval-ed: a block name is looked up in BLOCKS and the only symbolic
arguments are `nc` and `anchors`. `anchors: N` (a count, as in YOLOv5) builds N placeholder
anchors per level, which training fits to the data (AutoAnchor) and records in the config as a list.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import nn

from models.anchor_free_head import AnchorFreeDetect
from models.attention import C2PSA
from models.blocks import C3, SPPF, Bottleneck, C2f, C3k, C3k2, Concat, Conv, DWConv
from models.head import Detect
from utils.config_files import REPO_ROOT, read_yaml, resolve_config_path
from utils.errors import UserError
from utils.log import LOGGER

BLOCKS: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "DWConv": DWConv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "C3k": C3k,
    "C2f": C2f,
    "C3k2": C3k2,
    "C2PSA": C2PSA,
    "SPPF": SPPF,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,  # AnchorFreeDetect in Ultralytics' format
}
# Blocks whose first argument is the output channel count, scaled by the width multiple.
CHANNEL_BLOCKS = (Conv, Bottleneck, C3, C2f, C2PSA, SPPF)
# Blocks that take the repeat count as their third argument instead of being repeated.
REPEAT_INSIDE_BLOCKS = (C3, C2f, C2PSA)
SUPPORTED_ACTIVATIONS = (None, "nn.SiLU()")
# Scales at which Ultralytics builds C3k2's inner blocks as C3k whatever the YAML says.
C3K_SCALES = ("m", "l", "x")
# "yolo11n" -> ("yolo11", "n", ""), "yolov5nu" -> ("yolov5", "n", "u"), "yolov8s-p2" -> ("yolov8", "s", "-p2")
SCALED_NAME = re.compile(r"(.*?\d+)([nslmx])(.*)")


def round_up_to_multiple(x: float, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def is_anchor_free(cfg: dict) -> bool:
    """Ultralytics' format (anchor-free head) when the config lists no anchors."""
    return "anchors" not in cfg


def read_model_yaml(name_or_path: str | Path) -> dict:
    """Read and validate a model YAML (a path, or a shipped name such as 'yolov5s.yaml' or
    'yolo11n.yaml'); every problem is a UserError naming the file."""
    path = resolve_config_path(name_or_path, "models")
    scale = None
    if not path.exists() and (match := SCALED_NAME.fullmatch(path.stem)):
        unscaled = resolve_config_path(path.with_name(match[1] + match[3] + path.suffix), "models")
        if unscaled.exists():
            path, scale = unscaled, match[2]
    if not path.exists():
        raise UserError(
            f"no model YAML {name_or_path}: give a path, or one of the shipped models: {', '.join(shipped_models())}"
        )
    cfg = read_yaml(path, "model YAML")
    if isinstance(cfg, dict) and isinstance(cfg.get("scales"), dict):
        cfg["scale"] = _choose_scale(cfg, scale, path)
    validate_model_config(cfg, source=str(path))
    return cfg


def shipped_models() -> list[str]:
    """The names models/ answers to: yolov5s.yaml, and for a YAML with scales its name at each scale
    (yolov8.yaml -> yolov8{n,s,m,l,x}.yaml; yolov5u.yaml -> yolov5{n,s,m,l,x}u.yaml)."""
    names = []
    for path in sorted((REPO_ROOT / "models").glob("*.yaml")):
        cfg = read_yaml(path, "model YAML")
        scales = cfg.get("scales") if isinstance(cfg, dict) else None
        if isinstance(scales, dict) and (match := re.fullmatch(r"(.*?\d+)(.*)", path.stem)):
            names.append(f"{match[1]}{{{','.join(map(str, scales))}}}{match[2]}.yaml")
        else:
            names.append(path.name)
    return names


def _choose_scale(cfg: dict, scale: str | None, path: Path) -> object:
    """The scale named by the file name, else the one the YAML records, else (as Ultralytics) the first."""
    if scale is None:
        scale = cfg.get("scale")
    if scale is None and (match := SCALED_NAME.fullmatch(path.stem)) and match[2] in cfg["scales"]:
        scale = match[2]
    if scale is None and cfg["scales"]:
        scale = next(iter(cfg["scales"]))
        LOGGER.warning(f"{path} names no scale: using scale {scale!r} (name the file e.g. {path.stem}{scale}.yaml)")
    return scale


def model_multiples(cfg: dict) -> tuple[float, float, float]:
    """(depth multiple, width multiple, maximum channels) of a validated config."""
    if is_anchor_free(cfg) and "scales" in cfg:
        depth, width, max_channels = cfg["scales"][cfg["scale"]]
        return depth, width, max_channels
    return cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0), math.inf


def _is_positive_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def validate_model_config(cfg: object, source: str) -> None:
    """Check the structure of a model config dict; raise UserError naming `source` and the problem."""

    def fail(problem: str) -> None:
        raise UserError(f"model config {source}: {problem}")

    if not isinstance(cfg, dict):
        fail("expected a mapping with nc, backbone, head and either anchors or scales")
    anchor_free = is_anchor_free(cfg)
    required = ("nc",) if anchor_free else ("nc", "depth_multiple", "width_multiple", "anchors")
    missing = [k for k in (*required, "backbone", "head") if k not in cfg]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    if not anchor_free and "scales" in cfg:
        fail("has both anchors (YOLOv5's format) and scales (Ultralytics'): keep the keys of one format")
    unsupported = [k for k in ("kpt_shape", "end2end") if cfg.get(k)] + (
        ["reg_max"] if cfg.get("reg_max", 16) != 16 else []
    )
    if unsupported:
        fail(f"{', '.join(unsupported)}: only detection models with the reg_max 16 Detect head are supported")
    if not isinstance(cfg["nc"], int) or isinstance(cfg["nc"], bool) or cfg["nc"] < 1:
        fail(f"nc must be a positive integer, got {cfg['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if key in cfg and not _is_positive_number(cfg[key]):
            fail(f"{key} must be a positive number, got {cfg[key]!r}")
    if cfg.get("activation") not in SUPPORTED_ACTIVATIONS:
        fail(f"activation {cfg['activation']!r} is not supported (blocks use nn.SiLU())")
    if anchor_free:
        _validate_scales(cfg, fail)
    else:
        _validate_anchors(cfg["anchors"], fail)
    layers = (
        cfg["backbone"] + cfg["head"] if isinstance(cfg["backbone"], list) and isinstance(cfg["head"], list) else None
    )
    if not layers:
        fail("backbone and head must be non-empty lists of [from, number, module, args]")
    for i, layer in enumerate(layers):
        _validate_layer(i, layer, is_last=i == len(layers) - 1, fail=fail)
    if layers[-1][2] != "Detect":
        fail("the last layer must be Detect")
    detect_sources = layers[-1][0] if isinstance(layers[-1][0], list) else [layers[-1][0]]
    if anchor_free and len(layers[-1][3]) > 1:
        fail(
            f"Detect {layers[-1][3]} in a file without anchors: the anchor-free head takes [nc]; "
            "YOLOv5's anchor-based Detect [nc, anchors] needs the anchors key"
        )
    if not anchor_free and isinstance(cfg["anchors"], list) and len(detect_sources) != len(cfg["anchors"]):
        fail(f"Detect takes {len(detect_sources)} inputs but anchors has {len(cfg['anchors'])} levels")


def _validate_anchors(anchors: object, fail) -> None:
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if anchors < 1:
            fail(f"anchors given as a count (anchors per level, fitted to the data) must be at least 1, got {anchors}")
        return
    if (
        not isinstance(anchors, list)
        or not anchors
        or not all(isinstance(level, list) and level and len(level) % 2 == 0 for level in anchors)
        or len({len(level) for level in anchors}) != 1
        or not all(isinstance(v, (int, float)) and v > 0 for level in anchors for v in level)
    ):
        fail(
            "anchors must be a list of levels, each an equal-length list of positive w,h pairs, "
            "or a count of anchors per level to fit to the data"
        )


def _anchors_per_level(cfg: dict) -> int:
    """The anchors per level of a validated YOLOv5-format config: its `anchors: N`, or the pairs of a level."""
    anchors = cfg["anchors"]
    return anchors if isinstance(anchors, int) else len(anchors[0]) // 2


def _placeholder_anchors(levels: int, per_level: int) -> list[list[float]]:
    """Anchors for `anchors: N` until they are fitted to the data: squares of 1 to N times 8 * 2**level
    pixels (level i is stride 8 * 2**i in YOLOv5's layouts), so that larger ones go with larger strides."""
    anchors = []
    for level in range(levels):
        sides = [8.0 * 2**level * (j + 1) for j in range(per_level)]
        anchors.append([v for side in sides for v in (side, side)])  # w, h pairs
    return anchors


def _validate_scales(cfg: dict, fail) -> None:
    if "scales" not in cfg:
        return
    scales = cfg["scales"]
    if not isinstance(scales, dict) or not scales:
        fail("scales must map scale names to [depth, width, max_channels]")
    for name, values in scales.items():
        if not (isinstance(values, list) and len(values) == 3 and all(_is_positive_number(v) for v in values)):
            fail(f"scale {name!r} must be [depth, width, max_channels] of positive numbers, got {values!r}")
    if cfg.get("scale") not in scales:
        fail(f"scale {cfg.get('scale')!r} is not one of {', '.join(map(str, scales))}")


def _validate_layer(i: int, layer: object, is_last: bool, fail) -> None:
    if not isinstance(layer, list) or len(layer) != 4:
        fail(f"layer {i} must be [from, number, module, args], got {layer!r}")
    sources, number, module, args = layer
    source_list = sources if isinstance(sources, list) else [sources]
    if not source_list or not all(isinstance(s, int) and not isinstance(s, bool) for s in source_list):
        fail(f"layer {i}: 'from' must be an int or a list of ints, got {sources!r}")
    for s in source_list:
        if not (-i <= s < i) and not (i == 0 and s == -1):
            fail(f"layer {i}: 'from' index {s} does not name an earlier layer")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        fail(f"layer {i}: number must be a positive integer, got {number!r}")
    if module not in BLOCKS:
        fail(f"layer {i}: unknown block {module!r} (known: {', '.join(BLOCKS)})")
    if not isinstance(args, list):
        fail(f"layer {i}: args must be a list, got {args!r}")
    block = BLOCKS[module]
    takes_list = block in (Concat, Detect)
    if takes_list != isinstance(sources, list):
        fail(
            f"layer {i}: {module} takes {'a list of inputs' if takes_list else 'one input'} in 'from', got {sources!r}"
        )
    if issubclass(block, CHANNEL_BLOCKS) and not (args and isinstance(args[0], int) and args[0] > 0):
        fail(f"layer {i}: {module} args must start with the output channel count, got {args!r}")
    if block is Detect and not is_last:
        fail(f"layer {i}: Detect must be the last layer")


def build_layers(cfg: dict, in_channels: int = 3) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a validated config.

    Returns the layers as nn.Sequential (each with `.i` its index, `.f` its input index or
    indices, `.type` its block name) and the sorted indices whose outputs later layers reuse.
    """
    nc, anchor_free = cfg["nc"], is_anchor_free(cfg)
    depth, width, max_channels = model_multiples(cfg)
    # A channel count equal to the head's output width is not scaled (YOLOv5's and Ultralytics' rule).
    unscaled_channels = nc if anchor_free else _anchors_per_level(cfg) * (nc + 5)
    layer_specs = cfg["backbone"] + cfg["head"]
    # Ultralytics builds YOLO11's class branch (depth-wise) when the model has C3k2 blocks.
    legacy_head = not any(spec[2] == "C3k2" for spec in layer_specs)
    channels = [in_channels]  # output channels per layer; channels[-1] is the latest
    layers, saved = [], set()
    for i, (sources, number, name, args) in enumerate(layer_specs):
        block = BLOCKS[name]
        # The only names an argument may hold; YAML reads YOLOv5's `None` as a string.
        symbols = {"nc": nc, "anchors": cfg.get("anchors"), "None": None}
        args = [symbols.get(a, a) if isinstance(a, str) else a for a in args]
        number = max(round(number * depth), 1) if number > 1 else number
        if issubclass(block, CHANNEL_BLOCKS):
            c_in, c_out = channels[sources], args[0]
            if c_out != unscaled_channels:
                c_out = round_up_to_multiple(min(c_out, max_channels) * width, 8)
            args = [c_in, c_out, *args[1:]]
            if issubclass(block, REPEAT_INSIDE_BLOCKS):
                args.insert(2, number)
                number = 1
            if block is C3k2 and cfg.get("scale") in C3K_SCALES:
                args[3:4] = [True]
        elif block is Concat:
            c_out = sum(channels[s] for s in sources)
        elif block is Detect:
            c_out = 0
            level_channels = [channels[s] for s in sources]
            if anchor_free:
                block, args = AnchorFreeDetect, [args[0] if args else nc, level_channels, 16, legacy_head]
            else:
                if isinstance(args[1], int):  # `anchors: N`: placeholders, fitted to the data before training
                    args[1] = _placeholder_anchors(len(level_channels), args[1])
                args.append(level_channels)
        else:
            c_out = channels[sources]
        try:
            layer = nn.Sequential(*(block(*args) for _ in range(number))) if number > 1 else block(*args)
        except (TypeError, ValueError, ZeroDivisionError) as error:
            raise UserError(f"model config: layer {i} ({name} {args}): {error}") from None
        layer.i, layer.f, layer.type = i, sources, name
        saved.update(s % i for s in ([sources] if isinstance(sources, int) else sources) if s != -1)
        layers.append(layer)
        if i == 0:
            channels = []
        channels.append(c_out)
    return nn.Sequential(*layers), sorted(saved)
