"""neoctl and neod command lines, against a real daemon (real engine, tiny model, CPU)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from support import free_port
from typer.testing import CliRunner

from neod.cli.ctl import app as neoctl
from neod.cli.daemon import app as neod_app
from neod.config import load_config
from neod.server.embedded import EmbeddedDaemon

runner = CliRunner()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    path = tmp / "neod.toml"
    path.write_text(f'[model]\ndevice = "cpu"\n[scheduler]\nmax_batch_size = 16\n'
                    f'[cache]\ncpu_kv_gib = 0.25\n'
                    f'[profile]\ndir = "{tmp}/profiles"\n'
                    f'[server]\nintake_endpoint = "tcp://127.0.0.1:{free_port()}"\n'
                    f'control_endpoint = "ipc://{tmp}/control.sock"\n')
    return path


@pytest.fixture(scope="module")
def daemon(config_file: Path):
    with EmbeddedDaemon(load_config(config_file, env={})) as d:
        yield d


def ctl(config_file: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(neoctl, ["--config", str(config_file), *args])
    return result.exit_code, result.stdout, result.stderr


def test_status_human_and_json(daemon: EmbeddedDaemon, config_file: Path) -> None:
    code, out, _ = ctl(config_file, "status")
    assert code == 0
    for label in ("serving", "model", "policy", "requests", "KV", "CPU pool", "TTFT ms", "TPOT ms",
                  "profile   id=", " on CPUs "):
        assert label in out, out
    code, out, _ = ctl(config_file, "status", "--json")
    data = orjson.loads(out)
    assert code == 0 and data["server"]["state"] == "serving" and "model" in data["engine"]
    pool = data["engine"]["cpu_pool"]
    assert len(pool["cores"]) == pool["threads"] >= 1
    assert set(pool["cores"]) <= os.sched_getaffinity(0)
    assert pool["numa_node"] is None  # no GPU here
    share = pool["computing_share"]  # None until an iteration had CPU work
    assert share is None or 0 < share <= 1
    waits = pool["waits"]  # the workers have run (the profile), so the kernel accounted them
    assert 0 <= waits["wait_share"] < 1 and waits["preempted"] >= 0
    others = waits["other_threads_on"]  # a 2-CPU host leaves too few to keep them off the pool
    assert others is None or not set(others) & set(pool["cores"])
    assert "workers waited " in ctl(config_file, "status")[1]


def test_tune_applies_and_validates(daemon: EmbeddedDaemon, config_file: Path) -> None:
    code, out, _ = ctl(config_file, "tune", "--max-batch-size", "8")
    assert code == 0 and "max_batch_size=8" in out
    code, out, _ = ctl(config_file, "tune", "--max-batch-size", "16", "--json")
    assert code == 0 and orjson.loads(out)["applied"]["max_batch_size"] == 16
    code, _, err = ctl(config_file, "tune", "--policy", "fastest")
    assert code == 1 and "neod refused 'tune'" in err and "policy" in err
    code, out, _ = ctl(config_file, "tune", "--cpu-stretch", "0.5", "--cpu-min-gain", "0.02")
    assert code == 0 and "cpu_stretch=0.5" in out and "cpu_min_gain=0.02" in out
    code, out, _ = ctl(config_file, "status", "--json")
    assert orjson.loads(out)["engine"]["cpu_stretch"] == 0.5
    assert "cpu_min_gain 0.02  cpu_stretch 0.5  cpu_round_robin 3" in ctl(config_file, "status")[1]
    code, out, _ = ctl(config_file, "tune", "--cpu-round-robin", "1")
    assert code == 0 and "cpu_round_robin=1" in out
    code, _, err = ctl(config_file, "tune", "--cpu-round-robin", "0")
    assert code == 1 and "cpu_round_robin" in err
    code, _, err = ctl(config_file, "tune", "--cpu-min-gain", "-1")
    assert code == 1 and "cpu_min_gain" in err
    code, _, err = ctl(config_file, "tune")
    assert code == 2 and "give at least one of" in err


def test_tune_resizes_the_cpu_pool(daemon: EmbeddedDaemon, config_file: Path) -> None:
    def threads() -> int:
        code, out, _ = ctl(config_file, "status", "--json")
        pool = orjson.loads(out)["engine"]["cpu_pool"]
        assert len(pool["cores"]) == pool["threads"]  # the cores of the pool in force
        return pool["threads"]

    before = threads()
    other = 2 if before == 1 else 1
    code, out, _ = ctl(config_file, "tune", "--cpu-threads", str(other))
    assert code == 0 and f"cpu_threads={other}" in out and threads() == other
    code, _, err = ctl(config_file, "tune", "--cpu-threads", "4000")
    assert code == 1 and "neod refused 'tune'" in err and "pool threads" in err
    assert threads() == other
    code, out, _ = ctl(config_file, "generate", "Hello", "--max-tokens", "3", "--ignore-eos")
    assert code == 0
    assert ctl(config_file, "tune", "--cpu-threads", str(before))[0] == 0 and threads() == before


def test_generate_streams_text(daemon: EmbeddedDaemon, config_file: Path) -> None:
    code, out, err = ctl(config_file, "generate", "Hello", "--max-tokens", "5", "--ignore-eos")
    assert code == 0 and "5 output tokens" in err
    code, out, _ = ctl(config_file, "generate", "Hello", "--max-tokens", "4", "--ignore-eos",
                       "--json")
    events = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and events[0]["type"] == "accepted" and events[-1]["type"] == "final"
    assert sum(len(e["token_ids"]) for e in events if e["type"] == "delta") == 4
    code, _, err = ctl(config_file, "generate", "x", "--max-tokens", "0")
    assert code == 1 and "bad_request" in err and "max_tokens" in err


def test_drain_resume_and_ping(daemon: EmbeddedDaemon, config_file: Path) -> None:
    code, out, _ = ctl(config_file, "drain", "--wait")
    assert code == 0 and "draining" in out and "drained" in out
    code, _, err = ctl(config_file, "generate", "x")
    assert code == 1 and "shutting_down" in err
    code, out, _ = ctl(config_file, "resume")
    assert code == 0 and "serving" in out
    code, out, _ = ctl(config_file, "ping", "--json")
    assert code == 0 and orjson.loads(out)["state"] == "serving"


def test_helpful_errors_without_a_daemon(tmp_path: Path) -> None:
    path = tmp_path / "neod.toml"
    path.write_text(f'[server]\ncontrol_endpoint = "ipc://{tmp_path}/none.sock"\n'
                    f'intake_endpoint = "tcp://127.0.0.1:{free_port()}"\n')
    code, _, err = ctl(path, "status")
    assert code == 1 and f"no control socket at {tmp_path}/none.sock" in err
    assert "systemctl start neod" in err
    code, _, err = ctl(path, "--timeout", "0.5", "generate", "x")
    assert code == 1 and "could not connect" in err
    path.write_text("[server]\nnope = 1\n")
    code, _, err = ctl(path, "status")
    assert code == 2 and "unknown key 'nope'" in err


def test_keys_writes_a_private_secret(tmp_path: Path) -> None:
    result = runner.invoke(neoctl, ["keys", str(tmp_path / "k"), "--name", "producer"])
    assert result.exit_code == 0
    secret = tmp_path / "k" / "producer.key_secret"
    assert (tmp_path / "k" / "producer.key").is_file()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_neod_check_config_and_errors(tmp_path: Path) -> None:
    result = runner.invoke(neod_app, ["--check-config", "--preset", "llama-3.1-8b", "--set",
                                      "scheduler.policy=neo"], env={"NEOD_CPU_THREADS": "3"})
    assert result.exit_code == 0
    cfg = orjson.loads(result.stdout)
    assert cfg["model"]["preset"] == "llama-3.1-8b" and cfg["scheduler"]["policy"] == "neo"
    assert cfg["cpu"]["threads"] == 3
    result = runner.invoke(neod_app, ["--set", "scheduler.policy=fast"])
    assert result.exit_code == 2
    assert "[scheduler] policy: 'fast' is not allowed; expected one of auto, gpu-only, neo" in \
        result.stderr


def test_python_dash_m_neod() -> None:
    out = subprocess.run([sys.executable, "-m", "neod", "--version"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "NEOD_CONFIG": ""})
    assert out.returncode == 0 and out.stdout.startswith("neod ")


def test_neod_exits_at_once_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "neod", "--intake", f"tcp://127.0.0.1:{port}",
                              "--control", f"ipc://{tmp_path}/control.sock"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "NEOD_CONFIG": ""})
    assert out.returncode == 1
    assert "event=bind_failed" in out.stderr and "another process holds it" in out.stderr
    assert "event=loading" not in out.stderr  # before any model work


def test_status_names_the_cpu_cost_correction_once_measured() -> None:
    from neod.cli.ops import render_status

    engine = {"model": "tiny", "cpu_pool": {"threads": 2, "cores": [0, 1]},
              "cpu_cost_scale": {"measured_over_profiled": 1.0, "samples": 0}}
    status = {"server": {"state": "serving"}, "engine": engine}
    assert "profiled cost" not in render_status(status)
    engine["cpu_cost_scale"] = {"measured_over_profiled": 0.7612, "fixed_us": 0.0, "samples": 420}
    [line] = [ln for ln in render_status(status).splitlines() if ln.startswith("CPU pool")]
    assert line.endswith(", its attention 0.76x the profiled cost over 420 iterations")
    engine["cpu_cost_scale"]["fixed_us"] = 31.5
    [line] = [ln for ln in render_status(status).splitlines() if ln.startswith("CPU pool")]
    assert line.endswith(
        ", its attention 0.76x the profiled cost + 31.5 us per sub-batch layer over 420 iterations"
    )
    engine["cpu_cost_scale"]["fixed_us"] = 0.0
    engine["pipeline_handoff"] = {"per_layer_us": 0.0, "profiled_us": 0.0, "samples": 0}
    assert "hand-offs" not in render_status(status)
    engine["pipeline_handoff"] = {"per_layer_us": 80.0, "profiled_us": 80.0, "samples": 0}
    [line] = [ln for ln in render_status(status).splitlines() if ln.startswith("CPU pool")]
    assert line.endswith("420 iterations, pipeline hand-offs +80 us (as profiled)")
    engine["pipeline_handoff"] = {"per_layer_us": 212.5, "profiled_us": 80.0, "samples": 37}
    [line] = [ln for ln in render_status(status).splitlines() if ln.startswith("CPU pool")]
    assert line.endswith(
        "420 iterations, pipeline hand-offs +212.5 us (profiled 80, 37 iterations)"
    )
    assert not any(ln.startswith("pipeline_handoff") for ln in render_status(status).splitlines())


def test_status_shows_the_cpu_fit_by_batch_size_on_a_line_of_its_own() -> None:
    from neod.cli.ops import render_status

    engine = {"model": "tiny", "iterations": {"total": 9, "cpu_fit": []}}
    status = {"server": {"state": "serving"}, "engine": engine}
    assert "CPU fit" not in render_status(status)
    engine["iterations"]["cpu_fit"] = [
        {"decodes": "1", "iterations": 12, "median_ratio": 2.004},
        {"decodes": "8-15", "iterations": 40, "median_ratio": 0.97},
    ]
    lines = render_status(status).splitlines()
    [fit] = [ln for ln in lines if ln.startswith("CPU fit")]
    assert fit.endswith("by CPU decodes: 1: 2.00x (12), 8-15: 0.97x (40)")
    [iterations] = [ln for ln in lines if ln.startswith("iterations")]
    assert "total=9" in iterations and "cpu_fit" not in iterations
