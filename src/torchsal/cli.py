"""The ``torchsal`` command. Thin: parse flags into the config dataclasses, call the library, print a summary.

Every user mistake ends as one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from torchsal.config import RECIPES, RULE_DEFAULTS, make_config
from torchsal.errors import ConfigError, TorchsalError

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

    from torchsal.bench import PRESETS, RECIPES, TEN_DATASETS

    bench_p = sub.add_parser("bench", help="benchmark presets on datasets over seeds (resumable)")
    bench_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    bench_p.add_argument("--datasets", default=",".join(TEN_DATASETS), help="comma-separated (default: the ten)")
    bench_p.add_argument("--rules", default=",".join(PRESETS), help=f"presets: {', '.join(PRESETS)}")
    bench_p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    bench_p.add_argument("--recipe", default="tuned", choices=sorted(RECIPES))
    bench_p.add_argument("--out", required=True, help="results folder (reused to resume)")
    bench_p.add_argument("--data-dir", help="folder holding dataset files")
    bench_p.add_argument("--threads", type=int, help="CPU threads for torch")
    bench_p.add_argument("--epochs", type=int, help="override the recipe's epoch budget (quick checks)")
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


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from torchsal.bench import Bench

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.recipe, [d for d in args.datasets.split(",") if d], [p for p in args.rules.split(",") if p],
                  _int_list(args.seeds, "--seeds"), Path(args.out), args.data_dir, args.threads, args.epochs)
    bench.run()
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {args.out}/results.json, results.csv, results.md, convergence-{args.recipe}.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return {"train": _train, "bench": _bench}[args.command](args)
    except TorchsalError as exc:
        if args.debug:
            raise
        print(f"torchsal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchsal: interrupted", file=sys.stderr)
        return 130
