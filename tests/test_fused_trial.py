"""Pass A fused with the first trial (``direction_norms_trial``) against Pass A followed by ``trial_step``.

The fused op must give, on every backend, bit for bit the same buffers (w included) and the same float64 sums as the
two-pass sequence on that backend, which the torch reference defines; ranges whose step size is NaN keep ``w``.
The optimizer-level parity (same decisions and results as before the fusion) is in test_optim_fused_trial.py.
"""

import math

import pytest
import torch
from test_ops import BACKENDS, DEVICE, HP, WIDTH, inputs, skip_unsupported, state_dtype

import lsfused
from lsfused import _ops
from lsfused import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Four ranges of awkward lengths (vector tails, more than one C++ chunk) with a range that has no trial.
SIZES = [5, 70_001, 33, 4097]
ETAS = [0.25, math.nan, 1e-3, 3.0]
# mode, with m, with dm, trial along dm
KINDS = {
    "sgd": (ref.MODE_SGD, False, False, False),
    "adam": (ref.MODE_ADAM, False, False, False),
    "adam_dm": (ref.MODE_ADAM, False, True, False),
    "adam_along_dm": (ref.MODE_ADAM, False, True, True),  # betas[0] == 0: dm from g
    "momentum": (ref.MODE_ADAM, True, True, False),
    "momentum_along_dm": (ref.MODE_ADAM, True, True, True),
}
BUFFERS = ("g", "w", "w0", "v", "m")


def ranges_of(sizes):
    out, a = [], 0
    for n in sizes:
        out += [a, a + n]
        a += n
    return out


def buffers(dtype, kind, seed=0):
    mode, with_m, _, _ = KINDS[kind]
    g, w, v, m = inputs(SIZES, dtype, seed)
    return {
        "g": g,
        "w": w.clone(),
        "w0": torch.full((g.numel(),), math.nan, dtype=state_dtype(dtype), device=g.device),
        "v": v.clone() if mode == ref.MODE_ADAM else None,
        "m": m.clone() if with_m else None,
    }


def two_pass(backend, bufs, kind, hp, eta):
    """Pass A, then Pass B on the ranges that have a trial (with their hyperparameter rows)."""
    mode, _, with_dm, along_dm = KINDS[kind]
    b = bufs
    ranges = ranges_of(SIZES)
    sums = _ops.direction_and_norms(*(b[k] for k in BUFFERS), ranges, hp, mode, with_dm, backend)
    sel = [r for r, e in enumerate(eta.tolist()) if not math.isnan(e)]
    ranges_sel = [x for r in sel for x in ranges[2 * r : 2 * r + 2]]
    hp_sel = [x for r in sel for x in hp[r * WIDTH : (r + 1) * WIDTH]]
    _ops.trial_step(b["w"], b["w0"], b["g"], b["v"], b["m"], ranges_sel, hp_sel, mode, eta[sel], along_dm, backend)
    return sums


def fused(backend, bufs, kind, hp, eta):
    mode, _, with_dm, along_dm = KINDS[kind]
    b = bufs
    args = (*(b[k] for k in BUFFERS), ranges_of(SIZES), hp, mode, with_dm)
    return _ops.direction_norms_trial(*args, eta, along_dm, backend)


def hp_rows(wd_scale=1.0):
    """One row per range, each its own (step k = 3 + r), so a trial given the wrong row shows."""
    rows = []
    for r in range(len(SIZES)):
        k = 3 + r
        rows += [0.9, 0.999, 1e-8 * (1 + r), 1 - 0.9**k, math.sqrt(1 - 0.999**k), wd_scale]
    return rows


def assert_same_buffers(a, b):
    for key in a:
        assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wd_scale", [1.0, 0.999])
def test_fused_first_trial_equals_pass_a_then_trial(backend, dtype, kind, wd_scale):
    skip_unsupported(backend, dtype)
    eta = torch.tensor(ETAS, dtype=torch.float64, device=DEVICE)
    hp = hp_rows(wd_scale)
    expected, got = buffers(dtype, kind), buffers(dtype, kind)
    w_before = got["w"].clone()
    ref_sums = two_pass("torch", expected, kind, hp, eta)
    sums = fused(backend, got, kind, hp, eta)
    assert_same_buffers(got, expected)
    if backend == "torch":
        assert torch.equal(sums, ref_sums)
    else:  # sums: within 1e-12 of the reference (their order of addition differs), as in test_ops
        torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=0)
        same_backend = buffers(dtype, kind)
        assert torch.equal(two_pass(backend, same_backend, kind, hp, eta), sums)  # bit for bit on its own backend
    a, b = ranges_of(SIZES)[2:4]  # the range without a trial keeps w exactly
    assert torch.equal(got["w"][a:b], w_before[a:b])
    assert not torch.equal(got["w"], w_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_nan_eta_is_plain_pass_a(backend):
    eta = torch.full((len(SIZES),), math.nan, dtype=torch.float64, device=DEVICE)
    expected, got = buffers(torch.float32, "momentum"), buffers(torch.float32, "momentum")
    ref_sums = _ops.direction_and_norms(*(expected[k] for k in BUFFERS), ranges_of(SIZES), hp_rows(), 1, True, backend)
    assert torch.equal(fused(backend, got, "momentum", hp_rows(), eta), ref_sums)
    assert_same_buffers(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trial_along_dm_without_dm_is_refused(backend):
    eta = torch.tensor(ETAS, dtype=torch.float64, device=DEVICE)
    bufs = buffers(torch.float32, "momentum")
    with pytest.raises((ValueError, RuntimeError), match="dm"):
        _ops.direction_norms_trial(
            *(bufs[k] for k in BUFFERS), ranges_of(SIZES), hp_rows(), 1, False, eta, True, backend
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_fused_trial(backend):
    sizes = [7, 300]
    n = sum(sizes)
    g, w, v, m = inputs(sizes, torch.float32)
    w0 = torch.zeros(n, device=DEVICE)
    eta = torch.tensor([0.5, math.nan], dtype=torch.float64, device=DEVICE)
    hp = HP * 2
    ranges = [0, 7, 7, n]
    for args in (
        (v, m, 1, True, True),
        (v, None, 1, True, True),
        (v, m, 1, False, False),
        (None, None, 0, False, False),
    ):
        vv, mm, kind, with_dm, trial_dm = args
        torch.library.opcheck(
            _ops.direction_norms_trial, (g, w.clone(), w0, vv, mm, ranges, hp, kind, with_dm, eta, trial_dm, backend)
        )


def test_every_backend_is_tested():
    assert "torch" in BACKENDS and set(BACKENDS) == set(lsfused.available_backends()) - {"torch-fast"}
