#!/usr/bin/env bash
# The whole test suite, against a real PostgreSQL and a real S3 server that
# this script starts on free loopback ports and stops when it exits.
#   scripts/test.sh                 # everything
#   scripts/test.sh dedup           # only tests whose name contains "dedup"
#
# The one-shot tests (pipeline, gates, cli, types), the in-process daemon
# (serve) and the daemon tests that cancel a pull run a second time with
# every run going through PgBouncer in transaction mode, as production
# reaches Neon's pooled endpoint. Without a filter it ends with a short
# fault soak (scripts/soak.sh, 2 minutes, a fixed seed; SOAK_MINUTES=0
# skips it).
set -euo pipefail
source "$(dirname "$0")/lib/services.sh"
cd "$OW_ROOT"

ow_prepare
ow_ensure_test_packages
ow_prepare_nspawn
ow_prepare_old_duckdb
ow_log "cargo fmt --check"
cargo fmt --all -- --check
ow_log "no import circle between files"
python3 scripts/lib/import_graph.py "$OW_ROOT"
ow_build
ow_log "cargo clippy"
cargo clippy --release --locked --workspace --all-targets --quiet "${OW_FEATURES[@]}" -- -D warnings
ow_start_services
ow_log "cargo test"
cargo test --release --locked --workspace --no-fail-fast "${OW_FEATURES[@]}" -- "$@"
if [ -n "${OW_PGB_PORT:-}" ]; then
    filters=("$@")
    [ ${#filters[@]} -gt 0 ] || filters=(pipeline:: gates:: cli:: types:: serve:: all_states:: sigterm_during_a_run a_run_over_its_timeout)
    ow_log "cargo test, the one-shot tests again through PgBouncer (transaction pooling)"
    OW_TEST_POOLED=1 cargo test --release --locked --no-fail-fast "${OW_FEATURES[@]}" -- "${filters[@]}"
else
    ow_log "PgBouncer is not running: the pooled pass is skipped"
fi
if [ $# -eq 0 ] && [ "${SOAK_MINUTES:-2}" != 0 ]; then
    ow_log "the fault soak, ${SOAK_MINUTES:-2} minutes, seed ${SOAK_SEED:-20261207}"
    bash "$OW_ROOT/scripts/soak.sh" --minutes "${SOAK_MINUTES:-2}" --seed "${SOAK_SEED:-20261207}"
fi
