#!/usr/bin/env bash
# Builds the CPU image with podman and runs it the way deploy/base runs it: each role in its own read-only,
# non-root container wired by addresses as the manifests wire them, then the all-in-one default. Checks health,
# reflection, Embed against the in-process reference, the Open Inference Protocol through tritonclient, /metrics and
# a clean SIGTERM drain (exit 0, no ERROR in the logs). Prints the image size and each role's start-up time.
#
#   bash scripts/container_check.sh            # CPU image: build + run every role
#   bash scripts/container_check.sh --cuda     # also: Dockerfile.cuda's Python layer on the stand-in base
#
# No Docker engine or registry is needed (docs/containers.md): podman with runc, a stand-in python base made with
# mmdebstrap from Debian's packages, and torch's CPU wheel served from a throwaway local index. Idempotent: the base
# image is made once, podman's layer cache is reused, and everything started here is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${TANDEM_CONTAINER_WORK:-/var/tmp/tandem-container}
IMAGE=${TANDEM_IMAGE:-localhost/tandem:check}
LIGHT=${TANDEM_LIGHT_IMAGE:-localhost/tandem-light:check}
BASE=localhost/tandem-python-base:bookworm
PY=${PYTHON:-$ROOT/.venv/bin/python}
CUDA=0
[ "${1:-}" = "--cuda" ] && CUDA=1
mkdir -p "$WORK"
log() { printf '== %s\n' "$*"; }

# ---- podman and its settings for this machine -------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
  log "installing podman, runc, mmdebstrap (Debian)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi
# crun (podman's default runtime) refuses hybrid cgroup layouts; without CAP_SYS_RESOURCE the container's rlimits
# must not exceed the current ones.
if [ ! -f /etc/containers/containers.conf ] || ! grep -q 'tandem container_check' /etc/containers/containers.conf; then
  mkdir -p /etc/containers
  cat >>/etc/containers/containers.conf <<'EOF'
# tandem container_check: runc, and rlimits within this machine's own
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
fi

# ---- stand-in base image: Debian bookworm's python3 (3.11, like python:3.11-slim-bookworm) ----------------------
if ! podman image exists "$BASE"; then
  log "making the stand-in base image $BASE with mmdebstrap"
  rm -rf "$WORK/base" && mkdir -p "$WORK/base"
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,passwd bookworm "$WORK/base/rootfs.tar"
  # pip inside the build: the machine's CA bundle, and the ordinary package index for torch's own dependencies
  # (torch itself comes from the local index below).
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/base/ca.crt"
  cat >"$WORK/base/pip.conf" <<'EOF'
[global]
cert = /etc/ssl/certs/host-ca.crt
extra-index-url = https://pypi.org/simple
EOF
  cat >"$WORK/base/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
COPY ca.crt /etc/ssl/certs/host-ca.crt
COPY pip.conf /etc/pip.conf
CMD ["python3"]
EOF
  podman build --quiet -t "$BASE" "$WORK/base" >/dev/null
  rm -f "$WORK/base/rootfs.tar"
fi

# ---- a throwaway local index holding torch's CPU wheel from this machine's disk ------------------------------------
TORCH_VERSION=$(sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
wheel=$(find /opt/wheels "$WORK/wheels" -maxdepth 1 -name "torch-${TORCH_VERSION}*cp311*x86_64.whl" 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  mkdir -p "$WORK/wheels"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    -d "$WORK/wheels" "torch==${TORCH_VERSION}"
  wheel=$(find "$WORK/wheels" -name "torch-${TORCH_VERSION}*.whl" | head -n 1)
fi
rm -rf "$WORK/index" && mkdir -p "$WORK/index/torch"
ln -s "$wheel" "$WORK/index/torch/$(basename "$wheel")"
# A fixed port: the index URL is a build argument, and a new one each run would bust podman's layer cache.
port=${TANDEM_INDEX_PORT:-38517}
"$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$port" >"$WORK/index.log" 2>&1 &
index_pid=$!
started=()
cleanup() {
  kill "$index_pid" 2>/dev/null || true
  podman-compose -p tandem-check -f compose.yaml down >/dev/null 2>&1 || true
  for name in "${started[@]}"; do podman rm -f -t 0 "$name" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

build() {  # build FILE TAG [extra args]
  local file=$1 tag=$2
  shift 2
  podman build --network host --layers -f "$file" -t "$tag" \
    --build-arg "PYTHON_IMAGE=$BASE" --build-arg "TORCH_INDEX_URL=http://127.0.0.1:$port/" "$@" "$ROOT"
}

log "building $IMAGE from Dockerfile"
t0=$(date +%s)
build Dockerfile "$IMAGE" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
build_s=$(( $(date +%s) - t0 ))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1000000)) MB, built in ${build_s} s (cached layers reused)"
t0=$(date +%s)
build Dockerfile "$LIGHT" --target runtime-light >"$WORK/build-light.log" 2>&1 || { tail -n 40 "$WORK/build-light.log"; exit 1; }
light_size=$(podman image inspect --format '{{.Size}}' "$LIGHT")
echo "image $LIGHT (gateway, tokenizer, postprocess): $((light_size / 1000000)) MB, built in $(( $(date +%s) - t0 )) s"

if [ "$CUDA" = 1 ]; then
  log "Dockerfile.cuda's Python layer on the stand-in base (CPU torch index; CUDA libraries not covered)"
  build Dockerfile.cuda localhost/tandem-cuda-layer:check --target build \
    --build-arg "CUDA_IMAGE=$BASE" >"$WORK/build-cuda.log" 2>&1 || { tail -n 40 "$WORK/build-cuda.log"; exit 1; }
  echo "Dockerfile.cuda build stage: ok"
fi

# ---- the image's contents: lean runtime ----------------------------------------------------------------------------
log "runtime stage contents"
for img in "$IMAGE" "$LIGHT"; do
podman run --rm --entrypoint /bin/sh "$img" -c '
  set -e
  id -u | grep -qx 10001 || { echo "runs as uid $(id -u), not 10001"; exit 1; }
  for tool in gcc cc g++ make; do command -v "$tool" >/dev/null && { echo "compiler $tool in the runtime image"; exit 1; }; done
  [ ! -d /root/.cache/pip ] || { echo "pip cache in the runtime image"; exit 1; }
  [ ! -d /src ] || { echo "source tree /src in the runtime image"; exit 1; }
  [ ! -x /opt/venv/bin/pip ] || { echo "pip in the runtime venv"; exit 1; }
  python -c "import tandem.oip.v2.grpc_service_pb2, gateway.__main__, services.tokenizer.__main__, services.postprocess.__main__"
  if python -c "import torch" 2>/dev/null; then python -c "import services.inference.__main__"; roles="every role"; else roles="gateway, tokenizer, postprocess (no torch)"; fi
  echo "uid 10001, no compilers, no pip, no pip cache, no /src; imports: $roles"'
done

# ---- each role in its own container, wired as deploy/base wires them -------------------------------------------
# A podman network stands in for the cluster: containers named like the Kubernetes Services (tandem-tokenizer, ...)
# find each other by name, and every container gets deploy/base/config.env unchanged, as envFrom gives the pods.
# free_ports N: N distinct free loopback ports. All N sockets are held at once: closing one before binding the next
# can hand the same port out twice (the CI run of 2026-12-04 failed with "bind: address already in use" that way).
free_ports() {
  "$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}
NET=tandem-check
podman network exists "$NET" || podman network create "$NET" >/dev/null
# The manifests' /models volume, seeded from the image's baked repository as components/seed-default-model does.
rm -rf "$WORK/models" && mkdir -p "$WORK/models" && chmod 0777 "$WORK/models"
podman run --rm -v "$WORK/models:/models" --entrypoint /bin/sh "$IMAGE" -c \
  'cp -RL /opt/tandem/repository/. /models/ && find /models -mindepth 1 -exec chmod a+rX {} +'

declare -A grpc_port metrics_port role_start
run_role() {  # run_role IMAGE ROLE CONTAINER_PORT   (read-only root, tmpfs cache and /tmp, non-root: deploy/base)
  local image=$1 role=$2 cport=$3 name="tandem-$2"
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  role_start[$role]=$(date +%s.%N)
  podman run -d --name "$name" --network "$NET" --network-alias "$name" --read-only --user 10001:10001 \
    --tmpfs /home/tandem/.cache:rw,mode=1777 --tmpfs /tmp:rw,mode=1777 -v "$WORK/models:/models:ro" \
    --env-file deploy/base/config.env -e TANDEM_INFERENCE_INTRA_OP_THREADS=2 \
    -p "127.0.0.1::$cport" -p "127.0.0.1::9090" "$image" "$role" >/dev/null
  started+=("$name")
  # podman picks the host ports itself (no window between choosing a free port and binding it).
  grpc_port[$role]=$(podman port "$name" "$cport/tcp" | head -n 1 | sed 's/.*://')
  metrics_port[$role]=$(podman port "$name" 9090/tcp | head -n 1 | sed 's/.*://')
}
run_role "$LIGHT" tokenizer 50052
run_role "$IMAGE" inference 50053
run_role "$LIGHT" postprocess 50054
run_role "$LIGHT" gateway 50051

log "per-role containers (inference from $IMAGE, the others from $LIGHT): waiting for SERVING"
for role in tokenizer inference postprocess gateway; do
  if ! "$PY" scripts/container_probe.py wait "127.0.0.1:${grpc_port[$role]}" --timeout 180 \
      --since "${role_start[$role]}" --label "$role"; then
    podman logs "tandem-$role" 2>&1 | tail -n 30
    exit 1
  fi
done
"$PY" scripts/container_probe.py check "127.0.0.1:${grpc_port[gateway]}" --metrics "${metrics_port[gateway]}" \
  --metrics "${metrics_port[tokenizer]}" --metrics "${metrics_port[inference]}" --metrics "${metrics_port[postprocess]}"
# tritonclient ships its own `inference` protobuf messages, which clash with Tandem's in one process: its own run.
"$PY" scripts/container_probe.py oip "127.0.0.1:${grpc_port[gateway]}"
"$PY" scripts/container_probe.py generate "127.0.0.1:${grpc_port[gateway]}"

log "per-role containers: SIGTERM drain"
stopped_cleanly() {  # stopped_cleanly NAME: exited with code 0, and no error in its log
  local name=$1 code
  code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
  if [ "$code" != 0 ]; then
    echo "$name exited with $code after SIGTERM"; podman logs "$name" 2>&1 | tail -n 30; return 1
  fi
  if podman logs "$name" 2>&1 | grep -E '"levelname": *"(ERROR|CRITICAL)"|"level": *"(ERROR|CRITICAL)"|Traceback| ERROR ' >/dev/null; then
    echo "$name logged an error:"; podman logs "$name" 2>&1 | grep -E 'ERROR|CRITICAL|Traceback' | head; return 1
  fi
  echo "$name: exit 0 after SIGTERM, no error logged"
}
drain() {  # drain NAME: SIGTERM, then stopped_cleanly
  podman kill --signal TERM "$1" >/dev/null
  podman wait "$1" >/dev/null
  stopped_cleanly "$1"
}
for role in gateway tokenizer inference postprocess; do drain "tandem-$role"; done
for role in gateway tokenizer inference postprocess; do podman rm -f -t 0 "tandem-$role" >/dev/null; done

# ---- compose.yaml: the same four roles on a compose network, reached by service name -----------------------------
if command -v podman-compose >/dev/null || { apt-get install -y -qq podman-compose >/dev/null 2>&1; }; then
  log "compose.yaml with podman-compose"
  CP=$(free_ports 1)
  compose() { TANDEM_IMAGE=$IMAGE TANDEM_LIGHT_IMAGE=$LIGHT TANDEM_PORT=$CP podman-compose -p tandem-check -f compose.yaml "$@"; }
  compose down >/dev/null 2>&1 || true
  start=$(date +%s.%N)
  compose up -d >"$WORK/compose.log" 2>&1 || { tail -n 30 "$WORK/compose.log"; exit 1; }
  for s in tokenizer inference postprocess gateway; do started+=("tandem-check_tandem-${s}_1"); done
  "$PY" scripts/container_probe.py wait "127.0.0.1:$CP" --timeout 180 --since "$start" --label compose \
    || { podman logs tandem-check_tandem-gateway_1 2>&1 | tail -n 30; exit 1; }
  "$PY" scripts/container_probe.py check "127.0.0.1:$CP"
  "$PY" scripts/container_probe.py oip "127.0.0.1:$CP"
  # `stop` (SIGTERM, as `docker compose stop` sends), not a kill: restart: unless-stopped would restart a killed one.
  compose stop -t 30 >/dev/null 2>&1
  for s in gateway tokenizer inference postprocess; do stopped_cleanly "tandem-check_tandem-${s}_1"; done
  compose down >/dev/null 2>&1 || true
else
  echo "podman-compose not available: compose.yaml not exercised" >&2
  exit 1
fi

# ---- all four in one container: the image's default command ----------------------------------------------------
log "all-in-one default (tandem serve)"
read -r ALL M_ALL <<<"$(free_ports 2)"
start=$(date +%s.%N)
podman rm -f -t 0 tandem-check-all >/dev/null 2>&1 || true
podman run -d --name tandem-check-all --network host --read-only --user 10001:10001 \
  --tmpfs /home/tandem/.cache:rw,mode=1777 --tmpfs /tmp:rw,mode=1777 "$IMAGE" \
  serve --host 127.0.0.1 --port "$ALL" --model-repository /opt/tandem/repository --gateway-args "--metrics-port $M_ALL" >/dev/null
started+=(tandem-check-all)
"$PY" scripts/container_probe.py wait "127.0.0.1:$ALL" --timeout 180 --since "$start" --label all-in-one \
  || { podman logs tandem-check-all 2>&1 | tail -n 30; exit 1; }
"$PY" scripts/container_probe.py check "127.0.0.1:$ALL" --metrics "$M_ALL"
"$PY" scripts/container_probe.py oip "127.0.0.1:$ALL"
# The built-in chat model, converted at build time: streamed Generate with messages.
"$PY" scripts/container_probe.py generate "127.0.0.1:$ALL"
drain tandem-check-all
log "container check passed: $IMAGE $((size / 1000000)) MB, $LIGHT $((light_size / 1000000)) MB"
