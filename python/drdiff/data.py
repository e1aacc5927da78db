"""Token streams from the corpus shards (corpus.py): every split tokenized once with the SentencePiece
model, documents joined by the `<doc>` separator, cached as uint16 .npy next to the shards."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from .corpus import count_by_source, iter_documents


class Tokenizer:
    """The SentencePiece model with the separator id."""

    def __init__(self, path: str):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} is missing")
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.path = path
        self.vocab = self.sp.get_piece_size()
        sep = self.sp.piece_to_id("<doc>")
        self.doc = sep if sep != self.sp.unk_id() else -1

    def encode(self, texts: list[str], threads: int = 8) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=threads)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def token_stream(corpus: str, split: str, tok: Tokenizer, cache: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """The split as one uint16 array (documents separated by <doc>) and per-source byte/token counts."""
    with open(tok.path, "rb") as fh:
        tag = hashlib.sha256(fh.read()).hexdigest()[:12]
    cache = cache or corpus
    path = os.path.join(cache, f"{split}.{tag}.npy")
    meta_path = path + ".json"
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as fh:
            return np.load(path), json.load(fh)
    docs = list(iter_documents(corpus, split))
    ids = tok.encode([d["text"] for d in docs])
    stats = count_by_source(docs, ids)
    parts = []
    for x in ids:
        if tok.doc >= 0:
            parts.append(np.array([tok.doc], dtype=np.uint16))
        parts.append(np.asarray(x, dtype=np.uint16))
    arr = np.concatenate(parts)
    os.makedirs(cache, exist_ok=True)
    np.save(path, arr)
    with open(meta_path, "w") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)
    return arr, stats


def documents(corpus: str, split: str, tok: Tokenizer) -> list[tuple[str, str, list[int]]]:
    """(source, text, ids) of every document of a split."""
    docs = list(iter_documents(corpus, split))
    ids = tok.encode([d["text"] for d in docs])
    return [(d["source"], d["text"], x) for d, x in zip(docs, ids)]


class WindowSampler:
    """Random windows of `n` tokens from a stream, reproducible from (seed, step)."""

    def __init__(self, stream: np.ndarray, seed: int):
        self.stream = stream
        self.seed = seed

    def batch(self, step: int, batch: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, n])
        starts = rng.integers(0, len(self.stream) - n, size=batch)
        return np.stack([self.stream[s:s + n] for s in starts]).astype(np.int64)


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Tokenize the corpus splits once into the token cache.")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--cache", required=True)
    args = ap.parse_args(argv)
    tok = Tokenizer(args.tokenizer)
    for split in ("train", "valid", "test"):
        arr, stats = token_stream(args.corpus, split, tok, cache=args.cache)
        print(f"{split}: {len(arr)} tokens, {sum(s['bytes'] for s in stats.values())} bytes", flush=True)


if __name__ == "__main__":
    main()
