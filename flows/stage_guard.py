"""``python flows/stage_guard.py --parent PID --grace S -- CMD...``: run CMD; if PID dies, stop CMD's group.

The flow starts each stage's ``dvc repro`` in a process group of its own, so that a cancelled stage is
stopped as a whole (flows/pipeline.py). A flow process killed outright (SIGKILL, the OOM killer, a worker
that gave up waiting) stops nothing: its stage would train on unseen and hold the stage's lock. This
guard leads that group and runs CMD in it; once its parent is gone, it sends the group SIGTERM and, to
what is still there ``grace`` seconds later, SIGKILL. It exits with CMD's status otherwise, after stopping
the same way whatever CMD left running in the group: a ``dvc repro`` killed outright (the OOM killer)
would leave its stage's command training unseen, holding the stage's lock against the flow's retry.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0  # how soon a dead parent is noticed


def left_in_group(group: int | None = None) -> list[int]:
    """The live processes of process group ``group`` (default: this process's) other than this process
    (Linux's /proc; zombies are not live: a reaper that never reaps keeps them, flows/pipeline.py too)."""
    me, group = os.getpid(), os.getpgrp() if group is None else group
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            state, _ppid, pgrp = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(pgrp) == group and state != "Z":
            found.append(int(entry.name))
    return found


def stop_leftovers(grace: float) -> None:
    """Stop what CMD left in the group: SIGTERM, then SIGKILL to each one still there ``grace`` s later."""
    if not left_in_group():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := left_in_group()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(100):  # one that forks as it dies leaves a child: kill until none is left
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        left = left_in_group()
    print(f"stage_guard: processes {left} outlived SIGKILL (stuck in the kernel?)", file=sys.stderr)


def guard(parent: int, grace: float, cmd: list[str]) -> int:
    """Run ``cmd`` in this process's group and return its exit status, unless ``parent`` dies first.

    Nothing ``cmd`` started outlives it in the group.
    """
    if os.getpgrp() != os.getpid():  # the group to stop would be the caller's
        raise SystemExit("stage_guard: start it as a process group leader (Popen(start_new_session=True))")
    child = subprocess.Popen(cmd)
    while child.poll() is None and os.getppid() == parent:  # else re-parented: the flow process is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(POLL_S)
    # the group id stays ours while this process lives: stopped at once if all of it heeds SIGTERM, where a
    # fixed wait of ``grace`` seconds kept a killed flow's guard idling on
    stop_leftovers(grace)
    code = child.poll()  # None: stuck in the kernel past SIGKILL (stop_leftovers said so)
    if code is None:
        return 128 + signal.SIGKILL
    return code if code >= 0 else 128 - code  # killed by signal n: the shell's 128 + n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stage_guard.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--parent", type=int, required=True, help="the pid whose death stops CMD")
    p.add_argument("--grace", type=float, required=True, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command after --")
    return guard(args.parent, args.grace, cmd)


if __name__ == "__main__":
    sys.exit(main())
