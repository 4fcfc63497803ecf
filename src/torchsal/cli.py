"""The ``torchsal`` command. Thin: parse flags into settings, call the library (``make_config``, ``Trainer``,
``torchsal.resume``, ``evaluation.evaluate_saved``, ``Bench``), print a summary.

Every user mistake ends as one line on stderr and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from torchsal.config import (
    DEEP_DEFAULTS,
    DEEP_FROM,
    RECIPES,
    accepted,
    check_applicable,
    field_defaults,
    make_config,
    read_config_file,
    renamed,
)
from torchsal.errors import ConfigError, RunInterrupted, TorchsalError
from torchsal.registry import RULES


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _areas(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of areas or auto, got {text!r}") from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    # Unset flags are None: the rule's measured defaults and the recipe then apply (config.make_config).
    p.add_argument("--rule", choices=sorted(RULES), help="learning rule")
    p.add_argument("--dataset", help="registered name, csv:PATH or npz:PATH")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="default: each rule's measured best settings; paper: the paper's setup")
    p.add_argument("--config", help="TOML or YAML file of settings; flags given on the command line win")
    p.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="write DIR/checkpoint.pt every N steps")
    p.add_argument("--parallel", choices=accepted("parallel"),
                   help="under torchrun: replicate the model (data, default) or shard each layer's areas (area)")
    p.add_argument("--dist-timeout", type=float, default=120.0, metavar="S",
                   help="under torchrun: seconds a collective waits for a peer before the run stops (default 120)")
    p.add_argument("--data-dir", help="folder holding dataset files (else $TORCHSAL_DATA, then ./data)")
    p.add_argument("--diagnostics", action="store_true", default=None,
                   help="per epoch: alignment with the true gradient, class interference, area statistics")
    p.add_argument("--tensorboard", action="store_true", default=None,
                   help="also log per-epoch scalars to DIR/tensorboard (pip install tensorboard)")
    p.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                   help="colour images as one luma channel (the paper's CIFAR-10 setting)")
    p.add_argument("--out", metavar="DIR", help="run folder: config, per-epoch metrics, model, checkpoints")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=accepted("model"),
                   help="the routed MLP, or a conv net for image data: BioTorch's LeNet (MNIST) or small CIFAR-10 "
                   "CNN, ResNet-20, Nokland & Eidnes's VGG8b or VGG11b, or a VGG of --depth conv layers (vgg)")
    g.add_argument("--width-mult", type=float, metavar="M",
                   help="VGG models: every layer's width times M (0.25 or 0.5 on a CPU)")
    g.add_argument("--depth", type=int, help="hidden layers (mlp), or conv layers (vgg)")
    g.add_argument("--width", type=int, help="units per hidden layer (mlp)")
    g.add_argument("--areas", type=_areas, metavar="K|auto",
                   help="K areas per layer (1 = dense); auto: a power of two from 2 to 16, about 100 training "
                   "samples per area or more")
    g.add_argument("--dtype", choices=accepted("dtype"), help="weight type")
    g.add_argument("--shared", action=argparse.BooleanOptionalAction, default=None,
                   help="always-on shared path beside the areas (dual path)")
    g.add_argument("--conv-areas", action=argparse.BooleanOptionalAction, default=None,
                   help="conv nets: convolutions hold areas too (--no-conv-areas: they stay dense, only the fully "
                        "connected layers are routed)")
    g.add_argument("--routing-dim", type=int, help="dimension of the routing space")
    g.add_argument("--route-from", "--routing", dest="routing", choices=accepted("routing"),
                   help="route once from the input, or per layer from its own input (--routing: old spelling, "
                   "too close to --router)")
    g.add_argument("--router", choices=accepted("router"), help="routing projection (ablations)")
    g.add_argument("--block", choices=accepted("block"), help="hidden layers after the first")
    g.add_argument("--norm", choices=accepted("norm"), help="pre-norm in residual blocks and before the head")
    g.add_argument("--signal", choices=accepted("signal"), help="SAL's hidden-layer signal")
    g.add_argument("--readout", choices=accepted("readout"),
                   help="local readouts: one per layer, or a single one for all ('shared': old spelling of single)")
    g.add_argument("--readout-pool", type=int, metavar="SIDE",
                   help="conv nets: pool each block's output map to at most SIDE x SIDE before its local readout")
    g.add_argument("--objective", choices=accepted("objective"),
                   help="the local signal's objective: a fixed random readout, or learned (pred: a classifier per "
                        "block; sim: similarity matching; predsim: both)")
    g.add_argument("--head-feedback", choices=accepted("head_feedback"),
                   help="a learned head's error reaches its block through the head's weights, or fixed random "
                        "ones (bpf: no weight transport)")
    g.add_argument("--head-layers", type=int, metavar="N",
                   help="hidden layers of each learned head (3x3 conv + ReLU on maps) before pooling and its "
                        "linear map")
    g.add_argument("--sim-weight", type=float, metavar="W", help="predsim: (1 - W) pred + W sim")
    g.add_argument("--feedback", choices=accepted("feedback"),
                   help="fixed feedback matrices/readouts: one per layer, or one per area of each layer ('shared': old "
                        "spelling of per-layer)")
    g.add_argument("--memory", choices=accepted("memory"),
                   help="lean: update each layer right after its forward step (sal, local signal)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--optimizer", choices=accepted("optimizer"))
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", choices=accepted("schedule"))
    g.add_argument("--augment", choices=accepted("augment"),
                   help="crop-flip: random crops of the image padded by 4 pixels and horizontal flips (CIFAR's)")
    g.add_argument("--max-steps", type=int, help="stop after N optimizer steps, then evaluate")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("hardware")
    g.add_argument("--device", help="cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--precision", choices=accepted("precision"),
                   help="bf16-mixed: forward and signals in bfloat16 autocast, float32 weights")
    g.add_argument("--compile", action="store_true", default=None,
                   help="CPU, under 32 rows per area (small batches): a local rule's step up to its updates as "
                        "kernels generated by torch.compile (needs a C++ compiler; seconds of compiling at the "
                        "first step)")
    g.add_argument("--execution", choices=accepted("execution"),
                   help="fast: closed-form steps, layer stacks and in-place updates where the run allows; "
                        "reference: autograd and .grad only (the specification; the same update, slower)")


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Append each setting's default to its help (flags are None until resolved, so argparse cannot show them):
    the rule-dependent ones per rule, the depth-aware ones with their depth."""
    base = field_defaults()
    for action in p._actions:
        name = action.dest
        if name not in base and name not in ("rule", "recipe"):
            continue
        per_rule = {r: c.defaults[name] for r, c in RULES.items() if name in c.defaults}
        if name == "rule":
            text = base[name]
        elif name == "recipe":
            text = "default"
        elif per_rule:
            groups: dict[Any, list[str]] = {}
            for r in RULES:                     # registration order: bp, fa, dfa, sal, then any user rules
                groups.setdefault(per_rule.get(r, base[name]), []).append(r)
            text = "; ".join(f"{'/'.join(rules)}: {value}" for value, rules in groups.items())
        else:
            text = str(base[name])
        if name in DEEP_DEFAULTS:
            text += f"; {DEEP_DEFAULTS[name]} from {DEEP_FROM} hidden layers"
        for r in sorted(RULES):
            if name in RULES[r].conv_defaults:
                text += f"; {r} on conv nets: {RULES[r].conv_defaults[name]}"
        action.help = f"{action.help or ''} (default: {text})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="torchsal", description="Selective Adaptive Learning and its baselines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train_p = sub.add_parser("train", help="train one model with one rule on one dataset")
    train_p.add_argument("--quiet", action="store_true", help="no progress bar")
    train_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    _add_train_flags(train_p)
    _show_defaults(train_p)

    eval_p = sub.add_parser("eval", help="evaluate a trained model (DIR/model.pt) on a dataset")
    eval_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    eval_p.add_argument("--model", required=True, help="DIR or DIR/model.pt written by train --out DIR")
    eval_p.add_argument("--dataset", help="default: the dataset the model was trained on")
    eval_p.add_argument("--data-dir", help="folder holding dataset files")
    eval_p.add_argument("--split", choices=["test", "val", "train", "all"], default="test",
                        help="which rows to score (default test); all: every row of the file")
    eval_p.add_argument("--out", help="write the result as JSON to this file")
    report_p = sub.add_parser("report", help="a run's per-epoch metrics as a table and a plot")
    report_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    report_p.add_argument("run_dir", metavar="DIR", help="folder of a run (train --out DIR)")
    info_p = sub.add_parser("info", help="versions, threads, devices and the datasets found")
    info_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    info_p.add_argument("--data-dir", help="folder holding dataset files")

    from torchsal.bench import MAIN_PRESETS, PRESETS, PROTOCOLS

    bench_p = sub.add_parser("bench", help="benchmark presets on datasets over seeds (resumable)")
    bench_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    bench_p.add_argument("--datasets", help="comma-separated (default: the ten; with --protocol conv: mnist, "
                         "fashion-mnist, cifar10; its VGG cells: cifar10-vgg8b, and the depth sweep cifar10-vgg4, "
                         "-vgg6, -vgg8, -vgg11)")
    bench_p.add_argument("--presets", "--rules", dest="rules", metavar="PRESETS",
                         help=f"comma-separated presets (a rule on a model): {', '.join(PRESETS)}; 'ablations' "
                         f"expands to the SAL ablation set (--rules: old spelling; default: {','.join(MAIN_PRESETS)}; "
                         f"with --protocol conv: {','.join(PROTOCOLS['conv'].presets)})")
    bench_p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    bench_p.add_argument("--protocol", "--recipe", dest="recipe", default="tuned", choices=sorted(PROTOCOLS),
                         help="the benchmark protocol: tuned (a search on validation per preset), paper (the "
                         "paper's setup) or conv (conv nets, docs/conv.md); --recipe: old spelling, which train "
                         "--recipe means otherwise "
                         "(default: %(default)s)")
    bench_p.add_argument("--out", required=True, help="results folder (reused to resume)")
    bench_p.add_argument("--data-dir", help="folder holding dataset files")
    bench_p.add_argument("--threads", type=int, help="CPU threads for torch")
    bench_p.add_argument("--compile", action="store_true",
                         help="train every run with --compile (small batches on CPU: a local rule's step as kernels "
                         "generated by torch.compile; runs finished without it are reused, and the other way)")
    bench_p.add_argument("--epochs", type=int, help="override the recipe's epoch budget (quick checks)")
    bench_p.add_argument("--report-only", action="store_true",
                         help="write the tables from the runs already finished in --out; train nothing")
    bench_p.add_argument("--grayscale", action=argparse.BooleanOptionalAction, default=None,
                         help="override the recipe's colour setting (the ablations use grayscale CIFAR-10)")
    bench_p.add_argument("--runs", help="finished runs, shared between benches: a JSONL file, or a folder holding "
                         "runs.jsonl (default OUT/runs.jsonl; old OUT/runs/<key>/metrics.json folders are still read)")
    return parser


_NOT_SETTINGS = {"command", "debug", "quiet", "rule", "recipe", "config", "resume", "checkpoint_every", "dist_timeout",
                 "argv"}


def _summary(m: dict[str, Any]) -> str:
    shares = m["area_shares"]
    layers = shares if isinstance(shares[0], list) else [shares]
    used = ", ".join(f"{sum(s > 0 for s in layer)}/{len(layer)} used, max share {max(layer):.3f}"
                     for layer in layers)
    c = m["config"]
    deep = (f"\narchitecture: {c['depth']} hidden layers of {c['width']}, {c['block']} blocks, {c['norm']} norm"
            + (f", {c['readout']} local readout" if c["rule"] == "sal" and c["signal"] != "direct" else "")
            + f" (from {DEEP_FROM} layers on the defaults are residual, layer, single; "
            "--block/--norm/--readout choose)") if c["depth"] >= DEEP_FROM else ""
    return (f"{m['rule']} on {m['dataset']}: test accuracy {m['test_accuracy']:.4f} "
            f"(val {m['val_accuracy']:.4f}) after {m['epochs']} epochs, {m['steps']} steps, "
            f"{m['train_seconds']:.1f} s; execution: {m['execution']}\n"
            f"parameters: {m['params_total']:,} total"
            + (f" ({m['params_local_heads']:,} in local heads)" if m.get("params_local_heads") else "")
            + f", {m['params_active_per_sample']:,} active per sample; "
            f"areas: {used}{deep}")


# Old flag spellings, accepted for one release: per command, old -> new.
_DEPRECATED_FLAGS = {"train": {"--routing": "--route-from"},
                     "bench": {"--rules": "--presets", "--recipe": "--protocol"}}


def _warn_old_flags(args: argparse.Namespace) -> None:
    given = {word.split("=", 1)[0] for word in args.argv}      # --old value and --old=value alike
    for old, new in _DEPRECATED_FLAGS.get(args.command, {}).items():
        if old in given:
            logging.getLogger("torchsal").warning("%s is deprecated, say %s (the old spelling goes in the next "
                                                  "release)", old, new)


def _train(args: argparse.Namespace) -> int:
    from torchsal import distributed
    from torchsal.train import Trainer

    _warn_old_flags(args)
    ctx = distributed.init_from_env(args.device or "cpu", args.dist_timeout)
    settings = renamed({k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS and v is not None},
                       "torchsal train")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.resume:
        trainer = _resume(args, settings)
        if trainer is None:
            return 0
    else:
        from_file = read_config_file(args.config) if args.config else {}
        rule = args.rule or from_file.pop("rule", "sal")
        recipe = args.recipe or from_file.pop("recipe", "default")
        config = make_config(rule, recipe, **{**from_file, **settings})
        check_applicable(config, set(from_file) | set(settings))
        trainer = Trainer(config)
    if args.checkpoint_every and not trainer.config.train.out:
        raise ConfigError("--checkpoint-every needs --out DIR to write checkpoints into")
    try:
        result = trainer.fit(progress=not args.quiet, checkpoint_every=args.checkpoint_every
                             or trainer.checkpoint_every)
    except RunInterrupted as exc:          # the same command, with --resume appended, continues the run
        command = args.argv if "--resume" in args.argv else [*args.argv, "--resume", str(trainer.out)]
        print(f"torchsal: {exc}", file=sys.stderr)
        print(f"resume with: torchsal {shlex.join(command)}", flush=True)
        return 130
    if not ctx.is_main:
        return 0
    print(_summary(result.metrics))
    if trainer.out:
        print(f"run: {trainer.out}/ (metrics.json, metrics.csv, config.json, model.pt"
              f"{', checkpoint.pt' if args.checkpoint_every else ''})")
    return 0


def _resume(args: argparse.Namespace, settings: dict[str, Any]):  # noqa: ANN202
    """The run in ``--resume DIR`` under the flags given (``torchsal.resume`` says what they may change); None
    for a finished run, which is left as it is."""
    from torchsal.resume import resume_run

    given = dict(settings)
    if args.config:
        given = {**read_config_file(args.config), **given}
    if args.recipe:
        given = {**RECIPES[args.recipe], **given}
    given.pop("recipe", None)
    if args.rule:
        given["rule"] = args.rule
    trainer = resume_run(args.resume, given)
    if trainer.steps_done >= trainer.total_steps:
        print(f"run {args.resume} is finished ({trainer.steps_done} of {trainer.total_steps} steps); nothing "
              "changed. To train on, resume with a larger --epochs or --max-steps")
        return None
    return trainer


def _eval(args: argparse.Namespace) -> int:
    from torchsal.evaluation import evaluate_saved
    from torchsal.storage import write_json_atomic

    result = evaluate_saved(args.model, args.dataset, args.split, args.data_dir)
    print(f"{result['rule']} model on {result['dataset']} ({args.split}, {result['samples']} samples, "
          f"{result['classes_present']} of the model's {result['classes']} classes): accuracy "
          f"{result['accuracy']:.4f}")
    if args.out:
        write_json_atomic(args.out, {k: v for k, v in result.items() if k not in ("rule", "classes")})
    return 0


def _report(args: argparse.Namespace) -> int:
    from torchsal.report import report

    print(report(args.run_dir))
    return 0


def _info(args: argparse.Namespace) -> int:
    from torchsal.report import info

    print(info(args.data_dir))
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
    from torchsal.bench import ABLATIONS, PROTOCOLS, SUITE_CPU_HOURS, TEN_DATASETS

    _warn_old_flags(args)
    recipe = PROTOCOLS[args.recipe]
    if args.datasets is None:
        args.datasets = ",".join(recipe.default_datasets or recipe.datasets or TEN_DATASETS)
    if args.rules is None:
        args.rules = ",".join(recipe.presets)
    presets = [q for p in args.rules.split(",") if p for q in (ABLATIONS if p == "ablations" else [p])]
    if args.datasets == ",".join(TEN_DATASETS) and not args.report_only:
        hours = SUITE_CPU_HOURS.get(args.recipe)
        print(f"bench {args.recipe}: all ten datasets" + (f", about {hours:.0f} CPU-hours on 2 cores if nothing is "
              "finished yet (docs/results.md); finished runs in --out are reused" if hours else "")
              + ". --datasets picks fewer.", flush=True)
    bench = Bench(args.recipe, [d for d in args.datasets.split(",") if d], list(dict.fromkeys(presets)),
                  _int_list(args.seeds, "--seeds"), Path(args.out), data_dir=args.data_dir, threads=args.threads,
                  compile_=args.compile, epochs=args.epochs, report_only=args.report_only, grayscale=args.grayscale,
                  runs=Path(args.runs) if args.runs else None)
    bench.run()
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {args.out}/results.json, results.csv, results.md, convergence-{args.recipe}.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        commands = {"train": _train, "bench": _bench, "eval": _eval, "report": _report, "info": _info}
        return commands[args.command](args)
    except TorchsalError as exc:
        if args.debug:
            raise
        print(f"torchsal: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchsal: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                     # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
