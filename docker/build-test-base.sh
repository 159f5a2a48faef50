#!/usr/bin/env bash
# Build the images for a machine without Docker Hub (CI, tests): a local Python 3.11 base image
# with CPU torch and the heavy dependencies preinstalled, then the project's two images on top of
# it (the reward service's, EXTRAS=service, and the trainer's, EXTRAS=trainer).
#
#   docker/build-test-base.sh   # prints BASE_IMAGE=..., SERVICE_IMAGE=... and IMAGE=... last
#
# The base comes from `mmdebstrap` (Debian bookworm, python3 3.11) + `docker import`, is tagged
# with a hash of its inputs and rebuilt only when they change. Its packages (CPU torch from
# $PIP_FIND_LINKS and the dependencies of every extra, pinned to the versions installed here) are
# downloaded by the host's pip, so its own index settings and caches apply. It also carries this
# machine's CA bundle ($SSL_CERT_FILE) and index URL, so that pip inside
# `docker build --network host` reaches the same package index as the host. The project
# Dockerfile is built unchanged, with --build-arg BASE_IMAGE and EXTRAS; torch is found in the
# base and not installed again.
#
# Environment: IMAGE (trainer image tag, default online-dpo:latest, the compose default),
# SERVICE_IMAGE (reward service image tag, default online-dpo-service:latest, the compose default),
# PYTHON (the python whose pip downloads the packages and whose installed versions pin them;
# default python3), DOCKER (default docker).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
docker=${DOCKER:-docker}
python=${PYTHON:-python3}
image=${IMAGE:-online-dpo:latest}
service_image=${SERVICE_IMAGE:-online-dpo-service:latest}
ca_bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}

die() { echo "build-test-base: $*" >&2; exit 1; }
[[ -f "$ca_bundle" ]] || die "CA bundle $ca_bundle not found (set SSL_CERT_FILE)"
command -v mmdebstrap >/dev/null || die "mmdebstrap missing: apt-get install -y mmdebstrap"

work=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
ctx=$work/context
mkdir "$ctx" "$work/wheels"

# Pin the dependencies of both images to the versions installed on the host (what the tests ran
# with).
"$python" - "$repo" >"$ctx/requirements.txt" <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib

sys.path.insert(0, f"{sys.argv[1]}/docker")
from requirements import requirements

with open(f"{sys.argv[1]}/pyproject.toml", "rb") as f:
    deps = requirements(tomllib.load(f)["project"], ["service", "trainer"])
for dep in deps:
    name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
    if name.lower() == "torch":
        # The CPU build on local disk (never a multi-GB CUDA download).
        print("torch==2.13.0")
        continue
    extras = re.search(r"\[[^\]]*\]", dep)
    try:
        print(f"{name}{extras.group(0) if extras else ''}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(dep)
PY

# pip settings of the host that matter inside: a custom index (if any) and the CA bundle.
index_url=${PIP_INDEX_URL:-$("$python" -m pip config get global.index-url 2>/dev/null || true)}
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    echo "disable-pip-version-check = true"
    [[ -n "$index_url" && "$index_url" != file:* ]] && echo "index-url = $index_url"
    true
} >"$ctx/pip.conf"

cp "$ca_bundle" "$ctx/ca-certificates.crt"

packages=python3,python3-venv,python3-pip,ca-certificates,passwd
rootfs="online-dpo-test-rootfs:bookworm-$(echo "$packages" | sha256sum | cut -c1-8)"
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $rootfs
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY pip.conf /etc/pip.conf
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\
    PIP_NO_CACHE_DIR=1
ARG WHEELS_URL
COPY requirements.txt /tmp/
RUN pip install --break-system-packages --no-index --find-links "\$WHEELS_URL" \\
        -r /tmp/requirements.txt \\
    && rm /tmp/requirements.txt
DOCKERFILE

key=$(cat "$ctx/requirements.txt" "$ctx/pip.conf" "$ctx/Dockerfile" "$ca_bundle" \
    | sha256sum | cut -c1-12)
base="online-dpo-test-base:$key"

if "$docker" image inspect "$base" >/dev/null 2>&1; then
    echo "build-test-base: reusing $base" >&2
else
    start=$SECONDS
    if ! "$docker" image inspect "$rootfs" >/dev/null 2>&1; then
        echo "build-test-base: mmdebstrap bookworm ($packages) ..." >&2
        mmdebstrap --quiet --variant=apt --include="$packages" bookworm "$work/rootfs.tar" >&2
        "$docker" import "$work/rootfs.tar" "$rootfs" >/dev/null
        rm -f "$work/rootfs.tar"
    fi
    echo "build-test-base: downloading the packages with the host's pip ..." >&2
    "$python" -m pip download --quiet --dest "$work/wheels" -r "$ctx/requirements.txt" >&2
    # Served over loopback (the build uses the host network), so the wheels never become a layer.
    port=$("$python" -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
    "$python" -m http.server --bind 127.0.0.1 --directory "$work/wheels" "$port" >/dev/null 2>&1 &
    server_pid=$!
    "$python" -c "
import socket, time
for _ in range(100):
    try:
        socket.create_connection(('127.0.0.1', $port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
"
    echo "build-test-base: building $base (torch + dependencies) ..." >&2
    "$docker" build --network host --build-arg WHEELS_URL="http://127.0.0.1:$port/" \
        -t "$base" "$ctx" >&2
    echo "build-test-base: $base built in $((SECONDS - start)) s" >&2
fi
"$docker" tag "$base" online-dpo-test-base:latest

for target in "service $service_image" "trainer $image"; do
    read -r extras tag <<<"$target"
    start=$SECONDS
    echo "build-test-base: building $tag (EXTRAS=$extras) on $base ..." >&2
    "$docker" build --network host --build-arg BASE_IMAGE="$base" --build-arg EXTRAS="$extras" \
        -t "$tag" "$repo" >&2
    echo "build-test-base: $tag built in $((SECONDS - start)) s" >&2
done
echo "BASE_IMAGE=$base"
echo "SERVICE_IMAGE=$service_image"
echo "IMAGE=$image"
