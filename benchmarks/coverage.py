"""Which models ``VarianceTest(backend="auto")`` runs on the exact fast path (the hooks backend).

A fixed list of timm architectures (CNNs, ViTs, hybrids, mobile nets; tiny configurations, no
pretrained weights, small images) plus ``nn.TransformerEncoder``, a GPT-style language model with
a tied head and an LSTM classifier. For each model: ``"auto"``'s choice from the model's structure
(:func:`local_opt.backends.resolve`) and then one hooks pass on a batch of 2, which is where loose
parameters are followed and checked. A model is *covered* when both succeed; otherwise the first
reason is printed.

    OMP_NUM_THREADS=1 python benchmarks/coverage.py            # the table (markdown)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --check    # also compare with vmap (float64)
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Entry:
    name: str
    kind: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Any, Any]]
    note: str = ""
    kwargs: dict = field(default_factory=dict)


def _images(size: int, classes: int = 10) -> Callable[[int], tuple[Any, Any]]:
    def make(n: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)

    return make


def _timm(name: str, size: int, kind: str, **kwargs: Any) -> Entry:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    note = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "img_size")
    return Entry(name, kind, build, _images(size), note=f"{size}px" + (f", {note}" if note else ""))


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` (batch first, 2 layers) on token ids, mean-pooled."""

    def __init__(self, vocab=50, dim=32, heads=4, layers=2, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.emb(ids)).mean(1))


class GPT(nn.Module):
    """GPT-style: token embedding, a learned position table used sliced (minGPT's ``pos_emb``)
    or nanoGPT's position ``nn.Embedding`` on ``arange(T)``, pre-norm blocks with causal
    ``scaled_dot_product_attention``, a head tied to the token embedding."""

    def __init__(self, vocab=64, dim=32, heads=4, layers=2, context=16, wpe=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        if wpe:
            self.wpe = nn.Embedding(context, dim)
        else:
            self.pos = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim),
                    "fc": nn.Linear(dim, 4 * dim),
                    "out": nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.heads = heads

    def forward(self, ids):
        n, t = ids.shape
        if hasattr(self, "wpe"):
            x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        else:
            x = self.wte(ids) + self.pos[:t]
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (z.view(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b["proj"](y.transpose(1, 2).reshape(n, t, -1))
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        return self.head(self.ln_f(x))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=50, dim=32, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


def _tokens(vocab: int, length: int, lm: bool = False) -> Callable[[int], tuple[Any, Any]]:
    def make(n: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (n, length), generator=g)
        if lm:
            return ids, torch.randint(0, vocab, (n, length), generator=g)
        return ids, torch.randint(0, 10, (n,), generator=g)

    return make


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


# The fixed list: 37 timm architectures and 4 torch models.
ENTRIES: list[Entry] = [
    # CNNs
    _timm("resnet18", 32, "CNN"),
    _timm("test_resnet", 32, "CNN"),
    _timm("resnext26ts", 32, "CNN"),
    _timm("regnetx_002", 32, "CNN"),
    _timm("densenet121", 32, "CNN"),
    _timm("dla34", 32, "CNN"),
    _timm("repvgg_a0", 32, "CNN"),
    _timm("test_byobnet", 32, "CNN"),
    _timm("test_nfnet", 32, "CNN"),
    _timm("convnext_atto", 32, "CNN"),
    _timm("convnextv2_atto", 32, "CNN"),
    _timm("test_convnext", 32, "CNN"),
    # mobile nets
    _timm("mobilenetv2_050", 32, "mobile"),
    _timm("mobilenetv3_small_050", 32, "mobile"),
    _timm("mobilenetv4_conv_small", 32, "mobile"),
    _timm("lcnet_050", 32, "mobile"),
    _timm("ghostnet_050", 32, "mobile"),
    _timm("efficientnet_b0", 32, "mobile"),
    _timm("test_efficientnet_gn", 32, "mobile"),
    _timm("test_efficientnet_ln", 32, "mobile"),
    # ViTs
    _timm("vit_tiny_patch16_224", 32, "ViT", img_size=32, patch_size=4),
    _timm("deit_tiny_patch16_224", 32, "ViT", img_size=32, patch_size=4),
    _timm("test_vit4", 160, "ViT"),
    _timm("test_vit_relpos", 160, "ViT"),
    _timm("pit_ti_224", 64, "ViT", img_size=64),
    _timm("cait_xxs24_224", 32, "ViT", img_size=32, patch_size=8, depth=2),
    _timm("xcit_nano_12_p16_224", 32, "ViT", img_size=32, patch_size=8, depth=2),
    _timm(
        "swin_tiny_patch4_window7_224", 224, "ViT", embed_dim=24, depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    ),
    _timm(
        "beit_base_patch16_224", 32, "ViT", img_size=32, patch_size=8, depth=1, embed_dim=32,
        num_heads=2,
    ),
    _timm("poolformer_s12", 32, "ViT"),
    # hybrids
    _timm("test_coatnet", 160, "hybrid"),
    _timm("test_maxvit", 160, "hybrid"),
    _timm("mobilevit_xxs", 64, "hybrid"),
    _timm("fastvit_t8", 32, "hybrid"),
    _timm("efficientvit_b0", 32, "hybrid"),
    _timm("coat_lite_tiny", 32, "hybrid", img_size=32),
    _timm("levit_128s", 224, "hybrid"),
    # torch
    Entry("nn.TransformerEncoder", "torch", TransformerClassifier, _tokens(50, 12)),
    Entry(
        "GPT (tied head, sliced position table)", "torch", GPT, _tokens(64, 16, lm=True),
        kwargs={"loss": lm_loss},
    ),
    Entry(
        "nanoGPT (tied head, position Embedding)", "torch", lambda: GPT(wpe=True),
        _tokens(64, 16, lm=True), kwargs={"loss": lm_loss},
    ),
    Entry("LSTM", "torch", LSTMClassifier, _tokens(50, 12)),
]


def probe(entry: Entry, check: bool = False) -> tuple[bool, str, float]:
    """``(covered, reason, seconds)`` for one entry."""
    from local_opt.backends import resolve
    from local_opt.backends.hooks import hooks_grad_stats, unsupported_layers

    start = time.perf_counter()
    torch.manual_seed(0)
    model = entry.build()
    loss = entry.kwargs.get("loss", F.cross_entropy)
    x, y = entry.batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        missing = unsupported_layers(model)
        choice = resolve("auto", model)
    if missing or choice != "hooks":
        return False, (missing[0] if missing else f"auto chose {choice}"), time.perf_counter() - start
    try:
        stats = hooks_grad_stats(model, loss, x, y)
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        why = f"{type(e).__name__}: {str(e).split('; use')[0]}"
        return False, why, time.perf_counter() - start
    reason = ""
    if check:
        from local_opt.backends.vmap import vmap_stats

        model = model.double().eval()  # in train mode BatchNorm makes hooks' g_i contributions
        x = x.double() if x.is_floating_point() else x
        a = hooks_grad_stats(model, loss, x, y)
        try:
            b = vmap_stats(model, loss, x, y)
        except Exception as e:  # noqa: BLE001
            reason = f"vmap fails ({type(e).__name__})"
        else:
            err = float((a.sq_norm_sum - b.sq_norm_sum).abs() / b.sq_norm_sum)
            reason = f"hooks vs vmap (eval, float64): {err:.1e}"
    del stats
    return True, reason, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with vmap in float64")
    parser.add_argument("--only", nargs="*", help="entries whose name contains one of these")
    args = parser.parse_args()
    entries = [
        e for e in ENTRIES if not args.only or any(s in e.name for s in args.only)
    ]
    print("| model | kind | configuration | exact fast path | not covered / note |")
    print("|---|---|---|---|---|")
    covered = 0
    for e in entries:
        ok, why, secs = probe(e, args.check)
        covered += ok
        why = why.replace("|", "/")
        print(f"| {e.name} | {e.kind} | {e.note} | {'yes' if ok else 'no'} | {why} |", flush=True)
    print(f"\n{covered}/{len(entries)} covered ({100 * covered / max(1, len(entries)):.0f} %)")


if __name__ == "__main__":
    main()
