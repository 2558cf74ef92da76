#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3 from Debian's packages alone: no registry.
#
#   docker/build-offline-base.sh [--force] [IMAGE_NAME]     (default inferoxy/base:bookworm)
#
# debootstrap fetches the packages from the Debian mirror this machine's apt already uses, then
# `docker import` turns the tree into an image. The image has python3 with numpy, pyzmq, msgpack
# (everything a model replica needs) and pip (to install the proxy from a wheelhouse).
# Skipped when the image exists, unless --force.
#
# Environment:
#   INFEROXY_DEBIAN_MIRROR  mirror to use (default: found in /etc/apt/sources.list{,.d/*})
#   INFEROXY_DEBIAN_SUITE   suite (default bookworm)
set -euo pipefail

FORCE=0
IMAGE=inferoxy/base:bookworm
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        -*) echo "unknown option $arg" >&2; exit 2 ;;
        *) IMAGE=$arg ;;
    esac
done
SUITE=${INFEROXY_DEBIAN_SUITE:-bookworm}
# python3-pip is beyond the runtime's needs: the proxy image installs the project with it.
PACKAGES=python3,python3-cffi-backend,python3-zmq,python3-numpy,python3-msgpack,python3-pip

say() { echo "[build-offline-base] $*" >&2; }

if [[ $FORCE == 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "$IMAGE exists; skipping (use --force to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { say "ERROR: debootstrap is not installed (apt-get install debootstrap)"; exit 1; }

# The first http(s) mirror apt is configured with for $SUITE: one-line .list files, then
# deb822 .sources files. Files renamed to something else (*.disabled) are not read by apt either.
find_mirror() {
    local files=()
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list; do [[ -f $f ]] && files+=("$f"); done
    if ((${#files[@]})); then
        # deb [options] URI SUITE COMPONENT...
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite && $i ~ /^https?:\/\//) { print $i; exit }
            }' "${files[@]}" | head -n1
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (n = 1; n <= NF; n++) {
                    line = $n
                    if (line ~ /^[ \t]*#/) continue
                    colon = index(line, ":")
                    if (colon == 0) continue
                    key = tolower(substr(line, 1, colon - 1))
                    value = substr(line, colon + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", value)
                    if (key == "types") types = value
                    else if (key == "uris") uris = value
                    else if (key == "suites") suites = value
                    else if (key == "enabled") enabled = tolower(value)
            }
                if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, list, /[ \t]+/)
                    for (u in list) if (list[u] ~ /^https?:\/\//) { print list[u]; exit }
                }
            }' "$f"
    done | head -n1
}

MIRROR=${INFEROXY_DEBIAN_MIRROR:-$(find_mirror | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

WORK=$(mktemp -d /var/tmp/inferoxy-rootfs.XXXXXX)
cleanup() {
    # debootstrap mounts /proc and /sys inside the tree; a failed run can leave them mounted.
    awk -v root="$WORK/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r mount_point; do umount -l "$mount_point" 2>/dev/null || true; done
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

start=$SECONDS
say "debootstrap $SUITE from $MIRROR into $WORK (about a minute)"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1; then
    say "ERROR: debootstrap failed; last lines of its log:"
    tail -n 30 "$WORK/debootstrap.log" >&2
    [[ -f $WORK/rootfs/debootstrap/debootstrap.log ]] && tail -n 30 "$WORK/rootfs/debootstrap/debootstrap.log" >&2
    exit 1
fi
say "debootstrap done in $((SECONDS - start))s"

# What only the build needed: downloaded .debs and package lists.
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
# apt in the image should use the same mirror as debootstrap did.
echo "deb $MIRROR $SUITE main" >"$WORK/rootfs/etc/apt/sources.list"

tar -C "$WORK/rootfs" --numeric-owner -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    -m "debootstrap --variant=minbase $SUITE + $PACKAGES" \
    - "$IMAGE" >/dev/null
say "imported $IMAGE in $((SECONDS - start))s total"
