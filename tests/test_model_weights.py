"""Weight loading from safetensors checkpoints (single, sharded, broken) and random init."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neod.model.config import ModelConfig
from neod.model.weights import (
    ModelWeights,
    WeightsError,
    checkpoint_tensors,
    load_weights,
    random_weights,
    resolve_dtype,
)

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_ids=(2,),
    torch_dtype="float32",
)


def _config_json(cfg: ModelConfig) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.torch_dtype,
    }


def _hf_tensors(weights: ModelWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint a Hugging Face export of these weights holds (q/k/v and gate/up unfused)."""
    return {name: t.contiguous().clone() for name, t in checkpoint_tensors(cfg, weights).items()}


def _write(
    folder: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], num_shards: int = 1
) -> None:
    (folder / "config.json").write_text(json.dumps(_config_json(cfg)))
    if num_shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[shard::num_shards]
        save_file({n: tensors[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _flat(weights: ModelWeights) -> list[torch.Tensor]:
    out = [weights.embed, weights.final_norm, weights.lm_head]
    for layer in weights.layers:
        out += [
            layer.input_norm,
            layer.qkv,
            layer.o_proj,
            layer.post_norm,
            layer.gate_up,
            layer.down,
        ]
    return out


def _assert_same(a: ModelWeights, b: ModelWeights) -> None:
    for x, y in zip(_flat(a), _flat(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_fuses_qkv_and_gate_up(tmp_path: Path, num_shards: int, caplog) -> None:
    source = random_weights(CFG, "cpu", torch.float32, seed=3)
    _write(tmp_path, CFG, _hf_tensors(source, CFG), num_shards)
    with caplog.at_level(logging.INFO, logger="neod.model.weights"):
        loaded = load_weights(tmp_path, ModelConfig.from_pretrained(tmp_path), "cpu", torch.float32)
    _assert_same(loaded, source)
    assert "loading weights: 100%" in caplog.text


def test_loads_into_another_dtype(tmp_path: Path) -> None:
    source = random_weights(CFG, "cpu", torch.float32, seed=4)
    _write(tmp_path, CFG, _hf_tensors(source, CFG))
    loaded = load_weights(tmp_path, CFG, "cpu", torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[1].qkv, source.layers[1].qkv.to(torch.bfloat16))


def test_tied_embeddings_ignore_lm_head(tmp_path: Path, caplog) -> None:
    cfg = replace(CFG, tie_word_embeddings=True)
    source = random_weights(cfg, "cpu", torch.float32, seed=5)
    tensors = _hf_tensors(source, cfg)
    tensors["lm_head.weight"] = torch.zeros(
        cfg.vocab_size, cfg.hidden_size
    )  # some exports keep a copy
    _write(tmp_path, cfg, tensors)
    with caplog.at_level(logging.WARNING, logger="neod.model.weights"):
        loaded = load_weights(tmp_path, cfg, "cpu", torch.float32)
    assert loaded.lm_head is loaded.embed
    assert torch.equal(loaded.embed, source.embed)
    assert "unexpected" not in caplog.text


def test_unexpected_tensors_are_reported_and_rope_tables_skipped(tmp_path: Path, caplog) -> None:
    source = random_weights(CFG, "cpu", torch.float32, seed=6)
    tensors = _hf_tensors(source, CFG)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    _write(tmp_path, CFG, tensors)
    with caplog.at_level(logging.WARNING, logger="neod.model.weights"):
        load_weights(tmp_path, CFG, "cpu", torch.float32)
    assert "ignoring 1 unexpected tensors" in caplog.text
    assert "q_norm" in caplog.text


@pytest.mark.parametrize(
    "missing", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"]
)
def test_missing_tensor_is_named(tmp_path: Path, missing: str) -> None:
    tensors = _hf_tensors(random_weights(CFG, "cpu", torch.float32), CFG)
    del tensors[missing]
    _write(tmp_path, CFG, tensors, num_shards=2)
    with pytest.raises(WeightsError, match=f"lacks tensor '{missing}'"):
        load_weights(tmp_path, CFG, "cpu", torch.float32)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    tensors = _hf_tensors(random_weights(CFG, "cpu", torch.float32), CFG)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, CFG.hidden_size)
    _write(tmp_path, CFG, tensors)
    with pytest.raises(
        WeightsError, match=r"'model.layers.0.self_attn.k_proj.weight'.*\[8, 32\].*\[16, 32\]"
    ):
        load_weights(tmp_path, CFG, "cpu", torch.float32)


def test_config_that_disagrees_with_the_checkpoint(tmp_path: Path) -> None:
    _write(tmp_path, CFG, _hf_tensors(random_weights(CFG, "cpu", torch.float32), CFG))
    bigger = replace(CFG, intermediate_size=64)
    with pytest.raises(WeightsError, match="mlp.gate_proj.weight"):
        load_weights(tmp_path, bigger, "cpu", torch.float32)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_weights(tmp_path, CFG, "cpu", torch.float32)
    _write(tmp_path, CFG, _hf_tensors(random_weights(CFG, "cpu", torch.float32), CFG), num_shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="shard model-00002-of-00002.safetensors"):
        load_weights(tmp_path, CFG, "cpu", torch.float32)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(WeightsError, match="not a valid shard index"):
        load_weights(tmp_path, CFG, "cpu", torch.float32)


def test_random_init_is_seeded() -> None:
    a = random_weights(CFG, "cpu", torch.float32, seed=11)
    b = random_weights(CFG, "cpu", torch.float32, seed=11)
    c = random_weights(CFG, "cpu", torch.float32, seed=12)
    _assert_same(a, b)
    assert not torch.equal(a.layers[0].qkv, c.layers[0].qkv)
    assert not torch.equal(a.embed, c.embed)
    assert torch.equal(a.final_norm, torch.ones(CFG.hidden_size))
    assert a.lm_head is not a.embed
    # std 1.5/sqrt(fan_in) for the QKV projection
    assert a.layers[0].qkv.std().item() == pytest.approx(1.5 / CFG.hidden_size**0.5, rel=0.1)


def test_random_init_tied_and_bf16() -> None:
    cfg = replace(CFG, tie_word_embeddings=True)
    w = random_weights(cfg, "cpu", torch.bfloat16, seed=0)
    assert w.lm_head is w.embed
    assert w.dtype == torch.bfloat16
    assert all(t.isfinite().all() for t in _flat(w))


def test_resolve_dtype() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8")
