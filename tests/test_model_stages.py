"""LlamaModel stages as the engine uses them: sub-batches, metadata checks, random weights."""

from __future__ import annotations

import pytest
import torch

from neod.model.attention import AttentionMetadata, gpu_attention
from neod.model.llama import LlamaModel
from neod.model.presets import get_preset

BLOCK_SIZE = 16
TINY = get_preset("tiny")


def _pool(
    model: LlamaModel, num_blocks: int = 16, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    cfg = model.config
    shape = (
        cfg.num_hidden_layers,
        num_blocks,
        2,
        cfg.num_key_value_heads,
        BLOCK_SIZE,
        cfg.head_dim,
    )
    return torch.zeros(shape, dtype=dtype)


def _prefill_meta(
    lens: list[int], first_blocks: list[int]
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Prompts stored from block first_blocks[p] onwards; returns metadata and positions."""
    cu, slots, positions = [0], [], []
    for length, block in zip(lens, first_blocks, strict=True):
        cu.append(cu[-1] + length)
        slots += range(block * BLOCK_SIZE, block * BLOCK_SIZE + length)
        positions += range(length)
    meta = AttentionMetadata(
        num_prefill_tokens=cu[-1],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(lens),
        slot_ids=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.zeros((0, 1), dtype=torch.int32),
        seq_lens=torch.zeros(0, dtype=torch.int32),
    )
    return meta, torch.tensor(positions)


def _decode_meta(
    seq_lens: list[int], first_blocks: list[int]
) -> tuple[AttentionMetadata, torch.Tensor]:
    """One new token per request at position seq_len - 1; a request's blocks are consecutive ids."""
    max_blocks = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    tables = [[b + j for j in range(max_blocks)] for b in first_blocks]
    slots = [
        t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
        for t, n in zip(tables, seq_lens, strict=True)
    ]
    meta = AttentionMetadata(
        num_prefill_tokens=0,
        cu_seqlens=torch.zeros(1, dtype=torch.int32),
        max_seqlen=0,
        slot_ids=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
    )
    return meta, torch.tensor([n - 1 for n in seq_lens])


def test_two_sub_batches_through_the_stages_equal_one_batch() -> None:
    """The pipelined engine interleaves two sub-batches layer by layer; results must not change."""
    model = LlamaModel.random(TINY, "cpu", torch.float32, seed=2)
    prompts = [[256, *range(40, 40 + n)] for n in (20, 9, 30)]
    first_blocks = [0, 4, 8]
    pool = _pool(model)
    meta, positions = _prefill_meta([len(p) for p in prompts], first_blocks)
    ids = torch.tensor([t for p in prompts for t in p])
    model.forward(ids, positions, meta, pool)
    next_ids = torch.tensor([7, 8, 9])
    seq_lens = [len(p) + 1 for p in prompts]

    one_pool = pool.clone()
    meta_all, pos_all = _decode_meta(seq_lens, first_blocks)
    whole = model.forward(next_ids, pos_all, meta_all, one_pool)

    subs = [
        (slice(0, 1), _decode_meta(seq_lens[:1], first_blocks[:1])),
        (slice(1, 3), _decode_meta(seq_lens[1:], first_blocks[1:])),
    ]
    state = [(model.embed(next_ids[rows]), None) for rows, _ in subs]
    for i in range(model.num_layers):
        for s, (_rows, (sub_meta, sub_pos)) in enumerate(subs):
            hidden, residual = state[s]
            q, k, v, residual = model.layer_pre(i, hidden, residual, sub_pos)
            attn = gpu_attention(q, k, v, pool[i], sub_meta, model.scale)
            state[s] = model.layer_post(i, attn, residual)
    split = torch.cat([model.final(h, r, torch.arange(h.shape[0])) for h, r in state])
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, one_pool, atol=1e-5, rtol=1e-5)


def test_stage_shapes_and_sample_selection() -> None:
    model = LlamaModel.random(TINY, "cpu", torch.float32, seed=0)
    cfg = model.config
    meta, positions = _prefill_meta([5, 3], [0, 1])
    hidden = model.embed(torch.arange(8))
    q, k, v, residual = model.layer_pre(0, hidden, None, positions)
    assert q.shape == (8, cfg.num_attention_heads, cfg.head_dim)
    assert k.shape == v.shape == (8, cfg.num_key_value_heads, cfg.head_dim)
    attn = gpu_attention(q, k, v, _pool(model)[0], meta, model.scale)
    assert attn.shape == (8, cfg.q_size)
    hidden, residual = model.layer_post(0, attn, residual)
    assert hidden.shape == residual.shape == (8, cfg.hidden_size)
    picked = model.final(hidden, residual, torch.tensor([4, 7]))
    every = model.final(hidden.clone(), residual.clone(), None)
    assert picked.dtype == torch.float32 and picked.shape == (2, cfg.vocab_size)
    torch.testing.assert_close(picked, every[[4, 7]], atol=1e-5, rtol=1e-5)


def test_random_tiny_model_is_not_degenerate() -> None:
    model = LlamaModel.random(TINY, "cpu", torch.float32, seed=0)
    pool = _pool(model)
    prompt = [256, *b"Hello, neod!"]
    meta, positions = _prefill_meta([len(prompt)], [0])
    tokens = [
        int(
            model.forward(
                torch.tensor(prompt), positions, meta, pool, torch.tensor([len(prompt) - 1])
            ).argmax()
        )
    ]
    for n in range(len(prompt) + 1, len(prompt) + 48):
        meta, positions = _decode_meta([n], [0])
        tokens.append(int(model.forward(torch.tensor(tokens[-1:]), positions, meta, pool).argmax()))
    assert len(set(tokens)) >= 24
    assert len(set(tokens[-16:])) >= 8  # no short loop at the end either


def test_bf16_forward_on_cpu() -> None:
    model = LlamaModel.random(TINY, "cpu", "bfloat16", seed=0, max_positions=256)
    assert model.dtype == torch.bfloat16 and model.max_positions == 256
    meta, positions = _prefill_meta([10, 4], [0, 1])
    logits = model.forward(
        torch.arange(14), positions, meta, _pool(model, dtype=torch.bfloat16), torch.tensor([9, 13])
    )
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    reference = LlamaModel.random(TINY, "cpu", torch.float32, seed=0)
    # bf16 weights are the fp32 draw rounded, so the argmax mostly agrees
    ref_logits = reference.forward(
        torch.arange(14), positions, meta, _pool(reference), torch.tensor([9, 13])
    )
    assert torch.nn.functional.cosine_similarity(logits, ref_logits).min() > 0.98


def test_pool_and_metadata_are_checked() -> None:
    model = LlamaModel.random(TINY, "cpu", torch.float32, seed=0)
    meta, positions = _prefill_meta([4], [0])
    bad_pool = torch.zeros(
        TINY.num_hidden_layers, 4, 2, TINY.num_attention_heads, BLOCK_SIZE, TINY.head_dim
    )
    with pytest.raises(ValueError, match="kv_pool shape"):
        model.forward(torch.arange(4), positions, meta, bad_pool)
    with pytest.raises(ValueError, match="batch has 5 rows but the metadata describes 4"):
        model.forward(torch.arange(5), torch.arange(5), meta, _pool(model))
    with pytest.raises(ValueError, match="slot_ids must be a 1-d torch.int64"):
        AttentionMetadata(
            0,
            torch.zeros(1, dtype=torch.int32),
            0,
            torch.zeros(1, dtype=torch.int32),
            torch.zeros((1, 1), dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="block_tables has 2 rows but seq_lens has 1"):
        AttentionMetadata(
            0,
            torch.zeros(1, dtype=torch.int32),
            0,
            torch.zeros(1, dtype=torch.int64),
            torch.zeros((2, 1), dtype=torch.int32),
            torch.ones(1, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        AttentionMetadata(
            3,
            torch.zeros(1, dtype=torch.int32),
            3,
            torch.zeros(3, dtype=torch.int64),
            torch.zeros((0, 1), dtype=torch.int32),
            torch.zeros(0, dtype=torch.int32),
        )


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_into_given_rows_equals_attention_returned(kind: str) -> None:
    """The pipelined executor has sub-batch 0's attention written straight into the first rows of
    the batch's output; the rows after them (the CPU's) must stay as they are."""
    cfg = TINY
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if kind == "prefill":
        meta, _ = _prefill_meta([7, 12], [0, 2])
    else:
        meta, _ = _decode_meta([5, 17, 33], [0, 2, 5])
    t = meta.num_tokens
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (hq, hkv, hkv))
    pool = torch.randn(16, 2, hkv, BLOCK_SIZE, d, generator=gen)
    expected = gpu_attention(q, k, v, pool.clone(), meta, 0.125)
    batch_out = torch.full((t + 2, hq * d), 7.0)
    got = gpu_attention(q, k, v, pool.clone(), meta, 0.125, out=batch_out[:t])
    assert got.data_ptr() == batch_out.data_ptr()
    torch.testing.assert_close(batch_out[:t], expected)
    assert bool((batch_out[t:] == 7.0).all())
    with pytest.raises(ValueError, match="contiguous"):
        gpu_attention(q, k, v, pool, meta, 0.125, out=torch.empty(t, hq * d + 1))
