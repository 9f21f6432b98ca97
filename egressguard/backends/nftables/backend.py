"""NftablesBackend: `table inet egressguard`, both families in one libnftables transaction."""

from __future__ import annotations

from collections.abc import Sequence

from egressguard import logs
from egressguard.backends import Backend, Installed
from egressguard.backends.nftables import decode, render
from egressguard.backends.nftables.transport import (
    Nft,
    NftablesBusy,
    NftablesError,
    NftablesUnavailable,
    SetRefill,
    generation,
    set_elements,
    tables,
)
from egressguard.privileges import CAP_NET_ADMIN, holds
from egressguard.ruleset import AddressSet, Family, Rule, Ruleset

log = logs.get_logger("egressguard")

# A transaction that raced another writer's commit (into our table) is read, rendered and sent again.
COMMIT_ATTEMPTS = 10
# The table the preflight's check transaction names (never created): not ours, see preflight.
PREFLIGHT_TABLE = "inet egressguard_preflight"
_LEGACY_NAMES = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


def legacy_tables_in_use() -> list[str]:
    """x_tables tables this namespace has created (where an iptables-backend apply left objects)."""
    found = []
    for path in _LEGACY_NAMES:
        try:
            with open(path) as fh:
                found += [f"{'ip6' if '6' in path else 'ip'}tables {n}" for n in fh.read().split()]
        except OSError:
            continue
    return found


class NftablesBackend(Backend):
    name = "nftables (libnftables)"
    atomic_families = True
    sets_by_original_destination = True  # `ct original ip daddr @set`

    def __init__(self) -> None:
        self._checked = False

    def preflight(self) -> None:
        """Exit 3 unless the kernel accepts an nf_tables transaction in this namespace. The check is
        a real one: `add table` sent in check mode (nft -c), which the kernel validates, with the
        caller's capabilities over this namespace, and then aborts. Changes nothing. It names a table
        that is not ours: another program holding `inet egressguard` with `flags owner` makes the
        kernel refuse that one name (EPERM), not nf_tables; the commit says so (exit 4)."""
        if self._checked:
            return
        if not holds(CAP_NET_ADMIN):
            raise NftablesUnavailable("missing capability CAP_NET_ADMIN (nftables needs it)")
        try:
            with Nft() as nft:
                nft.run(f"add table {PREFLIGHT_TABLE}", dry_run=True)
        except NftablesError as exc:
            raise NftablesUnavailable(f"the kernel refused an nf_tables transaction in this namespace: {exc}") from None
        self._checked = True

    def commit(self, ruleset: Ruleset) -> None:
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            with Nft() as nft:
                raced = self._attempt(nft, ruleset, keep_same_sets=attempt == 1)
            if raced is None:
                break
            if attempt == COMMIT_ATTEMPTS:
                raise NftablesError(f"nftables: the transaction kept racing other writers ({attempt} attempts): {raced}")
            log.info("commit_retried", backend="nftables", attempt=attempt, error=str(raced))
        if legacy_tables_in_use():
            self._remove_iptables_objects(removing_everything=not any(t.chains for t in ruleset.tables))

    @staticmethod
    def _attempt(nft: Nft, ruleset: Ruleset, keep_same_sets: bool = False) -> NftablesError | None:
        """Read our table, render against it, commit. libnftables 1.0.6 sends no generation id with
        its batch (strace: NFNL_MSG_BATCH_BEGIN without NFNL_BATCH_GENID), so the kernel never
        answers ERESTART: a writer that commits between our read and our commit shows up as a
        transaction the kernel (or libnftables' own cache check) refuses, say a chain that was read
        and is gone. Returned (retry: read again, render again) when the generation id moved by
        more than our own commits; a refusal with no other commit in between is raised.
        Transactions: new sets, created and filled; kept sets that no longer hold exactly their
        members (tampered with: a set is named after its members), flushed and refilled over
        netlink (transport.SetRefill); then the rules. `keep_same_sets`: a kept set whose netlink
        dump holds exactly its members is not refilled. If anyone else committed meanwhile, that
        is a race: the next attempt refills every kept set."""
        start = generation()
        before = decode.existing(nft.list_json(f"table {render.TABLE}", terse=True))
        table = render.TABLE.split()[1]
        kept = [st for st in ruleset.sets if st.name in before.sets]
        same = [st.name for st in kept if keep_same_sets and decode.holds_exactly(st, set_elements(table, st.name))]
        refill = [(st.name, render.encoded_elements(st)) for st in kept if st.name not in same]
        new_sets = render.new_sets_script(ruleset, before)
        rules = render.rules_script(ruleset, before)  # rendered before any change: an unsupported rule changes nothing
        ours = 0
        try:
            if new_sets:
                nft.run(new_sets)
                ours += 1
            if refill:
                with SetRefill(table) as writer:
                    writer.refill(refill)
                ours += 1
                log.info("sets_refilled", backend="nftables", sets=[name for name, _ in refill])
                refill.clear()  # their encoded elements (~1 MiB for 10,000 intervals), freed before the rules' commit
            if rules:
                nft.run(rules)
                ours += 1
        except NftablesBusy:
            raise  # abandoned after its deadline: another attempt would wait as long again
        except NftablesError as exc:
            if (generation() - start) % 2**32 == ours:  # nobody else committed: this transaction is refused
                raise NftablesError(f"nftables: the kernel refused the transaction: {exc}") from None
            return exc
        if same and (generation() - start) % 2**32 != ours:  # someone else committed too
            return NftablesError(f"another commit between our read of set(s) {', '.join(same)} "
                                 "and our transaction: refilled in the next")
        return None

    def _remove_iptables_objects(self, removing_everything: bool) -> None:
        """An upgrade from the iptables back end: its chains, jumps and ipsets go once ours are in
        force (on reset: they go as well). Legacy tables in use here are not necessarily ours
        (Docker's DNS rules, say): what cannot even be read is a warning; ours that cannot be
        removed fail a reset, and only warn after an apply (they restrict, never allow)."""
        from egressguard.apply import build_empty  # noqa: PLC0415
        from egressguard.backends.iptables.backend import IptablesBackend  # noqa: PLC0415

        legacy = IptablesBackend(leave_nftables=True)
        try:
            found = legacy.read()
        except Exception as exc:  # noqa: BLE001 - python-iptables missing, no CAP_NET_RAW...
            log.warning("iptables_objects_not_checked", error=str(exc))
            return
        if not any(t.chains or t.jump_positions for t in found.tables) and not found.sets:
            return
        try:
            legacy.commit(build_empty())
        except Exception as exc:  # noqa: BLE001
            if removing_everything:
                raise
            log.warning("iptables_objects_not_removed", error=str(exc))
        else:
            log.info("iptables_objects_removed")

    def release_confined(self) -> int:
        """This back end holds nothing (one transaction closes both families), but a routing fence
        an iptables-backend apply left behind (killed, or before an upgrade) is removed."""
        from egressguard.backends.iptables import fence  # noqa: PLC0415

        return fence.lower_fence()

    def read(self, expect: Sequence[AddressSet] = (), want: Ruleset | None = None) -> Installed:
        # Sets are compared as the kernel keeps them (collapsed intervals): against want's, if given.
        expect = expect or (want.sets if want is not None else ())
        with Nft() as nft:
            objs, dumped = nft.list_table(render.TABLE)
        return decode.installed(objs, expect, dumped)

    def describe(self, family: Family, table: str, rule: Rule) -> str:
        try:
            kernel = "<its own chain>" if rule.socketless else None
            return render.rule_text(family, table, rule, kernel)
        except Exception:  # noqa: BLE001 - a rule we cannot render (tampered): show it as decoded
            from egressguard.backends.iptables.render import args  # noqa: PLC0415

            return " ".join(args(rule, family))

    def canonical(self, ruleset: Ruleset) -> Ruleset:
        return render.canonical(ruleset)

    def other_firewalls(self) -> list[str]:
        found = []
        try:
            present = [f"{t.family} {t.name}" for t in tables()]
        except Exception as exc:  # noqa: BLE001 - a note in `status`, never a reason to fail
            found.append(f"nftables: could not be read ({type(exc).__name__}: {exc})")
        else:
            others = [t for t in present if t != render.TABLE]
            if others:
                found.append(f"nftables tables: {', '.join(others)} (their rules apply as well: "
                             "a packet any of them drops is dropped, whatever egressguard allows)")
        legacy = legacy_tables_in_use()
        if legacy:
            found.append(f"legacy x_tables: {', '.join(legacy)} (their rules apply as well)")
        return found
