"""Which models ``VarianceTest(backend="auto")`` runs on the exact fast path (the hooks backend).

A fixed list: timm architectures (CNNs, ViTs, hybrids, mobile nets), torchvision models, Hugging
Face ``transformers`` models built from tiny configs (GPT-2, Llama, BERT, ViT; never hub weights;
skipped when ``transformers`` is not installed), ``nn.TransformerEncoder``, GPT-style language
models with a tied head and an LSTM classifier; tiny configurations, no pretrained weights, small
inputs. For each model, ``"auto"`` runs as :class:`~local_opt.VarianceTest` runs it
(:func:`local_opt.backends.compute`, the model in training mode, float32, a batch of 3): the
backend it ends on (``hooks``, or the fallback ``vmap``/``microbatch`` and why: the layer the
hooks lack, or the layer where the hooks pass failed). With ``--check``, a model on the hooks
path is then compared with ``vmap`` in float64 and eval mode (BatchNorm with running statistics,
where both define the same per-sample gradients): the relative difference of
:math:`\\sum_i \\lVert g_i\rVert^2`.

    OMP_NUM_THREADS=1 python benchmarks/coverage.py                 # the table (markdown)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --check         # + hooks vs vmap (float64)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --check --out docs/coverage.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import _common  # noqa: E402  (examples/_common.py: the commit, the README block writer)


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


def _tv_build(cls: str, **kwargs: Any) -> nn.Module:
    import torchvision.models as tvm

    return getattr(tvm, cls)(**kwargs)


def _tv(name: str, size: int, kind: str, **kwargs: Any) -> Entry:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return tvm.get_model(name, weights=None, num_classes=10, **kwargs)

    return Entry(f"{name} (torchvision)", kind, build, _images(size), note=f"{size}px")


class HFOutput(nn.Module):
    """A Hugging Face model as ``inputs -> logits`` (its ``forward`` returns a ModelOutput)."""

    def __init__(self, model: nn.Module, images: bool = False) -> None:
        super().__init__()
        self.model, self.images = model, images

    def forward(self, x):
        out = self.model(pixel_values=x) if self.images else self.model(input_ids=x)
        return out.logits


def _hf(kind: str) -> nn.Module:
    """A tiny Hugging Face model from a config (no weights are downloaded)."""
    import transformers as tf

    common = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=32,
                            bos_token_id=0, eos_token_id=0)
        return HFOutput(tf.GPT2LMHeadModel(cfg))
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, intermediate_size=128, num_key_value_heads=1,
                             max_position_embeddings=32, **common)
        return HFOutput(tf.LlamaForCausalLM(cfg))
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=64, intermediate_size=128, max_position_embeddings=32,
                            num_labels=10, **common)
        return HFOutput(tf.BertForSequenceClassification(cfg))
    cfg = tf.ViTConfig(image_size=32, patch_size=8, intermediate_size=128, num_labels=10, **common)
    return HFOutput(tf.ViTForImageClassification(cfg), images=True)


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
    _timm("efficientformer_l1", 224, "hybrid", depths=(1, 1, 1, 1), num_vit=1),
    _timm(
        "eva02_tiny_patch14_224", 28, "ViT", img_size=28, patch_size=14, depth=2, embed_dim=32,
        num_heads=2,
    ),
    # torchvision
    _tv("resnet18", 32, "CNN"),
    _tv("mobilenet_v3_small", 32, "mobile"),
    _tv("efficientnet_b0", 32, "mobile"),
    _tv("shufflenet_v2_x0_5", 32, "mobile"),
    _tv("mnasnet0_5", 32, "mobile"),
    _tv("squeezenet1_1", 64, "CNN"),
    _tv("densenet121", 32, "CNN"),
    _tv("regnet_y_400mf", 32, "CNN"),
    _tv("convnext_tiny", 32, "CNN"),
    _tv("googlenet", 32, "CNN", aux_logits=False, init_weights=True),
    Entry(
        "vit (torchvision VisionTransformer)", "torchvision",
        lambda: _tv_build("VisionTransformer", image_size=32, patch_size=8, num_layers=2,
                          num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
        _images(32), note="32px, 2 layers, d=32",
    ),
    Entry(
        "swin (torchvision SwinTransformer)", "torchvision",
        lambda: _tv_build("SwinTransformer", patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                          num_heads=[1, 2], window_size=[4, 4], num_classes=10),
        _images(32), note="32px, depths (1, 1), d=16",
    ),
    # Hugging Face transformers (tiny configs, no weights)
    Entry("GPT-2 (GPT2LMHeadModel)", "HF", lambda: _hf("gpt2"), _tokens(64, 16, lm=True),
          note="2 layers, d=64, 2 heads", kwargs={"loss": lm_loss}),
    Entry("Llama (LlamaForCausalLM)", "HF", lambda: _hf("llama"), _tokens(64, 16, lm=True),
          note="2 layers, d=64, 2 heads (GQA 1 kv head)", kwargs={"loss": lm_loss}),
    Entry("BERT (BertForSequenceClassification)", "HF", lambda: _hf("bert"), _tokens(64, 16),
          note="2 layers, d=64, 2 heads"),
    Entry("ViT (ViTForImageClassification)", "HF", lambda: _hf("vit"), _images(32),
          note="32px, patch 8, 2 layers, d=64"),
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


def _fresh(model: nn.Module) -> None:
    """Empty timm's eval-mode attention-bias caches (a cached bias computed with grad in one
    pass would carry that pass's freed graph into the next)."""
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}


def _loop_sq_norm_sum(model: nn.Module, loss: Callable, x: Any, y: Any) -> float:
    """``Σ_i ‖g_i‖²`` from one forward and backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(len(x)):
        _fresh(model)
        gs = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), params, allow_unused=True)
        total += sum(float(g.double().pow(2).sum()) for g in gs if g is not None)
    return total


def probe(entry: Entry, check: bool = False) -> tuple[str, str, str, float]:
    """``(backend, hooks vs vmap, reason, seconds)`` for one entry: what ``"auto"`` ends on."""
    from local_opt.backends import compute
    from local_opt.backends.hooks import hooks_grad_stats
    from local_opt.backends.vmap import vmap_stats

    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        model = entry.build()
    except ImportError as e:
        return "skipped", "", f"needs {e.name or e}", 0.0
    loss = entry.kwargs.get("loss", F.cross_entropy)
    x, y = entry.batch(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backend, _ = compute("auto", model, loss, x, y)
        except Exception as e:  # noqa: BLE001 - a crash goes into the table (it is a defect)
            return "CRASH", "", f"{type(e).__name__}: {e}", time.perf_counter() - start
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    why = ""
    if backend != "hooks":
        why = said[0] if said else f"auto chose {backend}"
        why = why.replace("VarianceTest(backend='auto'): ", "")
    diff = ""
    if check and backend == "hooks":
        model = model.double().eval()
        x = x.double() if x.is_floating_point() else x
        _fresh(model)
        try:
            a = float(hooks_grad_stats(model, loss, x, y).sq_norm_sum)
        except Exception as e:  # noqa: BLE001
            return backend, f"hooks failed in float64 ({type(e).__name__})", why, 0.0
        _fresh(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b, ref = float(vmap_stats(model, loss, x, y).sq_norm_sum), ""
        except Exception as e:  # noqa: BLE001 - vmap cannot run it: a per-sample loop instead
            b, ref = _loop_sq_norm_sum(model, loss, x, y), f" (per-sample loop: vmap fails, {type(e).__name__})"
        diff = f"{abs(a - b) / b:.1e}{ref}"
    return backend, diff, why, time.perf_counter() - start


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def readme_lines(rows: list[tuple[str, str, str]], summary: str, out: str, commit: str
                 ) -> list[str]:
    """README's coverage summary: the models by kind, on which backend, and where the table is.

    ``rows`` are ``(model, kind, backend)``."""
    kinds: dict[str, list[str]] = {}
    for name, kind, backend in rows:
        kinds.setdefault(kind, []).append(name if backend == "hooks" else f"{name} ({backend})")
    return [
        f"**{summary}** (`benchmarks/coverage.py --check` at commit "
        f"`{commit}`, each model against torch.func in float64; "
        f"the table: [{out}]({out})):",
        "",
        *[f"- {kind}: {', '.join(names)}" for kind, names in kinds.items()],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with vmap in float64")
    parser.add_argument("--only", nargs="*", help="entries whose name contains one of these")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("--readme", help="also rewrite this file's generated block 'coverage' "
                        "(a summary linking to --out)")
    args = parser.parse_args()
    commit = _common.git_commit(short=True)  # before this script writes any file
    torch.set_num_threads(1)
    entries = [
        e for e in ENTRIES if not args.only or any(s in e.name for s in args.only)
    ]
    lines = [
        "| model | kind | configuration | `auto` runs | hooks vs vmap, Σ‖g_i‖² (float64, eval) "
        "| why not hooks |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    counts: dict[str, int] = {}
    ran_on: list[tuple[str, str, str]] = []
    for e in entries:
        backend, diff, why, secs = probe(e, args.check)
        counts[backend] = counts.get(backend, 0) + 1
        ran_on.append((e.name, e.kind, backend))
        why = why.replace("|", "/").replace("\n", " ")
        row = f"| {e.name} | {e.kind} | {e.note} | {backend} | {diff} | {why} |"
        lines.append(row)
        print(row, flush=True)
    ran = len(entries) - counts.get("skipped", 0)
    others = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "hooks")
    summary = f"{counts.get('hooks', 0)}/{ran} on the hooks backend" + (
        f"; {others}" if others else ""
    )
    print("\n" + summary)
    if args.out:
        import platform

        head = [
            "# Model coverage of the hooks backend",
            "",
            "Generated by `OMP_NUM_THREADS=1 python benchmarks/coverage.py --check --out "
            f"{args.out}` on commit {commit} (torch {torch.__version__}, Python "
            f"{platform.python_version()}, timm {_version('timm')}, torchvision "
            f"{_version('torchvision')}, transformers {_version('transformers')}).",
            "",
            "`auto runs`: the backend `VarianceTest(backend=\"auto\")` ends on for the model in "
            "training mode (float32, a batch of 3): `hooks` (exact, the fast path), or a "
            "fallback (`vmap`: exact, ~4x a forward+backward; `microbatch`: an estimate) with "
            "the reason it printed. *hooks vs vmap*: relative difference of Σᵢ‖gᵢ‖² between the "
            "hooks backend and torch.func per-sample gradients (a per-sample loop where vmap cannot "
            "run the model), float64, eval mode; 0.0e+00 means the two sums are the same "
            "double. Tiny configurations, no pretrained weights (the layer types are what "
            "matters). A model the hooks backend cannot run would show its fallback and the "
            "layer; `CRASH` would be a defect.",
            "",
            f"**{summary}**",
            "",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(head + lines) + "\n")
    if args.readme:
        out = args.out or "docs/coverage.md"
        _common.replace_block(args.readme, "coverage", readme_lines(ran_on, summary, out, commit))


if __name__ == "__main__":
    main()
