"""The policy: its records (egressguard.records), loading from a file or the environment, and its digest."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from egressguard import records
from egressguard.canonical import json_sha256
from egressguard.errors import PolicyError
from egressguard.records import Bool, Either, Int, Invalid, ListOf, Located, Nested, Nullable, OneOf, Record, Str, field

# Where the Docker entrypoint and `apply` look when no policy is given explicitly.
DEFAULT_POLICY_PATH = Path("/etc/egressguard/policy.yaml")
# A policy file larger than this is refused before parsing (large lists belong in allow_file).
MAX_POLICY_BYTES = 4 * 1024 * 1024
# Entries per list, counted after allow_file/deny_file expansion.
MAX_ENTRIES = 100_000
# An allow_file/deny_file larger than this is refused (100,000 IPv6 networks fit comfortably).
MAX_LIST_FILE_BYTES = 8 * 1024 * 1024
# Addresses one `host` may resolve to unless dns.max_addresses_per_host says otherwise.
DEFAULT_MAX_ADDRESSES_PER_HOST = 64

# Cloud metadata endpoints refused by `deny_metadata: true`, whatever `allow` says.
METADATA_CIDRS: tuple[str, ...] = (
    "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean IMDS
    "169.254.170.2/32",  # AWS ECS task metadata
    "100.100.100.200/32",  # Alibaba Cloud
    "fd00:ec2::254/128",  # AWS IMDS over IPv6
)

PORT = Int(ge=1, le=65535, description="A TCP/UDP port, 1-65535")
UID = Int(ge=0, le=4294967294, description="A numeric user id")
_PROTOCOLS = OneOf("tcp", "udp", "icmp", "any")
# uids per confine/exempt list: each is a rule in every family's dispatch chain.
MAX_UIDS = 1024

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# dns.mode proxy: the forwarder's port on loopback (unprivileged: the forwarder holds no
# CAP_NET_BIND_SERVICE) and how long a learned address may stay allowed at most (one day).
DEFAULT_FORWARDER_PORT = 1053
MAX_LEARNED_TTL = 86_400


def _unusable(value: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """Why a syntactically valid network cannot work as a rule destination (None: it can)."""
    if "%" in value:
        return f"{value!r}: a zone index (%...) cannot be used in a rule"
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_V4_MAPPED):
        # the kernel sends connections to ::ffff:a.b.c.d as IPv4: an IPv6 rule for them never matches
        return f"{value!r} is an IPv4-mapped IPv6 network: write it as IPv4"
    return None


_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _network(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string such as 203.0.113.0/24 or 2001:db8::/32")
    try:
        net = ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 network ({exc})") from None
    why = _unusable(value, net)
    if why:
        raise ValueError(why)
    return str(net)


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string IP address")
    try:
        addr = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 address") from None
    why = _unusable(value, ipaddress.ip_network(addr))
    if why:
        raise ValueError(why)
    return str(addr)


def _hostname(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a DNS name")
    name = value.strip().rstrip(".").lower()
    if name.startswith("*."):
        # A wildcard (dns.mode proxy only, checked with the whole policy): `*` is the whole first
        # label, and what follows it must be a name of two labels or more (not a top-level domain).
        rest = _hostname(name[2:])
        if "." not in rest:
            raise ValueError(f"{value!r}: a wildcard over a top-level domain; name at least two labels after `*.`")
        return "*." + rest
    if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{value!r} is not a valid DNS name (ASCII letters, digits, '-' and '.')")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ValueError(f"{value!r} is an address: use `cidr` for addresses")


# Prefix lengths as canonical text ("0" to "32" / "128"); any other spelling takes the full parse.
_PREFIXES = {32: {str(n): n for n in range(33)}, 128: {str(n): n for n in range(129)}}


def canonical_network(item: str) -> str | None:
    """`item` with its prefix length, if it is a usable network already written the way
    `ipaddress.ip_network(item, strict=True)` prints it (no leading zeros, lower-case, `::`
    where it prints it, no host bits). None: anything else, valid or not, for `ipaddress` to judge.

    A list generated by a tool is nearly all such lines: this takes a few microseconds where
    building an `ipaddress` object takes tens. Accepting only text that `inet_ntop` prints back
    unchanged keeps it a strict subset of what `ipaddress` accepts, with the same result.
    """
    addr, slash, plen = item.partition("/")
    af, bits = (socket.AF_INET6, 128) if ":" in addr else (socket.AF_INET, 32)
    try:
        packed = socket.inet_pton(af, addr)
    except (OSError, ValueError):  # ValueError: an embedded NUL or a lone surrogate
        return None
    if socket.inet_ntop(af, packed) != addr:
        return None
    if bits == 128 and not any(packed[:10]):
        # ::/80 holds the IPv4-mapped and IPv4-compatible forms, which inet_ntop and ipaddress
        # print differently (and mapped networks are refused): the full parse decides.
        return None
    n = _PREFIXES[bits].get(plen) if slash else bits
    if n is None or int.from_bytes(packed, "big") & ((1 << (bits - n)) - 1):
        return None  # host bits set: the full parse words the refusal
    return item if slash else f"{item}/{bits}"


def read_network_list(path: Path) -> tuple[str, ...]:
    """The networks in an allow_file/deny_file: one network or address per line, `#` comments.

    Bad lines are reported by number (the first three, and how many more), so a 10,000-line
    provider list can be fixed from the message alone.
    """
    text = _read_text(path, MAX_LIST_FILE_BYTES, "")
    nets: list[str] = []
    bad: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        fast = canonical_network(item)
        if fast is not None:
            nets.append(fast)
            continue
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            bad.append(f"{path}:{lineno}: {item!r} is not a network or address ({exc})")
            continue
        why = _unusable(item, net)
        if why:
            bad.append(f"{path}:{lineno}: {why}")
            continue
        nets.append(str(net))
    if bad:
        more = f" (and {len(bad) - 3} more bad lines)" if len(bad) > 3 else ""
        raise ValueError("; ".join(bad[:3]) + more)
    if len(nets) > MAX_ENTRIES:
        raise ValueError(f"{path}: {len(nets)} networks, more than {MAX_ENTRIES}")
    return tuple(dict.fromkeys(nets))


class _Entry(Record):
    """One destination: a network (`cidr`), a DNS name (`host`) or a file of networks
    (`allow_file`/`deny_file`), optionally narrowed by ports/protocol."""

    cidr: str | None = field(Nullable(Str()), default=None, before=lambda v: None if v is None else _network(v),
                             description="IPv4 or IPv6 network, e.g. 203.0.113.0/24 or 2001:db8::/32")
    host: str | None = field(Nullable(Str()), default=None, before=lambda v: None if v is None else _hostname(v),
                             description="DNS name, resolved (A and AAAA) at apply time")
    ports: list[int] | None = field(Nullable(ListOf(PORT, min_length=1)), default=None,
                                    description="Destination ports; omit for every port")
    optional: bool = field(Bool(), default=False, description="host only: a name that does not resolve is skipped, not an error")
    protocol: str = field(_PROTOCOLS, default="tcp")  # each kind of entry sets its own default

    _file_key: ClassVar[str] = "allow_file"  # the key naming this entry's list file
    _file_networks: ClassVar[tuple[str, ...]] = ()  # set per entry that names a file, by check()

    def check(self, ctx: Mapping[str, Any]) -> None:
        given = [k for k in ("cidr", "host", self._file_key) if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of `cidr`, `host` or `{self._file_key}`")
        if self.ports is not None and self.protocol not in ("tcp", "udp"):
            raise ValueError(f"`ports` needs protocol tcp or udp, not {self.protocol}")
        if self.optional and self.host is None:
            raise ValueError("`optional` applies to `host` entries only")
        if self.file is not None:
            base = ctx.get("base_dir") or Path.cwd()
            object.__setattr__(self, "_file_networks", read_network_list(Path(base) / self.file))

    @property
    def file(self) -> str | None:
        value = getattr(self, self._file_key, None)
        return value if isinstance(value, str) else None

    @property
    def networks(self) -> tuple[str, ...]:
        """The networks this entry names by itself (a host's come from resolution)."""
        if self.cidr is not None:
            return (self.cidr,)
        return self._file_networks

    @property
    def label(self) -> str:
        return self.cidr or self.host or self.file or ""


_FILE_HELP = "file of networks, one per line, # comments; relative to the policy file's directory"


class AllowEntry(_Entry):
    """A destination confined processes may reach."""

    protocol: str = field(_PROTOCOLS, default="tcp", description="tcp (default), udp, icmp or any")
    allow_file: str | None = field(Nullable(Str(min_length=1)), default=None, description=_FILE_HELP)


class DenyEntry(_Entry):
    """A destination refused even when an `allow` covers it."""

    protocol: str = field(_PROTOCOLS, default="any", description="any (default), tcp, udp or icmp")
    deny_file: str | None = field(Nullable(Str(min_length=1)), default=None, description=_FILE_HELP)
    _file_key: ClassVar[str] = "deny_file"


def _some_uids(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise ValueError("an empty list confines nobody: list uids or use 'all'")
    return v


class Confine(Record):
    """Whose traffic is restricted."""

    uids: list[int] | Literal["all"] = field(
        Either(ListOf(UID, max_length=MAX_UIDS), OneOf("all")), default="all", after=_some_uids,
        description="uids whose egress is restricted, or 'all' for every process except `exempt`",
    )


class Exempt(Record):
    """Who is never restricted."""

    uids: list[int] = field(ListOf(UID, max_length=MAX_UIDS), default_factory=list,
                            description="uids never restricted; root only if listed")


class Ttl(Record):
    """dns.mode proxy: how long a learned address stays allowed, the answer's TTL clamped to [min, max]."""

    min: int = field(Int(ge=1, le=MAX_LEARNED_TTL), default=30, description="seconds, at least")
    max: int = field(Int(ge=1, le=MAX_LEARNED_TTL), default=3600, description="seconds, at most")

    def check(self, ctx: Mapping[str, Any]) -> None:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")


class Dns(Record):
    """Which resolvers confined processes may query (UDP and TCP 53), or the forwarder in proxy mode."""

    mode: Literal["static", "proxy"] = field(
        OneOf("static", "proxy"), default="static",
        description="static: host entries resolved at apply time, DNS to `resolvers` allowed; proxy: every "
        "confined DNS query goes to `egressguard dns`, which answers only allowed names and lets the kernel "
        "learn their addresses",
    )
    resolvers: Literal["auto"] | list[str] = field(
        Either(OneOf("auto"), ListOf(Str())), default="auto",
        before=lambda v: [_address(x) for x in v] if isinstance(v, list) else v,
        description="'auto' = nameservers in /etc/resolv.conf; a list of IPs; [] = no DNS "
        "(proxy mode: the forwarder's upstream resolvers)",
    )
    ttl: Ttl = field(Nested(Ttl), default_factory=Ttl, description="proxy mode: clamp of a learned address's lifetime")
    forwarder_uid: int | None = field(Nullable(UID), default=None,
                                      description="proxy mode: the uid `egressguard dns` runs as; must be in exempt.uids")
    forwarder_port: int = field(PORT, default=DEFAULT_FORWARDER_PORT,
                                description="proxy mode: the forwarder's port on loopback")
    max_addresses_per_host: int = field(
        Int(ge=1, le=4096), default=DEFAULT_MAX_ADDRESSES_PER_HOST,
        description="a host resolving to more addresses fails the apply (or is skipped if optional)",
    )


class Redirect(Record):
    """Confined TCP to `ports` goes to `to_port` on loopback instead (a transparent proxy)."""

    ports: list[int] = field(ListOf(PORT, min_length=1), description="destination TCP ports to redirect")
    to_port: int = field(PORT, description="local port the proxy listens on (loopback, both families)")


# `log.rate`: packets per unit, as nft and iptables both spell it (iptables prints "10/sec").
_RATE = re.compile(r"^([1-9][0-9]{0,5})/(second|minute|hour|day)$")
MAX_LOG_RATE_PER_SECOND = 10_000  # the kernel's limit counts in jiffies: beyond this it cannot limit


def _log_rate(v: Any) -> Any:
    m = _RATE.match(v)
    if m is None:
        raise ValueError(f"{v!r} is not a rate such as 10/second (N/second, /minute, /hour or /day, N from 1)")
    if m.group(2) == "second" and int(m.group(1)) > MAX_LOG_RATE_PER_SECOND:
        raise ValueError(f"{v!r}: more than {MAX_LOG_RATE_PER_SECOND}/second")
    return v


class Log(Record):
    """Refused packets handed to `egressguard watch` (NFLOG), rate-limited in the kernel."""

    refused: bool = field(Bool(), default=True, description="log refused packets; false installs no log rule at all")
    rate: str = field(Str(), default="10/second", after=_log_rate,
                      description="at most this many log messages per refusing policy line: N/second|minute|hour|day")
    burst: int = field(Int(ge=1, le=10_000), default=50, description="messages allowed at once before `rate` applies")


def _the_number_1(v: Any) -> Any:
    if isinstance(v, (bool, float)):  # YAML `true` or `1.0` would otherwise pass as 1
        raise ValueError("must be the number 1")
    return v


def _some_ports(v: Any) -> Any:
    if isinstance(v, list) and not v:
        raise ValueError("an empty port list: use 'deny' to refuse all loopback traffic")
    return v


class Policy(Record):
    """An egress policy, version 1."""

    title = "egressguard policy"

    version: Literal[1] = field(OneOf(1), before=_the_number_1, description="policy format version; must be 1")
    confine: Confine = field(Nested(Confine), default_factory=Confine, description="whose traffic is restricted")
    exempt: Exempt = field(Nested(Exempt), default_factory=Exempt, description="who is never restricted")
    action: Literal["reject", "drop"] = field(
        OneOf("reject", "drop"), default="reject", description="reject: immediate error to the client; drop: silently dropped"
    )
    loopback: Literal["allow", "deny"] | list[int] = field(
        Either(OneOf("allow", "deny"), ListOf(PORT)), default="allow", after=_some_ports,
        description="local traffic: allow, deny, or only these ports (TCP and UDP)",
    )
    dns: Dns = field(Nested(Dns), default_factory=Dns, description="DNS resolvers confined processes may use")
    deny_metadata: bool = field(Bool(), default=True, description="refuse cloud metadata endpoints even if an allow covers them")
    allow: list[AllowEntry] = field(ListOf(Nested(AllowEntry), max_length=MAX_ENTRIES), default_factory=list)
    deny: list[DenyEntry] = field(ListOf(Nested(DenyEntry), max_length=MAX_ENTRIES), default_factory=list)
    redirect: list[Redirect] = field(ListOf(Nested(Redirect), max_length=64), default_factory=list)
    log: Log = field(Nested(Log), default_factory=Log, description="what `egressguard watch` is told about refused packets")

    def check(self, ctx: Mapping[str, Any]) -> None:
        if isinstance(self.confine.uids, list):
            confined = set(self.confine.uids)
            for i, uid in enumerate(self.exempt.uids):
                if uid in confined:
                    raise Located(f"exempt.uids[{i}]", f"uid {uid} is also in confine.uids")
        seen: dict[int, int] = {}
        for i, r in enumerate(self.redirect):
            for port in r.ports:
                if port in seen:
                    raise Located(f"redirect[{i}].ports", f"port {port} is already redirected by redirect[{seen[port]}]")
                seen[port] = i
        self._check_dns_mode()
        for kind in ("allow", "deny"):
            total = sum(len(e.networks) or 1 for e in getattr(self, kind))
            if total > MAX_ENTRIES:
                raise Located(kind, f"{total} entries after reading the list files, more than {MAX_ENTRIES}")

    def _check_dns_mode(self) -> None:
        proxy = self.dns.mode == "proxy"
        for kind in ("allow", "deny"):
            for i, e in enumerate(getattr(self, kind)):
                if e.host is None:
                    continue
                if e.host.startswith("*.") and not proxy:
                    raise Located(f"{kind}[{i}].host", f"{e.host!r}: wildcards need dns.mode: proxy")
                if proxy and kind == "deny":
                    raise Located(f"deny[{i}].host", "dns.mode proxy learns allowed names only: deny by `cidr`")
                if proxy and e.optional:
                    raise Located(f"allow[{i}].optional", "has no meaning in dns.mode proxy (names are learned, not resolved)")
        if not proxy:
            return
        uid = self.dns.forwarder_uid
        if uid is None:
            raise Located("dns.forwarder_uid", "dns.mode proxy needs the uid `egressguard dns` runs as")
        if uid == 0 or uid not in self.exempt.uids:
            raise Located("dns.forwarder_uid", f"uid {uid} must be a non-root uid listed in exempt.uids "
                          "(its queries to the upstream resolvers must not be confined)")
        for i, r in enumerate(self.redirect):
            if 53 in r.ports:
                raise Located(f"redirect[{i}].ports", "port 53: dns.mode proxy sends DNS to the forwarder")
            if r.to_port == self.dns.forwarder_port:
                raise Located(f"redirect[{i}].to_port", f"port {r.to_port} is dns.forwarder_port")

    @property
    def proxy_dns(self) -> bool:
        """dns.mode proxy: confined DNS goes to the forwarder, host entries are learned from answers."""
        return self.dns.mode == "proxy"

    @property
    def confines_everyone(self) -> bool:
        return self.confine.uids == "all"


DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "confine": {"uids": [1000]},
    "exempt": {"uids": [1001]},
    "action": "reject",
    "loopback": "allow",
    "dns": {"resolvers": "auto"},
    "deny_metadata": True,
    "allow": [],
    "redirect": [{"ports": [80, 443], "to_port": 8444}],
}


# ---------------------------------------------------------------------------------------------
# Loading


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise PolicyError(f"policy error: duplicate key {k!r}")
        out[k] = v
    return out


def parse_text(text: str, source: str) -> Any:
    """Parse YAML or JSON text (JSON is YAML, but parsed as JSON when it looks like JSON)."""
    if "\x00" in text:
        raise PolicyError(f"policy error: {source}: contains a NUL byte")
    stripped = text.lstrip()
    yaml_error: type[Exception] = json.JSONDecodeError  # (caught before: a placeholder until YAML is read)
    try:
        if stripped.startswith("{"):
            return json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
        from egressguard import strict_yaml  # noqa: PLC0415 - PyYAML only for YAML text (~7 ms)

        yaml_error = strict_yaml.YAMLError
        return strict_yaml.load(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"policy error: {source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml_error as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PolicyError(f"policy error: {source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise PolicyError(f"policy error: {source}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise PolicyError(f"policy error: {source}: unreadable value: {str(exc).splitlines()[0]}") from None


def _clip(message: str, limit: int = 1000) -> str:
    """A message quotes the offending value: keep a multi-megabyte value out of a one-line error."""
    return message if len(message) <= limit else message[: limit - 20] + f"... ({len(message)} chars)"


def _format_problems(exc: Invalid, source: str) -> str:
    messages = [_clip(f"{where or '(top level)'}: {message}") for where, message in exc.problems]
    # An `Either` reports one problem per alternative: keep the first per text, at most three in all.
    unique = list(dict.fromkeys(messages))
    more = f" (and {len(unique) - 3} more)" if len(unique) > 3 else ""
    return f"policy error: {source}: " + "; ".join(unique[:3]) + more


def validate(data: Any, source: str = "policy", base_dir: Path | None = None) -> Policy:
    """Validate parsed data into a Policy, or raise PolicyError with a one-line message.
    allow_file/deny_file paths are relative to `base_dir` (default: the working directory)."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"policy error: {source}: the policy must be a mapping (got {type(data).__name__})")
    _refuse_long_lists(data, source)
    try:
        return records.validate(Policy, data, ctx={"base_dir": base_dir})
    except Invalid as exc:
        raise PolicyError(_format_problems(exc, source)) from None
    except RecursionError:
        raise PolicyError(f"policy error: {source}: nested too deeply") from None


def _refuse_long_lists(data: Any, source: str) -> None:
    """Before validation, which would check every item of a 10^6-entry list before counting them."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, list):
            if len(value) > MAX_ENTRIES:
                raise PolicyError(
                    f"policy error: {source}: {where or '(top level)'}: {len(value)} items, more than {MAX_ENTRIES}"
                )
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (list, Mapping)))
        elif isinstance(value, Mapping):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in value.items() if isinstance(v, (list, Mapping)))


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy and where it came from."""

    policy: Policy
    source: str


def _read_text(path: Path, limit: int, hint: str) -> str:
    """A UTF-8 file of at most `limit` bytes, or ValueError saying why not."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise ValueError(f"{path}: larger than {limit} bytes{hint}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 (byte {exc.start})") from None


def load_file(path: Path | str) -> Policy:
    path = Path(path)
    try:
        text = _read_text(path, MAX_POLICY_BYTES, " (use allow_file for long lists)")
    except ValueError as exc:
        raise PolicyError(f"policy error: {exc}") from None
    return validate(parse_text(text, str(path)), str(path), base_dir=path.parent)


def load(path: str | None, environ: Mapping[str, str] | None = None) -> LoadedPolicy:
    """Find and validate the policy: --policy, then EGRESSGUARD_POLICY, EGRESSGUARD_POLICY_JSON,
    /etc/egressguard/policy.yaml, and finally the built-in default."""
    env = os.environ if environ is None else environ
    if path:
        return LoadedPolicy(policy=load_file(path), source=str(path))
    if env.get("EGRESSGUARD_POLICY"):
        return LoadedPolicy(policy=load_file(env["EGRESSGUARD_POLICY"]), source=env["EGRESSGUARD_POLICY"])
    if env.get("EGRESSGUARD_POLICY_JSON"):
        text = env["EGRESSGUARD_POLICY_JSON"]
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError("policy error: EGRESSGUARD_POLICY_JSON: too large")
        source = "EGRESSGUARD_POLICY_JSON"
        try:
            data = json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy error: {source}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise PolicyError(f"policy error: {source}: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise PolicyError(f"policy error: {source}: unreadable value: {str(exc).splitlines()[0]}") from None
        return LoadedPolicy(policy=validate(data, source), source=source)
    if DEFAULT_POLICY_PATH.exists():
        return LoadedPolicy(policy=load_file(DEFAULT_POLICY_PATH), source=str(DEFAULT_POLICY_PATH))
    return LoadedPolicy(policy=validate(DEFAULT_POLICY, "built-in default"), source="built-in default")


# Keys added after 0.1 (dotted paths). While one holds its default it is left out of the digest, so
# the digest a deployment pinned (EGRESSGUARD_EXPECT_DIGEST) survives an upgrade of the image; a
# policy that sets one to anything else gets a new digest, as any change of meaning does.
ADDED_KEYS: tuple[str, ...] = ("log", "dns.mode", "dns.ttl", "dns.forwarder_uid", "dns.forwarder_port")


def digest(policy: Policy) -> str:
    """A stable digest of the validated policy (defaults filled in, key order irrelevant)."""
    data = policy.to_json()
    default = Policy(version=1).to_json()
    for path in ADDED_KEYS:
        *parents, key = path.split(".")
        here, there = data, default
        for part in parents:
            here, there = here[part], there[part]
        if here[key] == there[key]:
            del here[key]
    # A list file is part of the policy: its networks count, not just its path.
    files = {
        f"{kind}[{i}]": list(e.networks)
        for kind in ("allow", "deny")
        for i, e in enumerate(getattr(policy, kind))
        if e.file is not None
    }
    if files:
        data["_file_networks"] = files
    return json_sha256(data)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy, generated from the models."""
    schema = records.json_schema(Policy)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://egressguard.invalid/policy.schema.json"
    return schema
