"""What a person sees while trials run: one line per trial event; a trial's end adds done/total and an ETA.

``Progress`` turns trial events into plain lines (no ANSI, no carriage returns: the same text reads
well in a terminal, a Ray job log and ``GET /v1/runs/{id}/logs``). ``tune_callback`` feeds it from Tune's
driver-side hooks, which replace Tune's status table (``RunConfig(verbose=0)``). ``quiet_logging``
sends Ray's and MLflow's own logging to a file under the run folder; ``--verbose`` skips all of it.

The ETA: with an ``Eta`` (made once per run from the plan, ``Eta.from_plan``, and handed to each stage's
``Progress``) it is known from the first trial on, for the stage and the whole run, from the plan's
cost of every trial, corrected by what the finished ones took. Without one, from the mean finished
trial of the stage.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TextIO

# loggers whose INFO/WARNING chatter leaves the terminal in quiet mode (alembic: MLflow's db migrations)
CHATTY_LOGGERS = ("ray", "mlflow", "alembic", "optuna")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove ANSI escapes and keep only the last state of ``\\r``-rewritten lines (tqdm)."""
    text = _ANSI.sub("", text)
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _group(name: str) -> str:
    # trials of one method take alike times: "full__unet__seed1" is timed like "full__unet__seed0", and
    # "train__unet__seed1__fold0" like "train__unet__seed0__fold0"
    return re.sub(r"__seed\d+", "", name)


class Eta:
    """Seconds left of a whole run, from the plan's cost of each trial, corrected as trials finish.

    ``stages``: [(stage, {trial name: planned seconds})] in run order (``plan["stages"]``: each trial's
    compute plus ``overhead``, the fixed start-up per trial); ``slots``: trials at once
    (``plan["parallel"]``). A pending trial is expected to take:
    - what the finished trials of its group took (the same method and stage, another seed); else
    - ``a + b x planned compute``, fitted to the finished trials once their planned computes differ
      (a busy machine stretches the fixed part and the compute alike, and the plan's compute is an
      upper bound for a NAS-SCAM retrain: the fit learns both); else
    - its planned seconds x measured / planned over the trials finished so far (1 before any).
    A stage starts when the one before ends, after the gap measured between the earlier stages (Tune
    builds the next grid), ``stage_start`` seconds before any was seen; within a stage, a trial starts
    the measured turnaround after a slot frees (Tune starts its worker), 0 before any was seen."""

    def __init__(self, stages: list[tuple[str, Mapping[str, float]]], slots: int = 1, overhead: float = 0.0,
                 stage_start: float = 5.0):
        self.stages = [(stage, dict(trials)) for stage, trials in stages]
        self.planned = {name: cost for _, trials in self.stages for name, cost in trials.items()}
        self.stage_of = {name: i for i, (_, trials) in enumerate(self.stages) for name in trials}
        self.slots = max(1, int(slots))
        self.overhead = overhead
        self.took: dict[str, float] = {}  # finished trials: measured seconds
        self.ended: set[str] = set()  # finished, failed or done in an earlier session
        self.gaps: list[float] = []  # measured: last end of a stage -> first start of the next
        self.turns: list[float] = []  # measured: an end -> the next start in the same stage
        self.stage_start = stage_start
        self._last_end: Optional[tuple[int, float]] = None  # (stage index, clock) of the latest end
        self._started_stages: set[int] = set()

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> "Eta":
        """From ``orchestrator.plan.build_plan``'s dict (its ``stages``, ``parallel`` and start-up)."""
        return cls([(s["stage"], s["trials"]) for s in plan["stages"]], plan.get("parallel", {}).get("slots", 1),
                   overhead=plan.get("trial_overhead_s", 0.0))

    # ------------------------------------------------------------------ events (``now``: the caller's clock)
    def started(self, name: str, now: float) -> None:
        index = self.stage_of.get(name)
        if index is None:
            return
        if index in self._started_stages:
            if self._last_end is not None and self._last_end[0] == index:
                self.turns.append(max(0.0, now - self._last_end[1]))
            return
        self._started_stages.add(index)
        if self._last_end is not None and self._last_end[0] < index:
            self.gaps.append(max(0.0, now - self._last_end[1]))

    def finished(self, name: str, seconds: float, now: Optional[float] = None) -> None:
        self.took[name] = seconds
        self._ended(name, now)

    def ended_without_time(self, name: str, now: Optional[float] = None) -> None:
        """A failed trial, or one finished in an earlier session: nothing left, and no time to learn from."""
        self._ended(name, now)

    def _ended(self, name: str, now: Optional[float]) -> None:
        self.ended.add(name)
        if now is not None and name in self.stage_of:
            self._last_end = (self.stage_of[name], now)

    # ------------------------------------------------------------------ estimates
    def ratio(self) -> float:
        """Measured / planned seconds over the finished trials the plan knows (1 before any)."""
        known = [n for n in self.took if self.planned.get(n)]
        planned = sum(self.planned[n] for n in known)
        return sum(self.took[n] for n in known) / planned if planned else 1.0

    def _fit(self) -> Optional[tuple[float, float]]:
        """(a, b) of took = a + b x planned compute over the finished trials, a, b >= 0; None while their
        planned computes are too alike (within 20% of their mean) to tell the parts apart."""
        pts = [(max(0.0, self.planned[n] - self.overhead), t) for n, t in self.took.items() if n in self.planned]
        xs = [x for x, _ in pts]
        if len(pts) < 2 or max(xs) - min(xs) < 0.2 * (sum(xs) / len(xs)):
            return None
        mx, my = sum(xs) / len(xs), sum(y for _, y in pts) / len(pts)
        b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
        if b <= 0:  # the compute does not show in the times: the fixed part is all there is
            return my, 0.0
        a = my - b * mx
        if a < 0:  # no fixed part: a line through the origin
            return 0.0, sum(x * y for x, y in pts) / sum(x * x for x in xs)
        return a, b

    def expected(self, name: str) -> float:
        same = [t for n, t in self.took.items() if _group(n) == _group(name)]
        if same:
            return sum(same) / len(same)
        if name in self.planned:
            fit = self._fit()
            if fit is not None:
                return fit[0] + fit[1] * max(0.0, self.planned[name] - self.overhead)
            return self.planned[name] * self.ratio()
        return sum(self.took.values()) / len(self.took) if self.took else 0.0

    def left(self, running: Mapping[str, float], stage_names: Optional[list[str]] = None,
             slots: Optional[int] = None) -> tuple[float, float]:
        """(seconds left of the current stage, of the whole run). ``running``: trial -> seconds it has run;
        ``stage_names``: the current stage's trials (default: the first stage with a trial not ended)."""
        from orchestrator.costs import makespan

        slots = max(self.slots, slots or 0)
        names = set(stage_names or ())
        index = next((i for i, (_, trials) in enumerate(self.stages) if names & set(trials)), None)
        if index is None:
            index = next((i for i, (_, trials) in enumerate(self.stages) if set(trials) - self.ended),
                         len(self.stages))
        current = list(stage_names) if stage_names else (list(self.stages[index][1]) if index < len(self.stages)
                                                         else [])
        busy = [max(0.0, self.expected(n) - ran) for n, ran in running.items() if n not in self.ended]
        turn = sorted(self.turns)[len(self.turns) // 2] if self.turns else 0.0
        pending = [turn + self.expected(n) for n in current if n not in self.ended and n not in running]
        stage_left = makespan(pending, slots, busy)
        gap = sum(self.gaps) / len(self.gaps) if self.gaps else self.stage_start
        later = sum(gap + makespan([self.expected(n) for n in trials if n not in self.ended], slots)
                    for _, trials in self.stages[index + 1:] if set(trials) - self.ended)
        return stage_left, stage_left + later


class Progress:
    """Trial events -> lines. ``total`` trials, at most ``concurrency`` at once; ``clock`` for tests.

    ``names``: the trials' names when known in advance (a grid); the ETA then times each pending trial
    like the finished ones of its method instead of like the mean trial.
    """

    def __init__(self, total: int, concurrency: Optional[int] = None, label: str = "trials",
                 out: Optional[TextIO] = None, clock: Callable[[], float] = time.monotonic,
                 names: Optional[list[str]] = None, eta: Optional[Eta] = None):
        self.total, self.label, self.clock = (len(names) if names else total), label, clock
        self.plan_eta = eta  # the run's, shared by the Progress of every stage
        self.names = list(names or [])
        self.by_group: dict[str, list[float]] = {}
        self.concurrency = concurrency
        self.out = out
        self.started: dict[str, float] = {}
        self.durations: list[float] = []
        self.failed: list[str] = []
        self.done: list[str] = []
        self.peak = 0  # most trials seen running at once: the width when ``concurrency`` is not given
        self.t0 = clock()

    def _emit(self, line: str) -> str:
        print(line, file=self.out or sys.stdout, flush=True)
        return line

    # ------------------------------------------------------------------ events
    def trial_started(self, name: str) -> str:
        self.started.setdefault(name, self.clock())
        if self.plan_eta is not None:
            self.plan_eta.started(name, self.started[name])
        self.peak = max(self.peak, len(self._running()))
        # with the plan's costs the ETA is known before any trial ends: each start says it
        text = self._eta_text() if self.plan_eta is not None else ""
        return self._emit(f"started   {name}" + (f" | {text}" if text else ""))

    def trial_result(self, name: str, result: Mapping[str, Any]) -> Optional[str]:
        """An epoch report: ``phase``, ``epoch`` (0-based), ``epochs`` and a metric; the final report prints nothing."""
        if result.get("phase") not in ("search", "train") or "epoch" not in result:
            return None
        k = int(result["epoch"]) + 1
        total = result.get("epochs")
        parts = [f"{result['phase']} epoch {k}/{int(total)}" if total else f"{result['phase']} epoch {k}"]
        for key, label, scale in (("val_dsc", "val DSC", 100.0), ("train_loss", "loss", 1.0)):
            v = result.get(key)
            if isinstance(v, (int, float)):
                parts.append(f"{label} {v * scale:.2f}%" if scale != 1 else f"{label} {v:.4f}")
        return self._emit(f"  {name}: " + ", ".join(parts))

    def trial_finished(self, name: str, result: Mapping[str, Any]) -> str:
        took = self.clock() - self.started.get(name, self.t0)
        if self.plan_eta is not None:
            self.plan_eta.finished(name, took, self.clock())
        self.durations.append(took)
        self.by_group.setdefault(_group(name), []).append(took)
        self.done.append(name)
        score = result.get("test_Average")
        what = f"test DSC {score:.2f}%" if isinstance(score, (int, float)) else "done"
        return self._emit(f"finished  {name} in {fmt_duration(took)}: {what} | {self.overall()}")

    def trial_failed(self, name: str, reason: str, log_hint: str = "") -> str:
        self.failed.append(name)
        if self.plan_eta is not None:
            self.plan_eta.ended_without_time(name, self.clock())
        first = next((ln.strip() for ln in str(reason).splitlines() if ln.strip()), "unknown error")
        return self._emit(f"FAILED    {name}: {first[:400]}{log_hint} | {self.overall()}")

    def already_done(self, name: str) -> None:
        """A trial that finished in an earlier session (``--resume``): counted, but not timed."""
        if name not in self.done:
            self.done.append(name)
        if self.plan_eta is not None:
            self.plan_eta.ended_without_time(name)

    def trial_retried(self, name: str, reason: str) -> str:
        """Tune restarts a failed trial from its last checkpoint (``max_failures``): not an end."""
        first = next((ln.strip() for ln in str(reason).splitlines() if ln.strip()), "unknown error")
        return self._emit(f"retrying  {name} from its last checkpoint after: {first[:400]}")

    # ------------------------------------------------------------------ overall
    def eta(self) -> Optional[float]:
        """Seconds left of this stage: from the plan's costs when an ``Eta`` was given, else from the mean
        measured trial time (None before the first trial finished)."""
        if self.plan_eta is not None:
            return self._plan_left()[0]
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)

        def expected(name: str) -> float:
            times = self.by_group.get(_group(name))
            return sum(times) / len(times) if times else mean

        now = self.clock()
        running = self._running()
        ended = set(self.done) | set(self.failed)
        if self.names:
            work = sum(expected(n) for n in self.names if n not in ended and n not in self.started)
        else:
            work = max(0, self.total - len(ended) - len(running)) * mean
        work += sum(max(0.0, expected(n) - (now - self.started[n])) for n in running)
        return work / max(1, self.concurrency or self.peak)

    def _plan_left(self) -> tuple[float, float]:
        now = self.clock()
        running = {n: now - self.started[n] for n in self._running()}
        return self.plan_eta.left(running, self.names or None, self.peak)

    def _eta_text(self) -> str:
        """``ETA 1m20s`` (this stage), ``whole run 3m05s`` while later stages remain; "" at the very end."""
        stage, run = self._plan_left()
        parts = [f"ETA {fmt_duration(stage)}"] if len(self.done) + len(self.failed) < self.total else []
        if run > stage + 0.5:
            parts.append(f"whole run {fmt_duration(run)}")
        return ", ".join(parts)

    def _running(self) -> list[str]:
        ended = set(self.done) | set(self.failed)
        return [n for n in self.started if n not in ended]

    def overall(self) -> str:
        n_end = len(self.done) + len(self.failed)
        eta = self.eta()
        parts = [f"{n_end}/{self.total} {self.label} done"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        parts.append(f"elapsed {fmt_duration(self.clock() - self.t0)}")
        text = self._eta_text() if self.plan_eta is not None else None
        if text:
            parts.append(text)
        elif text is None and n_end < self.total:
            parts.append(f"ETA {fmt_duration(eta)}" if eta is not None else "ETA after the first trial")
        return ", ".join(parts)


def tune_callback(progress: Progress, log_dir: Optional[Path] = None):
    """A ``ray.tune.Callback`` that reports trial events through ``progress``."""
    from ray import tune

    hint = f" (worker log: {log_dir})" if log_dir else ""

    class _ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            # a resumed experiment: its finished trials never start again, count them once here
            for t in trials:
                if t.status == "TERMINATED":
                    progress.already_done(str(t))
            progress.trial_started(str(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.trial_result(str(trial), result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.trial_finished(str(trial), trial.last_result or {})

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.trial_failed(str(trial), _reason(trial), hint)

        def on_trial_recover(self, iteration, trials, trial, **info):
            progress.trial_retried(str(trial), _reason(trial))

    return _ProgressCallback()


def _reason(trial) -> str:
    """The cause of a trial's latest failure, in one line (``failure_reason``).

    Tune writes the failure to the trial's local folder (``error.txt``, one section per failure) before
    it calls back; ``get_error`` reads the copy in the run's storage, which is not there yet then."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return failure_reason(Path(path).read_text(encoding="utf-8", errors="replace"))
    err = trial.get_error() if hasattr(trial, "get_error") else None
    return failure_reason(err) if err else (getattr(trial, "error_msg", None) or "error")


_FAILURE_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^)]*\)\n", re.M)
# Ray's memory monitor (2.60: "1 worker(s) were killed due to the node running low on memory. Memory on
# the node (IP: ..., ID: ...) was 1.43GB used / 23.59GB limit (0.06)"; before: "Task was killed due to
# the node running low on memory. Memory on the node (IP: ...) where the task (..., pid=N, memory
# used=0.4GB) was running was 7.26GB / 7.68GB (0.945), which exceeds the memory usage threshold of 0.95")
_OOM = re.compile(r"running low on memory")
_OOM_NODE = re.compile(r"Memory on the node \(IP: ([^,)]+).*?was ([\d.]+\s*[KMGT]?B)(?: used)? / ([\d.]+\s*[KMGT]?B)",
                       re.S)
_OOM_THRESHOLD = re.compile(r"threshold of \d+B \((\d+(?:\.\d+)?%) of|memory usage threshold of (\d+(?:\.\d+)?)")
_OOM_KILLED = re.compile(r"pid=(\d+), (?:actual )?memory used=([\d.]+\s*[KMGT]?B)")
_OOM_TOP = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+(\S.*)$", re.M)
# a worker process that ended under its trial: SIGKILL (the kernel's OOM killer, `kill -9`), SIGSEGV
_DIED = re.compile(r"worker process has died|The worker died unexpectedly|Worker unexpectedly exits")
_NODE_DIED = re.compile(r"node has died|NodeDiedError|node .{0,40}(?:was terminated|is dead|died)", re.I)


def failure_reason(error: Any) -> str:
    """One line that says why a trial failed, from its exception or the text Tune saved of it.

    Killed by Ray's memory monitor: the node's figures, the trial's worker and the largest processes,
    as Ray's OutOfMemoryError lists them. A worker that died (ActorDiedError, WorkerCrashedError: a
    SIGKILL, a segfault): its pid and what can do that. A lost node: so. Else the user's exception
    (a RayTaskError's cause, or the last line of the saved traceback). Of a text that holds several
    failures (Tune's error.txt: one "Failure # k" section each), the last."""
    text = _FAILURE_HEADER.split(strip_ansi(error if isinstance(error, str) else str(error)))[-1]
    if _OOM.search(text):
        return _memory_reason(text)
    if _DIED.search(text) and not _NODE_DIED.search(text):
        pid = re.search(r"\bpid[:=] ?(\d+)|Worker PID: (\d+)", text)
        exit_type = re.search(r"Worker exit type: (\w+)", text)
        where = ", ".join(x for x in ((f"pid {pid.group(1) or pid.group(2)}" if pid else ""),
                                      (f"exit {exit_type.group(1)}" if exit_type else "")) if x)
        return (f"the trial's worker process died{f' ({where})' if where else ''}: killed (SIGKILL, the kernel's "
                f"OOM killer) or crashed (SIGSEGV); the worker log may say more")
    if _NODE_DIED.search(text):
        first = next((ln.strip() for ln in text.splitlines() if _NODE_DIED.search(ln)), "")
        return f"the node running the trial was lost ({first[:200]})"
    if not isinstance(error, str):
        cause = getattr(error, "cause", None) or error.__cause__
        if cause is not None:
            return f"{type(cause).__name__}: {_first_line(str(cause))}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__ if not isinstance(error, str) else "error"
    return lines[-1]


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _memory_reason(text: str) -> str:
    parts = ["killed for memory by Ray's memory monitor"]
    node, threshold = _OOM_NODE.search(text), _OOM_THRESHOLD.search(text)
    if node:
        limit = f" (threshold {threshold.group(1) or threshold.group(2)})" if threshold else ""
        parts[0] += f": node {node.group(1)} at {node.group(2)} of {node.group(3)}{limit}"
    killed = _OOM_KILLED.search(text)
    if killed:
        parts.append(f"the trial's worker (pid {killed.group(1)}) held {killed.group(2)}")
    top = text.split("memory users:", 1)[1] if "memory users:" in text else ""
    users = [f"pid {pid} {gb}GB ({_command(cmd)})" for pid, gb, cmd in _OOM_TOP.findall(top)[:3]]
    if users:
        parts.append("largest: " + ", ".join(users))
    return "; ".join(parts)


def _command(cmd: str) -> str:
    # "/venv/bin/python /venv/bin/nas-scam ablate ..." -> "python nas-scam ablate ...", at most 40 characters
    words = cmd.split()[:4]
    words[:2] = [w.rsplit("/", 1)[-1] for w in words[:2]]  # the interpreter and the script, without folders
    text = " ".join(words).rstrip(".")
    return text if len(text) <= 40 else text[:37] + "..."


class _LazyFileHandler(logging.FileHandler):
    """Creates its folder and file at the first record: input rejected before any run leaves no run folder."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def quiet_logging(log_file: Optional[Path], verbose: bool = False) -> Iterator[None]:
    """Ray/MLflow logging below ERROR goes to ``log_file`` instead of the terminal (nothing when verbose).

    Records of ``ray.tune`` never reach the terminal here: the progress lines already say which trial
    failed and why, and its traceback is in the log file and in MLflow (``error.txt``).
    """
    if verbose:
        yield
        return
    import mlflow  # noqa: F401  (both set up their loggers' terminal handlers at import; tamed below)
    import ray  # noqa: F401

    file_handler = None
    if log_file is not None:
        file_handler = _LazyFileHandler(log_file, encoding="utf-8", delay=True)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    # every state saved before any is changed: a handler shared by two of these loggers must come back
    # to its own level, not to the level the first logger's pass gave it
    saved = [(lg, lg.level, lg.propagate, [(h, h.level, list(h.filters)) for h in lg.handlers]) for lg in loggers]
    for lg in loggers:
        if not lg.handlers:  # no terminal handler of its own: keep its records off the root's
            lg.propagate = False
        for h in lg.handlers:
            h.setLevel(max(h.level, logging.ERROR))
            h.addFilter(lambda r: not r.name.startswith("ray.tune"))
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
        if file_handler is not None:
            lg.addHandler(file_handler)
    try:
        yield
    finally:
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate = propagate
            if file_handler is not None:
                lg.removeHandler(file_handler)
            for h, h_level, filters in handlers:
                h.setLevel(h_level)
                h.filters[:] = filters
        if file_handler is not None:
            file_handler.close()
