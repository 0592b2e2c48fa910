"""The engine: request state, batch preparation, the sequential and pipelined forward, sampling."""

from neod.engine.engine import Engine
from neod.engine.request import FinishReason, RequestOutput, SamplingParams

__all__ = ["Engine", "FinishReason", "RequestOutput", "SamplingParams"]
