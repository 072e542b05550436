"""``python flows/stage_guard.py --parent PID --grace S -- CMD...``: run CMD; if PID dies, stop CMD's group.

The flow starts each stage's ``dvc repro`` in a process group of its own, so that a cancelled stage is
stopped as a whole (flows/pipeline.py). A flow process killed outright (SIGKILL, the OOM killer, a worker
that gave up waiting) stops nothing: its stage would train on unseen and hold the stage's lock. This
guard leads that group and runs CMD in it; once its parent is gone, it sends the group SIGTERM and, after
``grace`` seconds, SIGKILL. It exits with CMD's status otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0  # how soon a dead parent is noticed


def stop_own_group(grace: float) -> None:
    """SIGTERM to this process's group, SIGKILL to it (this process too) ``grace`` seconds later."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    time.sleep(grace)  # no one waits on an orphan; the group id stays ours while this process lives
    os.killpg(0, signal.SIGKILL)


def guard(parent: int, grace: float, cmd: list[str]) -> int:
    """Run ``cmd`` in this process's group and return its exit status, unless ``parent`` dies first."""
    if os.getpgrp() != os.getpid():  # the group to stop would be the caller's
        raise SystemExit("stage_guard: start it as a process group leader (Popen(start_new_session=True))")
    child = subprocess.Popen(cmd)
    while True:
        try:
            code = child.wait(POLL_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent:  # re-parented: the flow process is gone
                stop_own_group(grace)
            continue
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
