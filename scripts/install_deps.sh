#!/usr/bin/env bash
# Installs what DrDiff needs from Debian packages, skipping what is already present.
# Usage: scripts/install_deps.sh [extra-package ...]
set -euo pipefail

packages=(cmake g++ make ninja-build pkg-config libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libsentencepiece-dev libcli11-dev "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all packages present (${packages[*]})"
  exit 0
fi
echo "install_deps: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install_deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
