"""``lsfused bench --memory`` (``lsfused.apps.memory``): the memory measured from outside, in a child process, is
the optimizer's named flat buffers, byte for byte per parameter, and nothing else that grows with the model."""

import subprocess
import sys

import pytest
import torch

from lsfused.apps import memory

NUMEL = 2**21


def named_bytes(name: str, dtype: torch.dtype) -> float:
    """Bytes per parameter of the state buffers a bucket holds besides the weights and gradients it re-points (an
    independent count: what the buckets allocate)."""
    params = [torch.nn.Parameter(torch.zeros(1024, dtype=dtype)) for _ in range(2)]
    opt = memory.OPTIMIZERS[name](params)
    (bucket,) = opt._buckets
    state = [bucket.w0, bucket.v, bucket.m]
    return sum(t.numel() * t.element_size() for t in state if t is not None) / bucket.numel


# The state the algorithms need, in fp32: Adam's moments (v; m with momentum) plus the snapshot w0 that reverting a
# trial needs; no direction buffer (the ops recompute d and dm from g, v, m).
LEAN_BYTES = {"adamsls": 12.0, "salsa": 12.0, "adamsls-b0": 8.0, "sgdsls": 4.0}


@pytest.mark.parametrize("name", LEAN_BYTES)
def test_the_state_is_adams_plus_the_snapshot(name):
    assert named_bytes(name, torch.float32) == LEAN_BYTES[name]
    assert named_bytes(name, torch.bfloat16) == LEAN_BYTES[name]  # the state stays fp32 for bf16 parameters


@pytest.mark.parametrize("name", ["adamsls", "sgdsls"])
def test_outside_measurement_is_the_named_buffers(name):
    measured = memory.measure(name, NUMEL, n_tensors=4, steps=2)
    assert measured["steps"] == pytest.approx(named_bytes(name, torch.float32), abs=0.5)
    assert measured["fixed_mb"] > 0  # paid once per process, not per parameter: reported apart


def test_fused_adam_measures_its_two_moments():
    measured = memory.measure("adam-fused", NUMEL, n_tensors=4, steps=2)
    assert 8.0 - 0.5 < measured["steps"] < 8.0 + 3.0  # m and v, plus the fused step's per-tensor scratch


def test_summary_and_table_give_mean_spread_and_the_difference_to_adam():
    rows = [
        {"name": "adam-fused", "dtype": "float32", "repeat": r, "built": 0.0, "steps": 8.0 + r, "fixed_mb": 140.0}
        for r in range(2)
    ] + [
        {"name": "adamsls", "dtype": "float32", "repeat": r, "built": 8.0, "steps": 20.0 + 2 * r, "fixed_mb": 150.0}
        for r in range(2)
    ]
    for row in rows:
        row["minus_adam"] = row["steps"] - (8.0 + row["repeat"])
    (adam, sls) = memory.summary(rows)
    assert (sls["steps"], sls["spread"], sls["minus_adam"]) == (21.0, 2.0, 12.5)
    assert "| adamsls | float32 | 8.00 | 21.00 (2.00) | +12.50 | 150 MB |" in memory.format_rows(rows)
    assert adam["minus_adam"] == 0.0


def test_gpu_check_fails_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: make gpu-check runs for real")
    out = subprocess.run([sys.executable, "-m", "lsfused.apps.gpu_check"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert "gpu-check needs a CUDA device" in out.stderr and "torch.cuda.is_available() is False" in out.stderr


def test_gpu_check_table_has_every_check():
    from lsfused.apps import gpu_check

    tests = {"ok": True, "summary": "120 passed", "seconds": 61.0}
    rows = [
        {"kind": "op", "name": "pass_a", "backend": "triton", "numel": 10**6, "gbps": "900.0", "ratio_to_copy": 0.75},
        {"kind": "step", "name": "adamsls", "backend": "cpp", "scenario": "accepted", "ratio_to_fused_adam": "1.25"},
    ]
    memory_rows = {"adam-fused": {"peak": 8.5, "steady": 8.0}, "adamsls": {"peak": 21.0, "steady": 20.0}}
    text = gpu_check.table(tests, rows, memory_rows)
    assert "| tests | tests/test_ops.py" in text and "120 passed (61 s)" in text
    assert "| op | pass_a [triton] 1000000 | 900 GB/s, 0.75x copy |" in text
    assert "| step | adamsls [cpp] accepted | 1.25x fused Adam |" in text
    assert "| memory | adamsls | peak 21.0 B/param, after steps 20.0, +12.5 vs fused Adam |" in text
