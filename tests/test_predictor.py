"""Interpolation and extrapolation of the measured tables, and the cost model built on them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neod.sched import Profile, Table1D, Table2D, TableCostModel, profile_key


def make_profile() -> Profile:
    decode = {(b, n): 1e-6 * b + 1e-9 * n for b in (1, 4, 16) for n in (16 * b, 256 * b, 4096 * b)}
    return Profile(
        key=profile_key({"num_layers": 2}, "bfloat16", 1, "gpu", "cpu", 4, "1", 16),
        linear=Table1D.from_points({1: 40e-6, 64: 42e-6, 512: 60e-6, 4096: 300e-6}),
        prefill_attn=Table1D.from_points({16: 5e-6, 256: 20e-6, 4096: 900e-6}),
        gpu_decode_attn=Table2D.from_points(decode),
        cpu_decode_attn=Table2D.from_points({k: 40 * v for k, v in decode.items()}),
        transfer=Table1D.from_points({1: 8e-6, 256: 40e-6}),
        swap=Table1D.from_points({1: 3e-6, 1024: 600e-6}),
        iteration_overhead=Table1D.from_points({1: 200e-6, 256: 900e-6}),
    )


def test_1d_interpolates_clamps_below_and_extrapolates_above():
    t = Table1D((2, 4, 8), (1.0, 3.0, 4.0))
    assert [t(x) for x in (2, 3, 4, 6, 8)] == pytest.approx([1.0, 2.0, 3.0, 3.5, 4.0])
    assert t(1) == 1.0  # below the grid: the smallest measured cost
    assert t(16) == pytest.approx(6.0)  # beyond: the last slope continues
    assert t(0) == 0.0 and t(-5) == 0.0  # no work, no cost
    assert t(1e12) > 0 and math.isfinite(t(1e12))


def test_1d_never_extrapolates_downwards():
    noisy = Table1D((1, 2, 3), (1.0, 2.0, 1.5))
    assert noisy(100) == pytest.approx(1.5)


def test_single_point_table_is_constant():
    t = Table1D((10,), (2.0,))
    assert t(1) == t(10) == t(1000) == 2.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 10_000), min_size=2, max_size=12, unique=True),
    st.floats(0.0, 1e-3),
    st.floats(0.0, 1e-6),
    st.floats(0, 20_000),
)
def test_1d_reproduces_linear_costs_inside_and_beyond(xs, base, slope, x):
    xs = sorted(xs)
    t = Table1D(tuple(xs), tuple(base + slope * v for v in xs))
    expected = base + slope * max(x, xs[0])
    assert t(x) == pytest.approx(expected if x > 0 else 0.0, rel=1e-9, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=10),
    st.floats(0.5, 500.0),
    st.floats(0.5, 500.0),
)
def test_1d_interpolation_of_a_monotone_table_is_monotone(increments, a, b):
    ys = [sum(increments[: i + 1]) for i in range(len(increments))]
    t = Table1D(tuple(float(2**i) for i in range(len(ys))), tuple(ys))
    lo, hi = min(a, b), max(a, b)
    assert t(lo) <= t(hi) + 1e-12


def test_2d_is_bilinear_over_ragged_rows_and_extrapolates():
    plane = {
        (b, n): 1.0 + 2.0 * b + 0.01 * n for b in (1, 4, 16) for n in (16 * b, 64 * b, 1024 * b)
    }
    t = Table2D.from_points(plane)
    for b, n in ((2, 100), (8, 3000), (10, 10_000), (16, 16384), (1, 16)):
        assert t(b, n) == pytest.approx(1.0 + 2.0 * b + 0.01 * n)
    assert t(32, 50_000) == pytest.approx(1.0 + 2.0 * 32 + 0.01 * 50_000)  # beyond both axes
    assert t(0, 100) == 0.0 and t(3, 0) == 0.0


def test_table_cost_model_reads_each_table():
    profile = make_profile()
    model = TableCostModel(profile)
    assert model.linear_s(64) == pytest.approx(42e-6)
    assert model.transfer_s(256) == pytest.approx(40e-6)
    assert model.swap_s(1) == pytest.approx(3e-6)
    assert model.iteration_overhead_s(1) == pytest.approx(200e-6)
    assert model.gpu_decode_attn_s(4, 1024) == pytest.approx(profile.gpu_decode_attn(4, 1024))
    assert model.cpu_decode_attn_s(4, 1024) == pytest.approx(40 * model.gpu_decode_attn_s(4, 1024))
    for zero in (
        model.linear_s(0),
        model.prefill_attn_s([]),
        model.gpu_decode_attn_s(0, 0),
        model.cpu_decode_attn_s(0, 0),
        model.transfer_s(0),
        model.swap_s(0),
        model.iteration_overhead_s(0),
    ):
        assert zero == 0.0


def test_batched_prefill_is_priced_as_one_prompt_of_equal_work():
    model = TableCostModel(make_profile())
    assert model.prefill_attn_s([256]) == pytest.approx(20e-6)
    # Sixteen 64-token prompts do the causal work of one 256-token prompt (not 16 launches).
    assert model.prefill_attn_s([64] * 16) == pytest.approx(model.prefill_attn_s([256]))
    assert model.prefill_attn_s([3000, 3000]) > model.prefill_attn_s([3000])


@settings(max_examples=200, deadline=None)
@given(
    seqs=st.integers(min_value=0, max_value=300),
    ctx=st.integers(min_value=0, max_value=1 << 20),
    tokens=st.integers(min_value=0, max_value=9000),
)
def test_remembered_lookups_are_the_tables_values(seqs, ctx, tokens):
    """The cost model remembers its lookups (a pass repeats them): asked twice, or first, it
    answers exactly what the profile's tables say."""
    profile = make_profile()
    model = TableCostModel(profile)
    for _ in range(2):
        assert model.linear_s(tokens) == profile.linear(tokens)
        assert model.transfer_s(seqs) == profile.transfer(seqs)
        assert model.swap_s(tokens) == profile.swap(tokens)
        assert model.iteration_overhead_s(seqs) == profile.iteration_overhead(seqs)
        assert model.gpu_decode_attn_s(seqs, ctx) == profile.gpu_decode_attn(seqs, ctx)
        assert model.cpu_decode_attn_s(seqs, ctx) == profile.cpu_decode_attn(seqs, ctx)
        batched = math.sqrt(tokens * tokens + 7 * 7)  # two prompts as one doing their work
        assert model.prefill_attn_s([tokens, 7]) == profile.prefill_attn(batched)
