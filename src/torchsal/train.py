"""A run: ``Trainer`` builds the model, rule and optimizer from a ``RunConfig`` and loops over the data. Each step
is the rule's step as the run's execution forms it (torchsal.execution: the reference path, or the fast path's
parts that fit the run, chosen once), then ``optimizer.step()``. Checkpoints hold everything a bit-identical resume
needs; metrics are returned and, with ``out`` set, written to ``out/metrics.json``."""

from __future__ import annotations

import io
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchsal import distributed, execution, optim
from torchsal.config import RunConfig, TrainConfig, make_config, resolve_areas
from torchsal.continual_methods import ContinualMethod
from torchsal.data import Splits, crop_flip, load_dataset, make_splits
from torchsal.diagnostics import alignment, area_statistics, interference
from torchsal.dispatch import release_gradients
from torchsal.errors import ConfigError, DivergenceError, RunInterrupted
from torchsal.evaluation import area_shares, evaluate, parameter_counts, route_all
from torchsal.models import BlockNet, build_model, check_sizes
from torchsal.rules import LearningRule, StepOutput, build_rule
from torchsal.runfiles import CHECKPOINT, MODEL, environment, read_checkpoint, save_model, write_history_csv
from torchsal.signals import StopRequests
from torchsal.storage import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

LIVE_LOSS_EVERY = 20            # steps between live-loss updates of the progress bar (each reads the device once)
PROBE = 512                    # samples of the fixed batch on which --diagnostics measures alignment


@dataclass
class TrainResult:
    model: BlockNet
    rule: LearningRule
    metrics: dict[str, Any]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim's update on the touched areas only (``torchsal.optim``), fused kernels: fusing made the step
    30-40% faster on CPU (SGD and Adam, batch 16, 16 areas), and fused Adam moves its bytes 7x faster than the
    default foreach one (docs/performance.md)."""
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    cls = optim.Adam if cfg.optimizer == "adam" else optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: constant, or cosine from lr to 0 over the run."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))






class Trainer:
    """One run: model, rule, optimizer, schedule and loop position. ``state_dict()`` holds everything needed to
    continue bit-identically (weights, optimizer and scheduler state, RNG states, the current epoch's shuffle
    and the position in it), so a run killed at any step resumes as if it had never stopped.

    Usage::

        trainer = Trainer(make_config("sal", out="runs/a"))
        result = trainer.fit(checkpoint_every=500)          # writes runs/a/checkpoint.pt atomically
        ...
        trainer = Trainer.resume("runs/a")                   # after a crash
        result = trainer.fit(checkpoint_every=500)
    """

    def __init__(self, config: RunConfig, splits: Splits | None = None,
                 method: ContinualMethod | None = None) -> None:
        cfg = config.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device} requested but CUDA is not available; use --device cpu")
        self.ctx = distributed.current()
        self.config, self.device = config, distributed.device_for(cfg.device, self.ctx)
        torch.manual_seed(cfg.seed)
        if splits is None:
            splits = make_splits(load_dataset(cfg.dataset, cfg.data_dir, cfg.grayscale), cfg.seed)
        self.splits = splits
        resolved = resolve_areas(config, len(splits.y_train))
        if resolved is not config:
            log.info("areas auto: %d areas for %d training samples", resolved.model.routing_config.areas,
                     len(splits.y_train))
            self.config = config = resolved
        check_sizes(config, splits)
        if cfg.augment != "none" and splits.image_shape is None:
            raise ConfigError(f"--augment {cfg.augment} transforms images, and {cfg.dataset} is not an image dataset; "
                              "drop --augment")
        self.model = build_model(splits.in_features, splits.num_classes, config.model, cfg.seed,
                                 self._owned_areas(), splits.image_shape).to(self.device)
        self.rule = build_rule(self.model, config.rule, cfg.seed).to(self.device)
        self.x_train, self.y_train = splits.x_train.to(self.device), splits.y_train.to(self.device)
        steps_per_epoch = math.ceil(len(self.y_train) / cfg.batch_size)
        self.total_steps = int(min(cfg.max_steps or math.inf, cfg.epochs * steps_per_epoch))
        # the model's parameters, then the rule's own (learned local heads: trained, saved, not used at inference)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad]
                                        + list(self.rule.parameters()), cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.augment_rng = torch.Generator().manual_seed(cfg.seed + 7)    # crops and flips (--augment)
        # Loop position: the epoch being trained (1-based), its shuffle, the next batch in it, running sums.
        self.epoch, self.batch, self.steps_done = 1, 0, 0
        self.order: Tensor | None = None
        self.sums: dict[str, Any] = {"loss": 0.0, "correct": 0, "seen": 0, "steps": 0}
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.first_bad_step = torch.tensor(-1, device=self.device)     # (GPU) first step with a non-finite loss
        self.checkpoint_every: int | None = None
        self.epoch_lines = False
        self.method = method            # continual learning; sets the run's execution (``execution``)

    @property
    def method(self) -> ContinualMethod | None:
        """The run's continual-learning method (torchsal.continual_methods), or None."""
        return self._method

    @method.setter
    def method(self, method: ContinualMethod | None) -> None:
        """Setting it (before ``fit``) chooses the run's execution anew: the reference path, or the fast path's
        parts that fit the run and the method (torchsal.execution)."""
        self._method, cfg = method, self.config.train
        self.execution = execution.choose(
            self.rule, self.model, reference=cfg.execution == "reference",
            mixed_precision=cfg.precision == "bf16-mixed", one_process=self.ctx.world == 1,
            grad_protocol=method is not None, output_term=method is not None and method.adds_output_term,
            compile_=cfg.compile)
        log.info("execution: %s", self.execution.describe())

    def _owned_areas(self) -> range | None:
        """Under ``--parallel area`` the block of areas this process holds; None (all) otherwise."""
        cfg, areas = self.config.train, self.config.model.routing_config.areas
        if cfg.parallel != "area":
            return None
        if areas < 2 or areas % self.ctx.world:
            raise ConfigError(f"--parallel area shards the areas over the processes: --areas ({areas}) must be > 1 "
                              f"and divisible by the number of processes ({self.ctx.world})")
        if cfg.diagnostics:
            raise ConfigError("--diagnostics is not available with --parallel area yet; use --parallel data")
        return distributed.owned_areas(areas, self.ctx)

    def next_task(self, splits: Splits) -> None:
        """Continue training the same model, rule and optimizer (state kept) on new data for another
        ``epochs`` (continual learning). The step count runs on; each task's epochs restart at 1."""
        if splits.in_features != self.splits.in_features or splits.num_classes != self.splits.num_classes:
            raise ConfigError("every task must have the model's input size and classes")
        self.splits = splits
        self.x_train, self.y_train = splits.x_train.to(self.device), splits.y_train.to(self.device)
        cfg = self.config.train
        self.total_steps = self.steps_done + cfg.epochs * math.ceil(len(self.y_train) / cfg.batch_size)
        self.epoch, self.batch, self.order = 1, 0, None

    @property
    def total_epochs(self) -> int:
        """Epochs of the budget (the one ``--max-steps`` ends in, if that comes first)."""
        return math.ceil(self.total_steps / math.ceil(len(self.y_train) / self.config.train.batch_size))

    @property
    def out(self) -> Path | None:
        """Where this process writes: the run folder on rank 0, nowhere on the other ranks."""
        return Path(self.config.train.out) if self.config.train.out and self.ctx.is_main else None

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.model.state_dict(), "rule": self.rule.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "shuffle": self.shuffle.get_state(), "augment_rng": self.augment_rng.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": self.epoch, "batch": self.batch, "step": self.steps_done, "order": self.order,
                "sums": dict(self.sums), "history": list(self.history), "elapsed": self.elapsed,
                "checkpoint_every": self.checkpoint_every}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.rule.load_state_dict(state["rule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.shuffle.set_state(state["shuffle"])
        if "augment_rng" in state:                  # (checkpoints written before --augment lack it)
            self.augment_rng.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.batch, self.steps_done = state["epoch"], state["batch"], state["step"]
        self.order = None if state["order"] is None else state["order"].to(self.device)
        self.sums, self.history, self.elapsed = dict(state["sums"]), list(state["history"]), state["elapsed"]
        self.checkpoint_every = state.get("checkpoint_every")

    def save_checkpoint(self) -> Path:
        """Write ``out/checkpoint.pt`` atomically; never over a good checkpoint with non-finite weights."""
        self._check_finite()
        path = self.out / CHECKPOINT
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        write_bytes_atomic(path, buffer.getvalue())
        return path

    @classmethod
    def resume(cls, run_dir: str | Path, splits: Splits | None = None, overrides: dict[str, Any] | None = None,
               state: dict[str, Any] | None = None) -> Trainer:
        """Continue the run whose checkpoint is in ``run_dir``, with the configuration saved in it; ``overrides``
        may extend the budget (``epochs``, ``max_steps``) or say where the data is and how to run (``data_dir``,
        ``threads``, ``device``). ``state``: the checkpoint, when the caller has read it already."""
        state = read_checkpoint(run_dir) if state is None else state
        saved = dict(state["config"])
        settings = {**saved, **(overrides or {}), "out": str(run_dir)}
        trainer = cls(make_config(settings.pop("rule"), **settings), splits)
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise ConfigError(f"--resume {run_dir}: {CHECKPOINT} does not fit the run its config describes (written "
                              f"by another torchsal version?): {first}") from None
        return trainer

    # ---------------------------------------------------------------------------------------------- the loop
    def fit(self, progress: bool = True, checkpoint_every: int | None = None) -> TrainResult:
        """Train to the end of the budget; with ``checkpoint_every`` (steps) keep ``out/checkpoint.pt`` current."""
        cfg, rule_name = self.config.train, self.config.rule.rule
        if checkpoint_every and not self.config.train.out:
            raise ConfigError("--checkpoint-every needs --out DIR to write checkpoints into")
        if checkpoint_every and cfg.parallel == "area":
            raise ConfigError("--checkpoint-every is not available with --parallel area yet (each process holds "
                              "only its areas); use --parallel data for resumable runs")
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", self.config.to_dict())
        if checkpoint_every:
            self.checkpoint_every = checkpoint_every        # saved with the run, used again on resume
        start = time.perf_counter() - self.elapsed
        # A bar on a terminal (epoch, step, live loss); elsewhere (a log file, a pipe) one line per epoch.
        interactive = progress and self.ctx.is_main and sys.stderr.isatty()
        self.epoch_lines = progress and self.ctx.is_main and not interactive
        bar = tqdm(total=self.total_steps, initial=self.steps_done, desc=f"{rule_name} {cfg.dataset}", unit="step",
                   disable=not interactive, leave=False, dynamic_ncols=True)
        self.model.train()
        with StopRequests(enabled=bool(self.out) and self.ctx.world == 1) as stop:
            self._loop(start, bar, stop, checkpoint_every)
        bar.close()
        self.elapsed = time.perf_counter() - start
        self._check_finite()
        metrics = self.metrics()
        # Area parallel: every process sends its areas to rank 0, which writes one ordinary (unsharded) model.
        state = distributed.gather_state_dict(self.model) if cfg.parallel == "area" else None
        if self.out:
            if checkpoint_every:
                self.save_checkpoint()
            write_json_atomic(self.out / "metrics.json", metrics)
            save_model(self.out / MODEL, self.model, self.config, self.splits, state)
        return TrainResult(self.model, self.rule, metrics)

    def _loop(self, start: float, bar: tqdm, stop: StopRequests, checkpoint_every: int | None) -> None:
        cfg = self.config.train
        while self.steps_done < self.total_steps:
            if self.order is None:
                self.order = torch.randperm(len(self.y_train), generator=self.shuffle).to(self.device)
            batches = self.order.split(cfg.batch_size)
            bar.set_description(f"{self.config.rule.rule} {cfg.dataset} epoch {self.epoch}/{self.total_epochs}",
                                refresh=False)
            while self.batch < len(batches) and self.steps_done < self.total_steps:
                self.train_step(batches[self.batch])
                self.batch += 1
                self.steps_done += 1
                bar.update()
                if not bar.disable and self.steps_done % LIVE_LOSS_EVERY == 0:   # one host read per so many steps
                    bar.set_postfix(loss=f"{float(self.sums['loss']) / max(self.sums['seen'], 1):.3f}",
                                    refresh=False)
                if stop.requested:            # Ctrl-C or SIGTERM: the step is done; keep it and say how to go on
                    self.elapsed = time.perf_counter() - start
                    bar.close()
                    raise RunInterrupted(str(self.save_checkpoint()), self.steps_done)
                if checkpoint_every and self.steps_done % checkpoint_every == 0 and self.out:
                    self.elapsed = time.perf_counter() - start
                    self.save_checkpoint()
            self._end_epoch(start)
            last = self.history[-1]
            bar.set_postfix(val=f"{last['val_accuracy']:.3f}", loss=f"{last['train_loss']:.3f}")
            if self.epoch_lines:
                log.info("%s %s epoch %d/%d, step %d/%d: train loss %.4f, train accuracy %.4f, val accuracy %.4f "
                         "(%.1f s)", self.config.rule.rule, cfg.dataset, last["epoch"], self.total_epochs,
                         last["step"], self.total_steps, last["train_loss"], last["train_accuracy"],
                         last["val_accuracy"], last["seconds"])

    def train_step(self, batch: Tensor) -> None:
        """The step on the training rows ``batch`` (indices): this process's share, augmented, then ``step``."""
        local = distributed.shard(batch, self.ctx)     # this rank's share of the global batch
        x, y = self.x_train[local], self.y_train[local]
        if self.config.train.augment == "crop-flip":
            x = crop_flip(x, self.splits.image_shape, self.augment_rng)
        self.step(x, y, global_batch=len(batch))

    def step(self, x: Tensor, y: Tensor, global_batch: int | None = None) -> StepOutput:
        """One update on the batch ``(x, y)`` (on the model's device): the rule's step, the optimizer's and the
        schedule's, as the loop runs it; what every benchmark times. Under data parallelism ``(x, y)`` is this
        process's share of a batch of ``global_batch`` rows. A continual method joins its replayed samples and
        adds its terms here."""
        rows = len(x)
        if self.method is not None:                    # continual learning: replay joins stored samples
            x, y = self.method.batch(x, y)
        # .grad None, not zero: untouched areas stay untouched. The optimizer's list, not model.parameters(): walking
        # the module tree took 2-3% of a 128-layer step.
        release_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        term = None if self.method is None else self.method.output_term(x)
        full_batch = (global_batch or rows) == self.config.train.batch_size and len(x) == rows
        with self._autocast():
            # the rule's forward pass and update at once, as the run's execution forms them; a non-finite loss
            # stops the run before the update
            out = self.execution.step(self.rule, self.model, self.optimizer, x, y,
                                      before_update=lambda out: self._check_loss(out.loss, x), output_term=term,
                                      full_batch=full_batch)
        distributed.sync_gradients(self.model, rows, global_batch or rows, self.rule.parameters())
        if self.method is not None:                    # EWC, SI: a per-parameter term added to the update
            self.method.penalize(self.model)
        self.optimizer.step()
        if self.method is not None:
            self.method.after_step(self.model)
        self.scheduler.step()
        # Running sums stay on the device (read once per epoch): no host round trip per step on a GPU.
        self.sums["loss"] = self.sums["loss"] + out.task_loss * len(y)
        self.sums["correct"] = self.sums["correct"] + (out.logits.argmax(1) == y).sum()
        self.sums["seen"] += len(y)
        self.sums["steps"] += 1
        for key in ("activation_rms", "signal_rms"):      # per-layer diagnostics, averaged over the epoch
            value = getattr(out, key)
            if value is not None:
                self.sums[key] = value if self.sums.get(key) is None else self.sums[key] + value
        return out

    def _check_loss(self, loss: Tensor, x: Tensor) -> None:
        """Stop at a non-finite loss. On CPU at once; on a GPU the first bad step is recorded on the device and
        reported at the next epoch end or checkpoint (checking every step would stall the stream)."""
        if self.device.type == "cpu":
            if not math.isfinite(loss.item()):          # a host read, where torch.isfinite is two kernels
                raise self._diverged(self._first_non_finite(x) or f"loss became {loss.item()}")
            return
        bad = ~torch.isfinite(loss)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), self.steps_done + 1, self.first_bad_step)

    def _raise_if_diverged(self) -> None:
        if self.device.type != "cpu" and int(self.first_bad_step) >= 0:
            raise self._diverged("the loss became non-finite", step=int(self.first_bad_step))

    def _autocast(self) -> torch.autocast:
        """``--precision bf16-mixed``: forward and signals in bfloat16, float32 weights (the backward follows)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.config.train.precision == "bf16-mixed")

    @torch.no_grad()
    def _first_non_finite(self, x: Tensor) -> str | None:
        """Name where NaN/Inf first appears: a weight tensor, else the first layer whose output is non-finite."""
        bad = self._non_finite_weight()
        if bad:
            return f"non-finite weights in {bad}"
        trace = self.model.trace(x)
        outputs = [*trace.hidden, trace.logits]
        layer = next((i for i, h in enumerate(outputs) if not torch.isfinite(h).all()), None)
        return None if layer is None else f"non-finite activations out of layer {layer} (of {len(outputs)})"

    def _non_finite_weight(self) -> str | None:
        return next((name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()), None)

    def _check_finite(self) -> None:
        """Never save or report non-finite weights; name the first tensor that went bad."""
        self._raise_if_diverged()
        bad = self._non_finite_weight()
        if bad:
            raise self._diverged(f"non-finite weights in {bad}")

    def _diverged(self, what: str, step: int | None = None) -> DivergenceError:
        """The error for a run gone non-finite at ``step`` (default: the step being taken)."""
        kept = self.out and (self.out / CHECKPOINT).is_file()
        return DivergenceError(
            f"rule {self.config.rule.rule}: {what} at step {step or self.steps_done + 1} (epoch {self.epoch}); "
            f"lower --lr (now {self.config.train.lr}) or use --schedule cosine"
            + (f"; the last good checkpoint is kept in {self.out / CHECKPOINT}" if kept else ""))

    def _end_epoch(self, start: float) -> None:
        self._raise_if_diverged()
        s, d = self.sums, self.device
        loss, correct, seen = distributed.all_reduce_sums([float(s["loss"]), float(s["correct"]), s["seen"]])
        self.history.append({
            "epoch": self.epoch, "step": self.steps_done, "train_loss": loss / seen, "train_accuracy": correct / seen,
            "val_accuracy": evaluate(self.model, self.splits.x_val.to(d), self.splits.y_val.to(d)),
            "test_accuracy": evaluate(self.model, self.splits.x_test.to(d), self.splits.y_test.to(d)),
            "seconds": time.perf_counter() - start,
            **{key: (s[key] / s["steps"]).tolist() for key in ("activation_rms", "signal_rms") if key in s}})
        self.epoch, self.batch, self.order = self.epoch + 1, 0, None
        self.sums = {"loss": 0.0, "correct": 0, "seen": 0, "steps": 0, "areas": self.sums.get("areas")}
        if self.config.train.diagnostics:
            self.history[-1]["diagnostics"] = self._diagnostics()
        if self.out:
            write_history_csv(self.out / "metrics.csv", self.history)
        if self.config.train.tensorboard:
            self._log_tensorboard(self.history[-1])

    def _diagnostics(self) -> dict[str, Any]:
        """Alignment and interference per layer on a fixed probe batch; area statistics on the training split."""
        probe_x, probe_y = self.x_train[:PROBE], self.y_train[:PROBE]
        areas = route_all(self.model, self.x_train)
        previous = self.sums.get("areas") or [None] * len(areas)
        self.sums["areas"] = areas          # kept across epochs (and in checkpoints) for routing stability
        k = self.config.model.routing_config.areas
        return {"alignment_degrees": [a["degrees"] for a in alignment(self.model, self.rule, probe_x, probe_y)],
                "interference": interference(self.model, self.rule, probe_x, probe_y),
                "areas": [area_statistics(a, k, self.y_train, p) for a, p in zip(areas, previous)]}

    def _log_tensorboard(self, row: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        with SummaryWriter(str(self.out / "tensorboard")) as writer:
            for key, value in row.items():
                if key == "diagnostics":
                    for layer, v in enumerate(value["alignment_degrees"]):
                        writer.add_scalar(f"alignment_degrees/layer{layer:03d}", v, row["epoch"])
                elif isinstance(value, list):                     # per-layer norms
                    for layer, v in enumerate(value):
                        writer.add_scalar(f"{key}/layer{layer:03d}", v, row["epoch"])
                elif key not in ("epoch", "step"):
                    writer.add_scalar(key, value, row["epoch"])

    def metrics(self) -> dict[str, Any]:
        last = self.history[-1]
        return {
            "rule": self.config.rule.rule, "dataset": self.config.train.dataset,
            "test_accuracy": last["test_accuracy"],    # final epoch; never selected on test
            "val_accuracy": last["val_accuracy"],
            "epochs": last["epoch"], "steps": self.steps_done, "train_seconds": self.elapsed,
            "execution": self.execution.describe(),
            **parameter_counts(self.model, self.rule),
            "area_shares": area_shares(self.model, self.x_train),
            "n_train": len(self.y_train), "n_val": len(self.splits.y_val), "n_test": len(self.splits.y_test),
            "history": self.history, "config": self.config.to_dict(), "environment": environment(),
        }


def train(config: RunConfig, splits: Splits | None = None, progress: bool = True,
          checkpoint_every: int | None = None) -> TrainResult:
    """Train one model with one rule; returns the model, the rule and the run's metrics."""
    return Trainer(config, splits).fit(progress, checkpoint_every)




