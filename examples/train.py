r"""One Local SGD run with an adaptive (or scheduled) per-worker batch size.

M workers each take H = --sync-every local steps, then average their models (one communication
round). After every round the batch-size policy picks the next per-worker batch size: the
variance test of Lau et al. (2024, arXiv 2406.13936) pooled over the workers (--strategy
adaptive), or a baseline schedule (constant, stagewise, linear ramp).

Launch:
    python examples/train.py --nproc 4                 # 4 self-spawned gloo processes on CPU
    torchrun --nproc-per-node 4 examples/train.py      # the same under torchrun
    python examples/train.py                           # one process, no torch.distributed

Tasks (--dataset; examples/tasks.py): digits (sklearn's bundled digits, real and offline; any
timm model via --model and --model-kwargs), cifar10 from --data-dir (torchvision's
cifar-10-batches-py folder, never downloaded), synthetic (for throughput), and lm: a byte-level
GPT on the English documentation that ships with Python (or --text-file), AdamW, validation loss
and perplexity. Every task has training, validation and test splits: targets (--target-acc,
--target-loss) are checked on validation, the test split is evaluated once, at the end.

Each round is H steps at the batch size the policy chose after the previous round; the short last
batch of an epoch is skipped (the same on every rank; BatchNorm cannot train on a single sample).
The learning rate follows a warm-up then cosine decay indexed by the samples seen by all workers
(local_opt.SampleLR), and the batch-size policy multiplies it during each step by the factor of
--lr-coupling for its current batch size (default auto: the library's default rule, the same for
every strategy; none turns it off).

Writes to --out: metrics.jsonl (one line per round), summary.json, plot.png, model_final.pt and
per-rank checkpoints ckpt/rank{r}.pt every --ckpt-every rounds (continue with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import config  # noqa: E402
import launch  # noqa: E402
import tasks  # noqa: E402
import walltime  # noqa: E402
from runlog import RunLog  # noqa: E402

from local_opt import (  # noqa: E402
    ConstantBatchSize,
    DoublingBatchSize,
    LinearRampBatchSize,
    LocalOptimizer,
    SampleLR,
    StagewiseBatchSize,
    VarianceTest,
    load_checkpoint,
    save_checkpoint,
    warmup_cosine,
)
from local_opt.lr import resolve_rule  # noqa: E402
from samplers import AdaptiveBatchSampler  # noqa: E402

build_parser = config.build_parser  # for --help and the tests


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return config.parse_args(argv, description=__doc__)


def make_policy(
    args: argparse.Namespace,
    model: nn.Module,
    loss_fn: Any,
    optimizer: torch.optim.Optimizer | None = None,
    world_size: int = 1,
    budget: int = 0,
) -> Any:
    """The object whose ``suggest(x, y, b)`` gives the next round's per-worker batch size.

    The variance test gets only the thresholds given on the command line: the others keep
    VarianceTest's defaults. With ``optimizer``, the policy also couples its learning rate to the
    batch size (--lr-coupling, default ``auto``: the library's default; the baselines resolve it
    the same way, and for ``adascale`` run an observe-only variance test for its estimates).
    """
    coupling: dict[str, Any] = {}
    if optimizer is not None:
        coupling = {
            "optimizer": optimizer,
            "lr_coupling": args.lr_coupling,
            "bn_momentum": args.bn_momentum,
        }
        if args.lr_ref_batch_size:
            coupling["base_batch_size"] = args.lr_ref_batch_size
    names = ("eta", "theta", "nu", "policy", "min_dof", "smoothing")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.strategy == "adaptive":
        return VarianceTest(
            model,
            loss_fn,
            test=args.test,
            max_batch_size=args.max_batch_size,
            backend=args.vt_backend,
            every=args.test_every,
            **given,
            **coupling,
        )
    ref = args.lr_ref_batch_size or args.batch_size
    needs_estimates = args.strategy != "constant" or ref != args.batch_size
    if coupling and needs_estimates and resolve_rule(args.lr_coupling, optimizer) == "adascale":
        given.pop("policy", None)  # observe-only: the decision is ignored, the estimates used
        coupling["variance_test"] = VarianceTest(
            model, loss_fn, test=args.test, backend=args.vt_backend, bn_momentum="none", **given
        )
    if args.strategy == "constant":
        return ConstantBatchSize(args.batch_size, **coupling)
    if args.strategy == "stagewise":
        return StagewiseBatchSize(
            args.batch_size,
            args.milestones,
            args.factor,
            max_batch_size=args.max_batch_size,
            **coupling,
        )
    if args.strategy == "doubling":
        return DoublingBatchSize(
            args.batch_size,
            config.doubling_milestones(args, budget),
            world_size=world_size,
            steps_per_round=args.sync_every,
            max_batch_size=args.max_batch_size,
            **coupling,
        )
    return LinearRampBatchSize(args.batch_size, args.max_batch_size, args.ramp_rounds, **coupling)


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


class Trainer:
    """One rank's run: the task, the library's three pieces wired as in the README's quick start,
    and the counters of the round in progress. :meth:`fit` trains; the :class:`RunLog` keeps the
    records and writes the outputs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = _common.rank_world()
        self.device = launch.device_of(args.device)
        self.task = task = tasks.TASKS[args.dataset](args)
        if len(task.train) < self.world:
            raise ValueError(f"Invalid dataset: {len(task.train)} samples for {self.world} workers")
        self.budget = args.budget_samples or int(args.epochs * len(task.train))

        torch.manual_seed(args.seed)  # the same initial model everywhere (rank 0's is broadcast)
        self.model = task.build_model().to(self.device)
        torch.manual_seed(args.seed * 1000 + 1 + self.rank)  # per-rank: augmentation, dropout

        if args.simulate_latency_ms:  # a test hook (docs/network.md)
            from local_opt import _comm

            _comm.SIMULATED_LATENCY_S = args.simulate_latency_ms / 1e3
        self.opt = LocalOptimizer(
            make_optimizer(args, self.model),
            sync_every=args.sync_every,
            module=self.model,
            compression=None if args.compression == "none" else args.compression,
            overlap=args.overlap,
        )
        # compute time of the steps (forward, backward, inner step; rounds excluded) and of
        # the steps with their rounds, for the modeled wall time (examples/walltime.py)
        self.compute_time = self.step_time = 0.0
        self._t_inner = 0.0
        self.opt.optimizer.register_step_post_hook(self._inner_stepped)
        self.sampler = AdaptiveBatchSampler(
            task.train, args.batch_size, max_batch_size=args.max_batch_size, seed=args.seed
        )
        if args.max_batch_size > self.sampler.num_samples:
            raise ValueError(
                f"Invalid --max-batch-size: {args.max_batch_size} exceeds the "
                f"{self.sampler.num_samples} training samples of each worker"
            )
        self.loader = DataLoader(
            task.train, batch_sampler=self.sampler, collate_fn=_common.collate_batch
        )
        self.policy = make_policy(args, self.model, task.loss_fn, self.opt, self.world, self.budget)
        # Warm-up then cosine over the sample budget; the policy scales it during each step.
        self.lr_schedule = SampleLR(self.opt, warmup_cosine(args.warmup, args.min_lr), self.budget)
        self.step_lr = self.opt.param_groups[0]["lr"]  # of the last step, coupling included

        os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
        self.ckpt_path = os.path.join(args.out, "ckpt", f"rank{self.rank}.pt")
        self.samples = 0  # samples seen by all workers together
        self.wall_offset = 0.0
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.opt.compression is not None and self.world > 1:
            from local_opt._compress import mean_nbytes

            n = sum(p.numel() for p in self.model.parameters())
            self.param_bytes = mean_nbytes(n, self.world, self.opt.compression)
        records = self._resume() if args.resume else []
        if self.rank == 0:
            _common.write_json(os.path.join(args.out, "args.json"), vars(args))
        self.log = RunLog(
            args.out,
            args.name,
            self.budget,
            config.target_of(args),
            records,
            rank=self.rank,
            progress=not args.no_progress,
        )
        evaluated = [r["samples"] for r in records if r.get(self.log.target[0]) is not None]
        self.next_eval = self._next_eval_after(evaluated[-1] if evaluated else 0)
        # The round in progress: train loss sum and count, hash of the sample order.
        self.loss_sum, self.loss_count, self.round_hash = 0.0, 0, 0
        self.start = time.perf_counter()

    def _resume(self) -> list[dict[str, Any]]:
        folder = self.args.resume
        if not os.path.exists(os.path.join(folder, f"rank{self.rank}.pt")):
            folder = os.path.join(folder, "ckpt")
        extra = load_checkpoint(
            os.path.join(folder, f"rank{self.rank}.pt"),
            model=self.model,
            optimizer=self.opt,
            sampler=self.sampler,
            policy=self.policy,
            lr_schedule=self.lr_schedule,
        )
        if extra["world_size"] != self.world:
            raise ValueError(
                f"Invalid --resume: saved by {extra['world_size']} ranks, not {self.world}"
            )
        self.samples, self.wall_offset = extra["samples"], extra["wall_time"]
        records = extra["records"]
        if records:
            self.compute_time = records[-1].get("compute_time", 0.0)
            self.step_time = records[-1].get("step_time", 0.0)
        return records

    def _next_eval_after(self, samples: int) -> int:
        """The sample count from which the next validation is due, after one at ``samples``:
        ``samples + max(S, g * samples)`` with S = --eval-every-samples, g = --eval-growth."""
        return samples + max(self.args.eval_every_samples, int(self.args.eval_growth * samples))

    # ------------------------------------------------------------------------------ training

    def fit(self) -> dict[str, Any] | None:
        """Train to the budget (or --max-rounds, or the target with --stop-at-target); return
        the summary on rank 0, None elsewhere."""
        args, opt = self.args, self.opt
        done = self.samples >= self.budget or (args.max_rounds and opt.num_syncs >= args.max_rounds)
        x = y = None
        while not done:
            for x, y, idx in self.loader:
                if self.samples >= self.budget:
                    done = True
                    break
                if len(y) < self.sampler.batch_size:  # the short last batch of an epoch: skip
                    continue
                x, y = x.to(self.device), y.to(self.device)
                self._step(x, y, idx)
                if opt.synced and self._end_round(x, y, final=False):
                    done = True
                    break
            else:
                self.sampler.set_epoch(self.sampler.epoch + 1)
        if opt.local_step > 0:  # the budget ran out mid-round: finish it with a last average
            self._sync()
            self._end_round(x, y, final=True)
        elif opt.overlap:  # complete the mean in flight: the models agree after it
            self._sync()
        self.log.close()
        return self._finish() if self.rank == 0 else None

    def _step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        # The schedule at the samples seen after this step; the policy's coupling multiplies it
        # during opt.step() (and restores it after).
        self.lr_schedule.step(self.world * len(y))
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = self.task.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()  # every H-th step ends with a round: the models are averaged
        factors = getattr(self.policy, "last_lr_factors", None) or [1.0]
        self.step_lr = self.opt.param_groups[0]["lr"] * factors[0]
        self.step_time += time.perf_counter() - t0
        self.compute_time += self._t_inner - t0
        self.samples += self.world * len(y)  # every rank's batch has the same size
        self.loss_sum, self.loss_count = self.loss_sum + loss.item(), self.loss_count + 1
        self.round_hash = _common.order_hash(idx, self.round_hash)

    def _sync(self) -> None:
        t0 = time.perf_counter()
        self.opt.sync()
        self.step_time += time.perf_counter() - t0

    def _inner_stepped(self, *_: Any) -> None:
        """The wrapped optimizer's step post hook: the end of a step's compute (before the
        round that may follow it in LocalOptimizer.step)."""
        self._t_inner = time.perf_counter()

    def _end_round(self, x: torch.Tensor, y: torch.Tensor, final: bool) -> bool:
        """Log the round that just ended, pick the next batch size; True to stop training."""
        args, opt, sampler = self.args, self.opt, self.sampler
        # Train loss over all workers and each rank's data-order hash, in one small all-reduce.
        t = torch.zeros(2 + self.world, dtype=torch.float64)
        t[0], t[1], t[2 + self.rank] = self.loss_sum, self.loss_count, self.round_hash
        _common.all_reduce_sum(t)
        b = sampler.batch_size
        if not final:  # all ranks hold the averaged model: pick the next round's batch size
            sampler.set_batch_size(self.policy.suggest(x, y, b))
        rnd = opt.num_syncs
        rec: dict[str, Any] = {
            "round": rnd,
            "step": opt.steps,
            "epoch": sampler.epoch,
            "samples": self.samples,
            "batch_size": b,
            "next_batch_size": sampler.batch_size,
            "lr": self.step_lr,
            "train_loss": t[0].item() / max(t[1].item(), 1.0),
            "bytes_communicated": opt.bytes_communicated,
            "compute_time": self.compute_time,
            "step_time": self.step_time,
            "order_hash": f"{_common.order_hash(t[2:].to(torch.int64)):08x}",
        }
        stats = getattr(self.policy, "last_stats", {}) or {}
        if stats.get("raw") is not None:
            rec["suggested_raw"] = stats["raw"]
        if stats.get("noise_scale") is not None:
            rec["noise_scale"] = stats["noise_scale"]
        last_round = bool(
            final or (args.max_rounds and rnd >= args.max_rounds) or self.samples >= self.budget
        )
        if last_round and opt.overlap:  # the mean in flight first: the models then agree
            self._sync()
        self._evaluate(rec, last_round)
        rec["wall_time"] = self.wall_offset + time.perf_counter() - self.start
        self.log.add(rec)
        self.loss_sum, self.loss_count, self.round_hash = 0.0, 0, 0
        stop = last_round or (args.stop_at_target and self.log.reached_target)
        if stop or (args.ckpt_every and rnd % args.ckpt_every == 0):
            self._save(rec["wall_time"])
        return stop

    def _evaluate(self, rec: dict[str, Any], last_round: bool) -> None:
        """Validation metrics on evaluation rounds, test metrics on the last round only."""
        names = self.task.metric.names
        rec.update({f"val_{k}": None for k in names})
        due = rec["round"] % self.args.eval_every == 0 and rec["samples"] >= self.next_eval
        if due or last_round:
            val = tasks.evaluate(self.task, self.model, self.task.val, self.device)
            rec.update({f"val_{k}": v for k, v in val.items()})
            self.next_eval = self._next_eval_after(rec["samples"])
        rec.update({f"test_{k}": None for k in names})
        if last_round:
            test = tasks.evaluate(self.task, self.model, self.task.test, self.device)
            rec.update({f"test_{k}": v for k, v in test.items()})

    def _save(self, wall_time: float) -> None:
        save_checkpoint(
            self.ckpt_path,
            extra={
                "samples": self.samples,
                "wall_time": wall_time,
                "records": self.log.records,
                "world_size": self.world,
            },
            model=self.model,
            optimizer=self.opt,
            sampler=self.sampler,
            policy=self.policy,
            lr_schedule=self.lr_schedule,
        )

    def _finish(self) -> dict[str, Any]:
        args = self.args
        torch.save(self.model.state_dict(), os.path.join(args.out, "model_final.pt"))
        summary = self.log.summary(
            name=args.name,
            strategy=args.strategy,
            model=args.model,
            dataset=args.dataset,
            task=self.task.description,
            world_size=self.world,
            sync_every=args.sync_every,
            budget_samples=self.budget,
            initial_batch_size=args.batch_size,
            target_acc=args.target_acc,
            target_loss=args.target_loss,
            step_time=self.step_time,
        )
        summary.update(
            walltime.summary_fields(
                self.log.records,
                self.world,
                self.param_bytes,
                self.opt.compression,
                args.overlap,
                summary.get("rounds_to_target"),
            )
        )
        _common.write_json(os.path.join(args.out, "summary.json"), summary)
        print("\n".join(walltime.report_lines(summary)), flush=True)
        self.log.plot(
            f"{args.name}: {self.task.description}, M={self.world}, H={args.sync_every}"
        )
        return summary


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """The training run, on every rank; returns the summary on rank 0 (None elsewhere)."""
    return Trainer(args).fit()


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Launch ``train`` as the flags say; return the summary (read back from ``--out``)."""
    summary = launch.launch(
        train, (args,), args.nproc, args.device, args.threads, args.dist_timeout
    )
    if args.nproc > 1:
        path = os.path.join(args.out, "summary.json")
        return _common.read_json(path) if os.path.exists(path) else None
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
