"""Data parallelism with torch.distributed on CPU: DDP, or FSDP2 with dS replicated or sharded.

    torchrun --nproc-per-node 2 examples/data_parallel.py --setup ddp
    torchrun --nproc-per-node 2 examples/data_parallel.py --setup fsdp2          # dS replicated
    torchrun --nproc-per-node 2 examples/data_parallel.py --setup fsdp2-sharded  # dS sharded

Every rank trains on its half of each batch. The projection runs once per step on the full,
averaged gradient: under DDP the ordinary Projector (DDP averaged the gradient in backward); under
FSDP2 with dS left out of sharding, after one all-reduce of the flat dS gradient; with dS sharded,
by ShardedProjector (one all-reduce of the per-module coefficients). Statistics are global, so
every rank prints the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import vhack
from vhack.integrations import ShardedProjector, all_reduce_grad


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default="ddp", choices=["ddp", "fsdp2", "fsdp2-sharded"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stats-out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model, tok = vhack.models.load("tiny")  # same seed on every rank: identical start
    adapter = vhack.wrap(model, progress=False)
    pairs = vhack.builtin_pairs("toy")
    basis = vhack.extract(adapter, tok, pairs, top_k=4, progress=False)
    proj = vhack.Projector(adapter, basis)

    if args.setup == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
        projector = proj
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        if args.setup == "fsdp2":
            fully_shard(model, mesh=mesh, ignored_params={adapter.delta})  # dS replicated
            projector = proj
        else:
            fully_shard(model, mesh=mesh)  # dS sharded: each rank holds a flat range
            projector = ShardedProjector(proj)
        forward = model

    opt = torch.optim.AdamW([adapter.delta], lr=1e-2)
    texts = [p.prompt + p.hack for p in pairs]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
    model.train()
    history = []
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        forward(**mine, labels=labels.chunk(world)[rank]).loss.backward()
        if args.setup == "fsdp2":
            all_reduce_grad(adapter)  # one collective: the averaged flat dS gradient
        stats = projector.project_()  # then clip, if you clip
        opt.step()
        history.append(stats.as_dict())
        print(f"rank {rank} step {step}: cin_mean {stats.cin_mean:.5f}, fired {stats.fired:.3f}")

    if args.stats_out:
        os.makedirs(args.stats_out, exist_ok=True)
        with open(os.path.join(args.stats_out, f"rank{rank}.json"), "w") as f:
            json.dump({"history": history}, f)
    # Release DDP before the process group. A DDP module freed after destroy_process_group() (at
    # return) held the last reference to the gloo group and destroyed it under the GIL while a
    # gloo worker thread, freeing a finished allreduce, waited for the GIL: a deadlock seen with
    # torch 2.13 on CPU. The barrier lets the workers finish before the teardown.
    dist.barrier()
    del forward
    dist.destroy_process_group()
    return {"history": history}


if __name__ == "__main__":
    main()
