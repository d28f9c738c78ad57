"""Baselines the benchmarks compare against (not optimizers to use).

``PaperStyleAdamSLS`` is a faithful per-tensor ADAMSLS in the style of the paper's published code (arXiv 2403.18506,
the authors' ``sls/adam_sls.py``): a deep-copied snapshot of the parameters and gradients every step, Python loops
over tensors, a Python ``sum`` of per-tensor norms, and each trial recomputing ``p = p0 - eta*g/(sqrt(v_hat)+eps)``
tensor by tensor. Its decisions equal ``lsfused.AdamSLS``'s up to rounding; it is here to be timed.
"""

from __future__ import annotations

import copy

import torch


class PaperStyleAdamSLS:
    def __init__(
        self,
        params,
        init_step_size: float = 0.1,
        c: float = 0.1,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        n_batches_per_epoch: int = 500,
        beta: float = 0.999,
        eps: float = 1e-8,
        max_backtracks: int = 100,
    ):
        self.params = list(params)
        self.c, self.beta_b, self.beta, self.eps = c, beta_b, beta, eps
        self.growth = gamma ** (1.0 / n_batches_per_epoch)
        self.max_backtracks = max_backtracks
        self.state = {"step": 0, "step_size": init_step_size, "gv": [torch.zeros_like(p) for p in self.params]}

    @torch.no_grad()
    def step(self, closure, loss: torch.Tensor) -> float:
        """One step with existing grads; ``closure()`` evaluates a trial. Returns the accepted step size."""
        params_current = copy.deepcopy(self.params)
        grad_current = [p.grad.detach().clone() for p in self.params]
        step = self.state["step"] + 1
        for gv, g in zip(self.state["gv"], grad_current, strict=True):
            gv.mul_(self.beta).add_((1 - self.beta) * g**2)
        precond = [torch.sqrt(gv / (1 - self.beta**step)) + self.eps for gv in self.state["gv"]]
        pp = sum(float(((g**2) / pc).sum()) for g, pc in zip(grad_current, precond, strict=True))
        step_size = self.state["step_size"] * self.growth
        loss0 = float(loss)
        for _ in range(self.max_backtracks):
            for p, p0, g, pc in zip(self.params, params_current, grad_current, precond, strict=True):
                p.data = p0 - step_size * g / pc
            loss_next = float(closure())
            if loss0 - loss_next >= step_size * self.c * pp:
                break
            step_size *= self.beta_b
        self.state["step"] = step
        self.state["step_size"] = step_size
        return step_size
