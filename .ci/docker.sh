#!/usr/bin/env bash
# Make sure this machine has a running Docker engine and the offline base image.
#
# Idempotent: installs docker.io and debootstrap only when missing, starts dockerd only when
# `docker info` fails, builds the base image only when it is absent. Non-interactive, as root,
# on a fresh Debian bookworm machine (what CI runs on).
#
# dockerd runs with --bridge=none --iptables=false: this workplace has no network but the package
# registries, and every test's traffic stays on 127.0.0.1, so test containers use host networking.
#
# Environment:
#   INFEROXY_BASE_IMAGE      the offline base image to ensure (default inferoxy/base:bookworm)
#   INFEROXY_DOCKERD_LOG     where dockerd's output goes (default /var/log/inferoxy-dockerd.log)
#   INFEROXY_DOCKERD_WAIT_S  how long to wait for the engine to answer (default 60)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${INFEROXY_BASE_IMAGE:-inferoxy/base:bookworm}
LOG=${INFEROXY_DOCKERD_LOG:-/var/log/inferoxy-dockerd.log}
WAIT_S=${INFEROXY_DOCKERD_WAIT_S:-60}

say() { echo "[docker.sh] $*" >&2; }

# --- 1. packages ---------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- 2. the engine -------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "engine already running"
else
    if pgrep -x dockerd >/dev/null 2>&1; then
        say "dockerd is running but not answering yet; waiting for it"
    else
        say "starting dockerd (logs: $LOG)"
        mkdir -p "$(dirname "$LOG")"
        # setsid: the engine outlives this script and the shell or CI step that ran it.
        setsid nohup dockerd --bridge=none --iptables=false >>"$LOG" 2>&1 </dev/null &
    fi
    deadline=$((SECONDS + WAIT_S))
    until docker info >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            say "ERROR: the Docker engine did not answer within ${WAIT_S}s. Last lines of $LOG:"
            tail -n 30 "$LOG" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    say "engine ready after $((SECONDS - deadline + WAIT_S))s"
fi

# --- 3. the offline base image -------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "base image $BASE_IMAGE present"
else
    bash "$ROOT/docker/build-offline-base.sh" "$BASE_IMAGE"
fi
