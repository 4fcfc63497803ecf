"""The ``torchsal`` command. Thin: parse flags into the config dataclasses, call the library, print a summary.

Every user mistake ends as one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from torchsal.config import RECIPES, RULE_DEFAULTS, make_config
from torchsal.errors import TorchsalError

log = logging.getLogger("torchsal")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    # Unset flags are None: the rule's measured defaults and the recipe then apply (see config.RULE_DEFAULTS).
    p.add_argument("--rule", default="sal", choices=sorted(RULE_DEFAULTS), help="learning rule (default: sal)")
    p.add_argument("--dataset", default="digits", help="registered name, csv:PATH or npz:PATH (default: digits)")
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                   help="default: each rule's measured best settings; paper: the paper's setup")
    p.add_argument("--data-dir", help="folder holding dataset files (else $TORCHSAL_DATA, then ./data)")
    p.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                   help="colour images as one luma channel (the paper's CIFAR-10 setting)")
    p.add_argument("--out", help="write DIR/metrics.json")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, help="hidden layers")
    g.add_argument("--width", type=int, help="units per hidden layer")
    g.add_argument("--areas", type=int, help="K areas per layer (1 = dense)")
    g.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None,
                   help="always-on shared path beside the areas (dual path)")
    g.add_argument("--routing-dim", type=int, help="dimension of the routing space")
    g.add_argument("--routing", choices=["input", "layer"], help="route once from the input, or per layer")
    g.add_argument("--router", choices=["learned", "frozen", "random"], help="routing projection (ablations)")
    g.add_argument("--signal", choices=["direct", "local", "both"], help="SAL's hidden-layer signal")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=["constant", "cosine"])
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps, then evaluate")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchsal", description="Selective Adaptive Learning and its baselines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train_p = sub.add_parser("train", help="train one model with one rule on one dataset")
    train_p.add_argument("--quiet", action="store_true", help="no progress bar")
    train_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    _add_train_flags(train_p)
    return parser


_NOT_SETTINGS = {"command", "debug", "quiet", "rule", "recipe"}


def _summary(m: dict[str, Any]) -> str:
    shares = m["area_shares"]
    layers = shares if isinstance(shares[0], list) else [shares]
    used = ", ".join(f"{sum(s > 0 for s in layer)}/{len(layer)} used, max share {max(layer):.3f}"
                     for layer in layers)
    return (f"{m['rule']} on {m['dataset']}: test accuracy {m['test_accuracy']:.4f} "
            f"(val {m['val_accuracy']:.4f}) after {m['epochs']} epochs, {m['steps']} steps, "
            f"{m['train_seconds']:.1f} s\n"
            f"parameters: {m['params_total']:,} total, {m['params_active_per_sample']:,} active per sample; "
            f"areas: {used}")


def _train(args: argparse.Namespace) -> int:
    from torchsal.train import train

    settings = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    config = make_config(args.rule, args.recipe, **settings)
    result = train(config, progress=not args.quiet)
    print(_summary(result.metrics))
    if config.train.out:
        print(f"metrics: {config.train.out}/metrics.json")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return {"train": _train}[args.command](args)
    except TorchsalError as exc:
        if args.debug:
            raise
        print(f"torchsal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchsal: interrupted", file=sys.stderr)
        return 130
