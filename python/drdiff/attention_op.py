"""HSA attention with a backward pass, as a PyTorch operator (the library's own kernels).

    import torch
    from drdiff.attention_op import hsa_attention
    from drdiff.masks import Tier, default_tiers

    q, k, v = (torch.randn(2, 4, 5000, 64, requires_grad=True) for _ in range(3))  # [B, H, N, D]
    o = hsa_attention(q, k, v, default_tiers())       # the tier is picked from N at run time
    o.square().mean().backward()                      # dq, dk, dv by the library's backward
    local = [Tier(window=128, rate=1, span=0)]        # any tier table: dense, local, dilated, global

Registered with torch.library as `drdiff::hsa_attention` and `drdiff::hsa_attention_backward`
(custom ops with fake implementations, autograd through register_autograd), so the operator works
under torch.compile with no graph break, and with dynamic shapes no recompilation as N changes.

CPU tensors of float32 and float64 run drdiff::attention and drdiff::attention_backward through Eigen
(csrc/attention_op.cpp); CUDA tensors of bfloat16, float16 (head_dim 64 or 128) and float32 run the
library's CUDA kernels (csrc/attention_op_cuda.cu; the lse is float32 there). Each side is compiled on
first use with torch.utils.cpp_extension (needs ninja, the library's headers: DRDIFF_INCLUDE or the
source checkout's include/; the CPU side a C++17 compiler and Eigen 3.4: DRDIFF_EIGEN_INCLUDE, or
/usr/include/eigen3, or the checkout's .deps/include/eigen3; the CUDA side nvcc). docs/pytorch.md has
the details.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional, Sequence

import torch

from .masks import INT_MAX, Tier

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.normpath(os.path.join(_HERE, "..", ".."))
_EXT = None
_CUDA_EXT = None
_LOCK = threading.Lock()


def _library_include() -> str:
    """The C++ library's headers: DRDIFF_INCLUDE, or the repository's include/ (a source checkout)."""
    for d in (os.environ.get("DRDIFF_INCLUDE", ""), os.path.join(_ROOT, "include")):
        if d and os.path.isfile(os.path.join(d, "drdiff", "drdiff.hpp")):
            return d
    raise RuntimeError("drdiff.attention_op: the DrDiff headers were not found (set DRDIFF_INCLUDE to the folder that "
                       "holds drdiff/drdiff.hpp, or use the package from its source checkout)")


def _eigen_include() -> str:
    for d in (os.environ.get("DRDIFF_EIGEN_INCLUDE", ""), "/usr/include/eigen3",
              os.path.join(_ROOT, ".deps", "include", "eigen3")):
        if d and os.path.isfile(os.path.join(d, "Eigen", "Core")):
            return d
    raise RuntimeError("drdiff.attention_op: Eigen 3.4 not found (set DRDIFF_EIGEN_INCLUDE to the folder that "
                       "holds Eigen/Core; on Debian: apt-get install libeigen3-dev)")


def _sources_digest(source: str, include: str) -> str:
    """A digest of the operator's sources (csrc/) and every library header: part of the extension's
    name, so a changed header builds a new extension (cpp_extension itself only watches the listed
    sources)."""
    h = hashlib.sha256()
    csrc = os.path.join(_HERE, "csrc")
    paths = [source] + sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith(".hpp"))
    paths += sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(include, "drdiff")) for f in fs)
    for path in paths:
        h.update(path[len(include):].encode() if path.startswith(include) else os.path.basename(path).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def extension():
    """The compiled C++ side (built once per machine and source version, cached by
    torch.utils.cpp_extension)."""
    global _EXT
    with _LOCK:
        if _EXT is None:
            from torch.utils.cpp_extension import load

            source = os.path.join(_HERE, "csrc", "attention_op.cpp")
            include = _library_include()
            _EXT = load(name=f"drdiff_attention_op_{_sources_digest(source, include)}", sources=[source],
                        extra_include_paths=[include, _eigen_include()],
                        extra_cflags=["-O3", "-std=c++17", "-DNDEBUG", "-march=native"], verbose=False)
    return _EXT


def cuda_extension():
    """The CUDA side, compiled with nvcc for the current device's architecture (sm_90a on Hopper, whose
    wgmma kernels need it; compute capability X.Y elsewhere)."""
    global _CUDA_EXT
    with _LOCK:
        if _CUDA_EXT is None:
            from torch.utils.cpp_extension import load

            major, minor = torch.cuda.get_device_capability()
            arch = f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
            source = os.path.join(_HERE, "csrc", "attention_op_cuda.cu")
            include = _library_include()
            _CUDA_EXT = load(name=f"drdiff_attention_op_cuda_{arch}_{_sources_digest(source, include)}",
                             sources=[source], extra_include_paths=[include],
                             extra_cflags=["-O3", "-std=c++17", "-DNDEBUG"],
                             # (cpp_extension defines the __CUDA_NO_HALF*/BFLOAT16* macros; the library
                             # converts through intrinsics, and these keep CUDA's own headers whole too)
                             extra_cuda_cflags=["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr",
                                                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                                                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                                                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                                                f"-gencode=arch=compute_{arch},code=sm_{arch}"], verbose=False)
    return _CUDA_EXT


def _ext_for(t: torch.Tensor):
    return cuda_extension() if t.is_cuda else extension()


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The lse's dtype: float32 on CUDA (the kernels keep it in fp32), q's dtype on the CPU."""
    return torch.float32 if q.is_cuda else q.dtype


def flatten_tiers(tiers: Sequence[Tier]) -> list[int]:
    """The tier table as the operator's integer list (7 per tier)."""
    if not tiers:
        raise ValueError("drdiff.hsa_attention: the tier table is empty")
    out: list[int] = []
    for t in tiers:
        out += [int(t.max_len), int(bool(t.dense)), int(t.window), int(t.rate), int(t.span), int(t.globals_count),
                int(t.sqrt_cap)]
    return out


@torch.library.custom_op("drdiff::hsa_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiers: list[int], scale: float,
             kv_lens: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _ext_for(q).hsa_attention(q, k, v, tiers, scale, kv_lens)
    return o, lse


@_forward.register_fake
def _(q, k, v, tiers, scale, kv_lens):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("drdiff::hsa_attention_backward", mutates_args=())
def _backward_op(d_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, tiers: list[int], scale: float, kv_lens: Optional[torch.Tensor],
                 d_lse: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _ext_for(q).hsa_attention_backward(d_o, q, k, v, o, lse, tiers, scale, kv_lens, d_lse)
    return dq, dk, dv


@_backward_op.register_fake
def _(d_o, q, k, v, o, lse, tiers, scale, kv_lens, d_lse):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, tiers, scale, kv_lens = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.tiers, ctx.scale, ctx.kv_lens = tiers, scale, kv_lens


def _autograd(ctx, d_o, d_lse):
    q, k, v, o, lse = ctx.saved_tensors
    d_o = torch.zeros_like(o) if d_o is None else d_o.contiguous()
    d_lse = None if d_lse is None else d_lse.contiguous()
    dq, dk, dv = _backward_op(d_o, q, k, v, o, lse, ctx.tiers, ctx.scale, ctx.kv_lens, d_lse)
    return dq, dk, dv, None, None, None


_forward.register_autograd(_autograd, setup_context=_setup_context)


def hsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiers: Sequence[Tier],
                  scale: float = 0.0, kv_lens: Optional[torch.Tensor] = None, return_lse: bool = False):
    """softmax(q·kᵀ·scale + mask)·v for q, k, v of shape [B, H, N, D] (last stride 1), the mask being
    the tier of `tiers` for N (bidirectional). `scale` 0 means 1/√D. `kv_lens` [B] (optional): keys
    at or past each batch's length are masked. With `return_lse`, also the natural-log log-sum-exp
    [B, H, N] of the scaled scores (differentiable too; float32 on CUDA)."""
    o, lse = _forward(q, k, v, flatten_tiers(tiers), float(scale), kv_lens)
    return (o, lse) if return_lse else o


def single_tier(window: int = 0, rate: int = 1, span: int = 0, globals_count: int = 0, sqrt_cap: int = 0,
                dense: bool = False) -> list[Tier]:
    """A one-tier table for every N: a local window, one dilation (rate, span) and leading global
    tokens, or dense."""
    return [Tier(INT_MAX, dense, window, rate, span, globals_count, sqrt_cap)]
