"""How good is the ablation's ETA? Runs the smoke ablation as a user does and prints, never passes or fails:

- the time to the ablation's first line (the goal: within 2 s);
- at the half-way trial (the ceil(N/2)-th of the N trials to end), the ETA of the whole run that its
  line printed, the time the remaining trials then took, and their ratio (the goal: within 25%, i.e.
  0.75-1.25);
- every ETA printed, against the time then left, for the record;
- any escape code in the output (`--tty` runs it on a pseudo-terminal, as a person at a shell sees it).

    .venv/bin/python bench/eta.py                 # 2 methods x 2 seeds of the smoke preset, pipes
    .venv/bin/python bench/eta.py --tty           # the same on a pseudo-terminal (tqdm bars, colours)
    .venv/bin/python bench/eta.py --methods unet,nas-scam-p-sync,cbam --seeds 3

The run uses a fresh NAS_SCAM_HOME (a temporary folder unless --home), so data, the MLflow store and the
machine's rate are those of a first run; "time then taken" ends at the last trial's line (the table
that follows is not a trial). The ETA lines are the progress lines of `nas-scam ablate`
(orchestrator/progress.py): "... | k/n <stage> trials done, elapsed .., ETA 1m20s, whole run 3m05s".
"""

from __future__ import annotations

import argparse
import math
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESC = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
FIRST = re.compile(r"^ablation '[^']+': (\d+) trials")
END = re.compile(r"^(finished|FAILED)\s+(\S+).*\| (\d+)/(\d+) (\w+) trials done")
ETA = re.compile(r"ETA ((?:\d+h)?(?:\d+m)?\d*s?)|whole run ((?:\d+h)?(?:\d+m)?\d*s?)")


def seconds(text: str) -> float:
    """``1h02m`` / ``3m05s`` / ``45s`` -> seconds."""
    h = re.search(r"(\d+)h", text)
    m = re.search(r"(\d+)m", text)
    s = re.search(r"(\d+)s", text)
    return sum(int(x.group(1)) * k for x, k in ((h, 3600), (m, 60), (s, 1)) if x)


def run(argv: list[str], env: dict, tty: bool) -> tuple[list[tuple[float, str]], bytes, float]:
    """(lines with their arrival time since the start, the raw output, the start time)."""
    start = time.monotonic()
    raw = b""
    if tty:
        import pty

        import fcntl
        import struct
        import termios

        master, slave = pty.openpty()
        # a terminal of 30 x 120 characters: of size 0 x 0, tqdm would draw empty bars
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT)
        os.close(slave)
        stream = master
    else:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd=ROOT)
        stream = proc.stdout.fileno()
    lines: list[tuple[float, str]] = []
    pending = b""
    while True:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(stream, 65536)
        except OSError:  # the pty closes with EIO when the child ends
            chunk = b""
        if not chunk:
            break
        now = time.monotonic() - start
        raw += chunk
        pending += chunk
        *done, pending = re.split(rb"\r?\n", pending)
        for line in done:
            text = ESC.sub("", line.decode(errors="replace")).rsplit("\r", 1)[-1]
            lines.append((now, text))
            print(f"{now:7.1f}s  {text}", flush=True)
    proc.wait()
    if pending:
        lines.append((time.monotonic() - start, pending.decode(errors="replace")))
    return lines, raw, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="unet,nas-scam-p-sync", help="method ids (default unet,nas-scam-p-sync)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds (default 2)")
    ap.add_argument("--home", type=Path, help="NAS_SCAM_HOME to use (default: a fresh temporary folder)")
    ap.add_argument("--tty", action="store_true", help="run on a pseudo-terminal and report escape codes")
    args = ap.parse_args()

    home = args.home or Path(tempfile.mkdtemp(prefix="eta-bench-"))
    cli = Path(sys.executable).with_name("nas-scam")
    argv = [str(cli) if cli.exists() else sys.executable, *([] if cli.exists() else ["-m", "nas_scam.cli"]),
            "ablate", "experiments/table2.yaml", "--preset", "smoke", "--methods", args.methods,
            "--seeds", str(args.seeds), "--name", "eta-bench"]
    env = {**os.environ, "NAS_SCAM_HOME": str(home), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1"}
    for var in ("NAS_SCAM_RAY_ADDRESS", "NAS_SCAM_MLFLOW_TRACKING_URI", "NAS_SCAM_RUNS_DIR", "NAS_SCAM_DATA_DIR"):
        env.pop(var, None)
    print(f"$ NAS_SCAM_HOME={home} {' '.join(argv)}", flush=True)
    lines, raw, rc = run(argv, env, args.tty)

    first = next(((t, m) for t, line in lines if (m := FIRST.match(line))), None)
    ends = [(t, line, END.match(line)) for t, line in lines if END.match(line)]
    print("\n---- summary")
    print(f"exit status {rc}; {len(lines)} lines")
    print(f"first line after {lines[0][0]:.1f} s" if lines else "no output")
    if first:
        print(f"first 'ablation ...' line after {first[0]:.1f} s")
    codes = sorted(set(ESC.findall(raw.decode(errors="replace"))))
    tail = raw[-200:].decode(errors="replace")
    print(f"escape codes in the output: {codes or 'none'}; in its last 200 bytes: {ESC.findall(tail) or 'none'}")
    if not ends or not first:
        print("no trial ended: no ETA to judge")
        return 0
    total = int(first[1].group(1))
    t_last = ends[-1][0]
    print(f"{len(ends)} of {total} trials ended; the last at {t_last:.1f} s")
    print("ETA printed (whole run, else stage) -> time then left until the last trial ended:")
    half = math.ceil(total / 2)
    ratio = None
    for k, (t, line, m) in enumerate(ends, start=1):
        found = ETA.findall(line)
        eta = next((seconds(w) for _, w in found if w), None)
        if eta is None:
            eta = next((seconds(s) for s, _ in found if s), None)
        left = t_last - t
        mark = "  <- half-way" if k == half else ""
        shown = f"{eta:6.0f} s" if eta is not None else "     -"
        print(f"  trial {k:2d}/{total} at {t:6.1f} s: ETA {shown}, then left {left:6.1f} s"
              + (f", ratio {eta / left:.2f}" if eta is not None and left > 0 else "") + mark)
        if k == half and eta is not None and left > 0:
            ratio = eta / left
    print(f"half-way ETA / time then taken: {ratio:.2f}" if ratio is not None else "half-way: no ETA printed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
