"""examples/quickstart.py as a new user runs it: one process, and torchrun with 2 workers (the
ranks must end with the same model), and the README's quick-start block is the file's code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "examples" / "quickstart.py"
LINE = re.compile(r"rank (\d+): rounds (\d+), batch size (\d+), test accuracy ([\d.]+), "
                  r"checksum (-?[\d.]+)")


def run(args: list[str], timeout: float) -> list[tuple[int, int, int, float, str]]:
    # PYTHONUNBUFFERED as CI machines often set it: print() then writes its text and its newline
    # separately, so two ranks' lines can share one line of the captured output.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stderr, done.stderr  # a clean run: nothing to warn about
    found = LINE.finditer(done.stdout)  # not line by line: the ranks' writes may interleave
    return sorted((int(m[1]), int(m[2]), int(m[3]), float(m[4]), m[5]) for m in found)


def test_readme_shows_the_quickstart_code():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Its core.*?```python\n(.*?)```", readme, re.S)
    assert block is not None, "the quick start block is missing from README.md"
    assert block.group(1) in SCRIPT.read_text()
    assert "init_process_group" in block.group(1)


@pytest.mark.timeout(300)
def test_quickstart_in_one_process():
    (rank, rounds, batch_size, accuracy, _), = run([str(SCRIPT)], timeout=280)
    assert rank == 0 and rounds > 20
    assert batch_size > 16  # the variance test grew the batch
    assert accuracy > 0.9


@pytest.mark.timeout(400)
def test_quickstart_under_torchrun_with_two_workers():
    lines = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(SCRIPT)], timeout=380)
    assert [r[0] for r in lines] == [0, 1]
    (_, rounds0, b0, acc0, sum0), (_, rounds1, b1, acc1, sum1) = lines
    assert (rounds0, b0, acc0, sum0) == (rounds1, b1, acc1, sum1)  # one synchronized run
    assert b0 > 16 and acc0 > 0.9
