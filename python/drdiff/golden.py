"""Golden files for the C++ parity tests (test/model/golden), made by PyTorch from a model directory:

- forward.safetensors: inputs x_t, t and PyTorch's fp32 x0 at a dense-tier and a sparse-tier length;
- samples.json: prompt, seed, solver, steps and the tokens of the PyTorch sampler (sampler.py);
- tokens.json: texts, their SentencePiece ids and the decoded text.

    python -m drdiff.golden --model models/drdiff-text --corpus data/corpus --out test/model/golden
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch

from .corpus import iter_documents
from .data import Tokenizer
from .export import load
from .sampler import SampleSettings, generate


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    model, c = load(args.model)
    tok = Tokenizer(os.path.join(args.model, c["tokenizer"]["file"]))
    de = model.cfg.embed_dim
    g = torch.Generator().manual_seed(2026)
    tensors = {}
    for tag, n, t in (("dense", 300, 0.35), ("sparse", 1100, 0.8), ("late", 640, 0.05)):
        # Inputs that look like the sampler's: noised embeddings of held-out-like ids.
        ids = torch.randint(0, model.cfg.vocab, (n,), generator=g)
        a = 1.0 - (t + 1e-4) ** 0.5
        xt = a ** 0.5 * model.table()[ids] + (1 - a) ** 0.5 * torch.randn(n, de, generator=g)
        with torch.no_grad():
            x0, _, _ = model(xt.view(1, n, de), torch.tensor([t]), backend="sdpa")
        tensors[f"xt.{tag}"] = xt.float().contiguous()
        tensors[f"x0.{tag}"] = x0[0].float().contiguous()
        tensors[f"t.{tag}"] = torch.tensor([t], dtype=torch.float32)
    save_file(tensors, os.path.join(args.out, "forward.safetensors"))

    prompt_text = "The following section describes"
    prompt = tok.encode([prompt_text])[0]
    cases = []
    for solver, order, steps, length, seed in (("2m", 2, 10, 200, 1), ("3m", 3, 6, 1100, 2), ("ddim", 1, 8, 120, 3)):
        ids = generate(model, prompt, length, seed, SampleSettings(solver=solver, steps=steps), device="cpu",
                       backend="sdpa")[0]
        cases.append({"prompt": prompt, "prompt_text": prompt_text, "seed": seed, "order": order, "steps": steps,
                      "length": length, "tokens": ids})
    with open(os.path.join(args.out, "samples.json"), "w") as fh:
        json.dump(cases, fh)

    texts = ["Hello, world!", "  indented\n\tand tabbed\n\n", "naïve café — “quotes” ✓ 日本語", "x" * 50,
             "def f(x):\n    return x ** 2  # comment\n", ""]
    for i, d in enumerate(iter_documents(args.corpus, "test")):
        if i >= 24:
            break
        texts.append(d["text"][:400])
    rows = []
    for t in texts:
        ids = tok.encode([t])[0]
        rows.append({"text": t, "ids": ids, "decoded": tok.decode(ids)})
    with open(os.path.join(args.out, "tokens.json"), "w") as fh:
        json.dump(rows, fh, ensure_ascii=False)
    print(f"golden files in {args.out}: {len(tensors) // 3} forward cases, {len(cases)} samples, {len(rows)} texts")


if __name__ == "__main__":
    main()
