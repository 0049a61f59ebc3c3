"""A spec becomes trials here, once: ``expand`` (ablations) and ``hpo_base`` (HPO) are the one expansion
the runner, ``--plan``, the CLI and ``--submit`` use. Each trial carries plain RunConfig dicts and its
identity (stage, method, seed, run names); a Ray trial calls ``config_from_dict`` and never sees the spec.

``build_plan`` (``nas-scam ablate SPEC --plan``) says what an ablation will do before anything runs: it
prepares (or opens) the dataset to count crops and iterations per epoch
(``nas_core.engine.loop.epoch_lengths``; from the synthetic stand-in unless ``data.source`` names real
data, and the plan says which), counts each model's FLOPs per step on the meta device, and estimates
FLOPs and time per trial and the memory each trial asks Ray for (``run_memory``; the runner requests it
through ``trial_memory``). Time (``orchestrator.costs``): FLOPs / this machine's rate (``machine_rate``:
the median of several warm conv benchmarks with the threads a trial gets, kept per machine), plus a
trial's fixed start-up; trials run ``machine_slots`` at once (the spec's ``resources`` against this
machine's or the cluster's CPUs, GPUs and memory), stage after stage (``makespan``). With a device
profile (``device_profiles.yaml``: step times measured on a named device) it adds that device's
GPU-hours (``device_hours``). It starts no Ray and no MLflow run. ``to_text`` / ``to_markdown`` render it; the
same dict goes to the MLflow parent run as plan.json / plan.md when the ablation really runs, and its
``stages`` feed the run's ETA (``orchestrator.progress.Eta``).

Each protocol line names its source in ../shared/docs/method.md (section numbers), so a reader can
check it against the paper and the release.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from nas_core.classes import NUM_CLASSES
from nas_core.config import RunConfig, config_from_dict, diff_from_protocol
from orchestrator.costs import (TRIAL_OVERHEAD_S, device_profile, machine_rate, machine_slots, makespan,
                                profile_summary)
from orchestrator.settings import Settings
from orchestrator.specs import (METHODS, AblationSpec, HpoSpec, axis_label, parse_run_name, run_name,
                               trial_config)

# fields that name a trial rather than change the protocol
IDENTITY = ("model.name", "model.search", "model.genotype", "seed", "data.cache_dir")

AUGMENT = {"paper": "one of rotate / flip / Gaussian blur / median blur / elastic per crop",
           "code": "Gaussian blur with p = 0.2, else none", "none": "none"}
LOSS = {"exp_log": "exponential logarithmic loss (Wong et al.): 0.8 Dice term + 0.2 weighted CE term",
        "exp_log_dice": "the Dice term only: mean_c (-ln D_c)^0.3"}
REPEAT = {"retrain": "one search per NAS method (first seed), every seed retrains that genotype",
          "full": "a search and a retrain per seed"}


class PlanError(ValueError):
    """The plan cannot be made (missing data folder, for instance); the message names the culprit."""


@dataclass(frozen=True)
class Run:
    """One engine run (a search or a retrain): its identity and its RunConfig as a plain dict.
    ``genotype_draw``: for a random control's retrain, the seed of the genotype the trial draws
    (``Genotype.random``) and saves as ``genotype.json`` in the run folder before training."""

    phase: str
    method: str
    seed: int
    name: str  # run_name(phase, method, seed, ...): the run folder and the MLflow run name
    config: dict[str, Any]
    draw: Optional[int] = None
    fold: Optional[int] = None
    variant: str = ""
    axes: Optional[dict[str, Any]] = None  # the variant's axis values (dotted keys)
    genotype_draw: Optional[int] = None


@dataclass(frozen=True)
class Trial:
    """One Ray Tune trial of an ablation: the runs it makes, in order. ``carry``: the search run whose
    files (genotype, result) the retrain reads, kept in the trial's checkpoints."""

    stage: str  # full | search | train: the Tune grid it belongs to
    method: str
    seed: int
    runs: tuple[Run, ...]
    carry: Optional[str] = None
    draw: Optional[int] = None
    fold: Optional[int] = None
    variant: str = ""

    @property
    def name(self) -> str:
        return run_name(self.stage, self.method, self.seed, draw=self.draw, fold=self.fold, variant=self.variant)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as a Ray trial receives it."""
        return {**asdict(self), "runs": [asdict(r) for r in self.runs], "name": self.name}


def draw_seed(seed: int, draw: int) -> int:
    """The seed of a random control's genotype: one per (run seed, draw), the same in every fold and
    variant (the fold changes the data, not the architecture drawn)."""
    return seed * 1000 + draw


def expand(spec: AblationSpec, runs_dir: Path, data_root: Optional[Path] = None) -> list[Trial]:
    """Every trial of the ablation in the runner's order, grouped by stage: ``full`` is one grid of search +
    retrain per seed; ``retrain`` (the default) a grid of searches on the first seed, then one of retrains
    per seed, each NAS-SCAM retrain reading its method's search under ``runs_dir``.

    The grid is methods x seeds (x random draws for the controls) x the axes' variants x the folds.
    Searches are shared: a variant whose search run would have the same config as an earlier
    variant's (axes of ``train.*`` keys, which a search never reads) uses that search."""
    seeds = spec.seed_list
    folds = list(range(spec.folds)) if spec.folds > 1 else [None]
    draws = list(range(spec.random_draws)) if spec.random_draws > 1 else [None]
    variants = spec.variants
    shared: dict[tuple, str] = {}  # (method, seed, fold, search config) -> the search run's name

    def config(method: str, seed: int, fold: Optional[int], axes: dict, genotype: Optional[Path]) -> dict:
        extra = {**axes, **({"data.fold": fold} if fold is not None else {})}
        return trial_config(spec, method, seed, data_root=data_root, genotype=genotype, extra=extra or None)

    def search_run(method: str, seed: int, fold: Optional[int], variant: str, axes: dict) -> tuple[Run, bool]:
        """The search this (method, seed, fold, variant) uses, and whether it is its own (not shared)."""
        cfg = config(method, seed, fold, axes, None)
        key = (method, seed, fold, json.dumps({k: v for k, v in cfg.items() if k != "train"}, sort_keys=True))
        own = key not in shared
        if own:
            # named by the axes a search reads (train.* never): the variants sharing it share its name
            label = "+".join(axis_label(k, v) for k, v in axes.items() if not k.startswith("train."))
            shared[key] = run_name("search", method, seed, fold=fold, variant=label)
        name = shared[key]
        label = parse_run_name(name).variant
        search_axes = {k: v for k, v in axes.items() if not k.startswith("train.")}
        return Run("search", method, seed, name, cfg, fold=fold, variant=label, axes=search_axes or None), own

    def train(method: str, seed: int, draw: Optional[int], fold: Optional[int], variant: str, axes: dict,
              search: Optional[str]) -> Run:
        name = run_name("train", method, seed, draw=draw, fold=fold, variant=variant)
        m = METHODS[method]
        genotype = (runs_dir / search / "genotype.json" if search else
                    runs_dir / name / "genotype.json" if m.draws_genotype else None)
        return Run("train", method, seed, name, config(method, seed, fold, axes, genotype), draw=draw, fold=fold,
                   variant=variant, axes=axes or None,
                   genotype_draw=draw_seed(seed, draw or 0) if m.draws_genotype else None)

    def method_draws(method: str) -> list[Optional[int]]:
        return draws if METHODS[method].draws_genotype else [None]

    searches: list[Trial] = []
    trains: list[Trial] = []
    for variant, axes in variants:
        for fold in folds:
            for m in spec.methods:
                for seed in seeds:
                    search, own = None, False
                    if METHODS[m].needs_search:
                        s_run, own = search_run(m, seed if spec.repeat == "full" else seeds[0], fold, variant, axes)
                        search = s_run.name
                    for draw in method_draws(m):
                        t_run = train(m, seed, draw, fold, variant, axes, search)
                        if spec.repeat == "full":
                            runs = ((s_run,) if own else ()) + (t_run,)
                            trains.append(Trial("full", m, seed, runs, search, draw, fold, variant))
                            continue
                        if own and seed == seeds[0]:
                            searches.append(Trial("search", m, seeds[0], (s_run,), search, None, fold,
                                                  s_run.variant))
                        trains.append(Trial("train", m, seed, (t_run,), search, draw, fold, variant))
    # a shared search in repeat=full runs inside the first trial that needs it; the others wait for it
    # in a later grid: move them to a second "train" stage
    if spec.repeat == "full":
        first = {t.carry: t.name for t in trains if t.carry and any(r.phase == "search" for r in t.runs)}
        late = [t for t in trains if t.carry and first.get(t.carry) != t.name]
        early = [t for t in trains if t not in late]
        return early + [Trial("train", t.method, t.seed, t.runs, t.carry, t.draw, t.fold, t.variant) for t in late]
    return searches + trains


def stages(trials: list[Trial]) -> list[tuple[str, list[Trial]]]:
    """The trials grouped into Tune grids, in order: [(stage, trials)]."""
    out: list[tuple[str, list[Trial]]] = []
    for t in trials:
        if not out or out[-1][0] != t.stage:
            out.append((t.stage, []))
        out[-1][1].append(t)
    return out


def trial_list(spec: AblationSpec) -> list[tuple[str, str, int]]:
    """(phase, method, seed) of every run the ablation makes, in the runner's order."""
    return [(r.phase, r.method, r.seed) for t in expand(spec, Path(".")) for r in t.runs]


def hpo_base(spec: HpoSpec, data_root: Optional[Path] = None) -> dict[str, Any]:
    """The config dict every HPO trial starts from; a trial applies its sampled values to it
    (``nas_core.config.apply_overrides``)."""
    genotype = Path(spec.genotype) if spec.genotype else None
    return trial_config(spec, spec.method, spec.seed, data_root=data_root, genotype=genotype)


def _model_builder(cfg: RunConfig, phase: str):
    """A zero-argument builder of the model a phase trains. Before the search the genotype is unknown:
    a retrain of a NAS-SCAM net is costed with the costliest op on every edge (an upper bound)."""
    from nas_core.models import create_model

    name = cfg.model.name
    if name not in ("nas-scam-s", "nas-scam-p"):
        return (name,), lambda: create_model(name)
    if phase == "search":
        key = (name, "supernet", cfg.model.search, cfg.model.impl)
        return key, lambda: create_model(name, supernet=cfg.model.search, zero_op=cfg.zero_op, impl=cfg.model.impl)
    from nas_core.search_space.genotype import N_SLOTS, Genotype
    from nas_core.search_space.ops import OP_TABLES, num_edges

    def costliest(kind: str) -> str:
        return max(OP_TABLES[kind].values(), key=lambda op: op.kernel).name

    genotype = Genotype(combine="parallel" if name.endswith("-p") else "serial", search=cfg.model.search,
                        sam=((costliest("sam"),) * num_edges(),) * N_SLOTS,
                        cam=((costliest("cam"),) * num_edges(),) * N_SLOTS)
    return (name, "upper-bound", cfg.model.search), lambda: create_model(name, genotype=genotype, zero_op=cfg.zero_op)


# step FLOPs per (model key, crop size, step kind), for the life of the process: the supernet takes
# seconds to count, and a plan asks for the same model many times
_FLOPS: dict[tuple, int] = {}


def _count(cfg: RunConfig, phase: str, kind: str) -> int:
    from nas_core.models.perf import step_flops

    # the key leaves out zero_op: a constant on sigmoid edges, no FLOPs
    key, build = _model_builder(cfg, phase)
    k = (key, cfg.data.crop_size, kind)
    if k not in _FLOPS:
        _FLOPS[k] = step_flops(build, cfg.data.crop_size, kind)
    return _FLOPS[k]


# ---------------------------------------------------------------- memory a trial asks Ray for
# ``resources: memory`` of each Tune trial, so Ray's scheduler never starts more trials than a node holds.
# estimate = MARGIN x (WORKER + STATE_COPIES x parameter bytes + ACTIVATIONS x batch x saved activation
# bytes per crop + the prepared data a trial loads). Measured peak RSS of one phase in a process that
# imports what a trial worker imports (2-core x86_64, torch 2.13 CPU), against this estimate:
#   retrain unet, batch 4 of 32 px crops: 0.78 GiB (estimate 0.98); of 128 px: 1.00 GiB (1.24)
#   search, nas-scam-p synchronous supernet, 32 px: 0.94 GiB (1.23); 128 px: 1.72 GiB (2.16)
MiB = 2 ** 20
# a trial worker before its model: Python, torch, Ray, MLflow and nas_core imported (510 MiB measured)
# and the runtime's own buffers through the first steps and evaluation (about 250 MiB more)
WORKER_BYTES = 768 * MiB
STATE_COPIES = 4  # float32 weights, gradients and Adam's two moments
# the tensors autograd saves for backward are most of a step's peak; the backward pass holds the
# gradients of the largest of them beside them
ACTIVATIONS = 1.25
MEMORY_MARGIN = 1.2  # allocator slack, checkpoint writes, evaluation tiles
# (parameters, saved activation bytes of one crop) per (model key, crop size, step kind), like _FLOPS
_SAVED: dict[tuple, tuple[int, int]] = {}


def _saved_activations(cfg: RunConfig, phase: str, kind: str) -> tuple[int, int]:
    """(parameter count, bytes autograd saves for backward) of one ``kind`` step ("w": weights learn,
    "alpha": alpha learn) on one ``(1, 3, crop, crop)`` crop, float32. Shapes only: the model runs
    its forward on the meta device (no memory, no arithmetic); the parameters' own storage, which
    autograd saves too, is not counted twice."""
    import torch

    key, build = _model_builder(cfg, phase)
    k = (key, cfg.data.crop_size, kind)
    if k not in _SAVED:
        with torch.device("meta"):
            model = build()
        params = list(model.parameters())
        own = {p.untyped_storage()._cdata for p in params}
        arch = {id(p) for p in model.arch_parameters()} if hasattr(model, "arch_parameters") else set()
        for p in params:
            p.requires_grad_((id(p) in arch) == (kind == "alpha"))
        saved: dict[int, int] = {}  # one entry per storage: a tensor saved by two ops is held once

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in own:
                saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(1, 3, cfg.data.crop_size, cfg.data.crop_size, device="meta"))
        _SAVED[k] = (sum(p.numel() for p in params), sum(saved.values()))
    return _SAVED[k]


def data_bytes(data) -> int:
    """Bytes of a prepared dataset a trial reads into memory (its images, labels and ignore masks:
    ``CropDataset`` preloads them); ``data``: a ``PreparedData``."""
    return sum(f.stat().st_size for kind in ("images", "labels", "ignore") for f in (data.root / kind).glob("*.npy"))


def run_memory(cfg: RunConfig, phase: str, data_size: int = 0) -> int:
    """Bytes of memory one run (a search or a retrain) of ``cfg`` needs at its peak, for a trial to ask
    Ray for (``WORKER_BYTES`` and the factors above say how). The batch is its upper bound, per_class
    crops of every class; ``data_size``: ``data_bytes`` of its prepared data. Deterministic: shapes
    and constants only, nothing measured now."""
    per_class = cfg.search.per_class if phase == "search" else cfg.train.per_class
    kinds = ("w", "alpha") if phase == "search" else ("w",)
    params = _saved_activations(cfg, phase, kinds[0])[0]
    saved = max(_saved_activations(cfg, phase, kind)[1] for kind in kinds)
    need = WORKER_BYTES + STATE_COPIES * 4 * params + ACTIVATIONS * per_class * NUM_CLASSES * saved + data_size
    return int(MEMORY_MARGIN * need)


def trial_memory(trials: list[Trial], data_root: Optional[Path] = None, progress: bool = True) -> dict[str, int]:
    """Trial name -> the memory it asks Ray for: the most any of its runs needs (``config_memory``).
    ``progress``: a bar over the trials on a terminal (each new model is traced on the meta device)."""
    from nas_core.data.prepare import progress_bar

    sizes: dict = {}
    with progress_bar(trials, desc="memory per trial", unit="trial", enabled=progress) as bar:
        return {t.name: max(config_memory(r.config, r.phase, data_root, sizes) for r in t.runs) for t in bar}


def config_memory(config: dict[str, Any], phase: str, data_root: Optional[Path] = None,
                  sizes: Optional[dict] = None) -> int:
    """``run_memory`` of a RunConfig dict with its prepared data counted: the dataset is prepared (or
    opened) now, as the runner would next. ``sizes``: data config -> bytes, kept between calls."""
    from nas_core.data import ensure_dataset

    cfg = config_from_dict(config)
    sizes = {} if sizes is None else sizes
    if cfg.data not in sizes:
        sizes[cfg.data] = data_bytes(ensure_dataset(cfg.data, data_root, cfg.data.seed))
    return run_memory(cfg, phase, sizes[cfg.data])


def fmt_bytes(n: float) -> str:
    """``1.2 GiB``, ``768 MiB``: memory figures as the plan and the runner's messages print them."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / MiB:.0f} MiB"


def _trial(cfg: RunConfig, phase: str, method: str, seed: int, lengths: dict, data, rate: float) -> dict:
    from nas_core.engine.loop import search_steps
    from nas_core.engine.search import epoch_mode

    n_val, n_test = len(data.crops("val")), len(data.crops("test"))
    if phase == "search":
        s = cfg.search
        batch = lengths["batch"]["w"]
        steps = {"w": 0, "alpha": 0}
        for epoch in range(s.epochs):
            n_w, n_alpha = search_steps(epoch_mode(cfg, epoch), lengths)
            steps["w"] += n_w
            steps["alpha"] += n_alpha
        validations = len(s.validation_epochs())
        epochs = {"epochs": s.epochs, "warmup": s.warmup_epochs, "alternation": s.alternation}
        per_epoch = {"w": lengths["w"], "alpha": lengths["alpha"]}
        windows = validations * n_val
        flops = batch * (steps["w"] * _count(cfg, phase, "w") + steps["alpha"] * _count(cfg, phase, "alpha"))
    else:
        t = cfg.train
        batch = lengths["batch"]["train"]
        steps = {"w": t.epochs * lengths["train"], "alpha": 0}
        validations = len(t.validation_epochs())
        epochs = {"epochs": t.epochs}
        per_epoch = {"train": lengths["train"]}
        windows = validations * n_val + n_test
        flops = batch * steps["w"] * _count(cfg, phase, "w")
    flops += windows * _count(cfg, phase, "forward")
    diff = diff_from_protocol(cfg)
    return {
        "phase": phase, "method": method, "seed": seed, "run": run_name(phase, method, seed),
        "model": cfg.model.name + (f" ({cfg.model.search})" if cfg.model.name.startswith("nas-scam") else ""),
        **epochs, "batch": batch, "iterations_per_epoch": per_epoch, "crops_per_epoch": lengths["bucketed"],
        "steps": steps, "validations": validations, "eval_windows": windows,
        "flops": int(flops), "time_s": flops / rate,
        "flops_note": "upper bound: genotype unknown before the search" if phase == "train"
        and cfg.model.name.startswith("nas-scam") else "",
        "overrides": {k: list(v) for k, v in diff.items() if k not in IDENTITY},
    }


def _protocol_lines(cfg: RunConfig, spec: AblationSpec) -> list[dict]:
    """The protocol's choices as resolved (after every override), each with its method.md source."""
    from nas_core.search_space.cell import ZERO_OPS

    d, s, t = cfg.data, cfg.search, cfg.train
    adam = "rebuilt every epoch" if s.reset_optimizer_each_epoch else "built once"
    precision = ("bf16 autocast (opt-in, a deviation)" if cfg.amp else "float32") + \
        (", TF32 on CUDA" if cfg.tf32 and not cfg.amp else "")
    lines = [
        ("split", f"{d.split} (train,val,test) by {d.split_by}, data seed {d.seed}", "6, 5a (release: 120/41/48)"),
        ("stain", d.stain, "6"),
        ("crop grid", f"{d.crop_size} px windows, stride {d.stride}", "6, 5a"),
        ("augmentation", f"{cfg.augment_pipeline}: {AUGMENT.get(cfg.augment_pipeline, '?')}"
         f" (strength {cfg.augment.strength:g})", "5, 5a"),
        ("loss", f"{cfg.loss_name}: {LOSS.get(cfg.loss_name, cfg.loss_name)}", "5"),
        ("zero op", f"{cfg.zero_op} ({ZERO_OPS[cfg.zero_op]:g} on sigmoid edges)", "3, 5"),
        ("search", f"{s.epochs} epochs, w-only warm-up {s.warmup_epochs}, alternation per {s.alternation}, "
         f"lr w {s.lr_w:g} / alpha {s.lr_alpha:g}, Adam {adam}, validation every {s.val_every}", "5, 5a"),
        ("retrain", f"{t.epochs} epochs, lr {t.lr:g}, validation every {t.val_every}, best-validation checkpoint",
         "5, 5a"),
        ("batch", f"{s.per_class} crop per class bucket (class-balanced)", "5"),
        ("repeats", f"{spec.repeat}: {REPEAT[spec.repeat]}; seeds {spec.seed_list}", "5a, 7"),
        ("spread", f"{spec.std} std (ddof={0 if spec.std == 'population' else 1})", "5a, 7"),
        ("precision", precision, "5a (paper and release: float32)"),
    ]
    return [{"item": a, "value": b, "method_md": c} for a, b, c in lines]


def build_plan(spec: AblationSpec, settings: Settings, rate: Optional[dict] = None,
               progress: bool = True, trials: Optional[list[Trial]] = None,
               profile: Optional[str] = None, remeasure: bool = False) -> dict[str, Any]:
    """The plan of ``spec`` as a JSON-ready dict. ``rate``: a ``measure_conv_rate``-like result to reuse
    (default: ``machine_rate``, cached per machine); ``trials``: ``expand``'s, when the caller has them;
    ``profile``: a device profile's name (``device_profiles.yaml``) to add its device-hours;
    ``remeasure``: measure this machine's rate again. ``progress``: bars on stderr (a terminal only)."""
    from nas_core.data import ensure_dataset
    from nas_core.data.prepare import progress_bar
    from nas_core.engine.device import resolve_device, set_float32_precision
    from nas_core.engine.loop import epoch_lengths

    if spec.data.source is not None and not Path(spec.data.source).expanduser().is_dir():
        raise PlanError(f"data folder {spec.data.source} does not exist (data.source / --data)")
    chosen = device_profile(profile) if profile else None  # a wrong name fails before any work
    if trials is None:
        trials = expand(spec, settings.runs_root / spec.name, settings.data_root)
    runs = [r for t in trials for r in t.runs]
    configs = [config_from_dict(r.config) for r in runs]
    first = configs[0]
    if rate is None:
        device = resolve_device(first.device)
        set_float32_precision(device, first.tf32)
        rate = machine_rate(settings, device, amp=first.amp, threads=max(1, int(spec.resources.cpu)),
                            remeasure=remeasure)
    datasets: dict = {}
    rows = []
    bar = progress_bar(total=len(runs), desc="plan: FLOPs and memory per run", unit="run", enabled=progress)
    for r, cfg in zip(runs, configs):
        if cfg.data not in datasets:
            data = ensure_dataset(cfg.data, settings.data_root, cfg.data.seed, progress=progress)
            datasets[cfg.data] = (len(datasets), data)
        index, data = datasets[cfg.data]
        row = _trial(cfg, r.phase, r.method, r.seed, epoch_lengths(cfg, data), data, rate["flops_per_s"])
        rows.append({**row, "run": r.name, "draw": r.draw, "fold": r.fold, "variant": r.variant, "data": index})
        rows[-1]["memory"] = run_memory(cfg, r.phase, data_bytes(data))
        bar.update(1)
    bar.close()
    data_info = []
    for dcfg, (index, data) in datasets.items():
        source = dcfg.source or f"synthetic: {dcfg.synthetic_images} images of {dcfg.synthetic_size} px"
        data_info.append({"index": index, "source": source, "synthetic": dcfg.source is None,
                          "images": {s: len(data.image_ids(s)) for s in ("train", "val", "test")},
                          "crops": {s: int(len(data.crops(s))) for s in ("train", "val", "test")},
                          "bucket_sizes": {str(c): int(len(v)) for c, v in data.buckets.items()}})
    common = _common_overrides(rows)
    memory = max(t["memory"] for t in rows)
    parallel = machine_slots(spec, settings, memory)
    time_of = {r["run"]: r["time_s"] for r in rows}
    plan_stages = []
    for stage, group in stages(trials):
        costs = {t.name: TRIAL_OVERHEAD_S + sum(time_of[r.name] for r in t.runs) for t in group}
        plan_stages.append({"stage": stage, "trials": costs,
                            "wall_s": makespan(list(costs.values()), parallel["slots"])})
    out = {
        "kind": "ablation", "name": spec.name, "protocol": spec.protocol, "preset": spec.preset,
        "repeat": spec.repeat, "std": spec.std, "seeds": spec.seed_list, "methods": spec.methods,
        "grid": _grid_info(spec, trials),
        "protocol_lines": _protocol_lines(first, spec),
        "common_overrides": common, "data": data_info, "rate": rate, "parallel": parallel,
        "stages": plan_stages, "trial_overhead_s": TRIAL_OVERHEAD_S, "trials": rows,
        "totals": {"trials": len(rows), "flops": int(sum(t["flops"] for t in rows)),
                   "time_s": sum(t["time_s"] for t in rows), "wall_s": sum(s["wall_s"] for s in plan_stages),
                   "memory": memory},
        "notes": [
            "FLOPs: convolutions and matrix products per step (torch FlopCounterMode on the meta device), "
            "times the batch; element-wise work is not counted. Evaluation = validation and test windows "
            "(one window per evaluation crop) times the forward FLOPs.",
            f"Time = FLOPs / this machine's rate on {rate['device']} ({rate['dtype']}, {rate['workload']}, "
            f"with the torch threads of a trial of resources cpu "
            f"{spec.resources.cpu:g}): a compute-bound estimate; small-batch steps are partly launch-bound "
            f"and run slower, Ray workers elsewhere run at their own rate. Wall-clock: {TRIAL_OVERHEAD_S:g} s of "
            f"start-up per trial (BENCHMARKS.md 'A trial through Ray Tune vs called directly') and the "
            f"trials of each stage on the slots, a stage after the one before.",
            "Crops per epoch: train = the crops in the class buckets, alpha = the validation images' crops.",
            "(max): a NAS-SCAM retrain is planned before its search, so its genotype is unknown; it is costed "
            "with the costliest op on every edge (an upper bound).",
            f"Memory: what each trial asks Ray for (resources: memory), so no node runs more trials than it "
            f"holds; a trial that needs more than any node offers is refused before it starts. "
            f"{MEMORY_MARGIN:g} x ({fmt_bytes(WORKER_BYTES)} for a trial worker + {STATE_COPIES} float32 copies of "
            f"the parameters + {ACTIVATIONS:g} x the batch (per_class x {NUM_CLASSES} classes) x the "
            f"activations autograd saves per crop, counted on the meta device + the prepared data), checked "
            f"against measured peaks (orchestrator/plan.py).",
        ],
    }
    if chosen is not None:
        out["device_profile"] = profile_summary(chosen, rows, configs)
    return out


def _grid_info(spec: AblationSpec, trials: list[Trial]) -> dict[str, Any]:
    """The grid's dimensions and how many searches the variants share."""
    searches = {r.name for t in trials for r in t.runs if r.phase == "search"}
    wanted = sum(1 for t in trials for r in t.runs if r.phase == "train" and t.carry)
    return {"methods": len(spec.methods), "seeds": len(spec.seed_list), "random_draws": spec.random_draws,
            "axes": {k: list(v) for k, v in spec.axes.items()}, "variants": [v for v, _ in spec.variants if v],
            "folds": spec.folds, "searches": len(searches), "retrains_reading_a_search": wanted}


def _common_overrides(trials: list[dict]) -> dict[str, list]:
    if not trials:
        return {}
    common = dict(trials[0]["overrides"])
    for t in trials[1:]:
        common = {k: v for k, v in common.items() if t["overrides"].get(k) == v}
    return common


def _si(x: float, unit: str) -> str:
    """``8.27 PFLOP``, ``95.3 GFLOP/s``: a decimal prefix and the unit, always both."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _hours(hours: float, unit: str = "") -> str:
    """``64.1 GPU-hours``, ``0.031 GPU-hours``, ``<0.01 GPU-hours`` (a smoke run's seconds)."""
    number = f"{hours:,.1f}" if hours >= 0.1 else f"{hours:.3f}" if hours >= 0.01 else "<0.01"
    return f"{number} {unit}" if unit else number


def _rows(plan: dict) -> list[list[str]]:
    common = plan["common_overrides"]
    profile = plan.get("device_profile")
    rows = [["phase", "run", "epochs", "it/epoch", "batch", "steps w/alpha", "val", "FLOP", "est. time",
             *([profile["unit"]] if profile else []), "memory", "other overrides"]]
    for t in plan["trials"]:
        it = "/".join(f"{k} {v}" for k, v in t["iterations_per_epoch"].items())
        extra = {k: v for k, v in t["overrides"].items() if k not in common}
        device = [_hours(t["device_hours"]) + (" (max)" if t["flops_note"] else "")] if profile else []
        rows.append([t["phase"], t.get("run") or t["method"], str(t["epochs"]), it, str(t["batch"]),
                     f"{t['steps']['w']}/{t['steps']['alpha']}", str(t["validations"]),
                     _si(t["flops"], "FLOP") + (" (max)" if t["flops_note"] else ""), _duration(t["time_s"]),
                     *device, fmt_bytes(t["memory"]) if "memory" in t else "-",
                     ", ".join(f"{k}={v[1]}" for k, v in extra.items()) or "-"])
    return rows


def _sections(plan: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    head = [f"Plan of ablation {plan['name']!r}: protocol {plan['protocol']}, preset {plan['preset'] or '-'}, "
            f"{len(plan['methods'])} methods x seeds {plan['seeds']} (nothing has run yet)"]
    g = plan.get("grid")
    if g and (g["axes"] or g["folds"] > 1 or g["random_draws"] > 1):
        dims = [f"{g['methods']} methods", f"{g['seeds']} seeds"]
        if g["random_draws"] > 1:
            dims.append(f"{g['random_draws']} random draws per seed (random-* controls)")
        for key, values in g["axes"].items():
            dims.append(f"{key} in {values}")
        if g["folds"] > 1:
            dims.append(f"{g['folds']} patient folds")
        head.append("grid: " + " x ".join(dims) + f"; {g['searches']} searches (shared where a variant's search "
                    f"config is the same), {g['retrains_reading_a_search']} retrains read one")
    protocol = [f"{p['item']:<13} {p['value']}  [method.md {p['method_md']}]" for p in plan["protocol_lines"]]
    overrides = [f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in plan["common_overrides"].items()] or \
        [f"none: every trial runs the {plan['protocol']} table"]
    data = []
    for d in plan["data"]:
        trial = next(t for t in plan["trials"] if t["data"] == d["index"])
        imgs = ", ".join(f"{k} {v}" for k, v in d["images"].items())
        crops = ", ".join(f"{k} {v}" for k, v in trial["crops_per_epoch"].items())
        its = {}
        for t in plan["trials"]:
            if t["data"] == d["index"]:
                its.update(t["iterations_per_epoch"])
        data.append(f"data {d['index']}: {d['source']}; images {imgs}; class buckets "
                    f"{d['bucket_sizes']}")
        data.append(f"  crops per epoch: {crops}; iterations per epoch: "
                    + ", ".join(f"{k} {v}" for k, v in its.items()))
        if d.get("synthetic"):
            data.append("  SYNTHETIC stand-in: these crops and iterations per epoch are the generated data's, "
                        "not a real dataset's; pass --data DIR (e.g. MoNuSAC) for the real counts")
    return head, protocol, overrides, data


def _time_lines(plan: dict) -> tuple[list[str], list[str]]:
    """(rate and trials-at-once lines, total and device lines) of the plan's time estimate."""
    r, tot = plan["rate"], plan["totals"]
    how = (f"median of {r['median_of']} warm runs, {_si(r['spread'][0], 'FLOP/s')} to "
           f"{_si(r['spread'][1], 'FLOP/s')}; measured {r['measured_at']}" if "median_of" in r
           else f"{r['steps']} steps in {r['seconds']} s")
    kept = (f", kept in {r['cached']} (--remeasure measures again)" if r.get("cached") else "")
    threads = f", {r['threads']} torch thread{'s' if r.get('threads') != 1 else ''}" if "threads" in r else ""
    rate = [f"rate: {_si(r['flops_per_s'], 'FLOP/s')} on {r['device']} ({r['dtype']}{threads}; {r['workload']}; "
            f"{how}{kept})"]
    par = plan.get("parallel")
    if par:
        per = par["per_trial"]
        rate.append(f"trials at once: {par['slots']} on {par['where']} ({par['nodes']} node(s): {par['cpu']:g} CPUs, "
                    f"{par['gpu']:g} GPUs, {fmt_bytes(par['memory'])} for Ray; per trial cpu {per['cpu']:g}, "
                    f"gpu {per['gpu']:g}, {fmt_bytes(per['memory'])}"
                    + (f"; max_concurrent {par['max_concurrent']}" if par.get("max_concurrent") else "") + ")")
        if par.get("note"):
            rate.append(f"  {par['note']}")
    total = [f"total: {tot['trials']} runs, {_si(tot['flops'], 'FLOP')}; compute about {_duration(tot['time_s'])} "
             f"one run after another at this rate{_peak(tot)}"]
    if "wall_s" in tot and par:
        parts = ", then ".join(f"{s['stage']} {_duration(s['wall_s'])}" for s in plan["stages"])
        total.append(f"wall-clock: about {_duration(tot['wall_s'])} with {par['slots']} trial(s) at once "
                     f"({parts}; {plan['trial_overhead_s']:g} s start-up per trial included)")
    d = plan.get("device_profile")
    if d:
        total.append(f"on {d['title']} (--device-profile {d['name']}): searches {_hours(d['hours']['search'], d['unit'])}, "
                     f"retrains {_hours(d['hours']['train'], d['unit'])}, total {_hours(d['total_hours'], d['unit'])}, "
                     f"one trial per device, {'/'.join(d['precision'])} steps")
        total.append(f"  measured {d['measured']}; source: {d['source']}")
        if d["scaled"]:
            total.append(f"  the measured steps are of {d['crop_size']} px crops, batch {d['batch']}: this plan's "
                         f"are scaled by pixels x batch (on a GPU small steps are launch-bound: a lower bound)")
        total += [f"  {k}: {v}" for k, v in d["steps"].items()]
        if d["upper_bound"]:
            total.append(f"  (max) retrains: the uniform genotype's step x the profile's upper-bound factor; "
                         f"{d['upper_bound']}")
        total += [f"  note: {n}" for n in d["notes"]]
    return rate, total


def _peak(totals: dict) -> str:
    return f"; the largest trial asks Ray for {fmt_bytes(totals['memory'])} of memory" if "memory" in totals else ""


def to_text(plan: dict) -> str:
    head, protocol, overrides, data = _sections(plan)
    rows = _rows(plan)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    rate, total = _time_lines(plan)
    lines = [*head, "", "protocol as resolved (source in ../shared/docs/method.md):",
             *("  " + x for x in protocol), "", "overrides of the protocol table, every trial:",
             *("  " + x for x in overrides), "", *data, "", *rate, "",
             f"runs ({plan['totals']['trials']}):", *("  " + x for x in table), "",
             *total, "", *(f"note: {n}" for n in plan["notes"])]
    return "\n".join(lines) + "\n"


def to_markdown(plan: dict) -> str:
    head, protocol, overrides, data = _sections(plan)
    rows = _rows(plan)
    rate, total = _time_lines(plan)
    lines = [f"# {head[0]}", "", "## Protocol (source in method.md)", "", *(f"- {x}" for x in protocol), "",
             "## Overrides of the protocol table (every trial)", "", *(f"- `{x}`" for x in overrides), "",
             "## Data", "", *(f"- {x.strip()}" for x in data), "",
             "## Time", "", *(f"- {x.strip()}" for x in rate), "", "## Runs", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
             *("| " + " | ".join(row) + " |" for row in rows[1:]), "",
             *(f"- {x.strip()}" for x in total), "",
             *(f"- {n}" for n in plan["notes"])]
    return "\n".join(lines) + "\n"
