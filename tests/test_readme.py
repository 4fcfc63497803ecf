"""The README's Python blocks run as pasted in a fresh interpreter: the pieces example alone, ending with an
evaluation, and the fast loop after it."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_pieces_example_runs_alone_and_evaluates(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[1]
    assert "evaluate" in example
    res = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    accuracy = float(res.stdout.strip().split()[-1])
    assert accuracy > 0.85


def test_the_fast_loop_continues_the_pieces_example_and_names_its_path(tmp_path):
    """The third block, pasted after the second, trains on along the fast path the trainer would take."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[1] + blocks[2] + "\nprint(fast.describe())\n"
    res = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "fast (closed form, updates in backward)"
