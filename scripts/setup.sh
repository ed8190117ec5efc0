#!/usr/bin/env bash
# Set up qmlx from nothing: system OpenBLAS (Linux), a venv in .venv, the package with dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ] \
   && [ ! -e /usr/lib/aarch64-linux-gnu/libopenblas.so.0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing OpenBLAS (libopenblas0-pthread) for fast CPU matmuls…" >&2
    apt-get update -qq >&2 && apt-get install -y -qq libopenblas0-pthread >/dev/null
  else
    echo "note: install libopenblas0-pthread (apt) for ~10x faster prompts on the CPU" >&2
  fi
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! command -v tmux >/dev/null; then
  apt-get install -y -qq tmux >/dev/null 2>&1 || true   # used by the terminal chat tests
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
echo "ready: .venv/bin/qmlx --help" >&2
