"""A foreign nf_tables writer that takes no lock and races egressguard's commits:

    ip netns exec POD python nft_race_writer.py own|ours MAX_SECONDS

`own`: commits in a table of its own (`inet racer`), adding and flushing one rule, as kube-proxy or
Docker do in theirs. `ours`: adds and deletes chain `intruder` in egressguard's own table, so a
transaction rendered from a read that saw the chain names a chain that is gone by commit time.
Prints `ready` once its table exists, then `done LANDED REFUSED` when its stdin closes or
MAX_SECONDS pass. Each step is its own libnftables transaction.
"""

from __future__ import annotations

import select
import sys
import time

from egressguard.backends.nftables.transport import Nft, NftablesError

STEPS = {
    "own": ("add rule inet racer c counter accept", "flush chain inet racer c"),
    "ours": ("add chain inet egressguard intruder", "delete chain inet egressguard intruder"),
}


def main(mode: str, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds
    landed = refused = 0
    with Nft() as nft:
        if mode == "own":
            nft.run("add table inet racer\nadd chain inet racer c\n")
        print("ready", flush=True)
        step = 0
        while time.monotonic() < deadline and not select.select([sys.stdin], [], [], 0)[0]:
            try:
                nft.run(STEPS[mode][step % 2])
                landed += 1
            except NftablesError:
                refused += 1  # egressguard's commit removed the chain, or the table is not there yet
            step += 1
    print(f"done {landed} {refused}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
