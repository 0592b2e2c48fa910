"""The profile store: JSON round trip, a key that must match exactly, damaged or foreign files."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from neod.sched import (
    Profile,
    Table1D,
    Table2D,
    TableCostModel,
    describe_cpu_paced,
    load_profile,
    profile_key,
    profile_path,
    save_profile,
)

SHAPE = {
    "num_layers": 32,
    "hidden_size": 4096,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


def make_key(**changes):
    fields = {
        "model": SHAPE,
        "dtype": "bfloat16",
        "tp": 1,
        "gpu": "NVIDIA H100 80GB HBM3",
        "cpu": "Intel Xeon",
        "pool_threads": 12,
        "kernel_version": "1",
        "block_size": 16,
    }
    fields.update(changes)
    return profile_key(**fields)


def make_profile(key=None, with_cpu=True) -> Profile:
    # Shaped like the profiler's output: {x: seconds} and {(seqs, ctx): seconds}.
    decode = {(b, n): 1e-6 * b + 1e-9 * n for b in (1, 4, 16) for n in (16 * b, 256 * b, 4096 * b)}
    return Profile(
        key=key or make_key(),
        linear=Table1D.from_points({1: 40e-6, 64: 42e-6, 512: 60e-6, 4096: 300e-6}),
        prefill_attn=Table1D.from_points({16: 5e-6, 256: 20e-6, 4096: 900e-6}),
        gpu_decode_attn=Table2D.from_points(decode),
        cpu_decode_attn=Table2D.from_points({k: 40 * v for k, v in decode.items()})
        if with_cpu
        else None,
        transfer=Table1D.from_points({1: 8e-6, 256: 40e-6}),
        swap=Table1D.from_points({1: 3e-6, 1024: 600e-6}),
        iteration_overhead=Table1D.from_points({1: 200e-6, 256: 900e-6}),
        cpu_tile_path="scores" if with_cpu else None,
        meta={"profiled_s": 73.5, "tool": "test"},
    )


def test_round_trip_keeps_every_prediction(tmp_path):
    profile = make_profile()
    path = profile_path(tmp_path, profile.key)
    save_profile(profile, path)
    loaded = load_profile(path, make_key())
    assert loaded == profile
    before, after = TableCostModel(profile), TableCostModel(loaded)
    for args in ((3, 5000), (17, 100000), (1, 16)):
        assert after.cpu_decode_attn_s(*args) == before.cpu_decode_attn_s(*args)
        assert after.gpu_decode_attn_s(*args) == before.gpu_decode_attn_s(*args)
    assert after.linear_s(777) == before.linear_s(777) and after.swap_s(5000) == before.swap_s(5000)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    profile = make_profile()
    path = profile_path(tmp_path, profile.key)
    save_profile(profile, path)
    old = path.read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("neod.sched.profile.os.replace", full_disk)
    with pytest.raises(OSError):
        save_profile(dataclasses.replace(profile, pipeline_handoff=1e-4), path)
    assert path.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_pipeline_hand_off_round_trips_and_a_profile_from_before_it_has_none(tmp_path):
    profile = dataclasses.replace(make_profile(), pipeline_handoff=83e-6)
    path = tmp_path / "p.json"
    save_profile(profile, path)
    loaded = load_profile(path, profile.key)
    assert loaded.pipeline_handoff == 83e-6
    assert TableCostModel(loaded).pipeline_handoff_s() == 83e-6
    data = json.loads(path.read_text())
    del data["pipeline_handoff"]  # written before the hand-off was profiled: timed at next start
    path.write_text(json.dumps(data))
    older = load_profile(path, profile.key)
    assert older.pipeline_handoff is None and TableCostModel(older).pipeline_handoff_s() == 0.0
    data["pipeline_handoff"] = "slow"
    path.write_text(json.dumps(data))
    assert load_profile(path, profile.key) is None  # malformed: measured again
    # Timed for an earlier form of the cost model (on the round trips alone): timed again.
    data["pipeline_handoff"] = 154e-6
    del data["pipeline_handoff_form"]
    path.write_text(json.dumps(data))
    assert load_profile(path, profile.key).pipeline_handoff is None


def test_the_paced_cpu_program_round_trips_and_prices_every_cpu_run(tmp_path):
    profile = dataclasses.replace(make_profile(), pipeline_handoff=83e-6, cpu_paced=(0.8, 55e-6))
    path = tmp_path / "p.json"
    save_profile(profile, path)
    loaded = load_profile(path, profile.key)
    assert loaded.cpu_paced == (0.8, 55e-6)
    table = profile.cpu_decode_attn(3, 3000)
    assert TableCostModel(loaded).cpu_decode_attn_s(3, 3000) == pytest.approx(0.8 * table + 55e-6)
    assert TableCostModel(loaded).cpu_decode_attn_s(0, 0) == 0.0  # no run, no fixed cost
    # Unpaced (not timed yet): the table's own time.
    unpaced = TableCostModel(dataclasses.replace(loaded, cpu_paced=None))
    assert unpaced.cpu_decode_attn_s(3, 3000) == pytest.approx(table)
    data = json.loads(path.read_text())
    for malformed in ([0.8], "fast", 3):  # measured again
        path.write_text(json.dumps({**data, "cpu_paced": malformed}))
        assert load_profile(path, profile.key) is None
    # Timed under the previous form (the hand-off over unpaced tables): both timed again.
    data["pipeline_handoff_form"] -= 1
    path.write_text(json.dumps(data))
    older = load_profile(path, profile.key)
    assert older.pipeline_handoff is None and older.cpu_paced is None


def test_profile_without_host_pool_round_trips(tmp_path):
    profile = make_profile(with_cpu=False)
    save_profile(profile, tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json", profile.key)
    assert loaded == profile
    model = TableCostModel(loaded)
    assert model.cpu_decode_attn_s(0, 0) == 0.0
    with pytest.raises(LookupError, match="host KV pool"):
        model.cpu_decode_attn_s(2, 100)


@pytest.mark.parametrize(
    "change",
    [
        {"model": {**SHAPE, "num_layers": 80}},
        {"dtype": "float16"},
        {"tp": 2},
        {"gpu": "NVIDIA H200"},
        {"cpu": "AMD EPYC"},
        {"pool_threads": 15},
        {"kernel_version": "2"},
        {"block_size": 32},
    ],
)
def test_any_difference_in_the_key_refuses_the_profile(tmp_path, change, caplog):
    path = tmp_path / "p.json"
    save_profile(make_profile(), path)
    with caplog.at_level(logging.INFO, logger="neod.sched.profile"):
        assert load_profile(path, make_key(**change)) is None
    assert next(iter(change)) in caplog.text
    assert profile_path(tmp_path, make_key(**change)) != profile_path(tmp_path, make_key())


def test_key_does_not_depend_on_mapping_order():
    assert (
        make_key(model=dict(reversed(list(SHAPE.items())))).fingerprint()
        == make_key().fingerprint()
    )


def test_missing_damaged_and_foreign_files_are_not_reused(tmp_path):
    key = make_key()
    assert load_profile(tmp_path / "absent.json", key) is None
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"format": 1, "key": ')
    assert load_profile(damaged, key) is None
    data = make_profile().to_json()
    for name, mutate in (
        ("old.json", lambda d: d.update(format=0)),
        ("forged.json", lambda d: d.update(fingerprint="0" * 64)),
        ("broken.json", lambda d: d["tables"]["linear"].update(x=[4, 2, 1, 3])),
        ("short.json", lambda d: d["tables"].pop("swap")),
    ):
        bad = json.loads(json.dumps(data))
        mutate(bad)
        (tmp_path / name).write_text(json.dumps(bad))
        assert load_profile(tmp_path / name, key) is None, name


def test_tables_reject_bad_grids():
    with pytest.raises(ValueError):
        Table1D((1, 2, 2), (0.1, 0.2, 0.3))
    with pytest.raises(ValueError):
        Table1D((1, 2), (0.1,))
    with pytest.raises(ValueError):
        Table1D((), ())
    with pytest.raises(ValueError):
        Table1D((0, 1), (0.0, 1.0))
    with pytest.raises(ValueError):
        Table1D((1, 2), (0.1, float("nan")))
    with pytest.raises(ValueError):
        Table1D((1, 2), (-0.1, 0.2))
    with pytest.raises(ValueError):
        Table2D((2, 1), (Table1D((1,), (1.0,)), Table1D((1,), (1.0,))))


def test_profile_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_profile().linear = None


def test_the_paced_program_is_described_for_operators():
    assert describe_cpu_paced((0.83, 64.4e-6)) == (
        "the CPU program as pipelined iterations pace it runs 0.83x its table + 64 us per "
        "sub-batch layer"
    )
    assert describe_cpu_paced(None).endswith("not timed yet")
