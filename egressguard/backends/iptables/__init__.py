"""The iptables back end (legacy x_tables through python-iptables): what only it needs.

backend.py     IptablesBackend: commit per table and family, read back (libiptc and raw entries)
xtables_raw.py the kernel's entries, read with IPT_SO_GET_ENTRIES and compared byte for byte
sets.py        ipsets over netlink (large lists, hosts; dns.mode proxy's learned sets)
fence.py       the routing fence: both families closed in one system call on a first apply

Empty on purpose: the nftables back end and the DNS forwarder import fence.py or sets.py alone,
without the back end's own imports (tens of milliseconds on a cold start)."""
