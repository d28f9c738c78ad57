"""A real pytorch_lightning.Trainer on CPU with lsfused optimizers (lsfused.integrations.lightning)."""

import warnings

import pytest
import torch
from torch import nn

import lsfused

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import LearningRateMonitor  # noqa: E402
from pytorch_lightning.loggers import Logger  # noqa: E402

from lsfused.integrations.lightning import LineSearchModule  # noqa: E402

OPTIMIZERS = {
    "adamsls": lambda m: lsfused.AdamSLS(m.parameters()),
    "sgdsls": lambda m: lsfused.SGDSLS(m.parameters(), init_step_size=0.5),
    "plasls": lambda m: lsfused.PLASLS(lsfused.components.by_layers(m.net, 2)),
    "salsa": lambda m: lsfused.SaLSa(m.parameters()),
}


class Net(LineSearchModule):
    def __init__(self, optimizer="adamsls", dropout=0.2, schedule=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))
        self.optimizer_name = optimizer
        self.schedule = schedule
        self.calls = {"training_step_with_grad": 0, "on_before_optimizer_step": 0, "on_after_backward": 0}
        self.step_sizes: list[float] = []
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.calls["training_step_with_grad"] += torch.is_grad_enabled()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_after_backward(self):
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, optimizer):
        self.calls["on_before_optimizer_step"] += 1

    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        self.step_sizes.append(opt.param_groups[0]["lr"])
        self.losses.append(opt.last_step.loss)

    def configure_optimizers(self):
        opt = OPTIMIZERS[self.optimizer_name](self)
        if not self.schedule:
            return opt
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def _loader(n_batches=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * n_batches, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class Capture(Logger):
    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def _trainer(**kwargs):
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _fit(model, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LightningModule).*")
        trainer = _trainer(**kwargs)
        trainer.fit(model, _loader())
    return trainer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fit_lowers_the_loss_with_hooks_once_per_step(name):
    model = Net(name)
    trainer = _fit(model, max_epochs=3)
    steps = 12
    assert trainer.global_step == steps
    assert model.calls == {"training_step_with_grad": steps, "on_before_optimizer_step": steps,
                           "on_after_backward": steps}  # fmt: skip
    assert model.trainer.optimizers[0].last_step.step == steps
    assert sum(model.losses[-4:]) < sum(model.losses[:4])


def test_gradient_clip_val_becomes_max_grad_norm():
    clipped, plain = Net(), Net()
    trainer = _fit(clipped, max_steps=4, gradient_clip_val=0.05)
    _fit(plain, max_steps=4)
    opt = trainer.optimizers[0]
    assert opt.max_grad_norm == 0.05
    assert opt.last_step.grad_norm > 0.05  # it binds
    assert any(not torch.equal(a, b) for a, b in zip(_weights(clipped), _weights(plain), strict=True))

    # the same as the optimizer option, exactly
    class Clipped(Net):
        def configure_optimizers(self):
            return lsfused.AdamSLS(self.parameters(), max_grad_norm=0.05)

    option = Clipped()
    _fit(option, max_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(_weights(clipped), _weights(option), strict=True))


def test_gradient_clip_by_value_is_refused():
    with pytest.raises(ValueError, match="gradient_clip_algorithm"):
        _fit(Net(), max_steps=1, gradient_clip_val=0.5, gradient_clip_algorithm="value")


def test_learning_rate_monitor_logs_the_step_size():
    model = Net(schedule=True)
    logger = Capture()
    _fit(model, max_steps=6, logger=logger, callbacks=[LearningRateMonitor(logging_interval="step")],
         log_every_n_steps=1)  # fmt: skip
    logged = [m["lr-AdamSLS"] for _, m in logger.rows if "lr-AdamSLS" in m]
    # logged before each step: the step size after the previous one (the scheduler's cap once it applies)
    assert len(logged) == 6
    assert logged[1:] == model.step_sizes[:-1]
    opt = model.trainer.optimizers[0]
    assert model.step_sizes[-1] == opt.param_groups[0]["lr"] == min(opt.param_groups[0]["step_size"],
                                                                   opt.param_groups[0]["max_step_size"])  # fmt: skip


def test_checkpoint_resume_is_exact(tmp_path):
    straight = Net(schedule=True)
    _fit(straight, max_epochs=2)
    first = Net(schedule=True)
    trainer = _fit(first, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Net(schedule=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LightningModule).*")
        _trainer(max_epochs=2).fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed), strict=True))
    assert resumed.trainer.optimizers[0].state_dict()["state"][0]["step"].item() == 8
