"""Data-parallel training with an lsfused optimizer on CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_train.py            # DDP
    torchrun --nproc_per_node=2 examples/ddp_train.py --fsdp     # FSDP2 (fully_shard)

Each rank trains on its shard of scikit-learn's digits; the optimizer averages every loss that decides a line-search
step over the ranks, so all ranks take the same decisions and the DDP replicas stay bit-identical (checked at the end).
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import lsfused
from lsfused.apps import demo


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    xtr, ytr, xte, yte = demo.load_digits(seed=0)
    model = demo.make_model(seed=0)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # reshard_after_forward=True on the root too: trials update the local shards in place, so every forward must
        # gather them afresh (FSDP2's default keeps the root's gathered weights after a forward).
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)), reshard_after_forward=True)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model)
    opt = lsfused.AdamSLS(model.parameters())  # process_group=None: the default group
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    batch = 64
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr), generator=gen)  # the same permutation on every rank
        for i in range(0, len(xtr) - batch + 1, batch):
            idx = perm[i : i + batch][rank::world]  # this rank's half of the global batch
            opt.step(lambda idx=idx: loss_fn(net(xtr[idx]), ytr[idx]))
        if rank == 0:
            rec = opt.last_step
            print(f"epoch {epoch + 1}: loss {rec.loss:.4f}, step size {rec.step_sizes[0]:.3g}, trials {rec.trials}")
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean()
    if not args.fsdp:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        same = all(torch.equal(copies[0], c) for c in copies)
        if rank == 0:
            print(f"replicas bit-identical across {world} ranks: {same}")
    if rank == 0:
        print(f"test accuracy {float(acc):.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
