"""The ``sandboxd`` command: ``agent`` and ``interpreter`` run inside a sandbox; ``serve`` runs the runtime on the
host; ``node`` runs one machine's sandboxes as a Kubernetes Node."""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the commands start without them
    import argparse
    import ipaddress
    from pathlib import Path

from sandboxd import ENVD_VERSION, __version__


def _env_path(name: str) -> Path | None:
    from pathlib import Path

    value = os.environ.get(name)
    return Path(value) if value else None


def _type_error(message: str) -> Exception:
    """argparse's error for a flag's value (argparse is imported when a value is converted)."""
    import argparse

    return argparse.ArgumentTypeError(message)


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise _type_error(f"{value} is not a TCP port")
    return port


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    import ipaddress

    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _type_error(f"{value} is not an IP address or CIDR block") from None


def _v4_network(value: str) -> ipaddress.IPv4Network:
    import ipaddress

    try:
        return ipaddress.IPv4Network(value)
    except ValueError:
        raise _type_error(f"{value} is not an IPv4 CIDR block (host bits must be zero)") from None


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(value: str) -> int | float:
        number = kind(value)
        if number <= 0:
            raise _type_error(f"{value} must be positive")
        return number

    return parse


MAX_WARM_SANDBOXES = 256
"""``--warm-sandboxes`` at most: each is an idle sandbox (~10 MiB of PSS, a disk and a network slot),
booted at nice 10; 256 covers a burst the size of the default ``--max-sandboxes``."""


def _warm_count(value: str) -> int | None:
    if value == "auto":
        return None  # the default: sized from the host (host.default_warm_sandboxes)
    number = int(value)
    if not 0 <= number <= MAX_WARM_SANDBOXES:
        raise _type_error(f"{value} is not between 0 and {MAX_WARM_SANDBOXES}")
    return number


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP server's connection bounds (sandboxd.agent.http_server), the same for both servers."""
    from sandboxd.agent.http_server import DEFAULT_HEAD_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS

    parser.add_argument(
        "--max-connections",
        type=_positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"open connections at most; idle ones close first to admit others (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=DEFAULT_HEAD_TIMEOUT_S,
        help=f"seconds a client has to send a complete request head (default: {DEFAULT_HEAD_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive(float),
        default=DEFAULT_IDLE_TIMEOUT_S,
        help=f"seconds an idle keep-alive connection is kept (default: {DEFAULT_IDLE_TIMEOUT_S:g})",
    )


def _connection_limits(args: argparse.Namespace) -> Any:
    from sandboxd.agent.http_server import ConnectionLimits

    return ConnectionLimits(
        max_connections=args.max_connections, head_timeout=args.header_timeout, idle_timeout=args.idle_timeout
    )


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, the same steps: ``$COLUMNS``, else the width of the
    terminal on stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


@functools.cache
def _help_formatter() -> type[argparse.HelpFormatter]:
    """argparse's help formatter, which imports ``shutil`` for the terminal's width each time one is
    made (``add_argument`` makes one): shutil brings ``bz2`` and ``lzma`` with their libraries, 0.5 MiB
    of the standalone agent's RSS. The width comes from :func:`_terminal_columns` instead. (A class
    made on first use: argparse is imported only when a parser is built.)"""
    import argparse

    class HelpFormatter(argparse.HelpFormatter):
        def __init__(
            self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
        ) -> None:
            columns = _terminal_columns() - 2 if width is None else width
            super().__init__(prog, indent_increment, max_help_position, columns)

    return HelpFormatter


def _add_network_flags(parser: argparse.ArgumentParser) -> None:
    """Sandbox networking flags, the same for ``serve`` and ``node`` (both build the runtime's
    ``SandboxNetworks``)."""
    from pathlib import Path

    net = parser.add_argument_group("sandbox networking (docs/network.md)")
    net.add_argument(
        "--uplink",
        default=os.environ.get("SANDBOXD_UPLINK") or None,
        help="the only interface sandbox traffic may leave by, masqueraded to its address (also: $SANDBOXD_UPLINK; "
        "default: whichever the host's routes pick)",
    )
    net.add_argument(
        "--sandbox-subnet",
        type=_v4_network,
        help="IPv4 block for sandbox links, a /30 each (default: a free block of 10.240.0.0/12)",
    )
    net.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="ADDR[:PORT]",
        help="resolver the sandboxes' DNS is forwarded to; repeatable (default: the host's /etc/resolv.conf)",
    )
    net.add_argument(
        "--sandbox-allow",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="open a range sandboxes may otherwise never reach (private, link-local, metadata); repeatable",
    )
    net.add_argument(
        "--sandbox-deny",
        action="append",
        type=_network,
        default=[],
        metavar="CIDR",
        help="another range sandboxes may never reach; repeatable",
    )
    net.add_argument(
        "--egress-trust",
        type=Path,
        help="PEM CA certificates the egress proxy trusts, besides the host's, when it re-encrypts HTTPS to a host "
        "with header rules",
    )
    net.add_argument(
        "--no-network", action="store_true", help="give sandboxes loopback only (no link, no firewall table)"
    )


def _network_options(args: argparse.Namespace) -> Any:
    """The networking flags as ``NetworkOptions``; None for ``--no-network`` (loopback only)."""
    from sandboxd.runtime.network import NetworkOptions

    if args.no_network:
        return None
    return NetworkOptions(
        uplink=args.uplink,
        subnet=args.sandbox_subnet,
        dns_upstreams=args.dns_upstream,
        allow=args.sandbox_allow,
        deny=args.sandbox_deny,
        egress_trust=args.egress_trust,
    )


def build_parser(only_agent: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``only_agent``, just ``sandboxd agent`` (``sandboxd.agent.standalone``)."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="sandboxd", description=__doc__, formatter_class=_help_formatter())
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__} (envd {ENVD_VERSION})")
    commands = parser.add_subparsers(dest="command", required=True)

    agent = commands.add_parser(
        "agent", help="run the envd-compatible agent (inside a sandbox)", formatter_class=_help_formatter()
    )
    agent.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    agent.add_argument("--port", type=_port, default=49983, help="Connect + REST port (default: 49983, as envd)")
    agent.add_argument("--user", help="default user (default: 'user' if it exists, else the current account)")
    agent.add_argument("--workdir", help="default working directory for commands and empty paths")
    agent.add_argument(
        "--access-token", help="require this X-Access-Token on every request (also: $SANDBOXD_ACCESS_TOKEN)"
    )
    agent.add_argument("--grpc-port", type=_port, help="also serve gRPC (grpcio, HTTP/2) on this port")
    _connection_flags(agent)
    if only_agent:
        return parser
    # The runtime's defaults, imported only for the commands that show them: the agent, started in
    # every sandbox, would otherwise load the template builders' modules (~1.7 MiB of its RSS).
    from sandboxd.runtime.code_interpreter import DEFAULT_INDEX
    from sandboxd.runtime.debian import DEFAULT_MIRROR

    interpreter = commands.add_parser(
        "interpreter", help="run the code interpreter (E2B's runCode API over Jupyter kernels, inside a sandbox)"
    )
    interpreter.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    interpreter.add_argument("--port", type=_port, default=49999, help="HTTP port (default: 49999, as E2B's)")
    interpreter.add_argument(
        "--cwd", default="/home/user", help="working directory of default contexts (default: /home/user)"
    )
    interpreter.add_argument(
        "--kernel-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory of kernelspecs searched before Jupyter's data path (repeatable)",
    )
    interpreter.add_argument(
        "--envd-url",
        default="http://127.0.0.1:49983",
        help="the agent, whose /envs holds the sandbox's env vars ('' for none; default: http://127.0.0.1:49983)",
    )
    interpreter.add_argument(
        "--prestart",
        default="python",
        help="languages whose default context starts with the server, comma-separated (default: python)",
    )
    interpreter.add_argument(
        "--pool",
        default="python=1",
        help="spare warm kernels per language for new contexts, e.g. python=1,javascript=0 (default: python=1)",
    )

    serve = commands.add_parser("serve", help="run the runtime: E2B's control-plane API and isolated sandboxes")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=_port, default=3000, help="API and sandbox proxy port (default: 3000)")
    serve.add_argument(
        "--data-dir", type=Path, default=None, help="state, templates and sandboxes (default: /var/lib/sandboxd)"
    )
    serve.add_argument(
        "--api-key", help="the X-API-KEY clients must send (default: generated once, kept in the data dir)"
    )
    serve.add_argument("--domain", help="sandbox domain for Host-based routing (<port>-<id>.<domain>)")
    serve.add_argument(
        "--tls-cert", type=Path, help="serve HTTPS with this PEM certificate (chain), e.g. for *.<domain>"
    )
    serve.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert (if not in the same file)")
    serve.add_argument("--max-sandboxes", type=int, default=256, help="running sandboxes at most (default: 256)")
    serve.add_argument(
        "--sandbox-cpus", type=_positive(int), help="CPU cores per sandbox (default: half the host's, 1 to 2)"
    )
    serve.add_argument(
        "--sandbox-memory-mb",
        type=_positive(int),
        help="memory per sandbox in MiB (default: 1024, less on a host with under 4 GiB to spare)",
    )
    serve.add_argument(
        "--sandbox-disk-mb",
        type=_positive(int),
        help="disk quota per sandbox in MiB (default: 10240, or a quarter of the data dir's free space)",
    )
    serve.add_argument(
        "--warm-sandboxes",
        type=_warm_count,
        default=None,
        metavar="N|auto",
        help="keep N sandboxes of --warm-template booted ahead of need, so creates only give one its "
        f"identity (0-{MAX_WARM_SANDBOXES}; default auto: one per 2 GiB of the sandboxes' memory budget, at most 4, "
        "of a template already built, grown for a while to the size of the bursts of creates it sees (at most 128, "
        "one per 128 MiB of the budget); 0 turns the pool off; see docs/runtime.md)",
    )
    serve.add_argument(
        "--warm-template",
        default="base",
        metavar="NAME",
        help="the template of the warm sandboxes (default: base, what Sandbox.create() asks for)",
    )
    serve.add_argument(
        "--allow-nested-userns",
        action="store_true",
        help="let code in sandboxes create user namespaces (bubblewrap, Chrome's sandbox); see docs/security.md",
    )
    serve.add_argument(
        "--id-registry",
        type=Path,
        default=None,
        help="host-wide registry of sandbox id ranges, shared by every runtime (default: /var/lib/sandboxd-ids)",
    )
    serve.add_argument(
        "--max-timeout", type=int, default=86400, help="longest sandbox timeout in seconds (default: 86400)"
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines for a terminal (text) or one JSON object per line for a log pipeline (default: text)",
    )
    _connection_flags(serve)

    status = commands.add_parser("status", help="a one-screen summary of a running runtime")
    status.add_argument("--url", help="the runtime's URL (default: the one recorded in the data dir)")
    status.add_argument(
        "--data-dir", type=Path, default=None, help="the runtime's data dir (default: /var/lib/sandboxd)"
    )
    status.add_argument("--api-key", help="the runtime's API key (default: $E2B_API_KEY, then the data dir's)")
    status.add_argument("--json", action="store_true", help="print the runtime's /status answer as JSON")
    _add_network_flags(serve)
    serve.add_argument(
        "--backend",
        choices=["local", "kubernetes"],
        default="local",
        help="local: sandboxes on this machine (default); kubernetes: Pods run by `sandboxd node`s of a cluster",
    )
    serve.add_argument(
        "--kubeconfig", type=Path, help="kubernetes backend: kubeconfig (default: $KUBECONFIG or in-cluster)"
    )
    serve.add_argument("--namespace", default="sandboxd", help="kubernetes backend: the sandboxes' namespace")

    node = commands.add_parser("node", help="run this machine's sandboxes as a Kubernetes Node (virtual-kubelet style)")
    node.add_argument("--name", default=None, help="the Node's name (default: the host name)")
    node.add_argument("--data-dir", type=Path, default=None, help="state and sandboxes (default: /var/lib/sandboxd)")
    node.add_argument("--kubeconfig", type=Path, help="kubeconfig (default: $KUBECONFIG or in-cluster)")
    node.add_argument("--namespace", default="sandboxd", help="namespace of sandboxd's shared Secrets")
    node.add_argument("--address", default="127.0.0.1", help="the Node's InternalIP; the tunnel binds it")
    node.add_argument("--tunnel-port", type=_port, default=10250, help="port of the tunnel serve replicas use")
    node.add_argument("--capacity-cpu", type=int, default=None, help="CPU cores offered (default: the host's)")
    node.add_argument("--capacity-memory-mb", type=int, default=None, help="memory offered (default: the host's)")
    node.add_argument("--max-sandboxes", type=int, default=110, help="the Node's pods capacity (default: 110)")
    node.add_argument("--sandbox-cpus", type=_positive(int), help="CPU cores of a Pod without limits (default: 2)")
    node.add_argument("--sandbox-memory-mb", type=_positive(int), help="memory of a Pod without limits (default: 1024)")
    node.add_argument(
        "--sandbox-disk-mb", type=_positive(int), default=10240, help="disk quota per sandbox in MiB (default: 10240)"
    )
    node.add_argument(
        "--id-registry",
        type=Path,
        default=None,
        help="host-wide registry of sandbox id ranges, shared by every runtime and node "
        "(default: /var/lib/sandboxd-ids)",
    )
    node.add_argument(
        "--template-store",
        type=Path,
        default=_env_path("SANDBOXD_TEMPLATE_STORE"),
        help="template layers (default: <data dir>/templates; also $SANDBOXD_TEMPLATE_STORE)",
    )
    node.add_argument(
        "--debian-mirror",
        default=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or DEFAULT_MIRROR,
        help="Debian archive the 'base' template is built from (also $SANDBOXD_DEBIAN_MIRROR)",
    )
    _add_network_flags(node)

    serve.add_argument(
        "--template-store",
        type=Path,
        default=_env_path("SANDBOXD_TEMPLATE_STORE"),
        help="template layers, shareable by several runtimes (default: <data dir>/templates; "
        "also $SANDBOXD_TEMPLATE_STORE)",
    )
    serve.add_argument(
        "--debian-mirror",
        default=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or DEFAULT_MIRROR,
        help=f"Debian archive the 'base' template is built from (default: {DEFAULT_MIRROR}; "
        "also $SANDBOXD_DEBIAN_MIRROR)",
    )
    serve.add_argument(
        "--pypi-index",
        default=os.environ.get("SANDBOXD_PYPI_INDEX") or DEFAULT_INDEX,
        help=f"Python package index the 'code-interpreter-v1' template is built from (default: {DEFAULT_INDEX}; "
        "also $SANDBOXD_PYPI_INDEX)",
    )

    template = commands.add_parser("template", help="manage templates (list, add, import, pull, build, remove, prune)")
    template_commands = template.add_subparsers(dest="template_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--data-dir", type=Path, default=None, help="the runtime's data dir (default: /var/lib/sandboxd)"
    )
    where.add_argument(
        "--template-store",
        type=Path,
        default=None,
        help="the template store (default: the one the runtime last used, else $SANDBOXD_TEMPLATE_STORE, "
        "else <data dir>/templates)",
    )
    template_commands.add_parser("list", parents=[where], help="list templates: state, size, layers, source")
    add = template_commands.add_parser(
        "add", parents=[where], help="register a root filesystem (directory or tarball) as a template"
    )
    add.add_argument("name")
    add.add_argument("--rootfs", type=Path, required=True, help="a root filesystem directory or tarball")
    imported = template_commands.add_parser(
        "import", parents=[where], help="import an OCI archive (oci-layout tarball) or a `docker save` tarball"
    )
    imported.add_argument("name")
    imported.add_argument("archive", type=Path)
    pull = template_commands.add_parser("pull", parents=[where], help="pull an image from a registry (skopeo)")
    pull.add_argument("name")
    pull.add_argument("image", help="an image reference, e.g. debian:trixie or ghcr.io/owner/image:tag")
    pull.add_argument("--insecure", action="store_true", help="allow plain HTTP or unverified TLS to the registry")
    build = template_commands.add_parser(
        "build",
        parents=[where],
        help="build a template: a built-in one now ('base' from Debian's archive with mmdebstrap, "
        "'code-interpreter-v1' on top of it from the Python package index), or NAME --from a Dockerfile "
        "or a Python file defining `template` (E2B's Template()), through the running runtime",
    )
    build.add_argument("name", help="'base', 'code-interpreter-v1', or the name of a template built --from a file")
    build.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="a Dockerfile, or a .py file that defines `template` with e2b's Template() (needs the e2b SDK)",
    )
    build.add_argument(
        "--url", default="http://127.0.0.1:3000", help="the runtime that builds --from files (default: %(default)s)"
    )
    build.add_argument("--api-key", help="its API key (default: the one kept in --data-dir)")
    build.add_argument(
        "--rebuild", action="store_true", help="build again even if a build of this recipe exists (skip the cache)"
    )
    build.add_argument("--debian-mirror", default=os.environ.get("SANDBOXD_DEBIAN_MIRROR") or DEFAULT_MIRROR)
    build.add_argument("--pypi-index", default=os.environ.get("SANDBOXD_PYPI_INDEX") or DEFAULT_INDEX)
    remove = template_commands.add_parser(
        "remove", parents=[where], help="remove a template, its build cache and the layers nothing else uses"
    )
    remove.add_argument("name")
    template_commands.add_parser(
        "prune",
        parents=[where],
        help="forget the build cache records no template is built on (replaced, failed or removed builds) "
        "and delete the layers nothing lists any more",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["agent"]:  # a process that runs nothing but the agent (sandboxd.agent.standalone)
        from sandboxd.agent.standalone import main as agent_main

        agent_main(argv)
        return
    args = build_parser().parse_args(given)
    if args.command == "agent":  # after a flag of the program's own (``sandboxd --version`` exits first)
        from sandboxd.agent.standalone import run_agent

        run_agent(vars(args))
    elif args.command == "interpreter":
        from sandboxd.interpreter.languages import LanguageError, normalize
        from sandboxd.interpreter.server import InterpreterOptions
        from sandboxd.interpreter.server import run as run_interpreter

        try:
            prestart = tuple(normalize(name) for name in args.prestart.split(",") if name.strip())
            pool = {normalize(k): int(v) for k, _, v in (p.partition("=") for p in args.pool.split(",") if p.strip())}
        except (LanguageError, ValueError) as exc:
            sys.exit(f"sandboxd interpreter: {exc}")
        run_interpreter(
            InterpreterOptions(
                host=args.host,
                port=args.port,
                cwd=args.cwd,
                kernel_dirs=args.kernel_dir,
                envd_url=args.envd_url or None,
                prestart=prestart,
                pool=pool,
            )
        )
    elif args.command == "node":
        import socket

        from sandboxd.kube import pods
        from sandboxd.kube.node import NodeOptions
        from sandboxd.kube.node import run as run_node
        from sandboxd.runtime.manager import Limits
        from sandboxd.runtime.server import DEFAULT_DATA_DIR

        options = NodeOptions(
            name=args.name or socket.gethostname().lower(),
            data_dir=args.data_dir or DEFAULT_DATA_DIR,
            namespace=args.namespace,
            kubeconfig=args.kubeconfig,
            address=args.address,
            tunnel_port=args.tunnel_port,
            max_sandboxes=args.max_sandboxes,
            limits=Limits(
                cpu_count=args.sandbox_cpus or pods.DEFAULT_CPUS,
                memory_mb=args.sandbox_memory_mb or pods.DEFAULT_MEMORY_MB,
                disk_mb=args.sandbox_disk_mb,
            ),
            template_store=args.template_store,
            debian_mirror=args.debian_mirror,
            network=_network_options(args),
        )
        if args.id_registry is not None:
            options.id_registry = args.id_registry
        if args.capacity_cpu:
            options.capacity_cpu = args.capacity_cpu
        if args.capacity_memory_mb:
            options.capacity_memory_mb = args.capacity_memory_mb
        run_node(options)
    elif args.command == "serve" and args.backend == "kubernetes":
        from sandboxd.kube import pods
        from sandboxd.kube.serve import KubeServeOptions
        from sandboxd.kube.serve import run as run_kube
        from sandboxd.runtime.manager import Limits

        run_kube(
            KubeServeOptions(
                host=args.host,
                port=args.port,
                namespace=args.namespace,
                kubeconfig=args.kubeconfig,
                api_key=args.api_key,
                domain=args.domain,
                # --sandbox-cpus/--sandbox-memory-mb default to the Pod defaults here: the sizing
                # from the host that the local backend does would measure this replica's machine.
                limits=Limits(
                    cpu_count=args.sandbox_cpus or pods.DEFAULT_CPUS,
                    memory_mb=args.sandbox_memory_mb or pods.DEFAULT_MEMORY_MB,
                    max_timeout_s=args.max_timeout,
                ),
            )
        )
    elif args.command == "serve":
        from sandboxd.runtime.host import SandboxFlags
        from sandboxd.runtime.server import DEFAULT_DATA_DIR, ServeOptions
        from sandboxd.runtime.server import run as run_runtime

        serve_options = ServeOptions(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir or DEFAULT_DATA_DIR,
            api_key=args.api_key,
            domain=args.domain,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            sandboxes=SandboxFlags(
                cpus=args.sandbox_cpus,
                memory_mb=args.sandbox_memory_mb,
                disk_mb=args.sandbox_disk_mb,
                max_sandboxes=args.max_sandboxes,
                max_timeout_s=args.max_timeout,
                nested_userns=args.allow_nested_userns,
                warm_sandboxes=args.warm_sandboxes,
                warm_template=args.warm_template,
            ),
            log_format=args.log_format,
            network=_network_options(args),
            template_store=args.template_store,
            debian_mirror=args.debian_mirror,
            pypi_index=args.pypi_index,
            connections=_connection_limits(args),
        )
        if args.id_registry is not None:
            serve_options.id_registry = args.id_registry
        run_runtime(serve_options)
    elif args.command == "status":
        from sandboxd.runtime.observe.status import main as status_main
        from sandboxd.runtime.server import DEFAULT_DATA_DIR

        sys.exit(status_main(args.url, args.data_dir or DEFAULT_DATA_DIR, args.api_key, args.json))
    elif args.command == "template":
        from sandboxd.runtime.template_cli import run as run_template

        sys.exit(run_template(args))
    else:  # pragma: no cover - argparse enforces the choices
        sys.exit(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
