"""Denormal floats are flushed to zero on every CPU thread once torchsal is imported (they slowed a
CIFAR-10 run from 31 to 238 s per epoch)."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="flush-to-zero is an x86 setting")


def test_importing_torchsal_flushes_denormals_on_every_worker_thread():
    # A fresh process, as a user's script: a multi-threaded elementwise kernel splits this tensor between
    # threads, so any thread that kept IEEE denormals would leave some of them nonzero.
    script = ("import torchsal, torch; torch.set_num_threads(2); x = torch.full((1 << 20,), 1e-40); "
              "print(int((x * 1.0).count_nonzero()), int(torch.tensor([1e-40]).mul(1.0).count_nonzero()))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "0"]


def test_without_the_flush_the_same_product_keeps_denormals():
    """The check above can fail: without torchsal's setting the product stays denormal."""
    script = "import torch; x = torch.full((1 << 20,), 1e-40); print(int((x * 1.0).count_nonzero()))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert int(out) == 1 << 20
