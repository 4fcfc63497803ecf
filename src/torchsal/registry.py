"""The learning rules by name. A rule class carries its own configuration, so the configuration layer, the
applicability check and the CLI read everything about a rule from this table: a rule registered from user code
works from ``make_config``, ``train()`` and ``torchsal train --rule NAME`` alike.

A registered class may set (``torchsal.rules.base.LearningRule`` documents them):

- ``defaults``: the settings the rule changes from the dataclass defaults (``{"areas": 1, "epochs": 30}``);
- ``conv_defaults``: more of them, on conv nets only;
- ``options``: the rule settings (``RuleConfig`` fields) it reads; the CLI refuses the others when given.

This module imports nothing of torchsal's, so configuration can depend on it without depending on the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torchsal.errors import ConfigError

RULES: dict[str, Any] = {}
T = TypeVar("T")


def register_rule(name: str) -> Callable[[T], T]:
    """Class decorator: make a rule class usable as ``--rule name``."""
    def register(cls: T) -> T:
        if name in RULES:
            raise ValueError(f"learning rule {name!r} is registered twice")
        cls.name = name  # type: ignore[attr-defined]
        RULES[name] = cls
        return cls
    return register


def get_rule(name: str) -> Any:
    """The class registered as ``name``, or a ConfigError listing the registered ones."""
    if name not in RULES:
        raise ConfigError(f"unknown rule {name!r}; choose one of: {', '.join(sorted(RULES))}")
    return RULES[name]
