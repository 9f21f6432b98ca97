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
    for chunk in _chunks(obj):
        h.update(chunk.encode())
    return "sha256:" + h.hexdigest()


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _chunks(obj: object) -> Iterator[str]:
    if isinstance(obj, dict):
        yield "{"
        for i, key in enumerate(sorted(obj)):
            yield ("," if i else "") + _dumps(key) + ":"
            yield from _chunks(obj[key])
        yield "}"
    elif isinstance(obj, (list, tuple)) and len(obj) > SLICE:
        yield "["
        for start in range(0, len(obj), SLICE):
            part = obj[start : start + SLICE]
            if all(isinstance(x, (str, int, float, bool)) or x is None for x in part):
                yield ("," if start else "") + _dumps(part)[1:-1]
            else:
                for j, x in enumerate(part):
                    yield "," if start or j else ""
                    yield from _chunks(x)
        yield "]"
    elif isinstance(obj, (list, tuple)):
        yield "["
        for j, x in enumerate(obj):
            yield "," if j else ""
            yield from _chunks(x)
        yield "]"
    else:
        yield _dumps(obj)
