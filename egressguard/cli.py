"""The command line: arguments -> core calls, exceptions -> exit codes. Nothing is decided here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from egressguard import logs
from egressguard import status as status_mod
from egressguard._version import __version__
from egressguard.errors import EXIT_CODES, EgressGuardError, PolicyError, VerifyFailed

log = logs.get_logger("egressguard")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like a policy error
        self.exit(2, f"egressguard: usage error: {message} (see --help)\n")


def _exit_code_table() -> str:
    return "exit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in sorted(EXIT_CODES.items()))


def _policy_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--policy", metavar="FILE", help="policy file (YAML or JSON); default: $EGRESSGUARD_POLICY, "
                    "$EGRESSGUARD_POLICY_JSON, /etc/egressguard/policy.yaml, built-in default")
    sp.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"), help=argparse.SUPPRESS)


def _backend_arg(sp: argparse.ArgumentParser) -> None:
    from egressguard.backends import BACKEND_CHOICES, DEFAULT_BACKEND  # noqa: PLC0415

    sp.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                    help=f"firewall back end (default: $EGRESSGUARD_BACKEND, else {DEFAULT_BACKEND}); "
                    "auto: nftables where the kernel accepts it, else iptables")


def _status_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--status-file", type=Path, default=status_mod.DEFAULT_STATUS_PATH,
                    help="default: %(default)s ($EGRESSGUARD_STATUS)")


def _plan_args(sp: argparse.ArgumentParser) -> None:
    _policy_args(sp)
    sp.add_argument("--json", action="store_true", help="structured output")
    sp.add_argument("--resolve", action="store_true", help="resolve host entries now (DNS queries, no kernel change)")
    sp.add_argument("--lockdown", action="store_true", help="show the lockdown ruleset instead")
    _backend_arg(sp)


def _apply_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _policy_args(sp)
    _status_arg(sp)
    sp.add_argument("--no-status", action="store_true", help="do not write a status file")


def _verify_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _policy_args(sp)
    _status_arg(sp)


def _status_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _status_arg(sp)
    sp.add_argument("--json", action="store_true")


def _reset_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _status_arg(sp)


def _probe_args(sp: argparse.ArgumentParser) -> None:
    _status_arg(sp)
    sp.add_argument("--expect-digest", metavar="DIGEST", help="the status must show this policy digest "
                    "($EGRESSGUARD_EXPECT_DIGEST)")
    sp.add_argument("--target", action="append", metavar="ADDR:PORT",
                    help="an address no sane policy allows, must be refused (repeatable)")


def _run_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _policy_args(sp)
    _status_arg(sp)
    sp.add_argument("--user", default="sandbox", help="user to run CMD as (default: %(default)s)")
    sp.add_argument("--watch-user", default=None, help="user `egressguard watch` runs as beside CMD when the "
                    "policy logs refusals (default: nobody)")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command (default: a shell)")


def _dns_args(sp: argparse.ArgumentParser) -> None:
    _policy_args(sp)
    sp.add_argument("--ready-fd", type=int, default=None, help="write 'ready' to this fd once listening")
    sp.add_argument("--check", action="store_true", help="only ask the running forwarder on loopback: exit 0 if it "
                    "answers, 6 if not (a Kubernetes startup probe)")
    sp.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # end when this process ends


def _watch_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--user", default=None, help="started as root: become this user, keeping only CAP_NET_ADMIN "
                    "(default: stay who it is; as root: nobody)")
    sp.add_argument("--window", type=float, default=None, metavar="SECONDS",
                    help="fold repeats of a flow over this long (default: 10)")
    sp.add_argument("--max-flows", type=int, default=None, metavar="N",
                    help="flows itemised per window; packets of further flows are counted (default: 4096)")
    sp.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # sidecar.start's pipe
    sp.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # end when this process ends


def _explain_args(sp: argparse.ArgumentParser) -> None:
    _policy_args(sp)
    sp.add_argument("--uid", type=int, required=True)
    sp.add_argument("dest", metavar="DEST[:PORT][/PROTO]")


def _demo_args(sp: argparse.ArgumentParser) -> None:
    _backend_arg(sp)
    _policy_args(sp)
    sp.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)


# command -> (one line of help, its arguments), in the order `--help` lists them
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "plan": ("print what apply would install (no privileges, no changes)", _plan_args),
    "apply": ("install the policy in this network namespace, verify, write status", _apply_args),
    "verify": ("read back and compare with the policy; exit 0 or 5", _verify_args),
    "status": ("what is installed now (chains, counters, digest)", _status_args),
    "reset": ("remove everything egressguard owns, nothing else", _reset_args),
    "schema": ("print the policy's JSON Schema", lambda sp: None),
    "probe": ("unprivileged self-check: is egress from this identity guarded?", _probe_args),
    "run": ("apply, drop every privilege, exec CMD as --user (Docker entrypoint)", _run_args),
    "dns": ("dns.mode proxy: the DNS forwarder (long-running; unprivileged but CAP_NET_ADMIN)", _dns_args),
    "watch": ("print one event per refused flow (reads the NFLOG group; runs until stopped)", _watch_args),
    "explain": ("which policy line decides for a destination (no kernel)", _explain_args),
    "demo": ("throwaway pod + world namespaces: apply the policy, probe, print a table", _demo_args),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Given `argv` that names a command, only that command's parser is built:
    the probe runs in every sandbox start, and ten parsers cost it ~10 ms."""
    p = _Parser(
        prog="egressguard",
        description="Fail-closed egress allowlist for containers and Kubernetes pods.",
        epilog=_exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"egressguard {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    named = next((a for a in argv or () if a in SUBCOMMANDS), None)
    for name, (help_, add_args) in SUBCOMMANDS.items():
        if named in (None, name):
            add_args(sub.add_parser(name, help=help_))
    return p


# ---------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Any:
    from egressguard import policy as policy_mod  # noqa: PLC0415 - PyYAML and the records: only when a policy is read

    loaded = policy_mod.load(args.policy)
    log.debug("policy_loaded", source=loaded.source)  # its digest: in policy_applied (computed once, by apply)
    return loaded


def _backend(args: argparse.Namespace) -> Any:
    from egressguard.backends import select  # noqa: PLC0415 - keep plan/schema light

    backend = select(args.backend)
    args._summary["backend"] = backend.name
    return backend


def _default_backend() -> str:
    from egressguard.backends import DEFAULT_BACKEND  # noqa: PLC0415

    return DEFAULT_BACKEND


def cmd_plan(args: argparse.Namespace) -> int:
    from egressguard import facts  # noqa: PLC0415
    from egressguard import policy as policy_mod  # noqa: PLC0415
    from egressguard.ruleset import Facts, build, hosts_of  # noqa: PLC0415

    loaded = _load(args)
    resolvers = facts.resolvers_for(loaded.policy, args.resolv_conf)
    hosts: dict[str, tuple[str, ...]] = {}
    if args.resolve:
        hosts = facts.resolve_hosts(
            hosts_of(loaded.policy), resolvers, max_addresses=loaded.policy.dns.max_addresses_per_host
        ).addresses
    backend = args.backend or os.environ.get("EGRESSGUARD_BACKEND") or _default_backend()
    from egressguard.backends import BACKEND_CHOICES, plan_json, plan_text, sets_by_original_destination  # noqa: PLC0415

    if backend not in BACKEND_CHOICES:
        raise PolicyError(f"unknown back end {backend!r} ($EGRESSGUARD_BACKEND); choose one of {', '.join(BACKEND_CHOICES)}")
    rs = build(loaded.policy, Facts(resolvers=resolvers, hosts=hosts), lockdown=args.lockdown,
               orig_sets=sets_by_original_destination(backend))
    if args.json:
        print(json.dumps({"policy_digest": policy_mod.digest(loaded.policy), **plan_json(backend, rs)}, indent=2))
    else:
        header = [f"egressguard {rs.kind} for {loaded.source}", f"policy {policy_mod.digest(loaded.policy)}"]
        sys.stdout.write(plan_text(backend, rs, header))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from egressguard import apply as apply_mod  # noqa: PLC0415

    loaded = _load(args)
    out = apply_mod.apply(loaded.policy, loaded.source, _backend(args), None if args.no_status else args.status_file,
                          resolv_conf=args.resolv_conf)
    log.info("policy_applied", policy_digest=out.policy_digest, source=out.source,
             lockdown_first=out.lockdown_first, fence_first=out.fence_first,
             timings_ms={k: round(v, 1) for k, v in out.timings_ms.items()})
    args._summary = {"policy_digest": out.policy_digest, "backend": out.backend,
                     "rules": out.ruleset.rule_count() if out.ruleset else 0}
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from egressguard import apply as apply_mod  # noqa: PLC0415
    from egressguard import policy as policy_mod  # noqa: PLC0415

    loaded = _load(args)
    st = status_mod.read(args.status_file) or {}
    hosts = {k: tuple(v) for k, v in (st.get("hosts") or {}).items()}
    backend = _backend(args)
    args._summary = {"policy_digest": policy_mod.digest(loaded.policy), "backend": backend.name}
    diffs = apply_mod.verify(loaded.policy, backend, args.resolv_conf, hosts)
    if diffs:
        raise VerifyFailed("installed rules differ from the policy: " + "; ".join(diffs[:3]))
    print(f"verified: the kernel holds exactly {loaded.source} ({args._summary['policy_digest']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    backend = _backend(args)
    backend.preflight()
    installed = backend.read()
    st = status_mod.read(args.status_file)
    report = {
        "guarded": backend.guarded(installed),
        "status_file": str(args.status_file),
        "last_apply": st,
        "other_firewalls": backend.other_firewalls(),
        "tables": [
            {
                "family": f"ipv{t.family}",
                "table": t.name,
                "present": t.present,
                "jump_positions": list(t.jump_positions),
                "foreign_output_rules": t.foreign_output_rules,
                "chains": {
                    c.name: [
                        {"rule": backend.describe(t.family, t.name, r), "packets": t.counters[c.name][i][0],
                         "bytes": t.counters[c.name][i][1]}
                        for i, r in enumerate(c.rules)
                    ]
                    for c in t.chains
                },
            }
            for t in installed.tables
        ],
    }
    hosts = (st or {}).get("learned_sets") or {}
    report["learned"] = [
        {"set": h.name, "host": hosts.get(h.name, "?"), "address": addr, "ttl": ttl, "expires_s": left}
        for h in installed.learned_sets for addr, ttl, left in h.elements
    ]
    report["refused"] = refused_by_line(installed)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"guarded: {'yes' if report['guarded'] else 'NO'}")
    if installed.learned_sets:
        print(f"learned addresses (dns.mode proxy): {len(report['learned'])}")
        for item in report["learned"]:
            print(f"  {item['host']:<30} {item['address']:<40} {item['expires_s']:>6} s left (of {item['ttl']} s)")
    if st:
        print(f"last apply: {st.get('state')} at {st.get('applied_at')} from {st.get('policy_source')} "
              f"({st.get('policy_digest')}), exit {st.get('exit_code')}")
    else:
        print(f"last apply: no status file at {args.status_file}")
    for other in report["other_firewalls"]:
        print(f"note: {other}")
    if report["refused"]:
        print("refused packets, by policy line: " + ", ".join(f"{k} {v}" for k, v in report["refused"].items()))
    for t in report["tables"]:
        if not t["chains"]:
            continue
        print(f"\n{t['family']} {t['table']} (jump at {t['jump_positions']}, {t['foreign_output_rules']} foreign OUTPUT rules)")
        for name, rules in t["chains"].items():
            print(f"  {name}")
            for r in rules:
                print(f"    {r['packets']:>8} pkts {r['bytes']:>10} B  {r['rule']}")
    return 0


def refused_by_line(installed: Any) -> dict[str, int]:
    """Packets refused so far per policy line (both families): the counters of the confined chain's
    refusing rules, or of its jumps to its lines' refusal chains (the log rules there count only
    what their limit lets through)."""
    from egressguard.ruleset import CONFINED, policy_line, refuse_index  # noqa: PLC0415

    out: dict[str, int] = {}
    for t in installed.tables:
        for c in t.chains:
            if c.name != CONFINED:
                continue
            for i, r in enumerate(c.rules):
                if r.target in ("REJECT", "DROP") or refuse_index(r.target) is not None:
                    line = policy_line(r.comment)
                    out[line] = out.get(line, 0) + t.counters[c.name][i][0]
    return out


def cmd_watch(args: argparse.Namespace) -> int:
    from egressguard import watch  # noqa: PLC0415

    return watch.main(args)


def cmd_reset(args: argparse.Namespace) -> int:
    from egressguard import apply as apply_mod  # noqa: PLC0415

    backend = _backend(args)
    args._summary = {"backend": backend.name}
    apply_mod.reset(backend, args.status_file)
    log.info("reset_done")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from egressguard import policy as policy_mod  # noqa: PLC0415

    print(json.dumps(policy_mod.json_schema(), indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from egressguard import probe  # noqa: PLC0415

    return probe.main(args)


def cmd_run(args: argparse.Namespace) -> int:
    from egressguard import run  # noqa: PLC0415

    return run.main(args)


def cmd_dns(args: argparse.Namespace) -> int:
    from egressguard import dnsproxy  # noqa: PLC0415

    return dnsproxy.main(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from egressguard import explain  # noqa: PLC0415

    return explain.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from egressguard import demo  # noqa: PLC0415

    return demo.main(args)


COMMANDS = {
    "plan": cmd_plan,
    "apply": cmd_apply,
    "verify": cmd_verify,
    "status": cmd_status,
    "reset": cmd_reset,
    "schema": cmd_schema,
    "probe": cmd_probe,
    "run": cmd_run,
    "explain": cmd_explain,
    "dns": cmd_dns,
    "watch": cmd_watch,
    "demo": cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logs.configure(args.verbose, None if args.log_format == "auto" else args.log_format == "json")
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    started = time.perf_counter()
    code = 1
    args._summary = {}
    try:
        code = COMMANDS[args.command](args)
    except EgressGuardError as exc:
        code = exc.exit_code
        print(f"egressguard: {exc}", file=sys.stderr)
    except BrokenPipeError:  # `egressguard plan | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        code = 1
        print("egressguard: interrupted", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - exit 1 is part of the contract
        code = 1
        print(f"egressguard: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.command in ("apply", "reset", "verify", "run"):
        log.info("run_finished", command=args.command, exit_code=code,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1), **args._summary)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
