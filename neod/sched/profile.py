"""The measured cost tables of one host and setup, and their JSON store.

A profile is only valid for what it was measured with, so it carries a `ProfileKey` of everything
the timings depend on (model shape, dtype, tensor parallelism, GPU, CPU, CPU pool threads, kernel
version, block size). `load_profile` returns None unless the stored key equals the one asked for: a
profile from another model or host is never reused. Tables are validated and rebuilt by their
constructors on load, so nothing derived from one file can index into another.

Interpolation is piecewise linear (bilinear over rows for the 2-D tables); below the first grid
point the first value holds (fixed costs dominate small work), beyond the last the last segment's
slope continues (never negative); no work costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROFILE_FORMAT = 1
# How the cost model applies the hand-off (neod.sched.cost) and the paced CPU program: those timed
# under another form are timed again at the next start (3: the hand-off over the paced CPU costs).
HANDOFF_FORM = 3


@dataclass(frozen=True)
class Table1D:
    xs: tuple[float, ...]  # strictly increasing, > 0
    ys: tuple[float, ...]  # seconds, finite, >= 0

    def __post_init__(self) -> None:
        xs, ys = tuple(float(x) for x in self.xs), tuple(float(y) for y in self.ys)
        if not xs or len(xs) != len(ys):
            raise ValueError(
                f"a table needs as many values as grid points, at least one ({len(xs)}, {len(ys)})"
            )
        if any(not math.isfinite(v) for v in (*xs, *ys)) or xs[0] <= 0 or min(ys) < 0:
            raise ValueError("grid points must be finite and > 0, values finite and >= 0")
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
            raise ValueError("grid points must be strictly increasing")
        object.__setattr__(self, "xs", xs)
        object.__setattr__(self, "ys", ys)

    @classmethod
    def from_points(cls, points: Mapping[float, float]) -> Table1D:
        xs = sorted(points)
        return cls(tuple(xs), tuple(points[x] for x in xs))

    def __call__(self, x: float) -> float:
        if x <= 0:
            return 0.0
        xs, ys = self.xs, self.ys
        i = bisect_right(xs, x)
        if i == 0 or len(xs) == 1:
            return ys[0]
        if i == len(xs):
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            return ys[-1] + slope * (x - xs[-1])
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)

    def to_json(self) -> dict[str, list[float]]:
        return {"x": list(self.xs), "y": list(self.ys)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Table1D:
        return cls(tuple(data["x"]), tuple(data["y"]))


@dataclass(frozen=True)
class Table2D:
    """f(a, b) from rows: for each grid value of a (strictly increasing), a Table1D over b. Rows may
    be ragged (each has its own b grid), as measurable points are: b context tokens cannot be fewer
    than a sequences."""

    xs: tuple[float, ...]
    rows: tuple[Table1D, ...]

    def __post_init__(self) -> None:
        xs = tuple(float(x) for x in self.xs)
        if not xs or len(xs) != len(self.rows):
            raise ValueError("a 2-D table needs one row per grid point, at least one")
        if (
            xs[0] <= 0
            or any(b <= a for a, b in zip(xs, xs[1:], strict=False))
            or not all(map(math.isfinite, xs))
        ):
            raise ValueError("row grid points must be finite, > 0 and strictly increasing")
        object.__setattr__(self, "xs", xs)
        object.__setattr__(self, "rows", tuple(self.rows))

    @classmethod
    def from_points(cls, points: Mapping[tuple[float, float], float]) -> Table2D:
        grouped: dict[float, dict[float, float]] = {}
        for (a, b), y in points.items():
            grouped.setdefault(a, {})[b] = y
        xs = sorted(grouped)
        return cls(tuple(xs), tuple(Table1D.from_points(grouped[a]) for a in xs))

    def __call__(self, a: float, b: float) -> float:
        if a <= 0 or b <= 0:
            return 0.0
        xs, rows = self.xs, self.rows
        i = bisect_right(xs, a)
        if i == 0 or len(xs) == 1:
            return rows[0](b)
        if i == len(xs):
            hi, lo = rows[-1](b), rows[-2](b)
            return hi + max(0.0, (hi - lo) / (xs[-1] - xs[-2])) * (a - xs[-1])
        lo, hi = rows[i - 1](b), rows[i](b)
        return lo + (hi - lo) * (a - xs[i - 1]) / (xs[i] - xs[i - 1])

    def to_json(self) -> dict[str, Any]:
        return {"x": list(self.xs), "rows": [r.to_json() for r in self.rows]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Table2D:
        return cls(tuple(data["x"]), tuple(Table1D.from_json(r) for r in data["rows"]))


@dataclass(frozen=True)
class ProfileKey:
    model: tuple[tuple[str, Any], ...]  # the model's shape, (name, value) sorted by name
    dtype: str
    tp: int
    gpu: str
    cpu: str
    pool_threads: int
    kernel_version: str
    block_size: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = dict(self.model)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProfileKey:
        return profile_key(**data)

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def short_id(self) -> str:
        """What names the profile's file, and what operators see of it."""
        return self.fingerprint()[:16]


def profile_key(
    model: Mapping[str, Any],
    dtype: str,
    tp: int,
    gpu: str,
    cpu: str,
    pool_threads: int,
    kernel_version: str,
    block_size: int,
) -> ProfileKey:
    """The key from plain values; model is the shape (layers, hidden size, heads, ...)."""
    shape = tuple(sorted((str(k), v) for k, v in model.items()))
    return ProfileKey(
        shape,
        str(dtype),
        int(tp),
        str(gpu),
        str(cpu),
        int(pool_threads),
        str(kernel_version),
        int(block_size),
    )


@dataclass(frozen=True)
class Profile:
    key: ProfileKey
    linear: Table1D  # per layer, vs tokens through the projections
    prefill_attn: Table1D  # per layer, vs the length of one prompt
    gpu_decode_attn: Table2D  # per layer, vs (sequences, context tokens)
    transfer: Table1D  # per layer, vs CPU-decoded rows: QKV to the host plus output back
    swap: Table1D  # per layer, vs blocks copied between the pools
    iteration_overhead: Table1D  # per iteration, vs sequences
    cpu_decode_attn: Table2D | None = (
        None  # per layer, vs (sequences, context tokens); None: no host pool
    )
    cpu_tile_path: str | None = None  # the AMX products cpu_decode_attn ran with (amx_in_use)
    # Per layer of each pipelined sub-batch with CPU work: what makes a whole pipelined
    # iteration's predicted period (neod.sched.cost) the measured one; None until timed, which
    # needs the engine's captured graphs.
    pipeline_handoff: float | None = None
    # (scale, fixed seconds): one CPU run (a sub-batch through a layer) as the engine's pipelined
    # iteration paces it, over cpu_decode_attn's back-to-back time; timed with the hand-off.
    cpu_paced: tuple[float, float] | None = None
    meta: Mapping[str, Any] = field(
        default_factory=dict
    )  # for operators: when, how long, which tool

    def to_json(self) -> dict[str, Any]:
        tables = {name: getattr(self, name).to_json() for name in _TABLES_1D + ("gpu_decode_attn",)}
        tables["cpu_decode_attn"] = (
            None if self.cpu_decode_attn is None else self.cpu_decode_attn.to_json()
        )
        return {
            "format": PROFILE_FORMAT,
            "fingerprint": self.key.fingerprint(),
            "key": self.key.to_json(),
            "tables": tables,
            "cpu_tile_path": self.cpu_tile_path,
            "pipeline_handoff": self.pipeline_handoff,
            "cpu_paced": None if self.cpu_paced is None else list(self.cpu_paced),
            "pipeline_handoff_form": HANDOFF_FORM,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        tables = data["tables"]
        cpu = tables.get("cpu_decode_attn")
        handoff, paced = data.get("pipeline_handoff"), data.get("cpu_paced")
        if data.get("pipeline_handoff_form") != HANDOFF_FORM:
            handoff = paced = None
        if paced is not None:
            paced = tuple(map(float, paced))
            if len(paced) != 2:
                raise ValueError(f"cpu_paced must be [scale, fixed seconds], got {paced}")
        return cls(
            key=ProfileKey.from_json(data["key"]),
            gpu_decode_attn=Table2D.from_json(tables["gpu_decode_attn"]),
            cpu_decode_attn=None if cpu is None else Table2D.from_json(cpu),
            cpu_tile_path=data.get("cpu_tile_path"),
            pipeline_handoff=None if handoff is None else float(handoff),
            cpu_paced=paced,
            meta=dict(data.get("meta", {})),
            **{name: Table1D.from_json(tables[name]) for name in _TABLES_1D},
        )


_TABLES_1D = ("linear", "prefill_attn", "transfer", "swap", "iteration_overhead")


def describe_cpu_paced(paced: tuple[float, float] | None) -> str:
    """A profile's `cpu_paced` for operators, as the engine's log, `neoctl profile` and the
    benchmarks print it."""
    if paced is None:
        return "the CPU program as pipelined iterations pace it: not timed yet"
    return (f"the CPU program as pipelined iterations pace it runs {paced[0]:.2f}x its table + "
            f"{paced[1] * 1e6:.0f} us per sub-batch layer")


def profile_path(directory: str | os.PathLike[str], key: ProfileKey) -> Path:
    """One file per setup, so profiles of several models or thread counts live side by side."""
    return Path(directory) / f"profile-{key.short_id()}.json"


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> None:
    write_json_atomic(profile.to_json(), path)


def write_json_atomic(data: Any, path: str | os.PathLike[str]) -> None:
    """A reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def read_json(path: str | os.PathLike[str], what: str, otherwise: str) -> Any:
    """The parsed file; None if there is none, or (logged: `what` at `path` is unreadable;
    `otherwise`) if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("%s %s unreadable (%s); %s", what, path, exc, otherwise)
        return None


def load_profile(path: str | os.PathLike[str], key: ProfileKey) -> Profile | None:
    """The stored profile if measured for exactly `key`; None if absent, stale or unreadable."""
    data = read_json(path, "profile", "it will be measured again")
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        logger.info("profile %s has another format; it will be measured again", path)
        return None
    stored = data.get("key")
    if (
        not isinstance(stored, dict)
        or stored != key.to_json()
        or data.get("fingerprint") != key.fingerprint()
    ):
        differ = sorted(
            k
            for k, v in key.to_json().items()
            if not isinstance(stored, dict) or stored.get(k) != v
        )
        logger.info(
            "profile %s was measured for another setup (differs in %s); not reused",
            path,
            ", ".join(differ) or "fingerprint",
        )
        return None
    try:
        return Profile.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("profile %s is malformed (%s); it will be measured again", path, exc)
        return None
