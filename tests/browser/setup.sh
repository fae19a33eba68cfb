#!/usr/bin/env bash
# Installs Debian's chromium for the docs-site browser test (tests/it/lineage.rs) when it is
# missing, and prints its path. Idempotent; needs apt (as root, or sudo without a password).
set -euo pipefail
for name in chromium chromium-browser; do
  if p=$(command -v "$name" 2>/dev/null); then
    echo "$p"
    exit 0
  fi
done
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq chromium >&2 \
  || { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq chromium >&2; }
command -v chromium
