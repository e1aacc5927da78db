"""The DrDiff denoiser in PyTorch, with the C++ library's tensor names and math.

Names and shapes follow `parameter_specs` (include/drdiff/model/parameters.hpp), the forward follows
`model<cpu>::forward` (include/drdiff/cpu/model.hpp):

    h  = up(x_t) [+ up_sc(x̂0_prev)] + fc2(SiLU(fc1(sinusoidal(1000 t))))
    L x [ h += out(attn(RoPE(qkv(LN1(h)))));  h += MoE(LN2(h)) ]
    z  = down(LN(h))
    x0 = z                         (prediction "embedding")
    x0 = softmax(z E^T) E          (prediction "categorical": logits over the tied table E)

Attention runs through FlexAttention with block masks built from the same HSA tier table as the C++
`attn::hsa` (masks.py). The same module with `causal=True`, no time input and next-token logits is the
autoregressive baseline and judge.

Self-conditioning (`self_condition`, Chen et al.'s analog bits, CDCD, Plaid): the denoiser also takes
its own previous estimate x̂0_prev through `up_sc` (no bias, zero at initialisation, so a model without
it is the same function); zeros stand for "no estimate yet". Training feeds a detached first pass's
x̂0 to half of each batch, sampling feeds the previous solver step's x̂0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import Tier, default_tiers, mask_fn, tier_for, tiers_from_json, tiers_to_json


@dataclass
class ModelConfig:
    vocab: int = 8192
    embed_dim: int = 64
    d_model: int = 256
    heads: int = 4
    blocks: int = 8
    experts: int = 4
    d_ff: int = 384
    shared_experts: int = 0
    time_dim: int = 64
    top_k: int = 2
    activation: str = "gelu"  # or "swiglu"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    prediction: str = "categorical"  # or "embedding"
    causal: bool = False  # autoregressive baseline / judge
    self_condition: bool = False  # up_sc(x0_prev) added to the input (the previous step's x̂0)
    tiers: list = field(default_factory=default_tiers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_json(self) -> dict:
        d = asdict(self)
        d["tiers"] = tiers_to_json(self.tiers)
        return d

    @staticmethod
    def from_json(d: dict) -> "ModelConfig":
        d = dict(d)
        d["tiers"] = tiers_from_json(d.get("tiers", tiers_to_json(default_tiers())))
        return ModelConfig(**d)

    def active_parameters(self) -> int:
        """Matrix parameters used per token (the FLOP count of a forward is ~2x this)."""
        dm, ff, mats = self.d_model, self.d_ff, 3 if self.activation == "swiglu" else 2
        per_block = 4 * dm * dm + self.experts * dm + (self.top_k + self.shared_experts) * mats * dm * ff
        out = self.embed_dim * dm * 2
        if self.prediction == "categorical" or self.causal:
            out += self.vocab * self.embed_dim * 2  # logits and the softmax-weighted table
        return self.blocks * per_block + out + self.time_dim * dm + dm * dm


def rope_tables(n: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * base^(-2i/hd), [n, hd/2], computed in float64 as the C++ side does."""
    half = head_dim // 2
    pos = torch.arange(n, dtype=torch.float64, device=device).view(-1, 1)
    inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64, device=device) / head_dim)
    a = pos * inv.view(1, -1)
    return torch.cos(a).float(), torch.sin(a).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the (2i, 2i+1) pairs of x [B, H, N, D] by position."""
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    c, s = cos.view(1, 1, *cos.shape), sin.view(1, 1, *sin.shape)
    out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(f_i), sin(f_i)] with f_i = exp(-ln(10000) i / half) * 1000 t; t is [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    f = freqs.view(1, -1) * 1000.0 * t.double().view(-1, 1)
    return torch.cat((torch.cos(f), torch.sin(f)), dim=-1).float()


class TimeMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.time_dim, cfg.d_model)
        self.fc2 = nn.Linear(cfg.d_model, cfg.d_model)
        self.dim = cfg.time_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(time_features(t, self.dim))))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.heads, self.hd = cfg.heads, cfg.head_dim

    def forward(self, x, cos, sin, attend) -> torch.Tensor:
        B, N, dm = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D]
        q, k, v = apply_rope(qkv[0], cos, sin), apply_rope(qkv[1], cos, sin), qkv[2]
        o = attend(q, k, v)  # [B, H, N, D]
        return self.out(o.transpose(1, 2).reshape(B, N, dm))


class MoE(nn.Module):
    """Routed FFN: softmax router, top-k renormalised (router::top_k), GELU or SwiGLU experts without
    biases, optional shared experts with weight 1. Every expert runs on every token (dense compute,
    masked combine): at 4 experts top-2 that is simpler and as fast as a dispatch on a GPU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, dm, ff, S = cfg.experts, cfg.d_model, cfg.d_ff, cfg.shared_experts
        self.router = nn.Linear(dm, E)
        self.experts_up = nn.Parameter(torch.empty(E, ff, dm))
        self.experts_down = nn.Parameter(torch.empty(E, dm, ff))
        self.swiglu = cfg.activation == "swiglu"
        self.experts_gate = nn.Parameter(torch.empty(E, ff, dm)) if self.swiglu else None
        self.shared = S
        if S:
            self.shared_up = nn.Parameter(torch.empty(S, ff, dm))
            self.shared_down = nn.Parameter(torch.empty(S, dm, ff))
            self.shared_gate = nn.Parameter(torch.empty(S, ff, dm)) if self.swiglu else None
        self.k = cfg.top_k
        self.E = E

    def _ffn(self, x, up, gate, down):
        h = torch.einsum("td,efd->etf", x, up)
        if gate is not None:
            h = F.silu(torch.einsum("td,efd->etf", x, gate)) * h
        else:
            h = F.gelu(h)
        return torch.einsum("etf,edf->etd", h, down)  # [E, T, dm]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, N, dm = x.shape
        xt = x.reshape(-1, dm)
        logits = self.router(xt).float()
        prob = logits.softmax(-1)
        topv, topi = prob.topk(self.k, dim=-1)
        w = topv / topv.sum(-1, keepdim=True)
        gates = torch.zeros_like(prob).scatter(-1, topi, w)  # [T, E]
        y = self._ffn(xt, self.experts_up, self.experts_gate, self.experts_down)
        out = torch.einsum("etd,te->td", y, gates.to(y.dtype))
        if self.shared:
            out = out + self._ffn(xt, self.shared_up, self.shared_gate, self.shared_down).sum(0)
        # Switch-style balance loss and the router z-loss (ST-MoE).
        assign = torch.zeros_like(prob).scatter(-1, topi, 1.0)
        f = assign.mean(0) / self.k
        balance = self.E * (f * prob.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return out.view(B, N, dm), {"balance": balance, "z": z, "load": f.detach()}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoE(cfg)

    def forward(self, h, cos, sin, attend):
        h = h + self.attn(self.norm1(h), cos, sin, attend)
        f, aux = self.moe(self.norm2(h))
        return h + f, aux


_FLEX: dict = {}


def _flex(compiled: bool):
    """FlexAttention, compiled on the GPU (its eager form materialises the scores); inside a
    torch.compile'd region the compiled function is traced through like the plain one."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "c" not in _FLEX:
        _FLEX["c"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["c"]


class DrDiff(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        de, dm = cfg.embed_dim, cfg.d_model
        self.embed = nn.Embedding(cfg.vocab, de)
        # The soft absorbing state m. Kept at zero: the C++ sampler's DPM-Solver++ update is exact
        # for x_t = alpha x0 + sigma eps, which an m != 0 would shift (docs/weights.md).
        self.register_buffer("absorbing", torch.zeros(de))
        self.up = nn.Linear(de, dm)
        self.up_sc = nn.Linear(de, dm, bias=False) if cfg.self_condition else None
        self.time = TimeMLP(cfg) if not cfg.causal else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(dm, eps=cfg.norm_eps)
        self.down = nn.Linear(dm, de)
        self._masks: dict = {}
        self.raw_table = False
        self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------------

    def reset_parameters(self, seed: Optional[int] = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.cfg

        def normal(p, sd):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * sd)

        for name, p in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name == "embed.weight":
                normal(p, 1.0)
            elif name == "up_sc.weight":
                nn.init.zeros_(p)
            elif name == "up.weight":
                normal(p, 1.0 / math.sqrt(cfg.embed_dim))
            elif name == "time.fc1.weight":
                normal(p, 1.0 / math.sqrt(cfg.time_dim))
            elif "down" in name and "experts" in name or "shared_down" in name:
                normal(p, 0.02 / math.sqrt(2 * cfg.blocks))
            elif name.endswith("attn.out.weight"):
                normal(p, 0.02 / math.sqrt(2 * cfg.blocks))
            else:
                normal(p, 0.02)

    def table(self) -> torch.Tensor:
        """The embedding table E with every row at norm sqrt(embed_dim) (what is exported). A model
        loaded from a model directory uses the stored table as it is (`raw_table`), as the C++ side does."""
        w = self.embed.weight
        if self.raw_table:
            return w.float()
        return F.normalize(w.float(), dim=-1) * math.sqrt(self.cfg.embed_dim)

    def library_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the C++ library's names (parameter_specs), fp32 on the CPU."""
        cfg = self.cfg
        sd: dict[str, torch.Tensor] = {
            "embed.weight": self.table(),
            "absorbing": self.absorbing.float(),
            "up.weight": self.up.weight,
            "up.bias": self.up.bias,
        }
        if self.up_sc is not None:
            sd["up_sc.weight"] = self.up_sc.weight
        if self.time is not None:
            sd.update({
                "time.fc1.weight": self.time.fc1.weight, "time.fc1.bias": self.time.fc1.bias,
                "time.fc2.weight": self.time.fc2.weight, "time.fc2.bias": self.time.fc2.bias,
            })
        for b, blk in enumerate(self.blocks):
            p = f"blocks.{b}."
            sd[p + "norm1.weight"] = blk.norm1.weight
            sd[p + "norm1.bias"] = blk.norm1.bias
            sd[p + "attn.qkv.weight"] = blk.attn.qkv.weight
            sd[p + "attn.out.weight"] = blk.attn.out.weight
            sd[p + "norm2.weight"] = blk.norm2.weight
            sd[p + "norm2.bias"] = blk.norm2.bias
            sd[p + "moe.router.weight"] = blk.moe.router.weight
            sd[p + "moe.router.bias"] = blk.moe.router.bias
            sd[p + "moe.experts.up"] = blk.moe.experts_up
            if blk.moe.experts_gate is not None:
                sd[p + "moe.experts.gate"] = blk.moe.experts_gate
            sd[p + "moe.experts.down"] = blk.moe.experts_down
            if cfg.shared_experts:
                sd[p + "moe.shared.up"] = blk.moe.shared_up
                if blk.moe.shared_gate is not None:
                    sd[p + "moe.shared.gate"] = blk.moe.shared_gate
                sd[p + "moe.shared.down"] = blk.moe.shared_down
        sd.update({"norm.weight": self.norm.weight, "norm.bias": self.norm.bias,
                   "down.weight": self.down.weight, "down.bias": self.down.bias})
        return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}

    def load_library_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Loads tensors under the library's names; the table is then used as stored (raw_table)."""
        own = self.library_state_dict()
        missing = sorted(set(own) - set(sd))
        extra = sorted(set(sd) - set(own))
        if missing or extra:
            raise ValueError(f"tensor names differ: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, t in sd.items():
                if tuple(t.shape) != tuple(own[name].shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
                target = self._param_for(name)
                target.copy_(t.to(target.dtype))
        self.raw_table = True

    def _param_for(self, name: str) -> torch.Tensor:
        parts = name.split(".")
        if name == "absorbing":
            return self.absorbing
        if parts[0] == "blocks":
            blk = self.blocks[int(parts[1])]
            rest = ".".join(parts[2:])
            moe_map = {"moe.experts.up": blk.moe.experts_up, "moe.experts.down": blk.moe.experts_down,
                       "moe.experts.gate": blk.moe.experts_gate}
            if blk.moe.shared:
                moe_map.update({"moe.shared.up": blk.moe.shared_up, "moe.shared.down": blk.moe.shared_down,
                                "moe.shared.gate": blk.moe.shared_gate})
            if rest in moe_map:
                return moe_map[rest]
            return blk.get_parameter(rest)
        return self.get_parameter(name)

    # ---- attention masks -------------------------------------------------------------------------

    def rope(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(n, self.cfg.head_dim, self.cfg.rope_base, device)

    def block_mask(self, n: int, device):
        from torch.nn.attention.flex_attention import create_block_mask

        key = (n, str(device))
        if key not in self._masks:
            tier = tier_for(self.cfg.tiers, n)
            fn = mask_fn(tier, n, self.cfg.causal)

            def mod(b, h, q, kv):
                return fn(q, kv)

            self._masks[key] = create_block_mask(mod, None, None, n, n, device=str(device), _compile=False)
        return self._masks[key]

    def attend_fn(self, n: int, device, backend: str = "flex", mask=None):
        """Attention over the tier's mask: "flex" (FlexAttention with `mask`, a BlockMask, or one built
        and cached here), "sdpa" (a dense boolean mask, for small n and CPU tests) or "drdiff" (the
        library's kernels through drdiff.attention_op, on CPU or CUDA tensors)."""
        if backend == "drdiff":  # the library's own kernels, forward and backward (drdiff.attention_op)
            if self.cfg.causal:
                raise ValueError("the drdiff attention operator is bidirectional; a causal model uses flex or sdpa")
            from .attention_op import hsa_attention

            tiers = self.cfg.tiers

            def attend(q, k, v):
                return hsa_attention(q, k, v, tiers)

            return attend
        if backend == "sdpa":
            tier = tier_for(self.cfg.tiers, n)
            m = mask_fn(tier, n, self.cfg.causal)(torch.arange(n, device=device).view(-1, 1),
                                                   torch.arange(n, device=device).view(1, -1))

            def attend(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

            return attend
        bm = mask if mask is not None else self.block_mask(n, device)
        flex = _flex(str(device).startswith("cuda"))

        def attend(q, k, v):
            return flex(q, k, v, block_mask=bm)

        return attend

    # ---- forward ---------------------------------------------------------------------------------

    def trunk(self, x_in: torch.Tensor, t: Optional[torch.Tensor], attend,
              x0_prev: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """x_in [B, N, de] (and, self-conditioned, the previous estimate x0_prev [B, N, de] or None for
        zeros) -> z [B, N, de] and the router losses (summed over blocks)."""
        B, N, _ = x_in.shape
        h = self.up(x_in)
        if self.up_sc is not None and x0_prev is not None:
            h = h + self.up_sc(x0_prev.to(h.dtype))
        if self.time is not None:
            h = h + self.time(t).to(h.dtype).view(B, 1, -1)
        cos, sin = self.rope(N, x_in.device)
        balance = x_in.new_zeros((), dtype=torch.float32)
        z = x_in.new_zeros((), dtype=torch.float32)
        loads = []
        for blk in self.blocks:
            h, aux = blk(h, cos, sin, attend)
            balance = balance + aux["balance"]
            z = z + aux["z"]
            loads.append(aux["load"])
        out = self.down(self.norm(h))
        return out, {"balance": balance / len(self.blocks), "z": z / len(self.blocks), "load": torch.stack(loads)}

    def logits(self, z: torch.Tensor, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        return z.float() @ (self.table() if table is None else table).t()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask=None, backend: str = "flex", want_x0: bool = True,
                x0_prev: Optional[torch.Tensor] = None):
        """Denoiser: x_t [B, N, de], t [B] -> (x0 [B, N, de] or None, logits [B, N, V] or None, aux).
        `mask`: a prebuilt FlexAttention BlockMask for this length (pass it under torch.compile).
        `want_x0=False` skips softmax(logits)·E, which the training loss does not use. `x0_prev`: the
        previous estimate of a self-conditioned model (None: zeros, i.e. none yet)."""
        attend = self.attend_fn(x_t.shape[1], x_t.device, backend, mask)
        z, aux = self.trunk(x_t, t, attend, x0_prev)
        if self.cfg.prediction == "categorical":
            table = self.table()
            lg = self.logits(z, table)
            return (lg.softmax(-1) @ table if want_x0 else None), lg, aux
        return z.float(), None, aux

    def ar_logits(self, ids: torch.Tensor, mask=None, backend: str = "flex"):
        """Autoregressive use: ids [B, N] -> next-token logits [B, N, V] (causal=True models)."""
        x = self.table()[ids]
        attend = self.attend_fn(ids.shape[1], ids.device, backend, mask)
        z, aux = self.trunk(x.to(self.up.weight.dtype), None, attend)
        return self.logits(z), aux


# ---- the diffusion: DiffuSeq's sqrt schedule, as solver::vp_sqrt ------------------------------------

SQRT_DELTA = 1e-4


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """abar(t) = 1 - sqrt(t + delta) (solver::vp_sqrt: log alpha = 0.5 log1p(-sqrt(t + delta)))."""
    return (1.0 - torch.sqrt(t.double() + SQRT_DELTA)).clamp_min(0.0)


def soft_absorb(x0: torch.Tensor, m: torch.Tensor, abar: torch.Tensor, target: torch.Tensor, rate: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The soft absorbing forward process (anchor::absorb): target tokens get
    sqrt(abar)(x0 - m) + sqrt(1 - abar) eps + m, or m itself with probability sqrt(1 - abar) rate;
    other tokens stay x0. x0 [B, N, d], abar [B], target [B, N] bool."""
    B, N, d = x0.shape
    a = abar.to(torch.float32).view(B, 1, 1)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float32)
    xt = a.sqrt() * (x0.float() - m) + (1 - a).sqrt() * eps + m
    if rate > 0:
        p = (1 - a.view(B, 1)).sqrt() * rate
        u = torch.rand((B, N), device=x0.device, generator=generator)
        xt = torch.where((u < p).unsqueeze(-1), m.expand_as(xt), xt)
    return torch.where(target.unsqueeze(-1), xt, x0.float())
