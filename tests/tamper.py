"""A foreign writer that does not take the xtables lock: it keeps slipping one rule into
egressguard's IPv4 confined chain while that chain holds a policy, until its stdin closes.

    ip netns exec POD python tamper.py MAX_SECONDS

Run in the pod's network namespace. Prints `ready` once it has read the table, then one
`tampered` line per commit that landed, and `done N` at the end. libiptc (python-iptables)
takes no lock, unlike `iptables-legacy`, which 1.8.9 makes wait for /run/xtables.lock even
without `-w`: so this writer can land between egressguard's commit and its read-back, which
runs without the lock. A commit that races another writer fails with EAGAIN and is retried on
the next round. It never touches a chain that holds no `allow[` rule (the lockdown), so once
apply has fallen back to the lockdown the table stays as egressguard left it.
"""

from __future__ import annotations

import select
import sys
import time

from egressguard.backends.iptables.backend import import_iptc

MARK = "tampered"


def main(max_seconds: float) -> None:
    iptc = import_iptc()
    deadline = time.monotonic() + max_seconds
    landed = 0
    first = True
    while time.monotonic() < deadline:
        if select.select([sys.stdin], [], [], 0)[0]:
            break  # stdin closed (or written to): the test is done
        try:
            table = iptc.Table("filter", autocommit=False)
            table.refresh()
            if first:
                print("ready", flush=True)
                first = False
            if table.is_chain("EGRESSGUARD-CONFINED"):
                chain = iptc.Chain(table, "EGRESSGUARD-CONFINED")
                comments = [m.comment for r in chain.rules for m in r.matches if m.name == "comment"]
                if MARK not in comments and any(c.startswith("allow[") for c in comments):
                    rule = iptc.Rule()
                    rule.dst = "192.0.2.99"
                    rule.protocol = "tcp"
                    rule.create_match("comment").comment = MARK
                    rule.create_target("RETURN")
                    chain.insert_rule(rule, 0)
                    table.commit()
                    landed += 1
                    print(MARK, flush=True)
        except iptc.IPTCError:
            pass  # raced egressguard's commit (EAGAIN): try again
        time.sleep(0.001)  # pacing only, so two cores are not spent polling
    print(f"done {landed}", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))
