"""Reading a Ruleset's refusals through its refusal chains (log.refused: a refusal in the confined
chain jumps to its line's chain, which logs, then refuses): for tests that check what is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from egressguard.ruleset import CONFINED, Rule, Ruleset, Table, refuse_index


def refusal_chains(table: Table) -> dict[str, tuple[Rule, ...]]:
    return {c.name: c.rules for c in table.chains if refuse_index(c.name) is not None}


def resolved(table: Table, rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """`rules` with each jump to a refusal chain replaced by the refusal that chain gives the jump's
    packets (its first verdict whose protocol the jump's protocol fits): the rule as it is with log off."""
    chains = refusal_chains(table)
    out = []
    for r in rules:
        if r.target not in chains:
            out.append(r)
            continue
        verdict = next(v for v in chains[r.target] if v.target != "NFLOG" and v.protocol in (None, r.protocol))
        out.append(dataclasses.replace(r, target=verdict.target, reject_with=verdict.reject_with))
    return tuple(out)


def folded(rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """Log-off rules as log on keeps them: of each refusal pair (a TCP reset, then the same match
    for any protocol), the second only; both halves would jump to the same refusal chain."""
    out: list[Rule] = []
    for r in rules:
        if (r.target == "REJECT" and r.protocol is None and out
                and out[-1] == dataclasses.replace(r, protocol="tcp", reject_with="tcp-reset")):
            out.pop()
        out.append(r)
    return tuple(out)


def unfolded(table: Table, rules: Sequence[Rule]) -> tuple[Rule, ...]:
    """Log-on rules as log off holds them: each refusal as its verdict, a jump for any protocol to
    a chain that resets TCP and answers the rest otherwise as the pair it stands for."""
    chains = refusal_chains(table)
    out: list[Rule] = []
    for r in rules:
        verdicts = [v for v in chains.get(r.target, ()) if v.target != "NFLOG"]
        if r.protocol is None and len(verdicts) == 2 and verdicts[0].protocol == "tcp":
            out.append(dataclasses.replace(r, protocol="tcp", target=verdicts[0].target,
                                           reject_with=verdicts[0].reject_with))
        out += resolved(table, [r])
    return tuple(out)


def confined(rs: Ruleset, family: int) -> tuple[Rule, ...]:
    """The confined chain's rules as log off holds them: each refusal as the refusal (or pair)
    it leads to."""
    t = rs.table(family, "filter")  # type: ignore[arg-type]
    return unfolded(t, next(c.rules for c in t.chains if c.name == CONFINED))
