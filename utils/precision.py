"""Which autocast a run computes in (--amp auto, bf16, fp16, off), chosen by measurement on the CPU.

On CUDA `auto` is fp16 autocast with a GradScaler. On a CPU no flag says whether bfloat16 is
faster: bf16 autocast was 24-32% faster than fp32 on one AMD EPYC with AVX512-BF16 and 26% slower
on an Intel Xeon with it. So `auto` times a few steps of the actual model at the actual batch and
image size in both, and keeps bf16 only where it is clearly faster. A CPU without bfloat16
kernels (oneDNN has them with AVX-512 or AMX on x86, BF16 on Arm) is not timed: there bf16
autocast falls back to reference code, about 10x slower than fp32 on a 2-core AVX2 EPYC.

Verdicts are cached in the user's cache folder (EMA_YOLO_CACHE_DIR, else $XDG_CACHE_HOME/ema-yolo,
else ~/.cache/ema-yolo), keyed by the CPU (model name and flags), the threads, torch's version,
what was timed (training step or forward pass), the model YAML, batch and image size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from utils.atomic_write import atomic_write
from utils.cache_dir import cache_dir
from utils.device import autocast, parameter_dtype
from utils.errors import UserError
from utils.log import LOGGER

AMP_CHOICES = ("auto", "bf16", "fp16", "off")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
NAMES = {None: "fp32", torch.bfloat16: "bf16"}  # the timings' keys
BF16_MARGIN = 0.05  # bf16 is kept only when at least this much faster: fp32 is the more exact
TIMED_ROUNDS = 3  # timed steps per precision, alternated, after one untimed step each
CACHE_FILE = "precision.json"
AUTO_FOR_INFERENCE = "fp16 on CUDA; on a CPU, bf16 where a few timed forward passes say it is faster than fp32"

Step = Callable[[torch.dtype | None], None]  # one step (training step or forward pass) in an autocast dtype


@dataclass(frozen=True)
class Precision:
    """The autocast chosen ('bf16', 'fp16' or 'off': none), for which device type, why, and the
    milliseconds per step behind a measured choice ({'fp32': ..., 'bf16': ...}; empty if not timed)."""

    amp: str
    device_type: str
    reason: str
    ms: dict[str, float] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.amp]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> Precision:
        return cls(state["amp"], state["device_type"], state["reason"], dict(state.get("ms") or {}))


@dataclass(frozen=True)
class Timing:
    """What `auto` times on a CPU: `what` for the log, `kind` and `fields` for the cache key
    (model YAML, batch, image size), and `make_step`, which builds the step only when timing."""

    what: str
    kind: str  # 'training' or 'inference'
    model_yaml: dict
    batch: int
    img_size: int
    make_step: Callable[[], Step]

    def key(self) -> dict:
        return {
            **machine_fingerprint(),
            "kind": self.kind,
            "model": _model_digest(self.model_yaml),
            "batch": self.batch,
            "imgsz": self.img_size,
        }


def choose_precision(requested: str, device: torch.device, timing: Timing, weights_dtype=torch.float32) -> Precision:
    """The precision `requested` ('auto', 'bf16', 'fp16' or 'off') gives on `device`: `auto` is
    fp16 on CUDA, and on a CPU the faster of fp32 and bf16 autocast as `timing` measures them
    (or as a verdict cached for the same CPU, torch, model, batch and size says)."""
    kind = device.type
    if requested not in AMP_CHOICES:
        raise UserError(f"--amp {requested!r}: choose one of {', '.join(AMP_CHOICES)}")
    if weights_dtype == torch.float64:
        if requested in ("bf16", "fp16"):
            raise UserError(f"--amp {requested} and --float64 contradict: float64 weights run without autocast")
        return Precision("off", kind, "float64 weights run without autocast")
    if requested == "off":
        return Precision("off", kind, "--amp off")
    if requested in ("bf16", "fp16"):
        problem = unusable(requested, device)
        if problem:
            raise UserError(f"--amp {requested}: {problem}")
        return Precision(requested, kind, f"--amp {requested}")
    if kind == "cuda":
        return Precision("fp16", kind, "CUDA's default (fp16 autocast with a GradScaler)")
    if kind != "cpu":
        return Precision("off", kind, f"no autocast is chosen on {kind}")
    if not cpu_has_bf16_kernels():
        return Precision(
            "off",
            kind,
            "this CPU has no bfloat16 kernels, which oneDNN has with AVX-512 or AMX: bf16 autocast would "
            "run many times slower, so it was not timed",
        )
    key = timing.key()
    cache = VerdictCache(cache_dir() / CACHE_FILE)
    cached = cache.get(key)
    if cached is not None:
        amp, ms = cached
        return Precision(amp, kind, f"{_compare(timing.what, ms)}, measured earlier on this CPU ({cache.path})", ms)
    ms = time_steps(timing.make_step(), (None, torch.bfloat16))
    amp = "bf16" if ms["bf16"] < (1 - BF16_MARGIN) * ms["fp32"] else "off"
    saved = cache.put(key, amp, ms)
    where = f"; saved in {cache.path}" if saved else ""
    return Precision(amp, kind, f"{_compare(timing.what, ms)}, measured now{where}", ms)


def inference_precision(
    trained: str | None,
    model: torch.nn.Module,
    device: torch.device,
    *,
    batch: int,
    img_size: int,
    requested: str | None = None,
) -> Precision:
    """The precision to evaluate or predict with: `requested` (val.py's and detect.py's --amp)
    where given; else as the run trained (`trained`: its --amp as recorded, None where it recorded
    none) where that runs on `device`, so that val.py reproduces train.py's numbers; else `auto`
    here, timing forward passes of `batch` images at `img_size` px on a CPU."""
    weights_dtype = parameter_dtype(model)
    if requested is None:
        if trained == "off" or weights_dtype == torch.float64:
            return Precision("off", device.type, "as the run trained")
        if trained in ("bf16", "fp16") and unusable(trained, device) is None:
            return Precision(trained, device.type, "as the run trained")
        requested = "auto"
    timing = Timing(
        f"a forward pass of {batch} images at {img_size} px",
        "inference",
        model.yaml,
        batch,
        img_size,
        lambda: forward_step(model, batch, img_size, device),
    )
    return choose_precision(requested, device, timing, weights_dtype)


def unusable(amp: str, device: torch.device) -> str | None:
    """Why autocast `amp` cannot run on `device`, or None where it can."""
    if amp == "fp16" and device.type != "cuda":
        return "fp16 autocast runs on CUDA only; on a CPU use --amp bf16, off or auto"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp fp16 or auto"
    return None


def describe(precision: Precision, weights_dtype: torch.dtype = torch.float32) -> str:
    """How a run computes, for its log: the autocast, or the weights' own precision."""
    if weights_dtype == torch.float64:
        return "float64"
    return {"off": "fp32", "fp16": "fp16 autocast + GradScaler", "bf16": "bfloat16 autocast"}[precision.amp]


def log_choice(precision: Precision, weights_dtype: torch.dtype = torch.float32) -> None:
    LOGGER.info(f"Precision: {describe(precision, weights_dtype)} ({precision.reason})")


def add_amp_arguments(parser: argparse.ArgumentParser, *, default: str | None, auto: str, half: bool = False) -> None:
    """--amp and its aliases --no-amp (--amp off) and, with `half` (val.py, detect.py), YOLOv5's
    --half (--amp fp16). `auto`: what --amp auto does; `default`: None means as the run trained."""
    as_trained = "as the run trained, where this device runs it (else auto)"
    parser.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default=default,
        help=f"autocast: auto ({auto}), bf16, fp16 (CUDA) or off (fp32); default: {default or as_trained}",
    )
    parser.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="fp32: --amp off")
    if half:
        parser.add_argument("--half", dest="amp", action="store_const", const="fp16", help="fp16 on CUDA: --amp fp16")


# Timing


def time_steps(step: Step, dtypes: tuple[torch.dtype | None, ...], rounds: int = TIMED_ROUNDS) -> dict[str, float]:
    """Median milliseconds of `rounds` calls of step(dtype) for each dtype, after one untimed call
    each (kernels chosen, caches warm); alternated, so that a drift in the machine's speed falls
    on all of them alike."""
    for dtype in dtypes:
        step(dtype)
    times: dict[str, list[float]] = {NAMES[dtype]: [] for dtype in dtypes}
    for _ in range(rounds):
        for dtype in dtypes:
            start = time.perf_counter()
            step(dtype)
            times[NAMES[dtype]].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(values), 1) for name, values in times.items()}


def forward_step(model: torch.nn.Module, batch: int, img_size: int, device: torch.device) -> Step:
    """An inference forward pass of `model` on a synthetic batch (the RNGs untouched)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, img_size, img_size, generator=generator).to(device, memory_format=torch.channels_last)

    def step(dtype: torch.dtype | None) -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(images)

    return step


def _compare(what: str, ms: dict[str, float]) -> str:
    return f"{what} took {ms['bf16']:.0f} ms in bf16 autocast, {ms['fp32']:.0f} ms in fp32"


# The machine and the cache


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (unknown: True, so it is timed)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def machine_fingerprint() -> dict:
    """The CPU (model name and a digest of its flags: one name covers CPUs with and without
    AVX512-BF16), the threads torch uses and torch's version."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            label, _, value = line.partition(":")
            fields.setdefault(label.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    return {
        "cpu": name,
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }


def _model_digest(model_yaml: dict) -> str:
    """The model YAML's digest, its anchors by count only (AutoAnchor refits their sizes)."""
    described = dict(model_yaml)
    anchors = described.get("anchors")
    if isinstance(anchors, list):
        described["anchors"] = [len(level) // 2 for level in anchors]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:12]


class VerdictCache:
    """Precision verdicts by key in a small JSON file. An unreadable file is ignored (and replaced
    at the next verdict); one that cannot be written leaves the choice to be timed again next time."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict:
        try:
            verdicts = json.loads(self.path.read_text())["verdicts"]
            if not isinstance(verdicts, dict):
                raise TypeError("verdicts is not a mapping")
            return verdicts
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            LOGGER.warning(f"WARNING: ignoring the unreadable precision cache {self.path} ({error}); timing again")
            return {}

    def get(self, key: dict) -> tuple[str, dict[str, float]] | None:
        entry = self._read().get(_digest(key))
        try:
            if entry["key"] == key and entry["amp"] in ("bf16", "off"):
                return entry["amp"], {k: float(v) for k, v in entry["ms"].items()}
        except (TypeError, KeyError, ValueError, AttributeError):
            pass
        return None

    def put(self, key: dict, amp: str, ms: dict[str, float]) -> bool:
        """Record a verdict; False (and a warning) where the file cannot be written."""
        verdicts = self._read()
        verdicts[_digest(key)] = {
            "key": key,
            "amp": amp,
            "ms": ms,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"verdicts": verdicts}, indent=1, sort_keys=True).encode())
            return True
        except OSError as error:
            LOGGER.warning(f"WARNING: cannot save the precision verdict in {self.path} ({error}): timed again next run")
            return False


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
