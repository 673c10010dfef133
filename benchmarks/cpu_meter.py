"""Run a command and report its wall time and the CPU time of its whole process tree, Ray's processes included.

    python benchmarks/cpu_meter.py -- ne run --config configs/lm-sae.yaml

/usr/bin/time counts only the children a process waits for, which leaves out a local Ray cluster's workers.
This polls /proc every `--every` seconds and keeps each descendant's latest user + system time (not the times of
the children it reaped, which are counted as themselves), so a process loses at most its last interval, and one
that lives less than an interval may be missed. On a shared machine the CPU time is the figure to compare: an
idle 2-core machine would take between CPU/2 and CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=1.0, help="seconds between polls")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            value = cpu_seconds(pid)
            if value is not None:
                seen[pid] = max(seen.get(pid, 0.0), value)
        time.sleep(args.every)
    wall = time.perf_counter() - t0
    cpu = sum(seen.values())
    print(
        f"\ncpu_meter: exit {proc.returncode}; wall {wall:.0f} s; CPU {cpu:.0f} s in {len(seen)} processes (an idle "
        f"2-core machine: between {cpu / 2:.0f} and {cpu:.0f} s)",
        file=sys.stderr,
    )
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
