"""nginx as a baseline: our own foreground instance with a generated config, on a free loopback port.

Fairness: the agent is one process with one event loop, so nginx gets one process too
(``master_process off; worker_processes 1``; a single curl connection would only ever use one worker
anyway). It runs with the settings a careful operator would use for static files and uploads:
``sendfile on`` and ``tcp_nopush on`` for downloads, and the DAV module's ``PUT`` for uploads, with its
request-body temp files on the same filesystem as the target so that the final step is a rename, as
the agent's is. Neither side calls fsync. The access log is off (the agent logs no requests either).

``client_body_buffer_size 256k`` is the one non-default: with the default 16k nginx writes a 1 GiB
PUT in 16 KiB pieces and, measured here (9 alternating runs each), uploads about half as fast with
three times the CPU (~620 vs ~1340 MB/s median; 1m was no better than the default). A tuned nginx is
the honest baseline.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from .common import die_with_parent, free_port, stop_process, wait_for_http, which

INSTALL_HINT = "nginx is not installed: `sudo apt-get install nginx-light` (or run benches/install_deps.sh)"

CONF = """\
worker_processes 1;
master_process off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    client_body_buffer_size 256k;
    client_body_temp_path {root}/.nginx-body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 0;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    root: Path
    version: str
    process: subprocess.Popen[bytes]
    ps: psutil.Process

    def url_for(self, path: Path) -> str:
        from urllib.parse import quote

        return f"{self.url}/{quote(str(path.relative_to(self.root)))}"


def has_dav(binary: str) -> bool:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, check=False)
    return "http_dav_module" in out.stderr + out.stdout


@contextlib.contextmanager
def nginx(root: Path, work: Path) -> Iterator[Nginx | None]:
    """A running nginx serving ``root`` (GET, and PUT via DAV), or None with a printed hint if it is missing."""
    binary = which("nginx")
    if binary is None:
        print(f"  SKIP nginx baseline: {INSTALL_HINT}", flush=True)
        yield None
        return
    if not has_dav(binary):
        print(f"  SKIP nginx baseline: {binary} lacks the DAV module; {INSTALL_HINT}", flush=True)
        yield None
        return
    version_out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"nginx/(\S+)", version_out.stderr + version_out.stdout)
    version = match.group(1) if match else "?"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(CONF.format(work=work, root=root, port=port))
    log = work / "stderr.log"
    args = [binary, "-p", f"{work}/", "-e", str(work / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/", process, log, timeout=15)
        yield Nginx(url=url, root=root, version=version, process=process, ps=psutil.Process(process.pid))
    finally:
        stop_process(process)
