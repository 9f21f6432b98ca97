"""Run the egressguard command with one fault point armed: at the named instant the whole apply
(parent and any iptables worker child) is SIGKILLed. Test harness only: it wraps the back end's
functions from outside, so the product carries no fault hooks.

    python tests/fault_apply.py POINT apply --policy FILE ...

Points (KIND is lockdown or policy): fence:raise:before|after (the routing fence, both families in
one system call), KIND:start, KIND:ipv4:filter:before|after (around the libiptc commit of one table,
inside the worker), KIND:ipv4:committed (between the families), KIND:done, fence:lower:before|after,
resolve, verify, status. POINT `none` arms nothing to kill (with EG_FAULT_TRACE: a timing run).

With EGRESSGUARD_BACKEND=nftables the nftables back end is armed instead: KIND:start, KIND:read
(our table read, before anything is rendered), KIND:sets:before|after (the transaction that creates
new sets), KIND:rules:before|after (the one transaction with both families), KIND:done,
readback:before|after (apply's read-back: before the listing, and with the listing in hand, before
it is compared), then fence:lower, resolve, verify and status as above. EG_NFT_RACE=N (or `all`)
makes a real foreign commit land in the window of the first N policy commit attempts: before our
read a separate `nft` process adds chain `intruder` to our table, right after it deletes it again,
so the transaction rendered from that read names a chain that is gone. EG_NFT_OWNER=1: before the
first commit (after preflight) a second netlink socket of this process creates our table with
`flags owner` (only that socket may change it, until it closes): the kernel refuses apply's
transactions, with no other commit in between.
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


def _wrap_commit(backend: type, kind: dict[str, str | None]) -> None:
    """KIND:start and KIND:done around the back end's commit; kind["now"] says which is running."""
    commit = backend.commit

    def wrapped_commit(self, ruleset):  # type: ignore[no-untyped-def]
        kind["now"] = ruleset.kind
        hit(f"{ruleset.kind}:start")
        out = commit(self, ruleset)
        hit(f"{ruleset.kind}:done")
        return out

    backend.commit = wrapped_commit  # type: ignore[attr-defined]


def arm() -> None:
    from egressguard.backends.iptables import backend as ipt

    kind: dict[str, str | None] = {"now": "?"}
    _wrap_commit(ipt.IptablesBackend, kind)
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
    _arm_common()


def _arm_common() -> None:
    from egressguard import apply as apply_mod
    from egressguard import facts, status
    from egressguard.backends.iptables import fence

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


def arm_nftables() -> None:
    import subprocess  # noqa: PLC0415

    from egressguard.backends.nftables import backend as nftb
    from egressguard.backends.nftables import render
    from egressguard.backends.nftables.transport import Nft, SetRefill

    kind: dict[str, str | None] = {"now": "?", "sets": None}
    race = os.environ.get("EG_NFT_RACE", "0")
    races = {"left": 1 << 30 if race == "all" else int(race)}
    _wrap_commit(nftb.NftablesBackend, kind)
    if os.environ.get("EG_NFT_OWNER"):
        commit_ = nftb.NftablesBackend.commit
        owner: list[Nft] = []

        def owned_first(self, ruleset):  # type: ignore[no-untyped-def]
            if not owner:  # after preflight, before the first commit: this socket, not apply's, owns the name
                owner.append(Nft())
                owner[0].run(f"add table {render.TABLE} {{ flags owner; }}")
            return commit_(self, ruleset)

        nftb.NftablesBackend.commit = owned_first  # type: ignore[method-assign]
    new_sets_script = render.new_sets_script

    def wrapped_new_sets(*a, **kw):  # type: ignore[no-untyped-def]
        kind["sets"] = new_sets_script(*a, **kw)
        return kind["sets"]

    render.new_sets_script = wrapped_new_sets
    run, list_json = Nft.run, Nft.list_json

    def wrapped_run(self, script, **kw):  # type: ignore[no-untyped-def]
        if kw.get("json_output") or kw.get("dry_run"):
            return run(self, script, **kw)
        step = "sets" if script == kind["sets"] else "rules"
        hit(f"{kind['now']}:{step}:before")
        out = run(self, script, **kw)
        hit(f"{kind['now']}:{step}:after")
        return out

    def foreign(script: str) -> None:
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True, timeout=20)

    def wrapped_list(self, what, terse=False):  # type: ignore[no-untyped-def]
        racing = terse and kind["now"] == "policy" and races["left"] > 0
        if racing:
            foreign(f"add table {render.TABLE}\nadd chain {render.TABLE} intruder\n")
        out = list_json(self, what, terse=terse)
        if racing:
            races["left"] -= 1
            foreign(f"delete chain {render.TABLE} intruder\n")  # committed between our read and our commit
        if terse:
            hit(f"{kind['now']}:read")
        return out

    Nft.run, Nft.list_json = wrapped_run, wrapped_list  # type: ignore[method-assign]
    refill = SetRefill.refill

    def wrapped_refill(self, sets):  # type: ignore[no-untyped-def]
        hit(f"{kind['now']}:refill:before")
        refill(self, sets)
        hit(f"{kind['now']}:refill:after")

    SetRefill.refill = wrapped_refill  # type: ignore[method-assign]
    read = nftb.NftablesBackend.read

    def wrapped_read(self, expect=(), want=None):  # type: ignore[no-untyped-def]
        if want is None:
            return read(self, expect, want)
        hit("readback:before")
        decode_installed = nftb.decode.installed

        def listed(*a, **kw):  # type: ignore[no-untyped-def]
            hit("readback:after")  # the kernel's listing is in hand, not yet decoded or compared
            return decode_installed(*a, **kw)

        nftb.decode.installed = listed
        try:
            return read(self, expect, want)
        finally:
            nftb.decode.installed = decode_installed

    nftb.NftablesBackend.read = wrapped_read  # type: ignore[method-assign]
    _arm_common()


if __name__ == "__main__":
    arm_nftables() if os.environ.get("EGRESSGUARD_BACKEND") == "nftables" else arm()
    from egressguard.cli import main

    sys.exit(main(sys.argv[2:]))
