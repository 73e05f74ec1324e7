"""Model YAML (YOLOv5 v6+/v7 format) -> list of layers, through an explicit table of blocks.

The YAML is parsed, never eval-ed: a block name is looked up in BLOCKS and the only symbolic
arguments are `nc` and `anchors`.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from models.blocks import C3, SPPF, Bottleneck, Concat, Conv
from models.head import Detect
from utils.config_files import read_yaml
from utils.errors import UserError

BLOCKS: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "Bottleneck": Bottleneck,
    "C3": C3,
    "SPPF": SPPF,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,
}
# Blocks whose first argument is the output channel count, scaled by width_multiple.
CHANNEL_BLOCKS = (Conv, Bottleneck, C3, SPPF)
# Blocks that take the repeat count as their third argument instead of being repeated.
REPEAT_INSIDE_BLOCKS = (C3,)
SUPPORTED_ACTIVATIONS = (None, "nn.SiLU()")


def round_up_to_multiple(x: float, divisor: int) -> int:
    return int(math.ceil(x / divisor) * divisor)


def read_model_yaml(path: Path) -> dict:
    """Read and validate a model YAML file; every problem is a UserError naming the file."""
    cfg = read_yaml(path, "model YAML")
    validate_model_config(cfg, source=str(path))
    return cfg


def validate_model_config(cfg: object, source: str) -> None:
    """Check the structure of a model config dict; raise UserError naming `source` and the problem."""

    def fail(problem: str) -> None:
        raise UserError(f"model config {source}: {problem}")

    if not isinstance(cfg, dict):
        fail("expected a mapping with nc, depth_multiple, width_multiple, anchors, backbone, head")
    missing = [k for k in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head") if k not in cfg]
    if missing:
        fail(f"missing key(s) {', '.join(missing)}")
    if not isinstance(cfg["nc"], int) or isinstance(cfg["nc"], bool) or cfg["nc"] < 1:
        fail(f"nc must be a positive integer, got {cfg['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            fail(f"{key} must be a positive number, got {cfg[key]!r}")
    if cfg.get("activation") not in SUPPORTED_ACTIVATIONS:
        fail(f"activation {cfg['activation']!r} is not supported (blocks use nn.SiLU())")
    anchors = cfg["anchors"]
    if isinstance(anchors, int):
        fail(
            "anchors given as a count need automatic anchor fitting, which is not supported: "
            "list the anchor sizes per level, e.g. [[10,13, 16,30, 33,23], ...]"
        )
    if (
        not isinstance(anchors, list)
        or not anchors
        or not all(isinstance(level, list) and level and len(level) % 2 == 0 for level in anchors)
        or len({len(level) for level in anchors}) != 1
        or not all(isinstance(v, (int, float)) and v > 0 for level in anchors for v in level)
    ):
        fail("anchors must be a list of levels, each an equal-length list of positive w,h pairs")
    layers = (
        cfg["backbone"] + cfg["head"] if isinstance(cfg["backbone"], list) and isinstance(cfg["head"], list) else None
    )
    if not layers:
        fail("backbone and head must be non-empty lists of [from, number, module, args]")
    for i, layer in enumerate(layers):
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
                f"layer {i}: {module} takes {'a list of inputs' if takes_list else 'one input'} in 'from', "
                f"got {sources!r}"
            )
        if issubclass(block, CHANNEL_BLOCKS) and not (args and isinstance(args[0], int) and args[0] > 0):
            fail(f"layer {i}: {module} args must start with the output channel count, got {args!r}")
        if block is Detect and i != len(layers) - 1:
            fail(f"layer {i}: Detect must be the last layer")
    if layers[-1][2] != "Detect":
        fail("the last layer must be Detect")
    detect_sources = layers[-1][0] if isinstance(layers[-1][0], list) else [layers[-1][0]]
    if len(detect_sources) != len(anchors):
        fail(f"Detect takes {len(detect_sources)} inputs but anchors has {len(anchors)} levels")


def build_layers(cfg: dict, in_channels: int = 3) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a validated config.

    Returns the layers as nn.Sequential (each with `.i` its index, `.f` its input index or
    indices, `.type` its block name) and the sorted indices whose outputs later layers reuse.
    """
    nc, anchors = cfg["nc"], cfg["anchors"]
    depth, width = cfg["depth_multiple"], cfg["width_multiple"]
    num_outputs = len(anchors[0]) // 2 * (nc + 5)
    channels = [in_channels]  # output channels per layer; channels[-1] is the latest
    layers, saved = [], set()
    for i, (sources, number, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        block = BLOCKS[name]
        # The only names an argument may hold; YAML reads YOLOv5's `None` as a string.
        symbols = {"nc": nc, "anchors": anchors, "None": None}
        args = [symbols.get(a, a) if isinstance(a, str) else a for a in args]
        number = max(round(number * depth), 1) if number > 1 else number
        if issubclass(block, CHANNEL_BLOCKS):
            c_in, c_out = channels[sources], args[0]
            if c_out != num_outputs:
                c_out = round_up_to_multiple(c_out * width, 8)
            args = [c_in, c_out, *args[1:]]
            if issubclass(block, REPEAT_INSIDE_BLOCKS):
                args.insert(2, number)
                number = 1
        elif block is Concat:
            c_out = sum(channels[s] for s in sources)
        elif block is Detect:
            args.append([channels[s] for s in sources])
            c_out = 0
        else:
            c_out = channels[sources]
        try:
            layer = nn.Sequential(*(block(*args) for _ in range(number))) if number > 1 else block(*args)
        except (TypeError, ValueError) as error:
            raise UserError(f"model config: layer {i} ({name} {args}): {error}") from None
        layer.i, layer.f, layer.type = i, sources, name
        saved.update(s % i for s in ([sources] if isinstance(sources, int) else sources) if s != -1)
        layers.append(layer)
        if i == 0:
            channels = []
        channels.append(c_out)
    return nn.Sequential(*layers), sorted(saved)
