#!/usr/bin/env bash
# Builds the Go client for Tandem's gateway offline, in GOPATH mode, against Debian's Go packages (golang-go,
# golang-google-grpc-dev, golang-google-protobuf-dev, golang-google-genproto-dev, protoc-gen-go, protoc-gen-go-grpc):
# no module proxy and no network.
#
#   clients/go/build.sh [BUILD_DIR]    # default clients/go/build; the binary is BUILD_DIR/tandem_client
#
# The message and stub code is generated from ../../protos at every build, never checked in, so the client always
# matches the contract in this checkout. The protos declare go_package (tandem.dev/go/<proto dir>), so protoc needs
# no M options, and the generated packages land in BUILD_DIR/gopath/src/tandem.dev/go/..., first on GOPATH.
# GOCACHE, when set, is used as it is (tests point it at a temporary folder).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
protos=$(cd "$here/../../protos" && pwd)
build=${1:-$here/build}
mkdir -p "$build"
build=$(cd "$build" && pwd)
# Debian installs Go libraries here; SYSTEM_GOPATH overrides it for other layouts.
system_gopath=${SYSTEM_GOPATH:-/usr/share/gocode}

for tool in go protoc protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (see clients/README.md)" >&2; exit 1; }
done

gopath=$build/gopath
rm -rf "$gopath/src/tandem.dev" # a removed or moved proto must not leave its old package behind
mkdir -p "$gopath/src"
# Every proto, not just the gateway's: this is also the check that Go code generates from protos/ with no M options.
cd "$protos"
mapfile -t sources < <(find . -name '*.proto' | sed 's|^\./||' | LC_ALL=C sort)
protoc -I . --go_out="$gopath/src" --go-grpc_out="$gopath/src" "${sources[@]}"

export GO111MODULE=off GOPATH="$gopath:$system_gopath" GOPROXY=off GOFLAGS=
default_cache=$(go env GOCACHE 2>/dev/null || true)
if [ -z "${GOCACHE:-}" ] && { [ -z "$default_cache" ] || [ "$default_cache" = off ]; }; then
  export GOCACHE="$build/cache" # no HOME or XDG_CACHE_HOME: keep the cache beside the build
fi
cd "$here"
go build -o "$build/tandem_client" .
