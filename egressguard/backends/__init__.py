"""The back-end interface: commit a Ruleset atomically per table, read back what is installed, reset."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI reads BACKEND_CHOICES for every command, probe included
    from egressguard.backends.iptables.xtables_raw import Entry  # the iptables back end's (not on the nftables path)
    from egressguard.policy import Policy
    from egressguard.ruleset import AddressSet, Chain, Family, Rule, Ruleset


@dataclass(frozen=True)
class InstalledTable:
    """What the kernel holds in one (family, table), as far as egressguard is concerned."""

    family: Family
    name: str
    present: bool  # the table exists in this kernel / namespace
    jump_positions: tuple[int, ...]  # 0-based positions of our jump rules in OUTPUT
    chains: tuple[Chain, ...]  # owned chains, as decoded from the kernel
    counters: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # chain -> (packets, bytes)
    foreign_output_rules: int = 0  # rules in OUTPUT that are not ours
    problems: tuple[str, ...] = ()  # other ways the back end's objects differ from its own plan
    # Byte-level read-back (only when read() was given the ruleset meant): chain -> the kernel's
    # entries ("OUTPUT": our jumps only), and the same chains as this back end encodes the ruleset
    # meant (a str where a rule could not be encoded: why).
    entries: dict[str, tuple[Entry, ...]] | None = None
    encoded: dict[str, tuple[Entry | str, ...]] | None = None


@dataclass(frozen=True)
class LearnedHolding:
    """A learned-address set (dns.mode proxy) as read back: its type and what it holds now."""

    name: str
    family: Family
    type: str  # ipv4_addr / ipv6_addr (anything else: tampered)
    elements: tuple[tuple[str, int, int], ...] = ()  # (address, timeout s, seconds left)


@dataclass(frozen=True)
class Installed:
    tables: tuple[InstalledTable, ...]
    sets: tuple[AddressSet, ...] = ()  # the kernel sets the installed rules match on, as read back
    learned_sets: tuple[LearnedHolding, ...] = ()  # dns.mode proxy: sets with per-element timeouts

    def table(self, family: Family, name: str) -> InstalledTable:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError((family, name))


class Backend(abc.ABC):
    """A firewall back end. Each method acts on the current network namespace."""

    name: str
    # True if one commit changes both families at once (nftables): apply then needs no routing
    # fence, and a first apply with nothing to resolve needs no lockdown commit before the policy.
    atomic_families: bool = False
    # True if a rule can look a kernel set up by the connection's original destination (nftables);
    # see ruleset.build's `orig_sets`.
    sets_by_original_destination: bool = False

    @abc.abstractmethod
    def preflight(self) -> None:
        """Raise EnvironmentUnsupported if this back end cannot work here. Changes nothing."""

    @abc.abstractmethod
    def commit(self, ruleset: Ruleset) -> None:
        """Replace everything egressguard owns with `ruleset`, one atomic commit per table (a ruleset
        with no chains removes everything egressguard owns: that is `reset`).
        Its sets exist and are full before a rule can refer to them; sets no rule needs any
        more are removed afterwards. Raise ApplyFailed (or EnvironmentUnsupported) if the
        kernel refuses."""

    @abc.abstractmethod
    def read(self, expect: Sequence[AddressSet] = (), want: Ruleset | None = None) -> Installed:
        """Read back what egressguard owns (and the position of its jumps). A set found to hold
        exactly one of `expect` is reported as that very object (compared, not copied). Given
        `want`, each table also carries its entries byte for byte and `want` as encoded for them."""

    def guarded(self, installed: Installed) -> bool:
        """`installed` (as read()) holds our filter chains and jump in both families: a previous
        apply completed, so the next one needs no deny-first step."""
        from egressguard.ruleset import CONFINED, DISPATCH, FAMILIES  # noqa: PLC0415

        for family in FAMILIES:
            t = installed.table(family, "filter")
            if not t.present or t.jump_positions != (0,) or [c.name for c in t.chains[:2]] != [DISPATCH, CONFINED]:
                return False
        return True

    def hold_confined(self, policy: Policy) -> bool:
        """Deny first, on a first apply of a back end whose commits are per family: close the confined
        uids' egress in both families at once, before any commit, so that no kill between two commits
        leaves a family open. True if the hold is in place (lift it with release_confined once both
        families hold a ruleset); False if it could not be made (said in a log line). A back end
        whose one commit changes both families (atomic_families) needs none."""
        return False

    def release_confined(self) -> int:
        """Lift the hold of hold_confined, also one a killed apply left behind or one the other back
        end made (an upgrade). The number of kernel objects removed (0: there was none)."""
        return 0

    def canonical(self, ruleset: Ruleset) -> Ruleset:
        """`ruleset` spelled as this back end reads it back (what read-backs are compared with)."""
        return ruleset

    def describe(self, family: Family, table: str, rule: Rule) -> str:
        """One installed rule as this back end's own tool would show it (for `status`)."""
        return repr(rule)

    def other_firewalls(self) -> list[str]:
        """Other packet filters seen in this namespace (e.g. nftables tables), for `status`."""
        return []


# The back end used when neither --backend nor $EGRESSGUARD_BACKEND names one: nftables where the
# kernel accepts it (legacy x_tables is off by default since Linux 6.17), else iptables, else exit 3.
DEFAULT_BACKEND = "auto"
# Every user uid: an owner match over the whole range, negated (iptables) or as the chain a
# socketless rule returns owned packets from (nftables), leaves only packets with no socket owner.
ANY_USER = "0-4294967294"
BACKEND_CHOICES = ("auto", "nftables", "iptables")


def sets_by_original_destination(name: str) -> bool:
    """Whether back end `name` (`auto`: as where the kernel accepts nf_tables) matches kernel sets
    by a connection's original destination, which makes its Ruleset (and digest) differ."""
    return name != "iptables"


def plan_text(name: str, ruleset: Ruleset, header: Sequence[str]) -> str:
    """`plan`: the ruleset as back end `name` commits it (`auto`: the nftables script)."""
    if name == "iptables":
        from egressguard.backends.iptables.render import render  # noqa: PLC0415

        return render(ruleset, header=header)
    from egressguard.backends.nftables import render as nft  # noqa: PLC0415

    auto = " (auto: where the kernel accepts nf_tables, else the iptables plan)" if name == "auto" else ""
    return nft.render(ruleset, header=[*header, f"nftables back end{auto}"])


def plan_json(name: str, ruleset: Ruleset) -> dict[str, object]:
    """`plan --json`: the back end, the ruleset's digest and sets, and its rules in that back end's form
    (iptables: arguments per rule; nftables: the script, which iptables arguments cannot say)."""
    if name == "iptables":
        from egressguard.backends.iptables.render import to_json  # noqa: PLC0415

        return {"backend": "iptables", **to_json(ruleset)}
    from egressguard.backends.nftables import render as nft  # noqa: PLC0415

    return {"backend": "nftables", **ruleset.summary(), "script": nft.render(ruleset)}


def select(requested: str | None = None) -> Backend:
    """The back end for `requested` (or $EGRESSGUARD_BACKEND, or DEFAULT_BACKEND), said in one log
    line. `auto`: nftables if the kernel accepts an nf_tables transaction here, else iptables if
    legacy x_tables works here, else exit 3 naming both reasons."""
    import os  # noqa: PLC0415

    from egressguard import logs  # noqa: PLC0415
    from egressguard.errors import EnvironmentUnsupported, PolicyError  # noqa: PLC0415

    log = logs.get_logger("egressguard")
    source = "option" if requested else "environment" if os.environ.get("EGRESSGUARD_BACKEND") else "default"
    name = requested or os.environ.get("EGRESSGUARD_BACKEND") or DEFAULT_BACKEND
    if name not in BACKEND_CHOICES:
        raise PolicyError(f"unknown back end {name!r} ({source}); choose one of {', '.join(BACKEND_CHOICES)}")
    if name == "nftables":
        from egressguard.backends.nftables.backend import NftablesBackend  # noqa: PLC0415

        chosen: Backend = NftablesBackend()
        log.info("backend_selected", backend=chosen.name, requested=name, via=source)
        return chosen
    from egressguard.backends.iptables.backend import IptablesBackend  # noqa: PLC0415

    if name == "iptables":
        chosen = IptablesBackend()
        log.info("backend_selected", backend=chosen.name, requested=name, via=source)
        return chosen
    from egressguard.backends.nftables.backend import NftablesBackend  # noqa: PLC0415

    nft = NftablesBackend()
    try:
        nft.preflight()
    except EnvironmentUnsupported as no_nft:
        ipt = IptablesBackend()
        try:
            ipt.preflight()
            ipt.read()  # exit 3 here if legacy x_tables is missing (changes nothing)
        except EnvironmentUnsupported as no_ipt:
            raise EnvironmentUnsupported(f"no back end works here: nftables: {no_nft}; iptables: {no_ipt}") from None
        log.info("backend_selected", backend=ipt.name, requested=name, via=source,
                 reason=f"nftables unavailable: {no_nft}")
        return ipt
    log.info("backend_selected", backend=nft.name, requested=name, via=source,
             reason="the kernel accepted an nf_tables check transaction in this namespace")
    return nft
