"""The shipped JSON Schema (schema/policy.schema.json) is generated from the models, never edited by hand.

After changing the policy models: `python -m egressguard schema > schema/policy.schema.json`
(or `UPDATE_GOLDEN=1 pytest tests/test_schema.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from goldenfile import assert_matches_golden

from egressguard import cli

SCHEMA = Path(__file__).resolve().parent.parent / "schema" / "policy.schema.json"


def _generated(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["schema"]) == 0
    return capsys.readouterr().out


def test_committed_schema_equals_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert_matches_golden(SCHEMA, _generated(capsys), "the models' schema (`python -m egressguard schema`) differs from")


GOLDEN_POLICIES = sorted((Path(__file__).resolve().parent / "golden").glob("*.yaml"))


@pytest.mark.parametrize("path", GOLDEN_POLICIES, ids=lambda p: p.stem)
def test_committed_schema_accepts_every_golden_policy(path: Path) -> None:
    """Checked by a real JSON Schema validator (not by the code that generated the schema)."""
    jsonschema = pytest.importorskip("jsonschema")
    data = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(data)


@pytest.mark.parametrize(
    "policy",
    [
        {},  # no version
        {"version": 1, "egress": []},  # unknown key
        {"version": 1, "action": "accept"},
        {"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": []}]},
        {"version": 1, "allow": [{"cidr": "203.0.113.0/24", "ports": [70000]}]},
        {"version": 1, "allow": [{"cidr": "203.0.113.0/24", "port": [443]}]},
        {"version": 1, "loopback": "sometimes"},
    ],
)
def test_committed_schema_refuses_what_the_loader_refuses(policy: dict[str, object]) -> None:
    """An editor using the schema sees the errors `egressguard` would report: both refuse."""
    jsonschema = pytest.importorskip("jsonschema")
    from egressguard.errors import PolicyError  # noqa: PLC0415
    from egressguard.policy import validate  # noqa: PLC0415

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(policy)
    with pytest.raises(PolicyError):
        validate(policy, "test")


def test_schema_refuses_unknown_keys_and_requires_the_version() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["version"]
    for name, definition in schema["$defs"].items():
        assert definition.get("additionalProperties") is False, name


def test_schema_documents_every_policy_key() -> None:
    props = json.loads(SCHEMA.read_text())["properties"]
    expected = {"version", "confine", "exempt", "action", "loopback", "dns", "deny_metadata", "allow", "deny", "redirect"}
    assert expected <= set(props)
    assert all(props[k].get("description") for k in expected - {"allow", "deny", "redirect"})
    defs = json.loads(SCHEMA.read_text())["$defs"]
    for name in ("AllowEntry", "DenyEntry", "Redirect"):  # lists are described by their items
        assert defs[name]["description"], name
