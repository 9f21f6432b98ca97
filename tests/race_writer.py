"""A foreign writer that races egressguard's commits: it takes no xtables lock (python-iptables,
like kube components built on libiptc), and keeps adding and removing one rule of its own chain
FOREIGN in both families, so the tables' entry count changes with every commit it lands.

    ip netns exec POD python race_writer.py MAX_SECONDS

Prints `ready` once both tables were read, then `done N` (commits landed) when its stdin closes or
MAX_SECONDS pass. A commit of egressguard's that was staged on a table this writer has changed since
fails in the kernel with EAGAIN (the entry count differs): egressguard must rebuild and retry.
"""

from __future__ import annotations

import select
import sys
import time

from egressguard.backends.iptables.backend import import_iptc


def main(max_seconds: float) -> None:
    iptc = import_iptc()
    deadline = time.monotonic() + max_seconds
    landed = 0
    tables = {4: iptc.Table("filter", autocommit=False), 6: iptc.Table6("filter", autocommit=False)}
    for table in tables.values():
        table.refresh()
        if not table.is_chain("FOREIGN"):
            table.create_chain("FOREIGN")
            table.commit()
    print("ready", flush=True)
    flip = 0
    while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
        flip += 1
        for fam, table in tables.items():
            try:
                table.refresh()
                chain = iptc.Chain(table, "FOREIGN")
                if chain.rules:
                    chain.flush()
                else:
                    rule = iptc.Rule6() if fam == 6 else iptc.Rule()
                    rule.create_target("RETURN")
                    chain.append_rule(rule)
                table.commit()
                landed += 1
            except iptc.IPTCError:
                pass  # raced egressguard's commit: the next round reads afresh
    print(f"done {landed}", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))
