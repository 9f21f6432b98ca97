"""The forwarder (`egressguard dns`) against hostile input: what an agent can send it. The protocol
part runs in-process with a stand-in upstream and a recorder for the kernel sets (the kernel side is
proven with real packets in tests/test_dns_proxy.py and its nftables twin); the TCP transport runs for real on
loopback in a network namespace of its own. Answer or drop, never crash, never grow without bound."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import struct
import time
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from goldenfile import assert_matches_golden
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressguard import cli, dnsproxy, logs
from egressguard import policy as policy_mod
from egressguard.dnsproxy import Config, Forwarder
from egressguard.lab import CLONE_NEWNET, _libc
from egressguard.ruleset import learned_entries

ROOT = Path(__file__).resolve().parent.parent
POLICY = policy_mod.validate({
    "version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]},
    "dns": {"mode": "proxy", "forwarder_uid": 1002, "resolvers": ["198.51.100.53"], "ttl": {"min": 30, "max": 300}},
    "allow": [{"host": "*.example.com", "ports": [443]}, {"host": "api.test"}],
})


@pytest.fixture(autouse=True)
def _logging() -> None:
    """structlog writes to this test's stderr (an earlier test's CLI call bound it to its own, now closed)."""
    logs.configure(json_output=True)


FUZZ_EXAMPLES = int(os.environ.get("EGRESSGUARD_FUZZ_EXAMPLES", "2000"))
_FIGURES: dict[str, int] = {}


class Recorder:
    """Stands in for the kernel sets: what the forwarder asked to add, in order."""

    def __init__(self) -> None:
        self.added: list[tuple[str, str, int]] = []

    def add(self, items: Any) -> None:
        self.added += list(items)


def upstream_answering(records: dict[str, list[tuple[str, str, int]]], rcode: int = 0) -> Any:
    """An upstream that answers from `records` (name -> [(type, value, ttl)]), with `rcode`."""
    async def resolve(q: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
        r = dns.message.make_response(q)
        r.set_rcode(rcode)
        name = q.question[0].name.to_text(omit_final_dot=True).lower()
        for rdtype, value, ttl in records.get(name, []):
            owner, _, value = value.rpartition("=") if "=" in value else (name, "", value)
            r.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", rdtype, value))
        return r
    return resolve


def forwarder(resolve: Any = None, clock: Any = None) -> tuple[Forwarder, Recorder]:
    rec = Recorder()
    cfg = Config.from_policy(POLICY, ["198.51.100.53"])
    return Forwarder(cfg, rec, resolve=resolve or upstream_answering({}), **({"clock": clock} if clock else {})), rec


def ask(fwd: Forwarder, wire: bytes, tcp: bool = False) -> bytes | None:
    return asyncio.run(fwd.answer(wire, tcp, "198.51.100.2"))


def query(name: str, rdtype: str = "A", **kw: Any) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()


def assert_answer_or_drop(wire: bytes, out: bytes | None) -> None:
    """Either nothing, or a DNS response to this very query id."""
    if out is None:
        return
    assert len(out) >= 12 and out[2] & 0x80, out[:12]
    assert out[:2] == wire[:2]


# -- the policy's names ---------------------------------------------------------------------------


def test_wildcard_matches_any_depth_below_and_never_the_domain_itself() -> None:
    wild = learned_entries(POLICY)[0]
    assert wild.matches("a.example.com") and wild.matches("a.b.c.example.com")
    assert not wild.matches("example.com") and not wild.matches("badexample.com") and not wild.matches("com")


def test_allowed_name_is_forwarded_and_its_addresses_after_cnames_are_learned_clamped() -> None:
    up = upstream_answering({"www.example.com": [("CNAME", "cdn.test.", 10), ("A", "cdn.test=203.0.113.7", 5),
                                                 ("A", "other.test=203.0.113.66", 5)]})
    fwd, rec = forwarder(up)
    out = dns.message.from_wire(ask(fwd, query("WWW.Example.com")) or b"")
    assert out.rcode() == dns.rcode.NOERROR
    sets = learned_entries(POLICY)[0].sets
    assert rec.added == [(sets[4], "203.0.113.7", 30)]  # the TTL of 5 s clamped up to min; other.test not learned


def test_client_ttl_is_clamped_down_to_the_max() -> None:
    fwd, rec = forwarder(upstream_answering({"api.test": [("AAAA", "2001:db8::7", 86400)]}))
    out = dns.message.from_wire(ask(fwd, query("api.test", "AAAA")) or b"")
    assert [r.ttl for r in out.answer] == [300]
    assert rec.added == [(learned_entries(POLICY)[1].sets[6], "2001:db8::7", 300)]


@pytest.mark.parametrize("name", ["example.com", "attacker.example", "exampleXcom", "a.example.com.evil.test"])
def test_other_names_are_refused_and_never_forwarded(name: str) -> None:
    asked: list[str] = []

    async def resolve(q: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
        asked.append(str(q.question[0].name))
        raise AssertionError("forwarded")

    fwd, rec = forwarder(resolve)
    out = dns.message.from_wire(ask(fwd, query(name)) or b"")
    assert out.rcode() == dns.rcode.REFUSED and not asked and not rec.added


def test_upstream_servfail_and_nxdomain_pass_through_and_nothing_is_learned() -> None:
    for rcode in (dns.rcode.SERVFAIL, dns.rcode.NXDOMAIN):
        fwd, rec = forwarder(upstream_answering({}, rcode))
        out = dns.message.from_wire(ask(fwd, query("api.test")) or b"")
        assert out.rcode() == rcode and not rec.added


def test_upstream_timeout_is_servfail() -> None:
    async def resolve(q: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
        raise dns.exception.Timeout
    fwd, rec = forwarder(resolve)
    out = dns.message.from_wire(ask(fwd, query("api.test")) or b"")
    assert out.rcode() == dns.rcode.SERVFAIL and not rec.added


def test_kernel_refusing_the_addresses_withholds_the_answer() -> None:
    class Refusing(Recorder):
        def add(self, items: Any) -> None:
            raise RuntimeError("kernel said no")
    fwd = Forwarder(Config.from_policy(POLICY, ["198.51.100.53"]), Refusing(),
                    resolve=upstream_answering({"api.test": [("A", "203.0.113.7", 60)]}))
    out = dns.message.from_wire(ask(fwd, query("api.test")) or b"")
    assert out.rcode() == dns.rcode.SERVFAIL and not out.answer


def _answers_at_once(fwd: Forwarder, names: list[str], released: list[str]) -> list[dns.message.Message]:
    """Ask for `names` concurrently; each answer's name goes into `released` the moment it is released."""
    async def one(name: str) -> dns.message.Message:
        out = dns.message.from_wire(await fwd.answer(query(name), False, "198.51.100.2") or b"")
        released.append(name)
        return out

    async def run() -> list[dns.message.Message]:
        return list(await asyncio.gather(*(one(n) for n in names)))
    return asyncio.run(run())


NAMES = {f"n{i}.example.com": [("A", f"203.0.113.{i}", 60)] for i in range(1, 9)}


def test_answers_ready_together_share_one_commit_and_none_is_released_before_it() -> None:
    events: list[str] = []

    class Kernel(Recorder):
        def add(self, items: Any) -> None:
            events.append(f"commit {sorted(a for _, a, _ in items)}")
            super().add(items)

    fwd = Forwarder(Config.from_policy(POLICY, ["198.51.100.53"]), Kernel(), resolve=upstream_answering(NAMES))
    outs = _answers_at_once(fwd, list(NAMES), events)
    assert all(o.rcode() == dns.rcode.NOERROR and o.answer for o in outs)
    assert events[0] == f"commit {sorted(f'203.0.113.{i}' for i in range(1, 9))}"  # one commit, every address
    assert sorted(events[1:]) == sorted(NAMES)  # then the answers, none before it


def test_a_large_batch_is_committed_in_bounded_groups_each_before_its_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsproxy, "MAX_ITEMS_PER_COMMIT", 3)
    events: list[str] = []
    commits: list[list[str]] = []

    class Kernel(Recorder):
        def add(self, items: Any) -> None:
            commits.append(sorted(a for _, a, _ in items))
            events.append(f"commit {len(commits)}")
            super().add(items)

    fwd = Forwarder(Config.from_policy(POLICY, ["198.51.100.53"]), Kernel(), resolve=upstream_answering(NAMES))
    _answers_at_once(fwd, list(NAMES), events)
    assert [len(c) for c in commits] == [3, 3, 2] and sorted(sum(commits, [])) == sorted(f"203.0.113.{i}" for i in range(1, 9))
    assert events[:3] == ["commit 1", "commit 2", "commit 3"] and sorted(events[3:]) == sorted(NAMES)  # answers after


def test_a_refused_answer_in_a_batch_withholds_only_its_own_answer() -> None:
    class Kernel(Recorder):
        def add(self, items: Any) -> None:
            if any(a == "203.0.113.5" for _, a, _ in items):
                raise RuntimeError("kernel said no")
            super().add(items)

    rec = Kernel()
    fwd = Forwarder(Config.from_policy(POLICY, ["198.51.100.53"]), rec, resolve=upstream_answering(NAMES))
    released: list[str] = []
    outs = dict(zip(NAMES, _answers_at_once(fwd, list(NAMES), released), strict=True))
    assert outs.pop("n5.example.com").rcode() == dns.rcode.SERVFAIL
    assert all(o.rcode() == dns.rcode.NOERROR and o.answer for o in outs.values())
    assert sorted(a for _, a, _ in rec.added) == sorted(f"203.0.113.{i}" for i in range(1, 9) if i != 5)


# -- hostile bytes --------------------------------------------------------------------------------


# -- an address's allowed time is never shortened by a later answer --------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_shorter_answer_never_lowers_the_time_an_earlier_answer_promised() -> None:
    clock = Clock()
    up = upstream_answering({"long.example.com": [("A", "203.0.113.7", 250)],
                             "short.example.com": [("A", "203.0.113.7", 5), ("A", "203.0.113.8", 5)]})
    fwd, rec = forwarder(up, clock)
    wild = learned_entries(POLICY)[0].sets[4]
    ask(fwd, query("long.example.com"))
    clock.now += 100
    ask(fwd, query("short.example.com"))
    # 203.0.113.7 keeps the 150 s left of its 250 s; 203.0.113.8, only ever short, gets min (30 s)
    assert rec.added == [(wild, "203.0.113.7", 250), (wild, "203.0.113.7", 150), (wild, "203.0.113.8", 30)]
    clock.now += 151  # every promise has expired: the short answer's own time, and nothing remembered
    fwd.cache.clear()
    ask(fwd, query("short.example.com"))
    assert rec.added[-2:] == [(wild, "203.0.113.7", 30), (wild, "203.0.113.8", 30)]
    clock.now += 31
    fwd.batches.promises.extended([])
    assert len(fwd.batches.promises) == 0, "expired promises are kept"


def test_promises_are_bounded_and_a_dropped_one_is_never_shortened() -> None:
    clock = Clock()
    p = dnsproxy.Promises(clock, limit=4)
    p.committed([("s", f"203.0.113.{i}", 10 + i) for i in range(10)])  # .0 expires first, .9 last
    assert len(p) == 4 and p.unsure_until == clock.now + 15  # .0-.5 dropped, the latest of them at +15
    assert p.extended([("s", "203.0.113.0", 1), ("s", "203.0.113.9", 1), ("s", "203.0.113.99", 20)]) == [
        ("s", "203.0.113.0", 15), ("s", "203.0.113.9", 19), ("s", "203.0.113.99", 20)]
    for ttl in range(1, 5001):  # one address promised again and again: the heap's stale entries are dropped
        p.committed([("s", "203.0.113.9", ttl)])
    assert len(p) == 4 and len(p.heap) <= 2 * 4 + 1024
    assert p.extended([("s", "203.0.113.9", 1)]) == [("s", "203.0.113.9", 5000)]
    clock.now += 5001
    assert p.extended([("s", "203.0.113.0", 1)]) == [("s", "203.0.113.0", 1)] and len(p) == 0


class HeldRecorder(Recorder):
    """A recorder whose kernel already holds addresses (a restarted forwarder), or cannot be read."""

    def __init__(self, held: list[tuple[str, str, int]] | None) -> None:
        super().__init__()
        self._held = held

    def held(self) -> list[tuple[str, str, int]]:
        if self._held is None:
            raise OSError("the kernel sets could not be read")
        return self._held


@pytest.mark.parametrize("held,want", [([], 30), (None, 300), ("kernel", 250)], ids=["empty", "unreadable", "held"])
def test_a_restarted_forwarder_keeps_what_the_kernel_promised(held: Any, want: int) -> None:
    wild = learned_entries(POLICY)[0].sets[4]
    rec = HeldRecorder([(wild, "203.0.113.7", 250)] if held == "kernel" else held)
    cfg = Config.from_policy(POLICY, ["198.51.100.53"])
    fwd = Forwarder(cfg, rec, resolve=upstream_answering({"short.example.com": [("A", "203.0.113.7", 5)]}))
    ask(fwd, query("short.example.com"))
    assert rec.added == [(wild, "203.0.113.7", want)]  # unreadable: dns.ttl.max, never less than any promise



@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_get_an_answer_or_nothing(wire: bytes) -> None:
    _FIGURES["random"] = _FIGURES.get("random", 0) + 1
    fwd, _ = forwarder()
    assert_answer_or_drop(wire, ask(fwd, wire))


_VALID = [query("api.test"), query("a.example.com", "AAAA", use_edns=0, payload=4096),
          query("x.example.com", "TXT", want_dnssec=True), query("refused.test", "ANY")]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=8),
       st.integers(0, 200))
def test_mutated_and_truncated_queries_get_an_answer_or_nothing(base: bytes, flips: list[tuple[int, int]],
                                                                cut: int) -> None:
    _FIGURES["mutated"] = _FIGURES.get("mutated", 0) + 1
    wire = bytearray(base)
    for at, value in flips:
        if at < len(wire):
            wire[at] = value
    wire = wire[: max(0, len(wire) - cut)] if cut < len(wire) else wire
    fwd, _ = forwarder(upstream_answering({"api.test": [("A", "203.0.113.7", 60)]}))
    assert_answer_or_drop(bytes(wire), ask(fwd, bytes(wire)))


@settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=6)
       .filter(lambda labels: sum(len(label) + 1 for label in labels) < 255))  # a name is at most 255 octets
def test_names_with_odd_bytes_are_refused_unless_below_an_allowed_domain(labels: list[bytes]) -> None:
    _FIGURES["odd names"] = _FIGURES.get("odd names", 0) + 1
    name = dns.name.Name([*labels, b""])
    fwd, rec = forwarder(upstream_answering({}))
    wire = dns.message.make_query(name, "A").to_wire()
    out = dns.message.from_wire(ask(fwd, wire) or b"")
    assert out.rcode() == dns.rcode.REFUSED  # none of these is below example.com or is api.test
    assert not rec.added


@settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=300)), max_size=6))
def test_edns_options_are_never_echoed(options: list[tuple[int, bytes]]) -> None:
    _FIGURES["edns"] = _FIGURES.get("edns", 0) + 1
    opts = [dns.edns.GenericOption(code, data) for code, data in options]
    wire = dns.message.make_query("attacker.example", "A", use_edns=0, options=opts).to_wire()
    fwd, _ = forwarder()
    out = ask(fwd, wire)
    assert out is not None
    for _, data in options:
        if len(data) >= 8:
            assert data not in out


def test_compression_loop_is_formerr_not_a_hang() -> None:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for name in (b"\xc0\x0c", b"\x01a\xc0\x0c", b"\xc0\x0e\xc0\x0c"):  # points at itself / back into itself
        out = ask(forwarder()[0], header + name + b"\x00\x01\x00\x01")
        assert out is not None and out[:2] == b"\x12\x34" and out[3] & 0xF == dns.rcode.FORMERR


def test_every_qtype_is_answered() -> None:
    fwd, _ = forwarder(upstream_answering({}))
    codes = set()
    for qtype in range(65536):
        wire = bytearray(query("api.test" if qtype % 2 else "refused.test"))
        wire[-4:-2] = struct.pack("!H", qtype)
        out = ask(fwd, bytes(wire))
        assert out is not None, qtype
        codes.add(out[3] & 0xF)
    _FIGURES["qtypes"] = 65536
    assert codes <= {dns.rcode.NOERROR, dns.rcode.REFUSED, dns.rcode.FORMERR}


def test_responses_multiple_questions_and_other_opcodes() -> None:
    fwd, _ = forwarder()
    resp = dns.message.make_response(dns.message.make_query("api.test", "A")).to_wire()
    assert ask(fwd, resp) is None  # never answers an answer (no reflection loops)
    two = dns.message.make_query("api.test", "A")
    two.question.append(dns.message.make_query("b.test", "A").question[0])
    assert dns.message.from_wire(ask(fwd, two.to_wire()) or b"").rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query("api.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(ask(fwd, notify.to_wire()) or b"").rcode() == dns.rcode.NOTIMP


def test_oversized_udp_queries_are_dropped() -> None:
    wire = query("api.test") + b"\0" * dnsproxy.MAX_UDP_QUERY
    fwd, _ = forwarder()
    assert ask(fwd, wire) is None and fwd.stats.dropped == 1


def test_large_answers_are_truncated_for_udp_clients() -> None:
    many = [("A", f"203.0.113.{i}", 60) for i in range(1, 200)]
    fwd, _ = forwarder(upstream_answering({"api.test": many}))
    out = ask(fwd, query("api.test"))
    assert out is not None and len(out) <= 512 and dns.message.from_wire(out).flags & dns.flags.TC
    full = ask(fwd, query("api.test"), tcp=True)
    assert full is not None and len(dns.message.from_wire(full).answer[0]) == 199


# -- bounds ---------------------------------------------------------------------------------------


def test_rate_limit_per_client_and_bounded_client_table() -> None:
    now = [0.0]
    fwd, _ = forwarder(clock=lambda: now[0])
    admitted = sum(fwd.admit("198.51.100.2") for _ in range(5000))
    assert admitted == int(dnsproxy.RATE_BURST)
    now[0] += 0.1
    assert sum(fwd.admit("198.51.100.2") for _ in range(1000)) == int(0.1 * dnsproxy.RATE_PER_CLIENT)
    for i in range(3 * dnsproxy.MAX_CLIENTS):
        fwd.admit(f"client-{i}")
    assert len(fwd.clients) == dnsproxy.MAX_CLIENTS


def test_queries_in_flight_are_bounded() -> None:
    gate = asyncio.Event()

    async def slow(q: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
        await gate.wait()
        return dns.message.make_response(q)

    async def run() -> tuple[int, int]:
        fwd, _ = forwarder(slow)
        tasks = []
        for i in range(dnsproxy.MAX_INFLIGHT + 100):
            if fwd.admit(f"c{i}"):
                tasks.append(asyncio.create_task(fwd.answer(query("api.test"), False, f"c{i}")))
            await asyncio.sleep(0)
        peak = fwd.inflight
        gate.set()
        await asyncio.gather(*tasks)
        return peak, fwd.stats.dropped

    peak, dropped = asyncio.run(run())
    assert peak == dnsproxy.MAX_INFLIGHT and dropped == 100


# -- TCP, for real, in a namespace of its own --------------------------------------------------------


def _in_fresh_netns(fn: Any) -> Any:
    """Run `fn()` in a forked child inside a new network namespace (loopback up); its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            from pyroute2 import IPRoute  # noqa: PLC0415

            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            out = json.dumps({"ok": fn()})
        except BaseException as exc:  # noqa: BLE001
            out = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            try:
                os.write(w, out.encode())
            finally:
                os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        data = json.loads(fh.read() or '{"error": "child died"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data["error"]
    return data["ok"]


def _tcp_hostile() -> dict[str, Any]:
    dnsproxy.TCP_IDLE_S = 2.0  # a stalled client is dropped after this (the trickle below takes ~0.6 s)
    cfg = Config.from_policy(POLICY, ["127.0.0.1"])
    cfg.port = 5353
    result: dict[str, Any] = {}

    async def scenario() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        server = asyncio.create_task(dnsproxy.serve(cfg, Recorder(), ready.set, stop))
        await ready.wait()
        wire = query("refused.test")
        framed = struct.pack("!H", len(wire)) + wire

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", cfg.port)

        async def closed(reader: asyncio.StreamReader, within: float) -> bool:
            """The forwarder closed (or reset) the connection within `within` seconds."""
            try:
                return await asyncio.wait_for(reader.read(), within) == b""
            except ConnectionResetError:
                return True

        # one byte at a time, 20 ms apart: answered
        reader, writer = await connect()
        for b in framed:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.02)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        result["byte_at_a_time"] = dns.rcode.to_text(dns.message.from_wire(await reader.readexactly(length)).rcode())
        writer.close()
        # stalled half-way: closed by the forwarder
        reader, writer = await connect()
        writer.write(framed[:5])
        started = time.monotonic()
        result["stalled_closed"] = await closed(reader, 5)
        result["stalled_after_s"] = round(time.monotonic() - started, 2)
        writer.close()
        # more connections than the bound: the extra ones are closed at once
        held = [await connect() for _ in range(dnsproxy.MAX_TCP_CONNECTIONS)]
        await asyncio.sleep(0.05)
        extra_r, extra_w = await connect()
        result["extra_closed"] = await closed(extra_r, 2)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _, w in held:  # each sends a length of 65535 and a trickle, then stalls
            w.write(b"\xff\xff" + b"x" * 1000)
        await asyncio.sleep(TCP_WAIT)
        result["held_closed"] = sum([await closed(r, 5) for r, _ in held])
        result["rss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        stop.set()
        await server

    asyncio.run(scenario())
    return result


TCP_WAIT = 2.2


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace)")
def test_tcp_clients_that_trickle_stall_or_crowd_are_bounded() -> None:
    got = _in_fresh_netns(_tcp_hostile)
    assert got["byte_at_a_time"] == "REFUSED"
    assert got["stalled_closed"] and got["stalled_after_s"] < 5
    assert got["extra_closed"]
    assert got["held_closed"] == dnsproxy.MAX_TCP_CONNECTIONS
    assert got["rss_growth_kb"] < 16 * 1024, got


# -- the plan -------------------------------------------------------------------------------------


def test_proxy_plan_matches_golden_file(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert cli.main(["plan", "--backend", "nftables", "--policy", "tests/golden/proxy/dns-proxy.yaml"]) == 0
    assert_matches_golden(ROOT / "tests/golden/proxy/dns-proxy.nft", capsys.readouterr().out, "nft plan differs from")


def test_proxy_plan_on_iptables_matches_golden_file(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """iptables: learned sets are ipsets with timeouts; each entry marks (CONNMARK) and allows."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["plan", "--backend", "iptables", "--policy", "tests/golden/proxy/dns-proxy.yaml"]) == 0
    assert_matches_golden(ROOT / "tests/golden/proxy/dns-proxy.rules", capsys.readouterr().out, "iptables plan differs from")


@pytest.fixture(scope="module", autouse=True)
def _fuzz_figure(figures: list[str]) -> Any:
    """After the module: how many inputs the fuzz tests tried (printed with the suite's figures)."""
    yield
    if _FIGURES:
        total = sum(_FIGURES.values())
        figures.append("dns forwarder fuzz: " + ", ".join(f"{k} {v}" for k, v in _FIGURES.items()) + f" (total {total})")


# -- policy ---------------------------------------------------------------------------------------

_BASE = {"version": 1, "confine": {"uids": [1000]}, "exempt": {"uids": [1001, 1002]}}
_PROXY = {"mode": "proxy", "forwarder_uid": 1002}


@pytest.mark.parametrize("extra,message", [
    ({"allow": [{"host": "*.example.com"}]}, "allow[0].host: '*.example.com': wildcards need dns.mode: proxy"),
    ({"dns": {"mode": "proxy"}}, "dns.forwarder_uid: dns.mode proxy needs the uid `egressguard dns` runs as"),
    ({"dns": {**_PROXY, "forwarder_uid": 1000}}, "dns.forwarder_uid: uid 1000 must be a non-root uid listed in exempt.uids"),
    ({"dns": {**_PROXY, "ttl": {"min": 60, "max": 30}}}, "dns.ttl: min (60) is larger than max (30)"),
    ({"dns": {**_PROXY, "ttl": {"min": 0}}}, "dns.ttl.min: Input should be greater than or equal to 1"),
    ({"dns": {**_PROXY, "ttl": {"max": 86401}}}, "dns.ttl.max: Input should be less than or equal to 86400"),
    ({"dns": {"mode": "forward"}}, "dns.mode: Input should be 'static' or 'proxy'"),
    ({"dns": _PROXY, "allow": [{"host": "*.com"}]}, "allow[0].host: '*.com': a wildcard over a top-level domain"),
    ({"dns": _PROXY, "allow": [{"host": "a.*.example.com"}]}, "allow[0].host: 'a.*.example.com' is not a valid DNS name"),
    ({"dns": _PROXY, "deny": [{"host": "example.com"}]}, "deny[0].host: dns.mode proxy learns allowed names only"),
    ({"dns": _PROXY, "allow": [{"host": "a.test", "optional": True}]}, "allow[0].optional: has no meaning in dns.mode proxy"),
    ({"dns": _PROXY, "redirect": [{"ports": [53], "to_port": 8444}]}, "redirect[0].ports: port 53"),
    ({"dns": _PROXY, "redirect": [{"ports": [80], "to_port": 1053}]}, "redirect[0].to_port: port 1053 is dns.forwarder_port"),
])
def test_bad_dns_settings_are_one_line_errors(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(policy_mod.PolicyError) as err:
        policy_mod.validate({**_BASE, **extra})
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_static_policy_digest_is_unchanged_by_the_new_dns_fields() -> None:
    """(examples/kubernetes/pod.yaml pins a digest computed before dns.mode existed: tests/test_k8s_manifest.py)"""
    pol = policy_mod.validate({**_BASE, "dns": {"resolvers": "auto"}})
    explicit = policy_mod.validate({**_BASE, "dns": {"resolvers": "auto", "mode": "static"}})
    assert policy_mod.digest(pol) == policy_mod.digest(explicit)
    assert policy_mod.digest(pol) != policy_mod.digest(policy_mod.validate({**_BASE, "dns": _PROXY}))


def test_repeated_questions_are_answered_from_cache_while_the_kernel_holds_the_addresses() -> None:
    now = [100.0]
    calls: list[str] = []
    up = upstream_answering({"api.test": [("A", "203.0.113.7", 60)]})

    async def counting(q: dns.message.Message, server: str, tcp: bool) -> dns.message.Message:
        calls.append(str(q.question[0].name))
        return await up(q, server, tcp)  # type: ignore[no-any-return]

    fwd, rec = forwarder(counting, clock=lambda: now[0])
    first = dns.message.from_wire(ask(fwd, query("api.test")) or b"")
    now[0] += 20
    second = dns.message.from_wire(ask(fwd, query("API.test")) or b"")
    assert len(calls) == 1 and len(rec.added) == 1  # answered from the cache, nothing committed again
    # 60 - 20 s, less the second the cache keeps short of the kernel's expiry
    assert [r.ttl for r in first.answer] == [60] and [r.ttl for r in second.answer] == [39]
    assert [str(r[0]) for r in second.answer] == ["203.0.113.7"]
    now[0] += 39  # within a second of the kernel's expiry: asked and committed again
    ask(fwd, query("api.test"))
    assert len(calls) == 2 and len(rec.added) == 2


def test_explain_says_proxy_hosts_are_learned_at_run_time(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert cli.main(["explain", "--policy", "tests/golden/proxy/dns-proxy.yaml", "--uid", "1000", "198.18.0.1:443"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("refuse (reject): default")
    assert "host pypi.org: dns.mode proxy learns its addresses at run time" in out
