"""Native CPU extension: the pinned thread pool and the ISPC paged decode-attention kernel.

The extension is optional at import time so that pure-Python parts of neod (and hosts that only
read this package) work without it; `load_native()` is the one place that says how to build it.
"""

from __future__ import annotations

from types import ModuleType


def load_native() -> ModuleType:
    """The compiled `neod.cython._native` module, or an ImportError that says how to build it."""
    try:
        from neod.cython import _native
    except ImportError as exc:
        raise ImportError(
            "neod's native CPU extension (neod.cython._native) is not built: run `make setup`, or "
            "`python setup.py build_ext --inplace` with ispc on PATH (scripts/install_ispc.sh) or "
            "NEOD_ISPC_OBJECTS pointing at prebuilt ISPC objects; see docs/build.md"
        ) from exc
    return _native
