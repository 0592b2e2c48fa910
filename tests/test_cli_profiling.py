"""`neoctl profile` measures and stores this host's profile; `neoctl predict` reads it back."""

from __future__ import annotations

import orjson
from typer.testing import CliRunner

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
    missing = runner.invoke(app, ["--config", config, "predict", "--gpu-kv-gib", "0.001"])
    assert missing.exit_code == 1
    assert "neoctl profile" in missing.output

    measured = runner.invoke(app, ["--config", config, "profile", "--json"])
    assert measured.exit_code == 0, measured.output
    profile = orjson.loads(measured.stdout[measured.stdout.index("{") :])
    assert profile["tables"]["cpu_decode_attn"] is not None
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
            "--json",
        ],
    )
    assert predicted.exit_code == 0, predicted.output
    result = orjson.loads(predicted.stdout)
    assert result["gpu_only"]["tokens_per_s"] > 0
    assert result["neo"]["tokens_per_s"] >= result["gpu_only"]["tokens_per_s"]
    assert result["mode"] in ("neo", "gpu-only")
    # A GPU pool of ~1 MiB holds only a few requests: the GPU-only batch is bound by memory.
    assert result["gpu_only"]["bound"] == "gpu memory"
