"""nftables commits that race another writer. libnftables 1.0.6 sends its batch without a generation
id (NFNL_BATCH_GENID), so the kernel never answers ERESTART: a foreign commit between egressguard's
read of its table and its commit only matters when it changed that table (a chain the transaction
names is gone: ENOENT). apply then reads, renders and commits again, up to COMMIT_ATTEMPTS times, and
tells a race (the generation id moved by more than its own commits) from a refusal of the
transaction itself (exit 4 at once); past the bound it exits 4 with the lockdown in force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from egtraffic import FAST, dns_answered, reached, stopped
from nftbed import nft_tables
from test_faults import POLICY_A, POLICY_B

from egressguard.backends.nftables.backend import COMMIT_ATTEMPTS
from egressguard.lab import RESOLVER_V4, Lab

pytestmark = pytest.mark.netns

WRITER = str(Path(__file__).with_name("nft_race_writer.py"))
HARNESS = str(Path(__file__).with_name("fault_apply.py"))
NFT = {"EGRESSGUARD_BACKEND": "nftables"}
MAX_APPLIES = 30
OUTSIDE = ("203.0.113.12", "2001:db8:2::12")  # allowed by neither policy


def _events(stderr: str, name: str) -> int:
    return sum(1 for ln in stderr.splitlines() if ln.startswith("{") and json.loads(ln).get("event") == name)


def _human(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if not ln.startswith("{")]


def _race(lab: Lab, mode: str, applies: int = 0) -> tuple[list[subprocess.CompletedProcess[str]], str]:
    """Applies of A and B, alternately, while the writer runs: `applies` of them, or (0) until a
    retry was seen (at least six applies) or MAX_APPLIES. Returns them and the writer's last line."""
    paths = [str(lab.write_policy(p, f"race-{n}.json")) for n, p in (("a", POLICY_A), ("b", POLICY_B))]
    writer = subprocess.Popen(["ip", "netns", "exec", lab.pod, sys.executable, WRITER, mode, "120"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    done: list[subprocess.CompletedProcess[str]] = []
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        while len(done) < (applies or MAX_APPLIES) and (
                applies or len(done) < 6 or not sum(_events(d.stderr, "commit_retried") for d in done)):
            done.append(lab.egressguard("apply", "--policy", paths[len(done) % 2], env=NFT))
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()  # the writer's cue to stop
        out = writer.stdout.read()
        writer.wait(timeout=30)
    return done, out.strip()


def test_a_writer_committing_in_its_own_table_never_disturbs_apply(lab: Lab, figures: list[str]) -> None:
    done, out = _race(lab, "own", applies=10)
    landed = int(out.split()[1])
    assert landed > 0, "the writer never committed: nothing raced"
    assert [d.returncode for d in done] == [0] * len(done), [d.stderr[-500:] for d in done if d.returncode]
    retries = sum(_events(d.stderr, "commit_retried") for d in done)
    figures.append(f"nftables commit race, writer in its own table: {len(done)} applies against {landed} foreign "
                   f"commits, {retries} retries, 0 failures")
    assert "inet racer" in nft_tables(lab)  # the writer's table is not ours to touch
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "race-b.json"), env=NFT).returncode == 0


def test_a_writer_racing_in_our_table_is_retried_and_apply_never_exits_4(lab: Lab, figures: list[str]) -> None:
    assert lab.egressguard("apply", "--policy", str(lab.write_policy(POLICY_A, "race-a.json")), env=NFT).returncode == 0
    done, out = _race(lab, "ours")
    landed = int(out.split()[1])
    retries = sum(_events(d.stderr, "commit_retried") for d in done)
    codes = [d.returncode for d in done]
    # Exit 5 is the read-back doing its job: it listed the table while the writer's chain was in it.
    for d in done:
        assert d.returncode == 0 or (d.returncode == 5 and "unexpected chain intruder" in d.stderr), d.stderr[-800:]
    figures.append(f"nftables commit race, writer in our table: {len(done)} applies against {landed} foreign commits, "
                   f"{retries} retries, exits {{0: {codes.count(0)}, 5 (read-back saw the writer's chain): "
                   f"{codes.count(5)}}}, 0 exit 4")
    assert landed > 0 and retries >= 1, f"{len(done)} applies, {landed} foreign commits, no retry: the race was not produced"
    last = str(lab.workdir / ("race-a.json" if len(done) % 2 else "race-b.json"))
    assert lab.egressguard("apply", "--policy", last, env=NFT).returncode == 0  # the writer has stopped: whole again
    assert lab.egressguard("verify", "--policy", last, env=NFT).returncode == 0


def _raced_apply(lab: Lab, races: str) -> subprocess.CompletedProcess[str]:
    """apply A with a real foreign commit (a separate `nft` process) landing between its read and
    its commit in the first `races` policy commit attempts (tests/fault_apply.py, EG_NFT_RACE)."""
    path = lab.write_policy(POLICY_A, "a.json")
    env = {**os.environ, **NFT, "EGRESSGUARD_STATUS": str(lab.status_file), "EG_NFT_RACE": races}
    return subprocess.run(["ip", "netns", "exec", lab.pod, sys.executable, HARNESS, "none", "apply", "--policy", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_commit_raced_three_times_is_retried_three_times_and_ends_exact(lab: Lab) -> None:
    done = _raced_apply(lab, "3")
    assert done.returncode == 0, done.stderr[-1500:]
    assert _events(done.stderr, "commit_retried") == 3
    assert lab.egressguard("verify", "--policy", str(lab.workdir / "a.json"), env=NFT).returncode == 0
    assert reached(lab.tcp("203.0.113.10", 22, timeout=FAST), "203.0.113.10")
    for host in OUTSIDE:
        stopped(lab, "tcp", host, 22)  # with its control, judged where the world receives


def test_a_commit_that_keeps_racing_exits_4_with_the_lockdown_in_force(lab: Lab) -> None:
    done = _raced_apply(lab, "all")
    assert done.returncode == 4, done.stderr[-1500:]
    assert _events(done.stderr, "commit_retried") == COMMIT_ATTEMPTS - 1
    human = _human(done.stderr)
    assert len(human) == 1 and f"kept racing other writers ({COMMIT_ATTEMPTS} attempts)" in human[0], human
    assert json.loads(lab.status_file.read_text())["state"] == "lockdown"
    table = lab.in_pod("nft", "-s", "list", "table", "inet", "egressguard").stdout
    assert 'comment "lockdown"' in table and "allow[" not in table and "intruder" not in table
    for host in ("203.0.113.10", *OUTSIDE):  # the policy's own allow is not in force either
        stopped(lab, "tcp", host, 22)  # with its control, judged where the world receives
    assert dns_answered(lab.dns("allowed.test", RESOLVER_V4)), "the lockdown keeps DNS to the resolvers"



def test_a_transaction_the_kernel_refuses_is_not_retried(lab: Lab) -> None:
    """Another netlink socket owns our table (`flags owner`), created after preflight: the kernel
    refuses apply's transaction with no other commit in between, so apply exits 4 at once, naming
    the refusal, without a retry."""
    path = lab.write_policy(POLICY_A, "a.json")
    env = {**os.environ, **NFT, "EGRESSGUARD_STATUS": str(lab.status_file), "EG_NFT_OWNER": "1"}
    done = subprocess.run(["ip", "netns", "exec", lab.pod, sys.executable, HARNESS, "none", "apply", "--policy", str(path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 4, done.stderr[-1500:]
    assert _events(done.stderr, "commit_retried") == 0
    human = _human(done.stderr)
    # libnftables 1.0.6 cannot even print an owned table as JSON, so apply stops reading it; a
    # libnftables that can gets the kernel's refusal of the transaction. Either way: at once, no retry.
    assert len(human) == 1 and ("owned by another program" in human[0] or (
        "the kernel refused the transaction" in human[0] and "not permitted" in human[0])), human
    assert "inet egressguard" not in nft_tables(lab)  # the owner's table went with its socket


def _listing_beside_a_writer() -> dict[str, Any]:
    """A table of 3,000 rules listed by libnftables while tests/nft_race_writer.py commits without
    pause in a table of its own: libnftables 1.0.6 reads its cache again, unbounded, whenever the
    generation id moved while it read, so the listing never ends; Nft abandons it at the deadline
    (shortened here to 2 s). Quiet before and after: the same listing completes."""
    import time  # noqa: PLC0415

    from egressguard.backends.nftables import transport  # noqa: PLC0415

    transport.CALL_DEADLINE_S = 2.0
    with transport.Nft() as nft:
        nft.run("add table inet big\nadd chain inet big c\n" + "".join(
            f"add rule inet big c ip daddr 192.0.2.{i % 250} tcp dport {i} counter accept\n" for i in range(3000)))
        quiet = len(nft.list_json("table inet big"))
    writer = subprocess.Popen([sys.executable, WRITER, "own", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        started = time.monotonic()
        try:
            with transport.Nft() as nft:
                nft.list_json("table inet big")
            busy = "listed"
        except transport.NftablesBusy as exc:
            busy = str(exc)
        waited = time.monotonic() - started
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        landed = int(writer.stdout.read().split()[1])
        writer.wait(timeout=30)
    with transport.Nft() as nft:
        after = len(nft.list_json("table inet big"))
    return {"quiet": quiet, "busy": busy, "waited": waited, "landed": landed, "after": after}


def test_a_listing_that_a_writer_keeps_restarting_is_abandoned_at_the_deadline_not_awaited_forever() -> None:
    from test_nftables_plan import _in_fresh_netns  # noqa: PLC0415

    got = _in_fresh_netns(_listing_beside_a_writer)
    assert got["quiet"] == got["after"] == 3002, got  # table, chain, 3,000 rules
    assert "did not finish in 2 s" in got["busy"] and "commits without pause" in got["busy"], got
    assert 2.0 <= got["waited"] < 5.0, got
    assert got["landed"] > 100, got


def _commit_whose_transaction_is_abandoned() -> dict[str, Any]:
    """NftablesBackend.commit while a writer commits without pause in its own table (so the
    generation id always moved: a refusal would read as a race) and every commit script's
    libnftables call is abandoned at its deadline (stood in for by raising NftablesBusy, as Nft
    does when its deadline passes): the abandoned call ends the commit at once, it is not retried."""
    from egressguard.backends.nftables import transport  # noqa: PLC0415
    from egressguard.backends.nftables.backend import NftablesBackend  # noqa: PLC0415
    from egressguard.policy import DEFAULT_POLICY, validate  # noqa: PLC0415
    from egressguard.ruleset import Facts, build  # noqa: PLC0415

    scripts: list[str] = []
    run = transport.Nft.run

    def abandoned(self: Any, script: str, **kw: Any) -> str:
        if kw.get("json_output") or kw.get("dry_run"):
            return run(self, script, **kw)
        scripts.append(script)
        raise transport.NftablesBusy("nftables: libnftables did not finish in 10 s (stand-in)")

    transport.Nft.run = abandoned  # type: ignore[method-assign]
    writer = subprocess.Popen([sys.executable, WRITER, "own", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        try:
            NftablesBackend().commit(build(validate(DEFAULT_POLICY), Facts(), lockdown=True, orig_sets=True))
            raised = ""
        except transport.NftablesBusy as exc:
            raised = str(exc)
    finally:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        landed = int(writer.stdout.read().split()[1])
        writer.wait(timeout=30)
    return {"raised": raised, "attempts": len(scripts), "landed": landed}


def test_an_abandoned_libnftables_call_ends_the_commit_and_is_not_retried_as_a_race() -> None:
    from test_nftables_plan import _in_fresh_netns  # noqa: PLC0415

    got = _in_fresh_netns(_commit_whose_transaction_is_abandoned)
    assert "did not finish" in got["raised"] and got["attempts"] == 1 and got["landed"] > 0, got
