"""Configuration: defaults, precedence, validation messages, and etc/neod.toml as documentation."""

from __future__ import annotations

import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from neod.config import (
    MAX_CPU_ROUND_ROBIN,
    Config,
    ConfigError,
    ServerConfig,
    control_endpoint_candidates,
    describe_keys,
    expand_endpoint,
    find_config_file,
    load_config,
    profile_dir,
    runtime_dir,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


def test_the_round_robin_bound_is_the_schedulers():
    """neod.toml and the control protocol refuse what SplitRule refuses, and nothing more."""
    from neod.sched.split import MAX_ROUND_ROBIN

    assert MAX_CPU_ROUND_ROBIN == MAX_ROUND_ROBIN


def test_defaults_match_the_contract() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert (cfg.model.path, cfg.model.preset, cfg.model.dtype, cfg.model.device) == ("", "tiny",
                                                                                     "auto", "auto")
    assert (cfg.cache.block_size, cfg.cache.gpu_memory_utilization) == (16, 0.9)
    assert (cfg.scheduler.policy, cfg.scheduler.max_batch_size,
            cfg.scheduler.max_tokens_in_batch) == ("auto", 256, 8192)
    assert (cfg.cpu.threads, cfg.cpu.reserve_cores) == (0, 1)
    assert cfg.profile.dir == ""
    assert cfg.server.intake_endpoint.startswith("tcp://127.0.0.1:")
    assert cfg.server.control_endpoint.startswith("ipc://{runtime_dir}/")


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(FrozenInstanceError):
        cfg.scheduler.policy = "neo"  # type: ignore[misc]


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "neod.toml"
    path.write_text('[scheduler]\npolicy = "neo"\nmax_batch_size = 64\n'
                    '[server]\ngrace_period_s = 5\n[cpu]\nthreads = 3\n')
    env = {"NEOD_SCHEDULER_MAX_BATCH_SIZE": "32", "NEOD_CPU_THREADS": "4"}
    cfg = load_config(path, env=env, overrides=["cpu.threads=5"])
    assert cfg.scheduler.policy == "neo"  # file only
    assert cfg.scheduler.max_batch_size == 32  # env beats file
    assert cfg.cpu.threads == 5  # override beats env
    assert cfg.server.grace_period_s == 5.0 and isinstance(cfg.server.grace_period_s, float)


def test_typed_overrides_and_with_overrides() -> None:
    cfg = load_config(None, env={},
                      overrides={"model.device": "cpu", "server.max_queued_requests": 7})
    assert cfg.model.device == "cpu" and cfg.server.max_queued_requests == 7
    again = with_overrides(cfg, {"server.grace_period_s": 1})
    assert again.server.grace_period_s == 1.0 and again.model.device == "cpu"


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False),
                                         ("off", False), ("true", True), ("1", True),
                                         ("yes", True)])
def test_boolean_keys_read_the_word(text: str, value: bool) -> None:
    assert load_config(None, env={}, overrides=[f"cpu.amx={text}"]).cpu.amx is value
    assert load_config(None, env={"NEOD_CPU_AMX": text}).cpu.amx is value


@pytest.mark.parametrize("override, fragment", [
    ("scheduler.policy=fast", "[scheduler] policy: 'fast' is not allowed; expected one of auto, "
                              "gpu-only, neo"),
    ("model.device=gpu0", "[model] device: 'gpu0' is not allowed; expected auto, cpu, cuda or "
                          "cuda:N"),
    ("cache.block_size=8", "expected one of 16, 32"),
    ("cache.gpu_memory_utilization=0", "expected a number in (0.0, 1.0]"),
    ("server.grace_period_s=-1", "[server] grace_period_s"),
    ("scheduler.max_batch_size=ten", "[scheduler] max_batch_size: 'ten' is not allowed; expected "
                                     "an integer >= 1"),
    ("server.intake_endpoint=http://x", "expected tcp://HOST:PORT or ipc://PATH"),
    ("server.log_format=xml", "one of text, json"),
    ("model.dtype=int8", "auto, bfloat16, float16, float32"),
    ("server.heartbeat_interval_s=nan", "[server] heartbeat_interval_s"),
    ("cpu.amx=maybe", "[cpu] amx: 'maybe' is not allowed; expected true or false"),
    ("scheduler.cpu_min_gain=2", "[scheduler] cpu_min_gain: 2.0 is not allowed; expected a number "
                                 "in [0.0, 1.0]"),
    ("scheduler.cpu_stretch=-0.1", "[scheduler] cpu_stretch"),
    ("scheduler.cpu_round_robin=0", "[scheduler] cpu_round_robin: 0 is not allowed; expected an "
                                    "integer in [1, 64]"),
    ("cpu.amx_values=true", "[cpu] amx_values: 'true' is not allowed; expected one of auto, on, "
                            "off"),
])
def test_bad_values_name_the_key_and_allowed_values(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={}, overrides=[override])
    assert fragment in str(err.value)


def test_unknown_keys_are_errors_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "neod.toml"
    path.write_text("[scheduler]\nmax_batch = 3\n")
    with pytest.raises(ConfigError,
                       match=r"unknown key 'max_batch' in \[scheduler\]; keys: policy"):
        load_config(path, env={})
    path.write_text("[schedule]\npolicy = 'neo'\n")
    with pytest.raises(ConfigError, match="unknown section 'schedule'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="environment NEOD_MODEL_PATHS: unknown key 'paths'"):
        load_config(None, env={"NEOD_MODEL_PATHS": "/x"})
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, env={}, overrides=["model.path"])
    # NEOD_* names outside the config's sections belong to other tools
    assert load_config(None, env={"NEOD_CONFIG": "/nope", "NEOD_FOO_BAR": "1"}) == Config()


def test_errors_say_where_a_bad_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "neod.toml"
    path.write_text('[scheduler]\npolicy = "fast"\n')
    with pytest.raises(ConfigError, match=f"set in config file {path}"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="set in the environment"):
        load_config(None, env={"NEOD_CACHE_BLOCK_SIZE": "7"})
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", env={})


def test_toml_types_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "neod.toml"
    path.write_text("[scheduler]\nmax_batch_size = true\n")
    with pytest.raises(ConfigError, match="max_batch_size: True is not allowed"):
        load_config(path, env={})
    path.write_text('[server]\ngrace_period_s = "30"\n')
    with pytest.raises(ConfigError, match="grace_period_s: '30' is not allowed"):
        load_config(path, env={})
    path.write_text("[cpu]\namx = 1\n")
    with pytest.raises(ConfigError, match="amx: 1 is not allowed; expected true or false"):
        load_config(path, env={})


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="max_queued_requests"):
        ServerConfig(max_queued_requests=0)


def test_etc_neod_toml_documents_every_key_with_its_default() -> None:
    text = (ROOT / "etc" / "neod.toml").read_text()
    data = tomllib.loads(text)
    lines = text.splitlines()
    for section, key, default, _doc in describe_keys():
        assert data[section][key] == default, f"[{section}] {key}"
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        assert lines[at - 1].startswith("#"), f"[{section}] {key} has no comment above it"
    assert sum(len(t) for t in data.values()) == len(describe_keys())
    assert load_config(ROOT / "etc" / "neod.toml", env={}) == Config()


def test_paths_from_the_environment() -> None:
    assert runtime_dir({"RUNTIME_DIRECTORY": "/run/neod:/run/other"}) == Path("/run/neod")
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/neod")
    assert str(runtime_dir({})).startswith("/tmp/neod-")
    assert expand_endpoint("ipc://{runtime_dir}/c.sock", {"RUNTIME_DIRECTORY": "/r"}) == \
        "ipc:///r/c.sock"
    cfg = Config()
    assert control_endpoint_candidates(cfg, {"XDG_RUNTIME_DIR": "/u"}) == [
        "ipc:///u/neod/control.sock", "ipc:///run/neod/control.sock"]
    fixed = with_overrides(cfg, {"server.control_endpoint": "tcp://127.0.0.1:9"})
    assert control_endpoint_candidates(fixed, {}) == ["tcp://127.0.0.1:9"]
    assert profile_dir(cfg, {"CACHE_DIRECTORY": "/var/cache/neod"}) == \
        Path("/var/cache/neod/profiles")
    assert profile_dir(cfg, {"XDG_CACHE_HOME": "/c"}) == Path("/c/neod/profiles")
    assert profile_dir(with_overrides(cfg, {"profile.dir": "/p"}), {}) == Path("/p")


def test_find_config_file(tmp_path: Path) -> None:
    assert find_config_file("/x.toml", {}) == Path("/x.toml")
    assert find_config_file(None, {"NEOD_CONFIG": str(tmp_path / "a.toml")}) == tmp_path / "a.toml"
