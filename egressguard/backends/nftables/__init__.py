"""The nftables back end (`table inet egressguard` through libnftables): what only it needs.

backend.py    NftablesBackend: both families in one transaction, kept sets refilled, read back
render.py     Ruleset -> nft script (pure): what `plan` prints and `apply` commits
decode.py     the kernel's listing (libnftables JSON, set elements' netlink dumps) -> Rule values
transport.py  libnftables through ctypes, and the netlink calls written by hand (tables, generation
              id, set elements)
learned.py    dns.mode proxy's learned addresses, written into the entries' sets

Empty on purpose: the iptables back end checks for this back end's table on every apply with
transport.py's netlink alone, without this back end's own imports (~10 ms on a cold start)."""
