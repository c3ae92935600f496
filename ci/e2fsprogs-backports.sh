#!/usr/bin/env bash
# e2fsprogs >= 1.47.1 (mke2fs -d reads a tar stream: `mke2fs -d - IMG`) from
# <codename>-backports, unpacked into a scratch prefix; the system's e2fsprogs
# is not touched. Used by the `disk` section of `cargo xtask bench` (the rival).
#
#   ci/e2fsprogs-backports.sh        # prints the path of a mke2fs wrapper
#
# The wrapper sets LD_LIBRARY_PATH (the backports libext2fs2, libcom-err2,
# libss2 and libarchive13, which mke2fs dlopens for tar input) and
# MKE2FS_CONFIG (the backports mke2fs.conf), then execs the backports mke2fs.
#
# Sources: the mirror URI the machine already uses for its Debian suite
# (ci/debian-mirror.sh reads it from the apt sources; DEBIAN_MIRROR overrides),
# with the suites <codename> and <codename>-backports, in a private apt state
# (lists, cache): neither the system's package lists nor its installed
# packages change. Idempotent: a finished install prints its path at once.
# Only the path goes to stdout; progress and errors go to stderr.
#
# Cache: ${OSBUILDER_CACHE:-~/.cache/osbuilder}/tools/e2fsprogs-backports/
set -euo pipefail

CACHE="${OSBUILDER_CACHE:-${HOME}/.cache/osbuilder}"
TOOLS="$CACHE/tools"
DEST="$TOOLS/e2fsprogs-backports"
WRAPPER="$DEST/mke2fs"

log() { echo "e2fsprogs-backports: $*" >&2; }
die() { echo "e2fsprogs-backports: error: $*" >&2; exit 1; }

if [ -x "$WRAPPER" ] && [ -e "$DEST/.ok" ]; then
  echo "$WRAPPER"
  exit 0
fi

mkdir -p "$TOOLS"
exec 9>"$TOOLS/.e2fsprogs-backports.lock"
flock 9
if [ -x "$WRAPPER" ] && [ -e "$DEST/.ok" ]; then
  echo "$WRAPPER"
  exit 0
fi

# shellcheck disable=SC1091
. /etc/os-release
CODENAME="${VERSION_CODENAME:-}"
[ -n "$CODENAME" ] || die "no VERSION_CODENAME in /etc/os-release"
[ "${ID:-}" = debian ] || die "not Debian (ID=${ID:-?}): no ${CODENAME}-backports suite to use"

# The mirror URI (and keyring) of the entry that carries the bare <codename> suite.
line="$(bash "$(dirname "$0")/debian-mirror.sh" --keyring)"
URI="${line%%$'\t'*}"
KEY="${line#*$'\t'}"
[ -n "$KEY" ] || KEY=/usr/share/keyrings/debian-archive-keyring.gpg
log "mirror $URI, suites $CODENAME ${CODENAME}-backports"

STAGE="$(mktemp -d "$TOOLS/.e2fsprogs-backports.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
APT="$STAGE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
cat >"$APT/sources.sources" <<EOF
Types: deb
URIs: $URI
Suites: $CODENAME ${CODENAME}-backports
Components: main
Signed-By: $KEY
EOF
APT_OPTS=(
  -o "Dir::Etc::sourcelist=$APT/sources.sources"
  -o "Dir::Etc::sourceparts=-"
  -o "Dir::State::Lists=$APT/lists"
  -o "Dir::Cache=$APT/cache"
  -o "Dir::State::status=/dev/null"
  -o "APT::Get::List-Cleanup=0"
  -o "APT::Sandbox::User=root"
)
apt-get "${APT_OPTS[@]}" update -qq >&2 || die "apt-get update of $CODENAME and ${CODENAME}-backports failed"

# mke2fs needs the libext2fs2 of its own version (Pre-Depends: libext2fs2 (= V));
# take the whole e2fsprogs library set from backports. libarchive13 comes from
# the release (t64 renamed it after bookworm: try both names).
BP="${CODENAME}-backports"
version="$(apt-cache "${APT_OPTS[@]}" show "e2fsprogs/$BP" 2>/dev/null | awk '/^Version:/ { print $2; exit }')"
[ -n "$version" ] || die "no e2fsprogs in $BP"
dpkg --compare-versions "$version" ge 1.47.1 || die "e2fsprogs in $BP is $version, older than 1.47.1 (no tar input)"
pkgs=("e2fsprogs/$BP")
for lib in libext2fs2 libext2fs2t64 libcom-err2 libss2; do
  if apt-cache "${APT_OPTS[@]}" show "$lib/$BP" >/dev/null 2>&1; then pkgs+=("$lib/$BP"); fi
done
for lib in libarchive13 libarchive13t64; do
  if apt-cache "${APT_OPTS[@]}" show "$lib/$CODENAME" >/dev/null 2>&1; then pkgs+=("$lib/$CODENAME"); break; fi
done
log "downloading ${pkgs[*]}"
(cd "$APT/debs" && apt-get "${APT_OPTS[@]}" download -qq "${pkgs[@]}" >&2) || die "apt-get download ${pkgs[*]} failed"

ROOT="$STAGE/root"
mkdir -p "$ROOT"
for deb in "$APT/debs"/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
[ -x "$ROOT/sbin/mke2fs" ] || [ -x "$ROOT/usr/sbin/mke2fs" ] || die "the e2fsprogs package has no mke2fs"

# The wrapper resolves its own directory, so the prefix may be renamed.
cat >"$ROOT/mke2fs" <<'EOF'
#!/bin/sh
d="$(dirname "$(readlink -f "$0")")"
bin="$d/sbin/mke2fs"; [ -x "$bin" ] || bin="$d/usr/sbin/mke2fs"
LD_LIBRARY_PATH="$d/lib/x86_64-linux-gnu:$d/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
MKE2FS_CONFIG="$d/etc/mke2fs.conf" exec "$bin" "$@"
EOF
chmod +x "$ROOT/mke2fs"
multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
[ "$multiarch" = x86_64-linux-gnu ] || sed -i "s/x86_64-linux-gnu/$multiarch/g" "$ROOT/mke2fs"

# Smoke test: a tar stream on stdin becomes a clean filesystem with the file in it.
t="$STAGE/smoke"
mkdir -p "$t/tree/etc"
echo hello >"$t/tree/etc/hello"
truncate -s 8M "$t/img"
tar -C "$t/tree" -c . | "$ROOT/mke2fs" -q -F -t ext4 -b 4096 -d - "$t/img" >&2 \
  || die "backports mke2fs cannot read a tar stream (-d -)"
e2fsck -fn "$t/img" >/dev/null 2>&1 || die "the smoke-test image is not clean (e2fsck -fn)"
debugfs -R "cat /etc/hello" "$t/img" 2>/dev/null | grep -qx hello || die "the smoke-test image lacks /etc/hello"
rm -rf "$t" "$APT"

echo "$version" >"$ROOT/.ok"
rm -rf "$DEST"
mv "$ROOT" "$DEST"
log "mke2fs $version at $WRAPPER"
echo "$WRAPPER"
