"""Host topology from (fake and real) sysfs, pool core choice, bandwidth probe cache and sizing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neod.cpu import bandwidth
from neod.cpu.bandwidth import BandwidthProbe, cached_probe, default_thread_counts
from neod.cpu.topology import (
    format_cpu_list,
    parse_cpu_list,
    pci_numa_node,
    pool_cores,
    read_topology,
)


def fake_sysfs(root: Path, cpus: dict[int, tuple[int, int]], nodes: dict[int, str]) -> Path:
    """cpus: cpu -> (package, core id); nodes: node -> cpulist."""
    cpu_root = root / "sys/devices/system/cpu"
    cpu_root.mkdir(parents=True)
    (cpu_root / "online").write_text(",".join(map(str, sorted(cpus))) + "\n")
    for cpu, (package, core) in cpus.items():
        topo = cpu_root / f"cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
        for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"),
                                                     (2, "Unified", "2048K"),
                                                     (3, "Unified", "105M")]):
            cache = cpu_root / f"cpu{cpu}/cache/index{index}"
            cache.mkdir(parents=True)
            (cache / "level").write_text(f"{level}\n")
            (cache / "type").write_text(f"{kind}\n")
            (cache / "size").write_text(f"{size}\n")
    for node, cpulist in nodes.items():
        node_dir = root / f"sys/devices/system/node/node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(cpulist + "\n")
    proc = root / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test Xeon 9000\n")
    return root


@pytest.fixture
def two_socket_smt(tmp_path: Path) -> Path:
    # 2 packages x 4 cores x 2 threads; CPU n and n + 8 are siblings (the usual Linux numbering).
    cpus = {cpu: (cpu % 8 // 4, cpu % 4) for cpu in range(16)}
    return fake_sysfs(tmp_path, cpus, {0: "0-3,8-11", 1: "4-7,12-15"})


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("5") == (5,)
    assert parse_cpu_list("") == ()


def test_format_cpu_list_is_what_parse_reads():
    assert format_cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert format_cpu_list([5]) == "5" and format_cpu_list([]) == ""
    for cpus in [(1, 3, 5), (0, 1), tuple(range(64))]:
        assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_fake_two_socket_host(two_socket_smt: Path):
    topo = read_topology(two_socket_smt / "sys", two_socket_smt / "proc", allowed=set(range(16)))
    assert topo.model_name == "Test Xeon 9000"
    assert topo.num_physical_cores == 8
    assert topo.has_smt
    assert topo.cores[0] == (0, 8)
    assert topo.primary_cpus() == list(range(8))
    assert topo.numa_nodes == {0: (0, 1, 2, 3, 8, 9, 10, 11), 1: (4, 5, 6, 7, 12, 13, 14, 15)}
    assert topo.llc_bytes == 105 << 20
    # Physical cores first (skipping the reserved one), then siblings, then the reserved core.
    assert pool_cores(3, 1, topo) == [1, 2, 3]
    assert pool_cores(9, 1, topo) == [1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert pool_cores(16, 1, topo)[-2:] == [0, 8]
    with pytest.raises(ValueError, match="only 16 CPUs"):
        pool_cores(17, 1, topo)


def test_the_gpus_node_comes_first(two_socket_smt: Path):
    topo = read_topology(two_socket_smt / "sys", two_socket_smt / "proc", allowed=set(range(16)))
    # GPU on node 1: its cores, then their siblings, then node 0 past the reserved core.
    assert pool_cores(3, 1, topo, near_node=1) == [4, 5, 6]
    assert pool_cores(9, 1, topo, near_node=1) == [4, 5, 6, 7, 12, 13, 14, 15, 1]
    assert pool_cores(16, 1, topo, near_node=1)[-2:] == [0, 8]
    # Node 0 keeps its siblings before node 1's cores; an unknown node changes nothing.
    assert pool_cores(7, 1, topo, near_node=0) == [1, 2, 3, 9, 10, 11, 4]
    assert pool_cores(9, 1, topo, near_node=7) == pool_cores(9, 1, topo)


def test_pci_numa_node(tmp_path: Path):
    devices = tmp_path / "bus/pci/devices"
    nodes = {"0000:3b:00.0": "1\n", "0000:17:00.0": "-1\n", "0000:18:00.0": "?"}
    for address, text in nodes.items():
        (devices / address).mkdir(parents=True)
        (devices / address / "numa_node").write_text(text)
    assert pci_numa_node("0000:3b:00.0", tmp_path) == 1
    assert pci_numa_node("0000:17:00.0", tmp_path) is None  # one node: the platform says -1
    assert pci_numa_node("0000:18:00.0", tmp_path) is None
    assert pci_numa_node("0000:99:00.0", tmp_path) is None


def test_affinity_mask_restricts_everything(two_socket_smt: Path):
    topo = read_topology(two_socket_smt / "sys", two_socket_smt / "proc", allowed={4, 5, 12})
    assert topo.allowed_cpus == (4, 5, 12)
    assert topo.cores == ((4, 12), (5,))
    assert topo.numa_nodes == {1: (4, 5, 12)}
    assert pool_cores(1, 1, topo) == [5]


def test_missing_topology_files_degrade_gracefully(tmp_path: Path):
    (tmp_path / "sys").mkdir()
    (tmp_path / "proc").mkdir()
    allowed = set(os.sched_getaffinity(0))
    topo = read_topology(tmp_path / "sys", tmp_path / "proc", allowed=allowed)
    assert topo.num_physical_cores == len(topo.allowed_cpus)
    assert list(topo.numa_nodes) == [0]
    assert topo.model_name == "unknown"


def test_this_host():
    topo = read_topology()
    assert set(topo.allowed_cpus) == set(os.sched_getaffinity(0)) & set(topo.online_cpus)
    assert sorted(cpu for core in topo.cores for cpu in core) == list(topo.allowed_cpus)
    assert topo.memory_bytes > topo.available_bytes > 0


def make_probe(rates_gbps: list[float], kernel_gbps: list[float] = ()) -> BandwidthProbe:
    counts = tuple(range(1, len(rates_gbps) + 1))
    return BandwidthProbe(
        counts, counts, tuple(r * 1e9 for r in rates_gbps), 1 << 30, 0.0,
        tuple(r * 1e9 for r in kernel_gbps),
    )  # fmt: skip


def test_threads_for_fraction_of_peak():
    # The 16-core GPU host's measured shape: 13, ~38 at 4, ~57 at 8, ~84 at 16 GB/s.
    probe = make_probe([13, 25, 32, 38, 43, 48, 52, 57, 61, 65, 69, 72, 76, 79, 82, 84])
    assert probe.threads_for(0.95) == 15
    assert probe.threads_for(0.5) == 5
    assert probe.rate_for(16) == pytest.approx(84e9)
    assert make_probe([20, 29, 30]).threads_for() == 2
    assert BandwidthProbe.from_dict(json.loads(json.dumps(probe.to_dict()))) == probe


def test_the_kernels_own_rate_decides_the_pool_size():
    # Plain reads saturate at 9 threads (~95 GB/s); the kernel, arithmetic on every byte and a
    # smaller share of the memory system per thread as threads are added, still gains up to 13.
    reads = [13, 25, 38, 48, 57, 66, 76, 86, 95, 97, 98, 98, 99, 99, 100]
    kernel = [8, 15, 22, 29, 35, 41, 47, 52, 57, 62, 66, 70, 73, 74, 74]
    assert make_probe(reads).threads_for(0.95) == 9
    assert make_probe(reads, kernel).threads_for(0.95) == 13
    # A kernel that reads as fast as plain loads needs no more threads than they do.
    assert make_probe(reads, reads).threads_for(0.95) == 9
    slow = make_probe(reads, kernel)
    assert BandwidthProbe.from_dict(json.loads(json.dumps(slow.to_dict()))) == slow


def test_kernel_rates_are_timed_per_thread_count_over_memory():
    cores = sorted(os.sched_getaffinity(0))[:2]
    counts = list(range(1, len(cores) + 1))
    rates = bandwidth.kernel_read_rates(cores, counts, 32 << 20, repeats=1)
    assert len(rates) == len(counts)
    assert all(1e8 < r < 1e12 for r in rates)  # bytes/s: real measurements, not constants


def test_default_thread_counts():
    assert default_thread_counts(3) == [1, 2, 3]
    counts = default_thread_counts(64)
    assert counts[:8] == list(range(1, 9)) and counts[-1] == 64 and 32 in counts and 40 in counts


def test_probe_is_cached_per_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[int] = []

    def fake_probe(*, reserve_cores, topology):
        calls.append(reserve_cores)
        return make_probe([10, 19, 20])

    monkeypatch.setattr(bandwidth, "probe_bandwidth", fake_probe)
    first = cached_probe(1, directory=tmp_path)
    again = cached_probe(1, directory=tmp_path)
    assert first == again and calls == [1]
    cached_probe(0, directory=tmp_path)  # another key
    assert calls == [1, 0]
    bandwidth.cache_path(read_topology(), 1, tmp_path).write_text("{not json")
    cached_probe(1, directory=tmp_path)  # a corrupt entry is measured again
    assert len(calls) == 3
    cached_probe(1, directory=tmp_path, refresh=True)
    assert len(calls) == 4


def test_cache_dir_follows_the_environment(tmp_path: Path):
    assert bandwidth.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "neod"
    assert bandwidth.cache_dir({"CACHE_DIRECTORY": f"{tmp_path}/a:/b"}) == tmp_path / "a"
    assert bandwidth.cache_dir({}) == Path.home() / ".cache/neod"


def test_cli_prints_topology_and_probe(tmp_path: Path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "neod.cpu", "--json", "--reserve-cores", "0"]
    report = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                       check=True, timeout=120).stdout)
    assert report["topology"]["allowed_cpus"] == sorted(os.sched_getaffinity(0))
    probe = report["bandwidth"]
    assert probe["thread_counts"][0] == 1 and min(probe["read_bytes_per_s"]) > 5e8
    assert 1 <= report["recommended_threads"] <= len(os.sched_getaffinity(0))
    assert Path(report["cache_file"]).exists()
    text = subprocess.run([sys.executable, "-m", "neod.cpu", "--reserve-cores", "0"], env=env,
                          capture_output=True, text=True, check=True, timeout=60).stdout
    assert "recommended CPU attention threads" in text
    # One row per thread count, the kernel's own rate in the last column.
    header = text.splitlines().index("threads   GB/s   of peak   attention kernel GB/s")
    rows = text.splitlines()[header + 1 : header + 1 + len(probe["thread_counts"])]
    assert [int(r.split()[0]) for r in rows] == probe["thread_counts"]
    assert [float(r.split()[-1]) for r in rows] == pytest.approx(
        [r / 1e9 for r in probe["kernel_bytes_per_s"]], abs=0.06
    )
