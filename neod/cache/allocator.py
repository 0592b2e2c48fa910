"""Exact block accounting for one KV pool.

Blocks are plain integers. The allocator keeps a free stack plus an ownership bitmap, so a double
free or a free of a block that was never handed out raises at once instead of silently corrupting
another request's KV. Allocation hands out the lowest ids first after a fresh start, which keeps
early requests contiguous and makes swaps merge into long runs.
"""

from __future__ import annotations


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(
            range(num_blocks - 1, -1, -1)
        )  # pop() yields the lowest id first
        self._in_use = bytearray(num_blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise MemoryError(f"KV pool exhausted: {n} blocks asked, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        for b in ids:
            self._in_use[b] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        for b in ids:
            if not 0 <= b < self.num_blocks or not self._in_use[b]:
                raise ValueError(f"block {b} freed but not allocated")
            self._in_use[b] = 0
        self._free.extend(reversed(ids))
