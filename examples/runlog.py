r"""A run's outputs: the per-round records, ``metrics.jsonl``, the progress bar, the summary and
the plot, owned by one :class:`RunLog`.

Every rank keeps the records (they go into its checkpoint); only rank 0 writes files and shows
the bar. :func:`plot_runs` draws one or several runs (``compare.py`` and ``paper.py`` use it too).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LABELS = {
    "val_acc": "validation accuracy (%)",
    "val_loss": "validation loss",
    "test_acc": "test accuracy (%)",
    "test_loss": "test loss",
}


class RunLog:
    r"""The records of one run, and the files and progress bar that show them.

    Args:
        out (str): the run's folder.
        name (str): the run's label (progress bar, summary, plot).
        budget (int): the sample budget (the progress bar's total).
        target (tuple): ``(key, value, higher_is_better)``: the record key and value whose first
            crossing is the run's "to target" point (value None: no target).
        records (list of dict): records inherited from a checkpoint (default: none).
        rank (int): this process's rank; only rank 0 writes (default: 0).
        progress (bool): show a tqdm bar on rank 0 (default: True).
    """

    def __init__(
        self,
        out: str,
        name: str,
        budget: int,
        target: tuple[str, float | None, bool],
        records: list[dict[str, Any]] | None = None,
        rank: int = 0,
        progress: bool = True,
    ) -> None:
        self.out = out
        self.name = name
        self.target = target
        self.records: list[dict[str, Any]] = list(records or [])
        self.writer = rank == 0
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.reached = self._to_target()["rounds_to_target"]
        self._shown = self.records[-1]["samples"] if self.records else 0
        self.bar = None
        self.budget = budget
        if self.writer:
            os.makedirs(out, exist_ok=True)
            with open(self.metrics_path, "w") as f:  # a resumed run rewrites what it inherited
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=budget,
                    initial=min(self._shown, budget),
                    unit="sample",
                    unit_scale=True,
                    desc=name,
                    dynamic_ncols=True,
                )

    def _to_target(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        key, value, higher = self.target
        return _common.rounds_to_target(
            self.records if records is None else records, value, key, higher
        )

    def add(self, rec: dict[str, Any]) -> None:
        """Append a round's record: to the list, to ``metrics.jsonl`` and to the progress bar."""
        self.records.append(rec)
        if self.reached is None:
            self.reached = self._to_target([rec])["rounds_to_target"]
        if not self.writer:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.bar is not None:
            key = self.target[0]
            v = rec.get(key)
            self.bar.set_postfix(
                {
                    "round": rec["round"],
                    "b": rec["batch_size"],
                    "loss": f"{rec['train_loss']:.3f}",
                    key: "-" if v is None else f"{v:.3g}",
                },
                refresh=False,
            )
            now = min(rec["samples"], self.budget)
            self.bar.update(now - min(self._shown, self.budget))
            self._shown = now

    @property
    def reached_target(self) -> bool:
        """Whether a record has reached the target."""
        return self.reached is not None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, **fields: Any) -> dict[str, Any]:
        """The run's summary (``fields`` first, then what the records say); written to
        ``summary.json`` on rank 0."""
        last = self.records[-1] if self.records else {}
        out = dict(fields)
        out.update(
            rounds=last.get("round", 0),
            steps=last.get("step", 0),
            samples=last.get("samples", 0),
        )
        for key in sorted({k for r in self.records for k in r if k[:4] in ("val_", "test")}):
            values = [r[key] for r in self.records if r.get(key) is not None]
            out[f"final_{key}"] = values[-1] if values else None
            if key.endswith("acc"):
                out[f"best_{key}"] = max(values, default=None)
        key, value, higher = self.target
        out.update(target_metric=key, target=value, **self._to_target())
        out.update(
            bytes_communicated=last.get("bytes_communicated", 0),
            wall_time=last.get("wall_time", 0.0),
            final_batch_size=last.get("next_batch_size", out.get("initial_batch_size")),
        )
        if self.writer:
            _common.write_json(os.path.join(self.out, "summary.json"), out)
        return out

    def plot(self, title: str = "") -> None:
        """``plot.png``: batch size and the target metric against rounds and samples."""
        if self.writer:
            plot_runs(
                {self.name: self.records},
                os.path.join(self.out, "plot.png"),
                title=title,
                metric=self.target[0],
                target=self.target[1],
            )


# ------------------------------------------------------------------------------------- plots


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in records if r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(
    runs: dict[str, list[dict[str, Any]]],
    path: str,
    title: str = "",
    metric: str = "val_acc",
    target: float | None = None,
) -> None:
    """2×2 figure: per-worker batch size and ``metric`` against rounds and against samples.

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
            xs, ys = _series(records, x, metric)
            axes[1, col].plot(xs, ys, label=label, marker="." if len(xs) < 60 else None)
    values = [r[metric] for rs in runs.values() for r in rs if r.get(metric) is not None]
    for col, xlabel in enumerate(("communication round", "samples seen (all workers)")):
        axes[0, col].set_yscale("log", base=2)
        axes[0, col].set_ylabel("per-worker batch size")
        axes[1, col].set_ylabel(LABELS.get(metric, metric))
        axes[1, col].set_xlabel(xlabel)
        if target is not None:
            axes[1, col].axhline(target, color="gray", lw=0.8, ls="--")
        if values and metric.endswith("acc"):
            top = max(values)
            axes[1, col].set_ylim(
                max(0.0, min(top - 30.0, target - 10.0 if target else 100)), 100.5
            )
        elif values:
            low = min(values)
            axes[1, col].set_ylim(low - 0.05, max(low + 1.5, (target or low) + 0.5))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
