"""Host topology, measured memory bandwidth and the CPU attention pool's sizing."""

from neod.cpu.bandwidth import (
    BandwidthProbe,
    cached_probe,
    probe_bandwidth,
    recommended_threads,
)
from neod.cpu.topology import CpuTopology, pool_cores, read_topology

__all__ = [
    "BandwidthProbe",
    "CpuTopology",
    "cached_probe",
    "pool_cores",
    "probe_bandwidth",
    "read_topology",
    "recommended_threads",
]
