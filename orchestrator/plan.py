"""A spec becomes trials here, once: ``expand`` (ablations) and ``hpo_base`` (HPO) are the one expansion
the runner, ``--plan``, the CLI and ``--submit`` use. Each trial carries plain RunConfig dicts and its
identity (stage, method, seed, run names); a Ray trial calls ``config_from_dict`` and never sees the spec.

``build_plan`` (``nas-scam ablate SPEC --plan``) says what an ablation will do before anything runs: it
prepares (or opens) the dataset to count crops and iterations per epoch
(``nas_core.engine.loop.epoch_lengths``), counts each model's FLOPs per step on the meta device and
measures this machine's rate with a short conv benchmark, then estimates FLOPs and time per trial. It
starts no Ray and no MLflow run. ``to_text`` / ``to_markdown`` render it; the same dict goes to the
MLflow parent run as plan.json / plan.md when the ablation really runs.

Each protocol line names its source in ../shared/docs/method.md (section numbers), so a reader can
check it against the paper and the release.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from nas_core.config import RunConfig, config_from_dict, diff_from_protocol
from orchestrator.settings import Settings
from orchestrator.specs import METHODS, AblationSpec, HpoSpec, run_name, trial_config

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
    """One engine run (a search or a retrain): its identity and its RunConfig as a plain dict."""

    phase: str
    method: str
    seed: int
    name: str  # run_name(phase, method, seed): the run folder and the MLflow run name
    config: dict[str, Any]


@dataclass(frozen=True)
class Trial:
    """One Ray Tune trial of an ablation: the runs it makes, in order. ``carry``: the search run whose
    files (genotype, result) the retrain reads, kept in the trial's checkpoints."""

    stage: str  # full | search | train: the Tune grid it belongs to
    method: str
    seed: int
    runs: tuple[Run, ...]
    carry: Optional[str] = None

    @property
    def name(self) -> str:
        return run_name(self.stage, self.method, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as a Ray trial receives it."""
        return {**asdict(self), "runs": [asdict(r) for r in self.runs], "name": self.name}


def expand(spec: AblationSpec, runs_dir: Path, data_root: Optional[Path] = None) -> list[Trial]:
    """Every trial of the ablation in the runner's order, grouped by stage: ``full`` is one grid of search +
    retrain per seed; ``retrain`` (the default) a grid of searches on the first seed, then one of retrains
    per seed, each NAS-SCAM retrain reading its method's search under ``runs_dir``."""
    seeds = spec.seed_list

    def run(phase: str, method: str, seed: int, genotype: Optional[Path] = None) -> Run:
        name = run_name(phase, method, seed)
        return Run(phase, method, seed, name, trial_config(spec, method, seed, data_root=data_root, genotype=genotype))

    def search_of(method: str, seed: int) -> Optional[str]:
        if not METHODS[method].needs_search:
            return None
        return run_name("search", method, seed if spec.repeat == "full" else seeds[0])

    def train(method: str, seed: int) -> Run:
        search = search_of(method, seed)
        return run("train", method, seed, runs_dir / search / "genotype.json" if search else None)

    if spec.repeat == "full":
        return [Trial("full", m, s, ((run("search", m, s),) if search_of(m, s) else ()) + (train(m, s),),
                      search_of(m, s)) for m in spec.methods for s in seeds]
    searches = [Trial("search", m, seeds[0], (run("search", m, seeds[0]),), search_of(m, seeds[0]))
                for m in spec.search_methods]
    return searches + [Trial("train", m, s, (train(m, s),), search_of(m, s)) for m in spec.methods for s in seeds]


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
        ("zero op", f"{cfg.zero_op} ({'0' if cfg.zero_op == 'paper' else '0.5'} on sigmoid edges)", "3, 5"),
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
               progress: bool = True, trials: Optional[list[Trial]] = None) -> dict[str, Any]:
    """The plan of ``spec`` as a JSON-ready dict. ``rate``: a ``measure_conv_rate`` result to reuse
    (default: measured now, about a second); ``trials``: ``expand``'s, when the caller has them."""
    from nas_core.data import ensure_dataset
    from nas_core.engine.device import resolve_device, set_float32_precision
    from nas_core.engine.loop import epoch_lengths
    from nas_core.models.perf import measure_conv_rate

    if spec.data.source is not None and not Path(spec.data.source).expanduser().is_dir():
        raise PlanError(f"data folder {spec.data.source} does not exist (data.source / --data)")
    if trials is None:
        trials = expand(spec, settings.runs_root / spec.name, settings.data_root)
    runs = [r for t in trials for r in t.runs]
    configs = [config_from_dict(r.config) for r in runs]
    first = configs[0]
    if rate is None:
        device = resolve_device(first.device)
        set_float32_precision(device, first.tf32)
        rate = measure_conv_rate(device, amp=first.amp)
    datasets: dict = {}
    rows = []
    for r, cfg in zip(runs, configs):
        if cfg.data not in datasets:
            data = ensure_dataset(cfg.data, settings.data_root, cfg.data.seed, progress=progress)
            datasets[cfg.data] = (len(datasets), data)
        index, data = datasets[cfg.data]
        row = _trial(cfg, r.phase, r.method, r.seed, epoch_lengths(cfg, data), data, rate["flops_per_s"])
        rows.append({**row, "data": index})
    data_info = []
    for dcfg, (index, data) in datasets.items():
        source = dcfg.source or f"synthetic: {dcfg.synthetic_images} images of {dcfg.synthetic_size} px"
        data_info.append({"index": index, "source": source,
                          "images": {s: len(data.image_ids(s)) for s in ("train", "val", "test")},
                          "crops": {s: int(len(data.crops(s))) for s in ("train", "val", "test")},
                          "bucket_sizes": {str(c): int(len(v)) for c, v in data.buckets.items()}})
    common = _common_overrides(rows)
    return {
        "kind": "ablation", "name": spec.name, "protocol": spec.protocol, "preset": spec.preset,
        "repeat": spec.repeat, "std": spec.std, "seeds": spec.seed_list, "methods": spec.methods,
        "protocol_lines": _protocol_lines(first, spec),
        "common_overrides": common, "data": data_info, "rate": rate, "trials": rows,
        "totals": {"trials": len(rows), "flops": int(sum(t["flops"] for t in rows)),
                   "time_s": sum(t["time_s"] for t in rows)},
        "notes": [
            "FLOPs: convolutions and matrix products per step (torch FlopCounterMode on the meta device), "
            "times the batch; element-wise work is not counted. Evaluation = validation and test windows "
            "(one window per evaluation crop) times the forward FLOPs.",
            f"Time = FLOPs / the rate measured now on {rate['device']} ({rate['dtype']}, "
            f"{rate['workload']}, {rate['seconds']} s): a compute-bound estimate for one trial at a time on "
            "this machine; small-batch steps are partly launch-bound and run slower, Ray workers elsewhere "
            "run at their own rate.",
            "Crops per epoch: train = the crops in the class buckets, alpha = the validation images' crops.",
            "(max): a NAS-SCAM retrain is planned before its search, so its genotype is unknown; it is costed "
            "with the costliest op on every edge (an upper bound).",
        ],
    }


def _common_overrides(trials: list[dict]) -> dict[str, list]:
    if not trials:
        return {}
    common = dict(trials[0]["overrides"])
    for t in trials[1:]:
        common = {k: v for k, v in common.items() if t["overrides"].get(k) == v}
    return common


def _num(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _rows(plan: dict) -> list[list[str]]:
    common = plan["common_overrides"]
    rows = [["phase", "method", "seed", "epochs", "it/epoch", "batch", "steps w/alpha", "val", "FLOPs",
             "est. time", "other overrides"]]
    for t in plan["trials"]:
        it = "/".join(f"{k} {v}" for k, v in t["iterations_per_epoch"].items())
        extra = {k: v for k, v in t["overrides"].items() if k not in common}
        rows.append([t["phase"], t["method"], str(t["seed"]), str(t["epochs"]), it, str(t["batch"]),
                     f"{t['steps']['w']}/{t['steps']['alpha']}", str(t["validations"]),
                     _num(t["flops"]) + ("(max)" if t["flops_note"] else ""), _duration(t["time_s"]),
                     ", ".join(f"{k}={v[1]}" for k, v in extra.items()) or "-"])
    return rows


def _sections(plan: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    head = [f"Plan of ablation {plan['name']!r}: protocol {plan['protocol']}, preset {plan['preset'] or '-'}, "
            f"{len(plan['methods'])} methods x seeds {plan['seeds']} (nothing has run yet)"]
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
    return head, protocol, overrides, data


def to_text(plan: dict) -> str:
    head, protocol, overrides, data = _sections(plan)
    rows = _rows(plan)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    r, tot = plan["rate"], plan["totals"]
    lines = [*head, "", "protocol as resolved (source in ../shared/docs/method.md):",
             *("  " + x for x in protocol), "", "overrides of the protocol table, every trial:",
             *("  " + x for x in overrides), "", *data, "",
             f"rate: {_num(r['flops_per_s'])}FLOP/s measured now on {r['device']} ({r['dtype']}; {r['workload']}; "
             f"{r['steps']} steps in {r['seconds']} s)", "",
             f"trials ({tot['trials']}):", *("  " + x for x in table), "",
             f"total: {tot['trials']} trials, {_num(tot['flops'])}FLOPs, about {_duration(tot['time_s'])} "
             f"one after the other at the measured rate", "", *(f"note: {n}" for n in plan["notes"])]
    return "\n".join(lines) + "\n"


def to_markdown(plan: dict) -> str:
    head, protocol, overrides, data = _sections(plan)
    rows = _rows(plan)
    r, tot = plan["rate"], plan["totals"]
    lines = [f"# {head[0]}", "", "## Protocol (source in method.md)", "", *(f"- {x}" for x in protocol), "",
             "## Overrides of the protocol table (every trial)", "", *(f"- `{x}`" for x in overrides), "",
             "## Data", "", *(f"- {x.strip()}" for x in data), "",
             f"Rate: {_num(r['flops_per_s'])}FLOP/s measured on {r['device']} ({r['dtype']}, {r['workload']}, "
             f"{r['seconds']} s).", "", "## Trials", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
             *("| " + " | ".join(row) + " |" for row in rows[1:]), "",
             f"Total: {tot['trials']} trials, {_num(tot['flops'])}FLOPs, about {_duration(tot['time_s'])}.", "",
             *(f"- {n}" for n in plan["notes"])]
    return "\n".join(lines) + "\n"
