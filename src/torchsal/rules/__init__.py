"""Learning rules behind one interface (``LearningRule``), registered by name."""

from torchsal.rules import bp, fa, local  # noqa: F401  (registers the rules)
from torchsal.rules.base import RULES, LearningRule, StepOutput, build_rule, get_rule, register_rule

__all__ = ["RULES", "LearningRule", "StepOutput", "build_rule", "get_rule", "register_rule"]
