#!/usr/bin/env bash
# External tools the guest tests use, built reproducibly and cached outside the repo.
#
#   ci/tools.sh vhost-device-vsock   # prints the path of the vhost-device-vsock binary
#   ci/tools.sh virtiofsd            # prints the path of the virtiofsd binary (virtio-fs tests)
#   ci/tools.sh kata-agent-ctl       # prints the path of Kata's kata-agent-ctl binary
#   ci/tools.sh cargo-fuzz           # prints the path of the cargo-fuzz binary (cargo xtask fuzz)
#   ci/tools.sh path <tool>          # prints the path only if already cached (exit 1 if not)
#   ci/tools.sh kata-src-bundle OUT.tar.gz   # writes the sources agent-ctl needs, for KATA_SRC
#
# The first call installs/builds the tool (minutes); later calls print the cached path at
# once. Only the path goes to stdout; progress and errors go to stderr. See ci/TOOLS.md.
#
# Cache: ${OSBUILDER_CACHE:-~/.cache/osbuilder}/tools/<tool>-<version>/bin/<tool>.
# Each tool is built in a temporary directory next to its final place and renamed into
# place only once it works, so an interrupted build never leaves a broken cache entry.
# Concurrent callers serialize on a lock file (flock).
#
# Environment:
#   OSBUILDER_CACHE       cache root (default ~/.cache/osbuilder)
#   TOOLS_JOBS            cargo -j value (default: cargo's own)
#   TOOLS_NICE            nice level for builds (default 10)
#   KATA_SRC              kata-containers source tree (git checkout or extracted archive), or a
#                         bundle from `kata-src-bundle` (its directory or the .tar.gz itself)
#   KATA_REF              ref to build from KATA_MIRROR when KATA_SRC is unset (default 4.1.0)
#   KATA_MIRROR           bare git dir of kata-containers (`git clone --mirror`), used when KATA_SRC is unset
#   KATA_CH_SRC           cloud-hypervisor source tree (for its api_client crate), else CH_MIRROR
#   CH_MIRROR             bare git dir of cloud-hypervisor
#   KATA_PCILIBS_SRC      pcilibs-rs source tree, else PCILIBS_MIRROR
#   PCILIBS_MIRROR        bare git dir of kata-containers/pcilibs-rs
# Kata's sources come only from these variables: no package registry carries them, and no
# default location is assumed (see ci/TOOLS.md for how to get them).
set -euo pipefail

VHOST_DEVICE_VSOCK_VERSION=0.3.0   # newest release of the crate; builds with rustc 1.95
KATA_DEFAULT_REF=4.1.0             # newest Kata release whose rust-toolchain is 1.95
CARGO_FUZZ_VERSION=0.13.2          # builds with rustc 1.95; `-s none` builds targets on stable
VIRTIOFSD_VERSION=1.14.0           # newest release of the crate; needs libseccomp-dev, libcap-ng-dev

CACHE="${OSBUILDER_CACHE:-${HOME}/.cache/osbuilder}"
TOOLS="$CACHE/tools"
NICE="${TOOLS_NICE:-10}"
JOBS=()
if [ -n "${TOOLS_JOBS:-}" ]; then JOBS=(-j "$TOOLS_JOBS"); fi

KATA_MIRROR="${KATA_MIRROR:-}"
CH_MIRROR="${CH_MIRROR:-}"
PCILIBS_MIRROR="${PCILIBS_MIRROR:-}"

log() { echo "tools: $*" >&2; }
die() { echo "tools: error: $*" >&2; exit 1; }

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# Serialize on a per-tool lock; the lock is released when this script exits.
take_lock() {
  mkdir -p "$TOOLS"
  exec 9>"$TOOLS/.$1.lock"
  if ! flock -n 9; then
    log "waiting for another build of $1 to finish"
    flock 9
  fi
}

# Temp dir next to the final place (same filesystem, so the final rename is atomic).
# Anything left by an earlier, interrupted run is removed first (we hold the lock).
TMP_DIRS=()
cleanup() { local d; for d in "${TMP_DIRS[@]+"${TMP_DIRS[@]}"}"; do rm -rf "$d"; done; }
trap cleanup EXIT
make_tmp() { # sets TMP
  rm -rf "$TOOLS/.$1.tmp."*
  TMP="$(mktemp -d "$TOOLS/.$1.tmp.XXXXXX")"
  TMP_DIRS+=("$TMP")
}

scratch_tmp() { # sets TMP to a fresh private directory under $TMPDIR, removed on exit
  TMP="$(mktemp -d "${TMPDIR:-/tmp}/osbuilder-tools.XXXXXX")"
  TMP_DIRS+=("$TMP")
}

publish() { # publish TMPDIR DEST
  chmod 755 "$1"
  mv -T "$1" "$2" || die "could not move $1 to $2"
}

# ---------------------------------------------------------------------------------------
# vhost-device-vsock (rust-vmm, from cargo's registry)

vhost_device_vsock_dest() { echo "$TOOLS/vhost-device-vsock-$VHOST_DEVICE_VSOCK_VERSION"; }

vhost_device_vsock() {
  cargo_install_tool vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION" "$(vhost_device_vsock_dest)" "3-4 minutes"
}

# ---------------------------------------------------------------------------------------
# virtiofsd (the virtio-fs project's vhost-user daemon, from cargo's registry): shares a
# host directory with a guest over virtio-fs. Links libseccomp and libcap-ng
# (ci/setup.sh installs their -dev packages).

virtiofsd() {
  cargo_install_tool virtiofsd "$VIRTIOFSD_VERSION" "$TOOLS/virtiofsd-$VIRTIOFSD_VERSION" "3-5 minutes"
}

# cargo_install_tool NAME VERSION DEST DURATION: `cargo install --locked` of a crate from
# cargo's registry into DEST (built in a temp dir beside it, renamed into place once its
# binary runs), printing DEST/bin/NAME. --locked: the crate's own Cargo.lock, so every
# machine builds the same dependency set.
cargo_install_tool() {
  local name="$1" version="$2" dest="$3" duration="$4" bin tmp t0
  bin="$dest/bin/$name"
  if [ -x "$bin" ]; then echo "$bin"; return; fi
  command -v cargo >/dev/null || die "cargo not found (install Rust; see README)"
  take_lock "$name-$version"
  if [ -x "$bin" ]; then echo "$bin"; return; fi
  make_tmp "$name-$version"; tmp="$TMP"
  log "installing $name $version with cargo install (about $duration)"
  t0=$SECONDS
  CARGO_TARGET_DIR="$tmp/target" nice -n "$NICE" cargo install --locked --quiet "${JOBS[@]}" \
    --version "$version" --root "$tmp" "$name" >&2 \
    || die "cargo install $name $version failed"
  rm -rf "$tmp/target"
  "$tmp/bin/$name" --version >/dev/null 2>&1 || die "the freshly built $name does not run"
  {
    echo "tool=$name"
    echo "version=$version"
    echo "source=cargo install --locked"
    echo "rustc=$(rustc --version)"
    echo "build_seconds=$((SECONDS - t0))"
  } > "$tmp/BUILD-INFO"
  publish "$tmp" "$dest"
  log "$name built in $((SECONDS - t0)) s"
  echo "$bin"
}

# ---------------------------------------------------------------------------------------
# cargo-fuzz (rust-fuzz, from cargo's registry): drives libFuzzer for `cargo xtask fuzz`.
# Its default AddressSanitizer build needs a nightly rustc (-Zsanitizer); the project
# runs it with `--sanitizer none`, which uses only stable flags (see fuzz/README.md).

cargo_fuzz_dest() { echo "$TOOLS/cargo-fuzz-$CARGO_FUZZ_VERSION"; }

cargo_fuzz() {
  cargo_install_tool cargo-fuzz "$CARGO_FUZZ_VERSION" "$(cargo_fuzz_dest)" "2 minutes"
}

# ---------------------------------------------------------------------------------------
# kata-agent-ctl (kata-containers, src/tools/agent-ctl)
#
# agent-ctl lives in Kata's main workspace and depends (through runtime-rs' hypervisor crate)
# on two git dependencies that are in no crate registry: cloud-hypervisor's api_client and
# pcilibs-rs. The build reduces the workspace to agent-ctl and points those git sources at
# local copies with [patch]; everything else comes from cargo's registry, pinned by Kata's
# Cargo.lock. Git sources are recognised by their repository path, whatever the host.

# Paths of a kata tree that agent-ctl's build reads.
KATA_PATHS=(Cargo.toml Cargo.lock src/libs src/tools/agent-ctl src/runtime-rs src/dragonball)

no_kata_source() {
  die "no kata-containers source for kata-agent-ctl: no package registry carries it, and
  nothing is taken from anywhere you did not name. Provide one of:
  - KATA_SRC=<dir>: a kata-containers checkout (tag $KATA_DEFAULT_REF) or its extracted source
    archive, with KATA_CH_SRC=<cloud-hypervisor checkout> and KATA_PCILIBS_SRC=<pcilibs-rs
    checkout> (git dependencies of agent-ctl that no crate registry has);
  - KATA_SRC=<bundle dir or .tar.gz>: a self-contained source bundle made on a machine that has
    the sources with 'ci/tools.sh kata-src-bundle OUT.tar.gz';
  - KATA_MIRROR=<bare git dir of kata-containers> (git clone --mirror), with CH_MIRROR and
    PCILIBS_MIRROR (or KATA_CH_SRC and KATA_PCILIBS_SRC) for the two git dependencies.
  ci/TOOLS.md says where the repositories are and how to make a bundle."
}

kata_content_hash() { # hash of the agent-ctl-relevant part of a kata tree ($1)
  (cd "$1" && find "${KATA_PATHS[@]}" -name target -prune -o -type f -print0 \
     | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
}

# Sets KATA_KIND (mirror|dir|bundle), KATA_ID (short commit or content hash), KATA_DESC,
# and for bundles KATA_BUNDLE (the bundle's directory).
kata_resolve_source() {
  KATA_BUNDLE=""
  if [ -n "${KATA_SRC:-}" ]; then
    if [ -f "$KATA_SRC" ]; then                      # a bundle tarball
      scratch_tmp
      tar -xzf "$KATA_SRC" -C "$TMP" || die "cannot extract $KATA_SRC"
      KATA_BUNDLE="$TMP"
    elif [ -f "$KATA_SRC/BUNDLE-INFO" ]; then        # an extracted bundle
      KATA_BUNDLE="$KATA_SRC"
    fi
    if [ -n "$KATA_BUNDLE" ]; then
      [ -f "$KATA_BUNDLE/kata/src/tools/agent-ctl/Cargo.toml" ] || die "$KATA_SRC is not a kata source bundle"
      KATA_KIND=bundle
      KATA_ID="$(sed -n 's/^kata_id=//p' "$KATA_BUNDLE/BUNDLE-INFO")"
      [ -n "$KATA_ID" ] || die "$KATA_SRC: BUNDLE-INFO has no kata_id"
      KATA_DESC="bundle $KATA_SRC: $(sed -n 's/^kata=//p' "$KATA_BUNDLE/BUNDLE-INFO")"
      return
    fi
    [ -f "$KATA_SRC/src/tools/agent-ctl/Cargo.toml" ] \
      || die "KATA_SRC=$KATA_SRC is not a kata-containers tree (no src/tools/agent-ctl/Cargo.toml)"
    KATA_KIND=dir
    if [ "$(git -C "$KATA_SRC" rev-parse --show-toplevel 2>/dev/null)" = "$(cd "$KATA_SRC" && pwd -P)" ]; then
      KATA_ID="$(git -C "$KATA_SRC" rev-parse --short=12 HEAD)"
      if [ -n "$(git -C "$KATA_SRC" status --porcelain -- "${KATA_PATHS[@]}")" ]; then
        KATA_ID="$KATA_ID-dirty$(kata_content_hash "$KATA_SRC")"
      fi
    else
      KATA_ID="src$(kata_content_hash "$KATA_SRC")"
    fi
    KATA_DESC="KATA_SRC=$KATA_SRC ($KATA_ID)"
  elif [ -n "$KATA_MIRROR" ]; then
    [ -d "$KATA_MIRROR" ] || die "KATA_MIRROR=$KATA_MIRROR is not a directory (a bare git mirror of kata-containers)"
    local ref="${KATA_REF:-$KATA_DEFAULT_REF}" full
    full="$(git --git-dir="$KATA_MIRROR" rev-parse --verify -q "$ref^{commit}")" \
      || die "ref $ref not found in $KATA_MIRROR"
    KATA_KIND=mirror
    KATA_COMMIT="$full"
    KATA_ID="${full:0:12}"
    KATA_DESC="kata-containers $ref ($full) from $KATA_MIRROR"
  else
    # No source here: a build cached earlier on this machine still serves (the newest one).
    local cached
    cached="$(ls -td "$TOOLS"/kata-agent-ctl-*/bin/kata-agent-ctl 2>/dev/null | head -n1 || true)"
    [ -n "$cached" ] || no_kata_source
    KATA_KIND=cached
    KATA_ID="$(basename "$(dirname "$(dirname "$cached")")")"; KATA_ID="${KATA_ID#kata-agent-ctl-}"
    KATA_DESC="cached build $KATA_ID"
    log "no kata source named (KATA_SRC, KATA_MIRROR); using the cached build $KATA_ID"
  fi
}

# The commit a git dependency is locked to ($1: the repository's path, /owner/name; $2: Cargo.lock).
locked_git_rev() {
  grep -o "source = \"git+[^\"?#]*$1[?#][^\"]*\"" "$2" | head -n1 | sed 's/.*#\([0-9a-f]*\)"$/\1/'
}

# Copy cloud-hypervisor's root Cargo.toml and api_client at the locked commit into $1.
collect_api_client() {
  local out="$1" rev="$2"
  mkdir -p "$out"
  if [ -n "$KATA_BUNDLE" ]; then
    cp -a "$KATA_BUNDLE/ch/." "$out/"
  elif [ -n "${KATA_CH_SRC:-}" ]; then
    [ -f "$KATA_CH_SRC/api_client/Cargo.toml" ] || die "KATA_CH_SRC=$KATA_CH_SRC has no api_client/Cargo.toml"
    if git -C "$KATA_CH_SRC" rev-parse -q --verify "$rev^{commit}" >/dev/null 2>&1; then
      git -C "$KATA_CH_SRC" archive "$rev" Cargo.toml api_client | tar -x -C "$out"
    else
      log "warning: KATA_CH_SRC is not a git clone holding $rev; using its files as they are"
      cp -a "$KATA_CH_SRC/Cargo.toml" "$KATA_CH_SRC/api_client" "$out/"
    fi
  elif [ -n "$CH_MIRROR" ] && [ -d "$CH_MIRROR" ] && git --git-dir="$CH_MIRROR" rev-parse -q --verify "$rev^{commit}" >/dev/null; then
    git --git-dir="$CH_MIRROR" archive "$rev" Cargo.toml api_client | tar -x -C "$out"
  else
    die "kata-agent-ctl needs cloud-hypervisor's api_client at $rev (a git dependency in no crate registry).
  Set KATA_CH_SRC to a cloud-hypervisor checkout holding $rev, or CH_MIRROR to a bare mirror of it (see ci/TOOLS.md)."
  fi
  echo "api_client: cloud-hypervisor@$rev"
}

# Copy pcilibs-rs into $1. Kata locks zvonkok/pcilibs-rs@<rev> (a fork); its IOMMUFD work
# was merged into kata-containers/pcilibs-rs. The exact commit is used when available.
collect_pcilibs() {
  local out="$1" rev="$2" c=HEAD
  mkdir -p "$out"
  if [ -n "$KATA_BUNDLE" ]; then
    cp -a "$KATA_BUNDLE/pcilibs-rs/." "$out/"
    grep '^pcilibs-rs:' "$KATA_BUNDLE/BUNDLE-INFO" || echo "pcilibs-rs: from the bundle"
  elif [ -n "${KATA_PCILIBS_SRC:-}" ]; then
    [ -f "$KATA_PCILIBS_SRC/Cargo.toml" ] || die "KATA_PCILIBS_SRC=$KATA_PCILIBS_SRC has no Cargo.toml"
    if git -C "$KATA_PCILIBS_SRC" rev-parse -q --verify "$rev^{commit}" >/dev/null 2>&1; then
      git -C "$KATA_PCILIBS_SRC" archive "$rev" | tar -x -C "$out"
      echo "pcilibs-rs: $rev from KATA_PCILIBS_SRC"
    else
      (cd "$KATA_PCILIBS_SRC" && tar --exclude=./target --exclude=./.git -cf - .) | tar -x -C "$out"
      echo "pcilibs-rs: KATA_PCILIBS_SRC=$KATA_PCILIBS_SRC as is (Kata locks zvonkok/pcilibs-rs@$rev)"
    fi
  elif [ -n "$PCILIBS_MIRROR" ] && [ -d "$PCILIBS_MIRROR" ]; then
    if git --git-dir="$PCILIBS_MIRROR" rev-parse -q --verify "$rev^{commit}" >/dev/null; then c="$rev"; fi
    git --git-dir="$PCILIBS_MIRROR" archive "$c" | tar -x -C "$out"
    echo "pcilibs-rs: kata-containers/pcilibs-rs@$(git --git-dir="$PCILIBS_MIRROR" rev-parse "$c") (Kata locks zvonkok/pcilibs-rs@$rev)"
  else
    die "kata-agent-ctl needs pcilibs-rs (Kata locks zvonkok/pcilibs-rs@$rev, a git dependency;
  the registry's pcilibs-rs 0.1.0 lacks the IOMMUFD constants runtime-rs uses).
  Set KATA_PCILIBS_SRC to a kata-containers/pcilibs-rs checkout, or PCILIBS_MIRROR to a bare mirror of it (see ci/TOOLS.md)."
  fi
}

# Gather everything the build needs into $1/{kata,ch,pcilibs-rs}; notes go to $1/SOURCES.
kata_collect_sources() {
  local out="$1" lock rev
  mkdir -p "$out/kata"
  log "collecting sources: $KATA_DESC"
  case "$KATA_KIND" in
    mirror) git --git-dir="$KATA_MIRROR" archive "$KATA_COMMIT" "${KATA_PATHS[@]}" | tar -x -C "$out/kata" ;;
    dir) (cd "$KATA_SRC" && tar --exclude=target --exclude=.git -cf - "${KATA_PATHS[@]}") | tar -x -C "$out/kata" ;;
    bundle) cp -a "$KATA_BUNDLE/kata/." "$out/kata/" ;;
  esac
  lock="$out/kata/Cargo.lock"
  [ -f "$lock" ] || die "the kata tree has no Cargo.lock"
  : > "$out/SOURCES"
  rev="$(locked_git_rev /cloud-hypervisor/cloud-hypervisor "$lock")"
  if [ -n "$rev" ]; then collect_api_client "$out/ch" "$rev" >> "$out/SOURCES"; fi
  rev="$(locked_git_rev /zvonkok/pcilibs-rs "$lock")"
  if [ -n "$rev" ]; then collect_pcilibs "$out/pcilibs-rs" "$rev" >> "$out/SOURCES"; fi
}

# Replace the `members = [...]` list of the workspace manifest $1 with the single member $2.
trim_workspace_members() {
  awk -v m="$2" '
    BEGIN { skip = 0 }
    /^members *= *\[/ { print "members = [\"" m "\"]"; if ($0 !~ /\]/) skip = 1; next }
    skip && /^ *\]/ { skip = 0; next }
    !skip { print }' "$1" > "$1.osb" && mv "$1.osb" "$1"
}

# Make the collected tree in $1 buildable without reaching any git host.
kata_patch_workspace() {
  local w="$1" toml="$1/kata/Cargo.toml" lock="$1/kata/Cargo.lock" url ver
  # Only agent-ctl (and, through path dependencies, the kata crates it uses) in the workspace,
  # so the git dependencies of unrelated members (agent policy, genpolicy, ...) are not needed.
  trim_workspace_members "$toml" src/tools/agent-ctl
  # The tree may pin a toolchain that is not installed (kata main pins 1.96): use the installed one.
  rm -f "$w/kata/rust-toolchain.toml" "$w/kata/rust-toolchain"
  printf '\n# Added by osbuilder ci/tools.sh: git dependencies from local sources.\n' >> "$toml"
  for url in $(grep -o 'source = "git+[^?#"]*' "$lock" | sed 's/source = "git+//' | sort -u); do
    case "$url" in
      */cloud-hypervisor/cloud-hypervisor)
        # api_client inherits from cloud-hypervisor's workspace root: keep it, minus other members.
        trim_workspace_members "$w/ch/Cargo.toml" api_client
        printf '[patch."%s"]\napi_client = { path = "%s" }\n' "$url" "$w/ch/api_client" >> "$toml" ;;
      */zvonkok/pcilibs-rs)
        printf '[patch."%s"]\npcilibs-rs = { path = "%s" }\n' "$url" "$w/pcilibs-rs" >> "$toml" ;;
      */stratis-storage/devicemapper-rs)
        # An optional dependency of kata-types (feature "devicemapper") that agent-ctl never
        # enables. Cargo still needs a manifest for it (the lock file covers all features): an
        # empty crate of the locked version stands in; the build checks it is not compiled.
        ver="$(grep -A1 '^name = "devicemapper"$' "$lock" | sed -n 's/^version = "\(.*\)"/\1/p' | head -n1)"
        mkdir -p "$w/devicemapper-stub/src"
        : > "$w/devicemapper-stub/src/lib.rs"
        printf '[package]\nname = "devicemapper"\nversion = "%s"\nedition = "2021"\n' "${ver:-0.0.0}" \
          > "$w/devicemapper-stub/Cargo.toml"
        echo "devicemapper: empty stand-in $ver (optional dependency, not compiled)" >> "$w/SOURCES"
        printf '[patch."%s"]\ndevicemapper = { path = "%s" }\n' "$url" "$w/devicemapper-stub" >> "$toml" ;;
      *) ;; # used only by other workspace members; if agent-ctl needed it, cargo says so
    esac
  done
}

kata_agent_ctl_build() { # kata_agent_ctl_build TMPDIR -> TMPDIR/bin/kata-agent-ctl
  local tmp="$1" w="$1/work" target t0 secs
  # The target dir survives an interrupted build (registry crates are not rebuilt next time).
  target="$TOOLS/.kata-agent-ctl-$KATA_ID.target"
  kata_collect_sources "$w"
  kata_patch_workspace "$w"
  log "building kata-agent-ctl (debug profile; about 10 minutes on 2 busy cores)"
  t0=$SECONDS
  (cd "$w/kata" && CARGO_TARGET_DIR="$target" nice -n "$NICE" \
     cargo build "${JOBS[@]}" -p kata-agent-ctl >&2) \
    || die "cargo build of kata-agent-ctl failed (see above). If cargo tried to fetch a git repository,
  a new git dependency entered agent-ctl's dependency graph: give it a local source in kata_patch_workspace."
  secs=$((SECONDS - t0))
  if (cd "$w/kata" && cargo tree --offline -p kata-agent-ctl -i devicemapper >/dev/null 2>&1); then
    die "the devicemapper stand-in is part of kata-agent-ctl's build; provide the real source"
  fi
  mkdir -p "$tmp/bin"
  cp "$target/debug/kata-agent-ctl" "$tmp/bin/kata-agent-ctl"
  # Debug info is ~200 MB of the ~210 MB binary; the code is the same without it.
  if command -v strip >/dev/null; then strip "$tmp/bin/kata-agent-ctl"; fi
  "$tmp/bin/kata-agent-ctl" --version >/dev/null 2>&1 || die "the freshly built kata-agent-ctl does not run"
  {
    echo "tool=kata-agent-ctl"
    echo "kata=$KATA_DESC"
    echo "profile=debug (stripped)"
    cat "$w/SOURCES"
    echo "rustc=$(rustc --version)"
    echo "build_seconds=$secs"
  } > "$tmp/BUILD-INFO"
  cp "$w/kata/Cargo.lock" "$tmp/Cargo.lock"   # the dependency set actually built, for the record
  rm -rf "$w" "$target"
  log "kata-agent-ctl built in $secs s"
}

kata_agent_ctl() {
  local dest bin
  kata_resolve_source
  dest="$TOOLS/kata-agent-ctl-$KATA_ID"
  bin="$dest/bin/kata-agent-ctl"
  if [ -x "$bin" ]; then echo "$bin"; return; fi
  command -v cargo >/dev/null || die "cargo not found (install Rust; see README)"
  take_lock "kata-agent-ctl-$KATA_ID"
  if [ -x "$bin" ]; then echo "$bin"; return; fi
  make_tmp "kata-agent-ctl-$KATA_ID"
  kata_agent_ctl_build "$TMP"
  publish "$TMP" "$dest"
  echo "$bin"
}

# Write a self-contained source bundle (kata subset + the two git dependencies), so a machine
# without the git repositories can build agent-ctl with cargo's registry alone: KATA_SRC=OUT.tar.gz ci/tools.sh kata-agent-ctl
kata_src_bundle() {
  local out="$1" b
  case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
  kata_resolve_source
  if [ "$KATA_KIND" = cached ]; then no_kata_source; fi
  scratch_tmp; b="$TMP"
  kata_collect_sources "$b"
  {
    echo "kata_id=$KATA_ID"
    echo "kata=$KATA_DESC"
    cat "$b/SOURCES"
  } > "$b/BUNDLE-INFO"
  rm -f "$b/SOURCES"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$b" -czf "$out.tmp" . \
    && mv -f "$out.tmp" "$out"
  log "wrote $out ($(du -h "$out" | cut -f1)); build from it with KATA_SRC=$out ci/tools.sh kata-agent-ctl"
  echo "$out"
}

# Cached path only, no build (for tests that skip when a tool is absent).
cached_path() {
  local bin
  case "$1" in
    vhost-device-vsock) bin="$(vhost_device_vsock_dest)/bin/vhost-device-vsock" ;;
    cargo-fuzz) bin="$(cargo_fuzz_dest)/bin/cargo-fuzz" ;;
    kata-agent-ctl) kata_resolve_source; bin="$TOOLS/kata-agent-ctl-$KATA_ID/bin/kata-agent-ctl" ;;
    *) usage ;;
  esac
  [ -x "$bin" ] || exit 1
  echo "$bin"
}

case "${1:-}" in
  vhost-device-vsock) vhost_device_vsock ;;
  virtiofsd) virtiofsd ;;
  kata-agent-ctl) kata_agent_ctl ;;
  cargo-fuzz) cargo_fuzz ;;
  kata-src-bundle) [ $# -eq 2 ] || usage; kata_src_bundle "$2" ;;
  path) [ $# -eq 2 ] || usage; cached_path "$2" ;;
  *) usage ;;
esac
