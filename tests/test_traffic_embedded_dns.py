"""Docker's embedded DNS through the guard: `nameserver 127.0.0.11` in resolv.conf, reached through
Docker's own DNAT rules to a resolver on a random local port. With `dns.resolvers: auto` and
`loopback: deny`, confined queries to 127.0.0.11:53 are answered (the rule matches the connection's
original destination, before the DNAT), while the resolver's real port stays closed to them."""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from egtraffic import FAST, applied, dns_answered, policy, stopped

from egressguard.lab import EXEMPT, RESOLVER_V4, Lab, _dns_answer, _serve_dns_tcp

pytestmark = pytest.mark.netns

EMBEDDED = "127.0.0.11"
UDP_PORT, TCP_PORT = 52345, 41234  # what Docker's DNAT rules point at (ports as dockerd picks them)
DOCKER_NAT = [
    ("-t", "nat", "-N", "DOCKER_OUTPUT"),
    ("-t", "nat", "-N", "DOCKER_POSTROUTING"),
    ("-t", "nat", "-A", "OUTPUT", "-d", "127.0.0.11/32", "-j", "DOCKER_OUTPUT"),
    ("-t", "nat", "-A", "POSTROUTING", "-d", "127.0.0.11/32", "-j", "DOCKER_POSTROUTING"),
    ("-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "tcp", "--dport", "53",
     "-j", "DNAT", "--to-destination", f"127.0.0.11:{TCP_PORT}"),
    ("-t", "nat", "-A", "DOCKER_OUTPUT", "-d", "127.0.0.11/32", "-p", "udp", "--dport", "53",
     "-j", "DNAT", "--to-destination", f"127.0.0.11:{UDP_PORT}"),
    ("-t", "nat", "-A", "DOCKER_POSTROUTING", "-s", "127.0.0.11/32", "-p", "tcp", "--sport", str(TCP_PORT),
     "-j", "SNAT", "--to-source", ":53"),
    ("-t", "nat", "-A", "DOCKER_POSTROUTING", "-s", "127.0.0.11/32", "-p", "udp", "--sport", str(UDP_PORT),
     "-j", "SNAT", "--to-source", ":53"),
]


def _serve_embedded_dns(records_file: str, ready_fd: int) -> None:
    """dockerd's resolver, as seen from inside the container: UDP and TCP DNS on 127.0.0.11."""
    sel = selectors.DefaultSelector()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((EMBEDDED, UDP_PORT))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((EMBEDDED, TCP_PORT))
    tcp.listen(16)
    sel.register(udp, selectors.EVENT_READ)
    sel.register(tcp, selectors.EVENT_READ)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            if key.fileobj is udp:
                data, peer = udp.recvfrom(4096)
                out = _dns_answer(data, records_file)
                if out:
                    udp.sendto(out, peer)
            else:
                conn, _ = tcp.accept()
                conn.settimeout(1.0)
                _serve_dns_tcp(conn, records_file)


@pytest.fixture(scope="module")
def docker_like() -> Iterator[Lab]:
    with Lab(iface="tap-0123456789a") as lab:  # not eth0: the guard must not depend on it
        for rule in DOCKER_NAT:
            done = lab.in_pod("iptables-legacy", "-w", *rule)
            assert done.returncode == 0, done.stderr
        lab._fork_server(lab.pod, "embedded DNS", _serve_embedded_dns, str(lab.records_file))
        Path(f"/etc/netns/{lab.pod}/resolv.conf").write_text(f"nameserver {EMBEDDED}\noptions ndots:0\n")
        applied(lab, policy(loopback="deny", dns={"resolvers": "auto"}))
        yield lab


def _dig(lab: Lab, uid: int, server: str, port: int = 53, tcp: bool = False) -> str:
    argv = ["dig", "+short", "+time=1", "+tries=1", "-p", str(port), f"@{server}", "allowed.test", "A"]
    res = lab.exec_as(argv + (["+tcp"] if tcp else []), uid=uid, timeout=5)
    return str(res.answer or "").strip() if res.ok else ""


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_confined_queries_to_docker_embedded_dns_are_answered(docker_like: Lab, tcp: bool) -> None:
    res = docker_like.dns("allowed.test", EMBEDDED, tcp=tcp, timeout=FAST)
    assert dns_answered(res) and res.answer == ["203.0.113.10"], res


@pytest.mark.parametrize(("tcp", "port"), [(False, UDP_PORT), (True, TCP_PORT)], ids=["udp", "tcp"])
def test_the_embedded_resolvers_real_port_stays_closed_to_confined_uids(docker_like: Lab, tcp: bool, port: int) -> None:
    assert _dig(docker_like, EXEMPT, EMBEDDED, port, tcp) == "203.0.113.10"  # control: it answers there
    assert _dig(docker_like, 1000, EMBEDDED, port, tcp) == ""


def test_a_resolver_not_in_resolv_conf_is_refused(docker_like: Lab) -> None:
    stopped(docker_like, "dns", "allowed.test", RESOLVER_V4)  # the exempt uid's same query is answered


def test_the_status_file_names_the_embedded_resolver(docker_like: Lab) -> None:
    import json  # noqa: PLC0415

    status = json.loads(docker_like.status_file.read_text())
    assert status["resolvers"] == [EMBEDDED]
