"""Frozen records validated from parsed YAML/JSON, and their JSON Schema: what the policy is made of.

Hand-written because no library fits a start-up budget of a few ms: pydantic costs ~80 ms to
import and build the models (bench/RESULTS.md), and msgspec stops at the first error and words
errors its own way. Kinds, wording, error locations and schema output follow pydantic 2 (what
policy messages and schema/policy.schema.json said before), pinned by
tests/golden/policy_verdicts.txt and tests/test_schema.py.

A record is a frozen dataclass whose fields are declared with `field(kind, ...)`; `validate(cls,
data)` checks every field (all errors, in field order, then unknown keys), runs the record's
`check()` only when its fields are valid, and builds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, dataclass_transform

# (where, message): where is "allow[1].ports" style text, "" at the top
Problem = tuple[str, str]


class Invalid(Exception):
    """A value did not validate; `problems` says where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(problems)
        self.problems = problems


class Located(ValueError):
    """Raised by a `check()` for a problem in a field or item other than the record itself."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where


def _at(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _expected(values: Sequence[object]) -> str:
    text = [repr(v) for v in values]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " or " + text[-1]


# ---------------------------------------------------------------------------------------------
# Kinds of value. Each validates (returning the value or raising Invalid) and describes itself in
# JSON Schema.


class Kind:
    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class Int(Kind):
    """An integer (not a bool, not a float, not a string) within bounds."""

    def __init__(self, ge: int, le: int, description: str | None = None) -> None:
        self.ge, self.le, self.description = ge, le, description

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid([(where, "Input should be a valid integer")])
        if value < self.ge:
            raise Invalid([(where, f"Input should be greater than or equal to {self.ge}")])
        if value > self.le:
            raise Invalid([(where, f"Input should be less than or equal to {self.le}")])
        return value

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"maximum": self.le, "minimum": self.ge, "type": "integer"}
        if self.description:
            out["description"] = self.description
        return out


# pydantic reads numbers into 64-bit integers: beyond them it words errors differently
_I64 = (-(2**63), 2**63 - 1)
_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


class Bool(Kind):
    """true/false, also 0/1 and yes/no/on/off/t/f/y/n in any case (as YAML 1.1 readers expect)."""

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            value = True if value.lower() in _TRUE else False if value.lower() in _FALSE else value
        elif isinstance(value, int) and value in (0, 1):
            value = bool(value)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) or (isinstance(value, int) and _I64[0] <= value <= _I64[1]):
            raise Invalid([(where, "Input should be a valid boolean, unable to interpret input")])
        raise Invalid([(where, "Input should be a valid boolean")])

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"type": "boolean"}


class Str(Kind):
    def __init__(self, min_length: int = 0) -> None:
        self.min_length = min_length

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        if not isinstance(value, str):
            raise Invalid([(where, "Input should be a valid string")])
        if len(value) < self.min_length:
            raise Invalid([(where, f"String should have at least {self.min_length} character"
                                   f"{'' if self.min_length == 1 else 's'}")])
        return value

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"minLength": self.min_length, "type": "string"} if self.min_length else {"type": "string"}


class OneOf(Kind):
    """One of a few literal values (all strings, or all integers)."""

    def __init__(self, *values: str | int) -> None:
        self.values = values

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        for v in self.values:
            if value == v and (isinstance(value, str) == isinstance(v, str)):
                return v
        if isinstance(value, int) and not isinstance(self.values[0], str) and not _I64[0] <= value <= _I64[1]:
            raise Invalid([(where, "Unable to parse input string as an integer, exceeded maximum size")])
        raise Invalid([(where, f"Input should be {_expected(self.values)}")])

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        kind = "string" if isinstance(self.values[0], str) else "integer"
        if len(self.values) == 1:
            return {"const": self.values[0], "type": kind}
        return {"enum": list(self.values), "type": kind}


class ListOf(Kind):
    def __init__(self, item: Kind, min_length: int = 0, max_length: int | None = None) -> None:
        self.item, self.min_length, self.max_length = item, min_length, max_length

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        if not isinstance(value, list):
            raise Invalid([(where, "Input should be a valid list")])
        if self.max_length is not None and len(value) > self.max_length:
            raise Invalid([(where, f"List should have at most {self.max_length} item{'' if self.max_length == 1 else 's'}"
                                   f" after validation, not {len(value)}")])
        out, problems = [], []
        for i, item in enumerate(value):
            try:
                out.append(self.item.validate(item, _at(where, i), ctx))
            except Invalid as exc:
                problems += exc.problems
        if problems:
            raise Invalid(problems)
        if len(out) < self.min_length:
            raise Invalid([(where, f"List should have at least {self.min_length} item{'' if self.min_length == 1 else 's'}"
                                   f" after validation, not {len(out)}")])
        return out

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"items": self.item.schema(defs), "type": "array"}
        if self.min_length:
            out["minItems"] = self.min_length
        if self.max_length is not None:
            out["maxItems"] = self.max_length
        return out


class Either(Kind):
    """The first alternative that validates; if none does, every alternative's problems."""

    def __init__(self, *alternatives: Kind) -> None:
        self.alternatives = alternatives

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        problems: list[Problem] = []
        for alternative in self.alternatives:
            try:
                return alternative.validate(value, where, ctx)
            except Invalid as exc:
                problems += exc.problems
        raise Invalid(problems)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [a.schema(defs) for a in self.alternatives]}


class Nullable(Kind):
    """None, or a value of `kind`."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        return None if value is None else self.kind.validate(value, where, ctx)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [self.kind.schema(defs), {"type": "null"}]}


class Nested(Kind):
    """A record inside a record (or a list)."""

    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def validate(self, value: Any, where: str, ctx: Mapping[str, Any]) -> Any:
        return validate(self.cls, value, where, ctx)

    def schema(self, defs: dict[str, Any]) -> dict[str, Any]:
        name = self.cls.__name__
        if name not in defs:
            defs[name] = {}  # reserve the name: a record never contains itself, but keep it finite
            defs[name] = record_schema(self.cls, defs)
        return {"$ref": f"#/$defs/{name}"}


# ---------------------------------------------------------------------------------------------
# Records

_REQUIRED: Any = dataclasses.MISSING


def field(kind: Kind, *, default: Any = _REQUIRED, default_factory: Callable[[], Any] | None = None,
          description: str | None = None, before: Callable[[Any], Any] | None = None,
          after: Callable[[Any], Any] | None = None) -> Any:
    """A record field: its kind, default (none: required), one-line description for the schema, and
    optional functions run on the raw value before validation and on the valid value after it
    (either may raise ValueError: the message is the problem)."""
    meta = {"kind": kind, "description": description, "before": before, "after": after}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Record:
    """Base of the policy's records: frozen dataclasses built by `validate`."""

    title: ClassVar[str | None] = None  # the schema's title; default: the class name

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True)(cls)

    def check(self, ctx: Mapping[str, Any]) -> None:
        """Cross-field rules, run once every field is valid; raise ValueError or Located."""

    def to_json(self) -> dict[str, Any]:
        """Every field, defaults filled in, in declaration order (the digest's input)."""
        return {f.name: _plain(getattr(self, f.name)) for f in _fields(type(self))}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _fields(cls: type[Record]) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]  # type: ignore[arg-type]


R = TypeVar("R", bound=Record)


def validate(cls: type[R], data: Any, where: str = "", ctx: Mapping[str, Any] | None = None) -> R:
    """`data` (parsed YAML/JSON) as a `cls`, or Invalid with every problem found. `ctx` is handed
    to every record's `check()` (e.g. the directory list files are relative to)."""
    ctx = {} if ctx is None else ctx
    if not isinstance(data, Mapping):
        raise Invalid([(where, f"Input should be a valid dictionary or instance of {cls.__name__}")])
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    fields = _fields(cls)
    for f in fields:
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append((_at(where, f.name), "Field required"))
            continue
        here = _at(where, f.name)
        try:
            value = data[f.name]
            if f.metadata["before"]:
                value = f.metadata["before"](value)
            value = f.metadata["kind"].validate(value, here, ctx)
            if f.metadata["after"]:
                value = f.metadata["after"](value)
            values[f.name] = value
        except Invalid as exc:
            problems += exc.problems
        except ValueError as exc:
            problems.append((here, str(exc)))
    names = {f.name for f in fields}
    for key in data:
        if not isinstance(key, str):
            problems.append((_at(where, int(key) if isinstance(key, int) else str(key)), "Keys should be strings"))
        elif key not in names:
            problems.append((_at(where, key), "unknown key"))
    if problems:
        raise Invalid(problems)
    record = cls(**values)
    try:
        record.check(ctx)
    except Located as exc:
        raise Invalid([(_at(where, exc.where) if where else exc.where, str(exc))]) from None
    except ValueError as exc:
        raise Invalid([(where, str(exc))]) from None
    return record


def record_schema(cls: type[Record], defs: dict[str, Any]) -> dict[str, Any]:
    """`cls` as a JSON Schema object; records it contains go into `defs`."""
    properties: dict[str, Any] = {}
    required = []
    for f in _fields(cls):
        kind: Kind = f.metadata["kind"]
        prop = kind.schema(defs)
        if f.metadata["description"]:
            prop["description"] = f.metadata["description"]
        if not isinstance(kind, Nested):
            prop["title"] = f.name.replace("_", " ").title()
            if f.default is not dataclasses.MISSING:
                prop["default"] = f.default
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        properties[f.name] = _sorted(prop)
    out: dict[str, Any] = {"additionalProperties": False}
    if cls.__doc__:
        out["description"] = cls.__doc__.strip()
    out["properties"] = properties
    if required:
        out["required"] = required
    out["title"] = cls.title or cls.__name__
    out["type"] = "object"
    return out


def _sorted(value: Any) -> Any:
    """Keys in alphabetical order, as pydantic writes them (a record's properties keep theirs)."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def json_schema(cls: type[Record]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    top = record_schema(cls, defs)
    return {"$defs": dict(sorted(defs.items())), **top} if defs else top
