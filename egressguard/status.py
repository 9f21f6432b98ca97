"""The status file: what the last apply installed, written atomically for probes and operators."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from egressguard.errors import ApplyFailed

DEFAULT_STATUS_PATH = Path(os.environ.get("EGRESSGUARD_STATUS", "/run/egressguard/status.json"))


def write(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` atomically (temp file + rename), readable by everyone."""
    import tempfile  # noqa: PLC0415 - only apply writes; probe and status only read (tempfile imports random, shutil)

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        fd, tmp = tempfile.mkstemp(prefix=".status.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise ApplyFailed(f"cannot write status file {path}: {exc.strerror or exc}") from None


def read(path: Path) -> dict[str, Any] | None:
    try:
        with path.open() as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ApplyFailed(f"cannot remove status file {path}: {exc.strerror or exc}") from None
