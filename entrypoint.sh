#!/bin/sh
# egressguard entrypoint. As root (Docker mode): apply the policy, drop every privilege, exec the
# command as `sandbox` (egressguard run). As any other user (Kubernetes agent container, the init
# container applied the rules): the unprivileged self-check must pass before the command starts.
set -eu

if [ "$(id -u)" = 0 ]; then
  exec egressguard run --user "${EGRESSGUARD_USER:-sandbox}" -- "$@"
fi

code=0
egressguard probe || code=$?
if [ "$code" -ne 0 ]; then
  echo "entrypoint: egress is not guarded (probe exit $code): the command is not started" >&2
  exit "$code"
fi
if [ "$#" -eq 0 ]; then
  set -- "${SHELL:-/bin/sh}"
fi
# As PID 1, an init forwards signals to the command and reaps orphans (EGRESSGUARD_INIT= disables).
init=${EGRESSGUARD_INIT-tini}
if [ "$$" = 1 ] && [ -n "$init" ] && command -v "$init" >/dev/null 2>&1; then
  exec "$init" -- "$@"
fi
exec "$@"
