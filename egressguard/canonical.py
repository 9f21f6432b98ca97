"""sha256 of canonical JSON, streamed: the digests of a 10,000-network policy without holding its
whole JSON text (and one small string per network) in memory at once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

SLICE = 512  # list items encoded per json.dumps call (C speed, bounded memory)


def json_sha256(obj: object) -> str:
    """'sha256:' + the hex digest of json.dumps(obj, sort_keys=True, separators=(",", ":")),
    byte for byte, without building that string."""
    h = hashlib.sha256()
    streamed: set[int] = set()
    _mark(obj, streamed)
    for chunk in _chunks(obj, streamed):
        h.update(chunk.encode())
    return "sha256:" + h.hexdigest()


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _mark(obj: object, streamed: set[int]) -> bool:
    """Put into `streamed` the id of every container that holds a list longer than SLICE (itself
    or deeper down); everything else is encoded by one json.dumps call."""
    if isinstance(obj, dict):
        found = any([_mark(v, streamed) for v in obj.values()])  # a list: mark every branch
    elif isinstance(obj, (list, tuple)):
        found = any([_mark(x, streamed) for x in obj]) or len(obj) > SLICE
    else:
        return False
    if found:
        streamed.add(id(obj))
    return found


def _chunks(obj: object, streamed: set[int]) -> Iterator[str]:
    if id(obj) not in streamed:
        yield _dumps(obj)
    elif isinstance(obj, dict):
        yield "{"
        for i, key in enumerate(sorted(obj)):
            yield ("," if i else "") + _dumps(key) + ":"
            yield from _chunks(obj[key], streamed)
        yield "}"
    else:  # a list or tuple
        items: list[object] | tuple[object, ...] = obj  # type: ignore[assignment]
        yield "["
        for start in range(0, len(items), SLICE):
            part = items[start : start + SLICE]
            if not any(id(x) in streamed for x in part):
                yield ("," if start else "") + _dumps(part)[1:-1]
                continue
            for j, x in enumerate(part):
                yield "," if start or j else ""
                yield from _chunks(x, streamed)
        yield "]"
