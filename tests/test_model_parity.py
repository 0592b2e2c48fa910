"""LlamaModel vs transformers' LlamaForCausalLM on identical random weights (CPU, fp32).

Each case saves a small random HF model with save_pretrained, loads it with neod's loader and
serves several requests through a paged KV pool (block_size 16, blocks handed out from a shuffled
free list, so block tables are non-contiguous) the way the engine does: prompts join the batch at
given steps, so prefills and decodes share batches. The reference runs each request alone in
transformers with its own cache, fed the same tokens; prefill logits, every decode step's logits
and the greedy tokens must match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neod.model.attention import AttentionMetadata
from neod.model.llama import LlamaModel

BLOCK_SIZE = 16
NUM_BLOCKS = 40
NUM_DECODE_STEPS = 24
ATOL = 2e-4  # fp32 logits of O(1..10): only summation order differs
RTOL = 1e-4


@dataclass(frozen=True)
class Case:
    num_kv_heads: int
    tie: bool
    rope_scaling: dict | None
    prompt_lens: tuple[int, ...]
    start_steps: tuple[int, ...]  # the step at which each request's prompt enters the batch
    max_shard_size: str | None = None


CASES = {
    "gqa-untied-batched": Case(2, False, None, (5, 17, 33), (0, 0, 0)),
    "mha-tied-llama3": Case(
        4,
        True,
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        (16, 9, 40),
        (0, 0, 0),
    ),
    "mqa-linear-mixed-sharded": Case(
        1,
        False,
        {"rope_type": "linear", "factor": 2.0},
        (12, 31, 1, 20),
        (0, 3, 3, 7),
        max_shard_size="40KB",
    ),
    "gqa-tied-mixed": Case(2, True, None, (23, 16, 7), (0, 1, 5)),
}


def _save_hf_model(folder: Path, case: Case, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=case.num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=case.rope_scaling,
        tie_word_embeddings=case.tie,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norm weights: away from 1 so that a missing multiply shows
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:  # small when tied, else the LM head repeats the last token
                param.normal_(
                    0.0, 0.5 / math.sqrt(param.shape[1]) if case.tie else 1.0, generator=generator
                )
            else:
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[1]), generator=generator)
    kwargs = {} if case.max_shard_size is None else {"max_shard_size": case.max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return model


def _hf_reference(
    model: LlamaForCausalLM, prompt: list[int], steps: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Prefill logits [len, V], one [V] row per decode step, and the greedy tokens fed back."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        prefill = out.logits[0].float()
        cache = out.past_key_values
        tokens = [int(prefill[-1].argmax())]
        decode = []
        for _ in range(steps):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True
            )
            cache = out.past_key_values
            decode.append(out.logits[0, -1].float())
            tokens.append(int(decode[-1].argmax()))
    return prefill, decode, tokens


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    start_step: int
    tokens: list[int]  # the reference's greedy tokens, fed back as decode inputs
    block_table: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose KV is stored
    prefill_logits: torch.Tensor | None = None
    decode_logits: list[torch.Tensor] = field(default_factory=list)


def _serve(model: LlamaModel, requests: list[_Request], free_blocks: list[int]) -> None:
    """Run batches ordered [prefills | decodes] until every request has NUM_DECODE_STEPS steps."""
    cfg = model.config
    kv_pool = torch.zeros(
        cfg.num_hidden_layers, NUM_BLOCKS, 2, cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim
    )
    step = 0
    while any(len(r.decode_logits) < NUM_DECODE_STEPS for r in requests):
        prefills = [r for r in requests if r.start_step == step]
        decodes = [
            r for r in requests if r.start_step < step and len(r.decode_logits) < NUM_DECODE_STEPS
        ]
        step += 1
        if not prefills and not decodes:
            continue
        input_ids, positions, slot_ids, cu_seqlens = [], [], [], [0]
        rows = []  # (request, row slice)
        for r in prefills + decodes:
            # a decode feeds the reference's token of its step
            new_ids = r.prompt if r in prefills else [r.tokens[len(r.decode_logits)]]
            start = len(input_ids)
            for token in new_ids:
                if r.length % BLOCK_SIZE == 0:
                    r.block_table.append(free_blocks.pop())
                input_ids.append(token)
                positions.append(r.length)
                slot_ids.append(
                    r.block_table[r.length // BLOCK_SIZE] * BLOCK_SIZE + r.length % BLOCK_SIZE
                )
                r.length += 1
            rows.append((r, slice(start, len(input_ids))))
            if r in prefills:
                cu_seqlens.append(len(input_ids))
        max_blocks = max((len(r.block_table) for r in decodes), default=1)
        meta = AttentionMetadata(
            num_prefill_tokens=cu_seqlens[-1],
            cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
            max_seqlen=max((len(r.prompt) for r in prefills), default=0),
            slot_ids=torch.tensor(slot_ids, dtype=torch.int64),
            block_tables=torch.tensor(
                [r.block_table + [-1] * (max_blocks - len(r.block_table)) for r in decodes],
                dtype=torch.int32,
            ).reshape(len(decodes), max_blocks),
            seq_lens=torch.tensor([r.length for r in decodes], dtype=torch.int32),
        )
        # Sample every row, in reverse order, to check that final() selects and orders rows.
        num_tokens = len(input_ids)
        sample_indices = torch.arange(num_tokens - 1, -1, -1)
        logits = model.forward(
            torch.tensor(input_ids), torch.tensor(positions), meta, kv_pool, sample_indices
        ).flip(0)
        assert logits.dtype == torch.float32 and logits.shape == (num_tokens, cfg.vocab_size)
        for r, rows_of_r in rows:
            if r in prefills:
                r.prefill_logits = logits[rows_of_r]
            else:
                r.decode_logits.append(logits[rows_of_r.start])


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_transformers(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    hf_model = _save_hf_model(tmp_path, case)
    if case.max_shard_size is not None:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = LlamaModel.from_pretrained(tmp_path, "cpu", torch.float32)
    assert (model.weights.lm_head is model.weights.embed) == case.tie

    generator = torch.Generator().manual_seed(1)
    requests, references = [], []
    for prompt_len, start_step in zip(case.prompt_lens, case.start_steps, strict=True):
        prompt = torch.randint(0, 320, (prompt_len,), generator=generator).tolist()
        prefill, decode, tokens = _hf_reference(hf_model, prompt, NUM_DECODE_STEPS)
        requests.append(_Request(prompt=prompt, start_step=start_step, tokens=tokens))
        references.append((prefill, decode))
    free_blocks = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    _serve(model, requests, free_blocks)

    for r, (ref_prefill, ref_decode) in zip(requests, references, strict=True):
        steps = zip(r.block_table, r.block_table[1:], strict=False)
        assert any(b != a + 1 for a, b in steps), "block table is contiguous"
        torch.testing.assert_close(r.prefill_logits, ref_prefill, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            torch.stack(r.decode_logits), torch.stack(ref_decode), atol=ATOL, rtol=RTOL
        )
        greedy = [int(r.prefill_logits[-1].argmax())] + [
            int(row.argmax()) for row in r.decode_logits
        ]
        assert greedy == r.tokens[: NUM_DECODE_STEPS + 1]
    # the reference itself is not degenerate, so matching it means something
    assert all(len(set(r.tokens)) > 5 for r in requests)
