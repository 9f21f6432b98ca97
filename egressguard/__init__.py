"""egressguard: a fail-closed egress allowlist for containers and Kubernetes pods."""

from egressguard._version import __version__

__all__ = ["__version__"]
