#!/usr/bin/env bash
# Makes an OCI image layout holding a Debian rootfs built by debootstrap, the
# default input of `cargo xtask build-image` and of the test suite: a real
# image that no code of ours wrote, available with no public registry.
#
#   make-oci-layout.sh OUT_DIR [SUITE] [VARIANT]
#
# Writes OUT_DIR/layout (tag SUITE) and OUT_DIR/rootfs.tar (the debootstrap
# tree, for fixtures that derive other images from it). Needs root
# (debootstrap chroots) and a Debian mirror: DEBIAN_MIRROR, else the one this
# machine's apt sources use (ci/debian-mirror.sh). The mirror is not part of
# the base image's cache key (xtask/src/image.rs hashes this recipe, the suite
# and the variant): the same recipe gives the same kind of image from any
# mirror, and the image's /etc/apt/sources.list records the one it came from.
set -euo pipefail
out=$1
suite=${2:-bookworm}
variant=${3:-minbase}
mirror=$(bash "$(dirname "$0")/../../ci/debian-mirror.sh")

work=$(mktemp -d "${out%/}.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

debootstrap --variant="$variant" "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  echo "make-oci-layout: debootstrap failed (log above)" >&2
  exit 1
}
# Caches of apt and logs make the image bigger and differ from run to run.
rm -rf "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/log/"*.log
tar -C "$work/rootfs" --numeric-owner --xattrs --xattrs-include='*' -cf "$work/rootfs.tar" .

umoci init --layout "$work/layout"
umoci new --image "$work/layout:$suite"
umoci unpack --image "$work/layout:$suite" "$work/bundle" >/dev/null
rm -rf "$work/bundle/rootfs"
mv "$work/rootfs" "$work/bundle/rootfs"
umoci repack --image "$work/layout:$suite" "$work/bundle"
umoci config --image "$work/layout:$suite" --author "osbuilder rootfs-templates/debian" \
  --config.cmd /bin/bash --config.workingdir /root --config.user root \
  --config.label org.opencontainers.image.title="debian-$suite-$variant" \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env LANG=C.UTF-8
umoci gc --layout "$work/layout"

mkdir -p "$out.new"
mv "$work/layout" "$out.new/layout"
mv "$work/rootfs.tar" "$out.new/rootfs.tar"
rm -rf "$out"
mv "$out.new" "$out"
