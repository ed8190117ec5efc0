"""Device choices: compute dtype, and Metal memory wiring (logic tested with injected devices)."""

import mlx.core as mx
import pytest

from qmlx.device import default_dtype, parse_dtype, plan_wiring, wire_memory
from qmlx.errors import UserError

GB = 2**30


def test_cpu_uses_float32():
    if mx.metal.is_available():
        assert default_dtype() == mx.bfloat16
    else:
        assert default_dtype() == mx.float32


def test_parse_dtype():
    assert parse_dtype("bfloat16") == mx.bfloat16
    with pytest.raises(UserError, match="dtype 'int8'"):
        parse_dtype("int8")


def test_wiring_within_budget_wires_model_and_cache():
    calls = []
    plan = wire_memory(
        4 * GB, 1 * GB, available=True,
        device_info=lambda: {"max_recommended_working_set_size": 16 * GB},
        set_wired_limit=calls.append,
    )  # fmt: skip
    assert calls == [5 * GB] and plan.warning is None


def test_wiring_caps_at_recommended_and_warns_when_the_cache_overflows():
    calls = []
    with pytest.warns(UserWarning, match="--kv-bits"):
        wire_memory(
            12 * GB, 6 * GB, available=True,
            device_info=lambda: {"max_recommended_working_set_size": 16 * GB},
            set_wired_limit=calls.append,
        )  # fmt: skip
    assert calls == [16 * GB]


def test_warns_when_the_model_cannot_fit():
    plan = plan_wiring(40 * GB, 0, 16 * GB)
    assert "40.0 GB" in plan.warning and plan.limit == 16 * GB


def test_cpu_backend_wires_nothing():
    called = []
    assert wire_memory(GB, available=False, set_wired_limit=called.append) is None
    assert called == []


def test_importing_mlx_before_qmlx_is_said_once():
    """The OpenBLAS preload cannot happen after mlx.core is loaded: qmlx says so (once), not silently."""
    import subprocess
    import sys

    from qmlx import _blas

    code = "import mlx.core, qmlx, qmlx._blas as b; print(b.status)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "mlx.core was imported before qmlx" in p.stdout
    if any(__import__("os").path.exists(c) for c in _blas.CANDIDATES):
        assert p.stderr.count("import qmlx first") == 1, p.stderr
