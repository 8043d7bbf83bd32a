#!/usr/bin/env bash
# Builds meshserve's two CPU images with docker (when its daemon answers) or buildah, and prints their sizes.
#
#   docker/build.sh [--local-base] [--host-pip] [--repository PREFIX] [--tag TAG] [--torch-index URL] [--push]
#
#   --local-base        make the base image here first: a Debian bookworm root filesystem (debootstrap, minbase, with
#                       python3 and its venv) imported as localhost/meshserve-base:bookworm; implies --host-pip.
#                       Needs root; installs debootstrap (and buildah, when there is no docker) with apt-get.
#   --host-pip          every package through this machine's pip (pip download: its indexes, find-links, proxy and
#                       certificates), served to the build as an index on 127.0.0.1; torch is torch==2.13.0+cpu.
#                       Needs python3.11 here (the images' Python).
#   --repository PREFIX images PREFIX/meshserve (gateway, router, aggregator) and PREFIX/meshserve-worker
#                       (default ghcr.io/meshserve)
#   --tag TAG           default: the chart's appVersion
#   --torch-index URL   where torch 2.13.0 comes from without --host-pip (default https://download.pytorch.org/whl/cpu)
#   --push              push both images after building (log in to the registry first)
#
# Environment: BASE_IMAGE (default python:3.11-slim), PIP_INDEX_URL (default PyPI), DEBIAN_MIRROR (--local-base),
# PYTHON (this machine's Python with pip, default python3), BUILD_ENGINE (docker or buildah; default docker when its
# daemon answers), CONTAINERS_STORAGE_CONF (buildah: where images are kept). Last, stdout gets "IMAGE SIZE" per image.
set -euo pipefail
cd "$(dirname "$0")/.."

repository=ghcr.io/meshserve
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' helm/meshserve/Chart.yaml)
python=${PYTHON:-python3}
local_base=0 host_pip=0 push=0 torch_index=https://download.pytorch.org/whl/cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --local-base) local_base=1 host_pip=1 ;;
    --host-pip) host_pip=1 ;;
    --push) push=1 ;;
    --repository) repository=$2; shift ;;
    --tag) tag=$2; shift ;;
    --torch-index) torch_index=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

work=$(mktemp -d "${TMPDIR:-/tmp}/meshserve-build.XXXXXX")
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "build.sh: $*" >&2; }
fail() { say "$*"; exit 1; }

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "$* missing (installing it needs root and apt-get)"
  say "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

engine=${BUILD_ENGINE:-}
if [ -z "$engine" ] && docker info >/dev/null 2>&1; then engine=docker; fi
if [ "$engine" != docker ]; then
  command -v buildah >/dev/null || apt_install buildah
  engine=buildah
  # RUN steps without an OCI runtime: works where crun/runc cannot set up a container.
  export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
fi
say "building with $engine"

if [ "$local_base" = 1 ]; then
  command -v debootstrap >/dev/null || apt_install debootstrap
  BASE_IMAGE=localhost/meshserve-base:bookworm
  say "debootstrap bookworm (minbase with python3) for $BASE_IMAGE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
  tar -C "$work/rootfs" -cf "$work/base.tar" .
  rm -rf "$work/rootfs"
  if [ "$engine" = docker ]; then
    docker import --change 'CMD ["/bin/bash"]' "$work/base.tar" "$BASE_IMAGE" >/dev/null
  else
    container=$(buildah from scratch)
    buildah add "$container" "$work/base.tar" / >/dev/null
    buildah config --cmd '["/bin/bash"]' "$container"
    buildah commit -q "$container" "$BASE_IMAGE" >/dev/null
    buildah rm "$container" >/dev/null
  fi
  rm -f "$work/base.tar"
fi
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}

args=(-f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$host_pip" = 1 ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || fail "--host-pip needs Python 3.11 here, the images' Python, so pip picks the same wheels (PYTHON=...)"
  say "pip download (this machine's pip) into a wheelhouse"
  "$python" docker/requirements.py services >"$work/services.txt"
  "$python" docker/requirements.py worker >"$work/worker.txt"
  # torch first and exactly the CPU build; the rest resolves around it (constraints.txt pins it to 2.13.0).
  "$python" -m pip download -q --no-deps -d "$work/wheels" "torch==2.13.0+cpu" >"$work/pip.log" 2>&1 \
    || { tail -20 "$work/pip.log" >&2; fail "this machine's pip finds no torch==2.13.0+cpu (build without --host-pip)"; }
  "$python" -m pip download -q -d "$work/wheels" --find-links "$work/wheels" -c constraints.txt \
    -r "$work/services.txt" -r "$work/worker.txt" "setuptools>=68" wheel >"$work/pip.log" 2>&1 \
    || { tail -20 "$work/pip.log" >&2; fail "pip download failed"; }
  "$python" docker/wheelhouse.py "$work/wheels" "$work/port" &
  server_pid=$!
  for _ in $(seq 100); do [ -s "$work/port" ] && break; sleep 0.1; done
  [ -s "$work/port" ] || fail "the wheelhouse index did not start"
  index="http://127.0.0.1:$(cat "$work/port")/simple"
  # The build's RUN steps share this machine's network, to reach the index on loopback.
  args+=(--network host --build-arg "PIP_INDEX_URL=$index" --build-arg "TORCH_INDEX=$index")
else
  args+=(--build-arg "TORCH_INDEX=$torch_index")
  if [ -n "${PIP_INDEX_URL:-}" ]; then args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
fi

images=()
for target in services worker; do
  image="$repository/meshserve:$tag"
  if [ "$target" = worker ]; then image="$repository/meshserve-worker:$tag"; fi
  say "$image (--target $target, FROM $BASE_IMAGE)"
  build=(buildah bud --layers)
  if [ "$engine" = docker ]; then build=(docker build); fi
  "${build[@]}" "${args[@]}" --target "$target" -t "$image" . >"$work/$target.log" 2>&1 \
    || { tail -40 "$work/$target.log" >&2; fail "building $image failed"; }
  images+=("$image")
done

if [ "$push" = 1 ]; then
  for image in "${images[@]}"; do "$engine" push "$image"; done
fi
for image in "${images[@]}"; do
  if [ "$engine" = docker ]; then
    size=$(docker image ls --format '{{.Size}}' "$image")
  else
    size=$(buildah images --json "$image" | "$python" -c 'import json, sys; print(json.load(sys.stdin)[0]["size"])')
  fi
  echo "$image $size"
done
