"""The benchmark scripts still import and parse against the library as it is, and the A/B harness compares two
trees: a change to a public name a benchmark uses fails here, not months later in a long study."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"study.py"}          # imported by the studies, not run


def test_every_benchmark_script_starts_and_explains_itself():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for p in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err.strip().splitlines()[-1:]}"
        assert out.startswith("usage:"), name


def test_the_ab_harness_times_one_tree_against_itself(tmp_path):
    """Both workers import this tree: the harness runs end to end and its ratio is a plain number near 1."""
    src = Path(__file__).resolve().parents[1] / "src"
    res = subprocess.run([sys.executable, str(BENCHMARKS / "ab.py"), "--old", str(src), "--regimes", "paper",
                          "--variants", "sal", "--rounds", "3", "--threads", "1", "--out", str(tmp_path / "ab.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads((tmp_path / "ab.json").read_text())["rows"]
    assert (row["regime"], row["variant"], row["rounds"]) == ("paper", "sal", 3)
    assert 0.2 < row["new_over_old"] < 5 and row["old_ms"] > 0 and row["new_ms"] > 0
