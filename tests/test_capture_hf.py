"""The in-step statistics (:class:`StatsCapture`, ``VarianceTest.capture``) on a model's *first*
hooks pass, for models with covered layers run off the batch (GPT-2's ``wpe`` on position ids of
shape ``(1, T)``, nanoGPT's ``wpe(arange(T))``, BERT's position embedding), against a float64
per-sample autograd loop. No separate pass (``suggest``, ``hooks_grad_stats``) runs before the
capture: the capture itself must find those layers. Hugging Face models from tiny configs (no
weights); dropout 0, so train and eval mode have the same per-sample gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_hooks_coverage import flat, randomize, rel
from test_hooks_models import Logits
from torch import nn

from local_opt import StatsCapture, VarianceTest
from local_opt.backends.hooks import unsupported_layers

TOL = 1e-8
MODES = pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
VOCAB = 40


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def cls_loss(out, y):
    return F.cross_entropy(out, y)


def _hf(kind: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=1, **common))
    cfg = tf.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                        **common)
    return tf.BertForSequenceClassification(cfg)


class NanoGPT(nn.Module):
    """nanoGPT's embedding, ``wpe(arange(T))``: one-dimensional positions broadcast on the batch;
    with ``bare``, also a parameter of shape ``(1, 1, d)`` broadcast on it."""

    def __init__(self, vocab=VOCAB, dim=16, context=16, bare=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.gain = nn.Parameter(torch.ones(1, 1, dim)) if bare else None
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        if self.gain is not None:
            x = x * self.gain
        return self.head(self.ln(x + torch.tanh(self.fc(x))))


def _tokens(n=3, t=7, lm=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    y = torch.randint(0, VOCAB, (n, t), generator=g) if lm else torch.randint(0, 3, (n,), generator=g)
    return ids, y


def _positional(loss_fn):
    return lambda model, x, y: loss_fn(model(x), y)


def _gpt2_labels(model, x, y):  # keyword arguments only; the model's own (shifted) loss
    return model(input_ids=x, labels=x).loss


CASES = {  # name: (model, the step's loss, language model, tolerance)
    "gpt2": (lambda: Logits(_hf("gpt2")), _positional(lm_loss), True, TOL),
    "gpt2_positional": (
        lambda: _hf("gpt2"), lambda model, x, y: lm_loss(model(x).logits, y), True, TOL
    ),
    # the model's own loss casts the logits to float32: the reference itself is float32 there
    "gpt2_keywords": (lambda: _hf("gpt2"), _gpt2_labels, True, 1e-6),
    # Llama's rotary embedding computes cos/sin in float32 even in a float64 model: a plain
    # batch step and the per-sample loop already differ by 5e-8 relative
    "llama": (lambda: Logits(_hf("llama")), _positional(lm_loss), True, 1e-6),
    "bert": (lambda: Logits(_hf("bert")), _positional(cls_loss), False, TOL),
    "nanogpt": (lambda: NanoGPT(), _positional(lm_loss), True, TOL),
    "nanogpt_bare_keywords": (
        lambda: NanoGPT(bare=True), lambda model, x, y: lm_loss(model(ids=x), y), True, TOL
    ),
}


def loop(model: nn.Module, step, x, y) -> torch.Tensor:
    """Per-sample gradients ``(N, P)``: one forward and backward of ``step`` per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(step(model, x[i : i + 1], y[i : i + 1]), params, allow_unused=True)
        rows.append(flat(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)))
    return torch.stack(rows)


@MODES
@pytest.mark.parametrize("name", list(CASES))
def test_first_capture_matches_loop(name, train):
    make, step, lm, tol = CASES[name]
    model = randomize(make().double(), 0.02).train(train)
    assert unsupported_layers(model) == []
    x, y = _tokens(lm=lm)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    with StatsCapture(model) as cap:  # the model's first hooks pass
        step(model, x, y).backward()
    got = cap.grad_stats()
    grads = flat(p.grad for p in params)

    ref = loop(model, step, x, y)
    ref_sum = ref.sum(0)
    assert rel(grads, ref_sum / x.shape[0]) <= tol  # the step's gradient is unchanged
    assert rel(flat(got.grad_sum) * got.sum_scale, ref_sum) <= tol
    assert rel(got.sq_norm_sum, (ref * ref).sum()) <= tol  # Σ_i ‖g_i‖²
    total = flat(got.grad_sum) * got.sum_scale
    assert rel(total @ total, ref_sum @ ref_sum) <= tol  # ‖Σ_i g_i‖²
    assert rel(got.inner_sq_sum(v), ((ref @ flat(v)) ** 2).sum()) <= tol


def _paper_norm_size(ref: torch.Tensor, batch_size: int, eta: float, cap: int) -> tuple[float, int]:
    """The norm test's ``b'`` and suggestion (``policy="paper"``) from per-sample gradients."""
    n = ref.shape[0]
    mean = ref.mean(0)
    var = float(((ref - mean) ** 2).sum()) / (n - 1)
    raw = var / (eta**2 * float(mean @ mean))
    return raw, min(cap, max(batch_size, math.ceil(raw)))


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_variance_test_capture_gpt2_first_step(train, dtype):
    """``VarianceTest.capture`` on a fresh GPT-2 (the issue's config): the statistics and the
    suggested batch size of the norm test against the per-sample loop (float32: to 1e-4)."""
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = Logits(tf.GPT2LMHeadModel(cfg)).to(dtype).train(train)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 17), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    b, eta, cap = 4, 0.2, 10**6
    vt = VarianceTest(model, lm_loss, test="norm", eta=eta, policy="paper", max_batch_size=cap)
    with vt.capture() as c:
        lm_loss(model(x), y).backward()
    got = vt.suggest_from_capture(c, b)
    ref = loop(model.double(), _positional(lm_loss), x, y)
    raw, want = _paper_norm_size(ref, b, eta, cap)
    tol = TOL if dtype == torch.float64 else 1e-4
    assert vt.last_stats["backend"] == "hooks_capture"
    assert vt.last_stats["sq_norm_sum"] == pytest.approx(float((ref * ref).sum()), rel=tol)
    assert vt.last_stats["raw_norm"] == pytest.approx(raw, rel=tol)
    assert want > b and abs(raw - round(raw)) > 1e-3 * raw  # a real suggestion, not at a tie
    assert got == want


@pytest.mark.parametrize("inner", [False, True], ids=["norm", "inner"])
def test_gpt2_conv1d_weight_gradient_from_the_rule(inner):
    """GPT-2's ``Conv1D`` projections run through the inline autograd function (their weight
    gradient is the rule's sum, not computed a second time by autograd), and the step's
    gradients and statistics equal the per-sample loop's."""
    make, step, _, _ = CASES["gpt2"]
    model = randomize(make().double(), 0.02).train()
    x, y = _tokens()
    params = [p for p in model.parameters() if p.requires_grad]
    fns = []
    handles = [
        m.register_forward_hook(
            lambda m, i, o: fns.append(type(o.grad_fn).__name__) if o.requires_grad else None
        )
        for m in model.modules() if type(m).__name__ == "Conv1D"
    ]
    with StatsCapture(model, inner_products=inner) as cap:
        step(model, x, y).backward()
    for h in handles:
        h.remove()
    # the training forward's 4 Conv1D calls per block (the capture's probes run without grad)
    assert len(fns) == 8 and set(fns) == {"_AffineBackward"}, fns
    got = cap.grad_stats()
    ref = loop(model, step, x, y)
    assert rel(flat(p.grad for p in params), ref.sum(0) / x.shape[0]) <= TOL
    assert rel(got.sq_norm_sum, (ref * ref).sum()) <= TOL
