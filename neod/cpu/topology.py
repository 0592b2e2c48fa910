"""Host CPU topology from sysfs: online CPUs, physical cores vs SMT siblings, NUMA nodes, memory.

The CPU attention pool wants one worker per physical core (SMT siblings share the core's load
ports and gain nothing on a bandwidth-bound kernel), inside the process's affinity mask, and away
from the first cores, which the OS, interrupts and the GPU-driving thread use. On a host with
several NUMA nodes it wants the GPU's node: the host KV pool lives there (its pages are placed by
the pool's first touch), so PCIe copies and the workers' reads stay on one node. Everything is read
from a sysfs root given as an argument so that tests can feed a fake tree; missing files (as in
some sandboxes) degrade to "every CPU is its own core, one NUMA node".
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(sorted(set(cpus)))


def format_cpu_list(cpus: list[int] | tuple[int, ...]) -> str:
    """(0, 1, 2, 3, 8, 10, 11) -> '0-3,8,10-11', the kernel's notation (parse_cpu_list reads it)."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class CpuTopology:
    model_name: str
    online_cpus: tuple[int, ...]
    allowed_cpus: tuple[int, ...]  # the process's affinity mask, restricted to online CPUs
    cores: tuple[tuple[int, ...], ...]  # allowed CPUs grouped by physical core, ascending
    numa_nodes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # node -> allowed CPUs
    memory_bytes: int = 0
    available_bytes: int = 0
    llc_bytes: int = 0  # last-level cache of CPU 0 (0 if unknown)

    @property
    def num_physical_cores(self) -> int:
        return len(self.cores)

    @property
    def has_smt(self) -> bool:
        return any(len(core) > 1 for core in self.cores)

    def primary_cpus(self) -> list[int]:
        """One CPU per physical core: the lowest-numbered allowed sibling."""
        return [core[0] for core in self.cores]

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "online_cpus": list(self.online_cpus),
            "allowed_cpus": list(self.allowed_cpus),
            "physical_cores": [list(core) for core in self.cores],
            "numa_nodes": {str(node): list(cpus) for node, cpus in self.numa_nodes.items()},
            "memory_bytes": self.memory_bytes,
            "available_bytes": self.available_bytes,
            "llc_bytes": self.llc_bytes,
        }


def _llc_bytes(cpu_dir: Path) -> int:
    best_level, best_size = -1, 0
    for index in sorted(cpu_dir.glob("cache/index*")):
        level, size = _read(index / "level"), _read(index / "size")
        if level is None or size is None or (_read(index / "type") or "").strip() == "Instruction":
            continue
        size = size.strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale
        if int(level) > best_level:
            best_level, best_size = int(level), value
    return best_size


def _model_name(procfs: Path) -> str:
    for line in (_read(procfs / "cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Processor", "cpu model"):
            return value.strip()
    return "unknown"


def read_topology(
    sysfs: Path = Path("/sys"),
    procfs: Path = Path("/proc"),
    allowed: set[int] | None = None,
) -> CpuTopology:
    """The topology of this host (or of the trees under `sysfs` / `procfs`, for tests)."""
    cpu_root = sysfs / "devices/system/cpu"
    online_text = _read(cpu_root / "online")
    online = parse_cpu_list(online_text) if online_text else tuple(range(os.cpu_count() or 1))
    if allowed is None:
        allowed = set(os.sched_getaffinity(0))
    allowed_cpus = tuple(cpu for cpu in online if cpu in allowed) or online

    by_core: dict[tuple[int, int], list[int]] = {}
    for cpu in allowed_cpus:
        topo = cpu_root / f"cpu{cpu}" / "topology"
        package = _read(topo / "physical_package_id")
        core = _read(topo / "core_id")
        key = (int(package), int(core)) if package and core else (-1, cpu)
        by_core.setdefault(key, []).append(cpu)
    cores = tuple(sorted(tuple(sorted(cpus)) for cpus in by_core.values()))

    nodes: dict[int, tuple[int, ...]] = {}
    for node_dir in sorted((sysfs / "devices/system/node").glob("node[0-9]*")):
        cpulist = _read(node_dir / "cpulist")
        if cpulist is None:
            continue
        cpus = tuple(cpu for cpu in parse_cpu_list(cpulist) if cpu in allowed_cpus)
        if cpus:
            nodes[int(node_dir.name[4:])] = cpus
    if not nodes:
        nodes = {0: allowed_cpus}

    memory = psutil.virtual_memory()
    return CpuTopology(
        model_name=_model_name(procfs),
        online_cpus=online,
        allowed_cpus=allowed_cpus,
        cores=cores,
        numa_nodes=nodes,
        memory_bytes=memory.total,
        available_bytes=memory.available,
        llc_bytes=_llc_bytes(cpu_root / f"cpu{allowed_cpus[0]}"),
    )


def pci_numa_node(address: str, sysfs: Path = Path("/sys")) -> int | None:
    """NUMA node of the PCI device at `address` ("0000:3b:00.0"), None where the platform does
    not say (no such file, or -1 on a host with one node)."""
    text = _read(sysfs / "bus/pci/devices" / address / "numa_node")
    try:
        node = int(text) if text is not None else -1
    except ValueError:
        return None
    return node if node >= 0 else None


def pool_cores(
    num_threads: int,
    reserve_cores: int = 1,
    topology: CpuTopology | None = None,
    near_node: int | None = None,
) -> list[int]:
    """CPUs for `num_threads` pinned workers, in order of preference: one per physical core past
    the first `reserve_cores` cores, then those cores' SMT siblings, then the reserved cores (an
    explicit request for that many threads is honoured, with a warning). With `near_node` (the
    GPU's NUMA node), that node's cores and their siblings come before any other node's."""
    topo = topology or read_topology()
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    reserved = topo.cores[: min(reserve_cores, len(topo.cores) - 1)]
    usable = topo.cores[len(reserved) :]
    local = set(topo.numa_nodes.get(near_node, ())) if near_node is not None else set()
    groups = [[c for c in usable if c[0] in local], [c for c in usable if c[0] not in local]]
    preferred = [
        cpu
        for group in groups
        for cpu in [core[0] for core in group] + [cpu for core in group for cpu in core[1:]]
    ]
    fallback = [cpu for core in reserved for cpu in core]
    if num_threads > len(preferred) + len(fallback):
        raise ValueError(
            f"{num_threads} pool threads requested but this process may run on only "
            f"{len(topo.allowed_cpus)} CPUs"
        )
    if num_threads > len(preferred):
        logger.warning(
            "%d CPU attention threads leave none of the %d reserved cores free",
            num_threads,
            len(reserved),
        )
    return (preferred + fallback)[:num_threads]
