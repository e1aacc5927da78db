#!/usr/bin/env python3
"""Side-by-side: the same masks in PyTorch FlexAttention (compiled), PyTorch SDPA (cuDNN and flash
back ends) and DrDiff's CUDA kernels, on one GPU in one run.

    python3 bench/compare/compare.py --ours out/bench_cuda.json [--sizes 16384 32768 65536 131072]

bf16, batch 1, 16 heads, head_dim 64, bidirectional. Masks: local |i-j| <= 256; HSA |i-j| <= 256 or
(|i-j| <= 2048 and (i-j) % 4 == 0) or i < 64 or j < 64 (DrDiff: local_window{256} | dilated{4, 2048} |
global_tokens::first(64), benchmark BM_attention_union_cuda). Times are medians of
triton.testing.do_bench (warm-up 25 ms, 100 ms of repetitions). DrDiff's times come from the JSON of
drdiff.bench.attention.cuda, run just before on the same GPU.
"""
import argparse
import json
import re
import warnings

import torch
import torch._dynamo
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

H, D, W, DIL, SPAN, G = 16, 64, 256, 4, 2048, 64


def ours(path):
    data = json.load(open(path))
    t = {}
    for b in data["benchmarks"]:
        m = re.match(r"BM_attention_(\w+)_cuda/seq:(\d+)/", b["name"])
        if m:
            ms = b["real_time"] if b["time_unit"] == "ms" else b["real_time"] / 1e6
            t[(m.group(1), int(m.group(2)))] = ms
    return t


def local_mask(b, h, q, k):
    return (q - k).abs() <= W


def hsa_mask(b, h, q, k):
    d = (q - k).abs()
    return (d <= W) | ((d <= SPAN) & (d % DIL == 0)) | (q < G) | (k < G)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--dense-max", type=int, default=16384)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # create_block_mask(_compile=True)
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    mine = ours(args.ours)
    rows = []
    for n in args.sizes:
        q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name, mod, key in (("local w=256", local_mask, "local"), ("HSA w=256 d=4 s=2048 G=64", hsa_mask, "union")):
            bm = create_block_mask(mod, B=None, H=None, Q_LEN=n, KV_LEN=n, _compile=True)
            t = bench(lambda: flex(q, k, v, block_mask=bm))
            rows.append((name, n, "FlexAttention", t, mine.get((key, n))))
            del bm
        if n <= args.dense_max:
            for backend, label in ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN"), (SDPBackend.FLASH_ATTENTION, "SDPA flash")):
                with sdpa_kernel(backend):
                    t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
                rows.append(("dense", n, label, t, mine.get(("dense", n))))
        torch.cuda.empty_cache()
    print(f"{'pattern':28s} {'N':>7s} {'peer':14s} {'peer ms':>9s} {'DrDiff ms':>10s} {'speed-up':>9s}")
    for name, n, peer, t, m in rows:
        r = f"{t / m:8.2f}x" if m else "     n/a"
        ms = f"{m:10.3f}" if m else "       n/a"
        print(f"{name:28s} {n:7d} {peer:14s} {t:9.3f} {ms} {r}")


if __name__ == "__main__":
    main()
