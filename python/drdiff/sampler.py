"""Sampling as the C++ `model<cpu>::generate` does it: the same counter-based noise
(solver::gaussian_noise), the same sqrt schedule and grid, the same DPM-Solver++ coefficients
(solver/dpmpp.hpp), the prompt kept clean (anchor::keep_clean), optional clamp guidance
(anchor::guidance), and rounding by the dot product against the table (anchor::metric::dot)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .model import SQRT_DELTA, DrDiff

M64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (gaussian_noise::mix) on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def gaussian_noise(seed: int, step: int, n: int) -> np.ndarray:
    """z(step, i) for i < n, bit for bit the values of solver::gaussian_noise{seed}(step, i)."""
    j = np.arange((n + 1) // 2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        inner = _mix(np.uint64((step * 0x632BE59BD9B4E019) & M64) + j)
        k = _mix(np.uint64(seed & M64) ^ inner)
    k2 = _mix(k)
    u1 = ((k >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    u2 = (k2 >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    r = np.sqrt(-2.0 * np.log(u1))
    a = 6.283185307179586 * u2
    z = np.empty(2 * len(j))
    z[0::2] = r * np.cos(a)
    z[1::2] = r * np.sin(a)
    return z[:n]


# ---- the sqrt schedule (solver::vp_sqrt) and its ops ------------------------------------------------

def log_alpha(t: float) -> float:
    return 0.5 * math.log1p(-math.sqrt(t + SQRT_DELTA))


def log_sigma(t: float) -> float:
    return 0.5 * math.log(-math.expm1(2.0 * log_alpha(t)))


def lam(t: float) -> float:
    return log_alpha(t) - log_sigma(t)


def grid_uniform_t(steps: int, t_start: float = 0.99, t_end: float = 0.0) -> list[float]:
    return [t_start + (i / steps) * (t_end - t_start) for i in range(steps + 1)]


@dataclass
class Step:
    a: float
    b: tuple
    order: int


def plan(order: int, grid: Sequence[float], lower_order_final: bool = True, below: int = 15,
         third_taylor: bool = True) -> list[Step]:
    """solver::dpmpp_plan for the ODE multistep solvers (DDIM = order 1, 2M midpoint, 3M)."""
    steps = len(grid) - 1
    out = []
    for i in range(steps):
        o = min(order, i + 1)
        if lower_order_final and steps < below:
            o = min(o, steps - i)
        o = max(o, 1)
        s, t = grid[i], grid[i + 1]
        ls, lt = lam(s), lam(t)
        h = lt - ls
        alpha = math.exp(log_alpha(t))
        a = math.exp(log_sigma(t) - log_sigma(s))
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        if o == 1:
            out.append(Step(a, (-alpha * phi1, 0.0, 0.0), 1))
            continue
        r0 = (ls - lam(grid[i - 1])) / h
        if o == 2:
            out.append(Step(a, (-alpha * phi1 - 0.5 * alpha * phi1 / r0, 0.5 * alpha * phi1 / r0, 0.0), 2))
            continue
        r1 = (lam(grid[i - 1]) - lam(grid[i - 2])) / h
        d10 = (1.0 / r0, -1.0 / r0, 0.0)
        diff = (1.0 / r0, -1.0 / r0 - 1.0 / r1, 1.0 / r1)
        w = 2.0 if third_taylor else 1.0
        b = []
        for j in range(3):
            d1 = d10[j] + r0 / (r0 + r1) * diff[j]
            d2 = diff[j] / (r0 + r1)
            b.append(alpha * phi2 * d1 - w * alpha * phi3 * d2)
        b[0] += -alpha * phi1
        out.append(Step(a, tuple(b), 3))
    return out


@dataclass
class SampleSettings:
    solver: str = "2m"  # ddim, 2m, 3m
    steps: int = 20
    t_start: float = 0.99
    t_end: float = 0.0
    guidance: bool = False
    guidance_lambda_min: float = 0.0  # lambda >= 0: t <= 0.25 on the sqrt schedule (the last quarter)
    guidance_gamma: float = 1.0


@torch.no_grad()
def generate(model: DrDiff, prompt: Sequence[int], length: int, seed: int, settings: SampleSettings,
             device="cpu", backend: str = "sdpa", batch_seeds: Optional[Sequence[int]] = None,
             dtype=torch.float32) -> list[list[int]]:
    """Token ids after the prompt, one list per seed (`batch_seeds`, or [seed])."""
    seeds = list(batch_seeds) if batch_seeds is not None else [seed]
    B = len(seeds)
    de = model.cfg.embed_dim
    P = len(prompt)
    N = P + length
    E = model.table().to(device)
    m = model.absorbing.float().to(device)
    target = torch.zeros(N, dtype=torch.bool, device=device)
    target[P:] = True
    clean = torch.zeros(N, de, device=device)
    if P:
        clean[:P] = E[torch.tensor(list(prompt), device=device)]
    x = torch.empty(B, N, de, device=device)
    for b, s in enumerate(seeds):
        z = torch.from_numpy(gaussian_noise(s, 0, N * de)).float().view(N, de).to(device)
        x[b] = torch.where(target.view(-1, 1), z + m, clean)
    order = {"ddim": 1, "2m": 2, "3m": 3}[settings.solver]
    grid = grid_uniform_t(settings.steps, settings.t_start, settings.t_end)
    coeffs = plan(order, grid)
    mask = model.block_mask(N, device) if backend == "flex" else None
    hist: list[torch.Tensor] = []
    prev: Optional[torch.Tensor] = None  # a self-conditioned model's previous estimate (None: zeros)
    keep = lambda v: torch.where(target.view(1, -1, 1), v, clean.view(1, N, de))
    for s, k in enumerate(coeffs):
        t = torch.full((B,), grid[s], device=device)
        with torch.autocast(device.type if isinstance(device, torch.device) else str(device).split(":")[0],
                            dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x0, _, _ = model(x, t, mask, backend, x0_prev=prev)
        x0 = x0.float()
        prev = x0 if model.cfg.self_condition else None  # the raw estimate, before guidance and the prompt
        if settings.guidance and lam(grid[s]) >= settings.guidance_lambda_min:
            ids = (x0 @ E.t()).argmax(-1)
            x0 = x0 + settings.guidance_gamma * (E[ids] - x0)
        x0 = keep(x0)
        hist = [x0] + hist[:2]
        upd = k.a * x
        for j in range(k.order):
            upd = upd + k.b[j] * hist[j]
        x = keep(upd)
    ids = (x @ E.t()).argmax(-1)
    return [row[P:].tolist() for row in ids]
