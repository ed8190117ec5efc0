"""Fill in the middle on the real Qwen2.5-Coder-0.5B-Instruct: through /v1/completions (suffix), /infill
(repo-level context) and `qmlx generate --fim-prefix-file`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from qmlx.cli import main
from qmlx.fim import ENDS, fim_prompt
from qmlx.server import Engine, create_app

pytestmark = pytest.mark.slow

PREFIX = 'def celsius_to_fahrenheit(c: float) -> float:\n    """Convert degrees Celsius to degrees Fahrenheit."""\n'
SUFFIX = "\n\nassert celsius_to_fahrenheit(100) == 212\nassert celsius_to_fahrenheit(0) == 32\n"
CURRENT = "import geometry\n\nside = 2.0\nprint(geometry."
GEOMETRY = "import math\n\n\ndef hexagon_area_from_side(side: float) -> float:\n    return 3 * math.sqrt(3) / 2 * side ** 2\n"


@pytest.fixture(scope="module")
def client(real_model):
    model, tok = real_model
    engine = Engine(model, tok, "qwen", max_concurrency=2)
    engine.start()
    yield TestClient(create_app(engine)), tok
    engine.stop()


def passes(code: str) -> bool:
    """Whether `code` runs to the end (its own asserts) in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0


def test_fim_markers_are_single_ids_from_text(real_model):
    _, tok = real_model
    for marker in ENDS:
        assert len(tok.encode(marker)) == 1, marker
    ids = fim_prompt(tok, "a", "b")
    assert [tok.decode([i]) for i in (ids[0], ids[-1])] == ["<|fim_prefix|>", "<|fim_middle|>"]


def test_a_function_body_filled_in_passes_its_own_asserts(client):
    c, _ = client
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 40, "temperature": 0, "stop": ["\n\n"]}
    r = c.post("/v1/completions", json=body).json()
    middle = r["choices"][0]["text"]
    assert "return" in middle
    assert passes(PREFIX + middle + SUFFIX), middle


def test_repo_level_context_changes_the_completion(client):
    c, _ = client
    base = {"input_prefix": CURRENT, "input_suffix": ")\n", "n_predict": 12, "temperature": 0}
    alone = c.post("/infill", json=base).json()["content"]
    extra = [{"filename": "geometry.py", "text": GEOMETRY}]
    with_repo = c.post("/infill", json={**base, "input_extra": extra}).json()["content"]
    assert "hexagon_area_from_side" not in alone
    assert with_repo.startswith("hexagon_area_from_side("), with_repo


def test_generate_fills_in_the_middle_from_files(tmp_path, capsys, fixture_dir):
    (tmp_path / "pre.py").write_text(PREFIX)
    (tmp_path / "suf.py").write_text(SUFFIX)
    argv = ["generate", "-m", fixture_dir, "--fim-prefix-file", str(tmp_path / "pre.py"),
            "--fim-suffix-file", str(tmp_path / "suf.py"), "-n", "40", "--temp", "0", "--stop", "\n\n"]  # fmt: skip
    assert main(argv) == 0
    middle = capsys.readouterr().out[:-1]  # generate ends its output with a newline
    assert passes(PREFIX + middle + SUFFIX), middle
