"""The own-backward path ``step(closure, loss=loss)`` with dropout: never silently worse than ``step(closure)``.

The references are ``step(closure)`` runs of the same model and data (bit-identical where the random state can be
matched: ``watch()``, the fallback under the step's seed), and the step sizes of the mismatched path as it was before
(``_rng_step`` claimed for every step: trials compared with a loss of other dropout masks), which collapse.
"""

import copy
import dataclasses
import warnings
from collections import Counter

import pytest
import torch
from conftest import assert_same, batches, closure_for, mlp, snapshot
from torch import nn

import lsfused

STEPS = 25


def mlp_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
    return model, lambda: nn.functional.cross_entropy(model(x), y)


def bert_task():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1  # the shipped dropout
    model = transformers.BertForSequenceClassification(config).train()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 100, (16, 12), generator=g), torch.randint(0, 2, (16,), generator=g)
    return model, lambda: model(input_ids=ids, labels=labels).loss


def train(task, loop, steps=STEPS):
    """Train with ``loop``; return the model, per-step records and the lsfused warnings raised."""
    model, closure = task()
    opt = lsfused.AdamSLS(model.parameters())
    if loop == "watch":
        opt.watch(model)
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            if loop == "closure":
                opt.step(closure)
            else:
                if loop == "no_zero_grad":  # grads zeroed past the optimizer: it captures nothing
                    model.zero_grad(set_to_none=False)
                else:
                    opt.zero_grad()
                if loop in ("noise", "no_zero_grad"):
                    torch.rand(1)  # a random draw before the forward (a sampler, an augmentation)
                loss = closure()
                loss.backward()
                opt.step(closure, loss=loss)
            records.append(opt.last_step)
    return model, records, [str(w.message) for w in caught if "loss=loss" in str(w.message)]


def same_run(a, b):
    model_a, records_a, _ = a
    model_b, records_b, _ = b
    for ra, rb in zip(records_a, records_b, strict=True):
        assert (ra.loss, ra.step_sizes, ra.trials, ra.outcome, ra.trial_loss) == (
            rb.loss, rb.step_sizes, rb.trials, rb.outcome, rb.trial_loss
        )  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True))


@pytest.mark.parametrize("task", [mlp_task, bert_task], ids=["mlp", "bert"])
def test_watched_own_backward_is_bit_identical_to_step_closure(task):
    reference = train(task, "closure")
    watched = train(task, "watch")
    same_run(reference, watched)
    assert watched[2] == []
    assert all(r.closure_calls == r.trials + 1 for r in watched[1])  # the check's forward, no fallback


@pytest.mark.parametrize("task", [mlp_task, bert_task], ids=["mlp", "bert"])
def test_zero_grad_capture_keeps_the_step_sizes_of_step_closure(task):
    _, reference, _ = train(task, "closure")
    _, records, warned = train(task, "loss")
    assert warned == []
    assert all(r.closure_calls == r.trials + 1 for r in records)  # the capture matched: no fallback
    assert Counter(r.outcome for r in records)["accepted"] == STEPS
    assert 0.1 < records[-1].step_sizes[0] / reference[-1].step_sizes[0] < 10


def test_mismatched_loss_falls_back_to_step_closure_and_warns_once():
    """No capture (grads zeroed past the optimizer) and a random draw before the forward: the loss cannot be matched,
    so every step runs the closure's forward and backward under the step's seed: exactly step(closure)."""
    reference = train(mlp_task, "closure")
    fallen = train(mlp_task, "no_zero_grad")
    same_run(reference, fallen)
    assert all(r.closure_calls == r.trials + 2 for r in fallen[1])
    assert len(fallen[2]) == 1 and "opt.watch(model)" in fallen[2][0]


def test_capture_that_cannot_match_falls_back_and_keeps_the_step_size(monkeypatch):
    _, reference, _ = train(mlp_task, "closure")
    _, records, warned = train(mlp_task, "noise")
    assert len(warned) == 1 and "between opt.zero_grad() and the forward" in warned[0]
    assert all(r.closure_calls == r.trials + 2 for r in records)
    assert 0.1 < records[-1].step_sizes[0] / reference[-1].step_sizes[0] < 10
    # The same loop compared with the caller's loss (trusted as if step_rng had vouched for it) collapses: the
    # scenario does test the fallback.
    trusted_rng = property(lambda s: s._step_count, lambda s, v: None)
    monkeypatch.setattr(lsfused.AdamSLS, "_rng_step", trusted_rng, raising=False)
    _, trusted, _ = train(mlp_task, "noise")
    assert trusted[-1].step_sizes[0] < 1e-3 * reference[-1].step_sizes[0]


def test_a_closure_raising_in_the_check_or_the_fallback_changes_nothing():
    for fail_at in (1, 2):  # the check's forward, the fallback's forward
        model, closure = mlp_task()
        opt = lsfused.AdamSLS(model.parameters())
        opt.step(closure)
        before, record, calls = snapshot(model, opt), opt.last_step, [0]

        def failing(fail_at=fail_at, calls=calls, closure=closure):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("closure fails")
            return closure()

        loss = closure()  # other dropout masks than the step's: the check falls back
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError, match="closure fails"):
                opt.step(failing, loss=loss)
        assert calls[0] == fail_at
        assert_same(before, snapshot(model, opt))
        assert opt.last_step is record


def test_nonfinite_loss_argument_is_refused_not_replaced():
    model, closure = mlp_task()
    opt = lsfused.AdamSLS(model.parameters())
    loss = closure()
    loss.backward()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="not finite"):
        opt.step(closure, loss=loss * float("nan"))
    assert_same(before, snapshot(model, opt))


def test_watch_hooks_only_the_callers_grad_forward_and_can_be_removed():
    model, closure = mlp_task()
    opt = lsfused.AdamSLS(model.parameters())
    handle = opt.watch(model)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    closure()  # the caller's RNG state is restored after the watched forward
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        a, b = closure(), closure()  # not seeded without grad (an evaluation forward): other masks each time
    assert not torch.equal(a, b)
    with opt.step_rng():  # already the step's state: the hook must not seed again at the forward
        torch.rand(1)
        inside = closure()
    with opt.step_rng():
        torch.rand(1)
        handle.remove()
        unhooked = closure()
    assert torch.equal(inside, unhooked)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(TypeError, match="torch.nn.Module"):
        opt.watch(lambda x: x)


def test_watched_model_copies_and_pickles_with_detached_hooks():
    """The hooks hold the optimizer weakly: a watched model neither keeps it alive nor drags it into its copies,
    whose forwards belong to no optimizer (not seeded) until watched again."""
    import copy
    import gc
    import io
    import weakref

    model, closure = mlp_task()
    opt = lsfused.AdamSLS(model.parameters())
    opt.watch(model)
    x = torch.randn(4, 20)
    for twin in (copy.deepcopy(model), torch.load(_saved(model, io), weights_only=False)):
        torch.manual_seed(3)
        state = torch.get_rng_state()
        twin(x)  # a detached hook neither seeds nor restores: the forward drew from the caller's generator
        assert not torch.equal(torch.get_rng_state(), state)
        assert opt._watch_stack == []
    pair = copy.deepcopy((model, opt))  # the copied optimizer steps on its own, its copied model unwatched
    pair[1].step(lambda: nn.functional.cross_entropy(pair[0](x), torch.zeros(4, dtype=torch.long)))
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    model(x)  # the hooks outlive their optimizer and do nothing


def _saved(model, io):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


# ---------------------------------------------------------------------------------------------- accelerate


@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate
    # The Accelerator's settings live in process-wide singletons: leave none behind for the other tests.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("watch", [True, False], ids=["watch", "capture"])
def test_accelerate_loop(accelerate, watch):
    reference = train(bert_task, "closure", steps=10)
    model, closure = bert_task()
    opt = lsfused.AdamSLS(model.parameters())
    if watch:
        opt.watch(model)
    accelerator = accelerate.Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    records = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            prepared.zero_grad()
            loss = closure()
            accelerator.backward(loss)
            opt.step(closure, loss=loss)
            records.append(opt.last_step)
    assert not [w for w in caught if "loss=loss" in str(w.message)]
    assert all(r.closure_calls == r.trials + 1 for r in records)
    if watch:
        same_run(reference, (model, records, []))
    else:
        assert 0.1 < records[-1].step_sizes[0] / reference[1][-1].step_sizes[0] < 10


def test_accelerate_gradient_accumulation_refused(accelerate):
    model, closure = mlp_task()
    opt = lsfused.AdamSLS(model.parameters())
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, prepared = accelerator.prepare(model, opt)
    before = snapshot(model, opt)
    for micro in range(2):
        with accelerator.accumulate(model):
            loss = closure()
            accelerator.backward(loss)
            with pytest.raises(ValueError, match="gradient_accumulation_steps=2.*larger batch"):
                if micro == 0:
                    opt.step(closure, loss=loss)
                else:  # accelerate's own step path, which calls the optimizer on the micro-step that syncs
                    prepared.step(closure)
    assert_same(before, snapshot(model, opt))


def test_a_fallback_is_the_closure_step_whatever_zero_grad_captured():
    """The cause: a capture for this step that does not match the caller's loss (a random draw after ``zero_grad()``)
    used to decide the fallback's dropout masks too, so the fallback step was no ``step(closure)``. Found by the
    property test: a refused step, then ``zero_grad()`` again at the same step count, then a loop that draws."""
    for make in (lambda m: lsfused.SGDSLS(m.parameters()), lambda m: lsfused.SaLSa(m.parameters())):
        model = mlp(dropout=0.5)
        opt = make(model)
        twin_model = copy.deepcopy(model)
        twin = make(twin_model)
        twin.load_state_dict(opt.state_dict())
        (x, y), *_ = batches(1)
        opt.zero_grad()  # captures this step's generator state
        torch.rand(1)  # ... which the forward then does not start from
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure_for(model, x, y), loss=loss)
        twin.step(closure_for(twin_model, x, y))
        assert opt.last_step == dataclasses.replace(twin.last_step, closure_calls=opt.last_step.trials + 2)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))
