"""Export to the C++ library's model directory, and load one back.

A model directory holds:
    model.safetensors   the tensors under parameter_specs' names (BF16 by default, F32 on request)
    config.json         sizes, attention tiers, schedule, sampling defaults, tokenizer file
    tokenizer.model     the SentencePiece model

    python -m drdiff.export --checkpoint runs/drdiff/ema.pt --tokenizer T.model --out models/drdiff-text
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

import torch

from .masks import INT_MAX
from .model import SQRT_DELTA, DrDiff, ModelConfig

FORMAT = "drdiff-model"
VERSION = 1


def config_json(cfg: ModelConfig, sampling: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    tiers = []
    for t in cfg.tiers:
        g = {"rule": "none", "count": 0, "sqrt_cap": 0}
        if not t.dense and (t.globals_count > 0 or t.sqrt_cap > 0):
            g = {"rule": "first", "count": t.globals_count, "sqrt_cap": t.sqrt_cap}
        tiers.append({"max_len": min(t.max_len, INT_MAX), "dense": t.dense, "window": t.window, "rate": t.rate,
                      "span": t.span, "globals": g})
    out = {
        "format": FORMAT,
        "version": VERSION,
        "sizes": {"vocab": cfg.vocab, "embed_dim": cfg.embed_dim, "d_model": cfg.d_model, "heads": cfg.heads,
                  "blocks": cfg.blocks, "experts": cfg.experts, "d_ff": cfg.d_ff,
                  "shared_experts": cfg.shared_experts, "time_dim": cfg.time_dim},
        "activation": cfg.activation,
        "rope_base": cfg.rope_base,
        "norm_eps": cfg.norm_eps,
        "prediction": cfg.prediction,
        **({"self_condition": True} if cfg.self_condition else {}),
        "router": {"kind": "top_k", "k": cfg.top_k, "renormalize": True},
        "attention": {"kind": "hsa", "tiers": tiers},
        "schedule": {"kind": "sqrt", "delta": SQRT_DELTA},
        "sampling": sampling or {"solver": "2m", "steps": 20, "t_start": 0.99, "t_end": 0.0,
                                 "spacing": "uniform_t", "rounding": "dot"},
        "tokenizer": {"kind": "sentencepiece", "file": "tokenizer.model"},
        "weights": "model.safetensors",
    }
    if extra:
        out.update(extra)
    return out


def export(model: DrDiff, tokenizer: str, out: str, dtype: str = "bf16", sampling: Optional[dict] = None,
           extra: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    if model.cfg.causal:
        raise ValueError("export: the autoregressive baseline is not a DrDiff model")
    os.makedirs(out, exist_ok=True)
    sd = model.library_state_dict()
    tdt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file({k: v.to(tdt).contiguous() for k, v in sd.items()}, tmp, metadata={"format": "drdiff"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    if os.path.abspath(tokenizer) != os.path.abspath(os.path.join(out, "tokenizer.model")):
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config_json(model.cfg, sampling, extra), fh, indent=2)
        fh.write("\n")


def model_config_from_json(c: dict) -> ModelConfig:
    from .masks import Tier

    if c.get("format") != FORMAT:
        raise ValueError(f"config.json: format is {c.get('format')!r}, expected {FORMAT!r}")
    s = c["sizes"]
    tiers = []
    for t in c["attention"]["tiers"]:
        g = t.get("globals", {})
        tiers.append(Tier(t["max_len"], t["dense"], t["window"], t["rate"], t["span"], g.get("count", 0),
                          g.get("sqrt_cap", 0)))
    return ModelConfig(vocab=s["vocab"], embed_dim=s["embed_dim"], d_model=s["d_model"], heads=s["heads"],
                       blocks=s["blocks"], experts=s["experts"], d_ff=s["d_ff"], shared_experts=s["shared_experts"],
                       time_dim=s["time_dim"], top_k=c["router"]["k"], activation=c["activation"],
                       rope_base=c["rope_base"], norm_eps=c["norm_eps"], prediction=c["prediction"],
                       self_condition=bool(c.get("self_condition", False)), tiers=tiers)


def load(directory: str) -> tuple[DrDiff, dict]:
    """The model of a directory, fp32 (weights as stored, widened)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as fh:
        c = json.load(fh)
    model = DrDiff(model_config_from_json(c))
    sd = load_file(os.path.join(directory, c["weights"]))
    model.load_library_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval(), c


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="ema.pt written by drdiff.train")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--solver", default="2m")
    args = ap.parse_args(argv)
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = DrDiff(ModelConfig.from_json(ck["config"]))
    model.load_state_dict(ck["weights"])
    sampling = {"solver": args.solver, "steps": args.steps, "t_start": 0.99, "t_end": 0.0, "spacing": "uniform_t",
                "rounding": "dot"}
    export(model, args.tokenizer, args.out, args.dtype, sampling, {"training": ck.get("state", {})})


if __name__ == "__main__":
    main()
