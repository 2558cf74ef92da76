#!/usr/bin/env bash
# Build Inferoxy's images on a machine that reaches no image registry.
#
#   docker/build-images.sh [--tag TAG]            (TAG default: latest)
#
# Builds, in order, each FROM the one before:
#   inferoxy/base:bookworm      debootstrap + docker import (docker/build-offline-base.sh)
#   inferoxy/model-base:TAG     Python + numpy/pyzmq/msgpack + the model runtime
#   inferoxy/echo:TAG           examples/models/echo
#   inferoxy/digits:TAG         examples/models/digits
#   inferoxy/counter:TAG        examples/models/counter
#   inferoxy/onnx-base:TAG      model-base + ONNX Runtime (from the wheelhouse below), for format: onnx
#   inferoxy/digits-onnx:TAG    examples/models/digits/digits.onnx in onnx-base
#   inferoxy/proxy:TAG          the proxy, installed from a wheelhouse made here
#
# The proxy image is installed from build/docker-wheelhouse, so its build reaches no index: the
# project's wheel is built here, and its dependencies (binary wheels only) are downloaded by the
# base image's own pip in a throwaway container on the host's network, which is what makes them
# fit the image's Python, glibc and architecture. Builds use the classic builder and
# --network host (dockerd here runs with --bridge=none, so there is no other network).
#
# Environment:
#   INFEROXY_BASE_IMAGE   the base to build on (default inferoxy/base:bookworm, built if missing)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=latest
while (($#)); do
    case "$1" in
        --tag) TAG=$2; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
BASE=${INFEROXY_BASE_IMAGE:-inferoxy/base:bookworm}
MODEL_BASE=inferoxy/model-base:$TAG
WHEELHOUSE=$ROOT/build/docker-wheelhouse
export DOCKER_BUILDKIT=0   # the classic builder: BuildKit needs buildx and a network to pull its frontend

say() { echo "[build-images] $*" >&2; }
step_start=0
begin() { step_start=$SECONDS; say "$*"; }
took() { say "  done in $((SECONDS - step_start))s"; }

docker info >/dev/null 2>&1 || { say "ERROR: no Docker engine answers; run .ci/docker.sh first"; exit 1; }
cd "$ROOT"
total_start=$SECONDS

begin "base image $BASE"
if [[ $BASE == inferoxy/base:* ]]; then
    bash docker/build-offline-base.sh "$BASE"
else
    docker image inspect "$BASE" >/dev/null 2>&1 || { say "ERROR: base image $BASE not found"; exit 1; }
fi
took

build() {  # build IMAGE DOCKERFILE BASE_IMAGE
    begin "image $1 ($2, FROM $3)"
    docker build --network host --force-rm --build-arg BASE_IMAGE="$3" -f "$2" -t "$1" . >"$ROOT/build/docker-build.log" 2>&1 \
        || { say "ERROR: building $1 failed:"; tail -n 40 "$ROOT/build/docker-build.log" >&2; exit 1; }
    took
}
mkdir -p "$ROOT/build"

build "$MODEL_BASE" docker/model-base/Dockerfile "$BASE"
build "inferoxy/echo:$TAG" examples/models/echo/Dockerfile "$MODEL_BASE"
build "inferoxy/digits:$TAG" examples/models/digits/Dockerfile "$MODEL_BASE"
build "inferoxy/counter:$TAG" examples/models/counter/Dockerfile "$MODEL_BASE"

begin "wheelhouse $WHEELHOUSE"
# The project's own wheel (pure Python) is built here; its dependencies are downloaded by the base
# image's own pip, so that wheel tags, Requires-Python and environment markers (python_full_version,
# platform_machine...) are judged for the image's Python, not this machine's. The download is
# skipped while pyproject.toml and the base image are what they were last time.
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $(docker image inspect --format '{{.Id}}' "$BASE")"
if [[ -f $WHEELHOUSE/.stamp && $(cat "$WHEELHOUSE/.stamp") == "$stamp" ]]; then
    rm -f "$WHEELHOUSE"/inferoxy-*.whl
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" "$ROOT"
    say "  dependencies unchanged; rebuilt the project's wheel only"
else
    rm -rf "$WHEELHOUSE" && mkdir -p "$WHEELHOUSE"
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" "$ROOT"
    project_wheel=$(cd "$WHEELHOUSE" && ls inferoxy-*.whl)
    # The container trusts what this machine trusts (a TLS-inspecting proxy's CA, say) and uses its
    # proxy and index settings.
    pip_args=(-v "$WHEELHOUSE:/wheelhouse" -e PIP_DISABLE_PIP_VERSION_CHECK=1)
    ca_bundle=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    if [[ -f $ca_bundle ]]; then
        pip_args+=(-v "$(readlink -f "$ca_bundle"):/etc/inferoxy-host-ca.crt:ro" -e PIP_CERT=/etc/inferoxy-host-ca.crt)
    fi
    for var in PIP_INDEX_URL HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        [[ -n ${!var:-} ]] && pip_args+=(-e "$var")
    done
    docker run --rm --network host "${pip_args[@]}" --entrypoint python3 "$BASE" \
        -m pip download --quiet --dest /wheelhouse --only-binary=:all: "/wheelhouse/$project_wheel"
    echo "$stamp" >"$WHEELHOUSE/.stamp"
fi
say "  $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
took

# onnxruntime is one of the project's dependencies, so the wheelhouse has it (for the image's Python).
build "inferoxy/onnx-base:$TAG" docker/onnx-base/Dockerfile "$MODEL_BASE"
build "inferoxy/digits-onnx:$TAG" examples/models/digits/Dockerfile.onnx "inferoxy/onnx-base:$TAG"
build "inferoxy/proxy:$TAG" docker/Dockerfile "$BASE"

say "all images built in $((SECONDS - total_start))s:"
for image in "$BASE" "$MODEL_BASE" "inferoxy/echo:$TAG" "inferoxy/digits:$TAG" "inferoxy/counter:$TAG" \
        "inferoxy/onnx-base:$TAG" "inferoxy/digits-onnx:$TAG" "inferoxy/proxy:$TAG"; do
    echo "$image"
done
