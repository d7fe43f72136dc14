# The prebuilt DuckDB the build links (sourced by services.sh).
#
# DuckDB's own release of libduckdb.so for linux-x64 is shipped inside the
# npm package @duckdb/node-bindings-linux-x64 (the official Node.js bindings
# load it from there). It is taken once per machine with npm's ordinary
# client, checked against the SHA-256 pinned below, and kept in
#   $OW_CACHE/duckdb/<version>/libduckdb.so
# DUCKDB_LIB_DIR then tells libduckdb-sys where to link it from, and our
# build.rs sets the binaries' RUNPATH to the same folder.
#
# To upgrade: change the three values (duckdb-rs must have the same DuckDB
# version: Cargo.toml's duckdb = "=X.Y.Z"), run scripts/test.sh, which fails
# on the old checksum and prints the new one, and read what docs/building.md says
# a DuckDB upgrade changes.

OW_DUCKDB_VERSION=1.4.5
OW_DUCKDB_NPM_VERSION=1.4.5-r.1
# SHA-256 of libduckdb.so itself (not of the tarball, whose packing may change).
OW_DUCKDB_SHA256=5062c3ba89fb37e818baf2bf8b0f914ec8f46d78584d8e412810b5d1bff3bfe8

# Exports DUCKDB_LIB_DIR, fetching the library first when the cache lacks it.
# With OW_BUNDLED_DUCKDB=1 nothing is fetched: the build compiles DuckDB.
ow_ensure_duckdb() {
    if [ "${OW_BUNDLED_DUCKDB:-0}" = 1 ]; then
        unset DUCKDB_LIB_DIR
        return 0
    fi
    local dir=$OW_CACHE/duckdb/$OW_DUCKDB_VERSION
    # Checked at every build (0.1 s): a library changed in the cache is taken again.
    if [ ! -f "$dir/libduckdb.so" ] || [ "$(sha256sum <"$dir/libduckdb.so" | cut -d' ' -f1)" != "$OW_DUCKDB_SHA256" ]; then
        if [ "$(uname -m)" != x86_64 ]; then
            ow_log "no prebuilt DuckDB pinned for $(uname -m): build with OW_BUNDLED_DUCKDB=1"
            return 1
        fi
        command -v npm >/dev/null || {
            ow_log "npm is needed to fetch the prebuilt DuckDB (apt-get install npm), or build with OW_BUNDLED_DUCKDB=1"
            return 1
        }
        ow_log "fetching DuckDB $OW_DUCKDB_VERSION (@duckdb/node-bindings-linux-x64@$OW_DUCKDB_NPM_VERSION, once per machine)"
        local tmp got
        tmp=$(mktemp -d)
        if ! (cd "$tmp" && npm pack --silent "@duckdb/node-bindings-linux-x64@$OW_DUCKDB_NPM_VERSION" >/dev/null); then
            rm -rf "$tmp"
            ow_log "npm could not fetch @duckdb/node-bindings-linux-x64@$OW_DUCKDB_NPM_VERSION"
            return 1
        fi
        tar -xzf "$tmp"/*.tgz -C "$tmp" package/libduckdb.so package/LICENSE
        got=$(sha256sum "$tmp/package/libduckdb.so" | cut -d' ' -f1)
        if [ "$got" != "$OW_DUCKDB_SHA256" ]; then
            rm -rf "$tmp"
            ow_log "libduckdb.so from @duckdb/node-bindings-linux-x64@$OW_DUCKDB_NPM_VERSION has SHA-256 $got," \
                "not the $OW_DUCKDB_SHA256 pinned in scripts/lib/duckdb.sh: refusing to build with it"
            return 1
        fi
        mkdir -p "$dir"
        mv "$tmp/package/libduckdb.so" "$tmp/package/LICENSE" "$dir/"
        rm -rf "$tmp"
    fi
    export DUCKDB_LIB_DIR=$dir
}

# A Python with the previous release's DuckDB (1.2), for the test that opens
# a workbench that release wrote. Exports OW_DUCKDB_1_2_PYTHON, or leaves it
# unset with the reason printed, and that test skips.
ow_prepare_old_duckdb() {
    unset OW_DUCKDB_1_2_PYTHON
    local venv=$OW_CACHE/py-duckdb-1.2
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        ow_log "installing Python's duckdb 1.2.2 in $venv (once per machine, for the workbench upgrade test)"
        rm -rf "$venv"
        if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q duckdb==1.2.2; } >"$OW_CACHE/py-duckdb-1.2.log" 2>&1; then
            ow_log "could not install duckdb 1.2.2 for Python (see $OW_CACHE/py-duckdb-1.2.log): the workbench upgrade test will skip"
            return 0
        fi
    fi
    export OW_DUCKDB_1_2_PYTHON=$venv/bin/python
}
