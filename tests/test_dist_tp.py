"""Tensor parallelism on CPU: W gloo processes must reproduce the unsharded model.

Each rank shards the same seeded fp32 tiny model (`tensor_parallel_llama`), runs a batched
prefill of several prompts and then decode steps through its `forward` over its own (Hkv/W heads)
KV pool; the parent compares every step's logits with the unsharded `LlamaModel` on the same
batches, and the greedy tokens exactly. Children always end: a bounded join, then kill.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support import free_port

from neod.cache.pool import KVLayout, allocate_pool
from neod.dist.sharding import check_shardable, shard_config, shard_weights
from neod.dist.tp_model import tensor_parallel_llama
from neod.model.attention import AttentionMetadata
from neod.model.llama import LlamaModel
from neod.model.presets import get_preset

BLOCK_SIZE = 4  # small blocks: every prompt spans several, with non-trivial block tables
NUM_BLOCKS = 32
PROMPTS = [[256, 10, 20, 30, 40], [256, *range(100, 111)], [256, 7, 7, 300]]
NUM_DECODE_STEPS = 6
JOIN_TIMEOUT_S = 60.0


def tiny_config():
    return get_preset("tiny")


def greedy_batch(model, prompts: list[list[int]], num_decode_steps: int):
    """One prefill of all prompts, then batched decodes; (per-step logits [B, V], tokens)."""
    cfg = model.config
    layout = KVLayout(
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, BLOCK_SIZE, model.dtype
    )
    pool = allocate_pool(layout, NUM_BLOCKS, torch.device("cpu"))
    per_seq = NUM_BLOCKS // len(prompts)
    # Reversed, interleaved block ids so that tables are neither contiguous nor sorted.
    tables = [
        [NUM_BLOCKS - 1 - (j * len(prompts) + s) for j in range(per_seq)]
        for s in range(len(prompts))
    ]
    seqs = [list(p) for p in prompts]

    def slot(s: int, t: int) -> int:
        return tables[s][t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE

    lens = [len(p) for p in prompts]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        sum(lens),
        cu,
        max(lens),
        torch.tensor([slot(s, t) for s, n in enumerate(lens) for t in range(n)]),
        torch.zeros((0, 1), dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
    )
    ids = torch.tensor([tok for p in prompts for tok in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    all_logits = [model.forward(ids, positions, meta, pool, cu[1:].long() - 1)]
    for _ in range(num_decode_steps):
        for s, row in enumerate(all_logits[-1]):
            seqs[s].append(int(row.argmax()))
        n = [len(seq) for seq in seqs]
        meta = AttentionMetadata(
            0,
            torch.zeros(1, dtype=torch.int32),
            0,
            torch.tensor([slot(s, n[s] - 1) for s in range(len(seqs))]),
            torch.tensor(tables, dtype=torch.int32),
            torch.tensor(n, dtype=torch.int32),
        )
        ids = torch.tensor([seq[-1] for seq in seqs])
        positions = torch.tensor([x - 1 for x in n])
        all_logits.append(model.forward(ids, positions, meta, pool, torch.arange(len(seqs))))
    return all_logits, [seq[len(p) :] for seq, p in zip(seqs, prompts, strict=True)]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)  # W ranks share a small machine
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
        )
        try:
            full = LlamaModel.random(tiny_config(), "cpu", torch.float32, seed=0)
            model = tensor_parallel_llama(full.config, full.weights)
            assert model.config.num_key_value_heads == full.config.num_key_value_heads // world_size
            del full
            torch.save(greedy_batch(model, PROMPTS, NUM_DECODE_STEPS), out / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_ranks(world_size: int, out_dir: Path) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, str(out_dir)), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [f.read_text() for f in sorted(out_dir.glob("rank*.err"))]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * world_size, "a rank timed out or crashed"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = LlamaModel.random(tiny_config(), "cpu", torch.float32, seed=0)
    return greedy_batch(model, PROMPTS, NUM_DECODE_STEPS)


@pytest.mark.parametrize("world_size", [1, 2])
def test_tensor_parallel_matches_unsharded(world_size, reference, tmp_path):
    ref_logits, ref_tokens = reference
    results = run_ranks(world_size, tmp_path)
    logits, tokens = results[0]
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits) == NUM_DECODE_STEPS + 1
    for step, (got, want) in enumerate(zip(logits, ref_logits, strict=True)):
        assert got.shape == want.shape == (len(PROMPTS), tiny_config().vocab_size), step
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    for other_logits, other_tokens in results[1:]:  # replicated LM head: ranks agree exactly
        assert other_tokens == tokens
        for got, want in zip(other_logits, logits, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_shards_partition_the_weights():
    cfg = tiny_config()
    full = LlamaModel.random(cfg, "cpu", torch.float32, seed=0).weights
    shards = [shard_weights(cfg, full, r, 2) for r in range(2)]
    local_cfg = shards[0][0]
    assert (local_cfg.num_attention_heads, local_cfg.num_key_value_heads) == (2, 1)
    assert local_cfg.intermediate_size == cfg.intermediate_size // 2
    assert local_cfg.head_dim == cfg.head_dim
    q, kv = local_cfg.q_size, local_cfg.kv_size
    layer, parts = full.layers[1], [w.layers[1] for _, w in shards]
    # q rows of rank 0 then rank 1 rebuild the full q block; likewise k, v, gate, up.
    qkv_blocks = [
        torch.cat([p.qkv[a:b] for p in parts])
        for a, b in ((0, q), (q, q + kv), (q + kv, q + 2 * kv))
    ]
    torch.testing.assert_close(torch.cat(qkv_blocks), layer.qkv, rtol=0, atol=0)
    i = local_cfg.intermediate_size
    gate_up = [torch.cat([p.gate_up[a:b] for p in parts]) for a, b in ((0, i), (i, 2 * i))]
    torch.testing.assert_close(torch.cat(gate_up), layer.gate_up, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p.o_proj for p in parts], 1), layer.o_proj)
    torch.testing.assert_close(torch.cat([p.down for p in parts], 1), layer.down)
    assert shards[1][1].embed.data_ptr() != full.embed.data_ptr()  # copies, not views


@pytest.mark.parametrize(
    ("changes", "world_size", "match"),
    [
        ({}, 4, "num_key_value_heads=2 is not divisible by world_size=4"),
        ({}, 3, "num_attention_heads=4 is not divisible by world_size=3"),
        ({"intermediate_size": 511}, 2, "intermediate_size=511 is not divisible"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3}, 2, "num_key_value_heads=3"),
        ({}, 0, "world_size must be >= 1"),
    ],
)
def test_sharding_errors(changes, world_size, match):
    cfg = replace(tiny_config(), **changes)
    with pytest.raises(ValueError, match=match):
        check_shardable(cfg, world_size)
    with pytest.raises(ValueError, match=match):
        shard_config(cfg, world_size)


def test_bad_rank_is_rejected():
    cfg = tiny_config()
    weights = LlamaModel.random(cfg, "cpu", torch.float32, seed=0).weights
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard_weights(cfg, weights, 2, 2)
