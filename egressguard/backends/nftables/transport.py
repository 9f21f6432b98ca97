"""libnftables through ctypes: one nft script in, one atomic transaction out; listings as JSON."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Self

from egressguard.errors import ApplyFailed, EnvironmentUnsupported

LIBRARY = "libnftables.so.1"
TABLE = "inet egressguard"  # the one table the nftables back end owns
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_OUTPUT_TERSE = 1 << 11  # NFT_CTX_OUTPUT_TERSE: sets without their elements
_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES, _NFT_MSG_GETGEN, _NFTA_GEN_ID, _NLMSG_ERROR, _NLM_F_REQUEST = 10, 16, 1, 2, 1
_NFT_MSG_GETSETELEM, _NLMSG_DONE, _NLM_F_DUMP, _NLM_F_DUMP_INTR = 13, 3, 0x300, 0x10
_NFT_MSG_GETTABLE, _NFTA_TABLE_NAME, _NFTA_TABLE_FLAGS = 1, 1, 2
_FAMILY_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}  # NFPROTO_*
_NFTA_SET_ELEM_LIST_TABLE, _NFTA_SET_ELEM_LIST_SET, _NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3

_NFNL_MSG_BATCH_BEGIN, _NFNL_MSG_BATCH_END, _NFT_MSG_NEWSETELEM, _NFT_MSG_DELSETELEM = 0x10, 0x11, 12, 14
_NLM_F_ACK, _NLM_F_CREATE, _NFPROTO_INET, _NLA_F_NESTED = 0x4, 0x400, 1, 0x8000
_NFTA_LIST_ELEM, _NFTA_SET_ELEM_KEY, _NFTA_SET_ELEM_TIMEOUT, _NFTA_DATA_VALUE = 1, 1, 4, 1
_NFTA_SET_ELEM_EXPIRATION, _NFTA_SET_ELEM_FLAGS, _NFTA_SET_ELEM_USERDATA = 5, 3, 6
_INTERVAL_END = struct.pack(">I", 1)  # NFT_SET_ELEM_INTERVAL_END
_OPEN = bytes([1, 4, 1, 0, 0, 0])  # nft's element note NFTNL_UDATA_SET_ELEM_FLAGS: NFTNL_SET_ELEM_F_INTERVAL_OPEN
_SO_SNDBUFFORCE, _SNDBUF = 32, 200_000  # a batch larger than the default send buffer (208 KiB) raises it (CAP_NET_ADMIN)
_PER_MESSAGE = 1024  # elements per NEWSETELEM message: at most 40 bytes each (IPv6), far below 64 KiB
_CHUNK = 512  # elements per transaction: ~120 bytes each (three messages), far below the 208 KiB send buffer

# A read-back whose reads a commit changed in between (the generation id moved) is read again.
READ_ATTEMPTS = 5
# libnftables 1.0.6 reads the ruleset again, without a bound, whenever the generation id moved
# while it read (its cache), so another program committing without pause in this namespace keeps
# a listing or a commit reading forever: measured, an apply beside tests/nft_race_writer.py hung
# in `list ruleset` until killed. A call still running after this long is abandoned (exit 4);
# the largest measured call (10,000 elements) takes ~0.1 s.
CALL_DEADLINE_S = 10.0

_lib: Any = None
_trim: Any = None


class NftablesError(ApplyFailed):
    """libnftables or the kernel refused a transaction (exit 4)."""


class NftablesBusy(NftablesError):
    """A libnftables call that did not return within CALL_DEADLINE_S (exit 4)."""


class NftablesUnavailable(EnvironmentUnsupported):
    """No libnftables, or a kernel / namespace that refuses nf_tables (exit 3)."""


def load() -> Any:
    """The library, loaded once; a missing one is exit 3. (ctypes is imported here: the netlink
    calls below need none of it, and the iptables back end uses them alone.)"""
    global _lib
    if _lib is None:
        import ctypes  # noqa: PLC0415

        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
        except OSError as exc:
            raise NftablesUnavailable(f"{LIBRARY} cannot be loaded ({exc}); install libnftables1") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
    return _lib


class Nft:
    """One libnftables context. Each `run` is one transaction (the whole buffer, or nothing)."""

    def __init__(self) -> None:
        self.lib = load()
        _netlink_usable()
        self.ctx = self.lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self.ctx:
            raise NftablesUnavailable("nft_ctx_new failed")
        self.lib.nft_ctx_buffer_output(self.ctx)
        self.lib.nft_ctx_buffer_error(self.ctx)

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None
            _release_freed()

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, script: str, *, json_output: bool = False, dry_run: bool = False, terse: bool = False) -> str:
        """Run `script` (nft syntax); its output. Raises NftablesError with nft's own message."""
        self.lib.nft_ctx_output_set_flags(self.ctx, (_OUTPUT_JSON if json_output else 0) | (_OUTPUT_TERSE if terse else 0))
        self.lib.nft_ctx_set_dry_run(self.ctx, dry_run)
        rc = self._call(script.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        if rc != 0:
            raise NftablesError(_first_error(err) or f"nft exited {rc}")
        return out

    def _call(self, data: bytes) -> int:
        """nft_run_cmd_from_buffer, abandoned after CALL_DEADLINE_S. ctypes releases the GIL for the
        call, so it runs in a thread this one waits for; an abandoned call keeps its context (never
        freed) and ends with the process. A commit abandoned this way may still land: it is this
        run's ruleset or its lockdown, never less restrictive than what apply reports."""
        done: list[int] = []
        worker = threading.Thread(target=lambda: done.append(self.lib.nft_run_cmd_from_buffer(self.ctx, data)),
                                  name="libnftables", daemon=True)
        worker.start()
        worker.join(CALL_DEADLINE_S)
        if worker.is_alive():
            self.ctx = None
            raise NftablesBusy(f"nftables: libnftables did not finish in {CALL_DEADLINE_S:g} s: the ruleset changed "
                               "under each of its reads (another program commits without pause in this namespace)")
        if not done:
            raise NftablesError("nftables: the libnftables call failed")
        return done[0]

    def list_json(self, what: str, terse: bool = False) -> list[dict[str, Any]]:
        """`list WHAT` as JSON objects (metainfo dropped); [] when WHAT does not exist. `terse`:
        without set elements (what a commit needs to know: names, not 10,000 members)."""
        return self._listed(what, terse)

    def list_table(self, table: str) -> tuple[list[dict[str, Any]], dict[str, list[bytes]]]:
        """Everything `table` ("inet NAME") holds, for a read-back: its JSON listing without set
        elements, but with those of sets with timeouts (learned, few), and each address set's
        elements (interval or hash) as its netlink dump (set_elements: every element, without
        libnftables' cost). Read again, a few times at most, while the generation id moves under the reads."""
        family, name = table.split()
        if family != "inet":
            raise ValueError(f"list_table: an inet table, not {table}")
        for _ in range(READ_ATTEMPTS):
            start, whole = generation(), True
            objs = self._listed(f"table {table}", terse=True)
            dumped: dict[str, list[bytes]] = {}
            for i, o in enumerate(objs):
                s = o.get("set", {})
                if "timeout" in s.get("flags", []):
                    objs[i] = next(iter(self._listed(f"set {table} {s['name']}", False)), o)
                elif s.get("flags", []) in ([], ["interval"]) and s.get("type") in ("ipv4_addr", "ipv6_addr"):
                    elements = set_elements(name, s["name"])
                    whole = whole and elements is not None
                    dumped[s["name"]] = elements or []
            if whole and generation() == start:
                break
        return objs, dumped

    def _listed(self, what: str, terse: bool) -> list[dict[str, Any]]:
        kind, _, rest = what.partition(" ")
        if kind in ("table", "set", "chain"):
            family, name = rest.split()[:2]
            flagged = [t for t in tables() if t.flags and t.family == family]
            mine = next((t for t in flagged if t.name == name), None)
            if mine is not None:  # never printed as JSON (see `tables`)
                raise NftablesError(f"table {family} {name} carries flags {mine.flags:#x}"
                                    + (" (owner): it is owned by another program" if mine.flags & 2 else " (dormant)"))
            if kind == "table" and terse and not flagged:
                # libnftables 1.0.6 fetches every set element for `list table` even when terse (448 KB
                # of netlink, ~5 MiB, for 10,000 intervals); for `list ruleset` terse it fetches none.
                # That lists the family's other tables too: only while none carries a flag.
                found = self._json(f"ruleset {family}", terse=True)
                return [o for o in found for k, body in o.items()
                        if body.get("name" if k == "table" else "table") == name]
        return self._json(what, terse)

    def _json(self, what: str, terse: bool) -> list[dict[str, Any]]:
        try:
            text = self.run(f"list {what}", json_output=True, terse=terse)
        except NftablesError as exc:
            if "No such file or directory" in str(exc):
                return []
            raise
        if not text.strip():
            return []
        try:
            listing = json.loads(text)
        except json.JSONDecodeError as exc:
            # libnftables 1.0.6 prints a table's `flags owner` as truncated JSON: someone else's table.
            raise NftablesError(f"libnftables printed {what} as invalid JSON ({exc.msg} at {exc.pos}): "
                                "is it owned by another program (flags owner)?") from None
        return [o for o in listing.get("nftables", []) if "metainfo" not in o]


def _release_freed() -> None:
    """Give the memory a context freed back to the kernel (glibc keeps freed heap pages resident):
    a 10,000-element commit leaves ~8 MiB there that apply's read-back would otherwise add to."""
    global _trim
    if _trim is None:
        import ctypes  # noqa: PLC0415

        _trim = getattr(ctypes.CDLL(None), "malloc_trim", False)  # glibc only
    if _trim:
        _trim(0)


def _netlink_usable() -> None:
    """libnftables exit()s the whole process (status 3, a message on stderr) when it cannot open
    its netlink socket (nft_ctx_new -> mnl.c netlink_init_error): try the same socket first."""
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER).close()
    except OSError as exc:
        raise NftablesUnavailable(f"no nf_tables netlink socket in this process: {exc.strerror or exc}") from None


def _first_error(err: str) -> str:
    """nft's error, as one line: the message, then the offending command (without the caret line)."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip() and set(ln.strip()) - {"^", "~"}]
    return " | ".join(lines[:2])


def generation() -> int:
    """The kernel's nf_tables generation id in this namespace: every committed transaction, in any
    table, adds one; a refused one adds nothing (checked on this kernel). Hand-written netlink
    (NFT_MSG_GETGEN): libnftables 1.0.6 has no call that returns it, and pyroute2's import costs ~0.1 s."""
    try:
        answer = _request(_NFT_MSG_GETGEN, _NLM_F_REQUEST)
    except OSError as exc:
        raise NftablesError(f"nftables: the generation id could not be read: {exc.strerror or exc}") from None
    for attr, value in attributes(answer[0][2] if answer else b""):
        if attr == _NFTA_GEN_ID and len(value) >= 4:
            return int(struct.unpack_from(">I", value)[0])
    raise NftablesError("nftables: the kernel's answer holds no generation id")


class TableInfo(NamedTuple):
    family: str  # as nft names it: inet, ip, ip6, arp, bridge, netdev
    name: str
    flags: int  # NFT_TABLE_F_*: 1 dormant, 2 owner


def tables() -> list[TableInfo]:
    """Every nf_tables table in this namespace, from a netlink dump (NFT_MSG_GETTABLE).
    Hand-written because libnftables 1.0.6 cannot list a table with exactly one flag (`dormant` or
    `owner`) as JSON: it frees the flag's name before printing it (use after free: the JSON holds
    garbage, or the process aborts with a corrupted heap; seen on this machine). So no table is
    listed as JSON before this says it carries no flag."""
    try:
        answer = _request(_NFT_MSG_GETTABLE, _NLM_F_REQUEST | _NLM_F_DUMP)
    except OSError as exc:
        raise NftablesError(f"nftables: the tables could not be listed: {exc.strerror or exc}") from None
    out = []
    for _, family, payload in answer:
        name, flags = "", 0
        for attr, value in attributes(payload):
            if attr == _NFTA_TABLE_NAME:
                name = value.rstrip(b"\0").decode(errors="replace")
            elif attr == _NFTA_TABLE_FLAGS and len(value) == 4:
                flags = int(struct.unpack(">I", value)[0])
        out.append(TableInfo(_FAMILY_NAMES.get(family, str(family)), name, flags))
    return out


def set_elements(table: str, name: str) -> list[bytes] | None:
    """Every element set `name` of `inet table` holds, as the kernel encodes them: the payloads of
    the NFTA_SET_ELEM_LIST_ELEMENTS attributes of one dump (decode.held_intervals reads them). None
    when the set is gone or the dump was interrupted by a commit (read again). Hand-written netlink
    (NFT_MSG_GETSETELEM): libnftables lists 10,000 elements as JSON in ~60 ms and ~14 MiB, this
    dump and its decoding in ~20 ms and under 1 MiB (bench/RESULTS.md, run S); pyroute2's import
    alone costs ~0.1 s, and libnftnl through ctypes would be several foreign calls per element."""
    attrs = _set_head(table, name)
    try:
        answer = _request(_NFT_MSG_GETSETELEM, _NLM_F_REQUEST | _NLM_F_DUMP, _NFPROTO_INET, attrs)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NftablesError(f"nftables: set {name} could not be read: {exc.strerror or exc}") from None
    if any(flags & _NLM_F_DUMP_INTR for flags, _, _ in answer):
        return None
    return [value for _, _, payload in answer for attr, value in attributes(payload) if attr == _NFTA_SET_ELEM_LIST_ELEMENTS]


def timed_elements(table: str, name: str) -> list[tuple[str, int]] | None:
    """(address, whole seconds left, rounded up) of each element of timeout set `name` of `inet
    table`, from one netlink dump; None when the set is gone or the dump was interrupted."""
    blocks = set_elements(table, name)
    if blocks is None:
        return None
    out = []
    for block in blocks:
        for kind, elem in attributes(block):
            if kind != _NFTA_LIST_ELEM:
                continue
            key, left_ms = b"", 0
            for attr, value in attributes(elem):
                if attr == _NFTA_SET_ELEM_KEY:
                    key = next((v for a, v in attributes(value) if a == _NFTA_DATA_VALUE), b"")
                elif attr == _NFTA_SET_ELEM_EXPIRATION and len(value) == 8:
                    left_ms = struct.unpack(">Q", value)[0]
            if len(key) in (4, 16):
                out.append((socket.inet_ntop(socket.AF_INET6 if len(key) == 16 else socket.AF_INET, key), -(-left_ms // 1000)))
    return out


def attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Netlink attributes (type without the nested / byte-order bits, value) in `data`."""
    at = 0
    while at + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4 or at + size > len(data):
            raise ValueError(f"netlink attribute of {size} bytes at {at} of {len(data)}")
        yield kind & 0x3FFF, data[at + 4:at + size]
        at += (size + 3) & ~3


def _request(kind: int, flags: int, family: int = socket.AF_UNSPEC, attrs: bytes = b"") -> list[tuple[int, int, bytes]]:
    """One nfnetlink request to nf_tables; its answers as (netlink flags, nfgenmsg family, payload after nfgenmsg),
    all of a dump's (up to NLMSG_DONE). An error answer raises OSError with the kernel's errno."""
    body = struct.pack("=BBH", family, 0, 0) + attrs
    out: list[tuple[int, int, bytes]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        sock.send(struct.pack("=IHHII", 16 + len(body), _NFNL_SUBSYS_NFTABLES << 8 | kind, flags, 1, 0) + body)
        while True:
            data = sock.recv(1 << 17)  # one dump message is at most 32 KiB (netlink_dump)
            at = 0
            while at + 16 <= len(data):
                length, msg, msg_flags = struct.unpack_from("=IHH", data, at)
                if length < 16 or at + length > len(data):
                    raise OSError(errno.EPROTO, f"truncated netlink message ({length} bytes at {at} of {len(data)})")
                if msg == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, at + 16)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out
                if msg == _NLMSG_DONE:
                    return out
                out.append((msg_flags, data[at + 16] if length >= 20 else 0, data[at + 20:at + length]))
                if not flags & _NLM_F_DUMP:
                    return out
                at += (length + 3) & ~3


class _Batches:
    """nf_tables batches over a netlink socket kept open: each `_transaction` is one transaction
    (every message or none), its messages acked one by one."""

    def __init__(self, table: str) -> None:
        self.table = table
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        except OSError as exc:
            raise NftablesUnavailable(f"no nf_tables netlink socket in this process: {exc.strerror or exc}") from None
        self.sock.settimeout(5)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self, parts: list[tuple[int, int, bytes]], what: str) -> None:
        """One batch of (NFT_MSG_*, netlink flags, payload) messages to the inet family; `what`
        names them in an error."""
        messages = [self._message(_NFNL_MSG_BATCH_BEGIN, _NLM_F_REQUEST, socket.AF_UNSPEC, _NFNL_SUBSYS_NFTABLES, b"")]
        messages += [self._message(_NFNL_SUBSYS_NFTABLES << 8 | kind, _NLM_F_REQUEST | _NLM_F_ACK | flags,
                                   _NFPROTO_INET, 0, payload) for kind, flags, payload in parts]
        messages.append(self._message(_NFNL_MSG_BATCH_END, _NLM_F_REQUEST, socket.AF_UNSPEC, _NFNL_SUBSYS_NFTABLES, b""))
        first, last = self.seq - len(messages) + 2, self.seq - 1  # the acked messages: all but begin and end
        batch = b"".join(messages)
        if len(batch) > _SNDBUF:  # one send is one batch: the buffer must hold it whole
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, len(batch))
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(batch))
        try:
            self.sock.send(batch)
            self._acks(first, last, what)
        except OSError as exc:
            raise NftablesError(f"nftables: writing {what} failed: {exc.strerror or exc}") from None

    def _message(self, kind: int, flags: int, family: int, res_id: int, payload: bytes) -> bytes:
        self.seq += 1
        return struct.pack("=IHHIIBBH", 20 + len(payload), kind, flags, self.seq, 0, family, 0,
                           socket.htons(res_id)) + payload

    def _acks(self, first: int, last: int, what: str) -> None:
        """Wait for the ack of every message in [first, last]; the first error refuses the batch
        (the kernel then applied none of it)."""
        waiting = set(range(first, last + 1))
        while waiting:
            data = self.sock.recv(65536)
            at = 0
            while at + 16 <= len(data):
                length, kind, _flags, seq = struct.unpack_from("=IHHI", data, at)
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, at + 16)[0]
                    if code and seq in waiting:
                        self._drain()
                        raise NftablesError(f"nftables: the kernel refused {what}: {os.strerror(code)}")
                    waiting.discard(seq)
                at += max(16, (length + 3) & ~3)

    def _drain(self) -> None:
        """Read what is left of a refused batch's answers, so the next batch reads only its own."""
        self.sock.settimeout(0)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass
        finally:
            self.sock.settimeout(5)


class TimedElements(_Batches):
    """Adds (set, address, seconds) elements to timeout sets of one inet table, one transaction per
    call, over a netlink socket kept open. Hand-written (NFT_MSG_NEWSETELEM/DELSETELEM in one
    batch) because libnftables parses a script and fetches the table's sets before every
    transaction: 0.10 ms per commit here against 0.02 ms (bench/RESULTS.md, run Q); pyroute2's
    nftables module has no set elements. tests/test_nftables_elements.py checks the result against
    `nft list set`."""

    def add(self, items: list[tuple[str, str, int]]) -> None:
        """Each address in its set with its timeout: added, deleted and added again with the
        timeout (a plain add of an element already there keeps its old timeout on kernels before
        6.10; the transaction is atomic, so a packet never sees the address missing). One
        transaction per _CHUNK elements, so a batch always fits the socket's send buffer."""
        for at in range(0, len(items), _CHUNK):
            self._add(items[at:at + _CHUNK])

    def _add(self, items: list[tuple[str, str, int]]) -> None:
        by_set: dict[str, list[tuple[bytes, int]]] = {}
        for name, addr, ttl in items:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
            by_set.setdefault(name, []).append((packed, ttl))
        parts = []
        for name, elems in by_set.items():
            head = _set_head(self.table, name)
            plain = address_elements(key for key, _ in elems)
            timed = [_nest(_NFTA_LIST_ELEM, _key(key), _nla(_NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", ttl * 1000)))
                     for key, ttl in elems]
            for kind, elements in ((_NFT_MSG_NEWSETELEM, plain), (_NFT_MSG_DELSETELEM, plain), (_NFT_MSG_NEWSETELEM, timed)):
                parts.append((kind, _NLM_F_CREATE if kind == _NFT_MSG_NEWSETELEM else 0,
                              head + _nest(_NFTA_SET_ELEM_LIST_ELEMENTS, *elements)))
        self._transaction(parts, "learned addresses")


class SetRefill(_Batches):
    """Empties sets of one inet table and fills each with its elements, all in one transaction
    (NFT_MSG_DELSETELEM without elements is nft's `flush set`). Hand-written because libnftables
    1.0.6 first fetches everything an interval set holds (its overlap check) and then parses the
    script's elements: refilling 10,000 intervals peaked at 48.8 MiB against 37 MiB for a re-apply
    that refills nothing (bench/RESULTS.md, run V). The elements are encoded as nft encodes them
    (interval_elements, address_elements): tests/test_nftables_elements.py compares the bytes with
    what `nft` sends and the kernel's dump with what it holds after nft's refill."""

    def refill(self, sets: Sequence[tuple[str, Sequence[bytes]]]) -> None:
        """(set name, its NFTA_LIST_ELEM attributes) for each set: flushed and filled in one batch."""
        parts = []
        for name, elements in sets:
            head = _set_head(self.table, name)
            parts.append((_NFT_MSG_DELSETELEM, 0, head))
            for at in range(0, len(elements), _PER_MESSAGE):  # an attribute holds at most 64 KiB
                parts.append((_NFT_MSG_NEWSETELEM, _NLM_F_CREATE,
                              head + _nest(_NFTA_SET_ELEM_LIST_ELEMENTS, *elements[at:at + _PER_MESSAGE])))
        self._transaction(parts, f"the elements of set(s) {', '.join(name for name, _ in sets)}")


def _set_head(table: str, name: str) -> bytes:
    """The attributes naming set `name` of inet `table`, ahead of its elements in a set-element message."""
    return _nla(_NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _nla(_NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")


def _key(packed: bytes) -> bytes:
    return _nest(_NFTA_SET_ELEM_KEY, _nla(_NFTA_DATA_VALUE, packed))


def address_elements(keys: Iterable[bytes]) -> list[bytes]:
    """A set of addresses (no `flags interval`): one element per address, its key alone."""
    return [_nest(_NFTA_LIST_ELEM, _key(k)) for k in keys]


def interval_elements(width: int, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
    """An interval set's elements for sorted, disjoint, non-adjacent intervals [start, end] of
    `width`-byte addresses, as nft 1.0.6 sends them: an interval end at address 0 first unless an
    interval starts there, then each interval's start and its end one past its last address
    (NFTA_SET_ELEM_FLAGS = NFT_SET_ELEM_INTERVAL_END, before the key), and for an interval that
    reaches the top address no end, but nft's note on its start that it is open."""
    out = []
    end_flag = _nla(_NFTA_SET_ELEM_FLAGS, _INTERVAL_END)
    top = (1 << width * 8) - 1
    if starts and starts[0] != 0:
        out.append(_nest(_NFTA_LIST_ELEM, end_flag, _key(bytes(width))))
    for start, end in zip(starts, ends, strict=True):
        if end == top:
            out.append(_nest(_NFTA_LIST_ELEM, _key(start.to_bytes(width, "big")), _nla(_NFTA_SET_ELEM_USERDATA, _OPEN)))
            break
        out.append(_nest(_NFTA_LIST_ELEM, _key(start.to_bytes(width, "big"))))
        out.append(_nest(_NFTA_LIST_ELEM, end_flag, _key((end + 1).to_bytes(width, "big"))))
    return out


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _nla(kind | _NLA_F_NESTED, b"".join(parts))
