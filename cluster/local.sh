#!/usr/bin/env bash
# A one-machine Ray cluster for `ray job submit`: head with dashboard + job server, small object store.
#   cluster/local.sh start     # prints the address to submit to
#   cluster/local.sh status
#   cluster/local.sh stop
# Settings (environment): RAY_CPUS (default: all cores), RAY_OBJECT_STORE_BYTES (default 200 MB),
# RAY_DASHBOARD_PORT (default 8265), RAY_PORT (default 6379). Uses .venv/bin/ray when present.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RAY=${RAY:-$([ -x "$here/.venv/bin/ray" ] && echo "$here/.venv/bin/ray" || echo ray)}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
PORT=${RAY_PORT:-6379}

case "${1:-}" in
  start)
    args=(--head --port "$PORT" --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT"
          --object-store-memory "${RAY_OBJECT_STORE_BYTES:-200000000}" --disable-usage-stats)
    [ -n "${RAY_CPUS:-}" ] && args+=(--num-cpus "$RAY_CPUS")
    "$RAY" start "${args[@]}"
    echo
    echo "Ray head is up (token authentication on; the token is in ~/.ray/auth_token)."
    echo "Submit jobs from the repository root with:"
    echo "  export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT RAY_AUTH_MODE=token"
    echo "  ray job submit --working-dir . -- python jobs/train_detector.py --smoke-test --num-workers 2 \\"
    echo "      --out /tmp/animeai/smoke.pth --storage-path /tmp/animeai/ray"
    echo "(outputs of a submitted job need absolute paths: its working dir is a temporary copy, deleted with it)"
    echo "Dashboard: http://127.0.0.1:$DASH_PORT   Stop with: cluster/local.sh stop"
    ;;
  status)
    "$RAY" status
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
