#!/usr/bin/env bash
# What the host needs besides Python and Rust, from Debian's archive (Debian/Ubuntu):
#   runtime: mmdebstrap (builds the `base` template from Debian's archive) and skopeo (pulls and
#            converts OCI images for `sandboxd template pull|import`);
#   tests:   strace (counts the agent's write syscalls in tests/test_response_writes.py),
#            busybox-static (a tiny template assembled by the tests) and the distribution registry
#            (Debian's docker-registry package) for the image pull tests. These two are only unpacked
#            into .cache/test-tools, never installed: docker-registry's package would start a system
#            registry service on port 5000.
# Runs apt-get directly as root, else through sudo. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi

need=()
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v strace >/dev/null 2>&1 || need+=(strace)
updated=0
if ((${#need[@]})); then
    "${SUDO[@]}" apt-get update -q
    updated=1
    echo "host-deps: installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
fi

tools=.cache/test-tools
mkdir -p "$tools"
for pkg in busybox-static docker-registry; do
    if [[ -e $tools/$pkg/.done ]]; then
        continue
    fi
    if ((!updated)); then
        "${SUDO[@]}" apt-get update -q
        updated=1
    fi
    rm -rf "$tools/$pkg" "$tools"/"$pkg"_*.deb
    (cd "$tools" && apt-get download -q -o APT::Sandbox::User=root "$pkg")
    dpkg-deb -x "$tools"/"$pkg"_*.deb "$tools/$pkg"
    rm -f "$tools"/"$pkg"_*.deb
    touch "$tools/$pkg/.done"
    echo "host-deps: unpacked $pkg into $tools/$pkg"
done
echo "host-deps: mmdebstrap $(mmdebstrap --version | awk '{print $2}'), $(skopeo --version)," \
    "busybox and registry in $tools"
