#!/usr/bin/env bash
# Install what the benchmarks run beside the agent: nginx (with the DAV module, for PUT uploads) and curl.
# Debian/Ubuntu only. Runs apt-get directly as root, else through sudo.
set -euo pipefail

if [[ $(id -u) -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
have_nginx=1
PATH="$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null 2>&1 || have_nginx=0

if ((${#need[@]} == 0 && have_nginx)); then
    echo "benches: nginx and curl are already installed"
    exit 0
fi

"${SUDO[@]}" apt-get update -q
if ((!have_nginx)); then
    # On Debian 12 `nginx` itself has the DAV module built in and `nginx-light` is a transitional
    # package for it; older releases split the builds, and there nginx-light has it too.
    if [[ -n $(apt-cache policy nginx | grep -v '(none)' | grep Candidate || true) ]]; then
        need+=(nginx)
    else
        need+=(nginx-light)
    fi
fi
echo "benches: installing ${need[*]}"
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
# Debian's package may start a system nginx on port 80; the benches start their own on a free port,
# so a running system nginx is harmless and left alone.
PATH="$PATH:/usr/sbin:/sbin" nginx -V 2>&1 | grep -q http_dav_module || {
    echo "benches: warning: this nginx lacks http_dav_module; the upload baseline will be skipped" >&2
}
