r"""Image data (digits, Fashion-MNIST, CIFAR-10, synthetic) as in-memory tensors, and timm models.

Used by the image tasks of ``tasks.py``. Every loader returns an :class:`ImageData` with three
splits: training, validation (for every choice: targets, tuning) and test (for reporting only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
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
class ImageData:
    """Training, validation and test :class:`TensorImages` and the shape of their samples."""

    train: TensorImages
    val: TensorImages
    test: TensorImages
    num_classes: int
    in_chans: int
    img_size: int


def load_digits_data(
    img_size: int = 16,
    channels: int = 1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    val_fraction: float = 0.1,
) -> ImageData:
    r"""sklearn's bundled digits (1797 8×8 grayscale images, 10 classes) as image tensors.

    Offline and real. The pixels (0–16) are scaled to :math:`[0, 1]`, resized to
    ``img_size``² with bilinear interpolation, repeated to ``channels`` channels and normalized
    with the training split's mean and std. The split is a seeded permutation, the same for
    every run with the same ``split_seed``: its first ``test_fraction`` is the test split (the
    same 360 images for every ``val_fraction``), the next ``val_fraction`` the validation split
    (180 images by default), the rest the training split (1257 by default).
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
    n_val = int(round(val_fraction * len(targets)))
    test_idx, val_idx = perm[:n_test], perm[n_test : n_test + n_val]
    train_idx = perm[n_test + n_val :]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return ImageData(
        *(TensorImages(images[i].contiguous(), targets[i]) for i in (train_idx, val_idx, test_idx)),
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
    root: str,
    img_size: int = 32,
    augment: bool = False,
    verify_md5: bool = True,
    val_fraction: float = 0.1,
    split_seed: int = 0,
) -> ImageData:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision's format), never downloaded.

    The validation split is a seeded ``val_fraction`` of the 50 000 training images (5000 by
    default), never augmented; the test split is CIFAR-10's test batch.
    """
    cls = cifar10_class(verify_md5)
    arrays = []
    for train in (True, False):
        ds = cls(root, train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
        if img_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear")
            images = images.round().clamp_(0, 255).to(torch.uint8)
        arrays.append((images, torch.tensor(ds.targets, dtype=torch.long)))
    (images, targets), (test_images, test_targets) = arrays
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(val_fraction * len(targets)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    norm = (CIFAR10_MEAN, CIFAR10_STD)
    return ImageData(
        TensorImages(images[train_idx], targets[train_idx], *norm, augment=augment),
        TensorImages(images[val_idx], targets[val_idx], *norm),
        TensorImages(test_images, test_targets, *norm),
        num_classes=10,
        in_chans=3,
        img_size=img_size,
    )


#: Where the Debian package ``dataset-fashion-mnist`` puts the gzipped IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Mean and std of Fashion-MNIST's 60 000 training images, pixels scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

#: IDX type codes (the third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> Tensor:
    r"""An IDX file (LeCun's MNIST format; gzipped when ``path`` ends in ``.gz``) as a tensor.

    The file is a magic number (two zero bytes, a type code, the number of dimensions
    :math:`d`), :math:`d` big-endian ``uint32`` sizes, then the values in C order.
    """
    import gzip

    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"Invalid IDX file: {path} (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(
            f"Invalid IDX file: {path} holds {len(raw) - offset} data bytes, expected "
            f"{count * dtype.itemsize} for shape {tuple(dims)}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def _find_idx(root: str, name: str) -> str:
    """``root/name.gz`` or ``root/name``, also under torchvision's ``root/FashionMNIST/raw``."""
    import os

    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        for candidate in (name + ".gz", name):
            path = os.path.join(folder, candidate)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(
        f"Fashion-MNIST: no {name}(.gz) in {root!r}. Install the Debian package "
        "(apt-get install dataset-fashion-mnist, files in "
        f"{FASHION_MNIST_DIR}) or pass --data-dir pointing at a folder holding "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz"
    )


def load_fashion_mnist_data(
    root: str = "", img_size: int = 28, val_fraction: float = 0.05, split_seed: int = 0
) -> ImageData:
    """Fashion-MNIST from the gzipped IDX files in ``root`` (default: the Debian package's folder).

    Read directly (:func:`read_idx`), never downloaded. The validation split is a seeded
    ``val_fraction`` of the 60 000 training images (3000 by default), the rest is the training
    split; the test split is the 10 000 ``t10k`` images. Pixels stay ``uint8`` in memory and are
    scaled to :math:`[0, 1]` and normalized with Fashion-MNIST's training mean and std when
    fetched; ``img_size`` other than 28 resizes them once (bilinear).
    """
    root = root or FASHION_MNIST_DIR
    arrays = []
    for split in ("train", "test"):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        images = read_idx(_find_idx(root, images_name))
        labels = read_idx(_find_idx(root, labels_name)).long()
        if images.dim() != 3 or images.dtype != torch.uint8 or len(images) != len(labels):
            raise ValueError(
                f"Invalid Fashion-MNIST {split} files in {root!r}: images "
                f"{tuple(images.shape)} {images.dtype}, labels {tuple(labels.shape)}"
            )
        images = images[:, None]
        if img_size != images.shape[-1]:
            images = F.interpolate(images.float(), size=(img_size, img_size), mode="bilinear")
            images = images.round().clamp_(0, 255).to(torch.uint8)
        arrays.append((images.contiguous(), labels))
    (images, targets), (test_images, test_targets) = arrays
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(val_fraction * len(targets)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    norm = (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return ImageData(
        TensorImages(images[train_idx], targets[train_idx], *norm),
        TensorImages(images[val_idx], targets[val_idx], *norm),
        TensorImages(test_images, test_targets, *norm),
        num_classes=10,
        in_chans=1,
        img_size=img_size,
    )


def load_synthetic_data(
    n: int = 10000, img_size: int = 32, channels: int = 3, num_classes: int = 10, seed: int = 0
) -> ImageData:
    r"""A learnable synthetic set for throughput runs: class prototypes plus Gaussian noise.

    Sample :math:`i` of class :math:`c` is :math:`p_c + \epsilon_i` with a random prototype
    :math:`p_c` and noise of the same scale, so accuracy climbs but is no benchmark. A tenth of
    ``n`` more samples form the validation split, a fifth the test split.
    """
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, channels, img_size, img_size, generator=g)
    n_val, n_test = max(num_classes, n // 10), max(num_classes, n // 5)
    total = n + n_val + n_test
    targets = torch.randint(0, num_classes, (total,), generator=g)
    images = protos[targets] + 1.5 * torch.randn(total, channels, img_size, img_size, generator=g)
    return ImageData(
        TensorImages(images[:n].contiguous(), targets[:n]),
        TensorImages(images[n : n + n_val].contiguous(), targets[n : n + n_val]),
        TensorImages(images[n + n_val :].contiguous(), targets[n + n_val :]),
        num_classes=num_classes,
        in_chans=channels,
        img_size=img_size,
    )


# ----------------------------------------------------------------------------------------- model


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


