"""Test-suite wide markers (`gpu` tests skip without CUDA; `slow` tests run only with `-m slow`)
and the paths of the CPU attention's tile products."""

from __future__ import annotations

import os

import pytest

_PROCESS_CPUS = os.sched_getaffinity(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")
    config.addinivalue_line(
        "markers", "slow: long-running; deselected by default (pyproject addopts), run with -m slow"
    )


@pytest.fixture(scope="module", params=["amx", "fp32"])
def tile_products(request: pytest.FixtureRequest):
    """Each CPU attention module once per path of the tile products: AMX tiles for bf16 KV
    (software tiles where the host has no AMX, so that every host tests the AMX operand layouts)
    and the ISPC kernel's fp32 FMAs; the process-wide switch is restored afterwards."""
    from neod.kernels.cpu_attention import amx_in_use, use_amx

    before = amx_in_use()
    if request.param == "amx":
        use_amx(True) or use_amx(True, soft=True)
    else:
        use_amx(False)
    yield request.param
    use_amx(before is not None, values=before == "scores+values")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unconfined_main_thread():
    """An engine left open keeps the test process off its CPU pool's cores (cpu.isolate_pool):
    the next test starts from the whole machine again, as a fresh process would."""
    yield
    if os.sched_getaffinity(0) != _PROCESS_CPUS:
        os.sched_setaffinity(0, _PROCESS_CPUS)
