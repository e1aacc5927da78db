"""Trains the 8K SentencePiece BPE tokenizer on the corpus' train split and measures it.

    python3 -m drdiff.tokenizer_train --corpus data/corpus --out models/drdiff-text/tokenizer.model

Id layout: <unk> = 0, the control symbol <doc> (the document separator: never produced by encoding text,
inserted by the data pipeline) = 1, the 256 byte pieces <0x00>..<0xFF> = 2..257, then characters and
merges up to 8191. No <s>, </s> or <pad> (ids -1).

SentencePiece trains on lines: every non-empty line of every train document is one training sentence
(all of them while there are at most --max-lines; beyond that a seeded sample). '\\n' is never a piece:
it is encoded as the byte piece <0x0A>. Spaces are kept as they are (identity normalisation, no extra
whitespace removal, no dummy prefix), so decode(encode(text)) == text for any text without U+2581.

Training is deterministic: the same corpus gives the same .model bytes (checked with --repeat 2).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import time
from typing import Optional

from .corpus import SPLITS, count_by_source, iter_documents

SETTINGS = dict(
    model_type="bpe",
    vocab_size=8192,
    character_coverage=0.9995,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,    # runs of spaces (indentation) can become single pieces
    max_sentence_length=16384,
    unk_id=0,
    bos_id=-1,
    eos_id=-1,
    pad_id=-1,
    control_symbols=["<doc>"],
    input_sentence_size=0,                # every sentence given (the sampling, if any, is ours)
    shuffle_input_sentence=False,
    num_threads=2,
    train_extremely_large_corpus=False,
)
SEED = 20261204


def training_lines(corpus: str, max_lines: int, seed: int = SEED) -> list[str]:
    lines = [ln for d in iter_documents(corpus, "train") for ln in d["text"].split("\n") if ln]
    if len(lines) > max_lines:
        keep = sorted(random.Random(seed).sample(range(len(lines)), max_lines))
        lines = [lines[i] for i in keep]
    return lines


def train(lines: list[str], settings: dict = SETTINGS, seed: int = SEED) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   minloglevel=2, **settings)
    return buf.getvalue()


def measure(model: str, corpus: str, splits=SPLITS, threads: int = 2) -> dict:
    """Per split and source: documents, bytes, tokens, bytes per token; and the documents whose
    decode(encode(text)) differs from the text (held-out splits)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    out: dict = {}
    for split in splits:
        docs = list(iter_documents(corpus, split))
        ids = sp.encode([d["text"] for d in docs], num_threads=threads)
        per = count_by_source(docs, ids)
        bad = [{"source": d["source"], "id": d["id"], "has_U+2581": "\u2581" in d["text"]}
               for d, x in zip(docs, ids) if split != "train" and sp.decode(x) != d["text"]]
        tot = {"documents": sum(s["documents"] for s in per.values()), "bytes": sum(s["bytes"] for s in per.values()),
               "tokens": sum(s["tokens"] for s in per.values())}
        for s in list(per.values()) + [tot]:
            s["bytes_per_token"] = round(s["bytes"] / max(1, s["tokens"]), 4)
        out[split] = {"sources": per, "total": tot}
        if split != "train":
            out[split]["roundtrip_failures"] = bad
    unk = sp.unk_id()
    out["ids"] = {"vocab_size": sp.get_piece_size(), "<unk>": unk, "<doc>": sp.piece_to_id("<doc>"),
                  "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
                  "<0x00>": sp.piece_to_id("<0x00>"), "<0xFF>": sp.piece_to_id("<0xFF>"),
                  "<0x0A>": sp.piece_to_id("<0x0A>")}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", default="models/drdiff-text/tokenizer.model")
    ap.add_argument("--max-lines", type=int, default=3_000_000, help="training sentences at most (seeded sample beyond)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--repeat", type=int, default=1, help="train N times and require identical model bytes")
    ap.add_argument("--stats", default="", help="write the measurements as JSON here")
    ap.add_argument("--measure-only", action="store_true", help="measure an existing --out model")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a trainer setting (experiments), e.g. --set add_dummy_prefix=true")
    args = ap.parse_args(argv)

    if not args.measure_only:
        settings = dict(SETTINGS)
        for kv in args.set:
            k, v = kv.split("=", 1)
            settings[k] = json.loads(v)
        t0 = time.time()
        lines = training_lines(args.corpus, args.max_lines, args.seed)
        print(f"{len(lines):,} training lines, {sum(len(x.encode('utf-8')) for x in lines):,} bytes "
              f"({time.time() - t0:.1f} s)", flush=True)
        digests = []
        for r in range(args.repeat):
            t0 = time.time()
            model = train(lines, settings, args.seed)
            digests.append(hashlib.sha256(model).hexdigest())
            print(f"trained in {time.time() - t0:.1f} s: {len(model):,} bytes, sha256 {digests[-1]}", flush=True)
        if len(set(digests)) != 1:
            print("error: training is not deterministic", file=sys.stderr)
            return 1
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "wb") as fh:
            fh.write(model)
        os.replace(args.out + ".tmp", args.out)
    t0 = time.time()
    m = measure(args.out, args.corpus)
    print(f"measured in {time.time() - t0:.1f} s")
    print(json.dumps(m["ids"], sort_keys=True))
    for split in SPLITS:
        s = m[split]
        line = ", ".join(f"{k} {v['bytes_per_token']:.3f}" for k, v in sorted(s["sources"].items()))
        print(f"{split}: {s['total']['tokens']:,} tokens, {s['total']['bytes_per_token']:.3f} B/token ({line})")
        if split != "train":
            print(f"{split}: round trip differs on {len(s['roundtrip_failures'])} of {s['total']['documents']} documents")
    if args.stats:
        with open(args.stats, "w") as fh:
            json.dump(m, fh, indent=1, sort_keys=True)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
