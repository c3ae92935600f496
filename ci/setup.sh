#!/usr/bin/env bash
# Installs everything the build and the test suite need on a Debian 12 machine.
# Idempotent: packages already present are not reinstalled, so a warm machine
# passes through in a second. Run as root (or with sudo available).
set -euo pipefail

# Debian packages the pipeline and its oracles use (see ARCHITECTURE.md, "Oracles").
PKGS=(
  ca-certificates curl
  skopeo umoci docker-registry debootstrap  # OCI images and a real registry
  apache2-utils libcap2-bin                 # htpasswd -B, setcap/getcap for fixtures
  cpio gzip zstd                            # initrd oracles
  e2fsprogs erofs-utils cryptsetup-bin      # filesystem oracles (e2fsck, debugfs, fsck.erofs, veritysetup)
  fdisk gdisk python3                       # partition-table oracles (sfdisk, sgdisk), PFN block check
  dosfstools mtools                         # cidata seed oracles (fsck.fat, mcopy, mdir); blkid is util-linux
  qemu-system-x86 qemu-utils busybox-static # boots
  qemu-block-extra                          # QEMU's http block driver (a guest booted from a registry blob)
  iproute2                                  # `ip`, the oracle of the agent's netlink tests
  pkg-config libseccomp-dev libcap-ng-dev   # building virtiofsd (ci/tools.sh virtiofsd: virtio-fs tests)
  nfs-ganesha nfs-ganesha-vfs rpcbind      # a userspace NFS server for the guest's NFS volumes (no kernel nfsd)
  g++                                       # libFuzzer (libfuzzer-sys compiles it) for cargo xtask fuzz
  linux-source-6.12 bc bison flex libelf-dev libssl-dev make gcc patch xz-utils  # guest kernels
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing_pkgs() {
  missing=()
  for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
}

missing_pkgs
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # An install can remove a package that was there: a machine with a backported
  # qemu-utils loses it when bookworm's qemu-system-x86 comes in (their versions
  # conflict). Install whatever is missing now once more, then insist.
  missing_pkgs
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing again what the first install removed: ${missing[*]}" >&2
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    missing_pkgs
    if [ ${#missing[@]} -gt 0 ]; then
      echo "setup: error: still not installed: ${missing[*]}" >&2
      exit 1
    fi
  fi
else
  echo "setup: all Debian packages present" >&2
fi
