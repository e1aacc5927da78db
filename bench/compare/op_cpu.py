#!/usr/bin/env python3
"""The PyTorch operator drdiff::hsa_attention on the CPU against scaled_dot_product_attention with
the same boolean mask, forward and forward + backward, in one run on one machine.

    PYTHONPATH=python python3 bench/compare/op_cpu.py [--sizes 1024 4096 8192] [--heads 4] [--dim 64]

float32, batch 1, the default HSA tier table (masks.default_tiers). Times are medians of --reps runs
after one warm-up, with torch's intra-op threads (what the operator also uses). Prints a Markdown
table with the date, the machine and the commit.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from drdiff.attention_op import hsa_attention  # noqa: E402
from drdiff.masks import default_tiers, dense_mask, tier_for  # noqa: E402


def median_seconds(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    tiers = default_tiers()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({torch.get_num_threads()} torch threads), torch {torch.__version__}, commit {commit}")
    print("| N | tier | ours fwd | SDPA fwd | ours fwd+bwd | SDPA fwd+bwd | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=g).requires_grad_() for _ in range(3))
        do = torch.randn(1, args.heads, n, args.dim, generator=g)
        tier = tier_for(tiers, n)
        mask = dense_mask(tier, n).view(1, 1, n, n)

        def ours_f():
            with torch.no_grad():
                hsa_attention(q, k, v, tiers)

        def sdpa_f():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def ours_fb():
            torch.autograd.grad(hsa_attention(q, k, v, tiers), (q, k, v), do)

        def sdpa_fb():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), do)

        t = [median_seconds(f, args.reps) for f in (ours_f, sdpa_f, ours_fb, sdpa_fb)]
        name = "dense" if tier.dense else f"w {tier.window}, δ {tier.rate} to {tier.span}, G {tier.num_global(n)}"
        print(f"| {n} | {name} | {t[0] * 1e3:.1f} ms | {t[1] * 1e3:.1f} ms | {t[2] * 1e3:.1f} ms | "
              f"{t[3] * 1e3:.1f} ms | {t[3] / t[2]:.2f}× |")


if __name__ == "__main__":
    main()
