"""Logging set-up for the entry points (library modules only ever call logging.getLogger).

Messages are written as `event=name key=value ...`; `text` prints them on one line after the level
and logger, `json` wraps each in one JSON object per line for log shippers. Under systemd
(JOURNAL_STREAM set) the text format leaves the timestamp to the journal.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj).decode()


def setup_logging(level: str, fmt: str, journal: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = "" if journal else "%(asctime)s "
        handler.setFormatter(logging.Formatter(prefix + "%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
