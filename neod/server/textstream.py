"""A request's output text: detokenization plus stop strings, safe to stream.

Text that could still turn out to be the start of a stop string is held back (at most the longest
stop string minus one character), so the producer never receives text that a later stop match
would have cut. The engine knows nothing of stop strings: on a match the server aborts the request
and reports finish reason `stop` with the matched string.
"""

from __future__ import annotations

from neod.tokenizer import Detokenizer


class OutputText:
    def __init__(self, detokenizer: Detokenizer, stop: tuple[str, ...]) -> None:
        self._detok = detokenizer
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._pending = ""
        self.stopped_by: str | None = None

    def feed(self, token_ids: list[int]) -> str:
        """Text that may be sent now; after a stop match `stopped_by` is set and nothing follows."""
        if self.stopped_by is not None:
            return ""
        self._pending += self._detok.step(token_ids)
        if not self._stop:
            text, self._pending = self._pending, ""
            return text
        cut = -1
        for s in self._stop:
            at = self._pending.find(s)
            if at >= 0 and (cut < 0 or at < cut):
                cut, self.stopped_by = at, s
        if cut >= 0:
            text, self._pending = self._pending[:cut], ""
            return text
        keep = min(self._hold, len(self._pending))
        text = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(text):]
        return text

    def finish(self) -> str:
        """Whatever is held back or undecoded once the request has ended without a stop match."""
        if self.stopped_by is not None:
            return ""
        self._pending += self._detok.finish()
        text, self._pending = self._pending, ""
        for s in self._stop:  # the flushed tail may complete a stop string
            at = text.find(s)
            if at >= 0:
                text, self.stopped_by = text[:at], s
        return text
