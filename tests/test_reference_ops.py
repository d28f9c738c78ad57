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
    w0, d, dm = torch.empty(n), torch.empty(n), torch.empty(n)
    sums = ref.direction_and_norms(g, w, w0, d, v, m, dm, [x for r in ranges for x in r], hp, mode)
    assert torch.equal(w0, w_in) and torch.equal(w, w_in)
    for r, (a, b) in enumerate(ranges):
        gr = g[a:b].double()
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
            torch.testing.assert_close(dm[a:b].double(), -(m[a:b].double() / (1 - 0.9**3)) / denom, rtol=1e-6, atol=0)
        torch.testing.assert_close(d[a:b].double(), d_exp, rtol=1e-6, atol=0)
        # The sums are float64 of the stored fp32 values: compare with fsum of the same values.
        d64 = d[a:b].double()
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
            ref.direction_and_norms(
                g, w, torch.empty_like(w), torch.empty_like(w), vv, None, None, [0, 27811], hp, ref.MODE_ADAM
            )
        )
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_restore_is_bit_exact_after_many_trials(dtype):
    n = 4097
    w = torch.randn(n).to(dtype)
    original = w.clone()
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    w0, d = w.to(sdt, copy=True), torch.randn(n, dtype=sdt)
    ranges = [0, 1000, 1000, n]
    eta = torch.tensor([0.3, 1e-3], dtype=torch.float64)
    for _ in range(25):
        ref.trial_step(w, w0, d, ranges, eta)
        eta = eta * 0.9
    assert not torch.equal(w, original)
    ref.restore(w, w0, ranges)
    assert torch.equal(w, original)


def test_trial_step_only_touches_listed_ranges():
    w = torch.zeros(10)
    w0, d = torch.ones(10), torch.full((10,), 2.0)
    ref.trial_step(w, w0, d, [2, 5], torch.tensor([0.5], dtype=torch.float64))
    assert torch.equal(w, torch.tensor([0, 0, 2, 2, 2, 0, 0, 0, 0, 0], dtype=torch.float32))
