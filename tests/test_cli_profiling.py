"""`neoctl profile` measures and stores this host's profile; `neoctl predict` reads it back."""

from __future__ import annotations

import pathlib

import orjson
import pytest
import torch
from typer.testing import CliRunner

from neod.cache.pool import GIB, KVLayout
from neod.cli import profiling
from neod.cli.ctl import app


def write_config(tmp_path) -> str:
    path = tmp_path / "neod.toml"
    path.write_text(f"""
[model]
preset = "tiny"
device = "cpu"
[scheduler]
policy = "neo"
max_batch_size = 8
max_tokens_in_batch = 512
[cache]
cpu_kv_gib = 0.01
[cpu]
threads = 1
[profile]
dir = "{tmp_path / "profiles"}"
""")
    return str(path)


def test_predict_needs_a_profile_then_uses_it(tmp_path):
    runner = CliRunner()
    config = write_config(tmp_path)
    missing = runner.invoke(app, ["--config", str(config), "predict", "--gpu-kv-gib", "0.001"])
    assert missing.exit_code == 1
    assert "neoctl profile" in missing.output

    measured = runner.invoke(app, ["--config", config, "profile", "--json"])
    assert measured.exit_code == 0, measured.output
    profile = orjson.loads(measured.stdout[measured.stdout.index("{") :])
    assert profile["tables"]["cpu_decode_attn"] is not None
    assert profile["pipeline_handoff"] >= 0  # timed once the runtime stood, stored with it
    scale, fixed = profile["cpu_paced"]  # timed with it, within the corrections' bounds
    assert 0.5 <= scale <= 2.0 and 0.0 <= fixed <= 5e-4
    assert list(tmp_path.joinpath("profiles").glob("profile-*.json"))

    predicted = runner.invoke(
        app,
        [
            "--config",
            config,
            "predict",
            "--gpu-kv-gib",
            "0.001",
            "--input-len",
            "100",
            "--output-len",
            "20",
            "--batch",
            "6",
            "--json",
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    result = orjson.loads(predicted.stdout)
    # The batch played through the scheduler: every request served under both policies.
    batch = result["batch"]
    assert batch["num_requests"] == 6
    for policy in ("gpu-only", "auto"):
        assert batch[policy]["output_tokens_per_s"] > 0 and batch[policy]["unservable"] == 0
    assert batch["gain"] == pytest.approx(
        batch["auto"]["output_tokens_per_s"] / batch["gpu-only"]["output_tokens_per_s"]
    )
    assert "a batch of 6 sent at once, through the scheduler: gpu-only" in (
        profiling._render_prediction(result)
    )
    # No neod runs here: no host time is charged unless given, and given it slows every policy.
    assert batch["host_ms"] == 0.0
    args = ["--config", config, "predict", "--gpu-kv-gib", "0.001", "--input-len", "100",
            "--output-len", "20", "--batch", "6", "--host-ms", "50", "--json"]  # fmt: skip
    charged = orjson.loads(runner.invoke(app, args).stdout)["batch"]
    assert charged["host_ms"] == 50.0
    for policy in ("gpu-only", "auto"):
        assert charged[policy]["elapsed_s"] == pytest.approx(
            batch[policy]["elapsed_s"] + 0.05 * batch[policy]["iterations"]
        )
    # Prompts no pool can take: the batch line says so, no traceback.
    too_long = runner.invoke(app, ["--config", config, "predict", "--gpu-kv-gib", "0.001",
                                   "--input-len", "100000", "--batch", "2"])  # fmt: skip
    assert too_long.exit_code == 0, too_long.output
    assert (
        "first tokens after - / - s (median), 0 ms of host time per iteration; 2 of them cannot "
        "be served" in too_long.stdout
    )
    assert result["gpu_only"]["tokens_per_s"] > 0
    assert result["neo"]["tokens_per_s"] >= result["gpu_only"]["tokens_per_s"]
    assert result["mode"] in ("neo", "gpu-only")
    # A GPU pool of ~1 MiB holds only a few requests: the GPU-only batch is bound by memory.
    assert result["gpu_only"]["bound"] == "gpu memory"


def test_predict_under_tensor_parallelism_gives_each_rank_its_share_of_the_host_pool(
    tmp_path, monkeypatch
):
    """The profile and layout are rank 0's (half the KV heads at tp 2), the GPU budget is per GPU,
    and the host pool serves both ranks: each can use half of it."""
    config = pathlib.Path(write_config(tmp_path))
    text = config.read_text().replace("cpu_kv_gib = 0.01", "cpu_kv_gib = 1.0")
    config.write_text(text + "[parallel]\ntp_size = 2\n")
    rank_layout = KVLayout(2, 1, 64, 16, torch.bfloat16)
    from types import SimpleNamespace

    stub = SimpleNamespace(pipeline_handoff=50e-6)
    monkeypatch.setattr(profiling, "_stored_profile", lambda cfg: (stub, rank_layout, None))
    seen = {}

    def predict_workload(cost, num_layers, per_token, gpu_bytes, cpu_bytes, *args, **kwargs):
        seen.update(per_token=per_token, gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes)
        return {}

    monkeypatch.setattr("neod.sched.predict_workload", predict_workload)
    monkeypatch.setattr("neod.sched.TableCostModel", lambda profile: None)
    result = CliRunner().invoke(
        app, ["--config", str(config), "predict", "--gpu-kv-gib", "0.5", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert seen == {"per_token": rank_layout.bytes_per_token, "gpu_bytes": GIB // 2,
                    "cpu_bytes": GIB // 2}
    assert orjson.loads(result.stdout) == {"handoff_timed": True}


def test_predict_as_measured_applies_the_running_daemons_corrections(tmp_path, monkeypatch):
    """--as-measured asks the running neod for its corrections of the profile it decides from,
    and refuses them for another profile."""
    from types import SimpleNamespace

    from neod.cli.common import Ctl
    from neod.sched import CalibratedCostModel

    config = write_config(tmp_path)
    layout = KVLayout(2, 1, 64, 16, torch.bfloat16)
    profile = SimpleNamespace(key=SimpleNamespace(short_id=lambda: "abc123"),
                              pipeline_handoff=None)  # fmt: skip
    monkeypatch.setattr(profiling, "_stored_profile", lambda cfg: (profile, layout, None))
    tables = SimpleNamespace(pipeline_handoff_s=lambda: 0.0)  # the profile's, as a cost model
    monkeypatch.setattr("neod.sched.TableCostModel", lambda p: tables)
    seen = {}

    def predict_workload(cost, *args, **kwargs):
        seen["cost"] = cost
        side = {"tokens_per_s": 100.0, "gpu_batch": 3, "iteration_s": 0.01, "bound": "gpu memory",
                "cpu_batch": 0, "pipelined": False, "cpu_bound": "gain"}
        return {"input_len": 1000, "output_len": 200, "gpu_only": side, "neo": side,
                "gain": 1.0, "mode": "gpu-only"}

    monkeypatch.setattr("neod.sched.predict_workload", predict_workload)
    engine = {"profile": {"id": "abc123"},
              "cpu_cost_scale": {"measured_over_profiled": 1.31, "fixed_us": 25.0,
                                 "samples": 420},
              "pipeline_handoff": {"per_layer_us": 43.0, "samples": 37}}
    monkeypatch.setattr(Ctl, "call_if_running", lambda self, command, **args: {"engine": engine})
    args = ["--config", config, "predict", "--gpu-kv-gib", "0.5", "--as-measured"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cost = seen["cost"]
    assert isinstance(cost, CalibratedCostModel) and cost.base is tables
    assert cost.cpu_scale == 1.31 and cost.handoff_s == pytest.approx(43e-6)
    assert cost.cpu_fixed_s == pytest.approx(25e-6)
    assert result.output.startswith(
        "as the running neod measured: CPU attention 1.31x the profile + 25 us per sub-batch "
        "layer (420 iterations), pipeline hand-offs +43 us (37 "
    )
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert orjson.loads(as_json.stdout)["measured_corrections"]["handoff_samples"] == 37
    # Without the flag the daemon is not asked, and the profile stands alone.
    plain = CliRunner().invoke(app, args[:-1])
    assert plain.exit_code == 0 and seen["cost"] is tables
    # ... whose hand-off is not timed yet (a profile from before its current form): said so,
    # unlike with the running neod's corrections above, which carry its timed hand-off.
    assert plain.output.startswith("note: this profile's pipeline hand-off is not timed yet")
    assert not result.output.startswith("note:")
    profile.pipeline_handoff = 40e-6
    timed = CliRunner().invoke(app, args[:-1])
    assert timed.exit_code == 0 and "not timed" not in timed.output
    engine["profile"] = {"id": "other"}
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1
    assert "decides from profile other, not from this host's stored profile abc123" in (
        refused.output
    )


def test_predict_as_measured_without_a_daemon_takes_the_corrections_kept_beside_the_profile(
    tmp_path, monkeypatch
):
    from test_profile import make_profile

    from neod.cli.common import Ctl
    from neod.sched import (
        CalibratedCostModel,
        TableCostModel,
        corrections_path,
        save_corrections,
    )

    config = write_config(tmp_path)
    layout = KVLayout(2, 1, 64, 16, torch.bfloat16)
    profile = make_profile()
    profile_file = tmp_path / f"profile-{profile.key.short_id()}.json"
    monkeypatch.setattr(profiling, "_stored_profile", lambda cfg: (profile, layout, profile_file))
    asked = []
    monkeypatch.setattr(Ctl, "call_if_running", lambda self, command: asked.append(command))
    args = ["--config", config, "predict", "--gpu-kv-gib", "0.5", "--as-measured", "--json"]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 1 and asked == ["status"]
    assert "neod is not running and no corrections of profile" in missing.output
    kept = CalibratedCostModel(
        TableCostModel(profile), cpu_scale=0.8, handoff_s=120e-6, cpu_fixed_s=12e-6
    )
    kept.cpu_samples, kept.handoff_samples = 300, 90
    save_corrections(kept, profile, corrections_path(profile_file))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["measured_corrections"] == {
        "source": "stored", "cpu_scale": 0.8, "cpu_fixed_us": 12.0, "cpu_samples": 300,
        "handoff_us": 120.0, "handoff_samples": 90,
    }  # fmt: skip
    text = CliRunner().invoke(app, args[:-1]).output
    assert text.startswith("as the last neod measured: CPU attention 0.80x the profile + 12 us "
                           "per sub-batch layer (300 ")


@pytest.mark.parametrize("control", [None, "ipc://{tmp}/nobody.sock"])
def test_call_if_running_is_none_where_no_neod_answers(tmp_path, monkeypatch, control):
    """No control socket at all, or an endpoint nobody serves: None, not an exit."""
    from neod.cli.common import Ctl

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    ctl = Ctl(config_path=write_config(tmp_path), intake=None, timeout_s=0.5,
              control=None if control is None else control.format(tmp=tmp_path),
              curve_server_key=None, curve_client_key=None)
    assert ctl.call_if_running("status") is None
