"""Run, ablation and HPO specs (pydantic v2, unknown keys are errors), shared with the API.

A spec is data: which methods and seeds (the grid), which protocol, and one partial ``RunConfig``
(``override``: ``overrides:`` plus the ``data:`` / ``epochs:`` shorthands) laid over the protocol table
and preset. Validation builds each method's config once (``trial_configs``, which the API checks);
``orchestrator.plan`` derives every trial's config dict from those (``trial_config``: + seed, genotype).
Trials receive the dicts, never the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from nas_core.config import (LIMITS, ConfigError, ProtocolName, RunConfig, apply_overrides, config_from_dict, flatten,
                             load_config, nest_dotted, read_yaml_mapping)


@dataclass(frozen=True)
class Method:
    """A Table 2 row: the registry model it trains and, for NAS-SCAM, its search mode. A random control
    (``control_of`` names its searched variant) retrains a genotype drawn uniformly from the same
    space instead of a searched one (``Genotype.random``)."""

    id: str
    label: str  # the paper's row name (experiments/reference_table2.csv)
    model: str
    search: Optional[Literal["synchronous", "shared"]] = None
    control_of: Optional[str] = None

    @property
    def needs_search(self) -> bool:
        return self.search is not None and self.control_of is None

    @property
    def draws_genotype(self) -> bool:
        return self.control_of is not None

    @property
    def combine(self) -> str:
        return "parallel" if self.model.endswith("-p") else "serial"


# Table 2 order (method.md section 8).
METHODS: dict[str, Method] = {m.id: m for m in (
    Method("unet", "U-Net", "unet"),
    Method("deeplabv3plus", "DeepLabV3+", "deeplabv3plus"),
    Method("cbam", "CBAM", "cbam"),
    Method("scse", "scSE", "scse"),
    Method("nas-scam-s-shared", "NAS-SCAM-S, shared search", "nas-scam-s", "shared"),
    Method("random-s-shared", "Random-S, shared (control)", "nas-scam-s", "shared", "nas-scam-s-shared"),
    Method("nas-scam-p-shared", "NAS-SCAM-P, shared search", "nas-scam-p", "shared"),
    Method("random-p-shared", "Random-P, shared (control)", "nas-scam-p", "shared", "nas-scam-p-shared"),
    Method("nas-scam-s-sync", "NAS-SCAM-S, synchronous search", "nas-scam-s", "synchronous"),
    Method("random-s-sync", "Random-S, synchronous (control)", "nas-scam-s", "synchronous", "nas-scam-s-sync"),
    Method("nas-scam-p-sync", "NAS-SCAM-P, synchronous search", "nas-scam-p", "synchronous"),
    Method("random-p-sync", "Random-P, synchronous (control)", "nas-scam-p", "synchronous", "nas-scam-p-sync"),
)}
# the paper's eight rows (a spec's default methods); the random controls are asked for by name
PAPER_METHODS = tuple(m for m in METHODS if METHODS[m].control_of is None)

PHASES = ("search", "train")


def get_method(method_id: str) -> Method:
    try:
        return METHODS[method_id]
    except KeyError:
        raise ConfigError(f"unknown method {method_id!r}; valid methods: {', '.join(METHODS)}") from None


@dataclass(frozen=True)
class RunId:
    """Who a run is: phase, method, seed and, in grids that have them, the random draw, the patient fold
    and the axes variant (``data.stain=none+train.lr=0.001``). ``name`` is its folder / MLflow run name."""

    phase: str
    method: str
    seed: int
    draw: Optional[int] = None
    fold: Optional[int] = None
    variant: str = ""

    @property
    def name(self) -> str:
        return run_name(self.phase, self.method, self.seed, draw=self.draw, fold=self.fold, variant=self.variant)


def run_name(phase: str, method: str, seed: int, *, draw: Optional[int] = None, fold: Optional[int] = None,
             variant: str = "") -> str:
    """Run names encode identity: ``search__nas-scam-p-sync__seed1``, and in larger grids
    ``train__random-p-sync__seed0__draw1__fold2__data.stain=none`` (each part only where the grid has it)."""
    name = f"{phase}__{method}__seed{seed}"
    if draw is not None:
        name += f"__draw{draw}"
    if fold is not None:
        name += f"__fold{fold}"
    return name + (f"__{variant}" if variant else "")


_RUN_NAME = re.compile(r"^(?P<phase>search|train|full)__(?P<method>[A-Za-z0-9][A-Za-z0-9-]*)__seed(?P<seed>\d+)"
                       r"(?:__draw(?P<draw>\d+))?(?:__fold(?P<fold>\d+))?(?:__(?P<variant>.+))?$")


def parse_run_name(name: str) -> Optional[RunId]:
    """``run_name``'s inverse; None for a name that is not a run's."""
    m = _RUN_NAME.match(name)
    if m is None:
        return None
    return RunId(m["phase"], m["method"], int(m["seed"]), draw=int(m["draw"]) if m["draw"] else None,
                 fold=int(m["fold"]) if m["fold"] else None, variant=m["variant"] or "")


# A spec's name is a folder and an MLflow experiment name: an identifier, never a path
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MAX_NAME_LENGTH = 64
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
# seeds reach numpy and torch; larger values are typos, not studies
MAX_SEED_VALUE = LIMITS["seed"][1]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED_VALUE)]
# an HPO space is a few dimensions of a few values each; these bound the configs it expands into
MAX_SPACE_DIMS, MAX_CHOICES = 16, 32


class _Spec(BaseModel):
    # strict: "1000" is not 1000 (a string would slip past every numeric bound); floats still take ints
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ResourceSpec(_Spec):
    """Per-trial resources; fractional GPUs let several trials share one card."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


def _bounded(key: str):
    """An optional shorthand field with the bounds of the RunConfig ``key`` it sets (``LIMITS``)."""
    low, high = LIMITS[key]
    return Field(None, ge=low, le=high)


class DataSpec(_Spec):
    """Data source and preparation; ``None`` keeps the protocol/preset value."""

    source: Optional[str] = None  # MoNuSAC or image/mask folder; None -> the synthetic dataset
    layout: Optional[Literal["auto", "monusac", "monuseg", "folder"]] = None
    stain: Optional[Literal["none", "reinhard", "macenko"]] = None
    split: Optional[str] = None
    split_by: Optional[Literal["image", "patient"]] = None
    synthetic_images: Optional[int] = _bounded("data.synthetic_images")
    synthetic_size: Optional[int] = _bounded("data.synthetic_size")
    crop_size: Optional[int] = _bounded("data.crop_size")
    stride: Optional[int] = _bounded("data.stride")
    # patient folds: an ablation runs every trial on each of the K folds (nas_core.data.prepare)
    folds: Optional[int] = Field(None, ge=1)


class EpochSpec(_Spec):
    """Epoch/step overrides, the knobs a shorter ablation turns."""

    search: Optional[int] = _bounded("search.epochs")
    warmup: Optional[int] = _bounded("search.warmup_epochs")
    train: Optional[int] = _bounded("train.epochs")
    search_iters: Optional[int] = _bounded("search.iters_per_epoch")
    train_iters: Optional[int] = _bounded("train.iters_per_epoch")


# the ``epochs:`` shorthand of a spec -> the RunConfig key each of its fields sets
EPOCH_KEYS = {"search": "search.epochs", "warmup": "search.warmup_epochs", "train": "train.epochs",
              "search_iters": "search.iters_per_epoch", "train_iters": "train.iters_per_epoch"}

# RunConfig keys that say which trial a config is: a spec's grid fields set them, never ``overrides:``
# (a value there used to be overwritten without a word); each -> the spec field to use instead
IDENTITY_KEYS = {
    "model.name": "method: (methods: in an ablation)",
    "model.search": "method: (methods: in an ablation; the method picks its search mode)",
    "model.genotype": "genotype: (kind train or hpo; an ablation retrains the genotypes its searches find)",
    "seed": "seed: (seeds: in an ablation)",
}


def _refuse_identity(layer: dict[str, Any]) -> None:
    flat = flatten(layer)
    for key, instead in IDENTITY_KEYS.items():
        if key in flat:
            raise ConfigError(f"overrides.{key}: a trial's identity is not an override (from overrides: or "
                              f"--set it would be ignored); use the spec field {instead}")


class _ConfigSpec(_Spec):
    """The fields every spec kind shares: a partial RunConfig laid over the protocol table and preset."""

    protocol: ProtocolName = "paper"  # a key of nas_core.config.PROTOCOLS
    preset: Optional[str] = None
    data: DataSpec = DataSpec()
    epochs: EpochSpec = EpochSpec()
    # any RunConfig keys, nested or dotted ("train.lr": 1e-3); checked against RunConfig on load
    overrides: dict[str, Any] = Field(default_factory=dict)
    resources: ResourceSpec = ResourceSpec()
    # built once by validation (trial_configs): every checked config, and each method's own config,
    # from which every trial's config is derived (trial_config). model_copy(update=...) skips validation
    # and keeps them: fine for the grid fields (methods, seeds, repeat, name), stale for the others
    _configs: list = PrivateAttr(default_factory=list)
    _bases: dict = PrivateAttr(default_factory=dict)

    @property
    def configs(self) -> list[tuple[str, RunConfig]]:
        """``trial_configs(self)``, as validation built them."""
        return self._configs or trial_configs(self)

    def override(self) -> dict[str, Any]:
        """The partial RunConfig (nested dict) of this spec: ``overrides:``, then the ``data:`` and
        ``epochs:`` shorthands, then ``protocol:``."""
        layer = nest_dotted(self.overrides)
        _refuse_identity(layer)
        if layer.get("protocol", self.protocol) != self.protocol:
            raise ConfigError(f"overrides.protocol {layer['protocol']!r}: the spec's protocol: field "
                              f"({self.protocol!r}) picks the protocol table; set it there")
        short = {f"data.{k}": v for k, v in self.data.model_dump(exclude_none=True).items()}
        short.update({EPOCH_KEYS[k]: v for k, v in self.epochs.model_dump(exclude_none=True).items()})
        return apply_overrides(layer, {**short, "protocol": self.protocol})

    def base_config(self, method: str) -> RunConfig:
        """The config of ``method`` at the spec's first seed (and genotype, when it names one), as
        validation built it."""
        if method not in self._bases:
            self._bases[method] = _method_config(self, method)
        return self._bases[method]


# RunConfig keys that name files or folders (a test keeps this in step with RunConfig's string fields)
PATH_KEYS = ("data.source", "data.cache_dir", "model.genotype", "out_dir")


def _first_seed(spec: _ConfigSpec) -> int:
    return spec.seed_list[0] if isinstance(spec, AblationSpec) else spec.seed


def _method_config(spec: _ConfigSpec, method: str) -> RunConfig:
    """Protocol table < preset < the spec's override < the method's identity, first seed, spec genotype."""
    m = get_method(method)
    model: dict[str, Any] = {"name": m.model, "genotype": getattr(spec, "genotype", None)}
    if m.search is not None:
        model["search"] = m.search
    layer = apply_overrides(spec.override(), {"model": model, "seed": _first_seed(spec)})
    return load_config(preset=spec.preset, base=layer)


def trial_config(spec: _ConfigSpec, method: str, seed: int, *, data_root: Optional[Path] = None,
                 genotype: Optional[Path] = None, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The RunConfig dict of one (method, seed) of ``spec``: the method's validated config with ``extra``
    (dotted RunConfig keys, an HPO sample) applied, then this seed, ``genotype`` (a NAS-SCAM retrain)
    and ``data_root``. ``config_from_dict`` turns it into the RunConfig."""
    cfg = spec.base_config(method).to_dict()
    if extra:
        cfg = apply_overrides(cfg, extra)
    identity: dict[str, Any] = {"seed": seed, "model": {"genotype": str(genotype) if genotype is not None else None}}
    if data_root is not None:
        identity["data"] = {"cache_dir": str(data_root)}
    return apply_overrides(cfg, identity)


def build_config(spec: _ConfigSpec, method: str, seed: int, *, data_root: Optional[Path] = None,
                 genotype: Optional[Path] = None, extra: Optional[dict[str, Any]] = None) -> RunConfig:
    """``trial_config`` as a RunConfig (for one run outside a plan: ``serve``, the benchmarks)."""
    return config_from_dict(trial_config(spec, method, seed, data_root=data_root, genotype=genotype, extra=extra))


class RunSpec(_ConfigSpec):
    """One method and seed: a search, a retrain, or a pipeline (search then retrain)."""

    kind: Literal["search", "train", "pipeline"]
    name: Name = "runs"
    method: str
    seed: Seed = 0
    genotype: Optional[str] = None  # for kind=train of a NAS-SCAM method

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        get_method(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> "RunSpec":
        m = get_method(self.method)
        if m.draws_genotype and (self.kind != "train" or not self.genotype):
            raise ValueError(f"method {self.method!r} is a random control: an ablation draws its genotype per seed "
                             f"(methods: [{self.method}]); a single run takes kind: train with genotype: PATH")
        if self.kind == "search" and not m.needs_search:
            raise ValueError(f"method {self.method!r} has no search phase (kind: search)")
        if self.kind == "train" and m.needs_search and not self.genotype:
            raise ValueError(f"kind: train of {self.method!r} needs genotype: a genotype.json path")
        _check_configs(self)
        return self


# a grid is methods x seeds trials; more seeds than this is a typo, not a study
MAX_SEEDS = 1000
# the other grid dimensions: random draws per seed, axes, values per axis, variants in all
MAX_DRAWS, MAX_AXES, MAX_AXIS_VALUES, MAX_VARIANTS = 100, 4, 16, 64
MAX_RUN_NAME = 200  # bytes: a folder and an MLflow run name
# keys an axis may not vary: the trial's identity (methods and seeds are the grid's own), the fold
# (data.folds makes folds), machine paths
AXIS_FORBIDDEN = (*IDENTITY_KEYS, "data.fold", "data.folds", "data.cache_dir", "out_dir")
AxisValue = Union[bool, int, float, Annotated[str, StringConstraints(max_length=200)]]


def axis_label(key: str, value: Any) -> str:
    """``data.stain=none``: one axis value as it appears in run names (characters that a folder or an
    MLflow filter would not take become '-')."""
    text = f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9._=-]", "-", f"{key}={text}")


class AblationSpec(_ConfigSpec):
    """Methods x seeds: the Table 2 grid."""

    kind: Literal["ablation"] = "ablation"
    name: Name = "table2"
    methods: list[str] = Field(default_factory=lambda: list(PAPER_METHODS), min_length=1)
    # a count N (seeds 0..N-1) or explicit seeds
    seeds: Union[int, list[Seed]] = 3
    # retrain (default, the release's): one search per NAS method (first seed), every seed retrains
    # that genotype; full: a search and a retrain per seed
    repeat: Literal["full", "retrain"] = "retrain"
    # the "+-" over seeds: population std (default, ddof=0, the release's np.std) or sample (ddof=1)
    std: Literal["population", "sample"] = "population"
    max_failures: int = Field(1, ge=0)
    max_concurrent: Optional[int] = Field(None, ge=1)
    # random controls (random-*): genotypes drawn per seed; N > 1 retrains N draws of each seed
    random_draws: int = Field(1, ge=1, le=MAX_DRAWS)
    # factor axes: dotted RunConfig key -> values; the grid is methods x seeds x the axes' product
    # (x folds). A search is shared by the variants whose search runs have the same config (an axis
    # of train.* keys only changes retrains: one search serves all its values)
    axes: dict[str, list[AxisValue]] = Field(default_factory=dict, max_length=MAX_AXES)

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if key.split(".")[0] in ("protocol",) or key in AXIS_FORBIDDEN:
                raise ValueError(f"axes.{key}: not an axis (identity, fold or machine path; allowed: any other "
                                 f"RunConfig key such as data.stain or train.lr)")
            if not 1 <= len(values) <= MAX_AXIS_VALUES:
                raise ValueError(f"axes.{key}: needs 1 to {MAX_AXIS_VALUES} values, got {len(values)}")
            labels = [axis_label(key, x) for x in values]
            # distinct in any letter case: variant labels name run folders, one on a case-insensitive disk
            if len({lab.casefold() for lab in labels}) != len(labels):
                raise ValueError(f"axes.{key}: values must be distinct (ignoring letter case: they name run "
                                 f"folders), got {values}")
        n = 1
        for values in v.values():
            n *= len(values)
        if n > MAX_VARIANTS:
            raise ValueError(f"axes: {n} variants (the product of the value counts); at most {MAX_VARIANTS}")
        return v

    @property
    def variants(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, dotted overrides) of every point of the axes' product, in spec order; [("", {})]
        without axes. Label: ``data.stain=none+train.lr=0.001``."""
        out: list[tuple[str, dict[str, Any]]] = [("", {})]
        for key, values in self.axes.items():
            out = [(f"{lab}+{axis_label(key, x)}" if lab else axis_label(key, x), {**ov, key: x})
                   for lab, ov in out for x in values]
        return out

    @property
    def folds(self) -> int:
        """data.folds as the trials' configs have it (the ``data:`` shorthand, ``overrides:`` or ``--set``)."""
        return self.base_config(self.methods[0]).data.folds

    @property
    def trial_count(self) -> int:
        """Retrains + searches of the grid at most (searches shared between variants counted once each
        variant: an upper bound), what the API's trial limit counts."""
        per_seed = sum(self.random_draws if METHODS[m].draws_genotype else 1 for m in self.methods)
        searches = len(self.search_methods) * (len(self.seed_list) if self.repeat == "full" else 1)
        return (per_seed * len(self.seed_list) + searches) * len(self.variants) * self.folds

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for m in v:
            get_method(m)
        if len(set(v)) != len(v):
            raise ValueError(f"methods lists a method twice: {v}")
        return v

    @field_validator("seeds")
    @classmethod
    def _valid_seeds(cls, v: Union[int, list[int]]) -> Union[int, list[int]]:
        if isinstance(v, int) and not 1 <= v <= MAX_SEEDS:
            raise ValueError(f"seed count must be between 1 and {MAX_SEEDS}, got {v}")
        if isinstance(v, list):
            if len(v) > MAX_SEEDS:
                raise ValueError(f"at most {MAX_SEEDS} seeds, got {len(v)}")
            if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
                raise ValueError(f"explicit seeds must be distinct integers >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AblationSpec":
        _check_configs(self)
        # a run name is a folder name (255 bytes on most filesystems) and an MLflow run name (250 characters
        # in SQL stores): the grid's longest must fit, checked now rather than inside a trial
        longest = max((run_name("train", m, max(self.seed_list),
                                draw=self.random_draws - 1 if self.random_draws > 1 else None,
                                fold=self.folds - 1 if self.folds > 1 else None, variant=v)
                       for m in self.methods for v, _ in self.variants), key=lambda n: len(n.encode()))
        if len(longest.encode()) > MAX_RUN_NAME:
            raise ValueError(f"axes: run names up to {len(longest.encode())} bytes (e.g. {longest[:80]}...), more "
                             f"than {MAX_RUN_NAME}: shorten the axis values")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def search_methods(self) -> list[str]:
        return [m for m in self.methods if METHODS[m].needs_search]


class ParamRange(_Spec):
    """One HPO dimension: ``loguniform``/``uniform``/``int`` over [low, high] or a ``choice``."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: Optional[float] = Field(None, allow_inf_nan=False)
    high: Optional[float] = Field(None, allow_inf_nan=False)
    values: Optional[list[Any]] = Field(None, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _check(self) -> "ParamRange":
        if self.type == "choice":
            if not self.values:
                raise ValueError("type: choice needs a non-empty values list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"type: {self.type} needs low < high, got low={self.low}, high={self.high}")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"type: loguniform needs low > 0, got {self.low}")
        return self


class HpoSpec(_ConfigSpec):
    """Optuna (TPE) + ASHA over retraining hyperparameters of one method."""

    kind: Literal["hpo"] = "hpo"
    name: Name = "hpo"
    method: str = "unet"
    genotype: Optional[str] = None
    seed: Seed = 0
    space: dict[str, ParamRange] = Field(min_length=1, max_length=MAX_SPACE_DIMS)
    num_samples: int = Field(8, ge=1)
    metric: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_./-]+$", max_length=MAX_NAME_LENGTH)] = "val_dsc"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: Optional[int] = Field(None, ge=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        get_method(v)
        return v

    @field_validator("space")
    @classmethod
    def _retrain_keys(cls, v: dict[str, ParamRange]) -> dict[str, ParamRange]:
        for key in v:
            if key.split(".")[0] not in ("train", "loss", "augment", "data"):
                raise ValueError(f"space key {key!r}: only retraining keys (train.*, loss.*, augment.*, data.*)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "HpoSpec":
        if get_method(self.method).needs_search and not self.genotype:
            raise ValueError(f"method {self.method!r} is retrained from a genotype: set genotype: PATH")
        _check_configs(self)
        return self


def trial_configs(spec: _ConfigSpec) -> list[tuple[str, RunConfig]]:
    """Every RunConfig a spec's trials are built from, each with where it comes from.

    One config per method (at its first seed, with the spec's genotype when it gives one) and, for HPO,
    one per choice value and per range end of each space dimension, each taken alone so that no other
    dimension masks it. Paths and sizes are checked on these built configs, whatever key or nesting set
    them. Raises ConfigError naming the source and the dotted key.
    """
    methods = spec.methods if isinstance(spec, AblationSpec) else [spec.method]
    samples: list[tuple[str, dict[str, Any]]] = []
    for key, r in (getattr(spec, "space", None) or {}).items():
        values = r.values if r.type == "choice" else (
            [int(r.low), int(r.high)] if r.type == "int" else [r.low, r.high])
        samples += [(f", space.{key}={str(v)[:80]}", {key: v}) for v in values]
    if isinstance(spec, AblationSpec):
        samples += [(f", variant {label}", ov) for label, ov in spec.variants if ov]
    out = []
    for m in methods:
        label = f"method {m!r}"
        try:
            base = spec.base_config(m)
        except ConfigError as exc:
            raise ConfigError(f"config for {label}: {exc}") from None
        out.append((label, base))
        for where, extra in samples:
            try:
                out.append((label + where, config_from_dict(apply_overrides(base.to_dict(), extra))))
            except ConfigError as exc:
                raise ConfigError(f"config for {label}{where}: {exc}") from None
    return out


def _check_configs(spec: _ConfigSpec) -> None:
    # build every RunConfig now, so a bad override fails at load time, not inside a Ray trial
    try:
        spec._configs = trial_configs(spec)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


AnySpec = Annotated[Union[RunSpec, AblationSpec, HpoSpec], Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(AnySpec)


_KINDS = ("search", "train", "pipeline", "ablation", "hpo")


class SpecError(ValueError):
    """A spec file is missing, not YAML, or invalid; the message names the file and field."""


def _format_errors(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc_parts = list(err["loc"])
        if loc_parts and loc_parts[0] in _KINDS:
            loc_parts = loc_parts[1:]  # drop the discriminator tag pydantic puts first
        loc = ".".join(str(p) for p in loc_parts)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc or '(top level)'}: {msg}" + (f" (got {err['input']!r})" if err["type"] == "extra_forbidden" else ""))
    return f"{source}: " + "; ".join(parts)


def parse_spec(data: dict[str, Any], source: str = "spec") -> Union[RunSpec, AblationSpec, HpoSpec]:
    """Validate a mapping into a spec; ``kind`` defaults to ``ablation``."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = {"kind": "ablation", **data}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(source, exc)) from None


def read_spec(path: str | Path, **updates: Any) -> dict[str, Any]:
    """A YAML spec's mapping, unvalidated; ``updates`` (non-None) replace top-level fields (a mapping
    updates a mapping field key by key)."""
    p = Path(path)
    data = read_yaml_mapping(p, "spec file", SpecError)
    for key, value in updates.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def load_spec(path: str | Path, **updates: Any) -> Union[RunSpec, AblationSpec, HpoSpec]:
    """Read and validate a YAML spec; ``updates`` as in ``read_spec``."""
    return parse_spec(read_spec(path, **updates), str(path))
