"""Read-back comparison: does the kernel hold exactly the Ruleset that was meant?"""

from __future__ import annotations

from collections.abc import Callable

from egressguard.backends import Installed, InstalledTable
from egressguard.ruleset import Family, Rule, Ruleset

# One rule as the back end's own tool shows it (Backend.describe): (family, table, rule) -> text.
Describe = Callable[[Family, str, Rule], str]


def differences(want: Ruleset, have: Installed, describe: Describe) -> list[str]:
    """Every way `have` differs from `want`, as short sentences (empty: identical); a differing
    rule is spelled by `describe`, the back end's own spelling."""
    out: list[str] = []
    got_sets = {s.name: s for s in have.sets}
    for st in want.sets:
        found = got_sets.get(st.name)
        if found is None:
            out.append(f"set {st.name}: missing")
        elif (found.family, found.members) != (st.family, st.members):
            lost = len(set(st.members) - set(found.members))
            extra = len(set(found.members) - set(st.members))
            out.append(f"set {st.name}: {len(found.members)} members, expected {len(st.members)} "
                       f"({lost} missing, {extra} unexpected)")
    held = {s.name: s for s in have.learned_sets}
    for ls in want.learned_sets:
        h = held.get(ls.name)
        want_type = "ipv6_addr" if ls.family == 6 else "ipv4_addr"
        if h is None:
            out.append(f"learned set {ls.name} ({ls.host}): missing")
        elif h.type != want_type:
            out.append(f"learned set {ls.name} ({ls.host}): type {h.type}, expected {want_type}")
    for t in want.tables:
        where = f"ipv{t.family} {t.name}"
        try:
            got = have.table(t.family, t.name)
        except KeyError:
            out.append(f"{where}: not read back")
            continue
        if not got.present:
            if t.chains:
                out.append(f"{where}: table missing")
            continue
        out += [f"{where}: {p}" for p in got.problems]
        expected_jumps = (0,) if t.chains else ()
        if got.jump_positions != expected_jumps:
            out.append(f"{where}: jump from OUTPUT at {list(got.jump_positions)}, expected {list(expected_jumps)}")
        want_chains = {c.name: c.rules for c in t.chains}
        got_chains = {c.name: c.rules for c in got.chains}
        for name in sorted(set(want_chains) | set(got_chains)):
            if name not in got_chains:
                out.append(f"{where}: chain {name} missing")
            elif name not in want_chains:
                out.append(f"{where}: unexpected chain {name}")
            elif want_chains[name] != got_chains[name]:
                w, g = want_chains[name], got_chains[name]
                first = next((i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b), min(len(w), len(g)))
                detail = f"rule {first}: "
                detail += f"expected {describe(t.family, t.name, w[first])}" if first < len(w) else "expected nothing"
                detail += f", found {describe(t.family, t.name, g[first])}" if first < len(g) else ", found nothing"
                out.append(f"{where}: chain {name} has {len(g)} rules, expected {len(w)}; {detail}")
        out += _entry_differences(where, got)
    return out


MAX_ENTRY_REPORTS = 3  # differing rules reported per chain: one bad encoding can touch thousands


def _entry_differences(where: str, got: InstalledTable) -> list[str]:
    """Field by field, the kernel's entries against the same rules as the back end encodes them:
    catches what the decoded comparison above cannot see, e.g. an interface mask (issue 9)."""
    if got.entries is None or got.encoded is None:
        return []
    out: list[str] = []
    for name, meant in got.encoded.items():
        kernel = got.entries.get(name, ())
        if len(kernel) != len(meant):
            continue  # a missing chain or rule: reported above, in words
        bad: dict[int, list[str]] = {}
        for i, (k, m) in enumerate(zip(kernel, meant, strict=True)):  # lengths checked above
            if isinstance(m, str):
                bad[i] = [f"cannot be encoded for comparison ({m})"]
            elif k != m:
                bad[i] = k.differences(m)
        for i in sorted(bad)[:MAX_ENTRY_REPORTS]:
            out += [f"{where}: chain {name} rule {i}: {d}" for d in bad[i]]
        if len(bad) > MAX_ENTRY_REPORTS:
            out.append(f"{where}: chain {name}: {len(bad) - MAX_ENTRY_REPORTS} more rules differ")
    return out
