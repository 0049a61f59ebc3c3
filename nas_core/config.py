"""Typed, frozen run configuration: loaded from YAML, overridable with ``key=value``, saved everywhere.

The tree mirrors method.md. ``PROTOCOLS`` holds one record per protocol (``paper``, default, and
``code``): every field of ``RunConfig``, nothing left to a dataclass default, its loss, zero op and
augmentation pipeline included, each by its name in its own registry (``nas_core.losses.LOSSES``,
``nas_core.search_space.cell.ZERO_OPS``, ``nas_core.data.augment.PIPELINES``). Adding a protocol is one
entry there (plus its column in method.md section 5); nothing else names protocols.
``load_config`` starts from the record of the chosen protocol; presets, YAML files and ``--set a.b=c``
only override it. The dataclass defaults below serve direct construction (``DataConfig(...)`` in a
test) and old saved configs that lack a newer field; they are never what a protocol means. Unknown or
ill-typed keys are errors that name the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml

CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class ModelConfig:
    # registry name: unet, deeplabv3plus, cbam, scse, nas-scam-s, nas-scam-p (old: unet-cbam, unet-scse)
    name: str = "nas-scam-p"
    # NAS-SCAM search mode: one alpha per slot (synchronous) or one per module kind (shared)
    search: Literal["synchronous", "shared"] = "synchronous"
    # genotype JSON for retraining a NAS-SCAM variant (None during search)
    genotype: Optional[str] = None
    # Zero op on sigmoid edges, a name in nas_core.search_space.cell.ZERO_OPS ("paper" -> 0, "code" -> 0.5);
    # None = the protocol's (resolved by RunConfig, see PROTOCOL_NAMED)
    zero_op: Optional[str] = None
    # supernet implementation: "reference" (one conv per op) or "stacked" (faster, same function)
    impl: Literal["stacked", "reference"] = "stacked"


@dataclass(frozen=True)
class DataConfig:
    # a MoNuSAC-layout folder, an image/mask folder, or None for the generated synthetic dataset
    source: Optional[str] = None
    layout: Literal["auto", "monusac", "monuseg", "folder"] = "auto"
    synthetic_images: int = 24
    synthetic_size: int = 512
    # the data root of this machine (synthetic data and prepared caches), filled in at run time from the
    # settings (NAS_SCAM_HOME / NAS_SCAM_DATA_DIR); a machine path: never saved (see MACHINE_PATHS)
    cache_dir: Optional[str] = None
    stain: Literal["none", "reinhard", "macenko"] = "none"
    # counts "120,39,50" or fractions "0.6,0.2,0.2" for train/val/test
    split: str = "0.6,0.2,0.2"
    split_by: Literal["image", "patient"] = "image"
    crop_size: int = 256
    stride: int = 128
    # crop grid of training, alpha-update and evaluation windows (nas_core/data/tiling.py): "release" =
    # the authors' crop_recover.py (2 * (H // 256) + 1 windows per axis from 0, zero-padded far side);
    # "flush" = the last window ends at the image edge
    grid: Literal["release", "flush"] = "release"
    workers: int = 0
    # patient folds (method.md 6: "a patient-wise split is a useful option"): with folds K > 1 and
    # split_by patient, the patients are dealt into K groups; fold k tests group k, and the other
    # patients are split into train / val by the train:val ratio of ``split`` (at least one val
    # patient). Every patient is tested exactly once over the K folds. 1 = no folds, ``split`` alone.
    folds: int = 1
    fold: int = 0
    # seeds the synthetic data and the split; separate from the run seed so that repeated runs
    # (Table 2's 3 seeds) see the same data and split, as in the paper
    seed: int = 0


@dataclass(frozen=True)
class AugmentConfig:
    # a name in nas_core.data.augment.PIPELINES ("paper": rotate/flip/blur/median/elastic, "code": Gaussian
    # blur p=0.2, "none"); None = the protocol's (resolved by RunConfig, see PROTOCOL_NAMED)
    pipeline: Optional[str] = None
    strength: float = 1.0


@dataclass(frozen=True)
class LossConfig:
    # a name in nas_core.losses.LOSSES (paper: exp_log, Wong et al.; code: exp_log_dice); None = the
    # protocol's (resolved by RunConfig, see PROTOCOL_NAMED)
    name: Optional[str] = None


ValTiming = Literal["start", "end"]
Sampler = Literal["balanced", "uniform"]


def validation_epochs(epochs: int, every: int, timing: str) -> list[int]:
    """Epochs that validate. "start" (the release): at the start of every epoch with
    ``epoch % every == 0``, before it trains, so the final state is never validated; "end": after every
    ``every``-th epoch and after the last."""
    if timing == "start":
        return [e for e in range(epochs) if e % every == 0]
    return [e for e in range(epochs) if (e + 1) % every == 0 or e == epochs - 1]


def trained_epochs(epoch: int, timing: str) -> int:
    """How many epochs of training the weights validated in ``epoch`` have had."""
    return epoch if timing == "start" else epoch + 1


@dataclass(frozen=True)
class SearchConfig:
    epochs: int = 120
    warmup_epochs: int = 40
    # paper: alternate a w step and an alpha step per iteration; code: per epoch (epoch % 3 == 0 -> w)
    alternation: Literal["iteration", "epoch"] = "iteration"
    lr_w: float = 1e-4
    lr_alpha: float = 1e-3
    reset_optimizer_each_epoch: bool = False
    # iterations of every search epoch (w, alpha and alternating ones); None = the release's rule:
    # ceil(n1 / 2) for w and alternating epochs, ceil(m1 / 2) for alpha epochs, n1 / m1 = class-1
    # crops of the training / alpha-update buckets (nas_core.engine.batches.epoch_lengths)
    iters_per_epoch: Optional[int] = None
    # validation (method.md 5a): every `val_every` epochs, at the epoch's start (the release) or end.
    # The paper gives no schedule, so both protocols take the release's: start of every 3rd epoch
    val_every: int = 3
    val_timing: ValTiming = "start"
    # the genotype comes from the best validation of weights trained for more than this many epochs
    # (with "start" timing: validations in epochs > genotype_after). None = warmup_epochs (the paper:
    # after the warm-up); the release: 60, literally, whatever the number of epochs
    genotype_after: Optional[int] = None
    per_class: int = 1
    # how w and alpha batches are drawn: "balanced" (the release: per_class crops from every class
    # bucket) or "uniform" (any window of the split, same batch size; nas_core.data.dataset)
    sampler: Sampler = "balanced"

    @property
    def genotype_threshold(self) -> int:
        return self.warmup_epochs if self.genotype_after is None else self.genotype_after

    def validation_epochs(self) -> list[int]:
        return validation_epochs(self.epochs, self.val_every, self.val_timing)

    def genotype_epochs(self) -> list[int]:
        """The validations that may give the genotype (release, 120 epochs: 63, 66, ..., 117)."""
        return [e for e in self.validation_epochs()
                if trained_epochs(e, self.val_timing) > self.genotype_threshold]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    lr: float = 1e-4
    # iterations per epoch; None = the release's ceil(n1 / 2), n1 = class-1 training crops
    iters_per_epoch: Optional[int] = None
    val_every: int = 3
    val_timing: ValTiming = "start"
    per_class: int = 1
    # "balanced" (the release's one crop per class bucket) or "uniform" (see SearchConfig.sampler)
    sampler: Sampler = "balanced"

    def validation_epochs(self) -> list[int]:
        return validation_epochs(self.epochs, self.val_every, self.val_timing)


@dataclass(frozen=True)
class RunConfig:
    # a key of PROTOCOLS (checked on construction, so a new table entry needs no other edit)
    protocol: str = "paper"
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    # bf16 autocast on CUDA, an opt-in speed option (the paper and the release train in float32);
    # ignored on CPU
    amp: bool = False
    # TF32 tensor cores for float32 convs and matmuls on CUDA (Ampere or newer); False = strict float32
    tf32: bool = True
    channels_last: bool = True
    # torch.compile of the model's forward: "off", or a torch.compile mode ("reduce-overhead" = CUDA
    # graphs on a GPU, for the launch-bound small-batch steps). Same function, same state_dict keys.
    compile: CompileMode = "off"
    # optimisation steps with a non-finite loss or gradient are skipped; this many in a row fail the run
    max_nonfinite_steps: int = 3
    # a machine path, never saved (see MACHINE_PATHS)
    out_dir: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # None in a PROTOCOL_NAMED field (an old saved config, ``--set loss.name=null``) means the protocol
        # record's name: filled in here, once, so every RunConfig names its loss, zero op and pipeline
        record = protocol_record(self.protocol)
        for dotted in PROTOCOL_NAMED:
            section, key = dotted.split(".")
            part = getattr(self, section)
            if getattr(part, key) is None:
                # frozen: set once, during construction
                object.__setattr__(self, section, dataclasses.replace(part, **{key: record[section][key]}))

    # ---- short names of the PROTOCOL_NAMED fields (never None after construction) ----
    @property
    def zero_op(self) -> str:
        return self.model.zero_op

    @property
    def loss_name(self) -> str:
        return self.loss.name

    @property
    def augment_pipeline(self) -> str:
        return self.augment.pipeline

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def portable_dict(self) -> dict[str, Any]:
        """``to_dict`` without the machine paths (None): what checkpoints save."""
        return _clear(self.to_dict(), MACHINE_PATHS)

    def run_differences(self, other: "RunConfig") -> list[str]:
        """Dotted keys whose values differ, ``LOCATION_PATHS`` aside (resume's test): empty when
        ``other`` describes the same run wherever its files lie."""
        a, b = (flatten(_clear(c.to_dict(), LOCATION_PATHS)) for c in (self, other))
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# Paths that say where things lie on this machine, not what the run is: the runs folder and the data
# root come from the settings at run time and are never saved into checkpoints, so a checkpoint copied
# to another machine or folder loads, evaluates and resumes there.
MACHINE_PATHS = ("out_dir", "data.cache_dir")
# Saved (they tell where a run's inputs came from) but not compared on resume: the source folder may lie
# elsewhere on another machine, and the genotype file's content is compared through the model spec
# (engine/checkpoint.py load_weights).
LOCATION_PATHS = (*MACHINE_PATHS, "data.source", "model.genotype")


def _clear(d: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of the nested dict ``d`` with the ``dotted`` keys set to None."""
    out = json.loads(json.dumps(d))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = None
    return out


# method.md sections 5, 5a and 6: the record of each protocol, one line per section. Every RunConfig
# field appears in each (a test checks them against the dataclasses and against method.md's table); a
# field added to a dataclass is added here, in every record. The loss, zero op and pipeline are names in
# their registries (PROTOCOL_NAMED); ``zero_op`` and ``pipeline`` names are those of the protocol that
# brought each in, and any protocol may name any of them.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {
        "protocol": "paper", "seed": 0, "device": "auto", "deterministic": False,
        "amp": False, "tf32": True, "channels_last": True, "compile": "off", "out_dir": None,
        "max_nonfinite_steps": 3,
        "model": {"name": "nas-scam-p", "search": "synchronous", "genotype": None, "zero_op": "paper",
                  "impl": "stacked"},
        # 209 = MoNuSAC's training release, so the synthetic stand-in splits 120 / 39 / 50 as the paper
        "data": {"source": None, "layout": "auto", "synthetic_images": 209, "synthetic_size": 512,
                 "cache_dir": None, "stain": "macenko", "split": "120,39,50", "split_by": "image",
                 "crop_size": 256, "stride": 128, "grid": "release", "workers": 0, "folds": 1, "fold": 0,
                 "seed": 0},
        "augment": {"pipeline": "paper", "strength": 1.0},
        "loss": {"name": "exp_log"},
        "search": {"epochs": 120, "warmup_epochs": 40, "alternation": "iteration", "lr_w": 1e-4, "lr_alpha": 1e-3,
                   "reset_optimizer_each_epoch": False, "iters_per_epoch": None, "val_every": 3, "per_class": 1,
                   "val_timing": "start", "genotype_after": None, "sampler": "balanced"},
        "train": {"epochs": 300, "lr": 1e-4, "iters_per_epoch": None, "val_every": 3, "per_class": 1,
                  "val_timing": "start", "sampler": "balanced"},
    },
    "code": {
        "protocol": "code", "seed": 0, "device": "auto", "deterministic": False,
        "amp": False, "tf32": True, "channels_last": True, "compile": "off", "out_dir": None,
        "max_nonfinite_steps": 3,
        "model": {"name": "nas-scam-p", "search": "synchronous", "genotype": None, "zero_op": "code",
                  "impl": "stacked"},
        # the release hard-codes 41 validation and 48 test images; its arrays came pre-normalised
        "data": {"source": None, "layout": "auto", "synthetic_images": 209, "synthetic_size": 512,
                 "cache_dir": None, "stain": "none", "split": "120,41,48", "split_by": "image",
                 "crop_size": 256, "stride": 128, "grid": "release", "workers": 0, "folds": 1, "fold": 0,
                 "seed": 0},
        "augment": {"pipeline": "code", "strength": 1.0},
        "loss": {"name": "exp_log_dice"},
        "search": {"epochs": 120, "warmup_epochs": 20, "alternation": "epoch", "lr_w": 1e-3, "lr_alpha": 1e-3,
                   "reset_optimizer_each_epoch": True, "iters_per_epoch": None, "val_every": 3, "per_class": 1,
                   "val_timing": "start", "genotype_after": 60, "sampler": "balanced"},
        "train": {"epochs": 300, "lr": 1e-3, "iters_per_epoch": None, "val_every": 3, "per_class": 1,
                  "val_timing": "start", "sampler": "balanced"},
    },
}


# The fields a protocol fills with a name from a registry: dotted key -> (what it names, "module:TABLE").
# None there means "the protocol's" (RunConfig.__post_init__); ``_check_registered`` checks every name.
PROTOCOL_NAMED: dict[str, tuple[str, str]] = {
    "model.zero_op": ("zero op", "nas_core.search_space.cell:ZERO_OPS"),
    "loss.name": ("loss", "nas_core.losses:LOSSES"),
    "augment.pipeline": ("augmentation pipeline", "nas_core.data.augment:PIPELINES"),
}

# the protocols as a type, for pydantic schemas (orchestrator/specs.py): derived from the table at import
ProtocolName = Literal[tuple(PROTOCOLS)]  # type: ignore[valid-type]


def protocol_record(protocol: str) -> dict[str, Any]:
    """The record of ``protocol`` itself (read it, never change it); ConfigError naming ``protocol``."""
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: {protocol!r} is not one of {', '.join(map(repr, PROTOCOLS))}")
    return PROTOCOLS[protocol]


def protocol_table(protocol: str) -> dict[str, Any]:
    """A copy of the complete record of ``protocol`` (nested like ``RunConfig.to_dict()``)."""
    return json.loads(json.dumps(protocol_record(protocol)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"search.lr_w": 1e-4, ...}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff_from_protocol(cfg: "RunConfig") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (protocol value, config value)}`` for every field where ``cfg`` leaves its table."""
    table, mine = flatten(protocol_table(cfg.protocol)), flatten(cfg.to_dict())
    return {k: (table.get(k), v) for k, v in mine.items() if k not in table or table[k] != v}


# Presets, laid over the protocol table: ``smoke`` (CPU minutes: shrinks crops, data, steps and epochs, never
# the architecture) and ``small-data`` (the real-tissue study's one established change).
PRESETS: dict[str, dict[str, Any]] = {
    # sized so that the 8 x 3 smoke Table 2 runs in minutes on 2 CPU cores (the supernet is ~4x the
    # U-Net's FLOPs): 32 px crops of 128 px synthetic images, a few iterations per epoch
    "smoke": {
        # fractions: a count split (120,39,50) needs exactly that many images
        "data": {"synthetic_images": 12, "synthetic_size": 128, "crop_size": 32, "stride": 16,
                 "split": "0.6,0.2,0.2"},
        # validation after every epoch (the release's "start of every 3rd" would leave a 1-epoch search
        # without a validated alpha), genotype window after the warm-up in both protocols
        "search": {"epochs": 3, "warmup_epochs": 1, "iters_per_epoch": 4, "val_every": 1, "val_timing": "end",
                   "genotype_after": None},
        "train": {"epochs": 4, "iters_per_epoch": 8, "val_every": 1, "val_timing": "end"},
    },
    # What the real-tissue study (docs/results/real-tissue-study.md, issue 26) established on 12 MoNuSAC
    # patients at the CPU budget: the Dice loss over the paper's Wong loss, +3.7 [+2.4, +5.1] points of
    # per-image DSC over 4 patient folds. Only that: the sampler (balanced better), stain (nil), larger
    # crops and more steps (not established) and threshold calibration (costs the Dice recipe) stay as
    # the protocol has them. Everything else is the protocol's.
    "small-data": {"loss": {"name": "soft_dice"}},
}


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # JSON's 1e400 and YAML's .inf parse to infinity, 10**400 overflows: no rate or strength means that
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {str(value)[:40]}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def parse_override(item: str) -> dict[str, Any]:
    """``"search.lr_w=1e-3"`` -> ``{"search": {"lr_w": 0.001}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML 1.1 reads "1e-3" as a string; accept it as the float a user means
    value = _fix_yaml_floats(value)
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def nest_dotted(data: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": "1e-3", "data": {"stain": "none"}}`` -> ``{"train": {"lr": 0.001}, "data": {...}}``:
    dotted keys expanded at any depth, YAML 1.1's float strings read as the floats a user means."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        value = nest_dotted(value) if isinstance(value, dict) else _fix_yaml_floats(value)
        for part in reversed(str(key).split(".")):
            value = {part: value}
        out = _deep_merge(out, value)
    return out


def apply_overrides(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a config dict, whole or partial) with ``update`` (nested or dotted keys) merged over it;
    neither argument changes."""
    return _deep_merge(base, nest_dotted(update))


def _fix_yaml_floats(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, str):
        try:
            if any(c in data for c in "eE") and data[0] in "0123456789.+-":
                return float(data)
        except ValueError:
            return data
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[Exception] = ConfigError) -> dict:
    """A YAML file holding a mapping (``1e-3`` read as a float); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{what} {p} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise error(f"{what} {p} must hold a mapping at the top level")
    return _fix_yaml_floats(loaded)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Build a RunConfig: protocol table < preset < YAML file < ``base`` < overrides."""
    layers: list[dict[str, Any]] = []
    if path is not None:
        layers.append(read_yaml_mapping(path))
    if base:
        layers.append(base)
    layers.extend(parse_override(o) for o in overrides)
    user: dict[str, Any] = {}
    for layer in layers:
        user = _deep_merge(user, layer)
    merged = protocol_table(user.get("protocol", "paper"))
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        merged = _deep_merge(merged, PRESETS[preset])
    merged = _deep_merge(merged, user)
    cfg = _build(RunConfig, merged)
    _validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a saved config exactly (no protocol table re-applied)."""
    cfg = _build(RunConfig, data)
    _validate(cfg)
    return cfg


# Bounds of every integer key, checked first (``_check_limits``), before anything is built from a value
# (the search's validation epochs, a synthetic dataset, a crop grid) and whichever way the value came (a
# spec field, ``overrides:``, an HPO space value, ``--set``, a saved config). Far past any real study
# (the paper: 120 + 300 epochs, 256 px crops); what a server admits is tighter (api/validation.py).
# ``data.folds``/``data.fold`` are bounded by ``_validate_folds``.
MAX_EPOCHS = 100_000
MAX_SEED = 2**31 - 1  # numpy and torch take 32-bit seeds
LIMITS: dict[str, tuple[int, int]] = {
    "seed": (0, MAX_SEED),
    "max_nonfinite_steps": (1, 1_000_000),
    "data.synthetic_images": (3, 100_000),  # a train, a val and a test image at least
    "data.synthetic_size": (16, 16_384),
    "data.crop_size": (16, 4096),
    "data.stride": (1, 4096),
    "data.workers": (0, 256),
    "data.seed": (0, MAX_SEED),
    "search.epochs": (1, MAX_EPOCHS),
    "search.warmup_epochs": (0, MAX_EPOCHS),
    "search.iters_per_epoch": (1, 1_000_000),
    "search.val_every": (1, MAX_EPOCHS),
    "search.genotype_after": (0, MAX_EPOCHS),
    "search.per_class": (1, 1024),
    "train.epochs": (1, MAX_EPOCHS),
    "train.iters_per_epoch": (1, 1_000_000),
    "train.val_every": (1, MAX_EPOCHS),
    "train.per_class": (1, 1024),
}
# windows per image grow as (crop_size / stride)**2: a stride under crop_size / 8 is a typo (64x the
# windows of the release's stride = crop / 2), not a study
MIN_STRIDE_FRACTION = 8


def _value(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_limits(cfg: RunConfig) -> None:
    for key, (low, high) in LIMITS.items():
        value = _value(cfg, key)
        if value is not None and not low <= value <= high:
            bound = f">= {low}" if value < low else f"<= {high}"
            raise ConfigError(f"{key} must be {bound} (allowed {low}..{high}), got {str(value)[:40]}")


def _validate(cfg: RunConfig) -> None:
    _check_limits(cfg)
    d = cfg.data
    checks = [
        # the genotype comes from the best validation after warm-up, so at least one epoch must follow it
        (cfg.search.warmup_epochs < cfg.search.epochs, "search.warmup_epochs", "must be smaller than search.epochs"),
        (cfg.search.lr_w > 0 and cfg.search.lr_alpha > 0, "search.lr_w/lr_alpha", "must be > 0"),
        (cfg.train.lr > 0, "train.lr", "must be > 0"),
        (cfg.augment.strength >= 0, "augment.strength", "must be >= 0 (0 = no augmentation)"),
        (d.crop_size % 16 == 0, "data.crop_size", "must be a multiple of 16"),
        (d.stride <= d.crop_size, "data.stride", "must be in (0, crop_size]"),
        (d.stride * MIN_STRIDE_FRACTION >= d.crop_size, "data.stride",
         f"must be >= data.crop_size / {MIN_STRIDE_FRACTION} ({d.crop_size} / {MIN_STRIDE_FRACTION}): windows per "
         f"image grow as (crop_size / stride)^2"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key} {msg}" + ("" if "/" in key else f", got {_value(cfg, key)}"))
    _check_registered(cfg)
    _validate_folds(cfg.data)
    _check_genotype_window(cfg.search)


def _check_registered(cfg: RunConfig) -> None:
    """Each PROTOCOL_NAMED field names an entry of its registry (a protocol's record included)."""
    for dotted, (what, where) in PROTOCOL_NAMED.items():
        # imported here: the registries pull in torch and OpenCV, and reading a config must stay cheap
        module, table = where.split(":")
        registry = getattr(importlib.import_module(module), table)
        name = _value(cfg, dotted)
        if name not in registry:
            raise ConfigError(f"{dotted}: {name!r} is not a registered {what}; valid names: "
                              f"{', '.join(sorted(registry))} (or null: the protocol's)")


def _last_validation(epochs: int, every: int, timing: str) -> int:
    """``validation_epochs(...)[-1]`` without the list (epochs may be large): "end" always validates
    the last epoch, "start" the last multiple of ``every``."""
    return epochs - 1 if timing == "end" else (epochs - 1) // every * every


def _check_genotype_window(s: SearchConfig) -> None:
    # O(1): the latest validation has the most trained weights, so it alone decides whether any counts
    if trained_epochs(_last_validation(s.epochs, s.val_every, s.val_timing), s.val_timing) > s.genotype_threshold:
        return
    raise ConfigError(
        f"search.genotype_after: no validation can give the genotype: a {s.epochs}-epoch search validates "
        f"in epochs {_span(s.epochs, s.val_every, s.val_timing)} (val_every={s.val_every}, "
        f"val_timing={s.val_timing}), and only weights trained for more than {s.genotype_threshold} epochs count "
        f"(genotype_after={s.genotype_after}, warmup_epochs={s.warmup_epochs}); lower search.genotype_after "
        f"(the release's 60 needs at least 64 epochs) or add epochs")


def _validate_folds(d: DataConfig) -> None:
    if not 1 <= d.folds <= MAX_FOLDS:
        raise ConfigError(f"data.folds must be between 1 (no folds) and {MAX_FOLDS}, got {d.folds}")
    if not 0 <= d.fold < d.folds:
        raise ConfigError(f"data.fold must be in 0..{d.folds - 1} (data.folds={d.folds}), got {d.fold}")
    if d.folds > 1 and d.split_by != "patient":
        raise ConfigError(f"data.folds={d.folds} deals whole patients into folds: set data.split_by to 'patient' "
                          f"(got {d.split_by!r})")


# folds are patient groups; more than this is a typo (MoNuSAC has 46 training patients)
MAX_FOLDS = 50


def _span(epochs: int, every: int, timing: str) -> str:
    """The validation epochs, the first few and the last, built from at most 7 of them."""
    # the first 7 * every epochs hold the first 7 validations, exactly as the whole run has them
    head = validation_epochs(min(epochs, 7 * every), every, timing)
    if len(head) <= 6:
        return ", ".join(map(str, head))
    return f"{head[0]}, {head[1]}, ..., {_last_validation(epochs, every, timing)}"
