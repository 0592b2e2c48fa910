"""ModelConfig parsing and validation, the shape presets, and the RoPE table vs transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from neod.model.config import ModelConfig, ModelConfigError, RopeScaling
from neod.model.presets import PRESETS, get_preset
from neod.model.rope import build_cos_sin_cache

# Llama 3.1 8B's config.json as published (the classic rope_theta + rope_scaling layout).
LLAMA31_8B_JSON = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

LLAMA2_7B_JSON = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "torch_dtype": "float16",
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_llama31_config_matches_preset() -> None:
    assert ModelConfig.from_dict(LLAMA31_8B_JSON) == get_preset("llama-3.1-8b")


def test_llama2_defaults_kv_heads_head_dim_and_no_scaling() -> None:
    cfg = ModelConfig.from_dict(LLAMA2_7B_JSON)
    assert cfg.num_key_value_heads == 32
    assert cfg.head_dim == 128
    assert cfg.rope_scaling is None
    assert cfg.rope_theta == 10000.0
    assert cfg.eos_token_ids == (2,)
    assert cfg.torch_dtype == "float16"
    assert cfg == get_preset("llama-2-7b")


def test_transformers5_rope_parameters_layout(tmp_path) -> None:
    hf = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.5},
        tie_word_embeddings=True,
        dtype="float32",
    )
    hf.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=2.5)
    assert cfg.num_key_value_heads == 2
    assert cfg.head_dim == 16
    assert cfg.tie_word_embeddings is True
    assert cfg.torch_dtype == "float32"


def test_legacy_type_key_and_dtype_aliases() -> None:
    raw = dict(
        LLAMA2_7B_JSON, rope_scaling={"type": "linear", "factor": 4.0}, torch_dtype="torch.bfloat16"
    )
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)
    assert cfg.torch_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": None}, "vocab_size"),
        ({"hidden_size": -4096}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
            "low_freq_factor",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, "'factor'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": -1.0}}, "rope_scaling.factor"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8,
                    "low_freq_factor": 4,
                    "high_freq_factor": 1,
                }
            },
            "high_freq_factor",
        ),
        ({"rope_scaling": "llama3"}, "rope_scaling must be an object"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral"}, "model_type"),
        ({"bos_token_id": 200000}, "bos_token_id"),
        ({"eos_token_id": [128001, -1]}, "eos_token_id"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"head_dim": 127}, "head_dim"),
    ],
)
def test_invalid_fields_are_named(change: dict, message: str) -> None:
    raw = dict(LLAMA31_8B_JSON, **change)
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_missing_required_field() -> None:
    raw = dict(LLAMA31_8B_JSON)
    del raw["intermediate_size"]
    with pytest.raises(ModelConfigError, match="'intermediate_size'"):
        ModelConfig.from_dict(raw)


def test_hidden_size_not_divisible_without_head_dim() -> None:
    with pytest.raises(ModelConfigError, match="hidden_size"):
        ModelConfig.from_dict(dict(LLAMA2_7B_JSON, hidden_size=4100))


def test_config_file_errors(tmp_path) -> None:
    with pytest.raises(ModelConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_config_is_frozen() -> None:
    cfg = get_preset("tiny")
    with pytest.raises(AttributeError):
        cfg.vocab_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-3.2-1b", 1.236),
        ("llama-2-7b", 6.738),
        ("llama-3.1-8b", 8.030),
        ("llama-3.1-70b", 70.554),
    ],
)
def test_preset_parameter_counts(name: str, billions: float) -> None:
    assert get_preset(name).num_params / 1e9 == pytest.approx(billions, abs=5e-4)


def test_tiny_preset_fits_the_byte_tokenizer() -> None:
    tiny = get_preset("tiny")
    assert tiny.vocab_size == 512
    assert (tiny.bos_token_id, tiny.eos_token_ids) == (256, (257,))
    assert tiny.num_key_value_heads < tiny.num_attention_heads
    assert tiny.max_position_embeddings == 4096
    assert set(PRESETS) >= {"tiny", "llama-3.2-1b", "llama-2-7b", "llama-3.1-8b", "llama-3.1-70b"}
    with pytest.raises(ValueError, match="known presets: tiny"):
        get_preset("llama-4")


def _hf_config(cfg: ModelConfig) -> LlamaConfig:
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            scaling.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
    )


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        RopeScaling(rope_type="linear", factor=4.0),
        RopeScaling(
            "llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        RopeScaling(
            "llama3",
            factor=32.0,
            low_freq_factor=2.0,
            high_freq_factor=8.0,
            original_max_position_embeddings=64,
        ),
    ],
)
def test_rope_table_equals_transformers(scaling: RopeScaling | None) -> None:
    cfg = replace(get_preset("llama-3.1-8b"), rope_scaling=scaling, max_position_embeddings=2048)
    table = build_cos_sin_cache(cfg, max_positions=2048)
    assert table.shape == (2048, 128) and table.dtype == torch.float32
    rotary = LlamaRotaryEmbedding(_hf_config(cfg))
    positions = torch.arange(2048)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cfg.head_dim // 2
    assert torch.equal(table[:, :half], cos[0, :, :half])
    assert torch.equal(table[:, half:], sin[0, :, :half])
    # the table rotates the second half by the same angles (rotate-half layout)
    assert torch.equal(cos[0, :, :half], cos[0, :, half:])


def test_scaling_changes_the_table() -> None:
    base = get_preset("llama-3.1-8b")
    scaled = build_cos_sin_cache(base, max_positions=64)
    plain = build_cos_sin_cache(replace(base, rope_scaling=None), max_positions=64)
    assert not torch.equal(scaled, plain)
    assert torch.equal(
        scaled[:, :8], plain[:, :8]
    )  # short wavelengths are left alone by llama3 scaling


def test_config_and_presets_import_without_torch() -> None:
    """The engine sizes pools and the server reads EOS ids from the config without tensors."""
    code = "import sys, neod.model.config, neod.model.presets; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.strip() == "False"
