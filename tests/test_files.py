"""Files a run writes and reads: no code runs when a model or checkpoint is loaded, one line for a bad file, and
written files get the mode the user's umask allows."""

import os
import subprocess
import sys

import pytest
import torch

from torchsal import make_config
from torchsal.errors import ConfigError
from torchsal.runfiles import load_model
from torchsal.train import Trainer


class _Planted:
    """What a malicious model file carries: unpickling it would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(make_config("sal", epochs=1, out=str(out))).fit(progress=False, checkpoint_every=5)
    return out


def test_a_planted_model_file_is_refused_without_running_anything(run_dir, tmp_path):
    marker = tmp_path / "ran"
    info = torch.load(run_dir / "model.pt", weights_only=True)
    info["classes"] = _Planted(marker)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(info, bad / "model.pt")
    res = subprocess.run([sys.executable, "-m", "torchsal", "eval", "--model", str(bad)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "could run code; refused" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not marker.exists()


def test_a_planted_checkpoint_is_refused_without_running_anything(run_dir, tmp_path):
    marker = tmp_path / "ran"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["history"] = [_Planted(marker)]
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(state, bad / "checkpoint.pt")
    with pytest.raises(ConfigError, match="could run code; refused"):
        Trainer.resume(bad)
    assert not marker.exists()


@pytest.mark.parametrize("drop", ["model", "classes", "config"])
def test_a_model_file_missing_a_field_gets_one_line(run_dir, tmp_path, drop):
    info = torch.load(run_dir / "model.pt", weights_only=True)
    del info[drop]
    torch.save(info, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=f"not a complete torchsal model file: missing {drop}"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_get_one_line(run_dir, tmp_path):
    info = torch.load(run_dir / "model.pt", weights_only=True)
    info["config"]["width"] = 32                      # the stored weights are 256 wide
    torch.save(info, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="do not fit the model"):
        load_model(tmp_path)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        Trainer(make_config("sal", epochs=1, max_steps=3, out=str(tmp_path))).fit(progress=False,
                                                                                  checkpoint_every=3)
    finally:
        os.umask(old)
    for name in ("model.pt", "checkpoint.pt", "metrics.json", "metrics.csv", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
