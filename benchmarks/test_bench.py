"""pytest-benchmark suite (``make bench``; deselected from ``make test``): the fused ops per backend and one
optimizer step per optimizer against torch Adam, on about 1M parameters. ``lsfused bench`` runs the full sweep."""

import math

import pytest
import torch

import lsfused
from lsfused import _ops, bench
from lsfused.apps.baselines import PaperStyleAdamSLS
from lsfused.reference import MODE_ADAM

pytestmark = pytest.mark.benchmark
N = 10**6
BACKENDS = [b for b in lsfused.available_backends() if b != "triton" or torch.cuda.is_available()]


@pytest.fixture(scope="module")
def buffers():
    g, w, v = torch.randn(N), torch.randn(N), torch.rand(N)
    return g, w, v, torch.empty(N)


HP = [0.0, 0.999, 1e-8, 1.0, math.sqrt(1 - 0.999**10), 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_a(benchmark, buffers, backend):
    g, w, v, w0 = buffers
    # as an optimizer runs it: without the sums only a recorder reads (all_sums=False)
    benchmark(_ops.direction_and_norms, g, w, w0, v, None, [0, N], HP, MODE_ADAM, False, backend, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_b(benchmark, buffers, backend):
    g, w, v, w0 = buffers
    eta = torch.tensor([1e-3], dtype=torch.float64)
    benchmark(_ops.trial_step, w, w0, g, v, None, [0, N], HP, MODE_ADAM, eta, False, backend)


def test_copy_roofline(benchmark, buffers):
    _, w, _, w0 = buffers
    benchmark(w.copy_, w0)


@pytest.mark.parametrize("variant", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=str)
def test_step_torch_adam(benchmark, variant):
    opt = torch.optim.Adam(bench._make_params(bench.SMALL, torch.device("cpu")), lr=1e-3, **variant)
    benchmark(opt.step)


def test_step_paper_style(benchmark):
    opt = PaperStyleAdamSLS(bench._make_params(bench.SMALL, torch.device("cpu")))
    script = bench._Script(0)

    def step():
        script.reset()
        opt.step(script, script.loss)

    benchmark(step)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamSLS", "SaLSa"])
@pytest.mark.parametrize("rejections", [0, 3], ids=["accepted", "3-backtracks"])
def test_step_lsfused(benchmark, backend, name, rejections):
    params = bench._make_params(bench.SMALL, torch.device("cpu"))
    opt = getattr(lsfused, name)(params, backend=backend)
    benchmark(bench._lsfused_step(opt, bench._Script(rejections)))
