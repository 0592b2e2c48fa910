"""neod's configuration: one frozen tree, from TOML, then the environment, then CLI overrides.

Every key is declared once below with its default, its allowed values and a one-line doc; the same
declaration validates TOML values, environment strings and CLI strings, so an error always names the
key and what it accepts. Sections validate themselves in `__post_init__`, so a tree built in code is
checked exactly like one read from a file. This module is also the one place that reads the process
environment (config variables, systemd's directory variables, XDG paths).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "NEOD_"
CONFIG_PATH_ENV = "NEOD_CONFIG"
SYSTEM_CONFIG_PATH = Path("/etc/neod/neod.toml")

PRESET_NAMES = ("tiny", "llama-3.2-1b", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b")
POLICIES = ("auto", "gpu-only", "neo")
MAX_CPU_ROUND_ROBIN = 64  # as neod.sched.split.MAX_ROUND_ROBIN (the scheduler imports no config)
_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+")
_ENDPOINT_RE = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.*-]+):\d{1,5}|ipc://.+")


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names the key and the allowed values."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # "section.name" when one key is at fault


def _key(default: Any, doc: str, *, choices: tuple | None = None, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, pattern: re.Pattern | None = None,
         allowed: str = "") -> Any:
    """Declare one key. `allowed` is the human description used when `pattern` rejects a value."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open,
            "pattern": pattern, "allowed": allowed}
    return field(default=default, metadata=meta)


def _describe(meta: Mapping[str, Any], kind: type) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    if meta["pattern"] is not None:
        return meta["allowed"]
    lo, hi = meta["lo"], meta["hi"]
    if kind is bool:
        return "true or false"
    name = {int: "an integer", float: "a number", str: "a string"}[kind]
    if lo is not None and hi is not None:
        return f"{name} in {'(' if meta['lo_open'] else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{name} {'>' if meta['lo_open'] else '>='} {lo}"
    return name


def _check(section: str, name: str, value: Any, kind: type, meta: Mapping[str, Any]) -> None:
    key = f"[{section}] {name}"
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if ok and kind is float:
        ok = math.isfinite(value)
    if ok and meta["choices"] is not None:
        ok = value in meta["choices"]
    if ok and meta["pattern"] is not None:
        ok = meta["pattern"].fullmatch(value) is not None
    if ok and meta["lo"] is not None:
        ok = value > meta["lo"] if meta["lo_open"] else value >= meta["lo"]
    if ok and meta["hi"] is not None:
        ok = value <= meta["hi"]
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {_describe(meta, kind)}",
                          key=f"{section}.{name}")


class _Section:
    """Validation shared by every section; `_name` is the TOML table name."""

    _name = ""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            _check(self._name, f.name, getattr(self, f.name), type(f.default), f.metadata)


@dataclass(frozen=True)
class ModelConfig(_Section):
    _name = "model"
    path: str = _key("", "local Hugging Face model folder; empty = random weights of `preset`")
    preset: str = _key("tiny", "named model shape used when `path` is empty", choices=PRESET_NAMES)
    dtype: str = _key("auto", "weight and KV dtype; auto = bfloat16",
                      choices=("auto", "bfloat16", "float16", "float32"))
    device: str = _key("auto", "auto = cuda if available else cpu", pattern=_DEVICE_RE,
                       allowed="auto, cpu, cuda or cuda:N")
    seed: int = _key(0, "seed of random weights and of sampling without a per-request seed", lo=0)
    max_model_len: int = _key(0, "context length; 0 = the model's max_position_embeddings", lo=0)
    tokenizer: str = _key("", "tokenizer.json path; empty = <path>/tokenizer.json, "
                              "byte-level for presets")


@dataclass(frozen=True)
class CacheConfig(_Section):
    _name = "cache"
    block_size: int = _key(16, "tokens per KV block", choices=(16, 32))
    gpu_memory_utilization: float = _key(0.9, "share of GPU memory neod may use", lo=0.0, hi=1.0,
                                         lo_open=True)
    gpu_kv_gib: float = _key(0.0, "> 0 caps the GPU KV pool (GiB)", lo=0.0)
    cpu_kv_gib: float = _key(0.0, "pinned host KV pool (GiB); 0 = auto", lo=0.0)


@dataclass(frozen=True)
class SchedulerConfig(_Section):
    _name = "scheduler"
    policy: str = _key("auto", "auto picks per iteration; gpu-only never offloads; neo always may",
                       choices=POLICIES)
    max_batch_size: int = _key(256, "most requests in one iteration", lo=1)
    max_tokens_in_batch: int = _key(8192, "most tokens (prefill + decode) in one iteration", lo=1)
    cpu_min_gain: float = _key(0.01, "least rise of an iteration's tokens/s for which a CPU decode "
                               "that does not hide under the GPU work is taken (1.0: in practice "
                               "none)", lo=0.0, hi=1.0)
    cpu_stretch: float = _key(1.0, "most CPU decodes may lengthen an iteration beyond its GPU work "
                              "(1.0: to twice it)", lo=0.0, hi=100.0)
    cpu_round_robin: int = _key(3, "most requests the CPU holds per decode it keeps up with, when "
                                "it takes prompts while the GPU prefills the queue (1: no more "
                                "than it decodes every iteration)", lo=1,
                                hi=MAX_CPU_ROUND_ROBIN)
    plan_ahead: bool = _key(True, "on a GPU, plan each iteration while the GPU computes the one "
                            "before, on the state it leaves if no request stops on a token; the "
                            "plan is used only if that is the state")


@dataclass(frozen=True)
class CpuConfig(_Section):
    _name = "cpu"
    threads: int = _key(0, "CPU attention threads; 0 = sized from the bandwidth probe", lo=0)
    reserve_cores: int = _key(1, "cores kept free for the engine thread and I/O", lo=0)
    isolate_pool: bool = _key(True, "keep this process's other threads (engine, CUDA, torch) off "
                              "the pool's cores, where they would hold up a whole layer")
    amx: bool = _key(True, "bf16 attention scores on AMX tiles where the CPU has them")
    amx_values: str = _key("auto", "the weighted sums of V on AMX too (up to 8 query heads per "
                           "KV head): on, off, or auto = whichever the profile times faster",
                           choices=("auto", "on", "off"))


@dataclass(frozen=True)
class ParallelConfig(_Section):
    _name = "parallel"
    tp_size: int = _key(1, "tensor-parallel degree: processes (GPUs) one model is split over", lo=1)


@dataclass(frozen=True)
class ServerConfig(_Section):
    _name = "server"
    intake_endpoint: str = _key("tcp://127.0.0.1:7470", "ROUTER socket producers connect to",
                                pattern=_ENDPOINT_RE, allowed="tcp://HOST:PORT or ipc://PATH")
    control_endpoint: str = _key("ipc://{runtime_dir}/control.sock", "ROUTER socket for neoctl",
                                 pattern=_ENDPOINT_RE, allowed="tcp://HOST:PORT or ipc://PATH")
    max_queued_requests: int = _key(4096, "accepted requests not yet started; more = overloaded",
                                    lo=1)
    max_inflight_per_client: int = _key(1024, "unfinished requests per producer connection", lo=1)
    max_prompt_tokens: int = _key(0, "longest prompt accepted; 0 = the engine's limit", lo=0)
    max_new_tokens: int = _key(16384, "largest max_tokens a request may ask for", lo=1)
    max_stop_strings: int = _key(16, "most stop strings per request", lo=0)
    max_message_bytes: int = _key(4 << 20, "larger inbound messages drop the connection",
                                  lo=1024)
    engine_window: int = _key(0, "requests handed to the engine before their first token; "
                                 "0 = scheduler.max_batch_size", lo=0)
    default_deadline_s: float = _key(0.0, "deadline of requests that set none; 0 = none", lo=0.0)
    grace_period_s: float = _key(30.0, "time in-flight work gets to finish on SIGTERM", lo=0.0)
    high_water_mark: int = _key(10000, "messages queued per peer and direction", lo=1)
    heartbeat_interval_s: float = _key(5.0, "ZeroMQ heartbeat on TCP; 0 = off", lo=0.0)
    heartbeat_timeout_s: float = _key(15.0, "a silent TCP peer is dropped after this", lo=0.0)
    curve_secret_key_file: str = _key("", "server CURVE secret key file; set = CURVE on TCP")
    curve_authorized_keys_dir: str = _key("", "client public key files allowed; empty = any client "
                                              "that knows the server key")
    log_level: str = _key("info", "log threshold", choices=("debug", "info", "warning", "error"))
    log_format: str = _key("text", "text = key=value lines; json = one object per line",
                           choices=("text", "json"))


@dataclass(frozen=True)
class ProfileConfig(_Section):
    _name = "profile"
    dir: str = _key("", "profile cache; empty = $CACHE_DIRECTORY/profiles under systemd, "
                        "else $XDG_CACHE_HOME/neod/profiles")


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "cpu": CpuConfig,
    "parallel": ParallelConfig, "server": ServerConfig, "profile": ProfileConfig,
}


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: {f.name: getattr(getattr(self, name), f.name) for f in fields(cls)}
                for name, cls in _SECTIONS.items()}


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key, in declaration order (etc/neod.toml's source)."""
    return [(name, f.name, f.default, f.metadata["doc"])
            for name, cls in _SECTIONS.items() for f in fields(cls)]


def _parse_text(section: str, name: str, text: str) -> Any:
    """Turn an environment or CLI string into the key's type (validation comes after)."""
    f = next(f for f in fields(_SECTIONS[section]) if f.name == name)
    kind = type(f.default)
    if kind is str:
        return text
    if kind is bool:  # bool("false") is True: read the word instead
        word = text.strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"[{section}] {name}: {text!r} is not allowed; expected true or false")
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"[{section}] {name}: {text!r} is not allowed; expected "
                          f"{_describe(f.metadata, kind)}") from None


def _split_key(dotted: str, origin: str) -> tuple[str, str]:
    section, _, name = dotted.partition(".")
    cls = _SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"{origin}: unknown section {section!r}; "
                          f"sections: {', '.join(_SECTIONS)}")
    names = [f.name for f in fields(cls)]
    if name not in names:
        raise ConfigError(f"{origin}: unknown key {name!r} in [{section}]; "
                          f"keys: {', '.join(names)}")
    return section, name


def _read_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; "
                              f"sections: {', '.join(_SECTIONS)}")
        for name, value in table.items():
            _split_key(f"{section}.{name}", str(path))
            values.setdefault(section, {})[name] = value
    return values


def _read_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """NEOD_<SECTION>_<KEY> for known sections; other NEOD_* names belong to other tools."""
    values: dict[str, dict[str, Any]] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_PATH_ENV:
            continue
        rest = var[len(ENV_PREFIX):].lower()
        section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            continue
        section, name = _split_key(f"{section}.{rest[len(section) + 1:]}", f"environment {var}")
        values.setdefault(section, {})[name] = _parse_text(section, name, text)
    return values


def _read_overrides(overrides: Mapping[str, Any] | Iterable[str]) -> dict[str, dict[str, Any]]:
    items = overrides.items() if isinstance(overrides, Mapping) else (
        _split_assignment(text) for text in overrides)
    values: dict[str, dict[str, Any]] = {}
    for dotted, value in items:
        section, name = _split_key(dotted, f"override {dotted}")
        if isinstance(value, str):
            value = _parse_text(section, name, value)
        values.setdefault(section, {})[name] = value
    return values


def _split_assignment(text: str) -> tuple[str, str]:
    dotted, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return dotted.strip(), value


def find_config_file(path: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """The file to read: the one given, else $NEOD_CONFIG, else /etc/neod/neod.toml if present."""
    env = os.environ if env is None else env
    if path:
        return Path(path)
    if env.get(CONFIG_PATH_ENV):
        return Path(env[CONFIG_PATH_ENV])
    return SYSTEM_CONFIG_PATH if SYSTEM_CONFIG_PATH.is_file() else None


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | Iterable[str] = ()) -> Config:
    """File < environment < overrides; `path=None` reads no file. Raises ConfigError."""
    env = os.environ if env is None else env
    layers = [(f"config file {path}", _read_file(Path(path)) if path is not None else {}),
              ("the environment", _read_env(env)),
              ("a command-line override", _read_overrides(overrides))]
    sections = {}
    for name, cls in _SECTIONS.items():
        merged: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for origin, layer in layers:
            merged.update(layer.get(name, {}))
            origins.update(dict.fromkeys(layer.get(name, {}), origin))
        try:
            sections[name] = cls(**_coerce_floats(cls, merged))
        except ConfigError as exc:
            where = origins.get((exc.key or ".").split(".")[1])
            raise ConfigError(f"{exc} (set in {where})" if where else str(exc), exc.key) from None
    return Config(**sections)


def _coerce_floats(cls: type[_Section], values: dict[str, Any]) -> dict[str, Any]:
    """TOML writes `30` for 30.0; accept integers where a float is declared."""
    kinds = {f.name: type(f.default) for f in fields(cls)}
    return {k: float(v) if kinds[k] is float and type(v) is int else v for k, v in values.items()}


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with typed `section.key` values replaced (validated like any source)."""
    changes = _read_overrides(overrides)
    return replace(cfg, **{name: replace(getattr(cfg, name), **_coerce_floats(_SECTIONS[name], v))
                           for name, v in changes.items()})


# ---- paths derived from the environment -------------------------------------------------------

def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where ipc sockets live: systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR/neod, else /tmp."""
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "neod"
    return Path(f"/tmp/neod-{os.getuid()}")


def expand_endpoint(endpoint: str, env: Mapping[str, str] | None = None) -> str:
    return endpoint.replace("{runtime_dir}", str(runtime_dir(env)))


def control_endpoint_candidates(cfg: Config, env: Mapping[str, str] | None = None) -> list[str]:
    """Where neoctl looks: the configured endpoint, then the systemd service's runtime directory."""
    configured = cfg.server.control_endpoint
    first = expand_endpoint(configured, env)
    service = configured.replace("{runtime_dir}", "/run/neod")
    return [first] if service in (first, configured) else [first, service]


def profile_dir(cfg: Config, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if cfg.profile.dir:
        return Path(cfg.profile.dir).expanduser()
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0]) / "profiles"
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "neod" / "profiles"
