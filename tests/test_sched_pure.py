"""The scheduler is pure: importing it pulls in no torch, numpy, sockets, event loop or engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FORBIDDEN = (
    "torch",
    "numpy",
    "zmq",
    "socket",
    "asyncio",
    "neod.engine",
    "neod.kernels",
    "neod.cache",
)


def test_sched_imports_nothing_impure():
    code = (
        "import sys, neod.sched, neod.sched.advisor, neod.sched.profile; "
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == ""
