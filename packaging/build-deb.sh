#!/usr/bin/env bash
# Builds the Debian package from the release binary with plain dpkg-deb.
#   packaging/build-deb.sh [OUT_DIR]          # default OUT_DIR: $CARGO_TARGET_DIR/debian
#   OW_BIN=/path/to/outreach-workbench packaging/build-deb.sh OUT_DIR   # use that binary, no build
# Prints the path of the .deb.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
given_bin=${OW_BIN:-}
source "$here/../scripts/lib/services.sh"
cd "$OW_ROOT"
out=${1:-$CARGO_TARGET_DIR/debian}
if [ -n "$given_bin" ]; then
    OW_BIN=$given_bin
else
    ow_build
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 "$OW_BIN" "$stage/usr/bin/outreach-workbench"
install -D -m 0644 systemd/outreach-workbench.service "$stage/lib/systemd/system/outreach-workbench.service"
install -D -m 0640 config.toml "$stage/etc/outreach-workbench/config.toml"
install -D -m 0600 packaging/debian/env "$stage/etc/outreach-workbench/env"
install -D -m 0644 README.md "$stage/usr/share/doc/outreach-workbench/README.md"
install -D -m 0644 config.toml "$stage/usr/share/doc/outreach-workbench/config.toml.example"
install -d "$stage/DEBIAN"
for f in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$f" "$stage/DEBIAN/$f"
done
install -m 0644 packaging/debian/conffiles "$stage/DEBIAN/conffiles"
size=$(du -sk "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    packaging/debian/control >"$stage/DEBIAN/control"

mkdir -p "$out"
deb="$out/outreach-workbench_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
