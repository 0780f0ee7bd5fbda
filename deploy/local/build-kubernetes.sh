#!/usr/bin/env bash
# Build kube-apiserver, kube-scheduler and kube-controller-manager of one Kubernetes release from
# the k8s.io/kubernetes module in the Go module proxy, into $OUT (default .cluster/bin/<version>).
#
# The module's go.mod points every k8s.io/* staging module at ./staging/src/..., which the module
# archive leaves out (each is a module of its own). So we build from a tiny wrapper module that
# requires k8s.io/kubernetes and replaces each staging module with its published release of the
# same version (k8s.io/api v0.34.4 for Kubernetes v1.34.4): the same sources the release tagged.
#
# Cached: nothing happens when all three binaries of this version are already in $OUT. Lean: only
# these three packages, -trimpath, no debug info (-s -w), one `go build` so they share compilation.
set -euo pipefail

VERSION="${KUBERNETES_VERSION:-v1.34.4}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$ROOT/.cluster/bin/$VERSION}"
BINARIES=(kube-apiserver kube-scheduler kube-controller-manager)

if [[ "$VERSION" != v1.* ]]; then
  echo "KUBERNETES_VERSION must look like v1.34.4, got '$VERSION'" >&2
  exit 2
fi
missing=0
for bin in "${BINARIES[@]}"; do [[ -x "$OUT/$bin" ]] || missing=1; done
if [[ $missing == 0 ]]; then
  echo "kubernetes $VERSION: cached in $OUT"
  exit 0
fi
if ! command -v go >/dev/null; then
  echo "go not found: install Go >= 1.24 to build the control plane (the Kubernetes tests skip without it)" >&2
  # CI must run them: fail there; elsewhere `make test` goes on without them.
  [[ -n "${CI:-}" ]] && exit 1 || exit 0
fi

STAGING_VERSION="v0.${VERSION#v1.}"
WORK="$ROOT/.cluster/build/$VERSION"
mkdir -p "$WORK" "$OUT"
cd "$WORK"

# The module's own go.mod, for its list of staging modules and its `godebug` line.
GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$VERSION" >download.json
UPSTREAM_DIR="$(sed -n 's/^\t"Dir": "\(.*\)",$/\1/p' download.json)"
UPSTREAM_MOD="$UPSTREAM_DIR/go.mod"
{
  echo "module sandboxd.local/kubernetes-build"
  echo
  grep -E '^go [0-9.]+$' "$UPSTREAM_MOD"
  grep -E '^godebug ' "$UPSTREAM_MOD" || true
  echo
  echo "require k8s.io/kubernetes $VERSION"
  echo
  echo "replace ("
  sed -n 's#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/[a-z0-9-]*$#\t\1 => \1 '"$STAGING_VERSION"'#p' "$UPSTREAM_MOD"
  echo ")"
} >go.mod
touch go.sum

start=$(date +%s)
pkgs=()
for bin in "${BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$bin"); done
# Version stamps, so `kubectl version` and /version say which release this is.
minor="${VERSION#v1.}"
minor="${minor%%.*}"
ldflags="-s -w"
for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $v.gitVersion=$VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean"
done
# GOTOOLCHAIN=local: build with the installed Go or fail clearly, never fetch another toolchain.
# The default GOCACHE is shared with every other Go build of the run.
GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$OUT/" "${pkgs[@]}"
echo "kubernetes $VERSION: built ${BINARIES[*]} into $OUT in $(($(date +%s) - start)) s"
