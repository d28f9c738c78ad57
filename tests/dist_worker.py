"""Run by tests/test_distributed.py: ``python dist_worker.py MODE OPTIMIZER OUT_DIR PORT [WORLD_SIZE]``.

Spawns WORLD_SIZE (default 2) gloo ranks; each trains the tests' small network for 20 steps on its share of every
global batch and saves per-step records and parameters to ``OUT_DIR/rank{r}.pt``. The ``fsdp_dcp*`` modes save and
load with ``torch.distributed.checkpoint`` (DCP) in ``OUT_DIR/ckpt_flat{False,True}``.
"""

import copy
import faulthandler
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from conftest import mlp  # noqa: E402

import lsfused  # noqa: E402

STEPS = 20


def global_batches(n=4):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def make_optimizer(name, model, params):
    if name == "adamsls":
        return lsfused.AdamSLS(params, init_step_size=3.0)
    if name == "adamsls_clip":  # clipping binds: the global norm must be the same on every rank and shard layout
        return lsfused.AdamSLS(params, init_step_size=3.0, max_grad_norm=0.3, weight_decay=0.01)
    if name == "sgdsls":
        return lsfused.SGDSLS(params, init_step_size=30.0)
    if name == "plasls":
        return lsfused.PLASLS(lsfused.components.by_layers(model, 2), init_step_size=3.0)
    if name == "salsa":
        return lsfused.SaLSa(params)
    if name == "adamsls_skip":  # every rank skips or tests together
        return lsfused.AdamSLS(params, init_step_size=3.0, skip_trials=True)
    if name == "salsa_skip":
        return lsfused.SaLSa(params, skip_trials=True)
    raise ValueError(name)


def full(model):
    """Full (unsharded) copies of the parameters."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def sharded_mlp(world, seed=0):
    """The tests' network under FSDP2 over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(seed)
    # reshard_after_forward=True also on the root: trials write the local shards in place, and the default ("auto")
    # keeps the root unsharded after a forward, so the next trial would not see the new weights.
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)), reshard_after_forward=True)
    return model


def worker(rank, mode, name, out, port, world):
    faulthandler.enable()  # a rank killed by a signal prints where (Python stack) it was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if mode.startswith("fsdp_dcp"):
        dcp_modes(rank, mode, name, out, world)
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    if mode.startswith("fsdp"):
        model = sharded_mlp(world)
        ddp = model
    else:
        model = mlp(dropout=0.5 if mode == "own_noise" else 0.0)
        ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(name, model, list(model.parameters()))
    if mode == "fsdp_resume":
        resume(rank, model, ddp, opt, out)
    else:
        train(rank, mode, model, ddp, opt, out)
    # Leave without interpreter finalization: about one rank in a hundred aborted there, in torch's C++ ("terminate
    # called without an active exception", no Python frame left), after its results were saved.
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train(rank, mode, model, ddp, opt, out):
    if mode == "mismatch" and rank == 1:
        opt.param_groups[0]["c"] = 0.2
    records, params, interrupted, warned = [], [], [], []
    error = None
    try:
        for i, (x, y) in enumerate(global_batches() * 5):
            if i == STEPS:
                break
            xs, ys = x[rank * 16 : (rank + 1) * 16], y[rank * 16 : (rank + 1) * 16]

            def closure(xs=xs, ys=ys, i=i):
                loss = nn.functional.cross_entropy(ddp(xs), ys)
                if mode == "nanrank" and rank == 1 and i == 3 and not torch.is_grad_enabled():
                    return loss * float("nan")  # rank 1's trials at step 4 are non-finite
                if mode == "raiserank" and rank == 1 and i == 3 and not torch.is_grad_enabled():
                    raise RuntimeError("rank 1 fails at a trial")
                return loss

            w0 = full(model)
            try:
                if mode == "own_noise":  # loss=, and rank 1 draws a random number before its forward: no match there
                    opt.zero_grad()
                    if rank == 1:
                        torch.rand(1)
                    loss = closure()
                    loss.backward()
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        opt.step(closure, loss=loss)
                    warned.extend(str(w.message) for w in caught)
                else:
                    opt.step(closure)
            except RuntimeError as err:
                if mode != "raiserank":
                    raise
                at_w0 = all(torch.equal(a, b) for a, b in zip(w0, full(model), strict=True))
                interrupted.append({"step": i, "error": str(err), "at_w0": at_w0})
            records.append(opt.last_step)
            params.append(full(model))
    except ValueError as err:
        error = str(err)
    result = {"records": records, "params": params, "error": error, "interrupted": interrupted, "warned": warned}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def resume(rank, model, ddp, opt, out):
    """10 steps, save (local shards + optimizer), 10 more; restore and redo the 10: bit-identical?"""

    data = global_batches() * 5

    def steps(lo, hi):
        recs = []
        for x, y in data[lo:hi]:
            xs, ys = x[rank * 16 : (rank + 1) * 16], y[rank * 16 : (rank + 1) * 16]
            opt.step(lambda xs=xs, ys=ys: nn.functional.cross_entropy(ddp(xs), ys))
            recs.append(opt.last_step)
        return recs

    steps(0, 10)
    saved_params = [p.to_local().detach().clone() for p in model.parameters()]
    saved_opt = copy.deepcopy(opt.state_dict())
    first = steps(10, 20)
    after_first = [p.to_local().detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, t in zip(model.parameters(), saved_params, strict=True):
            p.to_local().copy_(t)
    opt.load_state_dict(saved_opt)
    second = steps(10, 20)
    after_second = [p.to_local().detach().clone() for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(after_first, after_second, strict=True))
    torch.save({"same_params": same, "first": first, "second": second}, os.path.join(out, f"rank{rank}.pt"))


def dcp_modes(rank, mode, name, out, world):
    """DCP under FSDP2. ``fsdp_dcp``: 10 steps, save, 10 more; then a fresh model and optimizer (other weights, other
    seeds) load the checkpoint, once per ``flatten_optimizer_state_dict`` setting, and redo the 10 steps.
    ``fsdp_dcp_save``/``fsdp_dcp_load``: the halves, for resharding (saved at one world size, loaded at another)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    data = global_batches() * 5
    per = 32 // world

    def ckpt(flat):  # a checkpoint is loaded with the layout it was saved with
        return os.path.join(out, f"ckpt_flat{flat}")

    def build(seed):
        model = sharded_mlp(world, seed)
        # The optimizer's closure seed comes from the global seed: another one on every rank and in every run (the
        # ranks agree on rank 0's at the first step, and a load brings the saved one).
        torch.manual_seed(1000 * seed + 17 * rank + world)
        return model, make_optimizer(name, model, list(model.parameters()))

    def steps(model, opt, lo, hi):
        recs = []
        for x, y in data[lo:hi]:
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            opt.step(lambda xs=xs, ys=ys: nn.functional.cross_entropy(model(xs), ys))
            recs.append(opt.last_step)
        return recs

    def state(model, opt, flat=False):
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}

    def load(model, opt, flat=False):
        sd = state(model, opt, flat)
        dcp.load(sd, checkpoint_id=ckpt(flat))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"], options=StateDictOptions(flatten_optimizer_state_dict=flat))

    def moments(opt):
        """Full (gathered) moments and step sizes, from the optimizer's own state_dict."""
        sd = opt.state_dict()
        full = {
            (i, k): (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
            for i, st in sd["state"].items()
            for k, t in st.items()
            if k in ("exp_avg", "exp_avg_sq")
        }
        return full, [g["step_size"] for g in sd["param_groups"]]

    result = {}
    if mode in ("fsdp_dcp", "fsdp_dcp_save"):
        model, opt = build(0)
        steps(model, opt, 0, 10)
        for flat in (False, True) if mode == "fsdp_dcp" else (False,):
            dcp.save(state(model, opt, flat), checkpoint_id=ckpt(flat))
        result["saved"] = moments(opt)
        result["first"] = steps(model, opt, 10, 20)
        result["params"] = full(model)
    if mode == "fsdp_dcp":
        for flat in (False, True):
            model, opt = build(100 + flat)
            load(model, opt, flat)
            result[f"second_flat{flat}"] = steps(model, opt, 10, 20)
            result[f"params_flat{flat}"] = full(model)
    if mode == "fsdp_dcp_load":
        model, opt = build(100)
        load(model, opt)
        result["loaded"] = moments(opt)
        result["second"] = steps(model, opt, 10, 20)
        result["params"] = full(model)
        result["seeds"] = [opt._seed, opt.param_groups[0]["search_state"]["seed"]]  # what the groups show is current
        result["refusals"] = []
        for attempt in (lambda: copy.deepcopy(opt), lambda: opt.add_param_group({"params": [torch.zeros(2)]})):
            try:
                attempt()
            except (TypeError, ValueError) as err:
                result["refusals"].append(str(err))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    mode, name, out, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    world = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    mp.spawn(worker, args=(mode, name, out, port, world), nprocs=world, join=True)
