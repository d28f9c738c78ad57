"""The optimizers against an independent float64 re-implementation of their equations.

The reference optimizers below are written from the docstrings of ``lsfused.SGDSLS``, ``AdamSLS``, ``PLASLS`` and
``SaLSa`` (and SPEC.md sections 2-4). They use nothing from lsfused but its public optimizer classes (to compare
with): they keep their own float64 parameter copies, take gradients with ``torch.autograd.grad`` on a functional
version of the network and step side by side with the library optimizer (whose model is float64 too). At every step
the outcome, the number of trials, the step sizes and the parameters must agree. Where a docstring leaves a detail
open, the reference takes the reading noted in its class docstring (the library's behaviour, so that the rest can be
compared).

The second half works the accepted step sizes of one-element problems out by hand and asserts them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lsfused

DTYPE = torch.float64
N_IN, N_HIDDEN, N_OUT = 6, 8, 3
# Tolerances (loss and step sizes: relative; parameters: relative, absolute). Two float64 implementations of the
# same equations differ only by rounding (e.g. GEMM blocking on differently aligned buffers), but over many steps of a
# chaotic training run those ulps grow exponentially (measured: ~1e-15 at step 1, ~1e-6 by step 35 for AdamSLS with
# large steps). So most cases re-sync the reference's parameters to the library's after each step's checks (its
# moments and smoothing state are never copied) and compare tightly; the "free-running" cases never re-sync and
# compare with the looser tolerances, on runs whose drift stays small.
TIGHT = {"loss": 1e-12, "step": 1e-12, "param": (1e-10, 1e-12)}
LOOSE = {"loss": 1e-6, "step": 1e-6, "param": (1e-6, 1e-9)}

LossFn = Callable[[list[Tensor]], Tensor]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add overhead, and on a busy machine they make the thousands of
    small ops in this file several times slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- problem


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_OUT)).to(DTYPE)


def make_batches(n: int = 4, size: int = 16, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (2.0 * torch.randn(size, N_IN, generator=gen, dtype=DTYPE), torch.randint(0, N_OUT, (size,), generator=gen))
        for _ in range(n)
    ]


def functional_loss(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """The model's loss as a function of [W1, b1, W2, b2] (the order of ``model.parameters()``)."""
    w1, b1, w2, b2 = params
    return F.cross_entropy(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)


def loss_at(loss_fn: LossFn, params: list[Tensor]) -> float:
    with torch.no_grad():
        return float(loss_fn(params))


def loss_and_grad(loss_fn: LossFn, params: list[Tensor]) -> tuple[float, list[Tensor]]:
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, leaves)
    return float(loss.detach()), [g.detach() for g in grads]


def axpy(w0: list[Tensor], eta: float, direction: list[Tensor]) -> list[Tensor]:
    """``w0 + eta*direction`` for a list of tensors."""
    return [a + eta * b for a, b in zip(w0, direction, strict=True)]


@dataclass
class RefRecord:
    loss: float
    outcome: str
    trials: int
    step_sizes: tuple[float, ...]
    searched: tuple[int, ...] | None = None
    merged: tuple[int, int] | None = None


@dataclass
class AdamDirections:
    d: list[Tensor]  # -g/denom (Adam with beta1 = 0); SGD: -g
    dm: list[Tensor]  # -(m/(1-b1^k))/denom
    s: list[float]  # per parameter: sum(g*g/denom); SGD: sum(g*g)
    s_momentum: list[float]  # per parameter: sum(g*m_hat/denom) = -g.dm


class AdamMoments:
    """Adam's moments, standard bias correction: the equations of SPEC.md section 2 and ``AdamSLS``'s docstring."""

    def __init__(self, params: list[Tensor], betas: tuple[float, float], eps: float):
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def update(self, grads: list[Tensor], k: int) -> AdamDirections:
        b1, b2 = self.b1, self.b2
        d, dm, s, s_mom = [], [], [], []
        for i, g in enumerate(grads):
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g
            denom = torch.sqrt(self.v[i]) / math.sqrt(1.0 - b2**k) + self.eps
            m_hat = self.m[i] / (1.0 - b1**k)
            d.append(-g / denom)
            dm.append(-m_hat / denom)
            s.append(float((g * g / denom).sum()))
            s_mom.append(float((g * m_hat / denom).sum()))
        return AdamDirections(d, dm, s, s_mom)


class RefBacktracking:
    """The next step size after a rejected trial, from the docstrings of ``backtracking`` and
    ``lsfused.optim.interpolation``, written with numpy's polynomial roots instead of the closed forms: the quadratic
    ``phi(x) = f0 + slope*x + B x^2`` through the latest rejected trial, the largest positive root of ``poly(B)``
    (the acceptance test written out on the model by the caller, from the optimizer's test itself), times 0.95,
    clamped to ``[lo, hi]`` times the last step (``hi = min(0.9, shrink)``, at most 0.5 after a far miss, which the
    caller's ``far(eta, ft)`` tells; ``lo = min(0.1, hi)``); ``hi`` times it when there is no such root (or
    ``B <= 0``, or the slope is not negative), ``lo`` times it after a non-finite loss. ``"geometric"``:
    ``eta * shrink``."""

    def __init__(self, rule: str, f0: float, slope: float, shrink: float, poly, far):
        self.rule, self.f0, self.slope, self.shrink, self.poly, self.far = rule, f0, slope, shrink, poly, far

    def _boundary(self, a: float, fa: float) -> float | None:
        if not (math.isfinite(self.slope) and self.slope < 0.0):
            return None
        B = (fa - self.f0 - self.slope * a) / a**2
        if not B > 0.0:
            return None
        good = [r.real for r in np.roots(self.poly(B)) if abs(r.imag) == 0.0 and r.real > 0.0]
        return max(good) if good else None

    def next(self, eta: float, ft: float) -> float:
        if self.rule == "geometric":
            return eta * self.shrink
        hi = min(0.9, self.shrink)
        lo = min(0.1, hi)
        if not math.isfinite(ft):
            return lo * eta
        if self.far(eta, ft):
            hi = min(hi, 0.5)
        x = self._boundary(eta, ft)
        return hi * eta if x is None else min(max(0.95 * x, lo * eta), hi * eta)


def sgd_directions(grads: list[Tensor]) -> AdamDirections:
    s = [float((g * g).sum()) for g in grads]
    d = [-g for g in grads]
    return AdamDirections(d, d, s, s)


# ---------------------------------------------------------------------------------------------- references


class ReferenceArmijoSLS:
    """SGDSLS / AdamSLS / PLASLS from their docstrings.

    ``groups[i]`` lists the parameter indices of param group i; PLASLS's components start as one group each.
    ``full_search_steps=None`` means every step searches all groups jointly (SGDSLS, AdamSLS).

    The search decides the searched part only: after a failed search (``"revert"``: the searched part keeps w0;
    ``"last"``: its last trial) and after a zero decrease term ("skipped") the other components take their step
    (Eq. 7), a skipped searched part its zero (or momentum) step; merging is checked after every step, the full-search
    ones included (equal step sizes merge the lowest indices
    first); after a merge the cyclic cursor keeps pointing at the same component (it moves down by one when a
    component before it was removed).
    """

    def __init__(
        self,
        params: list[Tensor],
        groups: list[list[int]],
        *,
        adam: bool,
        init_step_size: float,
        c: float = 0.1,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        n_batches_per_epoch: int = 500,
        max_backtracks: int = 100,
        on_failure: str = "revert",
        betas: tuple[float, float] = (0.0, 0.999),
        eps: float = 1e-8,
        full_search_steps: int | None = None,
        merge_threshold: float = 0.0,
        backtracking: str = "geometric",
    ):
        self.w = [p.detach().clone() for p in params]
        self.backtracking = backtracking
        self.groups = groups
        self.components = [[i] for i in range(len(groups))]
        self.cursor = 0
        self.eta = [float(init_step_size)] * len(groups)
        self.adam = adam
        self.moments = AdamMoments(self.w, betas, eps) if adam else None
        self.momentum = adam and betas[0] > 0.0
        self.c, self.beta_b, self.gamma, self.n = c, beta_b, gamma, n_batches_per_epoch
        self.max_backtracks, self.on_failure = max_backtracks, on_failure
        self.full_search_steps, self.merge_threshold = full_search_steps, merge_threshold
        self.k = 0

    def _full_search(self) -> bool:
        if self.full_search_steps is None:
            return True
        return self.k - 1 < self.full_search_steps or len(self.components) == 1

    def _moved(self, w0: list[Tensor], direction: list[Tensor], etas: dict[int, float]) -> list[Tensor]:
        """``w0 + eta_i*direction`` on the groups listed in ``etas``, ``w0`` elsewhere."""
        out = [t.clone() for t in w0]
        for gi, eta in etas.items():
            for pi in self.groups[gi]:
                out[pi] = w0[pi] + eta * direction[pi]
        return out

    def step(self, loss_fn: LossFn) -> RefRecord:
        self.k += 1
        w0 = self.w
        f0, grads = loss_and_grad(loss_fn, w0)
        dirs = self.moments.update(grads, self.k) if self.adam else sgd_directions(grads)
        growth = self.gamma ** (1.0 / self.n)  # Eq. 2, every component, every step
        self.eta = [e * growth for e in self.eta]
        if self._full_search():
            searched = list(range(len(self.groups)))
        else:
            self.cursor %= len(self.components)
            searched = self.components[self.cursor]
            self.cursor = (self.cursor + 1) % len(self.components)
        s = math.fsum(dirs.s[pi] for gi in searched for pi in self.groups[gi])
        final = dirs.dm if self.momentum else dirs.d
        others = {gi: self.eta[gi] for gi in range(len(self.groups)) if gi not in searched}
        if not s > 0.0:
            self.w = self._moved(w0, final, dict(enumerate(self.eta)))
            merged = self._merge()
            return RefRecord(f0, "skipped", 0, tuple(self.eta), tuple(searched), merged)
        eta = self.eta[searched[0]]
        # the slope along d: g·d, summed over the searched parameters
        slope = math.fsum(float((grads[pi] * dirs.d[pi]).sum()) for gi in searched for pi in self.groups[gi])
        # Armijo on the model f0 + slope*x + B*x^2 <= f0 - c*x*s; a far miss: under half the decrease asked
        rule = RefBacktracking(
            self.backtracking, f0, slope, self.beta_b,
            poly=lambda B: [B, slope + self.c * s, 0.0],
            far=lambda eta, ft: not f0 - ft >= 0.5 * self.c * eta * s,
        )  # fmt: skip
        outcome, trial = "failed", w0
        for t in range(1, self.max_backtracks + 1):
            trial = self._moved(w0, dirs.d, dict.fromkeys(searched, eta))
            ft = loss_at(loss_fn, trial)
            if math.isfinite(ft) and ft <= f0 - self.c * eta * s:
                outcome = "accepted"
                break
            if t < self.max_backtracks:
                eta = rule.next(eta, ft)
        trials = t
        for gi in searched:
            self.eta[gi] = eta
        if outcome == "accepted":
            # Eq. 7: every component moves with its own step size; with beta1 > 0 along -m_hat*P.
            self.w = self._moved(w0, final, dict(enumerate(self.eta)))
        else:
            self.w = self._moved(w0 if self.on_failure == "revert" else trial, final, others)
        merged = self._merge()  # step_sizes are recorded after the merge
        return RefRecord(f0, outcome, trials, tuple(self.eta), tuple(searched), merged)

    def _merge(self) -> tuple[int, int] | None:
        """PLASLS Algorithm 1: merge the smallest-step component with the second smallest; the mean step size."""
        if self.merge_threshold <= 0.0 or len(self.components) < 2:
            return None
        etas = [self.eta[comp[0]] for comp in self.components]
        order = sorted(range(len(etas)), key=lambda i: (etas[i], i))
        s, s2 = order[0], order[1]
        if etas[s] > self.merge_threshold:
            return None
        keep, drop = min(s, s2), max(s, s2)
        self.components[keep] = sorted(self.components[keep] + self.components[drop])
        del self.components[drop]
        for gi in self.components[keep]:
            self.eta[gi] = (etas[s] + etas[s2]) / 2.0
        if self.cursor > drop:
            self.cursor -= 1
        self.cursor %= len(self.components)
        return (s, s2)


class ReferenceSaLSa:
    """SaLSa from its docstring (smoothed Armijo test, speed-up, decoupled weight decay).

    Readings where the docstring is silent: the step-size EMAs start at 1e-8 (not 0, which would divide by zero);
    ``G`` is only updated on the steps that reach the search decision (a speed-up skip leaves it unchanged); the
    speed-up counter counts steps since the last search decision and a search runs once it is
    ``>= min(10, 1/(r - 1 + 1e-8))``; the EMAs are updated with the stored step size after a failed search too
    (``shrink`` times the last one tried), not only after accepted ones.
    """

    def __init__(
        self,
        params: list[Tensor],
        *,
        init_step_size: float = 1.0,
        c: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        smoothing: float = 0.9,
        growth: float = 1.1,
        shrink: float = 0.8,
        max_backtracks: int = 100,
        use_momentum_direction: bool = False,
        speed_up: bool = True,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        bias_correction: str = "standard",
        backtracking: str = "geometric",
    ):
        self.w = [p.detach().clone() for p in params]
        self.backtracking = backtracking
        self.moments = AdamMoments(self.w, betas, eps)
        self.k_offset = 1 if bias_correction == "authors" else 0  # the authors scale step k by 1 - b**(k+1)
        self.eta = float(init_step_size)
        self.c, self.a, self.growth, self.shrink = c, smoothing, growth, shrink
        self.max_backtracks, self.use_momentum_direction = max_backtracks, use_momentum_direction
        self.speed_up, self.weight_decay = speed_up, weight_decay
        self.G, self.D = 0.0, 0.0
        self.fast, self.slow = 1e-8, 1e-8  # the EMAs of step sizes (not bias-corrected) start here
        self.since_search = 0
        self.k = 0

    def step(self, loss_fn: LossFn) -> RefRecord:
        self.k += 1
        a = self.a
        f0, grads = loss_and_grad(loss_fn, self.w)
        dirs = self.moments.update(grads, self.k + self.k_offset)
        w0 = [p * (1.0 - self.weight_decay * self.eta) for p in self.w]  # decoupled weight decay, eta_prev
        eta0 = self.growth * self.eta
        self.since_search += 1
        r = self.fast / self.slow
        r = max(r, 1.0 / r)
        search = not self.speed_up or self.k <= 10 or self.since_search >= min(10.0, 1.0 / (r - 1.0 + 1e-8))
        if search:
            self.since_search = 0
            s = sum(dirs.s_momentum) if self.use_momentum_direction else sum(dirs.s)
            self.G = a * self.G + (1.0 - a) * s
            search = f0 >= 1e-8 and self.G >= 1e-8
        if not search:
            self.w = axpy(w0, eta0, dirs.dm)  # Adam's step, stored step size unchanged
            return RefRecord(f0, "skipped", 0, (self.eta,))
        direction = dirs.dm if self.use_momentum_direction else dirs.d
        slope = math.fsum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
        # the smoothed test a*D + (1-a)*(f0 - ft) >= c*eta*G with ft = f0 + slope*x + B*x^2; a far miss: the trial's
        # share (1-a)*(f0 - ft) under half of what it must bring, c*eta*G - a*D
        G, D = self.G, self.D
        rule = RefBacktracking(
            self.backtracking, f0, slope, self.shrink,
            poly=lambda B: [(1.0 - a) * B, (1.0 - a) * slope + self.c * G, -a * D],
            far=lambda eta, ft: not (1.0 - a) * (f0 - ft) >= 0.5 * (self.c * eta * G - a * D),
        )  # fmt: skip
        eta, outcome = eta0, "failed"
        for t in range(1, self.max_backtracks + 1):
            self.w = axpy(w0, eta, direction)  # the last trial is kept, accepted or not
            ft = loss_at(loss_fn, self.w)
            if math.isfinite(ft):
                raw = f0 - ft
                if raw == 0.0:
                    outcome = "accepted"  # accepted without updating D
                    break
                smoothed = a * self.D + (1.0 - a) * raw
                if smoothed >= self.c * eta * self.G:
                    self.D = smoothed
                    outcome = "accepted"
                    break
            if t < self.max_backtracks:
                eta = rule.next(eta, ft)
        self.eta = eta if outcome == "accepted" else eta * self.shrink
        self.fast = 0.9 * self.fast + 0.1 * self.eta
        self.slow = 0.99 * self.slow + 0.01 * self.eta
        return RefRecord(f0, outcome, t, (self.eta,))


# ---------------------------------------------------------------------------------------------- side by side


def three_components(model: nn.Sequential) -> list[list[nn.Parameter]]:
    """PLASLS components: the first layer (weight, bias), the second layer's weight, its bias."""
    first, second = model[0], model[2]
    return [[first.weight, first.bias], [second.weight], [second.bias]]


THREE_GROUPS = [[0, 1], [2], [3]]
ONE_GROUP = [[0, 1, 2, 3]]


@dataclass
class Case:
    """A library optimizer and its reference, built over the same model."""

    name: str
    make_opt: Callable[[nn.Sequential], torch.optim.Optimizer]
    make_ref: Callable[[list[Tensor]], ReferenceArmijoSLS | ReferenceSaLSa]
    n_steps: int
    expect: tuple[str, ...]  # outcomes (or "merge", a PLASLS merge) that must occur at least once over the run
    resync: bool  # copy the library's parameters into the reference after each step's checks


def ref_kwargs(kw: dict, **defaults) -> dict:
    """The reference's arguments: the library's minus ``armijo`` (the reference runs the classic test and the
    data never makes the noise-aware test differ), plus the library's defaults the reference needs."""
    return {**defaults, **{k: v for k, v in kw.items() if k != "armijo"}}


def sgd_case(name: str, n_steps: int = 32, expect: tuple[str, ...] = (), resync: bool = True, **kw) -> Case:
    return Case(
        name,
        lambda m: lsfused.SGDSLS(m.parameters(), deterministic_closure=False, **kw),
        lambda ps: ReferenceArmijoSLS(ps, ONE_GROUP, adam=False, **ref_kwargs(kw, init_step_size=1.0)),
        n_steps,
        expect,
        resync,
    )


def adam_case(name: str, n_steps: int = 32, expect: tuple[str, ...] = (), resync: bool = True, **kw) -> Case:
    kw = {"betas": (0.0, 0.999), **kw}  # the paper's b1 = 0 unless a case says otherwise
    return Case(
        name,
        lambda m: lsfused.AdamSLS(m.parameters(), deterministic_closure=False, **kw),
        lambda ps: ReferenceArmijoSLS(ps, ONE_GROUP, adam=True, **ref_kwargs(kw, init_step_size=0.1)),
        n_steps,
        expect,
        resync,
    )


def plasls_case(name: str, n_steps: int = 32, expect: tuple[str, ...] = (), resync: bool = True, **kw) -> Case:
    defaults = {"init_step_size": 0.1, "merge_threshold": 1e-12}
    kw = {"betas": (0.0, 0.999), "full_search_steps": 1, **kw}  # the paper's text unless a case says otherwise
    return Case(
        name,
        lambda m: lsfused.PLASLS(three_components(m), deterministic_closure=False, **kw),
        lambda ps: ReferenceArmijoSLS(ps, THREE_GROUPS, adam=True, **ref_kwargs(kw, **defaults)),
        n_steps,
        expect,
        resync,
    )


def salsa_case(name: str, n_steps: int = 32, expect: tuple[str, ...] = (), resync: bool = True, **kw) -> Case:
    return Case(
        name,
        lambda m: lsfused.SaLSa(m.parameters(), deterministic_closure=False, **kw),
        lambda ps: ReferenceSaLSa(ps, **ref_kwargs(kw)),
        n_steps,
        expect,
        resync,
    )


CASES = [
    sgd_case("sgdsls_defaults_large_init", init_step_size=20.0),
    sgd_case("sgdsls_classic_short_epoch", init_step_size=5.0, n_batches_per_epoch=10, armijo="classic"),
    sgd_case("sgdsls_free_running", resync=False, init_step_size=20.0),
    sgd_case(
        "sgdsls_failures_revert",
        expect=("failed",),
        init_step_size=1e3,
        beta_b=0.5,
        max_backtracks=3,
        n_batches_per_epoch=2,
    ),
    sgd_case(
        "sgdsls_failures_last",
        expect=("failed",),
        init_step_size=1e3,
        beta_b=0.5,
        max_backtracks=3,
        n_batches_per_epoch=2,
        on_failure="last",
    ),
    adam_case("adamsls_defaults", n_steps=64),
    adam_case("adamsls_defaults_large_init", init_step_size=2.0),
    adam_case("adamsls_short_epoch", init_step_size=0.5, n_batches_per_epoch=10),
    adam_case("adamsls_momentum", init_step_size=1.0, betas=(0.9, 0.999), n_batches_per_epoch=10),
    adam_case(
        "adamsls_momentum_failures_last",
        expect=("failed",),
        init_step_size=50.0,
        betas=(0.9, 0.999),
        max_backtracks=4,
        on_failure="last",
        n_batches_per_epoch=3,
    ),
    plasls_case("plasls_cyclic", init_step_size=1.0, n_batches_per_epoch=10),
    plasls_case("plasls_two_full_searches", init_step_size=1.0, n_batches_per_epoch=10, full_search_steps=2),
    plasls_case(
        "plasls_failures_revert",
        expect=("failed",),
        init_step_size=50.0,
        beta_b=0.5,
        max_backtracks=4,
        n_batches_per_epoch=3,
    ),
    # A high merge threshold: components 0 and 1 merge at step 11, then the cycle runs over two components.
    plasls_case("plasls_merging", expect=("merge",), init_step_size=1.0, n_batches_per_epoch=10, merge_threshold=0.2),
    salsa_case("salsa_no_speed_up", speed_up=False, init_step_size=2.0),
    salsa_case("salsa_free_running", resync=False, speed_up=False, init_step_size=2.0),
    salsa_case("salsa_defaults", n_steps=100, expect=("skipped",)),
    salsa_case("salsa_weight_decay", weight_decay=0.01, speed_up=False, init_step_size=2.0),
    salsa_case("salsa_weight_decay_speed_up", n_steps=100, expect=("skipped",), weight_decay=0.01, init_step_size=2.0),
    salsa_case("salsa_momentum_direction", use_momentum_direction=True, speed_up=False, init_step_size=2.0),
    salsa_case("salsa_classic", speed_up=False, init_step_size=2.0, armijo="classic"),
    salsa_case("salsa_authors_bias_correction", n_steps=100, expect=("skipped",), bias_correction="authors"),
    salsa_case("salsa_authors_bias_correction_momentum", use_momentum_direction=True, bias_correction="authors"),
    salsa_case("salsa_failures", expect=("failed",), speed_up=False, init_step_size=50.0, max_backtracks=3),
    # backtracking="interpolate": the reference fits its models with numpy (see RefBacktracking).
    sgd_case("sgdsls_interpolate", init_step_size=20.0, backtracking="interpolate"),
    sgd_case(
        "sgdsls_interpolate_failures",
        expect=("failed",),
        init_step_size=1e3,
        max_backtracks=3,
        n_batches_per_epoch=2,
        backtracking="interpolate",
    ),
    adam_case("adamsls_interpolate", n_steps=48, init_step_size=2.0, backtracking="interpolate"),
    adam_case(
        "adamsls_interpolate_momentum",
        init_step_size=1.0,
        betas=(0.9, 0.999),
        n_batches_per_epoch=10,
        backtracking="interpolate",
    ),
    plasls_case("plasls_interpolate", init_step_size=1.0, n_batches_per_epoch=10, backtracking="interpolate"),
    salsa_case("salsa_interpolate", speed_up=False, init_step_size=2.0, backtracking="interpolate"),
    salsa_case(
        "salsa_interpolate_momentum_direction",
        use_momentum_direction=True,
        speed_up=False,
        init_step_size=2.0,
        backtracking="interpolate",
    ),
]


def assert_params_close(model: nn.Module, ref_params: list[Tensor], tol: tuple[float, float], where: str) -> None:
    for i, (p, q) in enumerate(zip(model.parameters(), ref_params, strict=True)):
        torch.testing.assert_close(
            p.detach(), q, rtol=tol[0], atol=tol[1], msg=lambda m, i=i: f"{where}, param {i}: {m}"
        )


def run_side_by_side(c: Case) -> list[RefRecord]:
    """Step the library optimizer and its reference together; assert agreement after every step."""
    model = make_model()
    opt = c.make_opt(model)
    ref = c.make_ref([p.detach() for p in model.parameters()])
    data = make_batches()
    tol = TIGHT if c.resync else LOOSE
    history = []
    for step in range(c.n_steps):
        x, y = data[step % len(data)]

        def closure(x=x, y=y):
            return F.cross_entropy(model(x), y)

        opt.step(closure)
        got = opt.last_step
        want = ref.step(lambda ps, x=x, y=y: functional_loss(ps, x, y))
        where = f"{c.name} step {step + 1}: library {got} vs reference {want}"
        assert got.step == step + 1, where
        assert got.loss == pytest.approx(want.loss, rel=tol["loss"]), where
        assert (got.outcome, got.trials) == (want.outcome, want.trials), where
        assert got.closure_calls == 1 + want.trials, where
        assert got.step_sizes == pytest.approx(want.step_sizes, rel=tol["step"]), where
        if want.searched is not None:
            assert (got.searched, got.merged) == (want.searched, want.merged), where
        assert_params_close(model, ref.w, tol["param"], f"{c.name} step {step + 1}")
        if c.resync:
            ref.w = [p.detach().clone() for p in model.parameters()]
        history.append(want)
    return history


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_matches_reference_equations(c: Case):
    history = run_side_by_side(c)
    searched = [r for r in history if r.outcome != "skipped"]
    assert any(r.trials > 1 for r in searched), "the backtracking path was never exercised"
    assert any(r.outcome == "accepted" for r in history)
    outcomes = {r.outcome for r in history} | ({"merge"} if any(r.merged for r in history) else set())
    for outcome in c.expect:
        assert outcome in outcomes, f"no {outcome!r} step over the run: {outcomes}"


# ---------------------------------------------------------------------------------------------- hand-worked quadratics


def quadratic(a: float, w_start: float) -> tuple[nn.Parameter, Callable[[], Tensor]]:
    """``f(w) = 0.5*a*w^2`` on a one-element float64 parameter; its gradient is ``a*w``."""
    w = nn.Parameter(torch.tensor([w_start], dtype=DTYPE))

    def closure() -> Tensor:
        return 0.5 * a * (w * w).sum()

    return w, closure


def test_sgdsls_quadratic_accepts_on_the_armijo_boundary_then_skips_at_the_minimum():
    # f = 2w^2 from w = 1: g = 4, s = 16; Armijo 2(1 - 4eta)^2 <= 2 - 0.5*eta*16 holds iff eta <= 2(1-c)/a = 0.25.
    # Trials 1 and 0.5 fail; 0.25 lands exactly on the boundary (f = 0 <= 2 - 2 = 0): "<=" accepts it.
    w, closure = quadratic(4.0, 1.0)
    opt = lsfused.SGDSLS([w], init_step_size=1.0, c=0.5, beta_b=0.5, gamma=1.0)
    opt.step(closure)
    rec = opt.last_step
    assert (rec.outcome, rec.trials, rec.closure_calls) == ("accepted", 3, 4)
    assert rec.step_sizes == (0.25,)
    assert rec.loss == 2.0 and rec.trial_loss == 0.0
    assert w.item() == 0.0
    # At the minimum g = 0, so s = 0: no line search, no move, the step size is kept (gamma = 1: no growth).
    opt.step(closure)
    rec = opt.last_step
    assert (rec.outcome, rec.trials, rec.closure_calls) == ("skipped", 0, 1)
    assert rec.step_sizes == (0.25,)
    assert w.item() == 0.0


def test_sgdsls_quadratic_growth_and_backtracking_in_closed_form():
    # f = 1.5w^2, g = 3w, s = 9w^2, c = 0.1: Armijo holds iff eta <= 2(1-c)/a = 0.6. gamma = 2 with one batch per
    # epoch doubles eta before every search (Eq. 2), also before the first: 2, 1, 0.5 -> 3 trials, eta = 0.5.
    # Every later step starts from 2*0.5 = 1 (rejected) and accepts 0.5: w <- w - 0.5*3w = -w/2.
    w, closure = quadratic(3.0, 1.0)
    opt = lsfused.SGDSLS([w], init_step_size=1.0, c=0.1, beta_b=0.5, gamma=2.0, n_batches_per_epoch=1)
    for k in range(1, 6):
        opt.step(closure)
        rec = opt.last_step
        assert (rec.outcome, rec.trials) == ("accepted", 3 if k == 1 else 2), k
        assert rec.step_sizes == (0.5,), k
        assert rec.loss == 1.5 * 0.25 ** (k - 1), k
        assert rec.trial_loss == 1.5 * 0.25**k, k
        assert w.item() == (-0.5) ** k, k


@pytest.mark.parametrize("on_failure", ["revert", "last"])
def test_sgdsls_quadratic_failure_keeps_the_last_step_size(on_failure):
    # f = 1.5w^2 from w = 1 (accept iff eta <= 0.6), two trials per step, no growth.
    w, closure = quadratic(3.0, 1.0)
    opt = lsfused.SGDSLS([w], init_step_size=8.0, c=0.1, beta_b=0.5, gamma=1.0, max_backtracks=2, on_failure=on_failure)
    opt.step(closure)  # trials 8, 4: both fail; the step size is the last one tried
    rec = opt.last_step
    assert (rec.outcome, rec.trials, rec.step_sizes) == ("failed", 2, (4.0,))
    assert rec.trial_loss == 1.5 * 11.0**2  # w = 1 - 4*3 = -11
    if on_failure == "last":
        assert w.item() == -11.0
        return
    assert w.item() == 1.0  # reverted to w0
    expected = [("failed", (2.0,), 1.0), ("failed", (1.0,), 1.0), ("accepted", (0.5,), -0.5)]
    for outcome, sizes, w_after in expected:  # trials (4, 2), (2, 1), (1, 0.5)
        opt.step(closure)
        rec = opt.last_step
        assert (rec.outcome, rec.trials, rec.step_sizes) == (outcome, 2, sizes)
        assert w.item() == w_after


def hand_adam(g: float, m: float, v: float, k: int, b1: float, b2: float, eps: float):
    """One element of Adam: new moments, the search direction d, the momentum direction dm and s = g*g/denom."""
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    denom = math.sqrt(v) / math.sqrt(1.0 - b2**k) + eps
    return m, v, -g / denom, -(m / (1.0 - b1**k)) / denom, g * g / denom


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_adamsls_quadratic_worked_by_hand(b1):
    # f = 2w^2 from w = 1 (g = 4w), c = 0.1, eta from 3 halving, no growth. On step 1 the direction is
    # -g/(|g| + eps) ~ -1, so trial 3 (w ~ -2, f ~ 8 > 0.8) fails and 1.5 (w ~ -0.5, f ~ 0.5 <= 1.4) passes. On step
    # 2 (w ~ -0.5, g ~ -2, denom ~ 3.16) trial 1.5 fails and 0.75 passes. With b1 = 0.9 the search is the same, but
    # the applied step is w0 + eta*dm with dm = -m_hat/denom: on step 2 m_hat ~ 0.84 > 0, so w moves to ~ -0.7.
    a, b2, eps, c = 4.0, 0.999, 1e-8, 0.1
    w, closure = quadratic(a, 1.0)
    opt = lsfused.AdamSLS([w], init_step_size=3.0, c=c, beta_b=0.5, gamma=1.0, betas=(b1, b2), eps=eps)
    x, m, v, eta = 1.0, 0.0, 0.0, 3.0
    for k, (trials, eta_accepted) in enumerate([(2, 1.5), (2, 0.75)], start=1):
        g = a * x
        f0 = 0.5 * a * x * x
        m, v, d, dm, s = hand_adam(g, m, v, k, b1, b2, eps)
        for t in range(trials):  # the trials before the accepted one fail, the accepted one passes
            x_trial = x + eta * d
            passes = 0.5 * a * x_trial * x_trial <= f0 - c * eta * s
            assert passes == (t == trials - 1), (k, t)
            if not passes:
                eta *= 0.5
        assert eta == eta_accepted
        x = x + eta * (dm if b1 > 0 else d)
        opt.step(closure)
        rec = opt.last_step
        assert (rec.outcome, rec.trials, rec.step_sizes) == ("accepted", trials, (eta_accepted,)), k
        assert rec.loss == pytest.approx(f0, rel=1e-12, abs=0.0), k
        assert w.item() == pytest.approx(x, rel=1e-12, abs=0.0), k
        assert opt.state[w]["exp_avg_sq"].item() == pytest.approx(v, rel=1e-12, abs=0.0), k
        if b1 > 0:
            assert opt.state[w]["exp_avg"].item() == pytest.approx(m, rel=1e-12, abs=0.0), k
    # The momentum step really differs from the searched point (~ -0.03 without momentum).
    assert (w.item() < -0.6) if b1 > 0 else (abs(w.item()) < 0.05)


def test_salsa_zero_observed_decrease_is_accepted_without_updating_d():
    # A linear loss f = w (g = 1 every step, so s ~ 1 and G_k = 1 - 0.9^k) and scripted trial losses
    # f(trial) = f0 - raw_k. eta0 = 1.1^k; the test is 0.9*D_prev + 0.1*raw >= 0.5*eta*G.
    #  step 1: raw = 0 -> accepted only by the "exactly 0" rule (the smoothed test sees 0 < 0.5*1.1*0.1); D stays 0.
    #  step 2: raw = 10 -> 1 >= 0.115: accepted, D = 1.
    #  step 3: raw = 0 -> accepted by the rule, D stays 1 (updating it would give 0.9).
    #  step 4: raw = -6 -> 0.9*1 - 0.6 = 0.3 >= 0.5*1.4641*0.3439 = 0.252: accepted; with D = 0.9 it would be 0.21.
    w = nn.Parameter(torch.tensor([10.0], dtype=DTYPE))
    raw_decrease = [0.0, 10.0, 0.0, -6.0]
    seen = {"step": -1, "f0": None}

    def closure() -> Tensor:
        f = w.sum()
        if torch.is_grad_enabled():
            seen["step"] += 1
            seen["f0"] = f.detach().clone()
            return f
        return seen["f0"] - raw_decrease[seen["step"]]

    opt = lsfused.SaLSa(
        [w], init_step_size=1.0, speed_up=False, max_backtracks=1, armijo="classic", deterministic_closure=False
    )
    for k in range(1, 5):
        opt.step(closure)
        rec = opt.last_step
        assert (rec.outcome, rec.trials) == ("accepted", 1), (k, rec)
        assert rec.step_sizes == pytest.approx((1.1**k,), rel=1e-12), k


def test_plasls_zero_gradient_component_does_not_stop_the_others():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, dtype=DTYPE))
    unused = nn.Parameter(torch.randn(2, dtype=DTYPE))  # a component without gradient, e.g. a frozen embedding

    def closure() -> Tensor:
        return (a * a).sum() + 0.0 * unused.sum()

    opt = lsfused.PLASLS(
        [[a], [unused]], init_step_size=0.1, gamma=1.0, deterministic_closure=False, full_search_steps=1
    )
    opt.step(closure)  # full search
    opt.step(closure)  # component 0
    before = a.detach().clone()
    opt.step(closure)  # component 1: s_1 = 0, nothing to search there
    assert opt.last_step.searched == (1,)
    # Eq. 7: component 0 still takes its step w0 - 0.1*g/denom.
    assert not torch.equal(a.detach(), before)


def test_salsa_bias_correction_must_be_known():
    with pytest.raises(ValueError, match="bias_correction"):
        lsfused.SaLSa([nn.Parameter(torch.zeros(2))], bias_correction="theirs")
