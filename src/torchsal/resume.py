"""What a resumed run may change: the policy behind ``torchsal train ... --resume DIR``, for any caller.

The command that started a run may be repeated with ``--resume DIR`` appended: settings equal to the saved ones are
accepted, the budget (``epochs``, ``max_steps``) may grow, where and how fast it runs may change (paths, threads,
device, compile); every setting that would change the model, the data or the rule is refused, all named at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torchsal.errors import ConfigError
from torchsal.runfiles import read_checkpoint
from torchsal.train import Trainer

# Settings a resumed run may take anew: they say where and how fast it runs, not what it is.
FREE = {"threads", "data_dir", "device", "out", "compile", "execution"}
BUDGET = ("epochs", "max_steps")


def resume_run(run_dir: str | Path, given: dict[str, Any]) -> Trainer:
    """The run in ``run_dir``, ready to continue under the settings ``given`` (flat names, as ``make_config``
    takes them, the rule included); a ConfigError names every given setting that would change what the run is, or
    shrink its budget. A finished run comes back as it is (``steps_done == total_steps``)."""
    state = read_checkpoint(run_dir)            # read once: also what the trainer resumes from
    saved = dict(state["config"])
    if "out" in given and Path(given["out"]).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"--out {given['out']} with --resume {run_dir}: a resumed run writes into its own "
                          "folder; drop --out")
    changed = [k for k, v in given.items() if k not in FREE and k not in BUDGET and saved.get(k) != v
               and not (k == "areas" and v == "auto")]            # auto was resolved to the saved number
    overrides = {k: v for k, v in given.items() if k in FREE - {"out"} or k in BUDGET}
    trainer = Trainer.resume(run_dir, overrides=overrides, state=state) if not changed else None
    shrunk = []
    if trainer is not None:
        per_epoch = math.ceil(len(trainer.y_train) / trainer.config.train.batch_size)
        saved_budget = min(saved["max_steps"] or math.inf, saved["epochs"] * per_epoch)
        shrunk = [k for k in BUDGET if k in given and trainer.total_steps < saved_budget]
    if changed or shrunk:
        parts = [f"--{k.replace('_', '-')} {given[k]} (saved: {saved.get(k)})" for k in changed + shrunk]
        raise ConfigError(f"--resume {run_dir} continues the saved run; these flags would change it: "
                          f"{', '.join(parts)}. Drop them, or start a new run with another --out"
                          + (" (the budget, --epochs and --max-steps, may only grow)" if shrunk else ""))
    return trainer
