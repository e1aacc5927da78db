"""The HSA tier table and its masks, the same rules as the C++ library's `attn::hsa`
(include/drdiff/attention/policy/hsa.hpp, attention/pattern.hpp).

A tier is used for N <= max_len. A dense tier attends every pair. Otherwise query i attends key j when

    |i - j| <= window,  or  |i - j| <= span and |i - j| % rate == 0,  or  i < G,  or  j < G

with G the tier's global count: `count`, or ceil(sqrt(N)) capped at `sqrt_cap` when that is > 0.
Windows and spans are clamped to N as in `sparse_union::bind` (this never changes the mask).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Tier:
    max_len: int = INT_MAX
    dense: bool = False
    window: int = 256
    rate: int = 2
    span: int = 1024
    globals_count: int = 0  # leading global tokens ("first" rule)
    sqrt_cap: int = 0  # > 0: G = min(ceil(sqrt(N)), sqrt_cap)

    def num_global(self, n: int) -> int:
        if self.dense:
            return 0
        if self.sqrt_cap > 0:
            r = math.isqrt(n)
            if r * r < n:
                r += 1
            return min(r, self.sqrt_cap, n)
        return min(self.globals_count, n)


def default_tiers() -> list[Tier]:
    """The library's default table (`attn::hsa{}`)."""
    return [
        Tier(1024, True, 0, 1, 0, 0, 0),
        Tier(4096, False, 256, 2, 1024, 0, 64),
        Tier(16384, False, 256, 4, 2048, 64, 0),
        Tier(INT_MAX, False, 256, 8, 4096, 128, 0),
    ]


def tier_for(tiers: Sequence[Tier], n: int) -> Tier:
    for t in tiers:
        if n <= t.max_len:
            return t
    return tiers[-1]


def tiers_to_json(tiers: Sequence[Tier]) -> list[dict]:
    return [asdict(t) for t in tiers]


def tiers_from_json(items: Sequence[dict]) -> list[Tier]:
    return [Tier(**d) for d in items]


def mask_fn(tier: Tier, n: int, causal: bool = False) -> Callable:
    """mask(i, j) for index tensors (or ints); `causal` ANDs j <= i (the autoregressive baseline)."""
    if tier.dense:
        if causal:
            return lambda i, j: j <= i
        return lambda i, j: (i >= 0) & (j >= 0)
    w = min(tier.window, n)
    span = min(tier.span, n)
    rate = min(tier.rate, n) if tier.rate > 0 else 1
    g = tier.num_global(n)

    def m(i, j):
        d = (i - j).abs() if hasattr(i, "abs") else abs(i - j)
        keep = (d <= w) | ((d <= span) & (d % rate == 0)) | (i < g) | (j < g)
        if causal:
            keep = keep & (j <= i)
        return keep

    return m


def dense_mask(tier: Tier, n: int, causal: bool = False):
    """The [n, n] boolean mask (for tests and small n)."""
    import torch

    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    return mask_fn(tier, n, causal)(i, j)
