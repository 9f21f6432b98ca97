"""`loopback` as a port list holds for UDP as for TCP: a listed local port answers confined
datagrams, another local port does not (the exempt uid reaches both: control), IPv4 and IPv6."""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Iterator

import pytest
from egtraffic import FAST, applied, policy

from egressguard.lab import EXEMPT, Lab

pytestmark = pytest.mark.netns

LISTED, UNLISTED = 8443, 7000
LOCAL = {4: "127.0.0.1", 6: "::1"}


def _serve_udp_echo(ports: tuple[int, ...], ready_fd: int) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        sel.register(s, selectors.EVENT_READ, port)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data, peer = sock.recvfrom(512)
            sock.sendto(b"pod udp %d " % key.data + data, peer)


@pytest.fixture(scope="module")
def udp_lab() -> Iterator[Lab]:
    with Lab(iface="veth1a2b3c4d") as lab:  # not eth0: the guard must not depend on it
        lab._fork_server(lab.pod, "pod UDP echo", _serve_udp_echo, (LISTED, UNLISTED))
        applied(lab, policy(loopback=[LISTED]))
        yield lab


def _answered(lab: Lab, host: str, port: int, uid: int) -> bool:
    res = lab.udp(host, port, uid=uid, timeout=FAST)
    return res.ok and str(res.answer).startswith(f"pod udp {port} ")


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_a_listed_local_udp_port_answers_confined_datagrams(udp_lab: Lab, family: int) -> None:
    assert _answered(udp_lab, LOCAL[family], LISTED, 1000)


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_an_unlisted_local_udp_port_gets_no_confined_datagram(udp_lab: Lab, family: int) -> None:
    assert _answered(udp_lab, LOCAL[family], UNLISTED, EXEMPT)  # control: the server is there
    res = udp_lab.udp(LOCAL[family], UNLISTED, timeout=FAST)
    assert res.blocked and res.outcome != "timeout", res  # refused at once (action: reject), not lost
