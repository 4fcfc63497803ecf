"""torchsal: Selective Adaptive Learning (SAL) and its baselines (BP, FA, DFA) in PyTorch."""

__version__ = "0.1.0"

from torchsal import optim
from torchsal.blocks import BlockNet
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig, RunConfig, TrainConfig, make_config
from torchsal.data import load_dataset, make_splits
from torchsal.models import AreaMLP, build_model
from torchsal.rules import RULES, LearningRule, build_rule
from torchsal.train import evaluate, train

__all__ = ["RULES", "AreaMLP", "BlockNet", "LearningRule", "ModelConfig", "RoutingConfig", "RuleConfig",
           "RunConfig", "TrainConfig", "build_model", "build_rule", "evaluate", "load_dataset", "make_config",
           "make_splits", "optim", "train"]
