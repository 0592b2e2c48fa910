"""Test-suite wide markers (`gpu` tests skip without CUDA; `slow` tests run only with `-m slow`)
and the CPU attention's score loops."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where there is none")
    config.addinivalue_line(
        "markers", "slow: long-running; deselected by default (pyproject addopts), run with -m slow"
    )


@pytest.fixture(scope="module", params=["amx", "fp32"])
def score_loop(request: pytest.FixtureRequest):
    """Each CPU attention module once per score loop: AMX tiles (bf16 KV, where the host has AMX)
    and the ISPC kernel's fp32 FMAs; the process-wide switch is restored afterwards."""
    from neod.kernels.cpu_attention import amx_in_use, use_amx

    before = amx_in_use()
    amx = request.param == "amx"
    if use_amx(amx) != amx:
        pytest.skip("no AMX on this host")
    yield request.param
    use_amx(before)


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
