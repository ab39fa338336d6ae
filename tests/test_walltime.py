"""examples/walltime.py: the wall-time model against its closed forms, and the table."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import walltime  # noqa: E402


def test_without_overlap_compute_plus_rounds_times_latency_plus_bytes_over_bandwidth():
    costs = [walltime.RoundCost(0.5, 10**9)] * 4  # 1 GB counted per round
    # M = 2: the wire carries 2 (M-1)/M = 1x the count; 1 GB at 10 Gbit/s = 0.8 s
    t = walltime.modeled_time(costs, 2, 10.0, 0.05)
    assert t == pytest.approx(4 * (0.5 + 0.05 + 0.8))
    # M = 4: 1.5x on the wire
    assert walltime.modeled_time(costs, 4, 10.0, 0.0) == pytest.approx(4 * (0.5 + 1.2))
    assert walltime.modeled_time(costs, 1, 10.0, 0.05) == pytest.approx(2.0)  # no network


def test_overlap_hides_communication_behind_the_next_rounds_compute():
    records = [
        {"round": k + 1, "compute_time": 0.5 * (k + 1), "bytes_communicated": 1000 * (k + 1)}
        for k in range(4)
    ]
    sync = walltime.round_costs(records, 1000, None, overlap=False)
    over = walltime.round_costs(records, 1000, None, overlap=True)
    # latency 0.3 s < compute 0.5 s per round: hidden except behind the last round
    assert walltime.modeled_time(sync, 2, float("inf"), 0.3) == pytest.approx(2.0 + 4 * 0.3)
    assert walltime.modeled_time(over, 2, float("inf"), 0.3) == pytest.approx(2.0 + 0.3)
    # latency 0.8 s > compute: each round costs max(compute, communication)
    assert walltime.modeled_time(over, 2, float("inf"), 0.8) == pytest.approx(0.5 + 3 * 0.8 + 0.8)
    # compressed: the all-gather half (and its latency) stays in the foreground
    comp = walltime.round_costs(records, 1000, "int8", overlap=True)
    assert [(c.hidden_bytes, c.collectives, c.hidden_collectives) for c in comp][0] == (500, 0.5, 0.5)


def test_summary_fields_and_table():
    records = [
        {"round": k + 1, "compute_time": 1.0 * (k + 1), "bytes_communicated": 125_000_000 * (k + 1)}
        for k in range(3)
    ]
    f = walltime.summary_fields(records, 2, 125_000_000, None, False, rounds_to_target=2)
    v = f["modeled_wall_time"]["1Gbps_1ms"]
    assert v["budget"] == pytest.approx(3 * (1.0 + 0.001 + 1.0))
    assert v["to_target"] == pytest.approx(2 * (1.0 + 0.001 + 1.0))
    summary = dict(f, rounds=3, rounds_to_target=2, target=97.0, bytes_communicated=375e6)
    lines = walltime.walltime_table({"fp32": [summary, summary]})
    assert lines[0].startswith("| strategy |") and "1 Gbit/s, 50 ms" in lines[0]
    assert lines[2].startswith("| fp32 | 2.0 | 375.0 | 2.0 | 4.0 |")


@pytest.mark.timeout(400)
def test_train_py_int8_overlap_run_reports_the_modeled_wall_time(tmp_path):
    """A tiny 2-rank train.py run with --compression int8 --overlap: bytes per round are the
    int8 mean of the parameters plus the fp32 BatchNorm statistics and flags, compute time is
    recorded, the models agree at the end, and summary.json holds the modeled wall time."""
    import json
    import subprocess

    import torch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path)
    argv = ["--nproc", "2", "--strategy", "constant", "--batch-size", "8", "--sync-every", "2",
            "--max-rounds", "4", "--no-progress", "--compression", "int8", "--overlap",
            "--out", out]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "train.py"), *argv],
        capture_output=True, text=True, timeout=300, cwd=root,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modeled wall time" in proc.stdout
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert s["compression"] == "int8" and s["overlap"] is True
    assert set(s["modeled_wall_time"]) == {walltime.network_key(g, a) for g, a in walltime.NETWORKS}
    assert 0 < s["compute_time"] <= s["step_time"]
    assert all(r["compute_time"] > 0 for r in records)
    state = torch.load(os.path.join(out, "model_final.pt"))
    n = sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    from local_opt._compress import mean_nbytes

    assert s["param_bytes_per_round"] == mean_nbytes(n, 2, "int8")
    per_round = [
        b["bytes_communicated"] - a["bytes_communicated"] for a, b in zip(records, records[1:])
    ]
    assert all(p > s["param_bytes_per_round"] for p in per_round)  # + fp32 BatchNorm buffers
    assert all(p < s["param_bytes_per_round"] * 1.1 for p in per_round)
