"""The shipped JSON Schema (schema/policy.schema.json) is generated from the models, never edited by hand.

After changing the policy models: `python -m egressguard schema > schema/policy.schema.json`
(or `UPDATE_GOLDEN=1 pytest tests/test_schema.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from egressguard import cli
from egressguard.policy import json_schema

SCHEMA = Path(__file__).resolve().parent.parent / "schema" / "policy.schema.json"


def _generated(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["schema"]) == 0
    return capsys.readouterr().out


def test_committed_schema_equals_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    out = _generated(capsys)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        SCHEMA.write_text(out)
    assert SCHEMA.read_text() == out, (
        "schema/policy.schema.json is stale: run `python -m egressguard schema > schema/policy.schema.json`"
    )


def test_schema_command_prints_the_models_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads(_generated(capsys)) == json_schema()


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
