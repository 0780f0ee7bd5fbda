#!/usr/bin/env bash
# promtool, Prometheus's own linter for a /metrics page (`promtool check metrics`), for the metrics
# tests: copied out of Debian's `prometheus` package into DEST (default .venv/bin), without installing
# the package (that would add a Prometheus server, its user and its service to the machine).
#
# Why Debian's build and not `go install github.com/prometheus/prometheus/cmd/promtool`: promtool links
# every service-discovery backend (Kubernetes, AWS, Azure, GCE...), a build measured at over 25 minutes
# on this 2-core machine, against seconds for a 19 MB download. The lint rules it applies to metric
# names, types and help text have not changed in the releases since Debian's 2.42.
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
