"""The trainer: DrDiff (continuous diffusion, categorical data prediction) or the autoregressive
baseline/judge, on the GPU machine.

bf16 autocast, torch.compile, fused AdamW, warm-up / stable / decay learning rate, EMA of the weights,
router balance and z-losses, a mix of sequence lengths (every HSA tier), a clean prompt prefix on part
of the batch, checkpoint and resume across runs of limited length (`--minutes` per run, `--budget` in
all), a JSON-lines log, a loss curve as PNG, and the throughput against the GEMM rate of the same run.

    python -m drdiff.train --kind diffusion --corpus data/corpus --tokenizer T.model --out runs/drdiff \
        --budget 15 --minutes 9
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import Tokenizer, WindowSampler, token_stream
from .masks import tier_for, mask_fn
from .model import SQRT_DELTA, DrDiff, ModelConfig, alpha_bar, soft_absorb


def gemm_rate(device) -> float:
    """bf16 matmul FLOP/s measured here (8192^3, the best of 5 timed batches); 0 on the CPU."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            a @ b
        e1.record()
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (e0.elapsed_time(e1) / 1e3))
    return best


def allowed_pairs(cfg: ModelConfig, n: int, device) -> int:
    """Pairs (i, j) the tier's mask allows at length n (counted in row chunks)."""
    fn = mask_fn(tier_for(cfg.tiers, n), n, cfg.causal)
    j = torch.arange(n, device=device).view(1, -1)
    total = 0
    for r0 in range(0, n, 2048):
        i = torch.arange(r0, min(n, r0 + 2048), device=device).view(-1, 1)
        total += int(fn(i, j).sum())
    return total


def lr_at(step: int, progress: float, peak: float, warmup: int, decay_from: float, floor: float) -> float:
    """Warm-up (linear over `warmup` steps), stable at `peak`, then linear decay to `floor`*peak over
    the last (1 - decay_from) of the time budget."""
    w = min(1.0, (step + 1) / warmup)
    if progress <= decay_from:
        return peak * w
    f = min(1.0, (progress - decay_from) / (1 - decay_from))
    return peak * w * (1 - f * (1 - floor))


class TimeWarp:
    """Where in t the training samples: a density over `bins` equal bins of [0, 1) proportional to
    each bin's running mean loss, mixed with `floor` of the uniform density (CDCD's time warping, in
    its simplest form). The loss of the categorical prediction is ~0 at small t (measured: < 0.003
    bits per byte below t = 0.3 after 20M tokens), so uniform t spends most of a batch where there is
    nothing left to learn. `update` takes each sequence's t and mean loss."""

    def __init__(self, bins: int = 20, floor: float = 0.2, decay: float = 0.98):
        self.loss = np.ones(bins)
        self.bins, self.floor, self.decay = bins, floor, decay

    def density(self) -> np.ndarray:
        p = np.maximum(self.loss, 1e-6)
        p = p / p.sum()
        return (1 - self.floor) * p + self.floor / self.bins

    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """Maps stratified uniforms u in [0, 1) through the inverse CDF of the density."""
        cdf = np.concatenate([[0.0], np.cumsum(self.density())])
        cdf[-1] = 1.0
        c = torch.as_tensor(cdf, device=u.device, dtype=torch.float64)
        k = (torch.searchsorted(c, u, right=True) - 1).clamp(0, self.bins - 1)
        frac = (u - c[k]) / (c[k + 1] - c[k]).clamp_min(1e-12)
        return (k.double() + frac.clamp(0, 1)) / self.bins

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        k = np.minimum((t.detach().double().cpu().numpy() * self.bins).astype(int), self.bins - 1)
        lv = loss.detach().float().cpu().numpy()
        for b in np.unique(k):
            self.loss[b] = self.decay * self.loss[b] + (1 - self.decay) * float(lv[k == b].mean())

    def state(self) -> list:
        return self.loss.tolist()


def make_noisy(model: DrDiff, ids: torch.Tensor, prefix_frac: float, rate: float, gen: torch.Generator,
               warp: Optional[TimeWarp] = None):
    """The forward process for a batch (eager: it draws the random numbers): x_t, t and the target
    flags (False on the clean prompt prefix). t is stratified over the batch, uniform or through `warp`."""
    B, N = ids.shape
    dev = ids.device
    with torch.no_grad():
        x0 = model.table()[ids]
    # Stratified t over the batch, in [0, 1 - delta): abar(t) = 1 - sqrt(t + delta) >= 0 there
    # (at t -> 1 the sqrt schedule would give abar < 0 and a NaN sqrt).
    u = (torch.arange(B, device=dev, dtype=torch.float64) + torch.rand(B, device=dev, generator=gen,
                                                                       dtype=torch.float64)) / B
    if warp is not None:
        u = warp.sample(u)
    t = u[torch.randperm(B, device=dev, generator=gen)] * (1.0 - SQRT_DELTA)
    # A clean prompt prefix on part of the batch: prefix length uniform in [0, N/2).
    pos = torch.arange(N, device=dev).view(1, -1)
    has = torch.rand(B, device=dev, generator=gen) < prefix_frac
    plen = (torch.rand(B, device=dev, generator=gen) * (N // 2)).long() * has.long()
    target = pos >= plen.view(-1, 1)
    xt = soft_absorb(x0, model.absorbing, alpha_bar(t), target, rate, gen)
    return xt, t.float(), target


def denoise_loss(model: DrDiff, xt: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, target: torch.Tensor,
                 mask=None):
    """Cross-entropy of the categorical data prediction on the target positions. `mask`: a BlockMask
    (FlexAttention), or the string "sdpa" (dense masks: CPU smoke runs) or "drdiff" (the library's
    attention operator)."""
    B, N = ids.shape
    backend = mask if isinstance(mask, str) else "flex"
    bm = None if isinstance(mask, str) else mask
    with torch.autocast(xt.device.type, dtype=torch.bfloat16, enabled=xt.device.type == "cuda"):
        x0_prev = None
        if model.cfg.self_condition:
            # Self-conditioning: the first half of the batch (its order is random) gets the estimate of a
            # first pass without gradient, the rest zeros (no estimate), as the first sampling step does.
            half = B // 2
            # The raw estimate everywhere (prompt positions too), as the sampler feeds it.
            with torch.no_grad():
                est, _, _ = model(xt[:half], t[:half], bm, backend, want_x0=True)
            x0_prev = torch.cat([est.float(), torch.zeros_like(xt[half:], dtype=torch.float32)])
        _, logits, aux = model(xt, t, bm, backend, want_x0=False, x0_prev=x0_prev)
    ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1), reduction="none").view(B, N)
    w = target.float()
    aux["seq_loss"] = ((ce * w).sum(1) / w.sum(1).clamp_min(1)).detach()  # per sequence, for TimeWarp
    return (ce * w).sum() / w.sum(), aux


def diffusion_loss(model: DrDiff, ids: torch.Tensor, prefix_frac: float, rate: float, gen: torch.Generator,
                   loss_fn=denoise_loss, mask=None, warp: Optional[TimeWarp] = None):
    xt, t, target = make_noisy(model, ids, prefix_frac, rate, gen, warp)
    loss, aux = loss_fn(model, xt, t, ids, target, mask)
    if warp is not None:
        warp.update(t, aux["seq_loss"])
    return loss, aux


def ar_loss(model: DrDiff, ids: torch.Tensor, mask=None) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy; ids hold N + 1 tokens (the mask is for N)."""
    backend = "sdpa" if isinstance(mask, str) else "flex"
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        logits, aux = model.ar_logits(ids[:, :-1], None if backend == "sdpa" else mask, backend)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return loss, aux


def plot(log_path: str, png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(log_path) if l.strip()]
    tr = [r for r in rows if r.get("kind") == "train"]
    va = [r for r in rows if r.get("kind") == "valid"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr], lw=0.7, label="train (batch)")
    if va:
        ax.plot([r["tokens"] / 1e6 for r in va], [r["loss"] for r in va], "o-", label="held-out")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["diffusion", "ar"], default="diffusion")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="JSON of ModelConfig fields to override")
    ap.add_argument("--budget", type=float, default=15.0, help="training minutes in all (over every resume)")
    ap.add_argument("--minutes", type=float, default=9.0, help="minutes in this run, then checkpoint and exit")
    ap.add_argument("--budget-file", help="a file holding the budget in minutes, read again every 25 steps when it "
                                          "exists (a lease whose length is known only after the start)")
    ap.add_argument("--lengths", default="1024,4096,8192,20480")
    ap.add_argument("--tokens-per-step", type=int, default=122880)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--embed-lr-mult", type=float, default=3.0)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--decay-from", type=float, default=0.8)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--balance", type=float, default=0.01)
    ap.add_argument("--zloss", type=float, default=1e-3)
    ap.add_argument("--prefix-frac", type=float, default=0.5)
    ap.add_argument("--absorb-rate", type=float, default=0.0)
    ap.add_argument("--t-sampling", choices=["uniform", "adaptive"], default="adaptive",
                    help="t of the diffusion loss: uniform, or TimeWarp (density by the running loss per t bin)")
    ap.add_argument("--init", help="a model directory (drdiff.export) whose weights start this run: training "
                                   "goes on from a shipped checkpoint with a fresh optimizer and warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", choices=["flex", "sdpa", "drdiff"], default="flex",
                    help="flex: FlexAttention block masks; sdpa: dense masks (small CPU runs); drdiff: the "
                         "library's operator (drdiff.attention_op: CPU or CUDA tensors; diffusion only)")
    ap.add_argument("--valid-len", type=int, default=4096)
    ap.add_argument("--valid-every", type=float, default=2.0, help="minutes between held-out evaluations")
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.jsonl")
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    def log(rec: dict) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    tok = Tokenizer(args.tokenizer)
    train_ids, _ = token_stream(args.corpus, "train", tok, cache=os.path.join(args.out, "..", "tokens"))
    valid_ids, _ = token_stream(args.corpus, "valid", tok, cache=os.path.join(args.out, "..", "tokens"))
    cfg = ModelConfig(vocab=tok.vocab, causal=args.kind == "ar")
    init = None
    if args.init and not os.path.isfile(ckpt_path):  # a resumed run takes its checkpoint, not --init
        from .export import load as load_dir

        init, init_json = load_dir(args.init)
        cfg = init.cfg
        if args.kind == "ar" or cfg.vocab != tok.vocab:
            raise SystemExit(f"--init {args.init}: a diffusion model of vocabulary {tok.vocab} is needed "
                             f"(it has {cfg.vocab}; --kind {args.kind})")
    if args.config:
        over = json.loads(args.config)
        cfg = ModelConfig.from_json({**cfg.to_json(), **over})
    torch.manual_seed(args.seed)
    model = DrDiff(cfg).to(dev)
    model.reset_parameters(seed=args.seed)
    if init is not None:
        # A self-conditioned model may start from one without: up_sc keeps its zeros, so it begins as
        # the same function. Any other difference is an error.
        missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        if unexpected or set(missing) - {"up_sc.weight"}:
            raise SystemExit(f"--init {args.init}: tensors differ (missing {missing}, unexpected {unexpected})")
        print(json.dumps({"kind": "init", "from": args.init, "training": init_json.get("training")}), flush=True)
    model = model.to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    embed = [model.embed.weight]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight"]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([
        {"params": embed, "lr_mult": args.embed_lr_mult, "weight_decay": 0.0},
        {"params": decay, "lr_mult": 1.0, "weight_decay": 0.1},
        {"params": other, "lr_mult": 1.0, "weight_decay": 0.0},
    ], lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=dev.type == "cuda")

    state = {"step": 0, "tokens": 0, "seconds": 0.0}
    if os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        log({"kind": "resume", **state})
    else:
        with open(os.path.join(args.out, "config.json"), "w") as fh:
            json.dump({"model": cfg.to_json(), "args": vars(args)}, fh, indent=1)

    lengths = [int(x) for x in args.lengths.split(",")]
    for n in lengths:
        if args.tokens_per_step % n:
            raise SystemExit(f"--tokens-per-step {args.tokens_per_step} is not a multiple of the length {n}")
    sampler = WindowSampler(train_ids, args.seed)
    warp = TimeWarp() if args.kind == "diffusion" and args.t_sampling == "adaptive" else None
    if warp is not None and "warp" in state:
        warp.loss = np.asarray(state["warp"], dtype=np.float64)
    gen = torch.Generator(device=dev).manual_seed(args.seed * 1000003 + state["step"])

    dl = torch.compile(denoise_loss, dynamic=False) if args.compile else denoise_loss
    al = torch.compile(ar_loss, dynamic=False) if args.compile else ar_loss
    vlen = args.valid_len
    if args.attention == "drdiff" and args.kind != "diffusion":
        raise SystemExit("--attention drdiff: the operator is bidirectional; the AR models train with flex or sdpa")
    masks = {n: model.block_mask(n, dev) if args.attention == "flex" else args.attention for n in lengths + [vlen]}

    def run(ids, n):
        if args.kind == "diffusion":
            loss, aux = diffusion_loss(model, ids, args.prefix_frac, args.absorb_rate, gen, dl, masks[n], warp)
        else:
            loss, aux = al(model, ids, masks[n])
        total = loss + args.balance * aux["balance"] + args.zloss * aux["z"]
        total.backward()
        return loss.detach(), aux

    rate = gemm_rate(dev) if state["step"] == 0 or "gemm" not in state else state["gemm"]
    state["gemm"] = rate
    pairs = {n: allowed_pairs(cfg, n, dev) for n in lengths}
    n_act = cfg.active_parameters()
    log({"kind": "plan", "gemm_flops": rate, "active_parameters": n_act,
         "parameters": sum(p.numel() for p in model.parameters()), "allowed_pairs": pairs, **state})

    @torch.no_grad()
    def validate() -> float:
        m = ema
        vs = WindowSampler(valid_ids, 12345)
        losses = []
        g = torch.Generator(device=dev).manual_seed(777)
        for k in range(4):
            if args.kind == "diffusion":
                ids = torch.from_numpy(vs.batch(k, 4, vlen)).to(dev)
                l, _ = diffusion_loss(m, ids, 0.0, 0.0, g, dl, masks[vlen])
            else:
                ids = torch.from_numpy(vs.batch(k, 4, vlen + 1)).to(dev)
                l, _ = al(m, ids, masks[vlen])
            losses.append(float(l))
        return float(np.mean(losses))

    t_run = time.time()
    last_valid = time.time()
    last_save = time.time()

    def read_budget(current: float) -> float:
        """The budget in seconds: --budget, or the minutes in --budget-file once it exists."""
        if args.budget_file and os.path.isfile(args.budget_file):
            text = open(args.budget_file).read().strip()
            if text:
                return float(text) * 60
        return current

    budget_s = read_budget(args.budget * 60)
    window_tok, window_t, window_flops = 0, time.time(), 0.0
    while state["seconds"] < budget_s and time.time() - t_run < args.minutes * 60:
        t0 = time.time()
        n = lengths[state["step"] % len(lengths)]
        bsz = args.tokens_per_step // n
        extra = 1 if args.kind == "ar" else 0  # the next-token target of the last position
        ids = torch.from_numpy(sampler.batch(state["step"], bsz, n + extra)).to(dev, non_blocking=True)
        progress = state["seconds"] / budget_s
        lr = lr_at(state["step"], progress, args.lr, args.warmup, args.decay_from, 0.1)
        for g_ in opt.param_groups:
            g_["lr"] = lr * g_["lr_mult"]
        loss, aux = run(ids, n)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(gnorm):
            opt.step()
        else:  # a non-finite gradient: skip the update (counted and logged), never apply it
            state["skipped"] = state.get("skipped", 0) + 1
            log({"kind": "skip", "step": state["step"], "grad_norm": float(gnorm), "loss": float(loss)})
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = args.ema if state["step"] > args.warmup else 0.0
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)
        state["step"] += 1
        state["tokens"] += bsz * n
        if warp is not None:
            state["warp"] = warp.state()
        window_tok += bsz * n
        window_flops += 6 * n_act * bsz * n + 3 * 4 * cfg.d_model * pairs[n] * bsz * cfg.blocks
        if state["step"] % 25 == 0:
            new = read_budget(budget_s)
            if new != budget_s:
                log({"kind": "budget", "step": state["step"], "minutes": new / 60, "was": budget_s / 60})
                budget_s = new
            lv = float(loss)
            el = time.time() - window_t
            log({"kind": "train", "step": state["step"], "tokens": state["tokens"], "loss": lv, "lr": lr,
                 "grad_norm": float(gnorm), **({"t_loss": [round(x, 3) for x in warp.state()]} if warp else {}),
                 "len": n, "balance": float(aux["balance"]), "z": float(aux["z"]),
                 "tokens_per_s": window_tok / el, "model_flops": window_flops / el,
                 "mfu_vs_gemm": window_flops / el / rate if rate else None, "minutes": state["seconds"] / 60})
            window_tok, window_t, window_flops = 0, time.time(), 0.0
        dt = time.time() - t0
        if dt > 20:  # a step that compiled a graph (first of each length in a run): not training time
            state["compile_seconds"] = state.get("compile_seconds", 0.0) + dt
        else:
            state["seconds"] += dt
        if time.time() - last_valid > args.valid_every * 60:
            log({"kind": "valid", "step": state["step"], "tokens": state["tokens"], "loss": validate()})
            last_valid = time.time()
        if time.time() - last_save > 120:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "state": state}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
            last_save = time.time()

    log({"kind": "valid", "step": state["step"], "tokens": state["tokens"], "loss": validate()})
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "state": state},
               ckpt_path + ".tmp")
    os.replace(ckpt_path + ".tmp", ckpt_path)
    # The EMA weights alone, for export and evaluation (no optimizer state).
    torch.save({"config": cfg.to_json(), "weights": ema.state_dict(), "state": state},
               os.path.join(args.out, "ema.pt"))
    plot(log_path, os.path.join(args.out, "loss.png"), f"{args.kind}: {cfg.blocks}x{cfg.d_model}")
    log({"kind": "done" if state["seconds"] >= budget_s else "paused", **state})


if __name__ == "__main__":
    main()
