r"""Modeled wall time of a Local SGD run on a network: from measured compute and exact bytes.

A run's records give, per round :math:`k`, the compute time :math:`C_k` of its local steps
(forward, backward, optimizer step; measured by train.py, communication excluded) and the bytes
:math:`b_k` its collectives counted (``LocalOptimizer.bytes_communicated``: the size of each
vector reduced). On a network where every rank has a link of bandwidth :math:`\beta` (full
duplex) and an average pays a latency :math:`\alpha`, a ring all-reduce (or our all-to-all +
all-gather) puts :math:`w = 2\frac{M-1}{M}` times the counted bytes on each rank's link, so the
round's communication takes

.. math::
    T^{\text{comm}}_k = n_k\,\alpha + \frac{w\, b_k}{\beta}

with :math:`n_k` averages: 1 for the parameters (an fp32 all-reduce, or a compressed all-to-all +
all-gather: both :math:`2(M-1)` message steps), plus 1 when the round also averages module
buffers or optimizer state (see :data:`EXTRA_BYTES`). Without overlap the run takes
:math:`T = \sum_k (C_k + T^{\text{comm}}_k)`. With ``overlap=True`` the part :math:`h_k` of
round :math:`k`'s communication that runs in the background (the fp32 all-reduce; with
compression the all-to-all: half the parameters' bytes and half their latency) hides behind the
next round's compute, the rest :math:`x_k` does not:

.. math::
    T = \sum_k \Big(C_k + x_k + \max(0,\ h_k - C_{k+1})\Big), \qquad C_{K+1} = 0

(the last mean is completed by the final ``sync()`` with nothing left to hide behind). Small
per-round collectives (the variance test's sums, the buffers' changed-flags, train-loss logging),
evaluation, start-up and the CPU cost of encoding are not modeled; the bytes of the flags are
counted in :math:`b_k`, their latency is not.

:func:`round_costs` turns a run's records into per-round costs; :func:`modeled_time` applies the
model; :func:`summary_fields` gives what train.py saves in ``summary.json`` (to the target and
over the budget, at :data:`NETWORKS`); :func:`walltime_table` makes the per-strategy table from
the runs' summaries (``paper.py``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

#: (bandwidth in Gbit/s, latency in s) of the networks the summaries report.
NETWORKS: tuple[tuple[float, float], ...] = (
    (1.0, 1e-3),
    (10.0, 1e-3),
    (100.0, 1e-3),
    (1.0, 50e-3),
    (0.1, 50e-3),
)


#: A round whose count exceeds its parameter mean's by more than this also averaged module
#: buffers (BatchNorm statistics) or optimizer state: one more (synchronous, fp32) collective.
#: Below it: only the "auto" buffers' changed-flags (4 bytes each), whose latency is not modeled.
EXTRA_BYTES = 1024


def network_key(gbits: float, latency: float) -> str:
    """``"1Gbps_1ms"``: the key of a network in ``summary.json``'s ``modeled_wall_time``."""
    return f"{gbits:g}Gbps_{latency * 1e3:g}ms"


@dataclass
class RoundCost:
    """One round: compute seconds, bytes counted, and which part overlap hides."""

    compute_s: float
    nbytes: int
    hidden_bytes: int = 0  # bytes whose collective runs in the background (overlap)
    collectives: float = 1.0  # latencies paid in the foreground
    hidden_collectives: float = 0.0  # latencies paid in the background


def modeled_time(costs: list[RoundCost], world: int, gbits: float, latency: float) -> float:
    """:math:`T` of the module docstring for ``world`` ranks on links of ``gbits`` Gbit/s with
    ``latency`` seconds per collective."""
    bw = gbits * 1e9 / 8.0
    wire = 2.0 * (world - 1) / world if world > 1 else 0.0
    lat = latency if world > 1 else 0.0
    total = 0.0
    for k, c in enumerate(costs):
        exposed = c.collectives * lat + wire * (c.nbytes - c.hidden_bytes) / bw
        hidden = c.hidden_collectives * lat + wire * c.hidden_bytes / bw
        nxt = costs[k + 1].compute_s if k + 1 < len(costs) else 0.0
        total += c.compute_s + exposed + max(0.0, hidden - nxt)
    return total


def round_costs(
    records: list[dict[str, Any]], param_bytes: int, compression: str | None, overlap: bool
) -> list[RoundCost]:
    """Per-round costs from train.py's records (cumulative ``compute_time`` and
    ``bytes_communicated``). ``param_bytes``: the bytes of one round's parameter mean."""
    costs, t_prev, b_prev = [], 0.0, 0
    for r in records:
        nbytes = int(r["bytes_communicated"]) - b_prev
        compute = float(r.get("compute_time", 0.0)) - t_prev
        t_prev, b_prev = float(r.get("compute_time", 0.0)), int(r["bytes_communicated"])
        mean = min(param_bytes, nbytes)
        if not overlap:
            hidden, coll, hcoll = 0, 1.0, 0.0
        elif compression is None:  # the all-reduce runs in the background
            hidden, coll, hcoll = mean, 0.0, 1.0
        else:  # the all_to_all in the background, the all_gather not: half of each
            hidden, coll, hcoll = mean // 2, 0.5, 0.5
        if nbytes - mean > EXTRA_BYTES:  # module buffers or optimizer state: one more average
            coll += 1
        costs.append(RoundCost(compute, nbytes, hidden, coll, hcoll))
    return costs


def summary_fields(
    records: list[dict[str, Any]],
    world: int,
    param_bytes: int,
    compression: str | None,
    overlap: bool,
    rounds_to_target: int | None,
) -> dict[str, Any]:
    """``modeled_wall_time``: per network, seconds to the target (None if not reached) and over
    the whole budget; plus the inputs (compute time, bytes per round, world size)."""
    costs = round_costs(records, param_bytes, compression, overlap)
    to_target = None
    if rounds_to_target is not None:
        to_target = [c for c, r in zip(costs, records) if r["round"] <= rounds_to_target]
    out: dict[str, Any] = {}
    for gbits, lat in NETWORKS:
        out[network_key(gbits, lat)] = {
            "to_target": None if to_target is None else modeled_time(to_target, world, gbits, lat),
            "budget": modeled_time(costs, world, gbits, lat),
        }
    return {
        "modeled_wall_time": out,
        "compute_time": sum(c.compute_s for c in costs),
        "compute_time_to_target": None
        if to_target is None
        else sum(c.compute_s for c in to_target),
        "param_bytes_per_round": param_bytes,
        "compression": compression,
        "overlap": overlap,
    }


def report_lines(summary: dict[str, Any]) -> list[str]:
    """Lines train.py prints: the modeled wall time per network."""
    lines = [
        f"modeled wall time (compute {summary.get('compute_time', 0.0):.1f} s, "
        f"{summary.get('rounds', 0)} rounds, {summary.get('bytes_communicated', 0) / 1e6:.2f} MB "
        f"counted, M={summary.get('world_size', 1)}):"
    ]
    for key, v in summary.get("modeled_wall_time", {}).items():
        tt = "-" if v["to_target"] is None else f"{v['to_target']:.1f} s"
        lines.append(f"  {key:>14}: to target {tt:>9}, budget {v['budget']:.1f} s")
    return lines


def walltime_table(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown table: per strategy (label -> its seeds' ``summary.json``), mean over seeds of
    the modeled wall time in seconds to the target (over the budget when there is no target) at
    each of :data:`NETWORKS`, with the rounds and compute seconds behind it (to the target) and
    the MB counted per worker over the budget. A run that missed the target is left out of the
    mean and counted as missed."""
    keys = [network_key(g, lat) for g, lat in NETWORKS]
    head = " | ".join(f"{g:g} Gbit/s, {lat * 1e3:g} ms" for g, lat in NETWORKS)
    lines = [
        f"| strategy | rounds | MB (budget) | compute s | {head} |",
        "|---" * (4 + len(keys)) + "|",
    ]

    def mean(values: list[float | None]) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "—"
        miss = len(values) - len(vals)
        return f"{statistics.mean(vals):.1f}" + (f" ({miss} missed)" if miss else "")

    for label, summaries in runs.items():
        summaries = [s for s in summaries if "modeled_wall_time" in s]
        if not summaries:
            continue
        reach = [s.get("rounds_to_target") for s in summaries]
        use_target = any(s.get("target") is not None for s in summaries)
        cells = []
        for key in keys:
            which = "to_target" if use_target else "budget"
            cells.append(mean([s["modeled_wall_time"].get(key, {}).get(which) for s in summaries]))
        rounds = (
            mean([float(r) for r in reach if r is not None])
            if use_target
            else mean([float(s.get("rounds", 0)) for s in summaries])
        )
        mb = mean([s.get("bytes_communicated", 0) / 1e6 for s in summaries])
        compute = mean([s.get("compute_time_to_target" if use_target else "compute_time")
                        for s in summaries])  # fmt: skip
        lines.append(f"| {label} | {rounds} | {mb} | {compute} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------- checking the model on this machine
def _run(flags: list[str], out: str) -> dict[str, Any]:
    """One train.py run (2 gloo ranks) with ``flags``; its summary and records."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "train.py"), "--nproc", "2", "--no-progress",
           "--out", out, *flags]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        summary["records"] = [json.loads(line) for line in f]
    return summary


def check_latency(latency_ms: float, flags: list[str], out: str) -> list[str]:
    r"""Measure the training-loop time (``step_time``: steps and rounds, no evaluation) of four
    runs, latency 0 or ``latency_ms`` injected per round (``--simulate-latency-ms``), without
    and with ``--overlap``, and compare with the model's prediction: the run's own measured
    compute per round, :math:`\beta = \infty` (loopback) and :math:`\alpha` = the injected
    latency, plus the overhead measured at latency 0 with the same overlap setting
    (``step_time - compute_time``: loopback transfers and waiting for the slower rank)."""
    import os

    rows = [
        "| overlap | injected latency | rounds | compute s | measured s | modeled s | "
        "measured - compute | modeled - compute |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base: dict[bool, float] = {}
    comm: dict[tuple[bool, float], tuple[float, float]] = {}  # measured, modeled (no base)
    for overlap in (False, True):
        for lat in (0.0, latency_ms):
            extra = ["--overlap"] if overlap else []
            name = f"{'overlap' if overlap else 'sync'}_{lat:g}ms"
            s = _run([*flags, *extra, "--simulate-latency-ms", str(lat)], os.path.join(out, name))
            costs = round_costs(s["records"], s["param_bytes_per_round"], None, overlap)
            modeled = modeled_time(costs, s["world_size"], float("inf"), lat / 1e3)
            if lat == 0.0:
                base[overlap] = s["step_time"] - s["compute_time"]
            comm[(overlap, lat)] = (s["step_time"] - s["compute_time"], modeled - s["compute_time"])
            modeled += base[overlap]
            c = s["compute_time"]
            rows.append(
                f"| {overlap} | {lat:g} ms | {s['rounds']} | {c:.1f} | {s['step_time']:.1f} | "
                f"{modeled:.1f} | {s['step_time'] - c:.2f} | {modeled - c:.2f} |"
            )
    (ms, mm), (os_, om) = comm[(False, latency_ms)], comm[(True, latency_ms)]
    rows.append("")
    rows.append(
        f"At {latency_ms:g} ms, overlap cuts the time spent in rounds by {ms - os_:.2f} s "
        f"measured, {mm - om:.2f} s modeled."
    )
    return rows


def _time_rounds(numel: int, repeats: int, out: str) -> None:
    """On each of 2 ranks: median seconds of one round (``LocalOptimizer.sync``) of a model of
    ``numel`` parameters, fp32 / bf16 / int8; rank 0 writes them and the bytes to ``out``."""
    import json

    import torch
    import torch.distributed as dist

    from local_opt import LocalOptimizer

    res = {}
    for fmt in (None, "bf16", "int8"):
        p = torch.nn.Parameter(torch.randn(numel))
        opt = LocalOptimizer(torch.optim.SGD([p], lr=0.1), sync_every=10**9, compression=fmt)
        times = []
        for _ in range(repeats + 1):
            with torch.no_grad():
                p.add_(torch.randn(numel), alpha=1e-3)
            dist.barrier()
            t0 = time.perf_counter()
            opt.sync()
            times.append(time.perf_counter() - t0)
        res[str(fmt)] = {
            "s": statistics.median(times[1:]),
            "bytes": opt.bytes_communicated // (repeats + 1),
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(res, f)


def check_bandwidth(numel: int, rate_mbit: float, repeats: int, out: str) -> list[str]:
    r"""Time one round on 2 gloo ranks, and compare with the model. Run it twice: in a network
    namespace whose loopback has no limit (``rate_mbit`` 0: the baseline, which measures the
    encoding and loopback costs) and one with ``tc qdisc add dev lo root tbf rate <R>mbit``.
    Both ranks' traffic shares the one ``lo`` queue, so each rank's link is :math:`\beta = R/2`;
    the model's prediction is the baseline time plus :math:`w\, b / \beta` (latency ~0)."""
    import json
    import os

    import launch

    path = os.path.join(out, f"rounds_{rate_mbit:g}mbit.json")
    os.makedirs(out, exist_ok=True)
    launch.launch(_time_rounds, (numel, repeats, path), 2)
    with open(path) as f:
        res = json.load(f)
    lines = [f"rate {rate_mbit:g} Mbit/s, N = {numel}: " + json.dumps(res)]
    base_path = os.path.join(out, "rounds_0mbit.json")
    if rate_mbit and os.path.exists(base_path):
        with open(base_path) as f:
            base = json.load(f)
        beta = rate_mbit * 1e6 / 8 / 2
        lines.append("| format | bytes counted | baseline s | measured s | modeled s | error |")
        lines.append("|---|---|---|---|---|---|")
        for fmt, r in res.items():
            modeled = base[fmt]["s"] + r["bytes"] / beta  # w = 2 (M-1)/M = 1 for M = 2
            lines.append(
                f"| {fmt} | {r['bytes']} | {base[fmt]['s']:.3f} | {r['s']:.3f} | {modeled:.3f} | "
                f"{(r['s'] - modeled) / modeled:+.1%} |"
            )
    return lines


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Check the wall-time model on this machine")
    p.add_argument("--latency-ms", type=float, default=200.0)
    p.add_argument("--bandwidth-mbit", type=float, default=None,
                   help="time single rounds instead (0: baseline; see check_bandwidth)")  # fmt: skip
    p.add_argument("--numel", type=int, default=2_000_000)
    p.add_argument("--out", default="runs/walltime_check")
    p.add_argument("flags", nargs="*", help="train.py flags (after --)")
    a = p.parse_args()
    if a.bandwidth_mbit is not None:
        print("\n".join(check_bandwidth(a.numel, a.bandwidth_mbit, 5, a.out)))
    else:
        print("\n".join(check_latency(a.latency_ms, a.flags, a.out)))
