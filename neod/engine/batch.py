"""Turns the sequences of one sub-batch into the tensors a forward pass needs.

Rows are ordered `[GPU prefill tokens | CPU prefill tokens | GPU decodes | CPU decodes]`. The GPU
attention metadata covers the first three groups (CPU-bound prefill rows carry slot -1: their KV
goes to the host pool instead); the CPU decode rows are the tail, so their Q/K/V leave the GPU as
one contiguous row range and their attention output comes back the same way. All host-side index
tensors are built once per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neod.engine.sequence import Sequence
from neod.model.attention import AttentionMetadata


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
    sample_indices: torch.Tensor  # [num seqs] int64, model device: last row of each sequence

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def cpu_decode_start(self) -> int:
        return self.num_tokens - self.num_cpu_decodes


def _slots(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    ids = seq.block_ids
    return [ids[t // block_size] * block_size + t % block_size for t in range(start, end)]


def _block_table(seqs: list[Sequence]) -> torch.Tensor:
    width = max((len(s.block_ids) for s in seqs), default=0)
    table = torch.zeros((len(seqs), max(width, 1)), dtype=torch.int32)
    for row, s in enumerate(seqs):
        table[row, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
    return table


def build_sub_batch(
    gpu_prefills: list[Sequence],
    cpu_prefills: list[Sequence],
    gpu_decodes: list[Sequence],
    cpu_decodes: list[Sequence],
    block_size: int,
    device: torch.device,
) -> SubBatch:
    """Block ids must already cover every token computed in this step."""
    input_ids: list[int] = []
    positions: list[int] = []
    gpu_slots: list[int] = []
    cu_seqlens = [0]
    sample_rows: list[int] = []
    cpu_slots: list[int] = []
    for group, on_gpu in ((gpu_prefills, True), (cpu_prefills, False)):
        for s in group:
            n = len(s.token_ids)
            input_ids += s.token_ids
            positions += range(n)
            cu_seqlens.append(cu_seqlens[-1] + n)
            sample_rows.append(cu_seqlens[-1] - 1)
            if on_gpu:
                gpu_slots += _slots(s, 0, n, block_size)
            else:
                gpu_slots += [-1] * n
                cpu_slots += _slots(s, 0, n, block_size)
    num_prefill_tokens = len(input_ids)
    num_gpu_prefill_tokens = sum(len(s.token_ids) for s in gpu_prefills)
    for group, on_gpu in ((gpu_decodes, True), (cpu_decodes, False)):
        for s in group:
            pos = len(s.token_ids) - 1
            input_ids.append(s.token_ids[-1])
            positions.append(pos)
            sample_rows.append(len(input_ids) - 1)
            if on_gpu:
                gpu_slots += _slots(s, pos, pos + 1, block_size)
    num_gpu_rows = num_prefill_tokens + len(gpu_decodes)

    def to_dev(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host

    meta = AttentionMetadata(
        num_prefill_tokens=num_prefill_tokens,
        cu_seqlens=to_dev(cu_seqlens, torch.int32),
        max_seqlen=max(
            (b - a for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False)), default=0
        ),
        slot_ids=to_dev(gpu_slots, torch.int64),
        block_tables=_block_table(gpu_decodes).to(device, non_blocking=True),
        seq_lens=to_dev([len(s.token_ids) for s in gpu_decodes], torch.int32),
    )
    return SubBatch(
        seqs=gpu_prefills + cpu_prefills + gpu_decodes + cpu_decodes,
        input_ids=to_dev(input_ids, torch.int64),
        positions=to_dev(positions, torch.int64),
        gpu_meta=meta,
        num_gpu_rows=num_gpu_rows,
        cpu_prefill_rows=(num_gpu_prefill_tokens, num_prefill_tokens),
        cpu_prefill_slots=torch.tensor(cpu_slots, dtype=torch.int64),
        num_cpu_decodes=len(cpu_decodes),
        cpu_block_tables=_block_table(cpu_decodes),
        cpu_seq_lens=torch.tensor([len(s.token_ids) for s in cpu_decodes], dtype=torch.int32),
        sample_indices=to_dev(sample_rows, torch.int64),
    )
