#!/usr/bin/env bash
# The fault soak: three daemons, one PostgreSQL behind PgBouncer, one S3
# server behind a fault proxy, five states on a cron of a few seconds, and
# faults injected at random from a seed; then seven invariants checked and
# printed, one line each (scripts/lib/soak.py says which). Exits 1 on any
# violation. The seed is printed first: the same seed replays the same faults.
#   scripts/soak.sh                          # 2 minutes, a fresh seed
#   scripts/soak.sh --minutes 30 --seed 7    # the long one
#   scripts/soak.sh --weight full_disk=3     # one fault drawn three times as often
#   SOAK_KEEP=1 scripts/soak.sh              # keep the logs, audit rows and bucket
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
source "$(dirname "$0")/lib/sample.sh"
cd "$OW_ROOT"
if [ ! -x /usr/sbin/pgbouncer ] && ! ow_install pgbouncer; then
    ow_log "SKIP the soak: it needs Debian's pgbouncer"
    exit 0
fi

ow_prepare
ow_build
ow_start_services
# WV (half of the companies) gets files past the 5 MiB part size: multipart.
ow_load_sample soak 60000 3 0.5
work=$(mktemp -d /tmp/ow-soak.XXXXXX)
OW_STARTED+=("dir:$work")
cluster=$(pg_lsclusters -h | awk -v p="$OW_PG_PORT" '$3 == p {print $1, $2}')
rc=0
OW_PG_CLUSTER=$cluster S3S_BIN=$S3S_BIN \
    python3 "$OW_ROOT/scripts/lib/soak.py" --work "$work" --bin "$OW_BIN" "$@" || rc=$?
if [ "$rc" != 0 ] || [ "${SOAK_KEEP:-0}" = 1 ]; then
    # Kept for a look: logs, histories, the audit rows, the bucket.
    OW_STARTED=("${OW_STARTED[@]/dir:$work}")
    ow_log "kept $work (logs, audit.json, history-*.json, s3/)"
fi
exit "$rc"
