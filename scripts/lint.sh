#!/usr/bin/env bash
# Formatting and lint, as CI runs them before the tests: one configuration (pyproject's [tool.ruff]).
# `bash scripts/lint.sh --fix` rewrites the tree instead of only checking it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
if [[ "${1:-}" == "--fix" ]]; then
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .
else
    .venv/bin/ruff format --check .
    .venv/bin/ruff check .
fi
