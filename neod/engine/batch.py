"""Turns the sequences of one sub-batch into the tensors a forward pass needs.

Rows are ordered `[GPU prefill tokens | CPU prefill tokens | GPU decodes | CPU decodes]`. The GPU
attention metadata covers the first three groups (CPU-bound prefill rows carry slot -1: their KV
goes to the host pool instead); the CPU decode rows are the tail, so their Q/K/V leave the GPU as
one contiguous row range and their attention output comes back the same way. A GPU prefill may be a
chunk of its prompt, and so may a CPU-bound one (a prompt only the host pool can hold): its rows are
the chunk's tokens, and its attention also reads the KV of the chunks before, already in the pool
that holds the prompt. All host-side index tensors are built once per iteration,
in two steps: the sequences become `BatchRows` (plain integers), which become tensors; with tensor
parallelism the other ranks receive the rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from neod.engine.sequence import Sequence
from neod.model.attention import AttentionMetadata, PrefillContext


@dataclass
class BatchRows:
    """One sub-batch's host-side contents as plain integers: everything its tensors are made from.

    Built from the sequences on the rank that schedules; the other tensor-parallel ranks receive it
    and make the same `SubBatch` on their own device without knowing any sequence.
    """

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    cu_seqlens: list[int]  # [P+1] over all prefills, GPU then CPU
    prefill_starts: list[int]  # [P] tokens of each prefill's prompt computed before (its prefix)
    # Slots of those prefixes' tokens, prefill after prefill: in the GPU pool for the first
    # num_gpu_prefills prefills, in the host pool for the rest.
    prefix_slots: list[int]
    num_gpu_prefills: int
    gpu_slots: list[int]  # [num_gpu_rows]; -1 on CPU-bound prefill rows
    gpu_block_tables: list[list[int]]  # block ids of each GPU decode
    cpu_prefill_slots: list[int]  # host-pool slots of the CPU-bound prefill rows
    num_gpu_prefill_tokens: int
    cpu_block_tables: list[list[int]]  # block ids of each CPU decode
    sample_rows: list[int]  # last row of each sequence that samples this step


@dataclass
class SubBatch:
    seqs: list[Sequence]  # row order: GPU prefills, CPU prefills, GPU decodes, CPU decodes
    input_ids: torch.Tensor  # [T] int64, model device
    positions: torch.Tensor  # [T] int64, model device
    gpu_meta: AttentionMetadata  # rows [0, num_gpu_rows)
    num_gpu_rows: int
    cpu_prefill_rows: tuple[int, int]  # [start, end) rows whose KV goes to the host pool
    cpu_prefill_slots: torch.Tensor  # [n] int64, host: slots in the host pool
    num_cpu_decodes: int  # the last rows of the batch
    cpu_block_tables: torch.Tensor  # [Bc, max_blocks] int32, host
    cpu_seq_lens: torch.Tensor  # [Bc] int32, host; includes the token computed now
    sample_indices: torch.Tensor  # [S] int64, model device: last row of each sampling sequence
    rows: BatchRows  # what the tensors were made from (sent to the other tensor-parallel ranks)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def cpu_decode_start(self) -> int:
        return self.num_tokens - self.num_cpu_decodes


def _slots(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    ids = seq.block_ids
    return [ids[t // block_size] * block_size + t % block_size for t in range(start, end)]


def _block_table(block_ids: list[list[int]]) -> torch.Tensor:
    """[rows, widest] int32, zero-padded. Filled through numpy: a torch op per row cost the
    engine 0.4-0.5 ms per iteration at 3 GPU + ~12 CPU decodes (docs/perf.md)."""
    width = max((len(ids) for ids in block_ids), default=0)
    table = np.zeros((len(block_ids), max(width, 1)), dtype=np.int32)
    for row, ids in enumerate(block_ids):
        table[row, : len(ids)] = ids
    return torch.from_numpy(table)


def batch_rows(
    gpu_prefills: list[Sequence],
    cpu_prefills: list[Sequence],
    gpu_decodes: list[Sequence],
    cpu_decodes: list[Sequence],
    block_size: int,
) -> BatchRows:
    """Block ids must already cover every token computed in this step."""
    input_ids: list[int] = []
    positions: list[int] = []
    gpu_slots: list[int] = []
    cu_seqlens = [0]
    starts: list[int] = []
    prefix_slots: list[int] = []
    sample_rows: list[int] = []
    cpu_slots: list[int] = []
    for group, on_gpu in ((gpu_prefills, True), (cpu_prefills, False)):
        for s in group:
            start = s.num_computed_tokens
            end = start + s.step_tokens
            input_ids += s.token_ids[start:end]
            positions += range(start, end)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            starts.append(start)
            prefix_slots += _slots(s, 0, start, block_size)
            if s.samples:
                sample_rows.append(cu_seqlens[-1] - 1)
            if on_gpu:
                gpu_slots += _slots(s, start, end, block_size)
            else:
                gpu_slots += [-1] * (end - start)
                cpu_slots += _slots(s, start, end, block_size)
    for group, on_gpu in ((gpu_decodes, True), (cpu_decodes, False)):
        for s in group:
            pos = len(s.token_ids) - 1
            input_ids.append(s.token_ids[-1])
            positions.append(pos)
            sample_rows.append(len(input_ids) - 1)
            if on_gpu:
                gpu_slots += _slots(s, pos, pos + 1, block_size)
    return BatchRows(
        input_ids=input_ids,
        positions=positions,
        cu_seqlens=cu_seqlens,
        prefill_starts=starts,
        prefix_slots=prefix_slots,
        gpu_slots=gpu_slots,
        gpu_block_tables=[list(s.block_ids) for s in gpu_decodes],
        cpu_prefill_slots=cpu_slots,
        num_gpu_prefills=len(gpu_prefills),
        num_gpu_prefill_tokens=sum(s.step_tokens for s in gpu_prefills),
        cpu_block_tables=[list(s.block_ids) for s in cpu_decodes],
        sample_rows=sample_rows,
    )


def _prefill_context(
    rows: BatchRows, to_dev: Callable[[list[int], torch.dtype], torch.Tensor]
) -> PrefillContext | None:
    """The packed keys' layout when a prefill continues a prompt (None: keys are the rows)."""
    if not any(rows.prefill_starts):
        return None
    cu, new_rows = [0], []
    pool_slots: tuple[list[int], list[int]] = ([], [])  # GPU pool, host pool; per packed row
    prefix = iter(rows.prefix_slots)
    for p, start in enumerate(rows.prefill_starts):
        n = rows.cu_seqlens[p + 1] - rows.cu_seqlens[p]
        new_rows += range(cu[-1] + start, cu[-1] + start + n)
        cu.append(cu[-1] + start + n)
        home, other = pool_slots if p < rows.num_gpu_prefills else pool_slots[::-1]
        home += itertools.islice(prefix, start)
        home += [-1] * n
        other += [-1] * (start + n)

    def slots_on_dev(slots: list[int]) -> torch.Tensor | None:
        return to_dev(slots, torch.int64) if any(s >= 0 for s in slots) else None

    return PrefillContext(
        cu_seqlens=to_dev(cu, torch.int32),
        max_seqlen=max(b - a for a, b in itertools.pairwise(cu)),
        num_keys=cu[-1],
        new_rows=to_dev(new_rows, torch.int64),
        gpu_slots=slots_on_dev(pool_slots[0]),
        host_slots=slots_on_dev(pool_slots[1]),
    )


def sub_batch_from_rows(rows: BatchRows, seqs: list[Sequence], device: torch.device) -> SubBatch:
    """The sub-batch's tensors on `device`; `seqs` in row order (empty on a rank that only
    follows)."""

    def to_dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host

    cu_seqlens = rows.cu_seqlens
    num_prefill_tokens = cu_seqlens[-1]
    # A decode's sequence length (its new token included) is its position + 1.
    decode_lens = [p + 1 for p in rows.positions[num_prefill_tokens:]]
    num_gpu_decodes = len(rows.gpu_block_tables)
    meta = AttentionMetadata(
        num_prefill_tokens=num_prefill_tokens,
        cu_seqlens=to_dev(cu_seqlens, torch.int32),
        max_seqlen=max(
            (b - a for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False)), default=0
        ),
        slot_ids=to_dev(rows.gpu_slots, torch.int64),
        block_tables=_block_table(rows.gpu_block_tables).to(device, non_blocking=True),
        seq_lens=to_dev(decode_lens[:num_gpu_decodes], torch.int32),
        context=_prefill_context(rows, to_dev),
    )
    return SubBatch(
        seqs=seqs,
        input_ids=to_dev(rows.input_ids, torch.int64),
        positions=to_dev(rows.positions, torch.int64),
        gpu_meta=meta,
        num_gpu_rows=len(rows.gpu_slots),
        cpu_prefill_rows=(rows.num_gpu_prefill_tokens, num_prefill_tokens),
        cpu_prefill_slots=torch.tensor(rows.cpu_prefill_slots, dtype=torch.int64),
        num_cpu_decodes=len(rows.cpu_block_tables),
        cpu_block_tables=_block_table(rows.cpu_block_tables),
        cpu_seq_lens=torch.tensor(decode_lens[num_gpu_decodes:], dtype=torch.int32),
        sample_indices=to_dev(rows.sample_rows, torch.int64),
        rows=rows,
    )


def build_sub_batch(
    gpu_prefills: list[Sequence],
    cpu_prefills: list[Sequence],
    gpu_decodes: list[Sequence],
    cpu_decodes: list[Sequence],
    block_size: int,
    device: torch.device,
) -> SubBatch:
    """The sub-batch of these sequences on `device` (see `batch_rows`)."""
    rows = batch_rows(gpu_prefills, cpu_prefills, gpu_decodes, cpu_decodes, block_size)
    seqs = gpu_prefills + cpu_prefills + gpu_decodes + cpu_decodes
    return sub_batch_from_rows(rows, seqs, device)
