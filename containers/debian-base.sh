#!/usr/bin/env bash
# A Debian 12 image made locally with debootstrap from the Debian mirror, for building
# containers/Dockerfile where no image registry is reachable: Debian's Python 3.11 (the
# Python of the lock's wheels) and pip. containers/debian-torch.Containerfile adds the
# lock's torch on top, as the CUDA PyTorch base image would provide it.
#
#   containers/debian-base.sh IMAGE        (as root; needs debootstrap and podman)
#
# PODMAN: the podman command with its global options (default: podman).
# DEBIAN_MIRROR: the Debian archive to bootstrap from (default: deb.debian.org).
set -euo pipefail
image=${1:?usage: containers/debian-base.sh IMAGE}
read -r -a podman <<< "${PODMAN:-podman}"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/rankbias-debian.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror"
# The bootstrap's package lists and downloaded .debs would only make the image bigger.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" --numeric-owner -c . | "${podman[@]}" import \
    --change 'CMD ["/bin/bash"]' - "$image"
