"""Run the egressguard command with one fault point armed: at the named instant the whole apply
(parent and any iptables worker child) is SIGKILLed. Test harness only: it wraps the back end's
functions from outside, so the product carries no fault hooks.

    python tests/fault_apply.py POINT apply --policy FILE ...

Points (KIND is lockdown or policy): fence:raise:before|after (the routing fence, both families in
one system call), KIND:start, KIND:ipv4:filter:before|after (around the libiptc commit of one table,
inside the worker), KIND:ipv4:committed (between the families), KIND:done, fence:lower:before|after,
resolve, verify, status. POINT `none` arms nothing to kill (with EG_FAULT_TRACE: a timing run).
"""

from __future__ import annotations

import os
import signal
import sys

MAIN = os.getpid()
POINT = sys.argv[1]
FIRED = os.environ.get("EG_FAULT_FIRED")  # a file created just before the kill, so the test knows it fired
TRACE = os.environ.get("EG_FAULT_TRACE")  # a file that gets "POINT MONOTONIC_TIME" per point passed
# EG_FAULT_ANCHOR=POINT, EG_FAULT_ANCHOR_FD=N: passing POINT writes one byte to fd N and goes on, so a
# test's timed kill starts its clock there, not at process spawn (whose start-up varies far more than
# the kernel work the kill aims at).
ANCHOR = os.environ.get("EG_FAULT_ANCHOR")
ANCHOR_FD = int(os.environ.get("EG_FAULT_ANCHOR_FD", "-1"))


def hit(name: str) -> None:
    if TRACE:
        import time  # noqa: PLC0415

        with open(TRACE, "a") as fh:
            fh.write(f"{name} {time.monotonic():.6f}\n")
    if name == ANCHOR and ANCHOR_FD >= 0:
        try:
            os.write(ANCHOR_FD, b"a")
        except OSError:
            pass  # the test stopped listening: nothing to announce to
    if name == POINT:
        if FIRED:
            with open(FIRED, "w") as fh:
                fh.write(name)
        os.kill(MAIN, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def arm() -> None:
    from egressguard import apply as apply_mod
    from egressguard import facts, fence, status
    from egressguard.backends import iptables as ipt

    kind = {"now": "?"}
    commit = ipt.IptablesBackend.commit

    def wrapped_commit(self, ruleset):  # type: ignore[no-untyped-def]
        kind["now"] = ruleset.kind
        hit(f"{ruleset.kind}:start")
        out = commit(self, ruleset)
        hit(f"{ruleset.kind}:done")
        return out

    ipt.IptablesBackend.commit = wrapped_commit  # type: ignore[method-assign]
    commit_family = ipt.IptablesBackend._commit_family

    def wrapped_family(self, family, tables):  # type: ignore[no-untyped-def]
        out = commit_family(self, family, tables)
        hit(f"{kind['now']}:ipv{family}:committed")
        return out

    ipt.IptablesBackend._commit_family = wrapped_family  # type: ignore[method-assign]
    import_iptc = ipt.import_iptc

    def wrapped_import():  # type: ignore[no-untyped-def]
        iptc = import_iptc()
        if not getattr(iptc, "_fault_armed", False):
            table_commit = iptc.Table.commit

            def commit_table(self):  # type: ignore[no-untyped-def]
                where = f"{kind['now']}:ipv{6 if isinstance(self, iptc.Table6) else 4}:{self.name}"
                hit(where + ":before")
                table_commit(self)
                hit(where + ":after")

            iptc.Table.commit = commit_table
            iptc._fault_armed = True
        return iptc

    ipt.import_iptc = wrapped_import
    for module, name, point in ((facts, "resolve_hosts", "resolve"), (apply_mod, "differences", "verify"),
                                (status, "write", "status"), (fence, "raise_fence", "fence:raise"),
                                (fence, "lower_fence", "fence:lower")):
        original = getattr(module, name)

        def wrapper(*a, _original=original, _point=point, **kw):  # type: ignore[no-untyped-def]
            hit(_point + ":before" if _point.startswith("fence") else _point)
            out = _original(*a, **kw)
            if _point.startswith("fence"):
                hit(_point + ":after")
            return out

        setattr(module, name, wrapper)


if __name__ == "__main__":
    arm()
    from egressguard.cli import main

    sys.exit(main(sys.argv[2:]))
