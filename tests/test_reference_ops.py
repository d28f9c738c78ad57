"""The torch reference ops against float64 sums written from the equations, and bit-exact restore."""

import math

import pytest
import torch

from lsfused import reference as ref

SIZES = [1, 7, 4097, 27811]


def make(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=dtype) for _ in range(4)]


def fsum(values):
    return math.fsum(values.double().tolist())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", [ref.MODE_SGD, ref.MODE_ADAM])
def test_direction_and_norms_matches_equations(n, mode):
    g, w, m, v = make(n, n)
    v = v.abs()
    half = n // 2
    ranges = [(0, half), (half, n)] if half else [(0, n)]
    hp = [0.9, 0.999, 1e-8, 1 - 0.9**3, math.sqrt(1 - 0.999**3), 1.0] * len(ranges)
    m0, v0, w_in = m.clone(), v.clone(), w.clone()
    w0 = torch.empty(n)
    adam = mode == ref.MODE_ADAM
    v, m = (v, m) if adam else (None, None)
    sums = ref.direction_and_norms(g, w, w0, v, m, [x for r in ranges for x in r], hp, mode, with_dm=adam)
    assert torch.equal(w0, w_in) and torch.equal(w, w_in)
    for r, (a, b) in enumerate(ranges):
        gr = g[a:b].double()
        row = hp[6 * r : 6 * r + 6]
        d = ref.direction(g[a:b], None if v is None else v[a:b], None if m is None else m[a:b], row, mode, False)
        if mode == ref.MODE_SGD:
            d_exp = -gr
            s_exp = fsum(gr * gr)
        else:
            m_new = 0.9 * m0[a:b].double() + 0.1 * gr
            v_new = 0.999 * v0[a:b].double() + 0.001 * gr * gr
            denom = v_new.sqrt() / math.sqrt(1 - 0.999**3) + 1e-8
            d_exp = -gr / denom
            s_exp = fsum(gr * gr / denom)
            torch.testing.assert_close(m[a:b].double(), m_new, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v[a:b].double(), v_new, rtol=2e-7, atol=0)
            # m itself carries fp32 cancellation error; dm must follow from the stored m
            dm = ref.direction(g[a:b], v[a:b], m[a:b], row, mode, True).double()
            torch.testing.assert_close(dm, -(m[a:b].double() / (1 - 0.9**3)) / denom, rtol=1e-6, atol=0)
            assert sums[r, 4].item() == pytest.approx(fsum(gr * dm), rel=1e-12)
        torch.testing.assert_close(d.double(), d_exp, rtol=1e-6, atol=0)
        # The sums are float64 of the rounded fp32 directions: compare with fsum of the same values.
        d64 = d.double()
        assert sums[r, 1].item() == pytest.approx(fsum(gr * gr), rel=1e-12)
        assert sums[r, 2].item() == pytest.approx(fsum(gr * d64), rel=1e-12)
        assert sums[r, 3].item() == pytest.approx(fsum(d64 * d64), rel=1e-12)
        assert sums[r, 0].item() == pytest.approx(s_exp, rel=1e-6)


def test_sums_are_deterministic():
    g, w, m, v = make(27811, 0)
    out = []
    for _ in range(2):
        vv = v.abs().clone()
        hp = [0.0, 0.999, 1e-8, 1.0, math.sqrt(0.001), 1.0]
        out.append(
            ref.direction_and_norms(g, w, torch.empty_like(w), vv, None, [0, 27811], hp, ref.MODE_ADAM, with_dm=True)
        )
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_restore_is_bit_exact_after_many_trials(dtype):
    n = 4097
    w = torch.randn(n).to(dtype)
    original = w.clone()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w0, g = w.to(sdt, copy=True), torch.randn(n).to(dtype)
    v, m = torch.rand(n, dtype=sdt), torch.randn(n, dtype=sdt)
    ranges = [0, 1000, 1000, n]
    hp = [0.9, 0.999, 1e-8, 1 - 0.9**3, math.sqrt(1 - 0.999**3), 1.0] * 2
    eta = torch.tensor([0.3, 1e-3], dtype=torch.float64)
    for i in range(25):
        ref.trial_step(w, w0, g, v, m, ranges, hp, ref.MODE_ADAM, eta, along_dm=i % 2 == 1)
        eta = eta * 0.9
    assert not torch.equal(w, original)
    ref.restore(w, w0, ranges)
    assert torch.equal(w, original)


def test_trial_step_only_touches_listed_ranges():
    w = torch.zeros(10)
    w0, g = torch.ones(10), torch.full((10,), -2.0)  # SGD: d = -g = 2
    ref.trial_step(w, w0, g, None, None, [2, 5], [0.0] * 6, ref.MODE_SGD, torch.tensor([0.5], dtype=torch.float64))
    assert torch.equal(w, torch.tensor([0, 0, 2, 2, 2, 0, 0, 0, 0, 0], dtype=torch.float32))


def test_direction_by_hand():
    """``d = -(g/denom)``, ``dm = -((m/bc1)/denom)`` (g without m), ``denom = sqrt(v)/sqrt_bc2 + eps``; SGD: ``-g``."""
    g, v, m = torch.tensor([2.0, 0.0]), torch.tensor([16.0, 4.0]), torch.tensor([1.0, -3.0])
    hp = [0.9, 0.999, 1.0, 0.5, 2.0, 1.0]  # denom = sqrt(v)/2 + 1 = [3, 2]
    assert torch.equal(ref.direction(g, v, m, hp, ref.MODE_ADAM, False), torch.tensor([-2 / 3, -0.0]))
    assert torch.equal(ref.direction(g, v, m, hp, ref.MODE_ADAM, True), torch.tensor([-2 / 3, 3.0]))
    assert torch.equal(ref.direction(g, v, None, hp, ref.MODE_ADAM, True), torch.tensor([-4 / 3, -0.0]))
    assert torch.equal(ref.direction(g, None, None, hp, ref.MODE_SGD, False), -g)
    with pytest.raises(ValueError, match="SGD"):
        ref.direction(g, None, None, hp, ref.MODE_SGD, True)
