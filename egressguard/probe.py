"""`egressguard probe`: the unprivileged self-check of an agent container. Is egress from here guarded?"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import selectors
import socket
import time
from pathlib import Path
from typing import NamedTuple

from egressguard import logs
from egressguard import status as status_mod
from egressguard.errors import PolicyError, ProbeFailed

log = logs.get_logger("egressguard")

# Documentation addresses (RFC 5737, RFC 3849), discard port: no sane policy allows them.
DEFAULT_TARGETS = ("192.0.2.1:9", "[2001:db8::1]:9")
TIMEOUT_S = 1.0
CAP_NET_ADMIN = 12


# NamedTuples, not dataclasses: `dataclasses` imports `inspect` (~6 ms), a tenth of the probe's budget.
class Target(NamedTuple):
    """An address:port the confined identity must not reach."""

    text: str
    family: socket.AddressFamily
    address: str
    port: int


class Attempt(NamedTuple):
    """How one connection attempt ended: `connected` means egress is open."""

    target: Target
    outcome: str  # connected | refused (an errno name) | timeout
    ms: float

    @property
    def connected(self) -> bool:
        return self.outcome == "connected"


def main(args: argparse.Namespace) -> int:
    targets = [parse_target(t) for t in _targets(args.target)]
    expect = args.expect_digest or os.environ.get("EGRESSGUARD_EXPECT_DIGEST") or None
    timeout = _timeout()
    problems = status_problems(args.status_file, expect) + capability_problems(_proc_status())
    attempts = connect_all(targets, timeout)
    problems += [f"{a.target.text} is reachable (connected in {a.ms:.0f} ms)" for a in attempts if a.connected]
    facts = {"guarded": not problems, "uid": os.getuid(), "attempts": {a.target.text: a.outcome for a in attempts},
             "expect_digest": expect}
    if problems:
        log.info("probe_finished", **facts)
        raise ProbeFailed("egress is NOT guarded: " + "; ".join(problems))
    # A pass logs its event only under --verbose: importing structlog would be a third of the probe's
    # time (bench/RESULTS.md), and the line below says the same to whoever reads the agent's output.
    log.debug("probe_finished", **facts)
    print(f"guarded: uid {os.getuid()} cannot reach "
          f"{', '.join(f'{a.target.text} ({a.outcome})' for a in attempts)}; policy in force per {args.status_file}")
    return 0


def _targets(given: list[str] | None) -> list[str]:
    if given:
        return given
    env = os.environ.get("EGRESSGUARD_PROBE_TARGETS", "").replace(",", " ").split()
    return env or list(DEFAULT_TARGETS)


def _timeout() -> float:
    raw = os.environ.get("EGRESSGUARD_PROBE_TIMEOUT", "")
    try:
        value = float(raw) if raw else TIMEOUT_S
    except ValueError:
        raise PolicyError(f"usage error: EGRESSGUARD_PROBE_TIMEOUT={raw!r} is not a number of seconds") from None
    if not 0 < value <= 30:
        raise PolicyError("usage error: EGRESSGUARD_PROBE_TIMEOUT must be between 0 and 30 seconds")
    return value


def parse_target(text: str) -> Target:
    """`ADDR:PORT` or `[IPV6]:PORT`; addresses only, so the probe itself needs no DNS."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(host)
        port_no = int(port)
        if not sep or not 1 <= port_no <= 65535:
            raise ValueError
    except ValueError:
        raise PolicyError(f"usage error: probe target {text!r}: expected ADDR:PORT or [IPV6]:PORT") from None
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return Target(text=text, family=family, address=str(addr), port=port_no)


def connect_all(targets: list[Target], timeout: float) -> list[Attempt]:
    """Try every target at once (TCP), each for at most `timeout` seconds."""
    sel = selectors.DefaultSelector()
    started = time.monotonic()
    done: dict[int, Attempt] = {}
    socks: list[socket.socket] = []
    try:
        for i, t in enumerate(targets):
            try:
                s = socket.socket(t.family, socket.SOCK_STREAM)
            except OSError as exc:  # e.g. no IPv6 in this kernel: nothing can leave that way
                done[i] = Attempt(t, errno.errorcode.get(exc.errno or 0, "error"), 0.0)
                continue
            socks.append(s)
            s.setblocking(False)
            err = s.connect_ex((t.address, t.port))
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                sel.register(s, selectors.EVENT_WRITE, i)
            else:
                done[i] = Attempt(t, "connected" if err == 0 else errno.errorcode.get(err, str(err)), _ms(started))
        while len(done) < len(targets):
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                break
            for key, _ in sel.select(left):
                i = key.data
                err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[union-attr]
                done[i] = Attempt(targets[i], "connected" if err == 0 else errno.errorcode.get(err, str(err)), _ms(started))
                sel.unregister(key.fileobj)
    finally:
        sel.close()
        for s in socks:
            s.close()
    return [done.get(i) or Attempt(t, "timeout", _ms(started)) for i, t in enumerate(targets)]


def status_problems(path: Path, expect_digest: str | None) -> list[str]:
    """The status file must show a policy applied in this very network namespace (and the expected one)."""
    st = status_mod.read(path)
    if st is None:
        return [f"no readable status file at {path} (no egressguard apply ran for this pod/container)"]
    problems = []
    if st.get("state") != "policy" or st.get("exit_code") != 0:
        problems.append(f"the last apply left state={st.get('state')!r} exit_code={st.get('exit_code')!r} "
                        f"({st.get('error') or 'no error recorded'})")
    here = _netns()
    if st.get("netns") and here and st["netns"] != here:
        problems.append(f"the status file was written in network namespace {st['netns']}, this is {here}")
    if expect_digest and st.get("policy_digest") != expect_digest:
        problems.append(f"policy digest {st.get('policy_digest')} is not the expected {expect_digest}")
    if st.get("dns_mode") == "proxy":
        from egressguard.dnsproxy import probe_forwarder  # noqa: PLC0415 - dnspython only in proxy mode

        why = probe_forwarder()
        if why:
            problems.append(f"dns.mode proxy: {why}")
    return problems


def capability_problems(proc_status: dict[str, str]) -> list[str]:
    """A process that holds (or can regain) CAP_NET_ADMIN could undo the guard."""
    def has(key: str, cap: int) -> bool:
        return bool(int(proc_status.get(key, "0"), 16) >> cap & 1)

    held = [key for key in ("CapEff", "CapPrm", "CapAmb") if has(key, CAP_NET_ADMIN)]
    if held:
        return [f"this process holds CAP_NET_ADMIN ({', '.join(held)}): it could remove the guard"]
    if has("CapBnd", CAP_NET_ADMIN) and proc_status.get("NoNewPrivs") != "1":
        return ["CAP_NET_ADMIN is in the bounding set and no_new_privs is off: a setuid or "
                "file-capability program could regain it (drop ALL capabilities)"]
    return []


def _proc_status() -> dict[str, str]:
    out: dict[str, str] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _netns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000

