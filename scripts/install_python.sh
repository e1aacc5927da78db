#!/usr/bin/env bash
# Installs the Python packages of python/requirements.txt (pinned: PyTorch, SentencePiece,
# safetensors, numpy, matplotlib, pytest) through pip when a pinned version is missing. The PyTorch
# wheel from PyPI is the CUDA build; on a machine without a GPU it runs on the CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
req=$root/python/requirements.txt
missing=0
while read -r line; do
  case "$line" in ''|\#*) continue ;; esac
  name=${line%%==*}; want=${line#*==}
  have=$(python3 -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  [ "$have" = "$want" ] || { echo "install_python: $name $want (have: ${have:-none})"; missing=1; }
done < "$req"
if [ $missing -eq 0 ]; then
  echo "install_python: all pinned packages present"
  exit 0
fi
python3 -m pip install --disable-pip-version-check --no-input -q -r "$req"
