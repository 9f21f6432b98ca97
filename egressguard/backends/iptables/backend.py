"""The python-iptables (libiptc, legacy x_tables) back end: one atomic commit per table."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fcntl
import functools
import glob
import importlib.util
import ipaddress
import os
import pickle
import signal
import struct
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from egressguard import logs
from egressguard.backends import ANY_USER, Backend, Installed, InstalledTable, LearnedHolding, u32
from egressguard.backends.iptables import fence, render, xtables_raw
from egressguard.backends.iptables.xtables_raw import Entry
from egressguard.errors import ApplyFailed, EgressGuardError, EnvironmentUnsupported
from egressguard.policy import Policy
from egressguard.privileges import CAP_NET_ADMIN, CAP_NET_RAW, effective_caps
from egressguard.ruleset import (
    DISPATCH,
    FAMILIES,
    JUMP_COMMENT,
    LEARNED_SET_TIMEOUT_S,
    OWNED_CHAINS,
    SET_PREFIX,
    SET_STAGING_SUFFIX,
    AddressSet,
    Chain,
    Family,
    HeaderTest,
    LearnedSet,
    Rule,
    Ruleset,
    Table,
    owned_chains,
    shared_limit_expire_ms,
)

T = TypeVar("T")
log = logs.get_logger("egressguard")

TABLES = ("filter", "nat")
XTABLES_LOCK = "/run/xtables.lock"  # what `iptables -w` locks ($XTABLES_LOCKFILE overrides, as for iptables)
XTABLES_LOCK_WAIT_S = 5.0
COMMIT_ATTEMPTS = 20  # a commit that races another writer fails with EAGAIN: rebuild and retry
_PR_SET_PDEATHSIG = 1


def _xtables_libdir() -> str | None:
    for pattern in ("/usr/lib/*/xtables", "/usr/lib/xtables", "/usr/lib64/xtables", "/usr/libexec/xtables", "/lib/xtables"):
        for d in sorted(glob.glob(pattern)):
            if os.path.exists(os.path.join(d, "libxt_comment.so")):
                return d
    return None


def import_iptc() -> Any:
    """Import python-iptables the fast way: ~0.03 s instead of ~0.4 s here.

    Left alone, `import iptc` runs `ldconfig` (no XTABLES_LIBDIR), imports distutils (which
    drags in setuptools and pkg_resources: 0.23 s), and looks up each of its libraries with
    ctypes.util.find_library, which runs `ldconfig -p` and, for its own libxtwrapper that
    ldconfig does not know, gcc and ld. Pointing it at the files directly avoids all of that;
    anything not found this way falls back to python-iptables' own search.
    """
    libdir = os.environ.get("XTABLES_LIBDIR") or _xtables_libdir()
    if libdir:
        libdir = os.path.realpath(libdir)  # the image links one fixed path to the platform's directory
    if libdir and "XTABLES_LIBDIR" not in os.environ:
        os.environ["XTABLES_LIBDIR"] = libdir
    if "IPTABLES_LIBDIR" not in os.environ:
        dirs = [os.path.dirname(libdir)] if libdir else []
        spec = importlib.util.find_spec("iptc")
        if spec and spec.origin:  # libxtwrapper sits next to the iptc package
            dirs.append(os.path.dirname(os.path.dirname(spec.origin)))
        os.environ["IPTABLES_LIBDIR"] = ":".join(dirs)
        if libdir and "PYTHON_IPTABLES_XTABLES_VERSION" not in os.environ:
            # libxtables.so.12: with the soname's version it is found by path, not by ldconfig
            found = _versions(os.path.dirname(libdir), "libxtables.so.")
            if found:
                os.environ["PYTHON_IPTABLES_XTABLES_VERSION"] = found[0].rsplit("libxtables.so.", 1)[1]
    find_library = ctypes.util.find_library
    distutils = sys.modules.get("distutils", _MISSING)
    # python-iptables falls back to sysconfig when distutils is missing: make it look missing.
    sys.modules["distutils"] = None  # type: ignore[assignment]
    ctypes.util.find_library = _find_library_fast(find_library, libdir)  # type: ignore[assignment]
    try:
        import iptc  # noqa: PLC0415 - costly; only the kernel-facing commands need it
    except Exception as exc:  # ImportError, OSError (libiptc missing), XTablesError
        raise EnvironmentUnsupported(f"python-iptables cannot be loaded: {exc}") from None
    finally:
        ctypes.util.find_library = find_library
        if distutils is _MISSING:
            del sys.modules["distutils"]
        else:
            sys.modules["distutils"] = distutils  # type: ignore[assignment]
    _keep_udata_alive(iptc)
    return iptc


def _keep_udata_alive(iptc: Any) -> None:
    """python-iptables' Match/Target.reset (on creation, and again in final_check's re-parse) points
    an extension's scratch memory (udata: hashlimit's rate unit, NFLOG's) at a ctypes buffer it
    drops at once, so the parse writes into freed memory: about one apply in 200 had a worker die
    with SIGSEGV (exit 4; python-iptables #318). Keep each buffer as long as its match or target."""
    for cls in (iptc.Match, iptc.Target):
        if getattr(cls.reset, "keeps_udata", False):
            continue
        reset = cls.reset

        def reset_keeping_udata(self: Any, reset: Callable[[Any], None] = reset) -> None:
            reset(self)
            size = getattr(self._module, "udata_size", 0) if self._module else 0
            if size:
                self._eg_udata = (ctypes.c_ubyte * size)()  # `_`: python-iptables parses other names
                self._module.udata = ctypes.cast(ctypes.byref(self._eg_udata), ctypes.c_void_p)

        reset_keeping_udata.keeps_udata = True  # type: ignore[attr-defined]
        cls.reset = reset_keeping_udata


_MISSING = object()


def _find_library_fast(fallback: Callable[[str], str | None], libdir: str | None) -> Callable[[str], str | None]:
    """ctypes.util.find_library that first looks for lib<name>.so.* beside the xtables directory."""
    dirs = [os.path.dirname(libdir)] if libdir else []
    multiarch = sysconfig.get_config_var("MULTIARCH")  # x86_64-linux-gnu, aarch64-linux-gnu, ...
    dirs += [f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else []
    dirs += ["/usr/lib64", "/lib64", "/usr/lib", "/lib"]

    def find(name: str) -> str | None:
        for d in dirs:
            hits = _versions(d, f"lib{name}.so.")
            if hits:
                return hits[0]
        return fallback(name)

    return find


@functools.cache
def _listing(directory: str) -> tuple[str, ...]:
    try:
        return tuple(os.listdir(directory))
    except OSError:
        return ()


def _versions(directory: str, prefix: str) -> list[str]:
    """Paths of `prefix`* in `directory`, shortest first (what glob gave, but each directory of a few
    thousand libraries is listed once, not once per library: ~3 ms each)."""
    return sorted((os.path.join(directory, f) for f in _listing(directory) if f.startswith(prefix)), key=len)


def _in_children(*calls: tuple[Callable[..., T], Any]) -> list[T]:
    """Run each (fn, arg) in its own forked child, all at the same time; their results in order.

    libxtables keeps per-process state that breaks when one process uses both families
    (python-iptables #135, #316, #325: "can't find target REDIRECT"), so each family's work runs
    in its own short-lived process; the two run side by side. Every child is waited for before
    anything is raised (the first error, in call order), so nothing of ours is still writing when
    the caller goes on, e.g. to a fall-back lockdown. The children die with their parent.
    """
    started = [_fork(fn, arg) for fn, arg in calls]
    outcomes = [_collect(pid, r) for pid, r in started]
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _ok, value in outcomes]


def _fork(fn: Callable[..., Any], arg: Any) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except Exception:  # noqa: BLE001 - best effort
                pass
            try:
                payload = (True, fn(*arg))
            except EgressGuardError as exc:
                payload = (False, exc)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which maps it
                payload = (False, ApplyFailed(f"{type(exc).__name__}: {exc}"))
            with os.fdopen(w, "wb") as fh:
                pickle.dump(payload, fh)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> tuple[bool, Any]:
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return False, ApplyFailed(f"iptables worker died (status {status})")
    return pickle.loads(data)  # type: ignore[no-any-return]  # noqa: S301 - from our own child


class IptablesBackend(Backend):
    name = "iptables-legacy (python-iptables)"

    def __init__(self, *, leave_nftables: bool = False) -> None:
        self._iptc: Any = None
        self._sets_touched = False  # this process created sets: prune what the last commit left unused
        # False: a commit also removes the nftables back end's table (a downgrade); True when the
        # nftables back end itself uses this one to clear what an earlier iptables guard left.
        self._leave_nftables = leave_nftables

    @property
    def iptc(self) -> Any:
        if self._iptc is None:
            self._iptc = import_iptc()
        return self._iptc

    # -- preflight ---------------------------------------------------------------------------

    def preflight(self) -> None:
        caps = effective_caps()
        missing = [n for n, bit in (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW)) if not caps >> bit & 1]
        if missing:
            raise EnvironmentUnsupported(
                f"missing capability {' and '.join(missing)} (python-iptables needs both NET_ADMIN and NET_RAW)"
            )
        self.iptc  # noqa: B018 - import now, so a missing library is exit 3 before any change
        # Whether each family's filter table exists is found by read(), which every command calls
        # before its first change (one child process per family instead of two).

    # -- deny first: the routing fence (see fence.py) -----------------------------------------

    def hold_confined(self, policy: Policy) -> bool:
        try:
            added = fence.raise_fence(policy)
        except (OSError, ApplyFailed) as exc:
            # Without it the lockdown still comes first, but a SIGKILL between its two per-family
            # commits could leave the second family unguarded (the apply then exits non-zero).
            log.warning("fence_unavailable", error=str(exc))
            return False
        log.debug("fence_raised", rules=added, uids=fence.describe(fence.uid_ranges(policy)))
        return True

    def release_confined(self) -> int:
        return fence.lower_fence()

    # -- commit ------------------------------------------------------------------------------

    def commit(self, ruleset: Ruleset) -> None:
        from egressguard.backends.iptables.sets import Ipsets  # noqa: PLC0415

        ruleset = render.split_ports(ruleset)
        if ruleset.sets:
            self._sets_touched = True
            with Ipsets() as ipsets:
                for st in ruleset.sets:
                    ipsets.ensure(st)
                for st in ruleset.sets:  # cross-check: no rule may refer to a set that is not full yet
                    if ipsets.count(st.name) != len(st.members):
                        raise ApplyFailed(f"ipset {st.name}: not complete after filling; rules not committed")
        if ruleset.learned_sets:
            self._sets_touched = True
            with Ipsets() as ipsets:
                for ls in ruleset.learned_sets:
                    ensure_learned(ipsets, ls)
        referenced_sets = any(
            _in_children(*((self._commit_family, (f, [t for t in ruleset.tables if t.family == f])) for f in FAMILIES))
        )
        removing_everything = not any(t.chains for t in ruleset.tables)
        if ruleset.sets or referenced_sets or self._sets_touched or removing_everything:
            keep = [st.name for st in ruleset.sets] + [st.name for st in ruleset.learned_sets]
            with Ipsets() as ipsets:
                if ruleset.kind == "lockdown" and not removing_everything:  # learned addresses outlive a lockdown
                    keep += [n for n in ipsets.owned() if n.startswith(LEARNED_SET_PREFIX)]
                busy = ipsets.prune(keep=keep)
            if busy:
                raise ApplyFailed(f"ipset {busy[0]}: still referenced by a rule egressguard does not own")
        if not self._leave_nftables:
            _remove_nftables_table()

    def _commit_family(self, family: Family, tables: list[Table]) -> bool:
        """Commit this family's tables; True if the chains replaced matched on sets."""
        in_use = tables_in_use(family)
        self._limit_table_probing(family, in_use, {"filter"} | {t.name for t in tables if t.chains})
        referenced_sets = False
        for table in tables:
            if not table.chains and in_use is not None and table.name not in in_use:
                continue  # a table this namespace never created holds nothing of ours: leave it uncreated
            referenced_sets |= self._commit_table(table)
        return referenced_sets

    def _limit_table_probing(self, family: Family, in_use: set[str] | None, wanted: set[str]) -> None:
        """python-iptables looks the name of a jump's target chain up in every table, and opening a
        table creates it in the namespace: raw, mangle, security and nat appeared in every guarded
        namespace, and every packet then walks their hooks (nat's also sets up NAT for every new
        connection). Tell it which tables exist, so it opens only those and the ones we write.
        Runs in a family's worker process, so python-iptables' class state changes nowhere else."""
        if in_use is None:
            return  # unknown: let python-iptables probe
        cls = self.iptc.Table6 if family == 6 else self.iptc.Table
        cls.existing_table_names.update({t: t in in_use or t in wanted for t in cls.ALL})

    def _table(self, family: Family, name: str) -> Any:
        cls = self.iptc.Table6 if family == 6 else self.iptc.Table
        return cls(name, autocommit=False)

    def _commit_table(self, want: Table) -> bool:
        iptc = self.iptc
        # Encoded before taking the lock, which is then held only to stage and commit; jumps to our
        # own chains (python-iptables looks their names up in the staged table) only once they exist.
        ours = {DISPATCH, *OWNED_CHAINS[want.name], *(c.name for c in want.chains)}
        try:
            encoded = [[None if r.target in ours else self._encode(want.family, r) for r in c.rules] for c in want.chains]
        except Exception as exc:  # noqa: BLE001 - XTablesError (e.g. a missing extension), ValueError
            raise _commit_error(want, exc) from None
        last: Exception | None = None
        for attempt in range(COMMIT_ATTEMPTS):
            with xtables_lock():
                try:
                    tbl = self._table(want.family, want.name)
                    tbl.refresh()
                except Exception as exc:  # noqa: BLE001
                    if not want.chains:
                        return False  # a table this kernel lacks (e.g. nat) holds nothing of ours
                    raise EnvironmentUnsupported(f"{_tool(want.family)} {want.name} table unavailable: {exc}") from None
                try:
                    referenced_sets = self._stage(tbl, want, encoded)
                    tbl.commit()
                    return referenced_sets
                except iptc.IPTCError as exc:
                    last = exc
                    if "Invalid argument" in str(exc) and self._landed(want):
                        # libiptc replaces the table, then adds the old counters to it; a writer that
                        # commits in between makes the second call fail (EINVAL: the entry count
                        # changed) after the replace landed. What the kernel holds decides: our
                        # entries in force means the replace landed, and the read-back then judges
                        # whatever the writer added (exit 5, the lockdown).
                        log.info("commit_landed_counters_lost", table=f"ipv{want.family}/{want.name}")
                        return referenced_sets
                    if not ("temporarily unavailable" in str(exc) or "Resource" in str(exc)):
                        raise _commit_error(want, exc) from None
                except Exception as exc:  # noqa: BLE001 - XTablesError, ValueError from a bad rule
                    raise _commit_error(want, exc) from None
            log.info("commit_retried", table=f"ipv{want.family}/{want.name}", attempt=attempt + 1, error=str(last))
            time.sleep(0.005 * (attempt + 1))
        raise ApplyFailed(f"{_tool(want.family)} {want.name}: commit kept racing another writer: {last}")

    def _landed(self, want: Table) -> bool:
        """The kernel's table holds every entry of `want`'s chains and its OUTPUT jump, in order,
        perhaps with others between them (a lock-free writer's, added after the replace). A refused
        replace leaves the old table, which lacks them, unless the new policy only removes entries:
        then the read-back finds the old ones and that apply still ends in the lockdown (exit 5)."""
        try:
            chains = xtables_raw.read_chains(want.family, want.name)
        except (OSError, ValueError):
            return False
        encoded = self._encoded_entries(want.family, want)
        return all(_in_order(encoded[name], chains.get(name, ())) for name in encoded)

    def _stage(self, tbl: Any, want: Table, encoded: list[list[Any]]) -> bool:
        """Stage the whole replacement in libiptc's in-memory copy of the table (committed as one);
        `encoded` holds want's rules, chain by chain, as python-iptables rules (libiptc copies
        them), None for a jump to one of our chains (encoded here, once the chains exist).
        True if the chains being replaced matched on sets (which may then be unused)."""
        iptc = self.iptc
        output = iptc.Chain(tbl, "OUTPUT")
        for rule in list(output.rules):
            if _is_our_jump(rule):
                output.delete_rule(rule)
        owned = owned_chains(want.name, [c.name for c in tbl.chains])
        referenced_sets = False
        for name in owned:
            if tbl.is_chain(name):
                chain = iptc.Chain(tbl, name)
                referenced_sets = referenced_sets or any(_matches_set(r) for r in chain.rules)
                chain.flush()
        wanted = {c.name for c in want.chains}
        for name in owned:
            if name not in wanted and tbl.is_chain(name):
                tbl.delete_chain(name)
        for chain in want.chains:
            if not tbl.is_chain(chain.name):
                tbl.create_chain(chain.name)
        for chain, rules in zip(want.chains, encoded, strict=True):
            for rule, ready in zip(chain.rules, rules, strict=True):
                # not ch.append_rule(): its final_check() would undo _encode's byte fixes
                tbl.append_entry(chain.name, (ready if ready is not None else self._encode(want.family, rule)).rule)
        if want.jump:
            tbl.insert_entry("OUTPUT", self._encode(want.family, want.jump).rule, 0)
        return referenced_sets

    def _encode(self, family: Family, r: Rule) -> Any:
        # set_parameter() is what attribute assignment (m.uid_owner = ...) does, minus a dir() per call
        iptc = self.iptc
        x = iptc.Rule6() if family == 6 else iptc.Rule()
        if r.dst:
            x.dst = r.dst
        if r.out_iface or r.out_iface_not:
            x.out_interface = r.out_iface or f"!{r.out_iface_not}"
            if family == 6:
                _fix_ipv6_iface_mask(x)
        if r.protocol:
            x.protocol = "icmpv6" if r.protocol == "ipv6-icmp" else r.protocol
        if r.uid is not None:
            x.create_match("owner").set_parameter("uid-owner", str(r.uid))
        elif r.socketless:
            x.create_match("owner").set_parameter("uid-owner", "!" + ANY_USER)
        if render.uses_conntrack(r):  # before addrtype, as render.args()
            m = x.create_match("conntrack")
            if words := render.ctstate(r):
                m.set_parameter("ctstate", words)
            if r.ctorigdst:
                m.set_parameter("ctorigdst", r.ctorigdst)
            if r.ctorigdstport is not None:
                m.set_parameter("ctorigdstport", str(r.ctorigdstport))
            if r.ct_direction:
                m.set_parameter("ctdir", r.ct_direction.upper())
        if r.src_local is not None or r.dst_local is not None:
            m = x.create_match("addrtype")
            if r.src_local is not None:
                m.set_parameter("src-type", "LOCAL" if r.src_local else "!LOCAL")
            if r.dst_local is not None:
                m.set_parameter("dst-type", "LOCAL" if r.dst_local else "!LOCAL")
        if r.hoplimit is not None:
            x.create_match("hl").set_parameter("hl-eq", str(r.hoplimit))
        if r.icmp6_type:
            x.create_match("icmp6").set_parameter("icmpv6-type", r.icmp6_type)
        if r.routing_header:
            x.create_match("rt")
        if r.sport is not None:
            x.create_match(r.protocol or "tcp").set_parameter("sport", str(r.sport))
        if len(r.dports) == 1:
            x.create_match(r.protocol or "tcp").set_parameter("dport", str(r.dports[0]))
        elif r.dports:
            x.create_match("multiport").set_parameter("dports", ",".join(map(str, r.dports)))
        if r.match_set:
            x.create_match("set").set_parameter("match-set", [r.match_set, "dst"])
        for tests in u32.u32_matches(r.header):
            x.create_match("u32").set_parameter("u32", tests)
        if r.limit and r.limit_name:
            # The entry lifetime is always given: python-iptables leaves it 0 (EINVAL) where
            # iptables-restore fills in its default (bytes compared in tests/test_xtables_encoding.py).
            m = x.create_match("hashlimit")
            for key, value in (("hashlimit-upto", render.limit_text(r.limit)), ("hashlimit-burst", str(r.limit_burst or 5)),
                               ("hashlimit-name", r.limit_name),
                               ("hashlimit-htable-expire", str(shared_limit_expire_ms(r.limit, r.limit_burst)))):
                m.set_parameter(key, value)
        elif r.limit:
            m = x.create_match("limit")
            m.set_parameter("limit", render.limit_text(r.limit))
            if r.limit_burst is not None:
                m.set_parameter("limit-burst", str(r.limit_burst))
        if r.ctmark is not None:
            x.create_match("connmark").set_parameter("mark", f"{r.ctmark:#x}/{r.ctmark:#x}")
        x.create_match("comment").set_parameter("comment", r.comment)
        t = x.create_target(r.target, goto=r.goto)
        if r.target == "CONNMARK" and r.ctmark_set is not None:
            t.set_parameter("set-xmark", f"{r.ctmark_set:#x}/{r.ctmark_set:#x}")
        if r.reject_with:
            t.set_parameter("reject-with", render.reject_with(family, r.reject_with))
        if r.to_ports is not None:
            t.set_parameter("to-ports", str(r.to_ports))
        if r.nflog_group is not None:
            t.set_parameter("nflog-group", str(r.nflog_group))
        if r.nflog_prefix is not None:
            _write_nflog_prefix(t, r.nflog_prefix)
        # final_check() re-parses every match and target from its own save() text (python-iptables'
        # _update_parameters): run it here, once, and write the exact bytes after it; _stage then
        # hands x.rule to libiptc directly (append_rule would run final_check again and undo them).
        if r.target == "NFLOG":
            # libxt_NFLOG's save() crashes python-iptables (segfault, iptables 1.8.9): check the
            # matches as usual and the target as iptables-restore does, parsed once, not re-read.
            for m in x.matches:
                m.final_check()
            t._final_check()
        else:
            x.final_check()
        if family == 4 and render.uses_conntrack(r):
            _fix_ipv4_conntrack_addrs(next(m for m in x.matches if m.name == "conntrack"))
        return x

    # -- read back ---------------------------------------------------------------------------

    def read(self, expect: Sequence[AddressSet] = (), want: Ruleset | None = None) -> Installed:
        want = None if want is None else render.split_ports(want)
        tables: list[InstalledTable] = []
        calls = ((self._read_family, (f, None if want is None else [t for t in want.tables if t.family == f])) for f in FAMILIES)
        for found in _in_children(*calls):
            tables += found
        names = sorted({r.match_set for t in tables for c in t.chains for r in c.rules
                        if r.match_set and not r.match_set.startswith(LEARNED_SET_PREFIX)})
        sets: list[AddressSet] = []
        learned: list[LearnedHolding] = []
        learned_rules = any(r.match_set and r.match_set.startswith(LEARNED_SET_PREFIX)
                            for t in tables for c in t.chains for r in c.rules)
        if names or learned_rules or (want is not None and want.learned_sets):
            from egressguard.backends.iptables.sets import Ipsets  # noqa: PLC0415

            expected = {st.name: st for st in expect}
            with Ipsets() as ipsets:
                learned = [h for n in ipsets.owned() if n.startswith(LEARNED_SET_PREFIX)
                           for h in [read_learned(ipsets, n)] if h is not None]
                for name in names:
                    if name in expected and ipsets.holds(expected[name]):
                        sets.append(expected[name])
                        continue
                    listed = ipsets.members(name)
                    if listed is not None:
                        sets.append(AddressSet(name=name, family=listed[0], members=listed[1]))  # type: ignore[arg-type]
        return Installed(tables=tuple(tables), sets=tuple(sets), learned_sets=tuple(learned))

    def _read_family(self, family: Family, want: list[Table] | None = None) -> list[InstalledTable]:
        out = []
        in_use = tables_in_use(family)
        self._limit_table_probing(family, in_use, {"filter"})
        for name in TABLES:
            if name != "filter" and in_use is not None and name not in in_use:
                # Never created in this namespace, so nothing of ours is in it; reading would create it.
                out.append(InstalledTable(family, name, present=False, jump_positions=(), chains=()))
                continue
            try:
                tbl = self._table(family, name)
                tbl.refresh()
            except Exception as exc:  # noqa: BLE001
                if name == "filter":
                    raise EnvironmentUnsupported(
                        f"{_tool(family)} filter table unavailable ({exc}): the kernel lacks legacy x_tables "
                        f"(ip{'6' if family == 6 else ''}_tables); egressguard refuses to run without it"
                    ) from None
                out.append(InstalledTable(family, name, present=False, jump_positions=(), chains=()))
                continue
            output_rules = self.iptc.Chain(tbl, "OUTPUT").rules
            jumps = tuple(i for i, rule in enumerate(output_rules) if _is_our_jump(rule))
            chains, counters = [], {}
            for cname in owned_chains(name, [c.name for c in tbl.chains]):
                if tbl.is_chain(cname):
                    rules = self.iptc.Chain(tbl, cname).rules
                    chains.append(Chain(cname, tuple(_decode(rule) for rule in rules)))
                    counters[cname] = tuple(tuple(rule.get_counters()) for rule in rules)
            entries = encoded = None
            if want is not None:  # issue 9: compare the bytes, not python-iptables' reading of them
                entries = self._kernel_entries(family, name, jumps)
                encoded = self._encoded_entries(family, next((t for t in want if t.name == name), None))
            out.append(
                InstalledTable(
                    family,
                    name,
                    present=True,
                    jump_positions=jumps,
                    chains=tuple(chains),
                    counters=counters,
                    foreign_output_rules=len(output_rules) - len(jumps),
                    entries=entries,
                    encoded=encoded,
                )
            )
        return out

    def _kernel_entries(self, family: Family, name: str, jumps: tuple[int, ...]) -> dict[str, tuple[Entry, ...]]:
        """Our chains and jumps as the kernel holds them, read with IP(6)T_SO_GET_ENTRIES."""
        try:
            chains = xtables_raw.read_chains(family, name)
        except (OSError, ValueError) as exc:
            raise ApplyFailed(f"{_tool(family)} {name}: entries could not be read back from the kernel: {exc}") from None
        out = {c: tuple(chains[c]) for c in owned_chains(name, chains)}
        output = chains.get("OUTPUT", [])
        out["OUTPUT"] = tuple(output[i] for i in jumps if i < len(output))
        return out

    def _encoded_entries(self, family: Family, want: Table | None) -> dict[str, tuple[Entry | str, ...]]:
        """`want`'s chains and jump, entry by entry, normalised as xtables_raw decodes the kernel's."""
        if want is None or not want.chains:
            return {}
        ours = {DISPATCH, *OWNED_CHAINS[want.name], *(c.name for c in want.chains)}
        out: dict[str, tuple[Entry | str, ...]] = {
            c.name: tuple(self._encoded_entry(family, r, ours) for r in c.rules) for c in want.chains
        }
        out["OUTPUT"] = (self._encoded_entry(family, want.jump, ours),) if want.jump else ()
        return out

    def _encoded_entry(self, family: Family, r: Rule, ours: set[str]) -> Entry | str:
        # A jump's target is encoded as ACCEPT: python-iptables can encode a jump only to a chain the
        # table already has, and libiptc replaces a standard target (verdict or jump) by a verdict or
        # an offset at commit anyway; what the kernel holds is compared by name (xtables_raw names it).
        try:
            x = self._encode(family, dataclasses.replace(r, target="ACCEPT") if r.target in ours else r)
            entry, _ = xtables_raw.parse_entry(family, bytes(x.rule))
        except Exception as exc:  # noqa: BLE001 - e.g. a set the kernel lacks: reported by verify
            return f"{type(exc).__name__}: {exc}"
        if r.target in ours or r.target in _VERDICTS:
            entry = dataclasses.replace(entry, target=xtables_raw.Ext(r.target, 0, b""))
        return entry

    def canonical(self, ruleset: Ruleset) -> Ruleset:
        return render.split_ports(ruleset)  # a port list over 15 is several rules here

    def describe(self, family: Family, table: str, rule: Rule) -> str:
        return " ".join(render.args(rule, family))

    def other_firewalls(self) -> list[str]:
        found = []
        try:
            tables = _nft_tables()
        except Exception as exc:  # noqa: BLE001 - a note in `status`, never a reason to fail
            found.append(f"nftables: could not be read ({type(exc).__name__}: {exc})")
        else:
            if tables:
                found.append(f"nftables tables: {', '.join(tables)} (their rules apply as well: "
                             "a packet any of them drops is dropped, whatever egressguard allows)")
        return found


# ---------------------------------------------------------------------------------------------


_NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def _nft_tables() -> list[str]:
    """nftables tables in this network namespace, e.g. ["ip nat", "inet filter"] (over netlink)."""
    from pyroute2.nftables.main import NFTables  # noqa: PLC0415 - only `status` needs it

    nft = NFTables(nfgen_family=0)  # NFPROTO_UNSPEC: every family
    try:
        return [f"{_NFPROTO.get(t['nfgen_family'], t['nfgen_family'])} {t.get_attr('NFTA_TABLE_NAME')}"
                for t in nft.get_tables()]
    finally:
        nft.close()


@contextmanager
def xtables_lock(wait_s: float = XTABLES_LOCK_WAIT_S) -> Iterator[None]:
    """Hold the lock the iptables commands take (`-w`), from read to commit: Docker, kube-proxy and
    friends then wait for our commit instead of racing it (a race costs them an EAGAIN failure and
    us a retry). Best effort: without the lock file, or past `wait_s`, commits rely on EAGAIN retries."""
    try:
        fd = os.open(os.environ.get("XTABLES_LOCKFILE") or XTABLES_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break  # a stuck holder must not keep the guard out
                time.sleep(0.002)
        yield
    finally:
        os.close(fd)


def _remove_nftables_table() -> None:
    """A namespace the nftables back end guarded, now guarded by this one (a downgrade, or auto
    falling back): its table goes once ours are in force, so one guard, this one, says what holds.
    Nothing to do where libnftables or nf_tables is missing: then no such table can exist."""
    from egressguard.backends.nftables import transport  # noqa: PLC0415

    table = transport.TABLE
    family, name = table.split()
    try:
        if not any(t.family == family and t.name == name for t in transport.tables()):
            return  # the usual case, told by one netlink dump: neither libnftables nor the renderer loaded
    except transport.NftablesError:
        pass  # not listable this way: libnftables decides, below
    try:
        with transport.Nft() as nft:
            if nft.list_json(f"table {table}", terse=True):
                nft.run(f"delete table {table}")
                log.info("nftables_table_removed", table=table)
    except (transport.NftablesUnavailable, OSError):
        return
    except transport.NftablesError as exc:
        raise ApplyFailed(f"could not remove the nftables back end's table {table}: {exc}") from None


def tables_in_use(family: Family) -> set[str] | None:
    """The x_tables tables this network namespace has created so far (the kernel creates one on
    first use); None if the kernel does not say (no ip_tables / ip6_tables loaded yet)."""
    try:
        with open("/proc/net/ip6_tables_names" if family == 6 else "/proc/net/ip_tables_names") as fh:
            return set(fh.read().split())
    except OSError:
        return None


_IFNAMSIZ = 16
_EXT_HEADER = xtables_raw.EXT_HEADER
_VERDICTS = {"ACCEPT", "DROP", "RETURN", "QUEUE"}  # standard targets libiptc turns into a verdict


def _fix_ipv6_iface_mask(x: Any) -> None:
    """python-iptables' Rule6 writes interface masks of 0x01 bytes where ip6tables writes 0xff, and
    the kernel compares (name ^ iface) & mask: `-o lo` then matched net1, tun0, veth... (issue 9).
    Rewrite both masks as xtables_parse_interface does: 0xff over the name and its NUL (a trailing
    `+` wildcard: over the name only), zero after."""
    ip6 = x.entry.ipv6
    for mask_field in ("iniface_mask", "outiface_mask"):
        mask = bytes(getattr(ip6, mask_field))
        if not any(mask):
            continue  # no interface given: all-zero mask, as ip6tables leaves it
        width = sum(1 for b in mask if b)
        setattr(ip6, mask_field, b"\xff" * width + b"\0" * (_IFNAMSIZ - width))


def _fix_ipv4_conntrack_addrs(m: Any) -> None:
    """python-iptables writes an IPv4 --ctorigdst /32 mask as 16 bytes of 0xff (final_check()
    re-parses the saved text, which shows a /32 without its prefix, and libxtables takes a bare
    host's mask over all 128 bits); iptables-restore fills only the IPv4 word of each nf_inet_addr
    (xt_conntrack_mtinfo1..3 open with eight: orig/repl src/dst addr and mask) and leaves the other
    12 bytes zero. The kernel reads only that word for IPv4, so no verdict changes; the bytes now
    equal the reference tool's (tests/test_xtables_encoding.py found it), so read-back can insist."""
    buf = m.match_buf
    if buf[_EXT_HEADER - 1] < 1:  # revision 0 (xt_conntrack_info) has another layout; never chosen here
        return
    for i in range(8):
        ctypes.memset(ctypes.addressof(buf) + _EXT_HEADER + 16 * i + 4, 0, 12)


def _in_order(wanted: Sequence[object], held: Sequence[object]) -> bool:
    """Every item of `wanted` is in `held`, in the same order (others may stand between)."""
    rest = iter(held)
    return all(any(w == h for h in rest) for w in wanted)


def _tool(family: Family) -> str:
    return "ip6tables" if family == 6 else "iptables"


def _commit_error(want: Table, exc: Exception) -> EgressGuardError:
    msg = f"{_tool(want.family)} {want.name}: the kernel refused the commit: {exc}"
    if "No chain/target/match" in str(exc) or "can't find" in str(exc):
        return EnvironmentUnsupported(msg + " (a needed kernel module or xtables extension is missing)")
    return ApplyFailed(msg)


def _matches_set(rule: Any) -> bool:
    try:
        return any(m.name == "set" for m in rule.matches)
    except Exception:  # noqa: BLE001 - undecodable: assume it might, so sets get pruned
        return True


def _is_our_jump(rule: Any) -> bool:
    try:
        if rule.target.name != DISPATCH:
            return False
        return any(m.name == "comment" and m.comment == JUMP_COMMENT for m in rule.matches)
    except Exception:  # noqa: BLE001 - an undecodable foreign rule is not ours
        return False


def _net(value: str | None) -> str | None:
    if not value:
        return None
    addr, _, mask = value.partition("/")
    if mask and not mask.isdigit():
        mask = str(bin(int(ipaddress.ip_address(mask))).count("1"))
    net = ipaddress.ip_network(f"{addr}/{mask}" if mask else addr, strict=False)
    return None if net.prefixlen == 0 and int(net.network_address) == 0 else str(net)


# xt_nflog_info: u32 len, u16 group, u16 threshold, u16 flags, u16 pad, char prefix[64]
_NFLOG_INFO = struct.Struct("=IHHHH64s")
_NFLOG_PREFIX_AT, _NFLOG_PREFIX_SIZE = 12, 64


def _nflog_fields(target: Any) -> dict[str, Any]:
    """An NFLOG target's group and prefix, from its bytes: python-iptables reads a target through
    its save(), which crashes on NFLOG. Options egressguard never sets make the rule differ."""
    data = ctypes.string_at(target._target_buf, target.size)[_EXT_HEADER:]
    length, group, threshold, flags, _pad, prefix = _NFLOG_INFO.unpack_from(data)
    fields: dict[str, Any] = {"nflog_group": group, "nflog_prefix": xtables_raw._cstr(prefix) if prefix[0] else None}
    if length or threshold or flags:
        fields["reject_with"] = f"<unexpected NFLOG size {length} threshold {threshold} flags {flags}>"
    return fields


def _write_nflog_prefix(target: Any, prefix: str) -> None:
    """Put the prefix into xt_nflog_info as iptables-restore does (NUL-terminated, zero after):
    parsing `nflog-prefix` through python-iptables corrupts its memory (a later rule segfaults)."""
    raw = prefix.encode()
    if not raw or b"\n" in raw or len(raw) >= _NFLOG_PREFIX_SIZE:
        raise ValueError(f"NFLOG prefix {prefix!r}: 1 to {_NFLOG_PREFIX_SIZE - 1} bytes, no newline")
    at = ctypes.addressof(target._target_buf.contents if hasattr(target._target_buf, "contents") else target._target_buf)
    ctypes.memmove(at + _EXT_HEADER + _NFLOG_PREFIX_AT, raw, len(raw))


_HASHLIMIT_KEYS = {"hashlimit-upto", "hashlimit-burst", "hashlimit-name", "hashlimit-htable-expire"}


def _ct_states(words: str) -> dict[str, Any] | None:
    """A --ctstate as the Ruleset says it (ct_states or ct_dnat); None if no plan renders it so."""
    if words == "DNAT":
        return {"ct_dnat": True}
    states = words.split(",") if words else []
    if not set(states) <= set(render.CTSTATE_WORDS):
        return None
    return {"ct_states": tuple(w.lower() for w in render.CTSTATE_WORDS if w in states)}


def _header_tests(text: str) -> list[HeaderTest] | None:
    """A u32 match's tests, as the Ruleset says them; None if they are not ones a plan renders."""
    try:
        return u32.parse(text)
    except u32.UnsupportedU32:
        return None


def _decode(x: Any) -> Rule:
    """An installed rule back into a Rule; anything unexpected makes it differ from every plan."""
    fields: dict[str, Any] = {"target": x.target.name, "comment": "", "goto": x.target.goto}
    fields["dst"] = _net(x.dst)
    out = x.out_interface or ""
    fields["out_iface_not" if out.startswith("!") else "out_iface"] = out.lstrip("!") or None
    proto = x.protocol
    fields["protocol"] = {"icmpv6": "ipv6-icmp", "ip": None, "all": None, "0": None, None: None}.get(proto, proto)
    unknown: list[str] = []
    for m in x.matches:
        raw = m.get_all_parameters()  # each call runs the extension's save() and a shlex parse
        p = {k: [v for v in vals if v != "!"] for k, vals in raw.items()}
        neg = any("!" in vals for vals in raw.values())
        one = {k: v[0] if v else "" for k, v in p.items()}
        if m.name == "owner" and set(one) == {"uid-owner"} and (one["uid-owner"] == ANY_USER) == neg \
                and (neg or one["uid-owner"].isdigit()):
            fields["socketless" if neg else "uid"] = True if neg else int(one["uid-owner"])
        elif m.name == "addrtype" and one and set(one) <= {"src-type", "dst-type"} \
                and all(v == "LOCAL" for v in one.values()):
            for key, name in (("src-type", "src_local"), ("dst-type", "dst_local")):
                if key in raw:
                    fields[name] = "!" not in raw[key]
        elif m.name == "rt" and not raw:
            fields["routing_header"] = True
        elif m.name == "u32" and set(one) == {"u32"} and not neg and (tests := _header_tests(one["u32"])) is not None:
            fields["header"] = (*fields.get("header", ()), *tests)
        elif m.name == "limit" and not neg and "limit" in one and set(one) <= {"limit", "limit-burst"} \
                and (limit := render.parse_limit(one["limit"])) is not None:
            fields["limit"] = limit
            fields["limit_burst"] = int(one["limit-burst"]) if "limit-burst" in one else None
        elif m.name == "hashlimit" and not neg and set(one) == _HASHLIMIT_KEYS \
                and (limit := render.parse_limit(one["hashlimit-upto"])) is not None:
            fields.update(limit=limit, limit_burst=int(one["hashlimit-burst"]),
                          limit_name=one["hashlimit-name"])
            if int(one["hashlimit-htable-expire"]) != shared_limit_expire_ms(fields["limit"], fields["limit_burst"]):
                unknown.append(f"hashlimit-htable-expire {one['hashlimit-htable-expire']}")
        elif m.name == "conntrack" and not neg and set(one) <= {"ctstate", "ctdir", "ctorigdst", "ctorigdstport"} \
                and (states := _ct_states(one.get("ctstate", ""))) is not None \
                and one.get("ctdir", "ORIGINAL") in ("ORIGINAL", "REPLY"):
            fields.update(states)
            fields["ct_direction"] = one["ctdir"].lower() if "ctdir" in one else None
            fields["ctorigdst"] = _net(one.get("ctorigdst"))
            fields["ctorigdstport"] = int(one["ctorigdstport"]) if "ctorigdstport" in one else None
        elif m.name == "hl" and set(one) == {"hl-eq"} and not neg:
            fields["hoplimit"] = int(one["hl-eq"])
        elif m.name == "icmp6" and set(one) == {"icmpv6-type"} and not neg:
            fields["icmp6_type"] = one["icmpv6-type"]
        elif m.name in ("tcp", "udp") and set(one) == {"dport"} and not neg:
            fields["dports"] = (int(one["dport"]),)
        elif m.name in ("tcp", "udp") and set(one) == {"sport"} and not neg:
            fields["sport"] = int(one["sport"])
        elif m.name == "multiport" and set(one) == {"dports"} and not neg:
            fields["dports"] = tuple(int(v) for v in one["dports"].split(","))
        elif m.name == "set" and not neg and "match-set" in p:
            fields["match_set"] = p["match-set"][0]
        elif m.name == "connmark" and set(one) == {"mark"} and not neg and _bits(one["mark"]) is not None:
            fields["ctmark"] = _bits(one["mark"])
        elif m.name == "comment":
            fields["comment"] = one.get("comment", "")
        else:
            unknown.append(f"{'!' if neg else ''}{m.name}{p}")
    if x.target.name == "NFLOG":
        fields.update(_nflog_fields(x.target))
        tparams: dict[str, str] = {}
    else:
        tparams = {k: v[0] if v else "" for k, v in x.target.get_all_parameters().items()}
    if "reject-with" in tparams:
        answer = tparams.pop("reject-with")
        fields["reject_with"] = {"icmp-port-unreachable": "port-unreachable", "icmp6-port-unreachable": "port-unreachable"
                                 }.get(answer, answer)
    if x.target.name == "CONNMARK" and set(tparams) == {"set-xmark"} and _bits(tparams["set-xmark"]) is not None:
        fields["ctmark_set"] = _bits(tparams.pop("set-xmark"))
    if "to-ports" in tparams:
        fields["to_ports"] = int(tparams.pop("to-ports"))
    if tparams:
        unknown.append(f"target{tparams}")
    if unknown:
        fields["comment"] += " <unexpected: " + "; ".join(unknown) + ">"
    return Rule(**fields)


def _bits(value: str) -> int | None:
    """`0x40000000/0x40000000` (value and mask the same bits: a test or an OR of those bits) -> the
    bits; anything else None (the rule then differs from every plan)."""
    mark, _, mask = value.partition("/")
    try:
        return int(mark, 0) if mask and int(mark, 0) == int(mask, 0) else None
    except ValueError:
        return None


# dns.mode proxy: learned-address sets are ipset hash:net sets with timeouts (each member is added
# by the forwarder with its own).
LEARNED_SET_PREFIX = f"{SET_PREFIX}d"
# Learned sets start with room for this many members (4,096 buckets, 32 KiB): the kernel doubles a
# full hash table inside the add, which waits for an RCU grace period (8-15 ms on a busy machine),
# and the forwarder holds answers for that add (bench/RESULTS.md, run Q); from 64 buckets a set of
# 3,000 learned addresses went through four such stalls.
LEARNED_SET_SIZE = 8192


def ensure_learned(ipsets: Any, want: LearnedSet) -> None:
    """Create `want` as an ipset with timeouts unless it is there already (a re-apply keeps what the
    forwarder learned). One of the wrong type or family (tampering) is replaced, empty, by a swap."""
    held = read_learned(ipsets, want.name)
    if held is not None and held.type == _learned_type(want.family):
        return
    if held is None:
        ipsets.create(want.name, want.family, LEARNED_SET_SIZE, timeout=LEARNED_SET_TIMEOUT_S)
        return
    staging = want.name + SET_STAGING_SUFFIX
    if ipsets.count(staging) is not None:
        ipsets.destroy(staging)
    ipsets.create(staging, want.family, LEARNED_SET_SIZE, timeout=LEARNED_SET_TIMEOUT_S)
    ipsets.swap(staging, want.name)
    ipsets.destroy(staging)


def _learned_type(family: int) -> str:
    """What a sound learned set reads back as: the nftables set type, so `verify` compares one word."""
    return "ipv6_addr" if family == 6 else "ipv4_addr"


def read_learned(ipsets: Any, name: str) -> LearnedHolding | None:
    """A learned-address ipset as read back (None: no such set). Its type is ipv4_addr/ipv6_addr
    only for a hash:net with timeouts; ipset keeps no member's first timeout: `left` stands for it."""
    listed = ipsets.timed(name)
    if listed is None:
        return None
    family, typename, timeout, members = listed
    sound = typename == "hash:net" and timeout and family in (4, 6)
    kind = _learned_type(family) if sound else f"{typename} family {family}{'' if timeout else ' without timeout'}"
    return LearnedHolding(name=name, family=6 if family == 6 else 4, type=kind,
                          elements=tuple((addr, left, left) for addr, left in members))
