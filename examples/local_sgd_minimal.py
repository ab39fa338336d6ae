"""A minimal Local SGD run: 2 gloo processes train an MLP on sklearn's digits with LocalOptimizer.

    python examples/local_sgd_minimal.py --nproc 2 --sync-every 4

Prints, per round, the mean training loss and the test accuracy of the averaged model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from local_opt import LocalOptimizer


def load() -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.nproc,
        timeout=timedelta(seconds=60),
    )
    xtr, ytr, xte, yte = load()
    shard = slice(rank, None, args.nproc)  # each worker trains on its own shard
    xtr, ytr = xtr[shard], ytr[shard]
    torch.manual_seed(rank)  # different init per rank: LocalOptimizer broadcasts rank 0's model
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = LocalOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sync_every=args.sync_every
    )
    g = torch.Generator().manual_seed(1000 + rank)
    losses: list[float] = []
    while opt.num_syncs < args.rounds:
        idx = torch.randint(0, len(xtr), (args.batch_size,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if opt.synced and rank == 0 and opt.num_syncs % max(1, args.rounds // 10) == 0:
            with torch.no_grad():
                acc = (model(xte).argmax(1) == yte).float().mean().item()
            print(f"| {opt.num_syncs:5d} | {opt.steps:5d} | {sum(losses) / len(losses):.4f} "
                  f"| {100 * acc:6.2f} | {opt.bytes_communicated:9d} |", flush=True)
            losses.clear()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="number of gloo worker processes")
    p.add_argument("--sync-every", type=int, default=4, help="local steps per round (H)")
    p.add_argument("--rounds", type=int, default=50, help="communication rounds to run")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch size")
    args = p.parse_args()
    print(f"Local SGD on digits: {args.nproc} workers, H={args.sync_every}, b={args.batch_size}")
    print("| round |  step | train loss | test acc % | bytes sent |")
    print("|------:|------:|-----------:|-----------:|-----------:|")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(args, os.path.join(d, "init")), nprocs=args.nproc)


if __name__ == "__main__":
    main()
