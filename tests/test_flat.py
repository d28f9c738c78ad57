"""Flat buffers: parameters and grads are views, odd parameters and replaced grads are handled."""

import pytest
import torch
from conftest import batches, closure_for, mlp
from torch import nn

import lsfused


def test_params_and_grads_are_views_of_one_buffer():
    model = mlp()
    values = [p.detach().clone() for p in model.parameters()]
    opt = lsfused.AdamSLS(model.parameters())
    (bucket,) = opt._buckets
    for p, v in zip(model.parameters(), values, strict=True):
        assert torch.equal(p, v)  # values survive the move into the buffer
        assert p.untyped_storage().data_ptr() == bucket.w.untyped_storage().data_ptr()
        assert p.grad.untyped_storage().data_ptr() == bucket.g.untyped_storage().data_ptr()
    x, y = batches(1)[0]
    opt.step(closure_for(model, x, y))
    assert all(p.grad.untyped_storage().data_ptr() == bucket.g.untyped_storage().data_ptr() for p in model.parameters())


def test_tied_weights_counted_once():
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    opt = lsfused.AdamSLS([emb.weight, head.weight])
    assert opt._buckets[0].numel == 20
    ids = torch.tensor([0, 1, 2])
    opt.step(lambda: head(emb(ids)).pow(2).mean())
    assert opt.last_step.outcome == "accepted"


def test_non_contiguous_parameter():
    p = nn.Parameter(torch.randn(4, 3).t())
    assert not p.is_contiguous()
    value = p.detach().clone()
    opt = lsfused.SGDSLS([p])
    assert torch.equal(p, value)
    opt.step(lambda: (p * p).sum())
    assert opt.last_step.outcome == "accepted"
    assert (p * p).sum() < (value * value).sum()


def manual_grad_step(opt_cls, set_grads):
    """Run one step with the loss given and grads set by ``set_grads``; return the parameters after it."""
    model = mlp()
    opt = opt_cls(model.parameters(), deterministic_closure=False)
    x, y = batches(1)[0]
    closure = closure_for(model, x, y)
    loss = closure()
    set_grads(model, loss)
    opt.step(closure, loss=loss)
    return [p.detach().clone() for p in model.parameters()]


def test_replaced_grads_are_copied_in():
    def backward(model, loss):
        loss.backward()

    def replaced(model, loss):
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()  # not a view of the flat buffer

    def set_to_none_then_backward(model, loss):
        for p in model.parameters():
            p.grad = None  # as zero_grad(set_to_none=True) of another optimizer would
        loss.backward()

    ref = manual_grad_step(lsfused.AdamSLS, backward)
    for variant in (replaced, set_to_none_then_backward):
        got = manual_grad_step(lsfused.AdamSLS, variant)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), variant.__name__


def test_missing_grad_counts_as_zero():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = lsfused.AdamSLS([used, unused])
    opt.step(lambda: (used * used).sum())
    assert torch.equal(unused, torch.ones(2))
    assert not torch.equal(used, torch.ones(3))


def test_zero_grad_keeps_views():
    model = mlp()
    opt = lsfused.AdamSLS(model.parameters())
    x, y = batches(1)[0]
    closure_for(model, x, y)().backward()
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        assert p.grad is not None and not p.grad.any()


def test_step_with_existing_grads_accumulated():
    """``step(closure, loss=...)`` uses the grads as they are (gradient accumulation by the caller)."""
    model = mlp()
    opt = lsfused.SGDSLS(model.parameters(), init_step_size=1e-3, gamma=1.0)
    (x1, y1), (x2, y2) = batches(2)
    opt.zero_grad()
    l1 = closure_for(model, x1, y1)()
    l1.backward()
    l2 = closure_for(model, x2, y2)()
    l2.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(model, x1, y1), loss=l1)
    eta = opt.last_step.step_sizes[0]
    # Two closure calls: f(w0) re-evaluated under the step's seed (deterministic_closure), then the trial.
    assert opt.last_step.outcome == "accepted" and opt.last_step.closure_calls == 2
    for p, w0, g in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(p.detach(), w0 - eta * g, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_parameters(dtype):
    model = mlp(dtype=dtype)
    opt = lsfused.AdamSLS(model.parameters())
    (bucket,) = opt._buckets
    expected_state = torch.float64 if dtype == torch.float64 else torch.float32
    assert bucket.w.dtype == dtype and bucket.v.dtype == expected_state and bucket.w0.dtype == expected_state
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(3, dtype=dtype):
        opt.step(closure_for(model, x, y))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_buckets_by_dtype():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = lsfused.AdamSLS([a, b])
    assert sorted(str(bk.dtype) for bk in opt._buckets) == ["torch.float32", "torch.float64"]
    opt.step(lambda: (a * a).sum() + (b * b).sum().float())
    assert opt.last_step.outcome == "accepted"


def test_grads_computed_before_construction_are_kept():
    model = mlp()
    x, y = batches(1)[0]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    opt = lsfused.AdamSLS(model.parameters())
    for p, g in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, g)
    opt.step(closure_for(model, x, y), loss=loss.detach())
    assert opt.last_step.outcome != "skipped"  # the step followed those gradients, not zeros
