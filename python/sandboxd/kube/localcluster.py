"""A real Kubernetes control plane on loopback, for development, tests and benchmarks.

etcd (Debian's ``etcd-server``), and ``kube-apiserver``, ``kube-scheduler`` and
``kube-controller-manager`` of one release (built by ``deploy/local/build-kubernetes.sh``, which
``make cluster`` runs), with certificates made locally by ``openssl``: a CA, the API server's
serving certificate, and one client certificate per identity (``admin`` in ``system:masters``;
``sandboxd-node`` and ``sandboxd-serve``, which get only what ``deploy/kubernetes/rbac.yaml``
grants). Every component listens on 127.0.0.1 on a free port; nothing is global but the files
under the cluster's directory.

The controller manager watches node leases on a short clock (``--node-monitor-grace-period``), so
a dead ``sandboxd node`` turns NotReady in seconds rather than the default 50.

    python -m sandboxd.kube.localcluster up [--dir DIR]    # prints the kubeconfig paths; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.34.4"
"""The release ``make cluster`` builds; tests, benches and docs name it from here."""

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_BIN_DIR = REPO_ROOT / ".cluster" / "bin" / KUBERNETES_VERSION

NODE_MONITOR_GRACE_S = 8
"""How long a node may go without renewing its lease before the node controller marks it
NotReady. Kubernetes' default is 50 s; 8 s keeps the dead-node test short while staying well
above the nodes' lease renewal interval (2 s, see :mod:`sandboxd.kube.node`)."""

START_TIMEOUT_S = 120.0
"""Cold start on 2 busy cores: the API server installs its built-in objects and RBAC roles."""

SERVICE_CIDR = "10.96.0.0/24"
"""Required by the API server; nothing routes it (sandboxd nodes run no Services)."""

IDENTITIES = {
    "admin": "system:masters",
    "sandboxd-node": "sandboxd:nodes",
    "sandboxd-serve": "sandboxd:serve",
}
"""Client certificates: CN = user, O = group. deploy/kubernetes/rbac.yaml binds the sandboxd roles
to the ServiceAccounts of a real cluster; here :meth:`LocalCluster.apply_rbac` binds them to these
users as well."""


def free_port() -> int:
    """A port nothing listens on now (bound and released: the caller binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass
class LocalCluster:
    """etcd and the three control-plane components, started and stopped together."""

    root: Path
    bin_dir: Path = DEFAULT_BIN_DIR
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    apiserver_port: int = 0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def kubeconfig(self, identity: str = "admin") -> Path:
        """The kubeconfig file of ``identity`` (admin, sandboxd-node, sandboxd-serve)."""
        return self.root / f"{identity}.kubeconfig"

    # ------------------------------------------------------------------------------- start

    def start(self) -> LocalCluster:
        missing = [b for b in ("kube-apiserver", "kube-scheduler", "kube-controller-manager") if not self._bin(b)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not found in {self.bin_dir}: run `make cluster` first")
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd not found: install Debian's etcd-server (`make cluster-deps`)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._certificates()
        try:
            self._start_etcd()
            self._start_apiserver()
            for identity in IDENTITIES:
                self._write_kubeconfig(identity)
            self._start_controllers()
        except BaseException:
            self.stop()
            raise
        return self

    def _bin(self, name: str) -> Path | None:
        path = self.bin_dir / name
        return path if os.access(path, os.X_OK) else None

    def _certificates(self) -> None:
        pki = self.root / "pki"
        if (pki / "done").exists():
            return
        pki.mkdir(exist_ok=True)
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=sandboxd-local-ca",
                 "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)  # fmt: skip
        san = "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes.default.svc"
        self._signed(pki, "apiserver", "/CN=kube-apiserver", san)
        for user, group in IDENTITIES.items():
            self._signed(pki, user, f"/O={group}/CN={user}", None)
        _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
        _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        for key in pki.glob("*.key"):
            key.chmod(0o600)
        (pki / "done").touch()

    @staticmethod
    def _signed(pki: Path, name: str, subject: str, san: str | None) -> None:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=pki)  # fmt: skip
        extra = ["-extfile", f"{name}.ext"] if san else []
        if san:
            (pki / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "3650", "-out", f"{name}.crt", *extra, cwd=pki)  # fmt: skip

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.log").open("ab")
        # A process group of its own: stop() signals exactly what we started.
        self.processes[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            "etcd", "--name", "local", "--data-dir", str(self.root / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"local=http://127.0.0.1:{peer}", "--listen-metrics-urls", "",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(1 << 30),
        ])  # fmt: skip
        self._wait("etcd", lambda: _http_ok(f"{self.etcd_url}/health"))

    def _start_apiserver(self) -> None:
        pki = self.root / "pki"
        self.apiserver_port = free_port()
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            "--etcd-servers", self.etcd_url, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(self.apiserver_port), "--cert-dir", str(self.root / "apiserver-certs"),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"),
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--authorization-mode", "Node,RBAC", "--service-cluster-ip-range", SERVICE_CIDR,
            "--endpoint-reconciler-type", "none", "--allow-privileged",
            "--profiling=false", "--watch-cache=true",
        ])  # fmt: skip
        ca = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ca.load_cert_chain(pki / "admin.crt", pki / "admin.key")
        self._wait("kube-apiserver", lambda: _http_ok(f"{self.server}/readyz", ca))

    def _write_kubeconfig(self, identity: str) -> None:
        pki = self.root / "pki"
        path = self.kubeconfig(identity)
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: local\n  cluster:\n    server: {self.server}\n"
            f"    certificate-authority: {pki / 'ca.crt'}\n"
            f"users:\n- name: {identity}\n  user:\n"
            f"    client-certificate: {pki / (identity + '.crt')}\n    client-key: {pki / (identity + '.key')}\n"
            f"contexts:\n- name: {identity}\n  context:\n    cluster: local\n    user: {identity}\n"
            f"current-context: {identity}\n"
        )
        path.chmod(0o600)

    def _start_controllers(self) -> None:
        pki = self.root / "pki"
        admin = str(self.kubeconfig("admin"))
        common = ["--kubeconfig", admin, "--authentication-kubeconfig", admin, "--authorization-kubeconfig", admin,
                  "--bind-address", "127.0.0.1", "--leader-elect=false"]  # fmt: skip
        self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"), *common, "--secure-port", str(free_port()),
        ])  # fmt: skip
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"), *common, "--secure-port", str(free_port()),
            "--service-account-private-key-file", str(pki / "sa.key"), "--root-ca-file", str(pki / "ca.crt"),
            "--use-service-account-credentials=false", "--service-cluster-ip-range", SERVICE_CIDR,
            "--node-monitor-period", "1s", "--node-monitor-grace-period", f"{NODE_MONITOR_GRACE_S}s",
            "--controllers", "*,-bootstrapsigner,-tokencleaner,-csrsigning,-csrapproving,-csrcleaner",
        ])  # fmt: skip
        for name in ("kube-scheduler", "kube-controller-manager"):
            time.sleep(0.2)
            proc = self.processes[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def apply_rbac(self, namespace: str = "sandboxd") -> None:
        """Apply ``deploy/kubernetes/rbac.yaml`` (its namespace, ServiceAccounts and roles) and bind
        the same roles to this cluster's ``sandboxd-node`` and ``sandboxd-serve`` users, so local
        nodes and replicas run with exactly the permissions a real deployment grants."""
        import asyncio

        import yaml

        from .client import Kube, KubeError

        documents = [d for d in yaml.safe_load_all((REPO_ROOT / "deploy/kubernetes/rbac.yaml").read_text()) if d]
        for doc in documents:
            doc["metadata"]["namespace"] = doc["metadata"].get("namespace") and (
                namespace if doc["metadata"]["namespace"] == "sandboxd" else doc["metadata"]["namespace"]
            )
            if doc["kind"] == "Namespace":
                doc["metadata"]["name"] = namespace
            for subject in doc.get("subjects", []):
                subject["namespace"] = namespace
                user = subject["name"]
            if doc["kind"].endswith("Binding"):
                doc["subjects"].append({"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"})

        async def apply() -> None:
            kube = await Kube.connect(self.kubeconfig("admin"))
            try:
                for doc in documents:
                    group, _, version = doc["apiVersion"].rpartition("/")
                    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
                    ns = doc["metadata"].get("namespace")
                    path = prefix + (f"/namespaces/{ns}" if ns else "") + f"/{doc['kind'].lower()}s"
                    try:
                        await kube.create(path, doc)
                    except KubeError as exc:
                        if exc.status != 409:
                            raise
                        await kube.replace(f"{path}/{doc['metadata']['name']}", doc)
            finally:
                await kube.close()

        asyncio.run(apply())

    def _wait(self, name: str, ready: object) -> None:
        assert callable(ready)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            proc = self.processes[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not become ready in {START_TIMEOUT_S}s:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        """The last lines of a component's log."""
        try:
            return "\n".join((self.root / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """SIGTERM each component (controllers first, etcd last), SIGKILL what lingers."""
        for name in ("kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sandboxd.kube.localcluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".cluster" / "run", help="state, certs and logs")
    parser.add_argument("--bin-dir", type=Path, default=DEFAULT_BIN_DIR)
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir, args.bin_dir).start()
    cluster.apply_rbac()
    print(
        f"Kubernetes {KUBERNETES_VERSION} control plane on {cluster.server}\n"
        f"  export KUBECONFIG={cluster.kubeconfig('admin')}\n"
        f"  node identity:  {cluster.kubeconfig('sandboxd-node')}\n"
        f"  serve identity: {cluster.kubeconfig('sandboxd-serve')}\n"
        f"logs in {args.dir}; Ctrl-C stops it",
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            for name, proc in cluster.processes.items():
                if proc.poll() is not None:
                    sys.exit(f"{name} exited with {proc.returncode}:\n{cluster.tail(name)}")
            time.sleep(0.5)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
