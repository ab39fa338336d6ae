r"""One Local SGD run with an adaptive (or scheduled) per-worker batch size, on a timm model.

M workers each take H = --sync-every local steps, then average their models (one communication
round). After every round the batch-size policy picks the next per-worker batch size: the
variance test of Lau et al. (2024, arXiv 2406.13936) pooled over the workers (--strategy
adaptive), or a baseline schedule (constant, stagewise, linear ramp).

Launch:
    python examples/train.py --nproc 4                 # 4 self-spawned gloo processes on CPU
    torchrun --nproc-per-node 4 examples/train.py      # the same under torchrun
    python examples/train.py                           # one process, no torch.distributed

Data: sklearn's bundled digits (default; real and offline), CIFAR-10 from --data-dir
(torchvision's cifar-10-batches-py folder, never downloaded), or a synthetic set for throughput.
Model: any timm name (--model, extra constructor arguments with --model-kwargs key=value).

Each round is H steps at the batch size the policy chose after the previous round; the short last
batch of an epoch is skipped (the same on every rank; BatchNorm cannot train on a single sample).
The learning rate follows a warm-up then cosine decay indexed by the samples seen by all workers.

Writes to --out: metrics.jsonl (one line per round), summary.json, plot.png, model_final.pt and
per-rank checkpoints ckpt/rank{r}.pt every --ckpt-every rounds (continue with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from local_opt import (  # noqa: E402
    ConstantBatchSize,
    LinearRampBatchSize,
    LocalOptimizer,
    StagewiseBatchSize,
    VarianceTest,
    load_checkpoint,
    save_checkpoint,
)
from samplers import AdaptiveBatchSampler  # noqa: E402

STRATEGIES = ("adaptive", "constant", "stagewise", "linear")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("launch")
    g.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="spawn this many gloo worker processes on this machine (CPU); 0 or 1: "
        "run in this process, under torchrun if its variables are set (default: 0)",
    )
    g.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="device of each rank: cuda uses GPU LOCAL_RANK and the nccl backend; "
        "auto picks cuda when available (default: cpu)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per process; 0: cpu_count // nproc for --nproc, "
        "torch's default otherwise (default: 0)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a collective may wait for the other ranks (default: 300)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model init, the data order and per-rank randomness (default: 0)",
    )
    g.add_argument(
        "--out",
        default="runs/train",
        help="output folder for metrics, summary, plot, checkpoints (default: runs/train)",
    )
    g.add_argument(
        "--name",
        default="",
        help="label of the run in summary.json and plots (default: the strategy)",
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no tqdm progress bar (rank 0 shows one by default)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="digits",
        choices=("digits", "cifar10", "synthetic"),
        help="digits: sklearn's 1797 8x8 digits; cifar10: from --data-dir; synthetic: "
        "class prototypes + noise, for throughput (default: digits)",
    )
    g.add_argument(
        "--data-dir",
        default="",
        help="CIFAR-10 root, the folder holding cifar-10-batches-py (default: none)",
    )
    g.add_argument(
        "--no-md5",
        action="store_true",
        help="CIFAR-10: skip torchvision's md5 check of the files (only check they "
        "exist), for a re-packed or subset copy in the same format",
    )
    g.add_argument(
        "--img-size",
        type=int,
        default=0,
        help="image side after resizing; 0: 16 for digits, 32 otherwise (default: 0)",
    )
    g.add_argument(
        "--channels",
        type=int,
        default=1,
        choices=(1, 3),
        help="channels of digits and synthetic images (digits repeats the gray "
        "channel) (default: 1)",
    )
    g.add_argument(
        "--augment",
        action="store_true",
        help="random crop (pad 4) and horizontal flip of training images (for CIFAR-10)",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="digits: fraction held out for testing (default: 0.2)",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the digits train/test split and of the synthetic set (default: 0)",
    )
    g.add_argument(
        "--synthetic-size",
        type=int,
        default=10000,
        help="synthetic: number of training samples (default: 10000)",
    )

    g = p.add_argument_group("model and optimizer")
    g.add_argument(
        "--model",
        default="test_resnet",
        help="timm model name, randomly initialized (default: test_resnet, a 0.37M "
        "parameter ResNet that reaches ~99%% on digits in a minute of CPU)",
    )
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments, e.g. patch_size=4 drop_rate=0.1",
    )
    g.add_argument(
        "--optimizer",
        default="sgd",
        choices=("sgd", "adamw"),
        help="local (inner) optimizer (default: sgd)",
    )
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default: 0.05)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    g.add_argument(
        "--warmup",
        type=float,
        default=0.05,
        help="linear warm-up length, as a fraction of the sample budget (default: 0.05)",
    )
    g.add_argument(
        "--min-lr",
        type=float,
        default=0.0,
        help="final learning rate of the cosine decay, as a fraction of --lr (default: 0)",
    )
    g.add_argument(
        "--lr-coupling",
        default="none",
        choices=("none", "sqrt", "linear"),
        help="scale the learning rate by (b / b_ref)^k with the current batch size b: "
        "k = 0, 1/2, 1 (default: none)",
    )
    g.add_argument(
        "--lr-ref-batch-size",
        type=int,
        default=0,
        help="b_ref of --lr-coupling, the batch size at which the learning rate is --lr "
        "(0: --batch-size) (default: 0)",
    )

    g = p.add_argument_group("local SGD and batch size")
    g.add_argument(
        "--sync-every",
        type=int,
        default=8,
        help="H, local steps per communication round (default: 8)",
    )
    g.add_argument(
        "--strategy",
        default="adaptive",
        choices=STRATEGIES,
        help="adaptive: variance test; constant; stagewise: x --factor at "
        "--milestones; linear: ramp to --max-batch-size (default: adaptive)",
    )
    g.add_argument(
        "--batch-size", type=int, default=16, help="b0, initial per-worker batch size (default: 16)"
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=128,
        help="cap of the per-worker batch size (default: 128)",
    )
    g.add_argument(
        "--test",
        default="norm",
        choices=("norm", "inner_product", "augmented"),
        help="adaptive: which variance test (default: norm)",
    )
    g.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="norm test threshold eta; smaller grows the batch sooner (default: 1.0, tuned "
        "for digits with the hooks backend; the library's default is 0.1)",
    )
    g.add_argument(
        "--theta", type=float, default=0.9, help="inner-product test threshold theta (default: 0.9)"
    )
    g.add_argument(
        "--nu",
        type=float,
        default=5.84,
        help="orthogonality threshold nu of the augmented test (default: 5.84)",
    )
    g.add_argument(
        "--vt-backend",
        default="hooks",
        choices=["auto", "hooks", "vmap", "microbatch"],
        help="VarianceTest backend: hooks (exact, about one forward/backward), auto, vmap "
        "(exact, slow) or microbatch (an estimate) (default: hooks)",
    )
    g.add_argument(
        "--test-every",
        type=int,
        default=1,
        help="adaptive: run the test every k-th round only (default: 1)",
    )
    g.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=[20, 40, 60],
        help="stagewise: rounds at which the batch size is multiplied (default: 20 40 60)",
    )
    g.add_argument(
        "--factor",
        type=float,
        default=2.0,
        help="stagewise: multiplier at each milestone (default: 2)",
    )
    g.add_argument(
        "--ramp-rounds",
        type=int,
        default=50,
        help="linear: rounds to ramp from --batch-size to --max-batch-size (default: 50)",
    )

    g = p.add_argument_group("budget, evaluation, checkpoints")
    g.add_argument(
        "--epochs",
        type=float,
        default=20.0,
        help="sample budget in passes over the training set (default: 20)",
    )
    g.add_argument(
        "--budget-samples",
        type=int,
        default=0,
        help="sample budget over all workers; overrides --epochs when > 0 (default: 0)",
    )
    g.add_argument(
        "--max-rounds",
        type=int,
        default=0,
        help="stop after this many rounds (0: no limit) (default: 0)",
    )
    g.add_argument(
        "--target-acc",
        type=float,
        default=None,
        help="test accuracy (%%) whose first round is reported (default: none)",
    )
    g.add_argument(
        "--stop-at-target",
        action="store_true",
        help="stop once the test accuracy reaches --target-acc",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate the averaged model every k rounds, and at the end (default: 1)",
    )
    g.add_argument(
        "--ckpt-every",
        type=int,
        default=10,
        help="write per-rank checkpoints every k rounds (0: only at the end) (default: 10)",
    )
    g.add_argument(
        "--resume",
        default="",
        help="continue from the checkpoints of this run folder (or its ckpt/ folder); "
        "use the same flags as the first run (default: none)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    checks = [
        ("--nproc", args.nproc >= 0),
        ("--sync-every", args.sync_every >= 1),
        ("--batch-size", args.batch_size >= 1),
        ("--max-batch-size", args.max_batch_size >= args.batch_size),
        ("--epochs", args.epochs > 0 or args.budget_samples > 0),
        ("--eval-every", args.eval_every >= 1),
        ("--ckpt-every", args.ckpt_every >= 0),
        ("--test-every", args.test_every >= 1),
        ("--warmup", 0.0 <= args.warmup < 1.0),
        ("--test-fraction", 0.0 < args.test_fraction < 1.0),
    ]
    for flag, ok in checks:
        if not ok:
            p.error(f"invalid {flag}: {getattr(args, flag[2:].replace('-', '_'))}")
    if args.dataset == "cifar10" and not args.data_dir:
        p.error("--dataset cifar10 needs --data-dir")
    if args.stop_at_target and args.target_acc is None:
        p.error("--stop-at-target needs --target-acc")
    if not args.img_size:
        args.img_size = 16 if args.dataset == "digits" else 32
    args.name = args.name or args.strategy
    return args


# --------------------------------------------------------------------------------- building


def load_data(args: argparse.Namespace) -> _common.Data:
    if args.dataset == "digits":
        return _common.load_digits_data(
            args.img_size, args.channels, args.test_fraction, args.data_seed
        )
    if args.dataset == "cifar10":
        return _common.load_cifar10_data(
            args.data_dir, args.img_size, args.augment, verify_md5=not args.no_md5
        )
    return _common.load_synthetic_data(
        args.synthetic_size, args.img_size, args.channels, seed=args.data_seed
    )


def make_policy(args: argparse.Namespace, model: nn.Module) -> Any:
    """The object whose ``suggest(x, y, b)`` gives the next round's per-worker batch size."""
    if args.strategy == "adaptive":
        return VarianceTest(
            model,
            F.cross_entropy,
            test=args.test,
            eta=args.eta,
            theta=args.theta,
            nu=args.nu,
            max_batch_size=args.max_batch_size,
            backend=args.vt_backend,
            every=args.test_every,
        )
    if args.strategy == "constant":
        return ConstantBatchSize(args.batch_size)
    if args.strategy == "stagewise":
        return StagewiseBatchSize(
            args.batch_size, args.milestones, args.factor, max_batch_size=args.max_batch_size
        )
    return LinearRampBatchSize(args.batch_size, args.max_batch_size, args.ramp_rounds)


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def _device(args: argparse.Namespace) -> torch.device:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """The training loop, run on every rank; returns the summary on rank 0 (None elsewhere)."""
    rank, world = _common.rank_world()
    device = _device(args)
    data = load_data(args)
    if len(data.train) < world:
        raise ValueError(f"Invalid dataset: {len(data.train)} samples for {world} workers")
    budget = args.budget_samples or int(args.epochs * len(data.train))

    torch.manual_seed(args.seed)  # the same initial model everywhere (rank 0's is broadcast anyway)
    model = _common.create_model(
        args.model,
        data.num_classes,
        data.in_chans,
        data.img_size,
        _common.parse_kwargs(args.model_kwargs),
    ).to(device)
    torch.manual_seed(args.seed * 1000 + 1 + rank)  # per-rank randomness: augmentation, dropout

    # The three pieces of the library, wired as in the README's quick start.
    opt = LocalOptimizer(make_optimizer(args, model), sync_every=args.sync_every, module=model)
    sampler = AdaptiveBatchSampler(
        data.train, args.batch_size, max_batch_size=args.max_batch_size, seed=args.seed
    )
    if args.max_batch_size > sampler.num_samples:
        raise ValueError(
            f"Invalid --max-batch-size: {args.max_batch_size} exceeds the {sampler.num_samples} "
            "training samples of each worker"
        )
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=_common.collate_batch)
    policy = make_policy(args, model)

    os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt", f"rank{rank}.pt")
    records: list[dict[str, Any]] = []  # one per round (kept on every rank, written by rank 0)
    samples = 0  # samples seen by all workers together
    wall_offset = 0.0
    if args.resume:
        folder = args.resume
        if not os.path.exists(os.path.join(folder, f"rank{rank}.pt")):
            folder = os.path.join(folder, "ckpt")
        extra = load_checkpoint(
            os.path.join(folder, f"rank{rank}.pt"),
            model=model,
            optimizer=opt,
            sampler=sampler,
            policy=policy,
        )
        if extra["world_size"] != world:
            raise ValueError(f"Invalid --resume: saved by {extra['world_size']} ranks, not {world}")
        samples, wall_offset, records = extra["samples"], extra["wall_time"], extra["records"]

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        _common.write_json(os.path.join(args.out, "args.json"), vars(args))
        with open(metrics_path, "w") as f:  # a resumed run rewrites the rounds it inherited
            f.writelines(json.dumps(r) + "\n" for r in records)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=budget,
            initial=min(samples, budget),
            unit="sample",
            unit_scale=True,
            desc=args.name,
            dynamic_ncols=True,
        )

    start = time.perf_counter()
    loss_sum, loss_count, round_hash, samples_at_round_start = 0.0, 0, 0, samples
    reached_target = _common.rounds_to_target(records, args.target_acc)["rounds_to_target"]

    def end_round(x: torch.Tensor, y: torch.Tensor, final: bool) -> bool:
        """Log the round that just ended, pick the next batch size; True to stop training."""
        nonlocal loss_sum, loss_count, round_hash, samples_at_round_start, reached_target
        # Train loss over all workers and each rank's data-order hash, in one small all-reduce.
        t = torch.zeros(2 + world, dtype=torch.float64)
        t[0], t[1], t[2 + rank] = loss_sum, loss_count, round_hash
        _common.all_reduce_sum(t)
        b = sampler.batch_size
        if not final:  # all ranks hold the averaged model: pick the next round's batch size
            sampler.set_batch_size(policy.suggest(x, y, b))
        rnd = opt.num_syncs
        rec: dict[str, Any] = {
            "round": rnd,
            "step": opt.steps,
            "epoch": sampler.epoch,
            "samples": samples,
            "batch_size": b,
            "next_batch_size": sampler.batch_size,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": t[0].item() / max(t[1].item(), 1.0),
            "test_acc": None,
            "test_loss": None,
            "bytes_communicated": opt.bytes_communicated,
            "order_hash": f"{_common.order_hash(t[2:].to(torch.int64)):08x}",
        }
        stats = getattr(policy, "last_stats", {}) or {}
        if stats.get("raw") is not None:
            rec["suggested_raw"] = stats["raw"]
        last_round = final or (args.max_rounds and rnd >= args.max_rounds) or samples >= budget
        if rnd % args.eval_every == 0 or last_round:
            rec["test_acc"], rec["test_loss"] = _common.evaluate(model, data.test, device)
        rec["wall_time"] = wall_offset + time.perf_counter() - start
        records.append(rec)
        if (
            reached_target is None
            and _common.rounds_to_target([rec], args.target_acc)["rounds_to_target"] is not None
        ):
            reached_target = rnd
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if bar is not None:
                acc = rec["test_acc"]
                bar.set_postfix(
                    round=rnd,
                    b=b,
                    loss=f"{rec['train_loss']:.3f}",
                    acc="-" if acc is None else f"{acc:.1f}",
                    refresh=False,
                )
                bar.update(min(samples, budget) - min(samples_at_round_start, budget))
        loss_sum, loss_count, round_hash, samples_at_round_start = 0.0, 0, 0, samples
        stop = bool(last_round) or (args.stop_at_target and reached_target is not None)
        if stop or (args.ckpt_every and rnd % args.ckpt_every == 0):
            save_checkpoint(
                ckpt_path,
                extra={
                    "samples": samples,
                    "wall_time": rec["wall_time"],
                    "records": records,
                    "world_size": world,
                },
                model=model,
                optimizer=opt,
                sampler=sampler,
                policy=policy,
            )
        return stop

    done = samples >= budget or (args.max_rounds and opt.num_syncs >= args.max_rounds)
    x = y = None
    while not done:
        for x, y, idx in loader:
            if samples >= budget:
                done = True
                break
            b = sampler.batch_size  # the size of this round's batches
            if len(y) < b:  # the short last batch of an epoch (the same on every rank): skip it
                continue
            x, y = x.to(device), y.to(device)
            for group in opt.param_groups:
                group["lr"] = _common.lr_at(
                    samples + world * len(y),
                    budget,
                    args.lr,
                    args.warmup,
                    args.min_lr,
                    b,
                    args.lr_ref_batch_size or args.batch_size,
                    args.lr_coupling,
                )
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()  # every H-th step ends with a round: the models are averaged
            samples += world * len(y)  # every rank's batch has the same size
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            round_hash = _common.order_hash(idx, round_hash)
            if opt.synced and end_round(x, y, final=False):
                done = True
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    if opt.local_step > 0:  # the budget ran out mid-round: finish it with a last average
        opt.sync()
        end_round(x, y, final=True)
    if bar is not None:
        bar.close()

    if rank != 0:
        return None
    torch.save(model.state_dict(), os.path.join(args.out, "model_final.pt"))
    evaluated = [r for r in records if r["test_acc"] is not None]
    last = records[-1] if records else {}
    summary = {
        "name": args.name,
        "strategy": args.strategy,
        "model": args.model,
        "dataset": args.dataset,
        "world_size": world,
        "sync_every": args.sync_every,
        "budget_samples": budget,
        "rounds": last.get("round", 0),
        "steps": last.get("step", 0),
        "samples": last.get("samples", 0),
        "final_test_acc": evaluated[-1]["test_acc"] if evaluated else None,
        "best_test_acc": max((r["test_acc"] for r in evaluated), default=None),
        "target_acc": args.target_acc,
        **_common.rounds_to_target(records, args.target_acc),
        "bytes_communicated": last.get("bytes_communicated", 0),
        "wall_time": last.get("wall_time", 0.0),
        "initial_batch_size": args.batch_size,
        "final_batch_size": last.get("next_batch_size", args.batch_size),
    }
    _common.write_json(os.path.join(args.out, "summary.json"), summary)
    _common.plot_runs(
        {args.name: records},
        os.path.join(args.out, "plot.png"),
        title=f"{args.name}: {args.model} on {args.dataset}, M={world}, H={args.sync_every}",
        target=args.target_acc,
    )
    return summary


# --------------------------------------------------------------------------------- launching


def _init_and_train(rank: int, args: argparse.Namespace, world: int, init_method: str) -> None:
    """Entry point of a self-spawned rank (``--nproc``)."""
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if _device(args).type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.dist_timeout),
    )
    try:
        train(args)
    finally:
        dist.destroy_process_group()
    _exit_worker()


def _exit_worker() -> None:
    """End a spawned rank that finished cleanly without interpreter finalization.

    A gloo background thread occasionally aborts the process during finalization ("terminate
    called without an active exception", SIGABRT, after all the work is done); seen about once in
    25 short runs of this repository's 2-rank tests. The outputs are written and closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Launch ``train`` as the flags say; return the summary (read back from ``--out``)."""
    if args.nproc > 1:
        with tempfile.TemporaryDirectory(prefix="local_opt_train_") as d:
            mp.start_processes(
                _init_and_train,
                args=(args, args.nproc, f"file://{os.path.join(d, 'rendezvous')}"),
                nprocs=args.nproc,
                start_method="spawn",
            )
        path = os.path.join(args.out, "summary.json")
        return json.load(open(path)) if os.path.exists(path) else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
        backend = "nccl" if _device(args).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(_device(args))
        dist.init_process_group(backend, timeout=timedelta(seconds=args.dist_timeout))
        try:
            return train(args)
        finally:
            dist.destroy_process_group()
    return train(args)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
