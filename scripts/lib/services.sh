# Shared by scripts/test.sh, scripts/demo.sh and scripts/bench.sh: the build
# environment, and throw-away local services on free loopback ports.
#
#   source scripts/lib/services.sh
#   ow_prepare            # packages, s3s-fs, build environment
#   ow_start_services     # PostgreSQL cluster + S3 server; stopped on exit
#
# Everything started here is stopped by the EXIT trap it installs.

OW_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OW_CACHE=${OW_CACHE:-$HOME/.cache/outreach-workbench}
# One target dir outside the checkout, shared by every clone. Nothing about
# the build environment (CC, RUSTFLAGS, profile, features) may vary between
# scripts, or it is rebuilt (with OW_BUNDLED_DUCKDB=1, DuckDB's C++ too:
# half an hour).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$OW_CACHE/target}
# The features every cargo command of the scripts builds with.
OW_FEATURES=()
[ "${OW_BUNDLED_DUCKDB:-0}" != 1 ] || OW_FEATURES=(--features bundled-duckdb)
OW_BIN=${OW_BIN:-$CARGO_TARGET_DIR/release/outreach-workbench}
S3S_VERSION=0.14.1
S3S_BIN=$OW_CACHE/tools/bin/s3s-fs

ow_log() { printf '==> %s\n' "$*" >&2; }

source "$OW_ROOT/scripts/lib/duckdb.sh"

ow_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Debian packages the scripts need; installed only when missing.
ow_ensure_packages() {
    local missing=()
    command -v pg_createcluster >/dev/null || missing+=(postgresql postgresql-contrib)
    dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    [ -x /usr/bin/time ] || missing+=(time)
    command -v python3 >/dev/null || missing+=(python3)
    command -v bc >/dev/null || missing+=(bc)
    # The prebuilt DuckDB comes from a package of the npm registry.
    command -v npm >/dev/null || missing+=(npm)
    [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
    ow_install "${missing[@]}"
}

# The tools the suite checks our output with: the package (dpkg-buildpackage,
# debhelper, patchelf, lintian), the metrics (promtool, node_exporter), the
# workbench upgrade (a Python venv). A test whose tool is still missing
# skips and says so. (Debian's prometheus package brings promtool with the
# server; on a machine running systemd, the server starts on :9090.)
ow_ensure_test_packages() {
    local missing=()
    command -v dpkg-buildpackage >/dev/null || missing+=(dpkg-dev)
    command -v dh >/dev/null || missing+=(debhelper)
    command -v patchelf >/dev/null || missing+=(patchelf)
    command -v lintian >/dev/null || missing+=(lintian)
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v prometheus-node-exporter >/dev/null || missing+=(prometheus-node-exporter)
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    # The report page is checked in a real browser.
    command -v chromium >/dev/null || missing+=(chromium)
    [ ${#missing[@]} -eq 0 ] || ow_install --no-install-recommends "${missing[@]}" ||
        ow_log "could not install ${missing[*]}: the tests that need them skip"
    ow_ensure_playwright
}

# playwright-core drives Debian's Chromium for the report page's tests
# (tests/browser/check_page.cjs); it downloads no browser of its own.
# Installed once per machine, outside the checkout.
PLAYWRIGHT_VERSION=1.64.1
ow_ensure_playwright() {
    local dir=$OW_CACHE/tools/browser
    if [ ! -f "$dir/node_modules/playwright-core/package.json" ] ||
        ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$dir/node_modules/playwright-core/package.json"; then
        ow_log "installing playwright-core $PLAYWRIGHT_VERSION (once per machine)"
        mkdir -p "$dir"
        [ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
        (cd "$dir" && npm install --no-audit --no-fund --silent "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null) ||
            ow_log "could not install playwright-core: the report page's browser tests skip"
    fi
    [ ! -f "$dir/node_modules/playwright-core/package.json" ] ||
        export OW_PLAYWRIGHT=$dir/node_modules/playwright-core
}

ow_install() {
    if [ $# -gt 0 ]; then
        ow_log "installing $*"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    fi
}

ow_ensure_s3s() {
    if [ ! -x "$S3S_BIN" ]; then
        ow_log "installing s3s-fs $S3S_VERSION (a local S3 server, once per machine)"
        cargo install s3s-fs --version "$S3S_VERSION" --locked --features binary \
            --root "$OW_CACHE/tools" --quiet
    fi
}

ow_prepare() {
    ow_ensure_packages
    ow_ensure_duckdb
    ow_ensure_s3s
}

# A Debian 12 root that boots a real systemd (252) in systemd-nspawn, for
# the suite's systemd test; built once per machine (~1 min) from the
# machine's own apt source, and never changed afterwards: each boot runs
# on a throw-away copy (--ephemeral). Exports OW_NSPAWN_ROOT, or leaves it
# unset with the reason printed, and the test skips.
ow_prepare_nspawn() {
    unset OW_NSPAWN_ROOT
    if [ "$(id -u)" -ne 0 ]; then
        ow_log "not root: the systemd test (systemd-nspawn) will skip"
        return 0
    fi
    if ! command -v systemd-nspawn >/dev/null || ! command -v debootstrap >/dev/null; then
        ow_log "installing systemd-container and debootstrap"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container debootstrap >/dev/null; then
            ow_log "could not install systemd-nspawn: the systemd test will skip"
            return 0
        fi
    fi
    local root=$OW_CACHE/nspawn/bookworm
    if [ ! -x "$root/lib/systemd/systemd" ]; then
        local mirror
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
        [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
        ow_log "building a Debian 12 root for the systemd test in $root (once per machine)"
        rm -rf "$root.tmp"
        mkdir -p "$(dirname "$root")"
        if ! debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,adduser,libssl3 \
            bookworm "$root.tmp" "$mirror" >"$OW_CACHE/nspawn/debootstrap.log" 2>&1; then
            ow_log "debootstrap failed (see $OW_CACHE/nspawn/debootstrap.log): the systemd test will skip"
            return 0
        fi
        echo ow-boot >"$root.tmp/etc/hostname"
        rm -rf "$root" && mv "$root.tmp" "$root"
    fi
    export OW_NSPAWN_ROOT=$root
}

# Cargo decides whether our own crates are fresh by their sources' mtimes
# alone, not by the checkout they were built from. After a build in another
# clone sharing the target dir (CI's fresh clone), this checkout would get
# that clone's binaries: its paths compiled in (`CARGO_MANIFEST_DIR`, which
# the tests read config.toml and packaging/ through) and none of this
# checkout's edits older than that build. So when the checkout changes, our
# two crates (not DuckDB, not the dependencies) are rebuilt: ~2 minutes.
ow_own_target_dir() {
    local mark=$CARGO_TARGET_DIR/.ow-checkout last
    last=$(cat "$mark" 2>/dev/null || true)
    [ "$last" != "$OW_ROOT" ] || return 0
    if [ -n "$last" ]; then
        ow_log "the target dir was last built from $last: rebuilding this checkout's crates"
        (cd "$OW_ROOT" && cargo clean --release --quiet -p outreach-workbench -p ow-duckdb)
    fi
    mkdir -p "$CARGO_TARGET_DIR" && printf '%s\n' "$OW_ROOT" >"$mark"
}

ow_build() {
    ow_own_target_dir
    if [ "${OW_BUNDLED_DUCKDB:-0}" = 1 ]; then
        ow_log "building (release; the first build with OW_BUNDLED_DUCKDB=1 compiles DuckDB, ~35 min)"
    else
        ow_log "building (release, linking the prebuilt DuckDB $OW_DUCKDB_VERSION)"
    fi
    (cd "$OW_ROOT" && cargo build --release --locked --quiet "${OW_FEATURES[@]}")
}

OW_STARTED=()

ow_stop_services() {
    local item
    for item in "${OW_STARTED[@]}"; do
        case $item in
            pg:*)
                IFS=: read -r _ ver name <<<"$item"
                pg_dropcluster "$ver" "$name" --stop >/dev/null 2>&1 || true ;;
            pid:*)
                kill "${item#pid:}" 2>/dev/null || true ;;
            dir:*)
                rm -rf "${item#dir:}" ;;
        esac
    done
    OW_STARTED=()
}

# Starts a private PostgreSQL cluster (TLS on, with Debian's snakeoil cert),
# PgBouncer in front of it in transaction mode (as Neon's pooled endpoint),
# and an s3s-fs server, and exports where they are:
#   OW_PG_HOST OW_PG_PORT OW_PG_USER OW_PG_PASSWORD
#   OW_PGB_PORT (PgBouncer; unset when it could not start)
#   OW_S3_ENDPOINT OW_S3_ACCESS_KEY OW_S3_SECRET_KEY OW_S3_ROOT
ow_start_services() {
    trap ow_stop_services EXIT
    local ver name
    ver=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    name=ow_$$_$RANDOM
    export OW_PG_HOST=127.0.0.1 OW_PG_PORT OW_PG_USER=ow_test OW_PG_PASSWORD=ow-test-password
    OW_PG_PORT=$(ow_free_port)
    ow_log "starting PostgreSQL $ver cluster $name on 127.0.0.1:$OW_PG_PORT"
    OW_STARTED+=("pg:$ver:$name")
    # (pg_createcluster quotes values itself and takes 127.0.0.1 for a number)
    pg_createcluster "$ver" "$name" -p "$OW_PG_PORT" --start \
        -o fsync=off -o synchronous_commit=off -o full_page_writes=off \
        -o listen_addresses=localhost -o max_connections=200 >/dev/null
    runuser -u postgres -- psql -q -p "$OW_PG_PORT" -h /var/run/postgresql -d postgres \
        -c "CREATE ROLE $OW_PG_USER LOGIN SUPERUSER PASSWORD '$OW_PG_PASSWORD'" >/dev/null

    ow_start_pgbouncer

    export OW_S3_ENDPOINT OW_S3_ACCESS_KEY=ow-test-key OW_S3_SECRET_KEY=ow-test-secret OW_S3_ROOT
    local port
    port=$(ow_free_port)
    OW_S3_ROOT=$(mktemp -d /tmp/ow-s3.XXXXXX)
    OW_STARTED+=("dir:$OW_S3_ROOT")
    OW_S3_ENDPOINT=http://127.0.0.1:$port
    ow_log "starting s3s-fs on $OW_S3_ENDPOINT (root $OW_S3_ROOT)"
    "$S3S_BIN" --host 127.0.0.1 --port "$port" \
        --access-key "$OW_S3_ACCESS_KEY" --secret-key "$OW_S3_SECRET_KEY" \
        "$OW_S3_ROOT" >"$OW_S3_ROOT.log" 2>&1 &
    OW_STARTED+=("pid:$!")
    for _ in $(seq 1 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        sleep 0.1
    done
    ow_log "s3s-fs did not start:"; cat "$OW_S3_ROOT.log" >&2
    return 1
}

# Debian's PgBouncer (1.18: no prepared-statement support) in transaction
# mode with 3 server connections per database, so that server connections
# are shared between clients the way Neon's pooler shares them. Runs as the
# postgres user (it refuses root) from a folder of its own.
ow_start_pgbouncer() {
    unset OW_PGB_PORT
    if [ ! -x /usr/sbin/pgbouncer ]; then
        ow_log "PgBouncer is not installed; the pooled tests will skip"
        return 0
    fi
    local dir port
    dir=$(mktemp -d /tmp/ow-pgbouncer.XXXXXX)
    OW_STARTED+=("dir:$dir")
    port=$(ow_free_port)
    printf '"%s" "%s"\n' "$OW_PG_USER" "$OW_PG_PASSWORD" >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$OW_PG_PORT
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 3
max_client_conn = 500
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
    chown -R postgres "$dir"
    ow_log "starting PgBouncer (transaction pooling) on 127.0.0.1:$port"
    runuser -u postgres -- /usr/sbin/pgbouncer "$dir/pgbouncer.ini" >"$dir/stdout.log" 2>&1 &
    OW_STARTED+=("pid:$!")
    for _ in $(seq 1 50); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            export OW_PGB_PORT=$port
            return 0
        fi
        sleep 0.1
    done
    ow_log "PgBouncer did not start; the pooled tests will skip:"
    cat "$dir/stdout.log" "$dir/pgbouncer.log" >&2 2>/dev/null || true
}

# psql as the test superuser against the private cluster.
ow_psql() {
    PGPASSWORD=$OW_PG_PASSWORD PGOPTIONS='-c client_min_messages=warning' psql -q -X -v ON_ERROR_STOP=1 -h "$OW_PG_HOST" -p "$OW_PG_PORT" \
        -U "$OW_PG_USER" "$@"
}
