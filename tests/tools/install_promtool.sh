#!/usr/bin/env bash
# promtool, Prometheus's own linter for a /metrics page (`promtool check metrics`), for the metrics
# tests: copied out of Debian's `prometheus` package into DEST (default .venv/bin), without installing
# the package (that would add a Prometheus server, its user and its service to the machine).
#
# Why Debian's build and not `go install github.com/prometheus/prometheus/cmd/promtool`: promtool links
# every service-discovery backend (Kubernetes, AWS, Azure, GCE...): v0.316.0 (Prometheus 3) took 24
# minutes and 3.4 GB of memory to build on this 2-core machine (with other builds running), against
# about 20 seconds to fetch and unpack Debian's 19 MB package. Both versions accept our /metrics.
#
# Never fails the build: without promtool the test that needs it is skipped with a reason.
set -uo pipefail

dest=$(realpath -m "${1:-.venv/bin}")
if [[ -x $dest/promtool ]]; then
    echo "promtool: already in $dest"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 0
if ! apt-get download -q prometheus >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -q >/dev/null 2>&1
        apt-get download -q prometheus >/dev/null 2>&1
    fi
fi
deb=$(ls prometheus_*.deb 2>/dev/null | head -1)
if [[ -z $deb ]]; then
    echo "promtool: Debian's prometheus package could not be downloaded; the promtool test will be skipped"
    exit 0
fi
mkdir -p "$dest"
dpkg-deb -x "$deb" root && install -m 0755 root/usr/bin/promtool "$dest/promtool" || exit 0
echo "promtool: $("$dest/promtool" --version 2>&1 | head -1)"
