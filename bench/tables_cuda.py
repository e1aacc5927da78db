#!/usr/bin/env python3
"""Markdown table from the JSON of drdiff.bench.attention.cuda: time, useful TFLOP/s, share of the
bf16 GEMM rate measured in the same run, density.

    bench/tables_cuda.py out/bench_cuda.json
"""
import json
import re
import sys


def main(path):
    data = json.load(open(path))
    rows = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    gemm = max((b["flops"] for b in rows if b["name"].startswith("BM_gemm_bf16_cuda")), default=float("nan"))
    print(f"bf16 GEMM 8192³ (cuBLAS), same run: {gemm / 1e12:.1f} TFLOP/s\n")
    print("| benchmark | N | ms | useful TFLOP/s | % of GEMM | density |")
    print("|---|---|---|---|---|---|")
    for b in rows:
        m = re.match(r"BM_attention_(\w+)_cuda/seq:(\d+)/", b["name"])
        if not m:
            continue
        if "error_message" in b:
            print(f"| {m.group(1)} | {m.group(2)} | error: {b['error_message']} | | | |")
            continue
        ms = b["real_time"] if b["time_unit"] == "ms" else b["real_time"] / 1e6
        print(f"| {m.group(1)} | {m.group(2)} | {ms:.3f} | {b['flops'] / 1e12:.1f} | {100 * b['flops'] / gemm:.1f} % | "
              f"{b['density']:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1])
