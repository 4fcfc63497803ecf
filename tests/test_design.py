"""The package's structure: modules import each other without cycles, and a learning rule registered from user
code works everywhere a built-in one does (docs/design.md)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchsal import BlockNet, build_rule, execution, load_dataset, make_config, make_splits, optim, train
from torchsal.cli import main
from torchsal.config import RuleConfig, check_applicable
from torchsal.errors import ConfigError
from torchsal.evaluation import evaluate
from torchsal.registry import RULES, register_rule
from torchsal.rules.base import LearningRule, StepOutput, output_step

SOURCE = Path(__file__).resolve().parents[1] / "src"


def module_imports(source: Path) -> dict[str, set[str]]:
    """Each torchsal module's imports of other torchsal modules, those inside functions included and those under
    ``if TYPE_CHECKING:`` not. ``from torchsal.pkg import name`` names the submodule where ``name`` is one."""
    modules = {}
    for path in (source / "torchsal").rglob("*.py"):
        parts = path.relative_to(source).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def found(node: ast.AST, out: set[str]) -> set[str]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    found(other, out)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.update(f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules else child.module
                           for a in child.names)
            found(child, out)
        return out

    return {name: {m for m in found(ast.parse(path.read_text()), set()) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as a path that starts and ends at the same module (depth-first search)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node], path[len(path):] = "open", [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"
        path.pop()

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_module_imports_another_in_a_cycle():
    assert cycles(module_imports(SOURCE)) == []


def test_the_cycle_finder_finds_cycles(tmp_path):
    """The control: a package whose modules import each other (one inside a function) is caught; an import under
    TYPE_CHECKING is not one."""
    package = tmp_path / "torchsal"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from torchsal.b import f\n")
    (package / "b.py").write_text("def f():\n    from torchsal import a\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from torchsal import a\n")
    (package / "d.py").write_text("from torchsal import c\n")
    assert cycles(module_imports(tmp_path)) == [["torchsal.a", "torchsal.b", "torchsal.a"]]


@pytest.fixture
def halving_rule():
    """A rule defined as a user would: backprop's update at half the scale, with defaults of its own."""
    @register_rule("halved-bp")
    class HalvedBackprop(LearningRule):
        defaults = {"areas": 1, "shared": False, "epochs": 2, "batch_size": 32}

        def forward(self, model, x, y) -> StepOutput:  # noqa: ANN001
            out = output_step(model.trace(x), y)
            out.loss = out.loss / 2
            return out

    yield HalvedBackprop
    del RULES["halved-bp"]


def test_a_registered_rule_resolves_its_own_defaults(halving_rule):
    config = make_config("halved-bp")
    assert (config.rule.rule, config.train.epochs, config.train.batch_size, config.model.routing_config.areas) == \
        ("halved-bp", 2, 32, 1)
    with pytest.raises(ConfigError, match="--signal .--rule halved-bp has no choice of signal; sal have"):
        check_applicable(make_config("halved-bp", signal="local"), {"signal"})


def test_a_registered_rule_trains_through_train(halving_rule):
    config = make_config("halved-bp", dataset="digits", max_steps=5, seed=0)
    result = train(config, progress=False)
    assert result.metrics["config"]["rule"] == "halved-bp" and result.metrics["test_accuracy"] > 0.1
    # half of bp's update: with plain SGD the weights move by exactly half of what bp's step moves them
    ref = train(make_config("bp", dataset="digits", max_steps=1, optimizer="sgd", lr=0.5, batch_size=32),
                progress=False).model
    half = train(make_config("halved-bp", dataset="digits", max_steps=1, optimizer="sgd", lr=1.0), progress=False).model
    start = train(make_config("bp", dataset="digits", max_steps=1, optimizer="sgd", lr=1e-12, batch_size=32),
                  progress=False).model
    for a, b, s in zip(ref.parameters(), half.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(a - s, b - s, rtol=1e-4, atol=1e-6)


def test_a_registered_rule_trains_from_the_command_line(halving_rule, tmp_path, capsys):
    assert main(["train", "--rule", "halved-bp", "--dataset", "digits", "--max-steps", "3", "--quiet",
                 "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["rule"] == "halved-bp" and metrics["config"]["epochs"] == 2
    assert "halved-bp" in capsys.readouterr().out


class GeluResidual(nn.Module):
    """A block type the library has never seen (docs/design.md, "Adding a block"): a linear map, GELU and a skip
    connection, written as plain torch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):  # noqa: ANN001, ANN201
        return h + F.gelu(self.linear(h))


@pytest.mark.parametrize("rule_name", ["bp", "fa", "dfa", "sal"])
def test_a_new_block_type_needs_only_its_forward(rule_name):
    """Every rule trains a block that defines nothing but ``forward``, through the reference path (the closed form
    declines it), its areas routed and its untouched areas kept, and learns digits."""
    splits = make_splits(load_dataset("digits"), seed=0)
    torch.manual_seed(0)
    model = BlockNet.from_modules([nn.Linear(64, 32), nn.ReLU(), GeluResidual(32), nn.Linear(32, 10)],
                                  in_shape=(64,), areas=4, shared=True, generator=torch.Generator().manual_seed(0))
    rule = build_rule(model, RuleConfig(rule_name))
    fast = execution.choose(rule, model)                 # the run's execution: no part needs the new block
    assert len(model.blocks) == 3 and not fast.closed_form and not fast.stacks
    optimizer = optim.Adam([*model.parameters(), *rule.parameters()], lr=3e-3, fused=True)
    order = torch.randperm(len(splits.y_train), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        for batch in order.split(64):
            optimizer.zero_grad()
            fast.step(rule, model, optimizer, splits.x_train[batch], splits.y_train[batch])
            optimizer.step()
    assert evaluate(model, splits.x_val, splits.y_val) > 0.85
