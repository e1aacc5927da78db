#!/usr/bin/env python3
"""Markdown tables from a Google Benchmark JSON file of drdiff.bench.attention.cpu.

    bench/tables.py out/bench_cpu.json

Reads the median aggregates when the run used --benchmark_repetitions, else the single runs.
Prints: the ceiling, one table per pattern (ms, useful GFLOP/s, % of the GEMM ceiling, ns per
query, density), and the target checks of issue 2.
"""
import json
import re
import sys


def load(path):
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = re.sub(r"/real_time(_median)?$", "", b["name"]).replace("/iterations:1", "")
        rows[name] = b
    return data["context"], rows


def main(path):
    ctx, rows = load(path)
    gemm = max(rows[k]["flops"] for k in rows if k.startswith("BM_eigen_gemm_cpu"))
    print(f"Run {ctx['date']}, {ctx['num_cpus']} CPUs at {ctx['mhz_per_cpu']} MHz, "
          f"L3 {ctx['caches'][-1]['size'] >> 20} MiB.\n")
    print("| ceiling | GFLOP/s |\n|---|---|")
    for k in sorted(k for k in rows if k.startswith("BM_eigen_gemm_cpu")):
        print(f"| `{k}` | {rows[k]['flops'] / 1e9:.1f} |")
    print()
    patterns = []
    for k in rows:
        m = re.match(r"BM_attention_(\w+)_cpu/seq:(\d+)$", k)
        if m and m.group(1) not in patterns:
            patterns.append(m.group(1))
    print("| pattern | N | ms | useful GFLOP/s | % of GEMM | ns / query | density |")
    print("|---|---|---|---|---|---|---|")
    for p in patterns:
        for k, b in rows.items():
            m = re.match(rf"BM_attention_{p}_cpu/seq:(\d+)$", k)
            if not m:
                continue
            ms = b["real_time"] if b["time_unit"] == "ms" else b["real_time"] / 1e6
            dens = b.get("density", float("nan"))
            print(f"| {p} | {int(m.group(1))} | {ms:.2f} | {b['flops'] / 1e9:.1f} | "
                  f"{100 * b['flops'] / gemm:.0f} % | {b['per_query'] * 1e9:.0f} | {dens:.4f} |")
    print()
    for p in ("local", "hsa"):
        pq = [rows[f"BM_attention_{p}_cpu/seq:{n}"]["per_query"] * 1e9 for n in (4096, 8192, 16384, 32768, 65536)
              if f"BM_attention_{p}_cpu/seq:{n}" in rows]
        fr = [rows[f"BM_attention_{p}_cpu/seq:{n}"]["flops"] / gemm for n in (4096, 8192, 16384, 32768, 65536)
              if f"BM_attention_{p}_cpu/seq:{n}" in rows]
        if pq:
            mean = sum(pq) / len(pq)
            print(f"- {p}: {100 * min(fr):.0f}–{100 * max(fr):.0f} % of the GEMM rate at N ≥ 4K; ns/query "
                  f"{min(pq):.0f}–{max(pq):.0f} from 4K to 64K ({100 * (min(pq) / mean - 1):+.0f} % / "
                  f"{100 * (max(pq) / mean - 1):+.0f} % around the mean {mean:.0f})")
    ref, fast = rows.get("BM_attention_reference_hsa_cpu/seq:16384"), rows.get("BM_attention_hsa_cpu/seq:16384")
    if ref and fast:
        print(f"- hsa vs the float64 reference at N = 16384: {ref['real_time'] / fast['real_time']:.1f}× faster")


if __name__ == "__main__":
    main(sys.argv[1])
