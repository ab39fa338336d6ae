"""Print the ratios that the benchmarks recorded (``make bench`` calls this on its JSON)."""

from __future__ import annotations

import json
import sys


def rows(data: dict) -> list[tuple[str, str, str]]:
    out = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        for key, value in info.items():
            if key.endswith(("_new_s", "_base_s", "_goal")) or key == "goal":
                continue
            if key == "ratio" or key.endswith("_ratio"):
                name = bench["name"] if key == "ratio" else key[: -len("_ratio")]
                goal = info.get(f"{name}_goal", info.get("goal"))
                out.append((name, f"{value:.3f}x", "" if goal is None else f"<= {goal}x"))
            else:
                out.append((key, f"{value:.4g}" if isinstance(value, float) else str(value), ""))
    return out


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    print("\n| measurement | value | goal |\n|---|---:|---:|")
    for name, value, goal in rows(data):
        print(f"| {name} | {value} | {goal} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench.json")
