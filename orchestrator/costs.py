"""What a plan's time rests on: this machine's rate, how many trials run at once, and the step times
measured on named devices.

``machine_rate``: the median of several warm conv benchmarks with a trial's threads, kept per machine
(two plans on one machine give one time; one run under a passing load can be off several-fold).
``machine_slots``: the spec's ``resources`` per trial against this machine's CPUs, GPUs and memory, or
the cluster's (its dashboard's node list). ``makespan``: the seconds a stage takes on those slots.
``device_hours``: a run's hours on a device of ``device_profiles.yaml`` (data: each step time names
where it was measured, or what it is derived from). ``orchestrator.plan`` puts them into the plan;
``orchestrator.progress.Eta`` reuses ``makespan`` for the ETA during a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # types only: they load pydantic, and the CLI reads DEVICE_PROFILES at every --help
    from nas_core.config import RunConfig
    from orchestrator.settings import Settings
    from orchestrator.specs import AblationSpec


class ProfileError(ValueError):
    """An unknown device profile, or one without a step time the plan needs; the message names it."""


# A Tune trial's fixed cost beside its steps: a fresh worker process, imports, the first cold steps, the
# MLflow child run (measured 6 s per trial, and 5 s per ablation: BENCHMARKS.md "A trial through Ray
# Tune vs called directly")
TRIAL_OVERHEAD_S = 6.0
RATE_REPS, RATE_SECONDS = 5, 0.2  # machine_rate: median of 5 runs of 0.2 s each, after a warm-up run
DEVICE_PROFILES = Path(__file__).with_name("device_profiles.yaml")
RATE_FILE = "machine/rate.json"  # under the settings' home: one entry per (machine, device, threads)


def _machine_key(device, amp: bool, threads: int) -> dict[str, Any]:
    """What a measured rate holds for: this host, its processor, the device, torch, the threads."""
    import platform

    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"host": platform.node(), "processor": cpu, "device": f"{device.type}: {name}",
            "torch": torch.__version__, "threads": threads, "amp": bool(amp and device.type == "cuda")}


def machine_rate(settings: Settings, device, amp: bool = False, threads: int = 1,
                 remeasure: bool = False) -> dict[str, Any]:
    """This machine's conv rate as the plan uses it: the median of ``RATE_REPS`` warm runs of
    ``measure_conv_rate`` with ``threads`` torch threads (what a trial with ``resources: cpu`` gets),
    cached in ``<home>/machine/rate.json`` per (host, processor, device, torch, threads), so that two plans
    on one machine give the same time. ``remeasure``: measure again and replace the cached figure.
    One run under a passing load can be off several-fold; the median of several is not."""
    import statistics
    import time

    import torch

    from nas_core.models import perf

    key = _machine_key(device, amp, threads)
    path = settings.home.expanduser() / RATE_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = []
    cached = cached if isinstance(cached, list) else []
    hit = next((e for e in cached if isinstance(e, dict) and e.get("key") == key), None)
    if hit is not None and not remeasure:
        return {**hit["rate"], "cached": str(path)}
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        perf.measure_conv_rate(device, amp=amp, seconds=RATE_SECONDS)  # warm-up: allocations, kernels
        runs = [perf.measure_conv_rate(device, amp=amp, seconds=RATE_SECONDS) for _ in range(RATE_REPS)]
    finally:
        torch.set_num_threads(saved)
    rate = {**runs[0], "flops_per_s": statistics.median(r["flops_per_s"] for r in runs),
            "spread": [min(r["flops_per_s"] for r in runs), max(r["flops_per_s"] for r in runs)],
            "seconds": round(sum(r["seconds"] for r in runs), 3), "steps": sum(r["steps"] for r in runs),
            "median_of": RATE_REPS, "threads": threads,
            "measured_at": time.strftime("%Y-%m-%d %H:%M", time.localtime())}
    entries = [e for e in cached if not (isinstance(e, dict) and e.get("key") == key)] + [{"key": key, "rate": rate}]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        return {**rate, "cached": None}  # a read-only home: measured, just not kept
    return {**rate, "cached": str(path)}


def _local_node() -> dict[str, float]:
    """This machine as one Ray node: CPUs, GPUs, and the memory Ray would offer (``memory`` resource:
    about 70% of the available memory; the rest is its object store)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA setup plans as no GPU
        gpus = 0
    available = 0.0
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        available = float(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            available = 0.0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus), "memory": 0.7 * available}


def cluster_nodes(dashboard: str, timeout: float = 2.0) -> list[dict[str, float]]:
    """The alive nodes of the Ray cluster whose dashboard is ``dashboard`` (``resourcesTotal`` of each, from
    its ``/nodes?view=summary``): [{"CPU", "GPU", "memory"}]. Raises OSError or ValueError when the
    dashboard does not answer or answers something else."""
    import urllib.request

    with urllib.request.urlopen(dashboard.rstrip("/") + "/nodes?view=summary", timeout=timeout) as resp:
        body = json.loads(resp.read())
    nodes = []
    for item in (body.get("data") or {}).get("summary") or []:
        raylet = item.get("raylet", item) if isinstance(item, dict) else {}
        if raylet.get("state", "ALIVE") != "ALIVE":
            continue
        total = raylet.get("resourcesTotal") or item.get("resourcesTotal") or {}
        nodes.append({k: float(total.get(k, 0)) for k in ("CPU", "GPU", "memory")})
    if not nodes:
        raise ValueError(f"{dashboard} lists no alive node")
    return nodes


def slots_on(nodes: Sequence[dict[str, float]], cpu: float, gpu: float, memory: float) -> int:
    """How many trials asking ``cpu``, ``gpu`` and ``memory`` bytes each run at once on ``nodes`` (a trial
    runs on one node: each node holds the fewest its CPUs, GPUs and memory allow)."""
    total = 0
    for n in nodes:
        fits = [n.get("CPU", 0) / cpu]
        if gpu > 0:
            fits.append(n.get("GPU", 0) / gpu)
        if memory > 0 and n.get("memory", 0) > 0:
            fits.append(n["memory"] / memory)
        total += int(min(fits) + 1e-9)
    return total


def machine_slots(spec: AblationSpec, settings: Settings, memory: float) -> dict[str, Any]:
    """Trials at once: ``spec.resources`` per trial (and ``memory`` bytes, the largest trial's) against this
    machine, or the cluster when ``NAS_SCAM_RAY_ADDRESS`` names one and its dashboard answers; capped by
    ``max_concurrent``. At least 1: a trial no node holds is refused by the run itself."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    where, note = "this machine", ""
    nodes = [_local_node()]
    if settings.ray_num_cpus and not settings.ray_address:
        nodes[0]["CPU"] = float(settings.ray_num_cpus)
    if settings.ray_address:
        try:
            nodes, where = cluster_nodes(settings.ray_dashboard), f"the cluster at {settings.ray_dashboard}"
        except (OSError, ValueError) as exc:
            note = (f"the cluster's dashboard {settings.ray_dashboard} did not answer ({exc}); "
                    f"this machine's slots assumed")
    slots = slots_on(nodes, cpu, gpu, memory)
    if spec.max_concurrent:
        slots = min(slots, spec.max_concurrent)
    totals = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU", "memory")}
    return {"slots": max(1, slots), "where": where, "nodes": len(nodes), "cpu": totals["CPU"], "gpu": totals["GPU"],
            "memory": totals["memory"], "per_trial": {"cpu": cpu, "gpu": gpu, "memory": memory},
            "max_concurrent": spec.max_concurrent, "note": note}


def makespan(costs: Sequence[float], slots: int, busy: Sequence[float] = ()) -> float:
    """Seconds until ``costs`` (trials in the order Tune starts them) are done on ``slots`` slots, each
    trial taking the first slot that frees; ``busy``: seconds left of the trials already running."""
    import heapq

    free = sorted(list(busy)[:slots]) + [0.0] * max(0, slots - len(busy))
    heapq.heapify(free)
    end = max(free, default=0.0)
    for c in costs:
        start = heapq.heappop(free)
        heapq.heappush(free, start + c)
        end = max(end, start + c)
    return end


def load_device_profiles(path: Path = DEVICE_PROFILES) -> dict[str, dict]:
    """Profile name -> its entry of ``device_profiles.yaml`` (the file's header says what each key means)."""
    import yaml

    return yaml.safe_load(path.read_text())


def device_profile(name: str, path: Path = DEVICE_PROFILES) -> dict:
    profiles = load_device_profiles(path)
    if name not in profiles:
        raise ProfileError(f"--device-profile {name!r}: no such profile in {path.name}; "
                           f"known: {', '.join(sorted(profiles))}")
    return {"name": name, **profiles[name]}


def _step(profile: dict, kind: str, precision: str) -> float:
    row = profile["steps"][kind]
    return float(row.get(precision, row["float32"]))


def device_hours(profile: dict, trial: dict, cfg: RunConfig) -> dict[str, Any]:
    """Hours of one run (a ``_trial`` row of ``cfg``) on the profile's device: its steps x the measured
    step times (scaled by pixels x batch when the crop or batch differs from the measured one), plus
    its evaluation windows at ``forward_share`` of a step per crop."""
    precision = "bf16" if cfg.amp else ("tf32" if cfg.tf32 else "float32")
    crop, batch = cfg.data.crop_size, trial["batch"]
    pixels = (crop / profile["crop_size"]) ** 2
    scale = pixels * batch / profile["batch"]
    model = cfg.model.name
    if trial["phase"] == "search":
        t_w = _step(profile, "search/w", precision)
        t_alpha = _step(profile, "search/iteration", precision) - t_w
        seconds = scale * (trial["steps"]["w"] * t_w + trial["steps"]["alpha"] * t_alpha)
        t_model, kinds = t_w, ["search/w", "search/iteration"]
    else:
        kind = f"train/{model}"
        if kind not in profile["steps"]:
            raise ProfileError(f"device profile {profile['name']!r} has no step time for {model!r} ({kind})")
        t_model, kinds = _step(profile, kind, precision), [kind]
        if trial["flops_note"]:  # a NAS-SCAM retrain before its search: the upper bound
            t_model *= profile.get("genotype_upper_bound", 1.0)
        seconds = scale * trial["steps"]["w"] * t_model
    seconds += pixels * trial["eval_windows"] * t_model * profile["forward_share"] / profile["batch"]
    return {"hours": seconds / 3600, "precision": precision if precision in profile["steps"][kinds[0]] else "float32",
            "scaled": round(scale, 6) != 1.0, "steps_used": kinds}


def profile_summary(profile: dict, rows: list[dict], configs: list[RunConfig]) -> dict[str, Any]:
    """The plan's ``device_profile`` section: hours per phase and in all, what each step time used is
    (measured or derived) and where it comes from. Adds ``device_hours`` to each row of ``rows`` (the
    plan's runs, ``configs`` their RunConfigs)."""
    per = [device_hours(profile, t, cfg) for t, cfg in zip(rows, configs)]
    for t, d in zip(rows, per):
        t["device_hours"] = d["hours"]
    used = sorted({k for d in per for k in d["steps_used"]})
    return {"name": profile["name"], "title": profile["title"], "unit": profile["unit"],
            "measured": profile["measured"], "source": " ".join(str(profile["source"]).split()),
            "precision": sorted({d["precision"] for d in per}),
            "scaled": any(d["scaled"] for d in per), "crop_size": profile["crop_size"], "batch": profile["batch"],
            "hours": {"search": sum(d["hours"] for t, d in zip(rows, per) if t["phase"] == "search"),
                      "train": sum(d["hours"] for t, d in zip(rows, per) if t["phase"] == "train")},
            "total_hours": sum(d["hours"] for d in per),
            "steps": {k: " ".join(str(profile["steps"][k]["how"]).split()) for k in used},
            "upper_bound": " ".join(str(profile.get("genotype_note", "")).split())
            if any(t["flops_note"] for t in rows) else "",
            "notes": [" ".join(str(n).split()) for n in profile.get("notes", [])]}
