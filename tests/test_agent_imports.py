"""What a standalone ``sandboxd agent`` loads (issue 16, the agent's memory): libraries only one kind of
request needs are loaded by the first such request, and uvicorn's command-line half is never loaded.
The RSS figures themselves are in the benches (``commands``: agent RSS idle), not asserted here."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from conftest import Agent, free_port
from sandboxd.agent.lean import DEFERRED


def mapped(pid: int, fragment: str) -> bool:
    """Whether a file whose path contains ``fragment`` is mapped into the process (an extension module
    is mapped from the moment it is imported)."""
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def test_psutil_is_loaded_by_the_first_metrics_request(start_agent: Callable[..., Agent]) -> None:
    agent = start_agent()
    pid = agent.process.pid
    assert httpx.get(f"{agent.url}/health").status_code == 204
    assert not mapped(pid, "_psutil_linux"), "psutil was imported before any request needed it"
    response = httpx.get(f"{agent.url}/metrics")
    assert response.status_code == 200
    assert response.json()["mem_total"] > 0
    assert mapped(pid, "_psutil_linux")


def test_zlib_is_loaded_by_the_first_gzip_request(start_agent: Callable[..., Agent], tmp_path: Path) -> None:
    """``zlib`` (with libz) is deferred (``lean.DEFERRED``): commands and plain transfers never map it,
    and the first request that needs it, a gzip-compressed Connect request or a download with gzip
    accepted, loads it and is answered."""
    import gzip

    agent = start_agent()
    pid = agent.process.pid
    headers = {**agent.headers(), "Connect-Protocol-Version": "1"}
    target = tmp_path / "text.txt"
    target.write_bytes(b"compressible line\n" * 4096)
    stat = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": str(target)}, headers=headers)
    assert stat.status_code == 200, stat.text
    plain = httpx.get(f"{agent.url}/files", params={"path": str(target)}, headers={"Accept-Encoding": "identity"})
    assert plain.content == target.read_bytes()
    assert not mapped(pid, "/zlib."), "zlib was imported before any request needed it"
    body = gzip.compress(json.dumps({"path": str(target)}).encode())
    stat = httpx.post(
        f"{agent.url}/filesystem.Filesystem/Stat",
        content=body,
        headers={**headers, "Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert stat.status_code == 200, stat.text
    assert int(stat.json()["entry"]["size"]) == target.stat().st_size
    assert mapped(pid, "/zlib.")
    download = httpx.get(f"{agent.url}/files", params={"path": str(target)}, headers={"Accept-Encoding": "gzip"})
    assert download.headers.get("content-encoding") == "gzip"
    assert download.content == target.read_bytes()  # httpx inflated it


STAND_IN = """
import json, sys
from sandboxd.agent.lean import load_stand_in
stand_in = load_stand_in("libz.so.1")
try:
    import zlib
    refused = None
except ImportError as exc:
    refused = str(exc)
closed = stand_in.close()
import zlib
print(json.dumps({"refused": refused, "closed": closed, "crc": zlib.crc32(b"zlib")}))
"""


def test_a_stand_in_library_satisfies_its_soname_and_a_library_that_needs_its_symbols_fails_to_load() -> None:
    """``lean.stand_in_library`` is taken by the loader for the library it names: ``zlib``'s module,
    which needs ``libz.so.1``'s ``inflate``, then fails to import with the loader's error (nothing
    half-loaded), and imports once the stand-in is unloaded: the fallback ``upb_without_libstdcxx``
    relies on should upb ever need the C++ runtime."""
    out = subprocess.run([sys.executable, "-c", STAND_IN], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["refused"] is not None and "undefined symbol" in got["refused"], got
    assert got["closed"] is True
    assert got["crc"] == 1938324794


LAZY = """
import json, os, sys
sys.setdlopenflags(os.RTLD_LAZY)
from sandboxd.agent.lean import import_with_stand_in
imported = import_with_stand_in("zlib", "libz.so.1")
import zlib
print(json.dumps({"imported": imported, "crc": zlib.crc32(b"zlib"), "lazy": sys.getdlopenflags() == os.RTLD_LAZY}))
"""


def test_a_module_needing_the_stand_ins_symbols_fails_to_import_though_the_process_binds_lazily() -> None:
    """Bound lazily (``sys.setdlopenflags(RTLD_LAZY)``), ``zlib``'s module imported beside a stand-in
    for ``libz.so.1`` and its first call of ``zlibVersion`` ended the process with the loader's
    "symbol lookup error" (exit 127): a protobuf whose upb needed the C++ runtime would have killed
    the agent mid-request. ``lean.import_with_stand_in`` binds the import at once: it fails, the
    stand-in goes, the real library loads, and the process's flags are as they were."""
    out = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"imported": False, "crc": 1938324794, "lazy": True}


def test_the_deferred_subprocess_has_subprocess_own_constants_and_runs_when_used() -> None:
    """asyncio reads ``subprocess.PIPE``, ``STDOUT`` and ``DEVNULL`` while it is imported; the deferred
    module answers them without loading ``subprocess`` (``lean._DeferredSubprocess``), with its values."""
    code = (
        "import json, sys\n"
        "from sandboxd.agent import lean\n"
        "lean.defer()\n"
        "import asyncio, asyncio.subprocess\n"
        "stand_in = sys.modules['subprocess']\n"
        "deferred = type(stand_in).__name__\n"
        "seen = [asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT, asyncio.subprocess.DEVNULL]\n"
        "done = stand_in.run(['/bin/echo', 'hi'], stdout=stand_in.PIPE, check=True).stdout\n"
        "import subprocess\n"
        "real = [subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL]\n"
        "print(json.dumps([deferred, seen, real, done.decode(), subprocess.Popen is stand_in.Popen]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    deferred, seen, real, done, same = json.loads(out.stdout)
    assert deferred == "_DeferredSubprocess"
    assert seen == real == [-1, -2, -3]
    assert done == "hi\n" and same


def real_libstdcxx(pid: int) -> bool:
    return any("/libstdc++.so." in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def test_the_standalone_agent_runs_protobuf_without_the_cxx_runtime_unless_grpc_needs_it(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """protobuf's upb names ``libstdc++`` as needed and uses none of it: the standalone agent loads it
    with a stand-in (``lean.upb_without_libstdcxx``), and its messages work, binary and JSON; with
    ``--grpc-port`` (grpcio is C++) the real runtime is loaded and gRPC is served."""
    from sandboxd._proto.process import process_pb2

    agent = start_agent()
    request = process_pb2.StartRequest()
    request.process.cmd = "/bin/sh"
    request.process.args.extend(["-c", "printf hello"])
    request.process.envs["A"] = "1"
    body = request.SerializeToString()
    headers = {**agent.headers(), "Connect-Protocol-Version": "1", "Content-Type": "application/connect+proto"}
    r = httpx.post(
        f"{agent.url}/process.Process/Start", content=struct.pack(">BI", 0, len(body)) + body, headers=headers
    )
    assert r.status_code == 200 and b"hello" in r.content
    stat = httpx.post(
        f"{agent.url}/filesystem.Filesystem/Stat",
        json={"path": str(tmp_path)},
        headers={**agent.headers(), "Connect-Protocol-Version": "1"},
    )
    assert stat.status_code == 200 and stat.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    assert not real_libstdcxx(agent.process.pid), "the standalone agent mapped libstdc++"
    assert mapped(agent.process.pid, "libstdc++.so.6 stand-in")

    with_grpc = start_agent(grpc=True)
    assert real_libstdcxx(with_grpc.process.pid)
    assert httpx.get(f"{with_grpc.url}/health").status_code == 204


AGENT_PROCESS = """
import json, sys
from sandboxd.agent.lean import defer, lazy_protobuf, uvicorn_package_without_cli
defer()
uvicorn_package_without_cli()
lazy_protobuf()
from sandboxd.agent.server import prepare
prepared = prepare("127.0.0.1", 0)
unneeded = sorted(m for m in sys.modules if m in ("click", "uvicorn.main", "uvicorn.supervisors", "uvicorn.config",
                  "uvicorn.server", "uvicorn._types", "uvicorn.lifespan", "uvicorn.middleware", "a2wsgi",
                  "multiprocessing", "psutil", "python_multipart", "email", "logging.handlers", "logging.config",
                  "google.protobuf.text_format", "hashlib", "hmac", "secrets", "argparse", "ast", "dis",
                  "google.protobuf.internal.type_checkers"))
stand_ins = ("_LazyModule", "_Deferred", "_DeferredSubprocess")
deferred = sorted(m for m, module in sys.modules.items() if type(module).__name__ in stand_ins)
import inspect, uvicorn, uvicorn.config, uvicorn.server
print(json.dumps({
    "unneeded": unneeded,
    "not_run_yet": deferred,
    "config_is_the_submodules": uvicorn.Config is uvicorn.config.Config and uvicorn.Server is uvicorn.server.Server,
    "uvicorn_date": uvicorn.server.formatdate(784111777.0, usegmt=True),
    "run_when_used": [uvicorn.server.platform.system(), uvicorn.server.random.randint(3, 3),
                      uvicorn.config.logging.config.dictConfig.__name__, str(inspect.signature(divmod)),
                      __import__("calendar").timegm((1970, 1, 2, 0, 0, 0)),
                      __import__("asyncio").sslproto.SSLProtocol.__name__,
                      str(__import__("ipaddress").ip_address("::1")), __import__("textwrap").indent("x", "> "),
                      sys.modules["inspect"] is not inspect and sys.modules["inspect"].signature is inspect.signature,
                      __import__("zlib").crc32(b"zlib"), __import__("subprocess").list2cmdline(["a b"]),
                      __import__("array").array("i", [7]).tolist(), __import__("base64").b64encode(b"hi").decode(),
                      __import__("mimetypes").guess_type("/a.txt")[0], __import__("shutil").copyfileobj.__name__,
                      __import__("tempfile").gettempprefix(), __import__("urllib.parse").parse.quote("a b")],
}))
"""


def test_the_agent_server_loads_without_uvicorns_command_line_config_and_server() -> None:
    """The same steps as ``sandboxd agent``: uvicorn's package registered without its ``__init__``, its
    httptools protocol imported without ``uvicorn.config``, ``uvicorn.server`` and ``uvicorn._types``
    (the agent's server is ``sandboxd.agent.serving``), protobuf's pure-Python half registered to load on
    first use, ``inspect`` deferred, then the agent's state and server built. What is left out still
    works when asked for: ``uvicorn.Config`` and ``uvicorn.Server`` (each imported then, without
    ``email`` and with ``logging.config`` deferred in turn), and ``inspect``."""
    out = subprocess.run([sys.executable, "-c", AGENT_PROCESS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "unneeded": [],
        "not_run_yet": [  # imported by libraries for paths the agent does not take (sandboxd.agent.lean)
            "array",
            "asyncio.sslproto",
            "base64",
            "binascii",
            "calendar",
            "google.protobuf.internal.python_message",
            "google.protobuf.json_format",
            "inspect",
            "ipaddress",
            "locale",
            "mimetypes",
            "shutil",
            "subprocess",
            "tempfile",
            "textwrap",
            "tokenize",
            "urllib.parse",
            "zlib",
        ],
        "config_is_the_submodules": True,
        "uvicorn_date": "Sun, 06 Nov 1994 08:49:37 GMT",  # email.utils.formatdate's, without email
        "run_when_used": [
            "Linux",
            3,
            "dictConfig",
            "(x, y, /)",
            86400,
            "SSLProtocol",
            "::1",
            "> x",
            True,
            1938324794,
            '"a b"',
            [7],
            "aGk=",
            "text/plain",
            "copyfileobj",
            "tmp",
            "a%20b",
        ],
    }


AGENT_SERVES = """
from sandboxd.agent import lean
lean.defer(("array",))  # the agent defers it before anything imports socket (which imports it); so must we
import gc, json, os, signal, socket, struct, sys, threading, time
port, work = int(sys.argv[1]), sys.argv[2]

def call(request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as sock:  # no http.client: it imports email
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply

def requests() -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.05)
    start = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "head -c 3000000 /dev/zero"], "envs": {"A": "1"}}})
    frame = struct.pack(">BI", 0, len(start)) + start.encode()
    stat = json.dumps({"path": work}).encode()
    replies = [
        call(b"GET /health HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n"),
        call(b"POST /process.Process/Start HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
             b"content-type: application/connect+json\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(frame), frame)),
    ]
    filesystem_after_start = "sandboxd.agent.services.filesystem" in sys.modules
    files_after_start = "sandboxd.agent.files" in sys.modules
    deferred_after_start = sorted(name for name in (lean.PROTOBUF_WELL_KNOWN_TYPES, "datetime", "urllib.parse")
                                  if isinstance(sys.modules.get(name), lean._Deferred))
    replies += [
        call(b"POST /filesystem.Filesystem/Stat HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
             b"content-type: application/json\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(stat), stat)),
        call(b"POST /files?path=%s/f HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
             b"content-type: application/octet-stream\\r\\ncontent-length: 5\\r\\n\\r\\nhello" % work.encode()),
        call(b"GET /files?path=%s/f HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n" % work.encode()),
        call(b"GET /nowhere%2Fat%20all HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n"),
        call(b"POST /filesystem.Filesystem/CreateWatcher HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
             b"content-type: application/json\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(stat), stat)),
    ]
    multipart_after_raw = "python_multipart" in sys.modules
    part = b"--b\\r\\ncontent-disposition: form-data; name=\\"file\\"; filename=\\"m\\"\\r\\n\\r\\nhi\\r\\n--b--\\r\\n"
    replies.append(call(b"POST /files?path=%s/m HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
                        b"content-type: multipart/form-data; boundary=b\\r\\ncontent-length: %d\\r\\n\\r\\n%s"
                        % (work.encode(), len(part), part)))
    print(json.dumps({
        "status": [int(r.split(b" ", 2)[1]) for r in replies],
        "output": len(replies[1]) > 3000000,
        "download": replies[4].endswith(b"\\r\\n\\r\\nhello"),
        "watcher_id": len(json.loads(replies[6].split(b"\\r\\n\\r\\n", 1)[1])["watcherId"]),
        "multipart": open(work + "/m").read(),
        "multipart_after_raw": multipart_after_raw,
        "filesystem_after_start": filesystem_after_start,
        "files_after_start": files_after_start,
        "deferred_after_start": deferred_after_start,
        "modified_time": json.loads(replies[2].split(b"\\r\\n\\r\\n", 1)[1])["entry"]["modifiedTime"][-1:],
        "timestamp_bases": [c.__module__ for c in sys.modules["google.protobuf.timestamp_pb2"].Timestamp.__mro__[1:-1]],
        "never_imported": sorted(m for m in ("argparse", "ast", "dis", "uvicorn.config", "uvicorn.server",
                                 "uvicorn._types", "logging.config", "email", "secrets", "hmac", "hashlib",
                                 "random", "bz2", "lzma", "fnmatch") if m in sys.modules),
        "still_deferred": sorted(m for m in lean.DEFERRED if isinstance(sys.modules[m], lean._Deferred)),
        "ast_types": sum(1 for o in gc.get_objects() if isinstance(o, type) and o.__module__ == "ast"),
        "datetime_py_ran": "__builtins__" in vars(sys.modules["datetime"]),  # set by executing datetime.py
        "optimize": sys.flags.optimize,
        "dataclass_doc": sys.modules["sandboxd.agent.state"].AgentState.__doc__.splitlines()[0],
    }), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=requests, daemon=True).start()
from sandboxd.agent import lean
from sandboxd.cli import main
main(["agent", "--port", str(port), "--workdir", work])
"""


@pytest.mark.parametrize("flags", [[], ["-OO"]], ids=["plain", "OO"])
def test_the_standalone_agent_serves_without_argparse_inspect_and_uvicorns_server(
    tmp_path: Path, flags: list[str]
) -> None:
    """``sandboxd agent`` as started usually (its flags read without argparse) answers a request of
    each kind with ``inspect``, ``ast`` and ``dis`` never imported, nor uvicorn's config and server, and
    stops on SIGTERM: by that signal, as uvicorn's server ends a process (the handler found restored,
    the signal raised again). The same under ``-OO`` (``agent.optimized``), where no dataclass has a
    docstring and ``dataclasses`` would import ``inspect`` to write one. And the interpreter never made
    its AST node types (``lean._import_without_compiling_forward_refs``): each run is made twice with a
    cache of ``.pyc`` files of its own, so that the second compiles nothing from source."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    for _ in range(2):  # the first run writes the .pyc files the second reads
        port = str(free_port())
        out = subprocess.run(
            [sys.executable, *flags, "-c", AGENT_SERVES, port, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        assert out.returncode == -15, out.stderr  # killed by its own SIGTERM, raised again after the drain
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "status": [204, 200, 200, 200, 200, 404, 200, 200],
        "output": True,
        "download": True,
        "watcher_id": 21,
        "multipart": "hi",
        "multipart_after_raw": False,  # a raw upload's content type is read without python-multipart
        "filesystem_after_start": False,  # the filesystem and watch services are built by their first call
        "files_after_start": False,  # /files' module is imported by the first /files request
        # protobuf's well-known types (and datetime) are imported by the first that is made: the
        # filesystem's Timestamp, printed by its own ToJsonString, a method of its well-known base
        "deferred_after_start": ["datetime", "google.protobuf.internal.well_known_types", "urllib.parse"],
        "modified_time": "Z",
        "timestamp_bases": [
            "google._upb._message",
            "google.protobuf.message",
            "google.protobuf.internal.well_known_types",
        ],
        "never_imported": [],
        # loaded by the first request of their kind: mimetypes by the download's content type,
        # urllib.parse by /files' query; not binascii by the JSON Start's 3 MB of output (its base64 is
        # the Rust extension's, encode.rs), nor shutil and tempfile (python-multipart's, for its
        # on-disk files) by a multipart upload
        "still_deferred": sorted(set(DEFERRED) - {"mimetypes", "urllib.parse"}),
        "ast_types": 0,
        "datetime_py_ran": False,
        "optimize": 2 if flags else 0,
        "dataclass_doc": "AgentState" if flags else "Settings shared by every transport.",
    }


DATETIME = """
import json, pickle, sys
from sandboxd.agent.lean import datetime_without_python_half
if sys.argv[1] == "ours":
    datetime_without_python_half()
import _datetime, datetime, _strptime
from google.protobuf.timestamp_pb2 import Timestamp
when = Timestamp(seconds=784111777, nanos=5000).ToDatetime(tzinfo=datetime.timezone.utc)
back = Timestamp()
back.FromDatetime(when)
public = {k for k in vars(datetime) if not k.startswith("__")}
print(json.dumps({
    "names": sorted(k for k in vars(datetime) if k != "__builtins__"),
    "all": list(datetime.__all__),
    "same_objects": all(getattr(datetime, k) is getattr(_datetime, k) for k in public - {"sys"}),
    "spec": [datetime.__spec__.name, datetime.__file__ == datetime.__spec__.origin],
    "timestamp": [when.isoformat(), back.seconds, back.nanos],
    "pickled": pickle.loads(pickle.dumps(when)) == when,
    "strptime": datetime.datetime.strptime("1994-11-06", "%Y-%m-%d").toordinal(),
    "ran_datetime_py": "__builtins__" in vars(datetime),
}))
"""


def test_datetime_without_its_python_half_is_the_module_its_import_leaves() -> None:
    """``lean.datetime_without_python_half``: the same names (``__builtins__`` aside), the same C
    types, and protobuf's ``Timestamp`` conversions, pickling and ``strptime`` work as with the
    module ``import datetime`` leaves after running ``datetime.py``."""
    got = {}
    for how in ("ours", "python"):
        out = subprocess.run(
            [sys.executable, "-c", DATETIME, how], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        assert out.returncode == 0, out.stderr
        got[how] = json.loads(out.stdout)
    assert got["python"].pop("ran_datetime_py") is True
    assert got["ours"].pop("ran_datetime_py") is False
    assert got["ours"] == got["python"]
    assert got["ours"]["same_objects"] is True
    assert got["ours"]["timestamp"] == ["1994-11-06T08:49:37.000005+00:00", 784111777, 5000]


WELL_KNOWN_TYPES = """
import json, sys
from sandboxd.agent import lean
if sys.argv[1] == "ours":
    lean.defer()
    lean.datetime_later()
    lean.lazy_protobuf()
    assert lean.well_known_types_later()
from sandboxd._proto.process import process_pb2
deferred = sorted(n for n in (lean.PROTOBUF_WELL_KNOWN_TYPES, "datetime") if isinstance(sys.modules[n], lean._Deferred))
started = process_pb2.StartRequest(process=process_pb2.ProcessConfig(cmd="/bin/true")).SerializeToString()
from google.protobuf import any_pb2, duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf import json_format
when = timestamp_pb2.Timestamp(seconds=784111777, nanos=5000)
packed = any_pb2.Any()
packed.Pack(when)
value = struct_pb2.Struct()
value.update({"a": [1, "b", None]})
print(json.dumps({
    "deferred_after_process_pb2": deferred,
    "started": started.hex(),
    "bases": {m.DESCRIPTOR.full_name: [c.__module__ + "." + c.__name__ for c in m.__mro__]
              for m in (any_pb2.Any, duration_pb2.Duration, field_mask_pb2.FieldMask, struct_pb2.Struct,
                        struct_pb2.ListValue, timestamp_pb2.Timestamp)},
    "timestamp": [when.ToJsonString(), when.ToDatetime().isoformat()],
    "duration": duration_pb2.Duration(seconds=90).ToJsonString(),
    "mask": field_mask_pb2.FieldMask(paths=["a_b", "c"]).ToJsonString(),
    "any": [packed.type_url, packed.Is(timestamp_pb2.Timestamp.DESCRIPTOR)],
    "struct": json_format.MessageToDict(value),
    "loaded": [type(sys.modules[n]).__name__ for n in (lean.PROTOBUF_WELL_KNOWN_TYPES, "datetime")],
}))
"""


def test_protobufs_well_known_types_deferred_until_one_is_made_have_their_python_halves() -> None:
    """``lean.well_known_types_later``: making the process service's messages leaves protobuf's
    ``well_known_types`` (and ``datetime``) unimported; importing a well-known type's module imports
    them first, and its class gets the same bases and behaves as in a process without the deferral
    (each of the six types whose class has a Python base, made by importing its module)."""
    got = {}
    for how in ("ours", "python"):
        out = subprocess.run([sys.executable, "-c", WELL_KNOWN_TYPES, how], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        got[how] = json.loads(out.stdout)
    assert got["ours"].pop("deferred_after_process_pb2") == ["datetime", "google.protobuf.internal.well_known_types"]
    assert got["python"].pop("deferred_after_process_pb2") == []
    assert got["ours"]["bases"]["google.protobuf.Timestamp"][3] == "google.protobuf.internal.well_known_types.Timestamp"
    assert got["ours"] == got["python"]


def test_python_m_sandboxd_agent_starts_without_the_command_line_module(tmp_path: Path) -> None:
    """``python -m sandboxd agent`` runs the agent (``agent.standalone``) without importing
    ``sandboxd.cli`` (every other command's flags and code), as ``-X importtime`` shows (the flag is
    kept when the agent runs itself again under ``-OO``); it answers, and a line only argparse reads
    (``--help``) still gets argparse's answer."""
    port = free_port()
    line = ["-X", "importtime", "-m", "sandboxd", "agent", "--port", str(port), "--workdir", str(tmp_path)]
    agent = subprocess.Popen(
        [sys.executable, *line],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                pass
            assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
            time.sleep(0.05)
        else:
            raise AssertionError("the agent did not answer /health")
    finally:
        agent.terminate()
        _, stderr = agent.communicate(timeout=30)
    imported = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    assert "sandboxd.agent.server" in imported
    assert "sandboxd.agent.standalone" in imported
    assert "sandboxd.cli" not in imported
    helped = subprocess.run(
        [sys.executable, "-m", "sandboxd", "agent", "--help"], capture_output=True, text=True, timeout=60
    )
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sandboxd agent"), helped.stderr


def test_a_port_in_use_ends_the_agent_with_uvicorns_startup_failure(tmp_path: Path) -> None:
    """A port that cannot be bound is logged and ends the agent with status 3, as uvicorn's server did."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "sandboxd", "agent", "--port", str(port), "--workdir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    assert out.returncode == 3, out.stderr
    assert "address already in use" in out.stderr


def test_the_standalone_agent_serves_every_kind_of_request_without_openssl(
    start_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    """``sandboxd agent`` keeps OpenSSL out of its process (it serves plain HTTP) and runs on asyncio's
    own loop, since uvloop imports ``ssl``: the token check (hmac), a signed download (sha256), an
    upload, a unary RPC, a command's output stream and a watch all work, and neither libssl nor libcrypto
    is ever mapped."""
    from e2b.sandbox.signature import get_signature

    agent = start_agent(token="lean-token")
    pid = agent.process.pid
    headers = {**agent.headers(), "Connect-Protocol-Version": "1"}
    target = tmp_path / "up.bin"
    body = bytes(range(256)) * 4096
    upload = {**agent.headers(), "Content-Type": "application/octet-stream"}
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, content=body, headers=upload)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{agent.url}/files", params={"path": str(target)}, headers={"X-Access-Token": "no"})
    assert r.status_code == 401
    assert not mapped(pid, "/_md5."), "the token check imported hashlib (through hmac)"
    sig = get_signature(str(target), "read", None, "lean-token")["signature"]
    assert httpx.get(f"{agent.url}/files", params={"path": str(target), "signature": sig}).content == body
    stat = httpx.post(f"{agent.url}/filesystem.Filesystem/Stat", json={"path": str(target)}, headers=headers)
    assert stat.status_code == 200 and int(stat.json()["entry"]["size"]) == len(body)
    start = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "head -c 3000000 /dev/zero"]}}).encode()
    r = httpx.post(
        f"{agent.url}/process.Process/Start",
        content=struct.pack(">BI", 0, len(start)) + start,
        headers={**headers, "Content-Type": "application/connect+json"},
        timeout=30,
    )
    assert r.status_code == 200 and r.content.endswith(b"{}")
    watch = httpx.post(
        f"{agent.url}/filesystem.Filesystem/CreateWatcher", json={"path": str(tmp_path)}, headers=headers
    )
    assert watch.status_code == 200, watch.text
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libssl" not in maps and "libcrypto" not in maps, "OpenSSL was loaded into the standalone agent"


UVICORN_LOGGERS = """
import json, logging, sys
from sandboxd.agent.http_server import server_config
from sandboxd.agent.serving import agent_settings
if sys.argv[1] == "agent":
    agent_settings(None, "127.0.0.1", 0)
else:
    server_config(None, "127.0.0.1", 0, uvicorn_logging=sys.argv[1] == "uvicorn")
def describe(name):
    log = logging.getLogger(name)
    return {
        "level": log.level,
        "propagate": log.propagate,
        "handlers": [
            [type(h).__name__, type(h.formatter).__name__, h.formatter._fmt, h.formatter.use_colors, h.stream.name]
            for h in log.handlers
        ],
    }
print(json.dumps({name: describe(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")}))
"""


def test_the_agents_uvicorn_loggers_are_set_up_as_uvicorns_default_log_config() -> None:
    """``server_config(uvicorn_logging=False)`` (without ``logging.config``) and the agent's own settings
    (``serving.agent_settings``, without uvicorn's ``Config``) leave uvicorn's loggers as its default
    ``log_config`` does: the same handlers, format, stream and levels, the access logger silent."""
    got = {}
    for how in ("uvicorn", "ours", "agent"):
        out = subprocess.run(
            [sys.executable, "-c", UVICORN_LOGGERS, how],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        got[how] = json.loads(out.stdout)
    assert got["ours"] == got["uvicorn"]
    assert got["agent"] == got["uvicorn"]
    assert got["agent"]["uvicorn.access"] == {"level": logging.WARNING, "propagate": False, "handlers": []}
    assert got["ours"]["uvicorn"]["handlers"] == [
        ["StreamHandler", "DefaultFormatter", "%(levelprefix)s %(message)s", False, "<stderr>"]
    ]


AGENT_HELP = """
import argparse, json, sys
from sandboxd.agent.lean import uvicorn_package_without_cli
uvicorn_package_without_cli()  # as sandboxd.cli.main does for the agent
from sandboxd.cli import build_parser
parser = build_parser(only_agent=True)
parser.parse_args(["agent", "--port", "0"])
no_shutil = "shutil" not in sys.modules
agent = parser._subparsers._group_actions[0].choices["agent"]
ours = [parser.format_help(), agent.format_help()]
parser.formatter_class = agent.formatter_class = argparse.HelpFormatter  # argparse's own, with shutil
print(json.dumps({"no_shutil": no_shutil, "same_help": ours == [parser.format_help(), agent.format_help()]}))
"""


@pytest.mark.parametrize("columns", ["", "57", "200", "junk"])
def test_the_agents_command_line_is_parsed_without_shutil_and_helps_as_argparse_does(columns: str) -> None:
    """argparse imports ``shutil`` (with bz2 and lzma) for the terminal's width; the agent's parser
    asks for the width without it, and its help is what argparse's own formatter prints."""
    env = {**os.environ, "COLUMNS": columns}
    out = subprocess.run(
        [sys.executable, "-c", AGENT_HELP],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"no_shutil": True, "same_help": True}
