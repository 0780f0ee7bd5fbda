"""What a standalone ``sandboxd agent`` process leaves unimported, to keep its resident memory down.

``import uvicorn`` runs the package's ``__init__``, which imports ``uvicorn.main`` for ``uvicorn.run``
and the ``uvicorn`` command: click, the reload and multi-worker supervisors (multiprocessing, tempfile,
watchfiles). The agent uses none of it; it needs ``uvicorn.config``, ``uvicorn.server`` and the
httptools protocol, which import only each other. Measured with the agent's own imports on top:
2.5 MiB of RSS and 35 modules (35.1 → 32.6 MiB), about 7 % of an idle agent.

Inside a sandbox the agent is forked from the zygote, which has imported uvicorn whole beforehand
(shared, copy-on-write pages), so this matters to the standalone agent only.

The agent serves plain HTTP and makes no TLS connection, yet ``ssl`` (imported by asyncio, uvloop and
uvicorn's config) and ``hashlib``/``hmac`` (through ``_hashlib``) map OpenSSL's libssl and libcrypto and
initialise them: ~4.5 MiB of RSS. :func:`without_openssl` keeps them out of the standalone agent's
process. asyncio, hashlib and hmac support a Python built without OpenSSL (asyncio's TLS is then
unavailable; hashlib and hmac use CPython's own digests and ``_operator._compare_digest``); uvloop does
not, so such a process runs on asyncio's own event loop (:func:`openssl_blocked`, ``server.run``).
Measured beside uvloop in the same runs (medians of 3 agent starts, the machine shared, so ±20 %):
pipe output 537 vs 442 MB/s, ``Start /bin/true`` 2.3 vs 5.2 ms, ``POST /files`` 252 vs 271 MB/s: no loss
past the noise, for 7 MiB less RSS at start (33.3 → 26.1 MiB, uvloop's own ~1.5 MiB included).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandboxd import _core

OPENSSL_MODULES = ("ssl", "_ssl", "_hashlib")
"""The modules that load OpenSSL: ``ssl`` (through ``_ssl``) and ``_hashlib`` (hashlib's and hmac's)."""


def without_openssl() -> bool:
    """Keep OpenSSL out of this process: importing ``ssl`` raises ImportError from now on, and hashlib
    and hmac fall back to CPython's own code. True when done; False (and nothing changed) when one of
    the modules was imported already.

    Call it first thing in a process that runs nothing but the agent (``sandboxd agent``; grpcio, for
    ``--grpc-port``, carries its own TLS library and imports no ``ssl``), never in the runtime (its
    egress proxy speaks TLS) or the zygote."""
    if any(sys.modules.get(name) is not None for name in OPENSSL_MODULES):
        return False
    for name in OPENSSL_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not available"
    return True


def openssl_blocked() -> bool:
    """Whether :func:`without_openssl` ran in this process (so uvloop cannot be imported)."""
    return "ssl" in sys.modules and sys.modules["ssl"] is None


def _import_deferring(import_: Callable[[], object], deferred: dict[str, dict[str, object]]) -> None:
    """Run ``import_`` (which imports one module) while each module named in ``deferred`` that is not
    imported yet is a placeholder holding the given attributes; then register each to load on first
    use (:func:`import_lazily`), and give the imported module's globals that held a placeholder the
    lazy module instead. For modules a library imports at its top but uses only on paths the agent
    does not take. (Placeholders, not lazy modules, during the import: Python 3.11's import statement
    reads ``__spec__`` of a module it finds in ``sys.modules``, which executes a lazy module at once.)"""
    placeholders: dict[str, types.ModuleType] = {}
    for name, attributes in deferred.items():
        if name not in sys.modules:
            placeholder = types.ModuleType(name, "placeholder while a library is imported (sandboxd.agent.lean)")
            vars(placeholder).update(attributes)
            placeholders[name] = sys.modules[name] = placeholder
    try:
        imported = import_()
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]
                import_lazily(name)
    namespace = vars(imported)
    for key, value in list(namespace.items()):
        for name, placeholder in placeholders.items():
            if value is placeholder:
                namespace[key] = sys.modules[name]


class _RawConfigParserPlaceholder:
    """What ``uvicorn.config`` holds as ``RawConfigParser`` in this process: a name in one annotation
    (``Config(log_config=...)``); no instance is ever one of these."""


UVICORN_CONFIG_DEFERRED: dict[str, dict[str, object]] = {
    "logging.config": {},
    "configparser": {"RawConfigParser": _RawConfigParserPlaceholder},
}
"""What ``uvicorn.config`` imports for a ``log_config`` (``dictConfig``, ``fileConfig``, a
``RawConfigParser``), which the agent does not pass (``server_config(uvicorn_logging=False)``):
``logging.config`` brings ``logging.handlers``, ``socketserver``, ``pickle`` and ``queue``."""

UVICORN_SERVER_DEFERRED: dict[str, dict[str, object]] = {"platform": {}, "random": {}}
"""What ``uvicorn.server`` imports for options the agent does not set: ``random`` for
``limit_max_requests``' jitter, ``platform`` for sockets handed over by file descriptor."""


def _import_uvicorn_config() -> None:
    """``import uvicorn.config`` with :data:`UVICORN_CONFIG_DEFERRED` loaded only on first use."""

    def import_config() -> object:
        _import_uvicorn_config_without_ssl()
        return sys.modules["uvicorn.config"]

    _import_deferring(import_config, UVICORN_CONFIG_DEFERRED)


def _import_uvicorn_config_without_ssl() -> None:
    """``import uvicorn.config``, which imports ``ssl`` for two defaults it reads at import time
    (``ssl.PROTOCOL_TLS_SERVER``, ``ssl.CERT_NONE``) and uses ``ssl`` again only to build a TLS
    context from certificate files, which the agent never passes. Where OpenSSL is blocked, that one
    import sees a stand-in holding those two numbers; every other importer still gets ImportError."""
    if not openssl_blocked():
        import uvicorn.config

        return
    import asyncio  # noqa: F401  # first: asyncio's TLS modules must see ``ssl`` unavailable, not the stand-in

    stand_in = types.ModuleType("ssl", "uvicorn.config's TLS defaults; no TLS in this process (sandboxd.agent.lean)")
    stand_in.PROTOCOL_TLS_SERVER = 17  # type: ignore[attr-defined]  # ssl.PROTOCOL_TLS_SERVER's value
    stand_in.CERT_NONE = 0  # type: ignore[attr-defined]  # ssl.CERT_NONE's value
    sys.modules["ssl"] = stand_in
    try:
        import uvicorn.config  # noqa: F401
    finally:
        sys.modules["ssl"] = None  # type: ignore[assignment]


def _import_uvicorn_server() -> None:
    """``import uvicorn.server`` with :data:`UVICORN_SERVER_DEFERRED` loaded on first use, and without
    ``email``: uvicorn's server takes ``formatdate`` from ``email.utils`` for its ``Date`` header, which
    brings the ``email`` package's charsets and encoders (eight modules). The agent's servers send no
    ``Date`` header (``date_header=False``) and replace the main loop that would format it
    (``serve_until_signalled``), so that one import gets a stand-in whose ``formatdate`` is
    :func:`sandboxd.agent.httpdate.format_http_date` (the same text, were it called). A real
    ``email.utils`` imported before is used as it is; one imported after is the real one."""
    if "email.utils" in sys.modules:
        _import_deferring(lambda: importlib.import_module("uvicorn.server"), UVICORN_SERVER_DEFERRED)
        return
    from .httpdate import format_http_date

    def formatdate(timeval: float, localtime: bool = False, usegmt: bool = False) -> str:
        if localtime or not usegmt:
            raise ValueError("only GMT dates (usegmt=True) in this process: see sandboxd.agent.lean")
        return format_http_date(timeval)

    stand_in = types.ModuleType("email.utils", "uvicorn.server's formatdate only (sandboxd.agent.lean)")
    stand_in.formatdate = formatdate  # type: ignore[attr-defined]
    sys.modules["email.utils"] = stand_in
    try:
        _import_deferring(lambda: importlib.import_module("uvicorn.server"), UVICORN_SERVER_DEFERRED)
    finally:
        del sys.modules["email.utils"]


def import_lazily(name: str) -> None:
    """Register the module ``name`` (a submodule) to be executed on first use of one of its attributes
    (:class:`importlib.util.LazyLoader`), so that ``import name`` costs nothing until then. Nothing
    happens when it is imported already or cannot be found. The parent package is imported now."""
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    spec = importlib.util.find_spec(name)  # imports the parent package
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if parent:
        setattr(sys.modules[parent], child, module)  # as the import system does for a submodule


class _Deferred(types.ModuleType):
    """A module registered under its name (:func:`defer`) and executed when an attribute it lacks is
    first read: the real module is imported then, and its namespace copied into this one, so that the
    modules that had imported this one see the real functions from then on (and later importers get
    the real module). Not :func:`import_lazily`'s ``LazyLoader``: Python 3.11's import statement reads
    ``__spec__`` of a module found in ``sys.modules``, which executes a lazy module at once, while a
    module here has its own ``__spec__`` (None) until it is loaded, so ``import inspect`` costs nothing."""

    def __getattr__(self, attribute: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        module = importlib.import_module(name)
        vars(self).update(vars(module))
        return getattr(module, attribute)


DEFERRED = (
    "inspect",
    "calendar",
    "asyncio.sslproto",
    "ipaddress",
    "locale",
    "textwrap",
    "tokenize",
    "zlib",
    "subprocess",
    "array",
    "base64",
    "binascii",
    "mimetypes",
    "shutil",
    "tempfile",
    "urllib.parse",
)
"""Standard modules imported at the top of modules the agent runs but used on paths no request takes:

* ``inspect`` (with ``ast``, ``dis``, ``opcode``), imported by asyncio (``coroutines``,
  ``format_helpers``, ``tasks``; used by ``iscoroutinefunction``, debug mode and ``add_signal_handler``,
  none of them the agent's) and ``dataclasses`` (used for a class without a docstring, which gets its
  signature as one: the agent's dataclasses all have docstrings). 0.8 MiB of RSS at start (medians of 3
  starts alternating: 22.43 → 21.62 MiB).
* ``calendar``, imported by protobuf's ``well_known_types`` for ``Timestamp.FromDatetime``, and
  ``asyncio.sslproto``, asyncio's TLS (there is no ``ssl`` in this process: :func:`without_openssl`).
  0.3 MiB together (21.79 → 21.47 MiB, 4 runs each way).
* ``ipaddress`` (``urllib.parse``'s, for a URL whose host is in brackets), ``locale`` (``subprocess``'s,
  for a text-mode pipe's encoding), ``textwrap`` (``traceback``'s, for exception groups) and ``tokenize``
  (``linecache``'s, to read a source file for a traceback): 0.8 MiB together (21.35 → 20.56 MiB, medians
  of 5 starts). A logged traceback loads ``tokenize``, as it should.
* ``zlib`` (with the C library's ``libz``), imported by ``agent.compression`` and ``agent.files`` for
  gzip-compressed requests and downloads with gzip accepted, which commands and plain transfers never
  are: 0.05 MiB (``zlib``'s module; ``libz`` itself goes with ``binascii``, below).
* ``subprocess`` (with ``_posixsubprocess`` and ``fcntl``), imported by asyncio for
  ``loop.subprocess_exec``: the agent starts processes through its Rust extension. asyncio reads three
  of its constants while it is imported, which the deferred module has (:class:`_DeferredSubprocess`).
  0.15 MiB of idle RSS (medians of 3 starts).
* ``array``, imported by ``socket`` for ``send_fds`` and ``recv_fds`` (passing descriptors over a Unix
  socket), which the agent never calls: 0.07 MiB (its module's mapping).
* ``base64`` and ``binascii`` (which maps ``libz`` for its ``crc32``), imported at the top of the
  agent's auth and Connect modules and of protobuf's ``descriptor``, for a signed URL, bytes in a JSON
  message, an error's details; and ``mimetypes`` (``agent.contenttype``), for a download's type. The
  first such request loads them; commands never do (process output in a JSON stream is base64-encoded
  by the Rust extension, ``_core.base64_between``). 0.23 MiB together (18.17 → 17.94 MiB,
  medians of 3 starts).
* ``shutil`` (with ``fnmatch``, ``bz2``, ``lzma`` and their C libraries) and ``tempfile`` (with
  ``random``, ``hashlib`` and its digests), imported at the top of python-multipart for its on-disk
  ``File`` objects, which the agent's multipart parser never makes: the first multipart upload
  would otherwise keep them for the agent's life: 0.69 MiB of idle RSS after a mix of requests with
  one multipart upload (19.39 → 18.70 MiB, medians of 5 starts; docs/benchmarks.md, ``rss8``).
* ``urllib.parse``, imported at the top of uvicorn's httptools protocol and its ``protocols.utils``
  (to unquote a path with ``%`` in it, and to quote one for the access log, which the agent does not
  write), and of ``agent.files`` (a ``/files`` request's query): Connect requests never call it. 0.13
  MiB of idle RSS after 20 ``Start``s (medians of 4 starts; docs/benchmarks.md, ``rss9``)."""


class _DataclassesInspect(types.ModuleType):
    """What ``dataclasses`` sees as ``inspect`` in the standalone agent (:func:`dataclass_docs_without_inspect`):
    ``signature`` refuses, so that a class without a docstring is documented by its name alone, and every
    other attribute is the real ``inspect``'s (imported then)."""

    @staticmethod
    def signature(obj: object) -> object:
        raise ValueError("no signature for a dataclass's docstring in this process (sandboxd.agent.lean)")

    def __getattr__(self, attribute: str) -> object:
        return getattr(importlib.import_module("inspect"), attribute)


class _DeferredSubprocess(_Deferred):
    """``subprocess`` until first used (:func:`defer`), with the three constants asyncio reads while it
    is imported: ``asyncio.events`` and ``base_events`` as default arguments of ``subprocess_exec``
    and ``subprocess_shell``, ``asyncio.subprocess`` as its own ``PIPE``, ``STDOUT`` and ``DEVNULL``.
    Their values are ``subprocess``'s own (a test compares them)."""

    PIPE = -1
    STDOUT = -2
    DEVNULL = -3


def dataclass_docs_without_inspect() -> None:
    """Keep ``@dataclass`` from importing ``inspect`` (with ``ast`` and ``dis``: 0.8 MiB, :data:`DEFERRED`)
    to write a docstring for a class that has none: it writes ``Name(field: type, ...)`` from
    ``inspect.signature``, and falls back to ``Name`` when that raises ValueError, which it does here.
    Under ``-OO`` (:mod:`sandboxd.agent.optimized`) no class has a docstring, so without this every
    dataclass defined at start would load ``inspect``. Call it after :func:`defer`."""
    import dataclasses

    if not isinstance(getattr(dataclasses, "inspect", None), _DataclassesInspect):
        dataclasses.inspect = _DataclassesInspect("inspect", "dataclasses' view of inspect (sandboxd.agent.lean)")  # type: ignore[attr-defined]


def defer(names: tuple[str, ...] = DEFERRED) -> None:
    """Register each module in ``names`` that is not imported yet as :class:`_Deferred`: imported on
    first use. Call it in a process that runs nothing but the agent, before anything imports them. A
    submodule's package is imported here, after every stand-in is in place, and given the stand-in
    as its attribute, as a real import would (``import asyncio.sslproto; asyncio.sslproto.X`` works)."""
    registered = []
    for name in names:
        if name not in sys.modules:
            kind = _DeferredSubprocess if name == "subprocess" else _Deferred
            sys.modules[name] = kind(name, "imported on first use (sandboxd.agent.lean)")
            registered.append(name)
    for name in registered:
        parent, _, child = name.rpartition(".")
        if parent and isinstance(sys.modules.get(name), _Deferred):
            setattr(importlib.import_module(parent), child, sys.modules[name])


def datetime_without_python_half() -> None:
    """Register ``datetime`` as the module its import would leave, without running ``datetime.py``.

    Python 3.11's ``datetime.py`` first defines the whole pure-Python implementation (2,500 lines of
    classes and helpers), then replaces every public name with ``_datetime``'s (``from _datetime import
    *``) and deletes its private helpers: what remains is ``_datetime``'s namespace plus ``sys`` (3.12
    split that half into ``_pydatetime``, imported only without ``_datetime``). Here the module gets
    that namespace straight from ``_datetime``, with its own spec and ``__all__``. protobuf's
    ``well_known_types`` imports ``datetime`` (``Timestamp``'s conversions, which no request makes),
    now with the first well-known type (:func:`well_known_types_later`): 0.2 MiB of RSS then. The
    standalone agent registers it to be made on first use (:func:`datetime_later`). Nothing happens
    when it is imported already or when ``_datetime`` is missing (the pure-Python half is then the
    implementation)."""
    if "datetime" in sys.modules:
        return
    try:
        _datetime = importlib.import_module("_datetime")  # no stub: typeshed describes ``datetime`` only
    except ImportError:
        return
    spec = importlib.util.find_spec("datetime")
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    namespace = vars(module)
    for key, value in vars(_datetime).items():
        if not key.startswith("__") or key == "__doc__":
            namespace[key] = value
    namespace["__all__"] = DATETIME_ALL
    namespace["sys"] = sys  # datetime.py's own import, left in its namespace
    sys.modules["datetime"] = module


DATETIME_ALL = ("date", "datetime", "time", "timedelta", "timezone", "tzinfo", "MINYEAR", "MAXYEAR", "UTC")
"""``datetime.__all__`` (Python 3.11)."""


class _DeferredDatetime(_Deferred):
    """``datetime`` until first used (:func:`datetime_later`): then the module
    :func:`datetime_without_python_half` makes, not ``datetime.py``."""

    def __getattr__(self, attribute: str) -> object:
        if sys.modules.get("datetime") is self:
            del sys.modules["datetime"]
        datetime_without_python_half()
        module = importlib.import_module("datetime")
        vars(self).update(vars(module))
        return getattr(module, attribute)


def datetime_later() -> None:
    """Register ``datetime`` to be made on first use, by :func:`datetime_without_python_half` (its
    ``_datetime`` extension mapped then: 0.15 MiB of idle RSS). What imported it at the standalone agent's
    start was protobuf's ``well_known_types`` (:func:`well_known_types_later`); a request that needs a
    date (``httpdate``'s ``UTC``) loads it. Nothing happens when it is imported already."""
    if "datetime" not in sys.modules:
        sys.modules["datetime"] = _DeferredDatetime("datetime", "imported on first use (sandboxd.agent.lean)")


PROTOBUF_WELL_KNOWN_TYPES = "google.protobuf.internal.well_known_types"
"""The Python halves of protobuf's well-known types (``Timestamp.ToDatetime``, ``Any.Pack``, ...), with
``field_mask``, ``datetime`` and ``calendar``: upb imports it the first time it makes *any* message
class, to look up in its ``WKTBASES`` whether the class is one of them, and keeps that dictionary."""

WELL_KNOWN_TYPE_MODULES = frozenset(
    f"google.protobuf.{name}_pb2" for name in ("any", "duration", "field_mask", "struct", "timestamp")
)
"""The generated modules whose message classes have a base in ``WKTBASES`` (every key of it is a type
of one of them): a well-known type's class is made by importing its module."""


class _DeferredWellKnownTypes(_Deferred):
    """:data:`PROTOBUF_WELL_KNOWN_TYPES` until first used (:func:`well_known_types_later`), holding a
    ``WKTBASES`` of its own, empty, for upb to keep; the real module's entries are put in it when the
    real module is imported, which happens before any well-known type's class is made
    (:class:`_WellKnownTypesFirst`), so that upb gives those classes their bases as before."""

    def __getattr__(self, attribute: str) -> object:
        bases: dict[str, type] = vars(self)["WKTBASES"]
        value = super().__getattr__(attribute)  # the real module, its namespace copied into this one
        bases.update(sys.modules[PROTOBUF_WELL_KNOWN_TYPES].WKTBASES)
        vars(self)["WKTBASES"] = bases
        return value


class _WellKnownTypesFirst:
    """A finder first on ``sys.meta_path`` that finds nothing: asked for one of
    :data:`WELL_KNOWN_TYPE_MODULES`, it has the deferred :data:`PROTOBUF_WELL_KNOWN_TYPES` imported
    first (once; then it leaves ``sys.meta_path``)."""

    def __init__(self, deferred: _DeferredWellKnownTypes) -> None:
        self.deferred = deferred

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in WELL_KNOWN_TYPE_MODULES:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.deferred.__getattr__("WKTBASES")
        return None


def well_known_types_later() -> bool:
    """Keep :data:`PROTOBUF_WELL_KNOWN_TYPES` (with ``field_mask``; ``datetime``, :func:`datetime_later`)
    unimported until a well-known type is: the standalone agent that only runs commands never makes
    one (its process messages have no ``Timestamp``; the filesystem's do, and the first filesystem
    request imports them). 0.08 MiB of idle RSS, 0.23 with ``datetime`` (medians of 6 starts after 20
    ``Start``s; docs/benchmarks.md, ``rss9``).

    How: upb's first message class finds a deferred module (:class:`_DeferredWellKnownTypes`) under
    that name and keeps its ``WKTBASES``, a dictionary filled from the real one when the real module
    is imported; a finder (:class:`_WellKnownTypesFirst`) has it imported before the first of
    :data:`WELL_KNOWN_TYPE_MODULES` is, whatever imports that. Anything that reads another attribute
    of the deferred module imports the real one too. The one way to make a well-known type's class
    without its module, a descriptor pool given ``timestamp.proto`` by hand, the agent does not take.

    Call it before anything makes a message class (after :func:`lazy_protobuf`); nothing happens when
    the module is imported already (a class was made). True when done."""
    if PROTOBUF_WELL_KNOWN_TYPES in sys.modules:
        return False
    deferred = _DeferredWellKnownTypes(PROTOBUF_WELL_KNOWN_TYPES, "imported on first use (sandboxd.agent.lean)")
    vars(deferred)["WKTBASES"] = {}
    sys.modules[PROTOBUF_WELL_KNOWN_TYPES] = deferred
    importlib.import_module("google.protobuf.internal").well_known_types = deferred  # type: ignore[attr-defined]
    sys.meta_path.insert(0, _WellKnownTypesFirst(deferred))
    return True


PROTOBUF_PURE_PYTHON = "google.protobuf.internal.python_message"
"""protobuf's pure-Python message classes. ``descriptor_pool`` (and ``builder``, which every
``*_pb2`` module uses) import it whatever the implementation, but with upb (``_upb._message``, the
one installed) nothing calls it; it brings ``text_format``, the pure-Python encoder and decoder,
``well_known_types`` with ``datetime`` and ``calendar``, and ``pickle``."""


PROTOBUF_JSON = "google.protobuf.json_format"
"""protobuf's JSON parser and printer (with its ``type_checkers``, and through them the pure-Python
decoder and ``containers``): ``protojson`` reads and writes the agent's own messages without it and
hands it only message types it does not cover (none of the agent's today), so it stays unloaded."""


def lazy_protobuf() -> None:
    """Load :data:`PROTOBUF_PURE_PYTHON` on first use only (:func:`import_lazily`; with the pure-Python
    implementation that use comes at once). Call it in a process that runs nothing but the agent,
    before anything imports protobuf; 0.5 MiB of RSS in the standalone agent."""
    if "google.protobuf.descriptor_pool" not in sys.modules:
        import_lazily(PROTOBUF_PURE_PYTHON)
        import_lazily(PROTOBUF_JSON)
        _import_without_compiling_forward_refs(PROTOBUF_FORWARD_REFS)


PROTOBUF_FORWARD_REFS = "google.protobuf.descriptor_database"
"""The one module the agent imports that evaluates an annotation naming a type by string at import
(``Optional['descriptor_pb2.FileDescriptorProto']``, without ``from __future__ import annotations``)."""


def _source_as_code(source: str, filename: str, mode: str, *args: object, **kwargs: object) -> object:
    """What ``typing`` calls ``compile`` while :func:`_import_without_compiling_forward_refs` imports a
    module: a ``ForwardRef``'s expression kept as its text, which ``ForwardRef._evaluate`` hands to
    ``eval`` as it would the code (``eval`` compiles it then, if anything ever asks)."""
    if mode != "eval" or args or kwargs:
        return compile(source, filename, mode, *args, **kwargs)  # type: ignore[call-overload]
    return source


def _import_without_compiling_forward_refs(name: str) -> None:
    """Import ``name`` with ``typing.ForwardRef`` keeping each string annotation it builds as text
    instead of compiling it. The first ``compile()`` in a process creates the interpreter's ~120 AST
    node types (``PyAST_Check``), 0.2 MiB that nothing else in the agent's life needs: every module it
    runs comes from a ``.pyc``, and ``eval``/``exec`` (dataclasses, namedtuple) do not create them. A
    string that is not an expression raises SyntaxError when evaluated rather than when the annotation
    is built; protobuf's is a dotted name."""
    if name in sys.modules:
        return
    import typing

    vars(typing)["compile"] = _source_as_code  # typing's global, ahead of the builtin, for this import only
    try:
        importlib.import_module(name)
    finally:
        vars(typing).pop("compile", None)


def uvicorn_package_without_cli() -> None:
    """Register the ``uvicorn`` package without running its ``__init__``, so that importing its
    submodules does not load the CLI, and import the one part the agent's server runs
    (:mod:`sandboxd.agent.serving`): the httptools protocol, without ``uvicorn.config``,
    ``uvicorn.server`` and ``uvicorn._types`` (:func:`_import_uvicorn_protocol`).

    The package gets the two names its own submodules import from it (``uvicorn.lifespan`` does
    ``from uvicorn import Config``), ``Config`` and ``Server``, imported when first asked for
    (:data:`UVICORN_CONFIG_DEFERRED` and :data:`UVICORN_SERVER_DEFERRED` deferred in turn).
    ``uvicorn.run``, ``uvicorn.main`` and ``uvicorn.__version__`` stay missing in this process. Call
    it only in a process that runs nothing but the agent (``sandboxd agent``), before anything imports
    uvicorn; when uvicorn is imported already, it does nothing."""
    if "uvicorn" in sys.modules:
        return
    spec = importlib.util.find_spec("uvicorn")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the import error comes where uvicorn is used
    package = importlib.util.module_from_spec(spec)
    sys.modules["uvicorn"] = package

    def package_getattr(name: str) -> object:
        if name == "Config":
            if "uvicorn.config" not in sys.modules:
                _import_uvicorn_config()
            return sys.modules["uvicorn.config"].Config
        if name == "Server":
            if "uvicorn.server" not in sys.modules:
                _import_uvicorn_server()
            return sys.modules["uvicorn.server"].Server
        raise AttributeError(f"module 'uvicorn' has no attribute {name!r} (imported without its __init__)")

    package.__getattr__ = package_getattr  # type: ignore[method-assign]  # PEP 562: asked for only if missing
    _import_uvicorn_protocol()


class _Annotation:
    """What a stand-in module (:func:`_import_uvicorn_protocol`) gives for a name that uvicorn's
    protocol modules import for their annotations only."""


UVICORN_PROTOCOL = "uvicorn.protocols.http.httptools_impl"

UVICORN_PROTOCOL_STAND_INS = ("uvicorn._types", "uvicorn.config", "uvicorn.server")
"""What :data:`UVICORN_PROTOCOL` (and ``flow_control``, ``protocols.utils``) import only for names in
annotations: ASGI's types (``uvicorn._types``: ~60 TypedDicts and Protocols, which ``typing`` builds
at import, the largest of uvicorn's modules in memory), ``Config`` and ``ServerState``. The agent's
server passes them objects of its own (:mod:`sandboxd.agent.serving`)."""


def _import_uvicorn_protocol() -> None:
    """``import uvicorn.protocols.http.httptools_impl`` with :data:`UVICORN_PROTOCOL_STAND_INS` standing
    in for that one import: modules whose every attribute is a placeholder class. Each is removed
    after, so that a later ``import uvicorn.config`` (say) gets the real module; the protocol module
    keeps the placeholders under those names, in annotations that are never evaluated (``from
    __future__ import annotations``; ``flow_control``'s are evaluated once, at import, and only stored)."""

    def placeholder(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Annotation

    stand_ins: dict[str, types.ModuleType] = {}
    for name in UVICORN_PROTOCOL_STAND_INS:
        if name not in sys.modules:
            stand_in = types.ModuleType(name, "names for annotations only (sandboxd.agent.lean)")
            stand_in.__getattr__ = placeholder  # type: ignore[method-assign]
            stand_ins[name] = sys.modules[name] = stand_in
    try:
        importlib.import_module(UVICORN_PROTOCOL)
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


UPB = "google._upb._message"
"""protobuf's C implementation (upb), the one installed and the one every message of the agent is."""

LIBSTDCXX = "libstdc++.so.6"
"""The C++ runtime, which protobuf's wheel names as a needed library of :data:`UPB`'s module although
it uses none of its symbols (``nm -D --undefined-only``: the C library and the Python API only)."""


def stand_in_library(soname: str, like: str = sys.executable) -> bytes | None:
    """An ELF shared object for the machine the program at ``like`` is built for, whose only content
    is ``DT_SONAME`` ``soname``: loaded, it makes the dynamic loader take every later ``DT_NEEDED``
    ``soname`` as satisfied (it matches needed names against the sonames of what is loaded) without
    mapping the real library. No code, no symbols, no initialisers: a library that needs any symbol
    of the real one fails to load with the loader's "undefined symbol" error, since Python loads
    extension modules with ``RTLD_NOW``. None for a machine other than 64-bit little-endian ELF.

    Layout: the ELF header, three program headers (one read-write ``PT_LOAD`` over the whole file,
    writable because glibc before 2.35 relocates ``PT_DYNAMIC``'s pointers in place; ``PT_DYNAMIC``;
    ``PT_GNU_STACK``, without which the loader would make every thread's stack executable), the
    dynamic section, the one null symbol, a ``DT_HASH`` table of one empty bucket, the strings."""
    import struct

    try:
        with open(like, "rb") as f:
            header = f.read(20)
    except OSError:
        return None
    if len(header) < 20 or header[:6] != b"\x7fELF\x02\x01":  # ELFCLASS64, ELFDATA2LSB
        return None
    (machine,) = struct.unpack_from("<H", header, 18)
    strings = b"\0" + soname.encode() + b"\0"
    phoff, phnum, phentsize = 64, 3, 56
    dynamic = phoff + phnum * phentsize
    entries = 7
    symtab = dynamic + entries * 16
    hashtab = symtab + 24
    strtab = hashtab + 16
    size = strtab + len(strings)
    pt_load, pt_dynamic, pt_gnu_stack = 1, 2, 0x6474E551
    read_write = 4 | 2
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)  # version 1, System V ABI
    elf = ident + struct.pack("<HHIQQQIHHHHHH", 3, machine, 1, 0, phoff, 0, 0, 64, phentsize, phnum, 64, 0, 0)
    elf += struct.pack("<IIQQQQQQ", pt_load, read_write, 0, 0, 0, size, size, 0x1000)
    elf += struct.pack("<IIQQQQQQ", pt_dynamic, read_write, dynamic, dynamic, dynamic, entries * 16, entries * 16, 8)
    elf += struct.pack("<IIQQQQQQ", pt_gnu_stack, read_write, 0, 0, 0, 0, 0, 16)
    dt_null, dt_hash, dt_strtab, dt_symtab, dt_strsz, dt_syment, dt_soname = 0, 4, 5, 6, 10, 11, 14
    for tag, value in (
        (dt_soname, 1),
        (dt_hash, hashtab),
        (dt_strtab, strtab),
        (dt_symtab, symtab),
        (dt_strsz, len(strings)),
        (dt_syment, 24),
        (dt_null, 0),
    ):
        elf += struct.pack("<qQ", tag, value)
    elf += bytes(24)  # symbol 0, the null symbol
    elf += struct.pack("<IIII", 1, 1, 0, 0)  # nbucket, nchain, bucket[0] and chain[0]: no symbol
    elf += strings
    assert len(elf) == size
    return elf


def load_stand_in(soname: str) -> _core.SharedLibrary | None:
    """Load :func:`stand_in_library` for ``soname`` from memory (a ``memfd``, through ``/proc``);
    the loaded library (``_core.SharedLibrary``, whose ``close()`` unloads it), or None when this
    machine or process cannot (no ``/proc``, another C library's loader, another architecture)."""
    import os

    from sandboxd import _core

    image = stand_in_library(soname)
    if image is None or not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create(f"{soname} stand-in (sandboxd.agent.lean)", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.write(fd, image)
        return _core.SharedLibrary(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    finally:
        os.close(fd)  # the loader keeps its own mapping


def upb_without_libstdcxx() -> bool:
    """Import protobuf's upb module (:data:`UPB`) with a stand-in for :data:`LIBSTDCXX`
    (:func:`import_with_stand_in`), so that the C++ runtime it names and never calls is not mapped:
    0.9 MiB of the standalone agent's idle RSS (medians of 3 starts, 19.37 → 18.48 MiB). Whether it did.

    Only for a process that will load no other library needing the real runtime: the standalone
    agent without its gRPC port (grpcio is C++; the caller checks). Nothing happens when upb or the
    runtime is loaded already, or when protobuf is told to use another implementation. If upb needs
    a symbol of the runtime after all (a protobuf built otherwise), its import fails at once: the
    stand-in is unloaded, and protobuf's own import later loads the real runtime."""
    import os

    if os.environ.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "upb") != "upb":
        return False
    return import_with_stand_in(UPB, LIBSTDCXX)


def import_with_stand_in(module: str, soname: str) -> bool:
    """Import the extension ``module`` with :func:`stand_in_library` for ``soname`` loaded, so that
    the library it names as needed is not mapped. Whether it did; False, and nothing kept loaded,
    when ``module`` is imported already, a library ``soname`` is mapped already, the stand-in cannot
    be made, or ``module`` needs a symbol of the real library (the stand-in is unloaded: a later
    import loads the real one).

    The import binds every symbol at once (``RTLD_NOW``), whatever ``sys.getdlopenflags()`` says:
    bound lazily, a module needing a function of the real library imported, and its first call of
    that function ended the process (the loader's "symbol lookup error", exit 127): an agent killed
    mid-request instead of an import that fails at start."""
    import os

    if module in sys.modules:
        return False
    try:
        with open("/proc/self/maps") as f:
            if f"/{soname}" in f.read():
                return False
    except OSError:
        return False
    stand_in = load_stand_in(soname)
    if stand_in is None:
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags((flags & ~os.RTLD_LAZY) | os.RTLD_NOW)
    try:
        importlib.import_module(module)
    except ImportError:
        stand_in.close()
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
