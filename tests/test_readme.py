"""The README's second Python block runs as pasted, alone, in a fresh interpreter, and ends with an evaluation."""

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
