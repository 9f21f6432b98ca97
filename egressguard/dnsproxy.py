"""`egressguard dns`: the DNS forwarder of dns.mode proxy. It answers allowed names only, and the
kernel holds an answer's addresses (in the entry's learned set, for the clamped TTL) before the
answer is released, so the connection that follows is never refused.

asyncio, one thread: a query spends nearly all its time waiting for the upstream, and a hostile
client may hold TCP connections open byte by byte; coroutines make each of those a small object
with a deadline, where threads would cost a stack each and need locks around the shared limits.
The kernel update (one nf_tables netlink transaction, or on the iptables back end one ipset
netlink message per set: tens of microseconds) runs on the loop itself, once for all the answers
that are ready in the same turn of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from egressguard import logs
from egressguard.policy import Policy
from egressguard.ruleset import Family, LearnedEntry, learned_entries

log = logs.get_logger("egressguard")

# Bounds on what a hostile client can make the forwarder hold (each one checked by tests/test_dnsproxy.py).
MAX_UDP_QUERY = 4096  # bytes; a query is a name and a few options: larger datagrams are dropped
MAX_INFLIGHT = 512  # queries being answered at once (UDP and TCP); more are dropped (UDP) or wait (TCP)
MAX_TCP_CONNECTIONS = 64  # more are closed at once
TCP_IDLE_S = 5.0  # a TCP client must deliver each whole query within this (stalls, one byte at a time)
MAX_TCP_QUERIES = 100  # per connection, then it is closed
RATE_PER_CLIENT = 2000.0  # queries per second per client address (token bucket), past the burst
RATE_BURST = 1000.0
MAX_CLIENTS = 4096  # rate-limit buckets kept (least recently seen dropped first)
UPSTREAM_TIMEOUT_S = 2.0  # per upstream resolver; all failing: SERVFAIL
MAX_CNAME_CHAIN = 16
UDP_PAYLOAD = 1232  # our EDNS payload size (DNS flag day 2020)
MAX_SET_ELEMENTS_PER_ANSWER = 256  # addresses learned from one answer (more: the rest are not learned)
MAX_ITEMS_PER_COMMIT = 1024  # (set, address) pairs of answers committed together, so one kernel message stays small
MAX_CACHED = 10_000  # answers kept for repeated questions (least recently used dropped first)
MAX_PROMISES = 65_536  # (set, address) expiries remembered (Promises): a learned ipset's own maxelem (sets.Ipsets.create)

_HEADER = struct.Struct("!HHHHHH")


@dataclass
class Config:
    """What the forwarder needs from the policy."""

    entries: Sequence[LearnedEntry]
    upstreams: Sequence[str]
    ttl_min: int
    ttl_max: int
    port: int

    @classmethod
    def from_policy(cls, policy: Policy, upstreams: Sequence[str]) -> Config:
        return cls(entries=learned_entries(policy), upstreams=tuple(upstreams), ttl_min=policy.dns.ttl.min,
                   ttl_max=policy.dns.ttl.max, port=policy.dns.forwarder_port)


class LearnedWriter(Protocol):
    """What writes learned addresses into one back end's kernel sets (its `learned` module)."""

    def add(self, items: Sequence[tuple[str, str, int]]) -> None: ...
    def held(self, names: Sequence[str]) -> list[tuple[str, str, int]]: ...
    def close(self) -> None: ...


class LearnedSets:
    """The learned sets wherever `apply` made them: ipsets (iptables back end) if the kernel holds
    one of this policy's, else the nftables table's. Looked for at the first answer (the forwarder
    may start before apply), and again when the kernel refuses an add (a re-apply switched back ends)."""

    def __init__(self, config: Config) -> None:
        self.names = {name for e in config.entries for name in e.sets.values()}
        self.impl: LearnedWriter | None = None

    def _find(self) -> LearnedWriter:
        from egressguard.backends.iptables.learned import LearnedIpsets, holds_any  # noqa: PLC0415

        if holds_any(self.names):
            return LearnedIpsets()
        from egressguard.backends.nftables.learned import LearnedElements  # noqa: PLC0415

        return LearnedElements()

    def held(self) -> list[tuple[str, str, int]]:
        """(set, address, seconds left) of every address the learned sets hold now."""
        if self.impl is None:
            self.impl = self._find()
        return self.impl.held(sorted(self.names))

    def add(self, items: Sequence[tuple[str, str, int]]) -> None:
        if self.impl is None:
            self.impl = self._find()
        try:
            self.impl.add(items)
        except Exception:
            found = self._find()
            if type(found) is type(self.impl):
                found.close()
                raise
            self.impl.close()
            self.impl = found
            self.impl.add(items)

    def close(self) -> None:
        if self.impl is not None:
            self.impl.close()


class Promises:
    """The latest expiry committed for each (set, address), so that a later answer with a shorter
    TTL never lowers the kernel's timeout of an address an earlier answer promised for longer (a
    client caches that earlier answer for its own TTL): every commit asks for max(its TTL, what is
    left of the promise). Seeded from what the kernel holds (a restarted forwarder, `seed`). An
    entry is dropped when it expires; at most `limit` are kept, the soonest to expire dropped first,
    and until that one would have expired (`unsure_until`) an address not remembered is committed
    for at least as long: when unsure, the time is lengthened, never shortened."""

    def __init__(self, clock: Callable[[], float], limit: int = MAX_PROMISES) -> None:
        self.clock = clock
        self.limit = limit
        self.until: dict[tuple[str, str], float] = {}
        self.heap: list[tuple[float, tuple[str, str]]] = []  # (expiry, key); stale ones skipped and rebuilt
        self.unsure_until = 0.0

    def __len__(self) -> int:
        return len(self.until)

    def extended(self, items: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
        """`items` with each timeout raised to what is left of its (set, address)'s latest promise."""
        now = self.clock()
        self._prune(now)
        return [(name, addr, max(ttl, math.ceil(self.until.get((name, addr), self.unsure_until) - now)))
                for name, addr, ttl in items]

    def committed(self, items: Sequence[tuple[str, str, int]]) -> None:
        """The kernel now holds each (set, address) for its seconds."""
        self.seed(items)

    def seed(self, held: Sequence[tuple[str, str, int]]) -> None:
        """(set, address, seconds left) the kernel holds: promised at least that long."""
        now = self.clock()
        for name, addr, left in held:
            if left > 0 and now + left > self.until.get((name, addr), 0.0):
                self.until[(name, addr)] = now + left
                heapq.heappush(self.heap, (now + left, (name, addr)))
        self._prune(now)

    def unsure(self, seconds: int) -> None:
        """What the kernel holds is unknown: any address may have been promised `seconds` from now."""
        self.unsure_until = max(self.unsure_until, self.clock() + seconds)

    def _prune(self, now: float) -> None:
        while self.heap:
            until, key = self.heap[0]
            if self.until.get(key) != until:  # stale: promised longer since, or dropped
                heapq.heappop(self.heap)
            elif until <= now:
                heapq.heappop(self.heap)
                del self.until[key]
            elif len(self.until) > self.limit:
                heapq.heappop(self.heap)
                del self.until[key]
                self.unsure_until = max(self.unsure_until, until)
            else:
                break
        if len(self.heap) > 2 * len(self.until) + 1024:  # stale entries of keys promised again and again
            self.heap = [(until, key) for key, until in self.until.items()]
            heapq.heapify(self.heap)


class _Batches:
    """Commits the kernel updates of answers that are ready in the same turn of the event loop as
    one update (one nft transaction, one ipset message per set): under load answers arrive
    together, and each kernel round trip costs far more than one more element in it. Every answer
    waits for the commit of its own batch; a batch the kernel refuses is retried answer by answer,
    so one refused answer never withholds another's. Every timeout committed is at least what is
    left of the address's latest promise (Promises), first read from the kernel at the first commit."""

    def __init__(self, sets: Any, promises: Promises, ttl_max: int) -> None:
        self.sets = sets
        self.promises = promises
        self.ttl_max = ttl_max
        self.seeded = False
        self.pending: list[tuple[Sequence[tuple[str, str, int]], asyncio.Future[None]]] = []
        self.commits = 0  # kernel updates made (bench: answers per commit)

    async def add(self, items: Sequence[tuple[str, str, int]]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self.pending:
            loop.call_soon(self._commit)  # after every callback already due in this turn
        self.pending.append((items, done))
        await done

    def _commit(self) -> None:
        batch, self.pending = self.pending, []
        group: list[tuple[Sequence[tuple[str, str, int]], asyncio.Future[None]]] = []
        size = 0
        for answer in batch:  # groups of at most MAX_ITEMS_PER_COMMIT (an answer alone may be larger)
            if group and size + len(answer[0]) > MAX_ITEMS_PER_COMMIT:
                self._commit_group(group)
                group, size = [], 0
            group.append(answer)
            size += len(answer[0])
        if group:
            self._commit_group(group)

    def _seed(self) -> None:
        """Once, before the first commit: what the kernel holds (an earlier forwarder's promises)."""
        if self.seeded:
            return
        self.seeded = True
        held = getattr(self.sets, "held", None)  # the fuzz tests' recorder has none
        if held is None:
            return
        try:
            self.promises.seed(held())
        except Exception as exc:  # noqa: BLE001 - unknown: every address may have been promised ttl_max
            log.warning("dns_learned_unreadable", error=f"{type(exc).__name__}: {exc}", assume_s=self.ttl_max)
            self.promises.unsure(self.ttl_max)

    def _add(self, items: Sequence[tuple[str, str, int]]) -> None:
        extended = self.promises.extended(_merged(items))
        self.sets.add(extended)
        self.promises.committed(extended)

    def _commit_group(self, group: list[tuple[Sequence[tuple[str, str, int]], asyncio.Future[None]]]) -> None:
        self.commits += 1
        self._seed()
        try:
            self._add([i for items, _ in group for i in items])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting answers
            if len(group) == 1:
                _settle(group[0][1], exc)
                return
            for items, done in group:
                try:
                    self._add(items)
                except Exception as one:  # noqa: BLE001
                    _settle(done, one)
                else:
                    _settle(done, None)
            return
        for _, done in group:
            _settle(done, None)


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():  # its answer was cancelled (the forwarder stopping)
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)


def _merged(items: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Each (set, address) once, with the longest timeout asked for: the kernel refuses to delete
    an element twice in one transaction, and every answer then has at least its own time."""
    longest: dict[tuple[str, str], int] = {}
    for name, addr, ttl in items:
        longest[(name, addr)] = max(ttl, longest.get((name, addr), 0))
    return [(name, addr, ttl) for (name, addr), ttl in longest.items()]


@dataclass
class _Cached:
    """A positive answer whose addresses the kernel holds at least until `until` (monotonic)."""

    until: float
    at: float
    rcode: dns.rcode.Rcode
    flags: int
    answer: list[Any]
    authority: list[Any]


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class Stats:
    """Counters for `status` and the tests: what the forwarder did with what it received."""

    answered: int = 0
    refused: int = 0
    dropped: int = 0  # unparseable, oversized, rate-limited, over the in-flight bound
    formerr: int = 0
    servfail: int = 0
    learned: int = 0
    commit_ms: list[float] = field(default_factory=list)  # answer received -> kernel holds it (bench)


class Forwarder:
    """The protocol-independent part: one query's wire bytes in, the answer's wire bytes out (or None: drop)."""

    def __init__(self, config: Config, sets: Any, clock: Callable[[], float] = time.monotonic,
                 resolve: Callable[[dns.message.Message, str, bool], Any] | None = None) -> None:
        self.config = config
        self.sets = sets  # LearnedSets, or any object with add(items) (the fuzz tests' recorder)
        self.batches = _Batches(sets, Promises(clock), config.ttl_max)
        self.clock = clock
        self.resolve = resolve or _upstream
        self.inflight = 0
        self.clients: OrderedDict[str, _Bucket] = OrderedDict()
        self.stats = Stats()
        self.keep_commit_times = False
        self.cache: OrderedDict[tuple[str, int, bool], _Cached] = OrderedDict()

    # -- limits ------------------------------------------------------------------------------

    def admit(self, client: str) -> bool:
        """Per-client token bucket and the global in-flight bound."""
        if self.inflight >= MAX_INFLIGHT:
            self.stats.dropped += 1
            return False
        now = self.clock()
        b = self.clients.pop(client, None) or _Bucket(RATE_BURST, now)
        b.tokens = min(RATE_BURST, b.tokens + (now - b.at) * RATE_PER_CLIENT)
        b.at = now
        self.clients[client] = b
        if len(self.clients) > MAX_CLIENTS:
            self.clients.popitem(last=False)
        if b.tokens < 1:
            self.stats.dropped += 1
            return False
        b.tokens -= 1
        return True

    # -- one query ---------------------------------------------------------------------------

    async def answer(self, wire: bytes, tcp: bool, client: str) -> bytes | None:
        self.inflight += 1
        try:
            return await self._answer(wire, tcp, client)
        except Exception as exc:  # noqa: BLE001 - a hostile query must never end the forwarder
            log.error("dns_query_failed", client=client, error=f"{type(exc).__name__}: {exc}")
            return _error_reply(wire, dns.rcode.SERVFAIL)
        finally:
            self.inflight -= 1

    async def _answer(self, wire: bytes, tcp: bool, client: str) -> bytes | None:
        if len(wire) < _HEADER.size or (not tcp and len(wire) > MAX_UDP_QUERY):
            self.stats.dropped += 1
            return None
        if wire[2] & 0x80:  # QR set: a response, never answered (no reflection loops)
            self.stats.dropped += 1
            return None
        try:
            q = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - dnspython raises many kinds for malformed input
            self.stats.formerr += 1
            return _error_reply(wire, dns.rcode.FORMERR)
        if q.opcode() != dns.opcode.QUERY:
            return _reply(q, dns.rcode.NOTIMP, tcp)
        if len(q.question) != 1:
            self.stats.formerr += 1
            return _reply(q, dns.rcode.FORMERR, tcp)
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        entries = [e for e in self.config.entries if e.matches(name)] if question.rdclass == dns.rdataclass.IN else []
        if not entries:
            # REFUSED, not NXDOMAIN: the name may well exist, and a stub resolver caches an NXDOMAIN
            # (for the zone's negative TTL), so a name allowed later would stay "missing".
            self.stats.refused += 1
            log.info("dns_refused", name=name[:255], qtype=dns.rdatatype.to_text(question.rdtype), client=client)
            return _reply(q, dns.rcode.REFUSED, tcp)
        dnssec = q.ednsflags & dns.flags.DO != 0 if q.edns >= 0 else False
        key = (name, int(question.rdtype), dnssec)
        hit = self._cached(key)
        if hit is not None:
            return _to_wire(self._from_cache(q, hit), q, tcp)
        upstream_q = dns.message.make_query(question.name, question.rdtype, use_edns=0, payload=UDP_PAYLOAD,
                                            want_dnssec=dnssec)
        r = await self._ask_upstreams(upstream_q)
        if r is None:
            self.stats.servfail += 1
            return _reply(q, dns.rcode.SERVFAIL, tcp)
        started = time.perf_counter()
        learned = self._addresses(question.name, r)
        if learned:
            items = []
            for addr, ttl in learned:
                family: Family = 6 if ":" in addr else 4
                items += [(e.sets[family], addr, ttl) for e in entries]
            try:
                await self.batches.add(items)
            except Exception as exc:  # noqa: BLE001 - the kernel refused: the client must not get the answer
                log.error("dns_learn_failed", name=name, error=str(exc))
                self.stats.servfail += 1
                return _reply(q, dns.rcode.SERVFAIL, tcp)
            if self.keep_commit_times and len(self.stats.commit_ms) < 100_000:
                self.stats.commit_ms.append((time.perf_counter() - started) * 1000)
            for addr, ttl in learned:
                self.stats.learned += 1
                for e in entries:
                    log.info("dns_learned", name=name, address=addr, ttl=ttl, entry=f"allow[{e.index}]", host=e.host)
        self.stats.answered += 1
        resp = _reply_message(q)
        resp.set_rcode(r.rcode())
        resp.flags |= r.flags & (dns.flags.RA | dns.flags.AD)
        for rrset in r.answer:
            # The client may cache no longer than the kernel keeps the address.
            rrset.ttl = min(rrset.ttl, self.config.ttl_max)
        resp.answer = r.answer
        resp.authority = r.authority
        if learned and r.rcode() == dns.rcode.NOERROR:
            self._remember(key, r)
        return _to_wire(resp, q, tcp)

    # -- answers the kernel still holds --------------------------------------------------------

    def _remember(self, key: tuple[str, int, bool], r: dns.message.Message) -> None:
        """Keep an answer whose addresses were just committed, for as long as every record of it may
        be cached by a client (its TTLs, already clamped to max), less a second: the kernel keeps
        each address at least that long (its timeout is the TTL clamped up to min, counted from
        the commit, which came first)."""
        lifetime = min(rrset.ttl for rrset in r.answer) - 1
        if lifetime < 1:
            return
        now = self.clock()
        self.cache[key] = _Cached(now + lifetime, now, r.rcode(), r.flags, list(r.answer), list(r.authority))
        self.cache.move_to_end(key)
        if len(self.cache) > MAX_CACHED:
            self.cache.popitem(last=False)

    def _cached(self, key: tuple[str, int, bool]) -> _Cached | None:
        hit = self.cache.get(key)
        if hit is None:
            return None
        if self.clock() >= hit.until - 1:
            del self.cache[key]
            return None
        self.cache.move_to_end(key)
        return hit

    def _from_cache(self, q: dns.message.Message, hit: _Cached) -> dns.message.Message:
        self.stats.answered += 1
        elapsed = int(self.clock() - hit.at)
        resp = _reply_message(q)
        resp.set_rcode(hit.rcode)
        resp.flags |= hit.flags & (dns.flags.RA | dns.flags.AD)
        for rrset in hit.answer:
            copy = rrset.copy()
            copy.ttl = max(1, min(rrset.ttl - elapsed, int(hit.until - self.clock())))
            resp.answer.append(copy)
        resp.authority = list(hit.authority)
        return resp

    async def _ask_upstreams(self, query: dns.message.Message) -> dns.message.Message | None:
        for server in self.config.upstreams:
            try:
                r = await self.resolve(query, server, False)
                if r.flags & dns.flags.TC:
                    r = await self.resolve(query, server, True)
                return r  # type: ignore[no-any-return]
            except (TimeoutError, dns.exception.DNSException, OSError, ValueError) as exc:
                log.warning("dns_upstream_failed", server=server, error=f"{type(exc).__name__}: {exc}")
        return None

    def _addresses(self, qname: dns.name.Name, r: dns.message.Message) -> list[tuple[str, int]]:
        """A and AAAA records of `qname` after following its CNAMEs in the answer, each with the
        clamped TTL. Records of other owners (an upstream's extra records) are not learned."""
        chain = {qname}
        for _ in range(MAX_CNAME_CHAIN):
            grew = False
            for rrset in r.answer:
                if rrset.rdtype == dns.rdatatype.CNAME and rrset.name in chain:
                    for rd in rrset:
                        if rd.target not in chain:
                            chain.add(rd.target)
                            grew = True
            if not grew:
                break
        out: dict[str, int] = {}
        for rrset in r.answer:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and rrset.name in chain:
                ttl = max(self.config.ttl_min, min(self.config.ttl_max, rrset.ttl))
                for rd in rrset:
                    if len(out) < MAX_SET_ELEMENTS_PER_ANSWER:
                        out[rd.address] = max(ttl, out.get(rd.address, 0))
        return list(out.items())


async def _upstream(query: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
    if tcp:
        return await dns.asyncquery.tcp(query, server, timeout=UPSTREAM_TIMEOUT_S)
    return await _udp(query, server)


async def _udp(query: dns.message.Message, server: str) -> dns.message.Message:
    """One UDP exchange, as dns.asyncquery.udp does it (a new socket, so a new random source port
    for every query; datagrams that do not answer this query are ignored), on the loop's own socket
    calls: dns.asyncquery.udp makes an asyncio transport and protocol per query, which cost this
    forwarder a third of its CPU per forwarded query (bench/RESULTS.md, run Q)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((server, 53))  # connected: the kernel drops datagrams from any other address
        await loop.sock_sendall(sock, query.to_wire())
        async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
            while True:
                r = dns.message.from_wire(await loop.sock_recv(sock, 65535))
                if query.is_response(r):
                    return r


def _reply_message(q: dns.message.Message) -> dns.message.Message:
    # EDNS is answered with our payload size and no options: none of the client's is echoed.
    return dns.message.make_response(q, recursion_available=True, our_payload=UDP_PAYLOAD)


def _reply(q: dns.message.Message, rcode: dns.rcode.Rcode, tcp: bool) -> bytes:
    resp = _reply_message(q)
    resp.set_rcode(rcode)
    return _to_wire(resp, q, tcp)


def _to_wire(resp: dns.message.Message, q: dns.message.Message, tcp: bool) -> bytes:
    """The answer within what the client can take: over UDP its EDNS payload size (512 without
    EDNS); too large: truncated with TC set, so the client retries over TCP."""
    limit = 65535 if tcp else max(512, min(q.payload, UDP_PAYLOAD)) if q.edns >= 0 else 512
    return resp.to_wire(max_size=limit, prefer_truncation=True)


def _error_reply(wire: bytes, rcode: int) -> bytes | None:
    """A bare header answering a query that could not be parsed: its id and opcode, no sections."""
    if len(wire) < _HEADER.size:
        return None
    qid, flags = struct.unpack("!HH", wire[:4])
    flags = 0x8000 | (flags & 0x7900) | 0x0080 | (rcode & 0xF)  # QR, opcode and RD kept, RA, rcode
    return _HEADER.pack(qid, flags, 0, 0, 0, 0)


# -- transports ------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.fwd.admit(addr[0]):
            return
        task = asyncio.get_running_loop().create_task(self._one(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, data: bytes, addr: Any) -> None:
        out = await self.fwd.answer(data, False, addr[0])
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable from a client gone away
        pass


class _Tcp:
    def __init__(self, fwd: Forwarder) -> None:
        self.fwd = fwd
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        self.connections += 1
        try:
            if self.connections > MAX_TCP_CONNECTIONS:
                self.fwd.stats.dropped += 1
                return
            for _ in range(MAX_TCP_QUERIES):
                try:
                    async with asyncio.timeout(TCP_IDLE_S):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        wire = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                if not self.fwd.admit(peer):
                    return
                out = await self.fwd.answer(wire, True, peer)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                try:
                    async with asyncio.timeout(TCP_IDLE_S):
                        await writer.drain()  # a client that never reads is dropped, not buffered for
                except (TimeoutError, ConnectionError):
                    return
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve(config: Config, sets: Any, ready: Callable[[], None] | None = None,
                stop: asyncio.Event | None = None) -> Forwarder:
    """Listen on loopback (127.0.0.1 and ::1, where the pod has them) at config.port until `stop`."""
    fwd = Forwarder(config, sets)
    fwd.keep_commit_times = os.environ.get("EGRESSGUARD_DNS_TIMINGS") == "1"
    loop = asyncio.get_running_loop()
    tcp = _Tcp(fwd)
    closers: list[Any] = []
    bound: list[str] = []
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(fwd), local_addr=(host, config.port),
                                                               family=family)
            server = await asyncio.start_server(tcp, host, config.port, family=family, reuse_address=True,
                                                limit=2 ** 16 + 2)
        except OSError as exc:
            if family == socket.AF_INET6 and bound:
                log.warning("dns_forwarder_no_ipv6", error=str(exc))  # an IPv6-disabled pod
                continue
            raise
        closers += [transport, server]
        bound.append(host)
    log.info("dns_forwarder_listening", addresses=bound, port=config.port, upstreams=list(config.upstreams),
             entries=[e.host for e in config.entries], ttl_min=config.ttl_min, ttl_max=config.ttl_max, pid=os.getpid())
    if ready:
        ready()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        for c in closers:
            c.close()
    return fwd


# -- the command -----------------------------------------------------------------------------


def main(args: Any) -> int:
    """`egressguard dns`: load the policy, become dns.forwarder_uid with CAP_NET_ADMIN only (when
    started as root), listen, and answer until SIGTERM."""
    import signal  # noqa: PLC0415

    from egressguard import facts  # noqa: PLC0415
    from egressguard import policy as policy_mod  # noqa: PLC0415
    from egressguard.errors import EnvironmentUnsupported, PolicyError  # noqa: PLC0415
    from egressguard.privileges import CAP_NET_ADMIN, Identity, drop_privileges, holds  # noqa: PLC0415

    loaded = policy_mod.load(args.policy)
    policy = loaded.policy
    if not policy.proxy_dns:
        raise PolicyError(f"policy error: {loaded.source}: dns.mode is static: `egressguard dns` runs only in dns.mode proxy")
    if args.check:
        from egressguard.errors import ProbeFailed  # noqa: PLC0415

        why = probe_forwarder("127.0.0.1", port=policy.dns.forwarder_port)
        if why:
            raise ProbeFailed(why)
        print(f"the DNS forwarder answers on 127.0.0.1:{policy.dns.forwarder_port}")
        return 0
    upstreams = facts.resolvers_for(policy, args.resolv_conf)
    if not upstreams:
        raise PolicyError(f"policy error: {loaded.source}: dns.resolvers: no upstream resolver (none in {args.resolv_conf})")
    uid = policy.dns.forwarder_uid
    assert uid is not None  # proxy mode requires it
    if os.geteuid() == 0:
        logs.load()  # its events are logged as the user it becomes
        drop_privileges(Identity(name=str(uid), uid=uid, gid=uid, home="/", shell="/bin/sh"), keep=(CAP_NET_ADMIN,))
    elif os.getuid() != uid:
        raise EnvironmentUnsupported(f"`egressguard dns` runs as dns.forwarder_uid {uid} (or starts as root and "
                                     f"becomes it), not as uid {os.getuid()}: its own queries would be confined")
    if not holds(CAP_NET_ADMIN):
        raise EnvironmentUnsupported("`egressguard dns` needs CAP_NET_ADMIN (ambient) to add learned addresses")
    from egressguard import sidecar  # noqa: PLC0415

    # Beside a command (`egressguard run`): end with it (a pidfd, opened before anything slow).
    parent_fd = sidecar.parent_exit_fd(args.parent) if args.parent is not None else None
    config = Config.from_policy(policy, upstreams)
    sets = LearnedSets(config)
    ready_fd = args.ready_fd

    def ready() -> None:
        if ready_fd is not None:
            sidecar.report_ready(ready_fd)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if parent_fd is not None:
            loop.add_reader(parent_fd, stop.set)
        fwd = await serve(config, sets, ready, stop)
        timings = {}
        if fwd.stats.commit_ms:  # EGRESSGUARD_DNS_TIMINGS=1 (bench/bench.py)
            ordered = sorted(fwd.stats.commit_ms)
            timings = {"commit_ms_median": round(ordered[len(ordered) // 2], 3),
                       "commit_ms_p99": round(ordered[int(len(ordered) * 0.99)], 3), "commits": len(ordered),
                       "batches": fwd.batches.commits}
        log.info("dns_forwarder_stopped", answered=fwd.stats.answered, refused=fwd.stats.refused,
                 dropped=fwd.stats.dropped, learned=fwd.stats.learned, **timings)

    try:
        asyncio.run(run())
    finally:
        sets.close()
    return 0


def probe_forwarder(server: str = "192.0.2.1", timeout: float = 1.0, port: int = 53) -> str | None:
    """None if a DNS query from this identity is answered by the forwarder (a name no policy allows
    gets REFUSED; any address works, the query is redirected); else what went wrong."""
    import dns.query  # noqa: PLC0415

    q = dns.message.make_query("egressguard-probe.invalid", "A")
    try:
        r = dns.query.udp(q, server, timeout=timeout, port=port)
    except (dns.exception.DNSException, OSError) as exc:
        return f"the DNS forwarder did not answer ({type(exc).__name__}: {exc or 'no answer'})"
    if r.rcode() != dns.rcode.REFUSED:
        return f"a query for a name no policy allows got {dns.rcode.to_text(r.rcode())}, not REFUSED from the forwarder"
    return None
