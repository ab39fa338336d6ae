r"""`make demo`: the paper's claim on digits, in one run of each strategy.

Runs Local SGD with M = --nproc gloo workers under the same sample budget, seed, model and
learning-rate rule (warm-up then cosine by samples, times the same --lr-coupling factor for every
strategy), changing only how the per-worker batch size evolves (examples/paper.py describes the
strategies: constant-small, constant-large, stagewise, linear, sqrt-doubling, adaptive, paper).

The claim, in the paper's framing: over the same sample budget, adaptive batch sizes need at most
half the communication rounds of small constant batches and end at the same final test accuracy,
better than large constant batches, and no schedule gets both fewer rounds and a better final
accuracy. The demo prints a markdown table (total rounds and bytes over the budget, final test
accuracy, rounds to --target-acc on validation, ...) and what of the claim holds on this run, with
one seed: the tolerance of "the same accuracy" is twice the test accuracy's binomial standard
error sqrt(p (1 - p) / n) (`make paper` uses the seed-to-seed spread instead). It writes the table
to OUT/compare.md (and --md), the plot to OUT/compare.png (or --plot).

    python examples/compare.py --nproc 4 --out runs/demo --md docs/demo.md --plot docs/demo.png

Each strategy is an ordinary train.py run (its folder under --out holds metrics.jsonl,
summary.json, plot.png); the M worker processes are spawned once and run the strategies one after
another, which saves their start-up time (imports) per strategy: every run seeds everything
itself, so it is the run `train.py --nproc M` would make with the same flags. Extra train.py flags
go after `--`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import launch  # noqa: E402
import paper  # noqa: E402
import runlog  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

STRATEGIES = paper.STRATEGIES
DEFAULT_STRATEGIES = (
    "constant-small", "constant-large", "stagewise", "linear", "sqrt-doubling", "adaptive",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nproc", type=int, default=4, help="M, number of gloo worker processes (default: 4)"
    )
    p.add_argument(
        "--out",
        default="runs/compare",
        help="output folder: one sub-folder per strategy, compare.md, compare.json "
        "(default: runs/compare)",
    )
    p.add_argument(
        "--plot", default="", help="where to write the comparison plot (default: OUT/compare.png)"
    )
    p.add_argument(
        "--md", default="", help="also write the table and verdict here, e.g. docs/demo.md "
        "(default: none)",
    )  # fmt: skip
    p.add_argument(
        "--strategies",
        nargs="+",
        default=list(DEFAULT_STRATEGIES),
        choices=STRATEGIES,
        help="strategies to run, in this order (default: all but paper)",
    )
    p.add_argument("--model", default="test_resnet", help="timm model name (default: test_resnet)")
    p.add_argument(
        "--epochs",
        type=float,
        default=20.0,
        help="sample budget of every run, in passes over the training set (default: 20)",
    )
    p.add_argument(
        "--sync-every", type=int, default=8, help="H, local steps per round (default: 8)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="small / initial per-worker batch size (default: 16)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=128,
        help="cap of the adaptive and stagewise batch sizes, and the constant-large "
        "batch size (default: 128)",
    )
    p.add_argument(
        "--test",
        default="norm",
        choices=("norm", "inner_product", "augmented"),
        help="the adaptive strategy's variance test (default: norm)",
    )
    p.add_argument(
        "--eta",
        type=float,
        default=None,
        help="norm test threshold eta (default: VarianceTest's default)",
    )
    p.add_argument(
        "--theta",
        type=float,
        default=None,
        help="inner-product test threshold (default: VarianceTest's default)",
    )
    p.add_argument(
        "--vt-backend",
        default="auto",
        choices=["auto", "hooks", "vmap", "microbatch"],
        help="VarianceTest backend of the adaptive run (default: auto, the hooks backend here)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="peak learning rate, the same for every strategy (default: 0.05)",
    )
    p.add_argument(
        "--lr-coupling",
        default=paper.DEFAULT_COUPLING,
        help="the learning rate's batch-size coupling of every strategy, relative to "
        f"--batch-size (train.py's --lr-coupling) (default: {paper.DEFAULT_COUPLING})",
    )
    p.add_argument(
        "--target-acc",
        type=float,
        default=97.0,
        help="validation accuracy (%%) for the rounds-to-target column (default: 97)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after `--`: extra flags passed to every train.py run",
    )
    return p


def strategy_argv(name: str, args: argparse.Namespace, budget: int) -> list[str]:
    """train.py's flags for one strategy (the milestones and ramp as in paper.py)."""
    common = [
        "--model", args.model, "--epochs", str(args.epochs), "--sync-every", str(args.sync_every),
        "--max-batch-size", str(args.max_batch_size), "--lr", str(args.lr),
        "--lr-coupling", args.lr_coupling, "--lr-ref-batch-size", str(args.batch_size),
        "--target-acc", str(args.target_acc), "--seed", str(args.seed),
        "--vt-backend", args.vt_backend, "--ckpt-every", "0",
        "--out", os.path.join(args.out, name), "--name", name,
    ]  # fmt: skip
    if args.no_progress:
        common.append("--no-progress")
    extra = [a for a in args.train_args if a != "--"]
    m, h, b0, cap = args.nproc, args.sync_every, args.batch_size, args.max_batch_size
    if name == "constant-small":
        own = ["--strategy", "constant", "--batch-size", str(b0)]
    elif name == "constant-large":
        own = ["--strategy", "constant", "--batch-size", str(cap)]
    elif name == "stagewise":
        ms = paper.stagewise_milestones(budget, m, h, b0, cap)
        own = ["--strategy", "stagewise", "--batch-size", str(b0), "--factor", "2",
               "--milestones", *map(str, ms)]  # fmt: skip
    elif name == "sqrt-doubling":  # its own rule: the learning rate x sqrt 2 at each doubling
        own = ["--strategy", "doubling", "--batch-size", str(b0), "--lr-coupling", "sqrt",
               "--doubling-at", *map(str, paper.doubling_fractions(b0, cap))]  # fmt: skip
    elif name == "linear":
        ramp = max(1, math.ceil(budget / (m * h * (b0 + cap))))
        own = ["--strategy", "linear", "--batch-size", str(b0), "--ramp-rounds", str(ramp)]
    else:
        own = ["--strategy", "adaptive", "--batch-size", str(b0), "--test", args.test]
        if name == "paper":
            own += ["--policy", "paper"]
        for flag, value in (("--eta", args.eta), ("--theta", args.theta)):
            if value is not None:
                own += [flag, str(value)]
    return common + own + extra


def run_all(argvs: list[list[str]]) -> None:
    """train.py's runs one after another in the same processes (on every rank)."""
    for argv in argvs:
        train.train(train.parse_args(argv))
        if dist.is_initialized():
            dist.barrier()


def _fmt(v: Any, spec: str = "") -> str:
    return "—" if v is None else format(v, spec)


def table(summaries: list[dict[str, Any]], target: float) -> str:
    lines = [
        "| strategy | total rounds | MB sent per worker | final test acc (%) "
        f"| rounds to {target:g}% (val) | best val (%) | samples | final b | wall time (s) |",
        "|" + "---|" * 9,
    ]
    for s in summaries:
        lines.append(
            f"| {s['name']} | {s['rounds']} | {s['bytes_communicated'] / 1e6:.1f} "
            f"| {_fmt(s['final_test_acc'], '.2f')} | {_fmt(s['rounds_to_target'])} "
            f"| {_fmt(s['best_val_acc'], '.2f')} | {s['samples']} | {s['final_batch_size']} "
            f"| {s['wall_time']:.1f} |"
        )
    return "\n".join(lines)


def binomial_sd(acc: float, n: int) -> float:
    r"""Standard error of a test accuracy (in points) from ``n`` test samples:
    :math:`100 \sqrt{p (1 - p) / n}`, :math:`p` = ``acc`` / 100 (at least one sample's worth)."""
    p = min(max(acc / 100.0, 1.0 / n), 1.0 - 1.0 / n)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


CLAIM = (
    "**The paper's claim, in this framing:** over the same sample budget, adaptive batch sizes "
    f"need at most {paper.ROUNDS_RATIO}× the communication rounds of constant-small and end at "
    "the same final test accuracy (within 2 binomial standard errors of constant-small's on this "
    "one seed), better than constant-large, and no schedule here gets both fewer total rounds and "
    "a better final accuracy."
)


def verdict(by_name: dict[str, dict[str, Any]], n_test: int) -> list[str]:
    """What of the claim holds on this run: one line per criterion of ``paper.criteria`` (one
    seed; the accuracy tolerance from the test set's binomial standard error)."""
    ad, small = by_name.get("adaptive"), by_name.get("constant-small")
    if ad is None or small is None:
        return []
    sd = binomial_sd(small["final_test_acc"], n_test)
    by = {name: {0: s} for name, s in by_name.items()}
    out = [
        CLAIM,
        "",
        f"On this run (binomial standard error of constant-small's test accuracy on {n_test} "
        f"images: {sd:.2f} points):",
        "",
    ]
    for v in paper.criteria("acc", by, "adaptive", sd, sd_name="binomial std"):
        word = "holds" if v.ok else "FAILS"
        out.append(f"- {v.name}: **{word}** — {v.detail.replace('sd)', 'std)')}")
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.nproc < 1:
        raise SystemExit(f"compare.py: invalid --nproc: {args.nproc}")
    os.makedirs(args.out, exist_ok=True)
    # The budget in samples, as train.py computes it (needed for the milestones and the ramp).
    probe = train.parse_args(
        ["--epochs", str(args.epochs)] + [a for a in args.train_args if a != "--"]
    )
    task = tasks.TASKS[probe.dataset](probe)
    budget = probe.budget_samples or int(args.epochs * len(task.train))
    argvs = [strategy_argv(name, args, budget) for name in args.strategies]
    for name, a in zip(args.strategies, argvs):
        print(f"{name}: train.py --nproc {args.nproc} {' '.join(a)}", flush=True)

    commit = paper.git_commit()  # before the runs: their outputs may be tracked files (docs/)
    start = time.perf_counter()
    launch.launch(run_all, (argvs,), args.nproc, timeout=600)
    total = time.perf_counter() - start

    summaries, runs = [], {}
    for name in args.strategies:
        folder = os.path.join(args.out, name)
        summaries.append(_common.read_json(os.path.join(folder, "summary.json")))
        runs[name] = _common.read_jsonl(os.path.join(folder, "metrics.jsonl"))
    s0 = summaries[0]
    title = (
        f"{s0['model']} on {s0['dataset']}, M={s0['world_size']} workers, "
        f"H={s0['sync_every']}, budget {s0['budget_samples']} samples, seed {args.seed}"
    )
    plot = args.plot or os.path.join(args.out, "compare.png")
    runlog.plot_runs(runs, plot, title=title, metric="val_acc", target=args.target_acc)
    by_name = {s["name"]: s for s in summaries}
    text = "\n".join([
        f"### {title}",
        "",
        table(summaries, args.target_acc),
        "",
        *verdict(by_name, len(task.test)),
    ])  # fmt: skip
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text + "\n")
    if args.md:
        given = argv if argv is not None else sys.argv[1:]
        command = "python examples/compare.py " + " ".join(given)
        with open(args.md, "w") as f:
            f.write(
                "# `make demo`: the paper's claim on digits (generated)\n\n"
                f"Written by `{command}` at commit `{commit}` in {total:.0f} s "
                f"(including process start-up; learning-rate coupling `{args.lr_coupling}` for "
                "every strategy). Total rounds and bytes are over the whole equal sample budget; "
                "the final test accuracy is at its end; rounds to the target are read on the "
                f"validation split.\n\n{text}\n\n"
                f"![demo: batch size and validation accuracy against rounds and samples]"
                f"({os.path.relpath(plot, os.path.dirname(os.path.abspath(args.md)))})\n"
            )
    _common.write_json(os.path.join(args.out, "compare.json"), summaries)
    print()
    print(text)
    print(f"\nplot: {plot}   total time: {total:.0f} s (including process start-up)")
    return summaries


if __name__ == "__main__":
    main()
