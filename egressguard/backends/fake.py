"""An in-memory back end behind the same interface: commit keeps the Ruleset, read returns it as
installed. For unit tests of apply's sequence without root or a kernel (tests/test_apply_sequence.py),
on top of the real tests, never instead; `select` never chooses it.

Every call is recorded in `calls` ("preflight", "read", "commit policy", "commit lockdown", "hold",
"release"); `fail(call, error)` makes the next such call raise `error`, and `tamper` changes what a
read-back reports (a rule someone else added, say)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from egressguard.backends import Backend, Installed, InstalledTable, LearnedHolding

if TYPE_CHECKING:
    from egressguard.policy import Policy
    from egressguard.ruleset import AddressSet, Ruleset


class FakeBackend(Backend):
    name = "fake (in memory)"

    def __init__(self, *, atomic_families: bool = True, holds: bool = False) -> None:
        """atomic_families: one commit changes both families (as nftables); holds: a back end with
        per-family commits whose deny-first hold can be made (as iptables' routing fence)."""
        self.atomic_families = atomic_families
        self.holds = holds
        self.installed: Ruleset | None = None  # the last committed ruleset (None: nothing ever committed)
        self.holding = False  # hold_confined's hold is in place
        self.calls: list[str] = []
        self.tamper: Callable[[Ruleset], Ruleset] | None = None  # applied to what read() reports
        self._failures: dict[str, list[BaseException]] = {}

    def fail(self, call: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls named `call` (as recorded in `calls`) raise `error` and change nothing."""
        self._failures.setdefault(call, []).extend([error] * times)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        pending = self._failures.get(name)
        if pending:
            raise pending.pop(0)

    def preflight(self) -> None:
        self._call("preflight")

    def hold_confined(self, policy: Policy) -> bool:
        if self.atomic_families or not self.holds:
            return False
        self._call("hold")
        self.holding = True
        return True

    def release_confined(self) -> int:
        self._call("release")
        held, self.holding = self.holding, False
        return int(held)

    def commit(self, ruleset: Ruleset) -> None:
        self._call(f"commit {ruleset.kind}")
        self.installed = ruleset

    def read(self, expect: Sequence[AddressSet] = (), want: Ruleset | None = None) -> Installed:
        from egressguard.ruleset import FAMILIES  # noqa: PLC0415

        self._call("read")
        rs = self.installed
        if rs is not None and self.tamper is not None:
            rs = self.tamper(rs)
        if rs is None:
            return Installed(tables=tuple(InstalledTable(f, n, True, (), ()) for f in FAMILIES for n in ("filter", "nat")))
        return Installed(
            tables=tuple(
                InstalledTable(t.family, t.name, True, (0,) if t.chains else (), t.chains,
                               counters={c.name: ((0, 0),) * len(c.rules) for c in t.chains})
                for t in rs.tables
            ),
            sets=rs.sets,
            learned_sets=tuple(LearnedHolding(s.name, s.family, f"ipv{s.family}_addr") for s in rs.learned_sets),
        )
