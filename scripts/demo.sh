#!/usr/bin/env bash
# The main job, end to end, on this machine: starts a local PostgreSQL with
# generated sample data and a local S3 server, runs
# `outreach-workbench run --state WV` twice (the second run finds nothing
# changed and uploads nothing), once more with a quality gate that trips,
# shows the history, the files, objects and audit rows,
# then stops what it started.
#   COMPANIES=20000 scripts/demo.sh     # more sample data (default 4000)
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
source "$(dirname "$0")/lib/sample.sh"
cd "$OW_ROOT"

ow_prepare
ow_build
ow_start_services
ow_load_sample marketing "${COMPANIES:-4000}" 3 0.25
work=$(mktemp -d /tmp/ow-demo.XXXXXX)
OW_STARTED+=("dir:$work")
config=$(ow_write_config "$work" marketing outreach-demo)
ow_export_secrets

ow_log "outreach-workbench run --state WV"
"$OW_BIN" run --state WV --config "$config"
ow_log "again: unchanged files are skipped"
"$OW_BIN" run --state WV --config "$config"

ow_log "with a strict quality gate (5 % bad at most): gated, exit 3, nothing published"
OUTREACH_GATES__MAX_BAD_RATIO=0.05 "$OW_BIN" run --state WV --config "$config" || echo "(exit $?)"
ow_log "outreach-workbench history --state WV"
"$OW_BIN" history --state WV --config "$config"

ow_log "local exports"
(cd "$work" && find exports -name '*.parquet' -printf '%10s  %p\n' | sort -k2)
ow_log "objects in the bucket"
(cd "$OW_S3_ROOT" && find outreach-demo -name '*.parquet' -printf '%10s  %p\n' | sort -k2)
ow_log "audit rows"
ow_psql -d marketing -c "SELECT id, details->>'status' AS status, details->'companies'->>'good' AS companies_good,
    details->'people'->>'good' AS people_good, details->>'uploaded' AS uploaded, details->>'skipped' AS skipped
    FROM shq.audit_log ORDER BY id"
