"""The modules the step is built from, each tested alone: values in, values out, no optimizer needed.

Each test compares with an independent computation (the equations written out, torch's own clipping) or checks an
error path; ``test_no_concern_imports_the_base_class`` holds the split in place.
"""

import ast
import math
from pathlib import Path

import pytest
import torch

from lsfused.backends import resolve
from lsfused.optim import acceptance, checkpoint, distributed, passes, scaling, transaction, validation
from lsfused.reference import MODE_SGD

OPTIM = Path(__file__).resolve().parent.parent / "lsfused" / "optim"


def test_no_concern_imports_the_base_class():
    """Only the optimizers (and the package) import ``base``: every concern module takes values and returns values."""
    importers = set()
    for path in OPTIM.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "lsfused.optim.base" for n in names):
                importers.add(path.stem)
    assert importers == {"__init__", "sls", "salsa"}


def test_no_module_of_the_package_is_over_600_lines():
    package = OPTIM.parent
    long = {
        str(p.relative_to(package)): n for p in package.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long


def _armijo(f, c=0.1, slope=-1.0):
    """The Armijo test for f along a ray whose derivative at 0 is ``slope``."""
    return lambda eta, ft: ft <= f(0.0) + c * eta * slope


def test_backtrack_takes_the_first_geometric_step_that_passes():
    f = lambda eta: (eta - 0.3) ** 2  # noqa: E731
    seen = []
    result = acceptance.backtrack(
        f, f(0.0), 4.0, _armijo(f, slope=-0.6), lambda eta: 0.06 * eta, 0.5, 20, None,
        lambda t, eta, ft, ok, rule: seen.append((t, eta, ok, rule)),
    )  # fmt: skip
    # Written out: the first 4 * 0.5**j with (eta - 0.3)**2 <= 0.09 - 0.06 eta.
    expected = next(4.0 * 0.5**j for j in range(20) if (4.0 * 0.5**j - 0.3) ** 2 <= 0.09 - 0.06 * 4.0 * 0.5**j)
    assert result.outcome == "accepted" and result.eta == expected and result.trials == len(seen)
    assert [rule for *_, rule in seen] == ["grow"] + ["geometric"] * (len(seen) - 1)
    assert [ok for _, _, ok, _ in seen] == [False] * (len(seen) - 1) + [True]


def test_backtrack_fails_at_max_trials_and_keeps_the_last_step_size():
    result = acceptance.backtrack(
        lambda eta: 1.0 + eta, 1.0, 1.0, lambda eta, ft: False, lambda eta: eta, 0.5, 4, None, lambda *a: None
    )
    assert (result.outcome, result.eta, result.trials, result.trial_loss) == ("failed", 0.125, 4, 1.125)


def test_backtrack_nonfinite_trial_is_a_rejection():
    losses = iter([math.nan, math.inf, 0.5])
    result = acceptance.backtrack(
        lambda eta: next(losses), 1.0, 1.0, lambda eta, ft: ft < 1.0, lambda eta: eta, 0.5, 5, None, lambda *a: None
    )
    assert (result.outcome, result.eta, result.trials) == ("accepted", 0.25, 3)


def test_two_unchanged_losses_end_the_search_where_the_tie_began():
    f0 = 2.0
    result = acceptance.backtrack(
        lambda eta: f0, f0, 1.0, lambda eta, ft: False, lambda eta: 1e-3 * eta, 0.5, 10,
        lambda ft, pred, twice: acceptance.unresolvable(f0, ft, pred, 0.0, twice, lambda: 0.0), lambda *a: None,
    )  # fmt: skip
    assert (result.outcome, result.reason, result.eta, result.trials) == ("unresolvable", "noise", 1.0, 2)


def test_unresolvable_rules():
    never = lambda: pytest.fail("the absorbed fraction is asked for only when noise does not decide")  # noqa: E731
    assert acceptance.unresolvable(1.0, 1.0 + 1e-9, 1e-9, 1e-8, False, never) == "noise"
    assert acceptance.unresolvable(1.0, math.nan, 1e-9, 1e-8, True, never) is None
    assert acceptance.unresolvable(1.0, 1.5, 0.1, 1e-8, False, lambda: 0.9995) == "absorbed"
    assert acceptance.unresolvable(1.0, 1.5, 0.1, 1e-8, False, lambda: 0.5) is None


def test_rounding_bound_is_one_ulp_or_the_noise():
    ulp = float(torch.finfo(torch.float32).eps) * 4  # the spacing of float32 numbers in [4, 8)
    assert acceptance.rounding_bound(5.0, 4.0, torch.float32, 0.0) == ulp
    assert acceptance.rounding_bound(5.0, math.inf, torch.float32, 0.25) == 0.25
    assert acceptance.loss_ulp(3.0, torch.int64) == 0.0


def test_settled_step_size_keeps_a_capped_accepted_start():
    accepted = acceptance.SearchResult("accepted", 0.1, 1, 0.5)
    assert acceptance.settled_step_size(0.5, 0.1, 0.6, accepted) == 0.5  # the cap limited it: not shrunk to it
    assert acceptance.settled_step_size(0.5, 0.6, 0.6, accepted) == 0.1  # no cap: what the search found
    shrunk = acceptance.SearchResult("accepted", 0.05, 2, 0.5)
    assert acceptance.settled_step_size(0.5, 0.1, 0.6, shrunk) == 0.05


@pytest.mark.parametrize("max_norm", [None, 0.5, 100.0])
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_unscale_and_clip_matches_torch(max_norm, scale):
    g = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scaled = g * (scale or 1.0)
    norm, factor = scaling.unscale_and_clip(float((scaled * scaled).sum()), scale, max_norm)
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_([p], max_norm if max_norm is not None else math.inf)
    assert norm == pytest.approx(float(torch_norm), rel=1e-12)
    torch.testing.assert_close(scaled * factor, p.grad, rtol=1e-12, atol=0)


def test_loss_scale_backs_off_and_grows():
    s = scaling.LossScale(8.0)
    s.overflow()
    assert (s.scale, s.tracker) == (4.0, 0)
    for _ in range(scaling.INTERVAL - 1):
        s.clean()
    assert (s.scale, s.tracker) == (4.0, scaling.INTERVAL - 1)
    s.clean()
    assert (s.scale, s.tracker) == (8.0, 0)


def test_scaled_gradient_warning_only_for_a_tiny_ratio_of_a_failed_search():
    assert "still scaled" in scaling.scaled_gradient_warning("AdamSLS", "failed", 1e-5)
    assert scaling.scaled_gradient_warning("AdamSLS", "accepted", 1e-5) is None
    assert scaling.scaled_gradient_warning("AdamSLS", "failed", 0.5) is None


def test_distributed_without_a_process_group():
    assert distributed.active_group(None) is None
    assert distributed.world_size(None) == 1
    assert distributed.all_reduce([1.5, 2.0], None, torch.device("cpu")) == [1.5, 2.0]
    assert distributed.agreed_seed("layout", 7, None) == 7


def test_validation_errors_name_the_value():
    ok = {"deterministic_closure": True, "armijo": "noise_aware", "skip_trials": False, "estimate_noise": False}
    ok |= {"max_grad_norm": None, "loss_scale": None}
    validation.options(**ok)
    with pytest.raises(ValueError, match="skip_trials"):
        validation.options(**ok | {"skip_trials": "yes"})
    with pytest.raises(ValueError, match="loss_scale"):
        validation.options(**ok | {"loss_scale": -1.0})
    with pytest.raises(ValueError, match="armijo"):
        validation.options(**ok | {"armijo": "strict"})
    with pytest.raises(ValueError, match="True"):
        validation.positive("c", True)
    with pytest.raises(ValueError, match="c=0.2 but group 0 has 0.1"):
        validation.group_values([{"c": 0.1}, {"c": 0.2}], ("c",), lambda g: None)
    with pytest.raises(ValueError, match="complex"):
        validation.group_params([{"params": [torch.zeros(2, dtype=torch.complex64)]}])
    with pytest.raises(ValueError, match="no parameters"):
        validation.unique_params([], 3)
    p = torch.zeros(2)
    assert validation.unique_params([p, p], 0) == [p]
    with pytest.raises(TypeError, match="torch.Tensor"):
        validation.loss(1.0, "at a trial point")
    with pytest.raises(ValueError, match="scalar"):
        validation.loss(torch.zeros(2), "at a trial point")
    assert validation.loss(torch.tensor(0.1, dtype=torch.float32), "") == float(torch.tensor(0.1))


def test_closure_runner_counts_calls_and_refuses_backward():
    w = torch.ones(2, requires_grad=True)

    def closure():
        loss = (w * w).sum()
        loss.backward()
        return loss

    run = transaction.ClosureRunner(closure, None)
    with pytest.raises(ValueError, match="backward"):
        run()
    assert run.calls == 1 and w.grad is None
    seeded = []
    ok = transaction.ClosureRunner(lambda: (w * w).sum(), lambda: _Marker(seeded))
    out, value = transaction.evaluate(ok, "at the start", False, None, torch.device("cpu"))
    assert (value, ok.calls, seeded) == (2.0, 1, ["entered", "left"]) and not out.requires_grad


class _Marker:
    def __init__(self, log):
        self.log = log

    def __enter__(self):
        self.log.append("entered")

    def __exit__(self, *exc):
        self.log.append("left")


def test_passes_trial_and_restore_follow_the_equation():
    """Pass B ``w = w0 + eta_g*d`` per group on the reference backend, against the formula in float64, and the
    restore back to ``w0`` bit for bit."""
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))
    groups = [{"params": [a]}, {"params": [b]}]
    for p in (a, b):
        p.grad = torch.randn_like(p)
    (bucket,) = passes.build_buckets(groups, (False, False, False))
    bucket.read_params()
    bucket.w0.copy_(bucket.w)
    bucket.hp = [0.0] * 12  # SGD reads no hyperparameter: d = -g
    w0 = bucket.w0.clone()
    ops = resolve("torch")
    passes.trial_step([bucket], ops, {1: 0.25}, "d", MODE_SGD)
    expected = w0.double().clone()
    expected[5:] -= 0.25 * bucket.g[5:].double()
    assert torch.equal(bucket.w, expected.float())
    assert torch.equal(a.detach(), w0[:5]) and torch.equal(b.detach().flatten(), bucket.w[5:])
    passes.restore([bucket], ops, None)
    assert torch.equal(bucket.w, w0)


def test_checkpoint_checks_name_the_problem():
    groups = [{"params": [torch.zeros(2)], "c": 0.1}]
    saved = {"params": [0], "c": 0.1, "search_state": {"optimizer": "AdamSLS", "seed": 1}}
    keys = {"optimizer", "seed", "loss_scale", "loss_scale_tracker"}
    with pytest.raises(ValueError, match="2 param groups, this optimizer has 1"):
        checkpoint.checked_groups([saved, saved], groups, "AdamSLS", lambda g: None, keys)
    with pytest.raises(ValueError, match="saved by 'AdamSLS', cannot load it into SaLSa"):
        checkpoint.checked_groups([saved], groups, "SaLSa", lambda g: None, keys)
    with pytest.raises(ValueError, match="lacks \\['loss_scale', 'loss_scale_tracker'\\]"):
        checkpoint.checked_groups([saved], groups, "AdamSLS", lambda g: None, keys)
    full = {
        **saved,
        "search_state": {"optimizer": "AdamSLS", "seed": 1, "loss_scale": None, "loss_scale_tracker": None},
    }
    out, search = checkpoint.checked_groups([full], groups, "AdamSLS", lambda g: None, keys)
    assert out == [{"max_step_size": None, "c": 0.1}] and search["seed"] == 1
    p = groups[0]["params"][0]
    state = {p: {"step": torch.tensor(3.0), "exp_avg_sq": torch.zeros(2)}}
    bad = {0: {"step": torch.tensor(3.0), "exp_avg_sq": torch.tensor([1.0, -1.0])}}
    with pytest.raises(ValueError, match="exp_avg_sq.*finite and >= 0, holds -1.0"):
        checkpoint.checked_state(bad, groups, [full], state, {id(p): torch.Size([2])})
    good = {0: {"step": torch.tensor(3.0), "exp_avg_sq": torch.ones(2)}}
    moments, steps, tensors = checkpoint.checked_state(good, groups, [full], state, {id(p): torch.Size([2])})
    assert torch.equal(moments[p]["exp_avg_sq"], torch.ones(2)) and steps == [3] and tensors == {}


def test_flat_optimizer_is_a_layer_of_its_own():
    """``FlatOptimizer`` (the flat buffers and torch's optimizer contract) works without any line search: built,
    extended, capped, counted, saved, loaded and copied on its own."""
    import copy

    from lsfused.optim.flat_optimizer import FlatOptimizer

    def build():
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
        opt = FlatOptimizer([a], {"init_step_size": 0.5}, backend="torch")
        opt.add_param_group({"params": [b], "lr": 0.1})
        return a, b, opt

    a, b, opt = build()
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1] and opt._new_caps() == {1: 0.1}
    w = opt._buckets[0].w
    assert w.data_ptr() <= a.data_ptr() < w.data_ptr() + w.numel() * w.element_size()  # a view of the flat buffer
    opt._count_step()
    assert [opt.state[p]["step"].item() for p in (a, b)] == [1.0, 1.0]
    saved = opt.state_dict()
    assert saved["param_groups"][0]["search_state"] == {"optimizer": "FlatOptimizer"}
    _, _, other = build()
    other.load_state_dict(saved)
    assert other._step_count == 1 and other.state_dict()["param_groups"] == saved["param_groups"]
    twin = copy.deepcopy(other)
    assert twin._step_count == 1 and twin._buckets[0].w is not other._buckets[0].w
