"""The back-end interface: commit a Ruleset atomically per table, read back what is installed, reset."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

from egressguard.backends.xtables_raw import Entry
from egressguard.ruleset import AddressSet, Chain, Family, Ruleset


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
    # Byte-level read-back (only when read() was given the ruleset meant): chain -> the kernel's
    # entries ("OUTPUT": our jumps only), and the same chains as this back end encodes the ruleset
    # meant (a str where a rule could not be encoded: why).
    entries: dict[str, tuple[Entry, ...]] | None = None
    encoded: dict[str, tuple[Entry | str, ...]] | None = None


@dataclass(frozen=True)
class Installed:
    tables: tuple[InstalledTable, ...]
    sets: tuple[AddressSet, ...] = ()  # the kernel sets the installed rules match on, as read back

    def table(self, family: Family, name: str) -> InstalledTable:
        for t in self.tables:
            if t.family == family and t.name == name:
                return t
        raise KeyError((family, name))


class Backend(abc.ABC):
    """A firewall back end. Each method acts on the current network namespace."""

    name: str

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

    def other_firewalls(self) -> list[str]:
        """Other packet filters seen in this namespace (e.g. nftables tables), for `status`."""
        return []
