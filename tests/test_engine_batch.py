"""Batch building: the block tables the attention kernels read, one row per decode, zero-padded
to the longest."""

from __future__ import annotations

import torch

from neod.engine import SamplingParams
from neod.engine.batch import build_sub_batch
from neod.engine.sequence import Sequence


def _decoding(seq_id: int, num_tokens: int, block_ids: list[int], block_size: int) -> Sequence:
    """A sequence of num_tokens tokens whose KV is computed but for its last token."""
    seq = Sequence(seq_id, f"r{seq_id}", list(range(num_tokens)), SamplingParams(max_tokens=8),
                   4096, None)  # fmt: skip
    seq.num_computed_tokens = num_tokens - 1
    seq.block_ids = block_ids
    assert len(block_ids) * block_size >= num_tokens
    return seq


def test_decode_block_tables_are_each_sequences_blocks_zero_padded():
    bs = 4
    gpu = [_decoding(1, 9, [7, 3, 11], bs), _decoding(2, 2, [5], bs)]
    cpu = [_decoding(3, 13, [40, 41, 2, 9], bs), _decoding(4, 5, [8, 6], bs),
           _decoding(5, 1, [30], bs)]  # fmt: skip
    batch = build_sub_batch([], [], gpu, cpu, bs, torch.device("cpu"))
    gpu_tables = batch.gpu_meta.block_tables
    assert gpu_tables.dtype == torch.int32 and gpu_tables.is_contiguous()
    assert gpu_tables.tolist() == [[7, 3, 11], [5, 0, 0]]
    assert batch.cpu_block_tables.dtype == torch.int32 and batch.cpu_block_tables.is_contiguous()
    assert batch.cpu_block_tables.tolist() == [[40, 41, 2, 9], [8, 6, 0, 0], [30, 0, 0, 0]]
    assert batch.cpu_seq_lens.tolist() == [13, 5, 1]
    # The tables are the batch's own: later block allocations do not reach them.
    cpu[0].block_ids.append(99)
    gpu[1].block_ids[0] = 98
    assert batch.cpu_block_tables[0].tolist() == [40, 41, 2, 9]
    assert gpu_tables[1, 0] == 5


def test_a_sub_batch_without_decodes_has_one_column_of_table():
    bs = 4
    prompt = Sequence(1, "r1", list(range(6)), SamplingParams(max_tokens=8), 4096, None)
    prompt.block_ids = [3, 4]
    batch = build_sub_batch([prompt], [], [], [], bs, torch.device("cpu"))
    assert tuple(batch.gpu_meta.block_tables.shape) == (0, 1)
    assert tuple(batch.cpu_block_tables.shape) == (0, 1)
