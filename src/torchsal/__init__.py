"""torchsal: Selective Adaptive Learning (SAL) and its baselines (BP, FA, DFA) in PyTorch."""

import torch

from torchsal import (
           datasets,  # noqa: F401  (registers the named datasets)
           execution,
           optim,
)
from torchsal.blocks import BlockNet
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig, RunConfig, TrainConfig, make_config
from torchsal.data import load_dataset, make_splits
from torchsal.evaluation import evaluate
from torchsal.models import AreaMLP, build_model
from torchsal.rules import RULES, LearningRule, build_rule
from torchsal.train import train
from torchsal.version import __version__

# Denormal floats (below 1.2e-38) make x86 CPU kernels 11-137x slower (measured), and training makes them: weight
# decay and Adam shrink the weights of units that get no gradient into that range. A CIFAR-10 run on an Intel Xeon
# slowed from 31 to 238 s per epoch within 14 epochs (docs/performance.md). Flushed to zero, they cost nothing.
# Torch's worker threads inherit the setting from the thread that starts them, so it is made at import, before
# any of them exist.
torch.set_flush_denormal(True)

__all__ = ["RULES", "AreaMLP", "__version__", "BlockNet", "LearningRule", "ModelConfig", "RoutingConfig", "RuleConfig",
           "RunConfig", "TrainConfig", "build_model", "build_rule", "evaluate", "load_dataset", "make_config",
           "make_splits", "execution", "optim", "train"]
