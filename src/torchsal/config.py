"""Typed, frozen configuration: one dataclass per concern, each default written once.

A run's configuration is resolved in layers, later ones winning: dataclass defaults (SAL's measured ones) < the
rule's own (``defaults`` and ``conv_defaults`` on its class, ``torchsal.registry``) < depth-aware defaults < a
recipe (``RECIPES``) < the user's overrides. Field names are unique across the groups, so overrides are a flat
``{name: value}`` mapping (what the CLI and config files produce) and ``RunConfig.to_dict`` is flat too.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchsal.errors import ConfigError
from torchsal.registry import RULES, get_rule

log = logging.getLogger(__name__)


# Old spellings, accepted for one release: "shared" named three things (the shared path, one feedback matrix per
# layer, one readout for all layers). (setting, old value) -> new value.
DEPRECATED_VALUES: dict[tuple[str, str], str] = {("readout", "shared"): "single", ("feedback", "shared"): "per-layer"}


def renamed(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """``settings`` with old spellings replaced by the new ones, each replacement warned about once."""
    out = dict(settings)
    for (name, old), new in DEPRECATED_VALUES.items():
        if out.get(name) == old:
            out[name] = new
            log.warning("%s: %s %r is deprecated, say %r (the old spelling goes in the next release)", source,
                        name, old, new)
    return out


MODELS = ("mlp", "lenet", "cnn", "resnet20", "vgg8b", "vgg11b", "vgg")
OBJECTIVES = ("readout", "pred", "sim", "predsim")      # the local signal's objectives (torchsal.objectives)
# Every setting with a fixed set of values, and its values: the dataclasses validate with it, the CLI lists it.
CHOICES: dict[str, tuple[str, ...]] = {
    "routing": ("input", "layer"), "router": ("learned", "frozen", "random"),
    "model": MODELS, "block": ("plain", "residual"), "norm": ("none", "layer", "rms"), "dtype": ("float32", "bfloat16"),
    "signal": ("direct", "local", "both"), "readout": ("per-layer", "single"), "objective": OBJECTIVES,
    "head_feedback": ("weights", "fixed"), "feedback": ("per-layer", "per-area"), "memory": ("standard", "lean"),
    "optimizer": ("sgd", "adam", "adamw"), "schedule": ("constant", "cosine"), "augment": ("none", "crop-flip"),
    "parallel": ("data", "area"), "precision": ("fp32", "bf16-mixed"),
    "execution": ("fast", "reference"),
}


def accepted(name: str) -> tuple[str, ...]:
    """What a flag or config file may say for setting ``name``: its values, and their old spellings."""
    return CHOICES[name] + tuple(old for (setting, old) in DEPRECATED_VALUES if setting == name)


def _choice(name: str, value: Any, options: tuple[str, ...] | None = None) -> None:
    options = CHOICES[name] if options is None else options
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1" if isinstance(value, int) else "> 0"
        raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


@dataclass(frozen=True)
class RoutingConfig:
    # K mutually exclusive areas per layer (the paper's 16); 1 means a dense layer and no router; "auto" follows
    # the training set's size (``auto_areas``), resolved by the trainer once the data is known.
    areas: int | str = "auto"
    # Dimension r of the routing space; prototypes are orthonormal when areas <= r.
    routing_dim: int = 64
    # "input": one area per sample chosen from the input, shared by all layers; "layer": each layer routes
    # its own input.
    routing: str = "input"
    # "learned": projection trained by the local routing objective; "frozen": fixed random projection;
    # "random": input-independent uniform areas (ablation; not a function of the input).
    router: str = "learned"
    # Softmax temperature of the routing objective (SwAV-style balanced assignment).
    routing_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.areas != "auto":
            if not isinstance(self.areas, int) or isinstance(self.areas, bool):
                raise ConfigError(f"--areas takes a number or auto, got {self.areas!r}")
            _positive("areas", self.areas)
        _positive("routing_dim", self.routing_dim)
        _choice("routing", self.routing)
        _choice("router", self.router)
        _positive("routing_temperature", self.routing_temperature)


@dataclass(frozen=True)
class ModelConfig:
    # "mlp" (the routed MLP below) or a conv net for images: "lenet" (BioTorch's LeNet for MNIST), "cnn" (its small
    # CIFAR-10 CNN), "resnet20" (CIFAR ResNet-20), "vgg8b" and "vgg11b" (Nokland & Eidnes's VGGs with batch
    # norm), "vgg" (a VGG of --depth conv layers); depth, width, block and norm describe the MLP, depth also "vgg".
    model: str = "mlp"
    # Hidden layers of the MLP (the paper uses 1) and their width.
    depth: int = 1
    width: int = 256
    # Always-on shared path beside the selective areas (our reading of the paper's dual path).
    shared: bool = True
    # Hidden layers after the first: "plain" (h = f(W h)) or "residual" (h = h + f(W norm(h)), branch weights
    # initialised at 1/sqrt(depth) scale); see docs/depth.md.
    block: str = "plain"
    # Pre-norm inside residual blocks and a final norm before the head: "none", "layer" or "rms".
    norm: str = "none"
    # VGG models: every layer's width times this (0.25 and 0.5 fit CPU budgets; 1 is the published net).
    width_mult: float = 1.0
    # Conv nets: convolutions hold areas too; off, they stay dense (their kernels see every image) and only the
    # fully connected layers are routed.
    conv_areas: bool = True
    # Weights (and activations) in "float32" or "bfloat16" (half the memory; built in that type, area by area).
    dtype: str = "float32"
    routing_config: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        _choice("model", self.model)
        _positive("width_mult", self.width_mult)
        _positive("depth", self.depth)
        _positive("width", self.width)
        _choice("block", self.block)
        _choice("norm", self.norm)
        _choice("dtype", self.dtype)


@dataclass(frozen=True)
class RuleConfig:
    rule: str = "sal"
    # SAL's hidden-layer signal: "direct" (fixed random projection of the output error), "local" (layer-local
    # alignment objective through a fixed random readout) or "both" (their sum).
    signal: str = "local"
    # Fixed random readouts of the local signal: one per hidden layer, or a single one for all of them.
    readout: str = "per-layer"
    # The side a conv block's output map is average-pooled to (at most) before its local readout: 2 reads 2x2.
    readout_pool: int = 2
    # The local signal's objective (torchsal.objectives): "readout" (a fixed random readout of the pooled output),
    # or learned, after Nokland & Eidnes 2019: "pred" (a learned classifier per block), "sim" (similarity
    # matching), "predsim" (their weighted sum).
    objective: str = "readout"
    # How a learned head's error reaches its block: through the head's own "weights", or "fixed" random tensors
    # (bpf: no weight transported anywhere).
    head_feedback: str = "weights"
    # Hidden layers of each learned head before its pooling and linear map (3x3 conv + ReLU on maps).
    head_layers: int = 0
    # predsim's weight of the similarity term: (1 - w) pred + w sim (the paper's 0.99; sal's conv default: 0.7).
    sim_weight: float = 0.99
    # Feedback matrices and readouts: one per layer (all its areas use it) or one per area of each layer.
    feedback: str = "per-layer"
    # "lean": each hidden layer updates as soon as its own forward step is done, so no earlier layer's
    # activations are kept (needs layer-local signals: --rule sal --signal local).
    memory: str = "standard"

    def __post_init__(self) -> None:
        get_rule(self.rule)
        _choice("signal", self.signal)
        for name in ("readout", "feedback"):        # old spellings (stored runs, configs): silently the new ones
            object.__setattr__(self, name, DEPRECATED_VALUES.get((name, getattr(self, name)), getattr(self, name)))
        _choice("readout", self.readout)
        _positive("readout_pool", self.readout_pool)
        _choice("objective", self.objective)
        _choice("head_feedback", self.head_feedback)
        _positive("head_layers", self.head_layers, allow_zero=True)
        if not 0 <= self.sim_weight <= 1:
            raise ConfigError(f"--sim-weight must lie in [0, 1], got {self.sim_weight}")
        _choice("feedback", self.feedback)
        _choice("memory", self.memory)
        if self.memory == "lean" and ("memory" not in get_rule(self.rule).options or self.signal != "local"):
            raise ConfigError("--memory lean needs layer-local signals (--rule sal --signal local): other rules "
                              "need the output error before any hidden layer can update")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    # Colour images as one luma channel (the paper's setting for CIFAR-10).
    grayscale: bool = False
    epochs: int = 60
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    # Image augmentation per batch: "none", or "crop-flip" (random 4-pixel-padded crops and horizontal flips).
    augment: str = "none"
    # Stop after this many optimizer steps (then evaluate); None trains all epochs.
    max_steps: int | None = None
    seed: int = 0
    device: str = "cpu"
    # "fp32", or "bf16-mixed": the forward pass and the rules' signals under bfloat16 autocast, weights, gradients
    # and optimizer state in float32 (docs/performance.md gives its speed and accuracy).
    precision: str = "fp32"
    # Work over a few rows per area (small batches, SAL: a local rule's step up to its updates, or the area
    # products) as kernels generated by torch.compile: needs a C++ compiler and a few seconds of compiling per
    # shape (torchsal.dispatch.compiled_kernels).
    compile: bool = False
    # "fast": the fast path's parts that fit the run; "reference": autograd and .grad only, the specification
    # (torchsal.execution). Both form the same update.
    execution: str = "fast"
    threads: int | None = None
    data_dir: str | None = None
    out: str | None = None
    # Per epoch: angle between each layer's update and the true gradient, class interference, area statistics.
    diagnostics: bool = False
    # Also log per-epoch scalars for TensorBoard into out/tensorboard (needs the tensorboard package).
    tensorboard: bool = False
    # Under torchrun: "data" replicates the model on every process; "area" shards each layer's areas across
    # processes and sends every sample to the process holding its area (docs/distributed.md).
    parallel: str = "data"

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _choice("optimizer", self.optimizer)
        _positive("lr", self.lr)
        _positive("momentum", self.momentum, allow_zero=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _choice("schedule", self.schedule)
        _choice("augment", self.augment)
        _choice("parallel", self.parallel)
        _choice("precision", self.precision)
        _choice("execution", self.execution)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.threads is not None:
            _positive("threads", self.threads)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N")
        if self.tensorboard and not self.out:
            raise ConfigError("--tensorboard needs --out DIR to write its logs into")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(f"--momentum applies to --optimizer sgd only (got {self.optimizer}); "
                              "Adam's betas play that role")
        # Paths are stored resolved, so `eval` and `--resume` work from any directory.
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(Path(value).expanduser().resolve()))


# The defaults above are SAL's, measured: the best mean validation accuracy over seven small datasets (wine,
# breast-cancer, digits, dna, satellite, mnist1d, letter; 3 seeds each) of Adam lr {1e-3, 3e-3} x epochs {30, 60},
# and 16 areas against "auto" (docs/defaults.md): lr 3e-3, 60 epochs, auto areas. Other rules change some on their
# classes (``defaults``), as SAL does on conv nets (``conv_defaults``).

# The paper's setup: one hidden layer of 256 ReLU units, plain SGD at lr 1e-4, batch 16, 25 epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"depth": 1, "width": 256, "optimizer": "sgd", "lr": 1e-4, "momentum": 0.0,
              "weight_decay": 0.0, "batch_size": 16, "epochs": 25, "schedule": "constant"},
}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    rule: RuleConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{field: value}`` of every setting (routing fields included)."""
        out: dict[str, Any] = {}
        for group in (self.model.routing_config, self.model, self.rule, self.train):
            out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
        del out["routing_config"]
        return out


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def field_defaults() -> dict[str, Any]:
    """Every setting's dataclass default, flat (before rule defaults and recipes)."""
    return {f.name: f.default for cls in (RoutingConfig, ModelConfig, RuleConfig, TrainConfig)
            for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


KNOWN_FIELDS: frozenset[str] = frozenset().union(
    *(_fields(c) for c in (RoutingConfig, ModelConfig, RuleConfig, TrainConfig))) - {"routing_config"}


def _field_types() -> dict[str, tuple[type, ...]]:
    out: dict[str, tuple[type, ...]] = {}
    for cls in (RoutingConfig, ModelConfig, RuleConfig, TrainConfig):
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            out[name] = tuple(args)
    return out


FIELD_TYPES = _field_types()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def check_type(name: str, value: Any) -> Any:
    """``value`` converted to the setting's type (int -> float), or a ConfigError naming the setting."""
    expected = FIELD_TYPES[name]
    if isinstance(value, bool) and bool not in expected:
        pass                                    # True is an int in Python, never a valid number here
    elif isinstance(value, int) and float in expected and int not in expected:
        return float(value)
    elif any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in expected):
        return value
    wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in expected)
    raise ConfigError(f"setting {name!r} must be {wanted}, got {value!r} ({type(value).__name__})")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file: flat ``name = value`` pairs (``-`` or ``_`` in names), optionally
    grouped in sections whose names are ignored (``[model]``, ``[train]``); ``rule`` and ``recipe`` allowed.
    Unknown keys and wrong types are rejected with a message naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (tomllib and yaml raise their own parse errors)
        raise ConfigError(f"--config {path}: not valid {path.suffix[1:].upper()} ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            name = str(name).replace("-", "_")
            name = {"route_from": "routing"}.get(name, name)     # the --route-from flag's setting
            if name not in KNOWN_FIELDS | {"rule", "recipe"}:
                raise ConfigError(f"--config {path}: unknown key {name!r}; known keys: "
                                  f"{', '.join(sorted(KNOWN_FIELDS | {'recipe'}))}")
            try:
                flat[name] = v if name == "recipe" else check_type(name, v)
            except ConfigError as exc:
                raise ConfigError(f"--config {path}: {exc}") from None
    return renamed(flat, f"--config {path}")


# --areas auto: about a hundred training samples per area or more, as a power of two between 2 and 16. Measured on
# the seven small sets of issue 17 (3 seeds, validation): 16 areas over wine's 127 training samples gave 0.867,
# 2 gave 0.933; breast-cancer (409) 0.964 with 16, 0.986 with 4; digits (1293) 0.963 with 16, 0.975 with 8; sets of
# 1600 samples or more keep 16 (docs/defaults.md).
SAMPLES_PER_AREA = 100


def auto_areas(n_train: int) -> int:
    """The number of areas ``--areas auto`` gives a training set of ``n_train`` samples."""
    k = 2
    while k < 16 and 2 * k * SAMPLES_PER_AREA <= n_train:
        k *= 2
    return k


def resolve_areas(config: RunConfig, n_train: int) -> RunConfig:
    """``config`` with ``areas="auto"`` replaced by the number for ``n_train`` training samples (else unchanged)."""
    routing = config.model.routing_config
    if routing.areas != "auto":
        return config
    chosen = dataclasses.replace(routing, areas=auto_areas(n_train))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, routing_config=chosen))


# Depth-aware defaults: from DEEP_FROM hidden layers on, the architecture that trains at depth (measured on MNIST,
# width 64, 300 steps of 128: plain BP fell from 0.94 at 8 layers to 0.72 at 32 and chance at 64, plain SAL to 0.64
# at 32; residual pre-norm blocks keep BP at 0.94-0.95 up to 128 layers and, with one shared local readout, SAL at
# 0.89-0.91; residual blocks already help BP at 8 layers, 0.954 against 0.935; docs/defaults.md). Unset
# block/norm/readout follow them; explicit settings, recipes and config files win.
DEEP_FROM = 8
DEEP_DEFAULTS: dict[str, Any] = {"block": "residual", "norm": "layer", "readout": "single"}


def make_config(rule: str = "sal", recipe: str = "default", **overrides: Any) -> RunConfig:
    """Resolve a run's configuration: dataclass defaults < the rule's defaults (its conv-net ones on a conv net) <
    depth-aware defaults < recipe < ``overrides``.

    ``overrides`` are flat field names (``lr=0.01, areas=4``); ``None`` values are ignored, so an unset CLI
    flag keeps the default.
    """
    _choice("recipe", recipe, tuple(RECIPES))
    rule_class = get_rule(rule)
    unknown = sorted(set(overrides) - KNOWN_FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(KNOWN_FIELDS))}")
    values: dict[str, Any] = {"rule": rule, **rule_class.defaults}
    given = {**RECIPES[recipe], **{k: check_type(k, v) for k, v in overrides.items() if v is not None}}
    model = given.get("model", ModelConfig.model)
    if model != "mlp":
        values.update(rule_class.conv_defaults)
    elif given.get("depth", ModelConfig.depth) >= DEEP_FROM:
        values.update(DEEP_DEFAULTS)
    values.update(given)

    def build(cls: type, **extra: Any) -> Any:
        return cls(**{k: values[k] for k in _fields(cls) if k in values}, **extra)

    routing_cfg = build(RoutingConfig)
    return RunConfig(model=build(ModelConfig, routing_config=routing_cfg), rule=build(RuleConfig),
                     train=build(TrainConfig))


def check_applicable(config: RunConfig, explicit: set[str]) -> None:
    """Refuse settings the user gave that the chosen rule or model would silently ignore, all named at once
    (``--rule bp --signal local``, ``--rule fa --readout single``, routing options on a one-area model)."""
    rule, model, routing = config.rule, config.model, config.model.routing_config
    options = get_rule(rule.rule).options

    def readers(setting: str) -> str:           # the rules that read a setting, as "dfa/sal"
        return "/".join(sorted(n for n, c in RULES.items() if setting in c.options))

    local = "signal" in options and rule.signal in ("local", "both")
    no_readout = None if local else f"the local readouts exist only with --rule {readers('signal')} --signal " \
        "local or both"
    unread = {f.name: f"--rule {rule.rule} has no choice of {f.name.replace('_', ' ')}; {readers(f.name)} have"
              for f in dataclasses.fields(RuleConfig) if f.name != "rule" and f.name not in options}
    reasons = {
        "readout": no_readout,
        "objective": no_readout,
        **{name: no_readout or (None if rule.objective in ("pred", "predsim") else
                                f"--objective {rule.objective} has no learned head")
           for name in ("head_feedback", "head_layers")},
        "sim_weight": None if rule.objective == "predsim" else "--sim-weight weighs predsim's two terms",
        "readout_pool": no_readout or ("--readout-pool pools conv maps, and --model mlp has none"
                                       if model.model == "mlp" else None),
        **{name: None if routing.areas != 1 else "a model with --areas 1 has no router"
           for name in ("routing", "router", "routing_dim", "routing_temperature")},
        "block": None if model.depth > 1 or model.block == "plain" else "--block residual applies to hidden "
                 "layers after the first, and --depth 1 has none",
    }
    if model.model != "mlp":        # the conv nets are fixed: the MLP's shape options would be ignored
        reasons.update({name: f"--model {model.model} is a fixed conv net; --{name} shapes the MLP"
                        for name in ("depth", "width", "block", "norm") if model.model != "vgg" or name != "depth"})
    else:
        reasons["conv_areas"] = "--model mlp has no convolutions"
    if not model.model.startswith("vgg"):
        reasons["width_mult"] = f"--width-mult scales the VGG models, not --model {model.model}"
    reasons = {**unread, **{name: why for name, why in reasons.items() if why}}     # the specific reason wins
    refused = [f"--{name.replace('_', '-')} ({why})" for name, why in reasons.items() if name in explicit]
    if refused:
        raise ConfigError(f"{'this flag does' if len(refused) == 1 else 'these flags do'} not apply here: "
                          f"{'; '.join(refused)}. Drop {'it' if len(refused) == 1 else 'them'}")
