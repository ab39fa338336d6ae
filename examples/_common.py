r"""Helpers shared by ``examples/train.py`` and ``examples/compare.py`` (not part of the library).

Data (digits, CIFAR-10, synthetic) as in-memory tensors, timm models, the learning-rate schedule,
the batch-size policies, evaluation, the per-round record and the plots. The training loop itself
lives in ``train.py``, where a reader looks for it.
"""

from __future__ import annotations

import ast
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

# ------------------------------------------------------------------------------------------ data


class TensorImages(Dataset):
    r"""Images and labels held in memory, fetched a whole batch at a time.

    ``images`` is ``(N, C, H, W)``, either float (already normalized) or ``uint8`` (scaled to
    :math:`[0, 1]` and normalized with ``mean``/``std`` when fetched, which keeps CIFAR-10 at 150 MB
    per process instead of 600 MB). The DataLoader calls :meth:`__getitems__` with the list of
    indices the batch sampler yielded, so a batch is one tensor indexing, not ``b`` calls of
    ``__getitem__`` and a collate. A batch is ``(x, y, idx)``: ``idx`` is only used to log a hash
    of the data order, which is how the tests check that ``--resume`` continues identically.

    Args:
        images (Tensor): ``(N, C, H, W)`` float or uint8 images.
        targets (Tensor): ``(N,)`` int64 labels.
        mean (sequence of float, optional): per-channel mean for uint8 images (default: None).
        std (sequence of float, optional): per-channel std for uint8 images (default: None).
        augment (bool): random crop (padding 4) and horizontal flip, drawn from torch's global
            RNG, which the checkpoints save (default: False).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
    ) -> None:
        if images.dim() != 4 or len(images) != len(targets):
            raise ValueError(
                f"Invalid images: shape {tuple(images.shape)} for {len(targets)} targets "
                "(expected (N, C, H, W))"
            )
        self.images = images
        self.targets = targets.long()
        c = images.shape[1]
        self.mean = (
            None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        )
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, idx = self.__getitems__([i])
        return x[0], y[0], idx[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self.images[idx]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            if self.mean is not None and self.std is not None:
                x = (x - self.mean) / self.std
        if self.augment:
            x = _random_crop_flip(x)
        return x, self.targets[idx], idx


def collate_batch(batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``collate_fn`` for :class:`TensorImages`: its ``__getitems__`` already made the batch."""
    return batch


def _random_crop_flip(x: Tensor, pad: int = 4) -> Tensor:
    """Per-sample random translation by up to ``pad`` pixels (zero fill) and horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,))
    dx = torch.randint(0, 2 * pad + 1, (n,))
    flip = torch.rand(n) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


@dataclass
class Data:
    """A train/test pair of :class:`TensorImages` and the shape of their samples."""

    train: TensorImages
    test: TensorImages
    num_classes: int
    in_chans: int
    img_size: int


def load_digits_data(
    img_size: int = 16, channels: int = 1, test_fraction: float = 0.2, split_seed: int = 0
) -> Data:
    r"""sklearn's bundled digits (1797 8×8 grayscale images, 10 classes) as image tensors.

    Offline and real. The pixels (0–16) are scaled to :math:`[0, 1]`, resized to
    ``img_size``² with bilinear interpolation, repeated to ``channels`` channels and normalized
    with the training split's mean and std. The split is a seeded permutation, the same for
    every run with the same ``split_seed``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if img_size != 8:
        images = F.interpolate(
            images, size=(img_size, img_size), mode="bilinear", align_corners=False
        )
    images = images.repeat(1, channels, 1, 1)
    targets = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * len(targets)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Data(
        TensorImages(images[train_idx].contiguous(), targets[train_idx]),
        TensorImages(images[test_idx].contiguous(), targets[test_idx]),
        num_classes=10,
        in_chans=channels,
        img_size=img_size,
    )


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def cifar10_class(verify_md5: bool = True) -> type:
    """torchvision's ``CIFAR10``, or a subclass that only checks that the files exist.

    torchvision verifies the md5 of every batch file (``_check_integrity``) and of
    ``batches.meta`` before loading. ``verify_md5=False`` gives a subclass whose file lists carry
    no checksum, for which torchvision's ``check_integrity(path, md5=None)`` only checks that the
    file exists; the files are read by torchvision's own code either way. Use it for a re-packed
    or subset copy of CIFAR-10 in the same pickle format (the tests use a tiny fake one).
    """
    from torchvision.datasets import CIFAR10

    if verify_md5:
        return CIFAR10

    class CIFAR10Unverified(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Unverified


def load_cifar10_data(
    root: str, img_size: int = 32, augment: bool = False, verify_md5: bool = True
) -> Data:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's format), never downloaded."""
    cls = cifar10_class(verify_md5)
    splits = []
    for train in (True, False):
        ds = cls(root, train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        if img_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear")
            images = images.round().clamp_(0, 255).to(torch.uint8)
        targets = torch.tensor(ds.targets, dtype=torch.long)
        splits.append(
            TensorImages(images, targets, CIFAR10_MEAN, CIFAR10_STD, augment=augment and train)
        )
    return Data(splits[0], splits[1], num_classes=10, in_chans=3, img_size=img_size)


def load_synthetic_data(
    n: int = 10000, img_size: int = 32, channels: int = 3, num_classes: int = 10, seed: int = 0
) -> Data:
    r"""A learnable synthetic set for throughput runs: class prototypes plus Gaussian noise.

    Sample :math:`i` of class :math:`c` is :math:`p_c + \epsilon_i` with a random prototype
    :math:`p_c` and noise of the same scale, so accuracy climbs but is no benchmark. A fifth of
    ``n`` more samples form the test split.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, img_size, img_size, generator=g)
    n_test = max(num_classes, n // 5)
    targets = torch.randint(0, num_classes, (n + n_test,), generator=g)
    images = protos[targets] + 1.5 * torch.randn(
        n + n_test, channels, img_size, img_size, generator=g
    )
    return Data(
        TensorImages(images[:n].contiguous(), targets[:n]),
        TensorImages(images[n:].contiguous(), targets[n:]),
        num_classes=num_classes,
        in_chans=channels,
        img_size=img_size,
    )


# ----------------------------------------------------------------------------------------- model


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["patch_size=4", "drop_rate=0.1", "act_layer=gelu"]`` -> a dict (Python literals, else
    strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"Invalid model kwarg: {item!r} (expected key=value)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def create_model(
    name: str, num_classes: int, in_chans: int, img_size: int, kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model(name, num_classes=..., in_chans=..., **kwargs)``, randomly initialized.

    Models that take an ``img_size`` (ViTs and other models with position embeddings) get the
    data's image size unless ``kwargs`` sets it; constructors that reject ``img_size`` (CNNs) are
    retried without it.
    """
    import timm

    base = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if "img_size" in kwargs:
        return timm.create_model(name, **base, **kwargs)
    try:
        return timm.create_model(name, **base, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return timm.create_model(name, **base, **kwargs)


# ----------------------------------------------------------------------------- learning rate


def lr_at(
    samples: float,
    budget: float,
    base_lr: float,
    warmup: float = 0.05,
    min_lr: float = 0.0,
    batch_size: int = 1,
    base_batch_size: int = 1,
    coupling: str = "none",
) -> float:
    r"""Linear warm-up then cosine decay, indexed by the samples seen over all workers.

    With :math:`s` the samples seen after the step about to be taken, :math:`S` the budget,
    :math:`w = \texttt{warmup} \cdot S` and :math:`p = \frac{s - w}{S - w}` clipped to
    :math:`[0, 1]`:

    .. math::
        \mathrm{lr}(s) = \Big(\frac{b}{b_0}\Big)^{k} \cdot
        \begin{cases}
            \mathrm{lr}_0\, s / w & s < w \\
            \mathrm{lr}_{\min} + (\mathrm{lr}_0 - \mathrm{lr}_{\min}) \frac{1 + \cos \pi p}{2}
                & s \ge w
        \end{cases}

    with :math:`\mathrm{lr}_{\min} = \texttt{min\_lr} \cdot \mathrm{lr}_0` and the coupling
    exponent :math:`k` = 0 (``"none"``), 1/2 (``"sqrt"``) or 1 (``"linear"``) of the current
    per-worker batch size :math:`b` to the initial one :math:`b_0`.
    """
    exponent = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[coupling]
    w = warmup * budget
    if samples < w:
        lr = base_lr * samples / w
    else:
        p = min(1.0, max(0.0, (samples - w) / max(budget - w, 1e-12)))
        lo = min_lr * base_lr
        lr = lo + (base_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    return lr * (batch_size / base_batch_size) ** exponent


# -------------------------------------------------------------------------- distributed utils


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``, ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks in place (nothing without torch.distributed); return it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorImages, device: torch.device) -> tuple[float, float]:
    """``(accuracy %, mean loss)`` of ``model`` in eval mode on ``data``, sharded over the ranks.

    Rank ``r`` evaluates samples ``r, r + M, ...`` and the counts are summed over ranks, so every
    rank gets the same numbers (call it on every rank, right after a round).
    """
    rank, world = rank_world()
    was_training = model.training
    model.eval()
    idx = list(range(rank, len(data), world))
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(idx), 512):
        x, y, _ = data.__getitems__(idx[start : start + 512])
        out = model(x.to(device))
        y = y.to(device)
        sums[0] += (out.argmax(1) == y).sum().item()
        sums[1] += F.cross_entropy(out, y, reduction="sum").item()
        sums[2] += len(y)
    model.train(was_training)
    all_reduce_sum(sums)
    return 100.0 * sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()


def order_hash(indices: Tensor, previous: int = 0) -> int:
    """CRC-32 of a batch's sample indices, chained onto ``previous`` (the round's hash so far)."""
    return zlib.crc32(indices.to(torch.int64).cpu().numpy().tobytes(), previous)


# --------------------------------------------------------------------------------- summaries


def rounds_to_target(records: list[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """The first evaluated round whose test accuracy is ``>= target`` (None entries if never)."""
    for r in records:
        acc = r.get("test_acc")
        if target is not None and acc is not None and acc >= target:
            return {
                "rounds_to_target": r["round"],
                "samples_to_target": r["samples"],
                "bytes_to_target": r["bytes_communicated"],
                "wall_time_to_target": r["wall_time"],
            }
    return {
        "rounds_to_target": None,
        "samples_to_target": None,
        "bytes_to_target": None,
        "wall_time_to_target": None,
    }


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- plots


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(
    runs: dict[str, list[dict[str, Any]]],
    path: str,
    title: str = "",
    target: float | None = None,
) -> None:
    """2×2 figure: per-worker batch size and test accuracy against rounds and against samples.

    ``runs`` maps a label to its per-round records (the lines of ``metrics.jsonl``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    for label, records in runs.items():
        if not records:
            continue
        for col, x in enumerate(("round", "samples")):
            # Round r trains at batch_size_r over (x_{r-1}, x_r]: draw it from the round's start.
            xs = [0] + [r[x] for r in records]
            ys = [r["batch_size"] for r in records]
            axes[0, col].step(xs, ys + ys[-1:], where="post", label=label)
            xs, ys = _series(records, x, "test_acc")
            axes[1, col].plot(xs, ys, label=label, marker="." if len(xs) < 60 else None)
    for col, xlabel in enumerate(("communication round", "samples seen (all workers)")):
        axes[0, col].set_yscale("log", base=2)
        axes[0, col].set_ylabel("per-worker batch size")
        axes[1, col].set_ylabel("test accuracy (%)")
        axes[1, col].set_xlabel(xlabel)
        if target is not None:
            axes[1, col].axhline(target, color="gray", lw=0.8, ls="--")
        accs = [r["test_acc"] for rs in runs.values() for r in rs if r.get("test_acc") is not None]
        if accs:
            top = max(accs)
            axes[1, col].set_ylim(
                max(0.0, min(top - 30.0, target - 10.0 if target else 100)), 100.5
            )
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
