"""Shared test fixtures: tiny random Qwen2 folders (fast tier) and the real checkpoint (slow tier)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import qmlx  # noqa: E402,F401  (loads OpenBLAS before mlx.core, as users get it)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("QMLX_SHARED", os.path.join(HERE, "..", "..", "shared"))
REFERENCE = os.path.join(SHARED, "fixtures", "reference", "qwen2.5-coder-0.5b-instruct.json")
TEXTS = os.path.join(SHARED, "fixtures", "texts")


def _fixture_folder() -> str:
    path = os.environ.get("QMLX_FIXTURE_DIR")
    if path:
        return path
    script = os.path.join(SHARED, "fixtures", "qwen-fixture")
    out = subprocess.run([script], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def fixture_dir() -> str:
    """The real Qwen2.5-Coder-0.5B-Instruct folder (bf16, 4 shards), built once."""
    return _fixture_folder()


@pytest.fixture(scope="session")
def fixture_venv_python(fixture_dir) -> str:
    """The python of the fixture's own venv, which has torch + transformers (an oracle)."""
    cache = os.path.dirname(fixture_dir)
    py = os.path.join(cache, ".venv", "bin", "python")
    if not os.path.exists(py):
        pytest.fail(f"fixture venv not found at {py}")
    return py


@pytest.fixture(scope="session")
def real_model(fixture_dir):
    """The fixture loaded in float32 (the reference's dtype), shared by the slow tests."""
    return qmlx.load(fixture_dir, dtype="float32")


@pytest.fixture(scope="session")
def reference() -> dict:
    import json

    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)
