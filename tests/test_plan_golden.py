"""Golden files pin `egressguard plan` output: any change of behaviour is a visible diff in review.

Regenerate after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_plan_golden.py`,
then read the diff of tests/golden/*.plan before committing it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from goldenfile import assert_matches_golden

from egressguard import cli

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path("tests/golden")  # relative: the plan header names the policy path as given
RESOLV_CONF = GOLDEN / "resolv.conf"  # fixed resolvers, whatever this machine's resolv.conf says
POLICIES = sorted(p.stem for p in (ROOT / GOLDEN).glob("*.yaml"))


def _plan(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = cli.main(["plan", "--resolv-conf", str(RESOLV_CONF), *args])
    out = capsys.readouterr().out
    assert code == 0
    return out


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("EGRESSGUARD_POLICY", raising=False)
    monkeypatch.delenv("EGRESSGUARD_POLICY_JSON", raising=False)


def test_there_are_golden_policies() -> None:
    assert {"default", "confine-all", "drop-loopback-ports", "deny-allow-mixed", "redirect"} <= set(POLICIES)


@pytest.mark.parametrize("name", POLICIES)
def test_plan_output_matches_golden_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    got = _plan(capsys, "--policy", str(GOLDEN / f"{name}.yaml"))
    assert_matches_golden(ROOT / GOLDEN / f"{name}.plan", got, "plan output differs from")


def test_default_golden_policy_is_the_builtin_default(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from egressguard import policy as policy_mod  # noqa: PLC0415

    monkeypatch.setattr(policy_mod, "DEFAULT_POLICY_PATH", tmp_path / "absent.yaml")
    builtin = _plan(capsys).splitlines()
    from_file = _plan(capsys, "--policy", str(GOLDEN / "default.yaml")).splitlines()
    assert builtin[0] == "# egressguard policy for built-in default"
    assert builtin[1:] == from_file[1:]  # same digest, same rules


def test_plan_json_describes_the_same_rules_as_the_text(capsys: pytest.CaptureFixture[str]) -> None:
    policy = str(GOLDEN / "deny-allow-mixed.yaml")
    text = _plan(capsys, "--policy", policy)
    data = json.loads(_plan(capsys, "--policy", policy, "--json"))
    assert f"# policy {data['policy_digest']}" in text
    assert data["unresolved_hosts"] == ["api.example.com", "blocked.example.com"]
    rules = [" ".join(args) for t in data["tables"] for chain in t["chains"].values() for args in chain]
    text_rules = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("-A ")]
    assert rules == text_rules


def test_plan_shows_the_lockdown_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    text = _plan(capsys, "--policy", str(GOLDEN / "deny-allow-mixed.yaml"), "--lockdown")
    assert text.startswith("# egressguard lockdown for ")
    assert "allow[" not in text and "deny[" not in text and "--comment lockdown" in text


@pytest.mark.netns
@pytest.mark.parametrize("name", POLICIES)
def test_golden_plan_loads_with_iptables_restore(name: str) -> None:
    """The plan is real iptables-save text: each family's part passes `iptables-restore --test`
    (in a throwaway namespace made by `unshare -n`, never this machine's own)."""
    blocks: dict[str, list[str]] = {"iptables": [], "ip6tables": []}
    tool = "iptables"
    for line in (ROOT / GOLDEN / f"{name}.plan").read_text().splitlines():
        if line.startswith(("# iptables ", "# ip6tables ")):
            tool = line.split()[1]
        blocks[tool].append(line)
    for tool, lines in blocks.items():
        done = subprocess.run(["unshare", "-n", f"{tool}-legacy-restore", "--test", "-n"], input="\n".join(lines) + "\n",
                              capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, f"{tool}: {done.stderr}"
