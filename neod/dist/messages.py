"""What rank 0 tells the other tensor-parallel ranks, in one place, and how it travels.

Rank 0 schedules; the other ranks only repeat its work on their shard. Before each forward pass
rank 0 sends one `Step`: the block swaps it issued since the previous forward, in order, and the
sub-batches' rows (neod.engine.batch.BatchRows), from which every rank builds the same `SubBatch`
on its own device. `Stop` ends a follower. A message is one orjson object with a `type` tag,
broadcast on the gloo group as its length, then its bytes; decoding rebuilds the dataclasses, so a
missing or unknown field fails loudly. Nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import orjson
import torch
import torch.distributed as dist

from neod.engine.batch import BatchRows


@dataclass
class Swap:
    to_host: bool  # True: GPU pool -> host pool (swap-out); False: host -> GPU (swap-in)
    pairs: list[list[int]]  # [n, 2]: (source block id, destination block id)


@dataclass
class Step:
    swaps: list[Swap]  # issued by rank 0 since the previous Step, in order; done before the forward
    batches: list[BatchRows]  # one sub-batch (sequential) or two (pipelined)


@dataclass
class Stop:
    """Rank 0 is closing: leave the loop, release the runtime, exit with status 0."""


Message = Step | Stop
_TYPES: dict[str, type] = {"step": Step, "stop": Stop}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(msg: Message) -> bytes:
    return orjson.dumps({"type": _NAMES[type(msg)], **asdict(msg)})


def decode(data: bytes) -> Message:
    fields = orjson.loads(data)
    kind = _TYPES.get(fields.pop("type", None))
    if kind is None:
        raise ValueError(f"unknown tensor-parallel message: {bytes(data[:80])!r}")
    if kind is Step:
        return Step(
            swaps=[Swap(**s) for s in fields.pop("swaps")],
            batches=[BatchRows(**b) for b in fields.pop("batches")],
            **fields,
        )
    return kind(**fields)


def send(msg: Message, group: dist.ProcessGroup) -> None:
    """On rank 0: broadcast one message to every rank of `group`."""
    data = encode(msg)
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), src=0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=group)


def receive(group: dist.ProcessGroup) -> Message:
    """On another rank: wait for rank 0's next message (as long as the group's timeout)."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return decode(data.numpy().tobytes())
