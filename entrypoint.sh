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
exec "$@"
