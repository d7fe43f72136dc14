#!/usr/bin/env bash
# Builds the Debian package with debhelper from the release binary.
#   packaging/build-deb.sh [OUT_DIR]          # default OUT_DIR: $CARGO_TARGET_DIR/debian
#   OW_BIN=/path/to/outreach-workbench packaging/build-deb.sh OUT_DIR   # use that binary, no build
# Prints the path of the .deb (the -dbgsym package lands beside it).
#
# Nothing is compiled by debhelper: this script stages the binary (its
# RUNPATH set to the package's private folder), the prebuilt libduckdb.so,
# the man page and completions the binary writes, and packaging/debian/;
# dh strips, splits the debug symbols off, and writes the maintainer scripts.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
given_bin=${OW_BIN:-}
source "$here/../scripts/lib/services.sh"
cd "$OW_ROOT"
out=${1:-$CARGO_TARGET_DIR/debian}
for tool in dpkg-buildpackage dh patchelf; do
    command -v "$tool" >/dev/null || {
        ow_log "packaging needs $tool: apt-get install dpkg-dev debhelper patchelf"
        exit 1
    }
done
ow_ensure_duckdb
if [ -n "$given_bin" ]; then
    OW_BIN=$given_bin
else
    ow_build
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
maintainer=$(sed -n 's/^authors = \["\(.*\)"\]/\1/p' Cargo.toml | head -n 1)
changelog_version=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$changelog_version" != "$version" ]; then
    ow_log "packaging/debian/changelog is at $changelog_version, Cargo.toml at $version: add a changelog entry"
    exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
src=$stage/outreach-workbench-$version
mkdir -p "$src/build/etc" "$src/build/completions"
cp -r packaging/debian "$src/debian"
sed -i "s|@MAINTAINER@|$maintainer|" "$src/debian/control" "$src/debian/changelog" "$src/debian/NEWS"
cp systemd/outreach-workbench.service "$src/debian/outreach-workbench.service"
cp "systemd/outreach-workbench-run@.service" "$src/build/outreach-workbench-run@.service"
install -m 0755 "$OW_BIN" "$src/build/outreach-workbench"
# Installed at /usr/lib/outreach-workbench, found from /usr/bin through
# $ORIGIN (also when the package is unpacked anywhere else).
patchelf --set-rpath '$ORIGIN/../lib/outreach-workbench' "$src/build/outreach-workbench"
install -m 0644 "$DUCKDB_LIB_DIR/libduckdb.so" "$src/build/libduckdb.so"
"$OW_BIN" docs --out "$src/build/completions"
# bash-completion looks the command's completions up by its bare name.
mkdir "$src/build/completions/bash"
mv "$src/build/completions/outreach-workbench.bash" "$src/build/completions/bash/outreach-workbench"
cp config.toml "$src/build/etc/config.toml"
cp packaging/debian/env "$src/build/etc/env"
cp README.md "$src/build/README.md"
cp -r docs "$src/build/docs"
cp config.toml "$src/build/config.toml.example"

(cd "$src" && dpkg-buildpackage -b -us -uc --no-sign >"$stage/build.log" 2>&1) || {
    cat "$stage/build.log" >&2
    exit 1
}
mkdir -p "$out"
arch=$(dpkg --print-architecture)
cp "$stage"/*.deb "$out/"
echo "$out/outreach-workbench_${version}_${arch}.deb"
