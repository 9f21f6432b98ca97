"""The exception hierarchy: one class per exit code of the fail-closed contract."""

from __future__ import annotations


class EgressGuardError(Exception):
    """Base class. `exit_code` is what the CLI returns for it."""

    exit_code = 1
    kind = "internal_error"

    def __init__(self, message: object = "") -> None:
        # Errors are printed as one line: a value quoted from a policy may hold line breaks.
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (\\n, \\u2028, ...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class PolicyError(EgressGuardError):
    """Usage or policy error: nothing in the kernel was changed."""

    exit_code = 2
    kind = "policy_error"


class EnvironmentUnsupported(EgressGuardError):
    """Missing capability, kernel support or library."""

    exit_code = 3
    kind = "environment_unsupported"


class ApplyFailed(EgressGuardError):
    """The kernel refused a change, a required host did not resolve, the status file could not be written."""

    exit_code = 4
    kind = "apply_failed"


class VerifyFailed(EgressGuardError):
    """What the kernel holds differs from what was meant."""

    exit_code = 5
    kind = "verify_failed"


class ProbeFailed(EgressGuardError):
    """`probe` found egress unguarded (or the status does not match the expected policy)."""

    exit_code = 6
    kind = "probe_failed"


EXIT_CODES: dict[int, str] = {
    0: "applied and verified",
    1: "unexpected internal error",
    2: "usage or policy error",
    3: "environment unsupported (missing capability, kernel support or library)",
    4: "apply failed (kernel refused, a host did not resolve, status not written)",
    5: "verification failed (read-back differs)",
    6: "probe: egress is not guarded",
}
