"""`python -m neod.cpu`: print the host topology, the memory-read bandwidth probe and the pool size.

The probe comes from the on-disk cache unless --refresh; --no-probe prints the topology only.
"""

from __future__ import annotations

import argparse
import json
import logging

from neod.cpu.bandwidth import cache_path, cached_probe
from neod.cpu.topology import read_topology


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neod.cpu", description=__doc__)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--no-probe", action="store_true", help="topology only, no bandwidth")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--reserve-cores", type=int, default=1, help="cores kept out of the pool")
    parser.add_argument("--fraction", type=float, default=0.95, help="share of peak to reach")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    topo = read_topology()
    report: dict = {"topology": topo.to_dict()}
    probe = None
    if not args.no_probe:
        probe = cached_probe(args.reserve_cores, refresh=args.refresh, topology=topo)
        limit = max(1, topo.num_physical_cores - args.reserve_cores - 1)
        report["bandwidth"] = probe.to_dict()
        report["cache_file"] = str(cache_path(topo, args.reserve_cores))
        report["recommended_threads"] = min(limit, probe.threads_for(args.fraction))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0

    print(f"cpu model        {topo.model_name}")
    print(f"online cpus      {len(topo.online_cpus)} ({len(topo.allowed_cpus)} allowed)")
    smt = "yes" if topo.has_smt else "no"
    print(f"physical cores   {topo.num_physical_cores} allowed (SMT {smt})")
    for node, cpus in topo.numa_nodes.items():
        print(f"numa node {node}      cpus {','.join(map(str, cpus))}")
    print(f"memory           {topo.memory_bytes / 2**30:.1f} GiB "
          f"({topo.available_bytes / 2**30:.1f} GiB available)")
    print(f"last-level cache {topo.llc_bytes / 2**20:.0f} MiB")
    if probe is not None:
        print(f"\nread bandwidth ({probe.buffer_bytes / 2**20:.0f} MiB buffer, cores "
              f"{','.join(map(str, probe.cores))})")
        print("threads   GB/s   of peak   attention kernel GB/s")
        kernel = probe.kernel_bytes_per_s or (None,) * len(probe.thread_counts)
        for n, rate, attn in zip(probe.thread_counts, probe.read_bytes_per_s, kernel, strict=True):
            timed = "-" if attn is None else f"{attn / 1e9:.1f}"  # a probe without the kernel's
            print(f"{n:7d} {rate / 1e9:6.1f} {rate / probe.peak_bytes_per_s:8.0%} {timed:>23s}")
        print(f"\nrecommended CPU attention threads: {report['recommended_threads']} "
              f"(the kernel reaches {args.fraction:.0%} of its best rate, "
              f"{args.reserve_cores} core(s) reserved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
