"""Quality of a trained DrDiff against the autoregressive baseline, on the same held-out documents.

    python -m drdiff.evaluate --model models/drdiff-text --ar runs/ar/ema.pt --judge runs/judge/ema.pt \
        --corpus data/corpus --out runs/eval

Writes `quality.json`, `samples.txt` and PNG plots into --out:
- held-out loss in bits per byte: AR exact (next-token cross-entropy); DrDiff the cross-entropy of its
  categorical x0-prediction at fixed noise levels t (a fixed-noise cross-entropy, not a likelihood
  bound), and their average over a uniform t grid, per source;
- generative perplexity of samples under the separately trained AR judge, beside the samples' unigram
  entropy, with reference rows: held-out text, a unigram sampler, the AR baseline's samples;
- distinct-n and repeated n-grams (within 1K-token windows);
- the step study: DDIM, 2M, 3M at 5, 10, 20, 50 steps, with and without anchor guidance;
- long range: the judge's loss by position bucket over 16K-token samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Tokenizer, documents, token_stream
from .export import load as load_dir
from .model import DrDiff, ModelConfig, alpha_bar
from .sampler import SampleSettings, generate
from .train import make_noisy


def load_ar(path: str, device) -> DrDiff:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    m = DrDiff(ModelConfig.from_json(ck["config"]))
    m.load_state_dict(ck["weights"])
    return m.to(device).eval()


def _windows(total: int, n: int):
    """Windows [start, start + n) that cover 0..total once with a fixed length n (one shape for the
    compiled attention): the last one is moved back to end at `total`; `new` is where its unscored
    positions begin."""
    if total <= n:
        yield 0, 0
        return
    done = 0
    while done < total:
        start = min(done, total - n)
        yield start, done - start
        done = start + n


@torch.no_grad()
def ar_nll(model: DrDiff, ids: torch.Tensor, device, chunk: int = 4096) -> torch.Tensor:
    """Per-token next-token NLL (nats) of a 1-D id tensor, in windows of `chunk` (a window's first
    token is conditioned on nothing before it); returns [len - 1], each position scored once."""
    out = []
    for s, new in _windows(len(ids) - 1, chunk):
        x = ids[s:s + chunk + 1].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            lg, _ = model.ar_logits(x[:-1].view(1, -1))
        out.append(F.cross_entropy(lg[0].float(), x[1:], reduction="none")[new:])
    return torch.cat(out)


@torch.no_grad()
def diffusion_ce(model: DrDiff, ids: torch.Tensor, t: float, device, seed: int, n: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy of the categorical x0-prediction at noise level t (no prompt), in
    windows of n tokens, each position scored once; a self-conditioned model gets its own first
    estimate at the same x_t, as a sampling step would."""
    out = []
    g = torch.Generator(device=device).manual_seed(seed)
    a = float(alpha_bar(torch.tensor(t)))
    for s, new in _windows(len(ids), n):
        x = ids[s:s + n].to(device).view(1, -1)
        x0 = model.table()[x]
        eps = torch.randn(x0.shape, device=device, generator=g)
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        tt = torch.full((1,), t, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            prev = model(xt, tt)[0] if model.cfg.self_condition else None  # as sampling feeds it
            _, lg, _ = model(xt, tt, want_x0=False, x0_prev=prev)
        out.append(F.cross_entropy(lg[0].float(), x[0], reduction="none")[new:])
    return torch.cat(out)


def unigram_entropy_bits(ids: Sequence[int]) -> float:
    c = Counter(ids)
    n = sum(c.values())
    return -sum(v / n * math.log2(v / n) for v in c.values())


def distinct_n(ids: Sequence[int], n: int) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def repeated_ngrams(ids: Sequence[int], n: int = 4, window: int = 1024) -> float:
    """Share of n-grams that occur earlier in the same window of `window` tokens."""
    rep = tot = 0
    for w in range(0, len(ids), window):
        seen = set()
        seq = ids[w:w + window]
        for i in range(len(seq) - n + 1):
            g = tuple(seq[i:i + n])
            rep += g in seen
            tot += 1
            seen.add(g)
    return rep / max(1, tot)


def text_stats(samples: list[list[int]], judge: Optional[DrDiff], device) -> dict:
    """The judge's perplexity (None without a judge) beside the distribution figures."""
    nll = [ar_nll(judge, torch.tensor(s), device).mean().item() for s in samples] if judge is not None else None
    flat = [t for s in samples for t in s]
    return {"gen_ppl": float(math.exp(np.mean(nll))) if nll else None,
            "judge_nll": float(np.mean(nll)) if nll else None,
            "unigram_entropy_bits": unigram_entropy_bits(flat), "distinct_1": distinct_n(flat, 1),
            "distinct_2": distinct_n(flat, 2), "distinct_4": float(np.mean([distinct_n(s, 4) for s in samples])),
            "repeated_4grams": float(np.mean([repeated_ngrams(s) for s in samples]))}


@torch.no_grad()
def ar_sample(model: DrDiff, prompt: list[int], length: int, seed: int, device, temperature: float = 1.0,
              batch: int = 8) -> list[list[int]]:
    """Ancestral samples of the AR baseline (full re-encoding per token, in a batch: the model is
    small and the lengths short, so no KV cache)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor(prompt, device=device).view(1, -1).repeat(batch, 1)
    for _ in range(length):
        ctx = x[:, -2048:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            lg, _ = model.ar_logits(ctx, backend="sdpa")
        p = (lg[:, -1].float() / temperature).softmax(-1)
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], dim=1)
    return [row[len(prompt):].tolist() for row in x]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the exported DrDiff model directory")
    ap.add_argument("--ar", help="ema.pt of the AR baseline (without it: no AR rows)")
    ap.add_argument("--judge", help="ema.pt of the AR judge (without it: no generative perplexity, no long range)")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=8, help="samples per setting")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--long", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=400_000, help="held-out tokens per measure")
    ap.add_argument("--quick", action="store_true", help="a fraction of every measure (smoke test)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Each length and mask is one compiled FlexAttention graph (held-out windows, sample lengths, the
    # long samples, causal and not): past dynamo's default of 8 it would fall back to eager flex,
    # which materialises the scores.
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    os.makedirs(args.out, exist_ok=True)
    t_all = time.time()
    model, cfgj = load_dir(args.model)
    model = model.to(dev)
    tok = Tokenizer(os.path.join(args.model, cfgj["tokenizer"]["file"]))
    ar = load_ar(args.ar, dev) if args.ar else None
    judge = load_ar(args.judge, dev) if args.judge else None
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}

    def save() -> None:  # after every section: a run stopped by its time limit keeps what it measured
        res["seconds"] = time.time() - t_all
        with open(os.path.join(args.out, "quality.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        print(f"saved quality.json at {res['seconds']:.0f} s", flush=True)

    # ---- held-out loss, bits per byte, per source -------------------------------------------------
    docs = documents(args.corpus, "test", tok)
    by_src: dict = {}
    for src, text, ids in docs:
        by_src.setdefault(src, []).append((text, ids))
    ts = [0.1, 0.3, 0.5, 0.7, 0.9]
    held: dict = {}
    budget = args.eval_tokens // (10 if args.quick else 1)
    for src, items in sorted(by_src.items()):
        ids, nbytes = [], 0
        for text, x in items:
            if len(ids) >= budget // max(1, len(by_src)):
                break
            ids.extend(x)
            nbytes += len(text.encode("utf-8"))
        t_ids = torch.tensor(ids)
        row = {"tokens": len(ids), "bytes": nbytes, "bytes_per_token": nbytes / len(ids)}
        if ar is not None:
            row["ar_bpb"] = ar_nll(ar, t_ids, dev).sum().item() / math.log(2) / nbytes
        ces = {}
        for t in ts:
            ce = diffusion_ce(model, t_ids, t, dev, seed=int(t * 100)).sum().item()
            ces[f"{t:.1f}"] = ce / math.log(2) / nbytes
        row["drdiff_ce_bpb_at_t"] = ces
        row["drdiff_ce_bpb_mean_t"] = float(np.mean(list(ces.values())))
        held[src] = row
    tot_b = sum(r["bytes"] for r in held.values())
    res["held_out"] = {
        "per_source": held,
        "ar_bpb": sum(r["ar_bpb"] * r["bytes"] for r in held.values()) / tot_b if ar is not None else None,
        "drdiff_ce_bpb_mean_t": sum(r["drdiff_ce_bpb_mean_t"] * r["bytes"] for r in held.values()) / tot_b,
        "drdiff_ce_bpb_at_t": {k: sum(r["drdiff_ce_bpb_at_t"][k] * r["bytes"] for r in held.values()) / tot_b
                               for k in held[next(iter(held))]["drdiff_ce_bpb_at_t"]},
    }
    print("held-out", json.dumps(res["held_out"]["ar_bpb"]), json.dumps(res["held_out"]["drdiff_ce_bpb_at_t"]),
          flush=True)
    save()

    # ---- samples and their statistics -------------------------------------------------------------
    S = max(2, args.samples // (4 if args.quick else 1))
    L = args.length // (4 if args.quick else 1)
    valid_ids, _ = token_stream(args.corpus, "test", tok, cache=os.path.join(args.out, "tokens"))
    ref_samples = [valid_ids[i * L * 3:(i * L * 3) + L].astype(int).tolist() for i in range(S)]
    counts = np.bincount(valid_ids.astype(np.int64), minlength=tok.vocab).astype(np.float64)
    rng = np.random.default_rng(0)
    uni = [rng.choice(tok.vocab, size=L, p=counts / counts.sum()).tolist() for _ in range(S)]
    rows = {"held-out text": text_stats(ref_samples, judge, dev), "unigram sampler": text_stats(uni, judge, dev)}
    ar_s = ar_sample(ar, [tok.doc] if tok.doc >= 0 else [0], L, 1, dev, batch=S) if ar is not None else []
    if ar_s:
        rows["AR baseline, T = 1"] = text_stats(ar_s, judge, dev)
    res["samples_table"] = rows
    save()
    prompt = [tok.doc] if tok.doc >= 0 else [0]
    study = {}
    best = None
    settings = [(s, n, g) for g in (False, True) for s in ("ddim", "2m", "3m") for n in (5, 10, 20, 50)]
    if args.quick:
        settings = settings[:3] + settings[12:13]
    for solver, steps, guid in settings:
        t0 = time.time()
        st = SampleSettings(solver=solver, steps=steps, guidance=guid)
        smp = []
        for b in range(0, S, 8):
            smp += generate(model, prompt, L, 0, st, device=dev, backend="flex",
                            batch_seeds=list(range(1000 + b, 1000 + min(S, b + 8))), dtype=torch.bfloat16)
        key = f"{solver} {steps}{' +guidance' if guid else ''}"
        study[key] = {**text_stats(smp, judge, dev), "seconds": time.time() - t0}
        print(key, json.dumps(study[key]), flush=True)
        res["step_study"] = study
        save()
        if solver == "2m" and steps == 20 and not guid:
            best = smp
    res["step_study"] = study
    rows["DrDiff 2M, 20 steps"] = study.get("2m 20", next(iter(study.values())))
    res["samples_table"] = rows
    if best is None:
        best = smp

    # ---- long range -------------------------------------------------------------------------------
    Lg = args.long // (8 if args.quick else 1)
    long_s = generate(model, prompt, Lg, 0, SampleSettings("2m", 20), device=dev, backend="flex",
                      batch_seeds=[7, 8], dtype=torch.bfloat16)
    buckets = [0, 1024, 2048, 4096, 8192, 12288, Lg]
    lr = {}
    for name, seqs in (("DrDiff 2M 20", long_s),
                       ("held-out text", [valid_ids[i * Lg:(i + 1) * Lg].astype(int).tolist() for i in range(2)])):
        if judge is None:
            break
        nll = torch.stack([ar_nll(judge, torch.tensor(s), dev, chunk=Lg) for s in seqs]).mean(0).cpu().numpy()
        lr[name] = {f"{a}-{b}": float(nll[a:b].mean()) for a, b in zip(buckets[:-1], buckets[1:]) if b <= len(nll) + 1
                    and a < b}
    res["long_range"] = lr
    save()
    with open(os.path.join(args.out, "samples.txt"), "w") as fh:
        for i, s in enumerate(best[:2]):
            fh.write(f"==== DrDiff sample {i} (2M, 20 steps, {len(s)} tokens)\n{tok.decode(s)}\n\n")
        for i, s in enumerate(ar_s[:2]):
            fh.write(f"==== AR baseline sample {i} ({len(s)} tokens)\n{tok.decode(s)}\n\n")
        fh.write(f"==== DrDiff long sample, first 3000 tokens of {len(long_s[0])}\n{tok.decode(long_s[0][:3000])}\n")
    plots(res, args.out)
    print(json.dumps({"done": True, "seconds": res["seconds"]}), flush=True)


def plots(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = res["step_study"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for solver in ("ddim", "2m", "3m"):
        for guid, ls in ((False, "-"), (True, "--")):
            pts = [(int(k.split()[1]), v) for k, v in st.items() if k.split()[0] == solver and
                   ("+guidance" in k) == guid]
            if not pts:
                continue
            pts.sort()
            lab = solver + (" + guidance" if guid else "")
            if all(p[1]["gen_ppl"] is not None for p in pts):
                ax[0].plot([p[0] for p in pts], [p[1]["gen_ppl"] for p in pts], ls, marker="o", label=lab)
            ax[1].plot([p[0] for p in pts], [p[1]["unigram_entropy_bits"] for p in pts], ls, marker="o", label=lab)
    ref = res["samples_table"]["held-out text"]
    if ref["gen_ppl"] is not None:
        ax[0].axhline(ref["gen_ppl"], color="k", lw=0.8, label="held-out text")
    ax[1].axhline(ref["unigram_entropy_bits"], color="k", lw=0.8, label="held-out text")
    for a, yl in zip(ax, ("generative perplexity (AR judge)", "unigram entropy of samples (bits)")):
        a.set_xscale("log")
        a.set_xlabel("solver steps")
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "step_study.png"), dpi=120)
    if not res.get("long_range"):
        return

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, b in res["long_range"].items():
        ax.plot(list(b.keys()), list(b.values()), marker="o", label=name)
    ax.set_xlabel("token position bucket")
    ax.set_ylabel("AR judge loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "long_range.png"), dpi=120)


if __name__ == "__main__":
    main()
