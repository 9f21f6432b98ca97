"""Start an egressguard process beside the command (Docker mode): `watch` today, any sidecar later."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Sequence

READY_TIMEOUT_S = 10.0


def start(argv: Sequence[str]) -> int | None:
    """`egressguard ARGV --ready-fd N --parent PID` as a process of its own: a new session (no
    terminal or process-group signal reaches it), stdout and stderr shared with the command (the
    container's log). It drops to its own user (never the command's, so the command cannot signal
    it) and ends when this process, the command after the exec, ends. Returns its pid once it says
    it is ready; None if it did not come up (nothing about the guard depends on it)."""
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.set_inheritable(w, True)
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-m", "egressguard", *argv,
                                      "--ready-fd", str(w), "--parent", str(parent)])
        finally:
            os._exit(127)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT_S)
        return pid if ready and os.read(r, 1) == b"1" else None
    finally:
        os.close(r)


def parent_exit_fd(parent: int) -> int:
    """A pidfd of `parent` (readable once it has ended). Not PR_SET_PDEATHSIG: the kernel sends that
    signal with the ending parent's credentials, and the command (another uid) may not signal us,
    so it never arrives. Opened, then checked to still be our parent: no window for a missed exit."""
    fd = os.pidfd_open(parent)
    if os.getppid() != parent:
        os.close(fd)
        raise ProcessLookupError(f"parent {parent} has already ended")
    return fd


def report_ready(fd: int) -> None:
    os.set_inheritable(fd, False)
    os.write(fd, b"1")
    os.close(fd)
