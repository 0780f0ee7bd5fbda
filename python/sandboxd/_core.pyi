"""Typed interface of ``sandboxd._core``, the PyO3 extension built from ``crates/sandboxd-py``.

Every function that touches the kernel releases the GIL while it does. Errors are raised as the
built-in ``OSError`` subclasses (``FileNotFoundError``, ``NotADirectoryError``, ...) with ``errno``
set, so the service layer maps them in one table (``sandboxd.agent.errors``).
"""

from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Literal

__version__: str

FILE_TYPE_UNSPECIFIED: int
FILE_TYPE_FILE: int
FILE_TYPE_DIRECTORY: int
FILE_TYPE_SYMLINK: int

READ_CHUNK: int
"""Default chunk size of ``FileReader`` in bytes."""

RECEIVE_MIN_RATE: int
MULTIPART_MAX_BOUNDARY: int
"""Bytes per second ``AtomicWriter.receive_from`` requires of a body on average once its idle timeout
has passed (its deadline: the idle timeout plus a second per this many bytes)."""

class EntryInfo:
    """One filesystem entry, built as envd builds ``filesystem.EntryInfo`` (spec §4.1)."""

    name: str
    path: str
    type: int
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    mtime_sec: int
    mtime_nsec: int
    symlink_target: str | None
    is_symlink: bool
    metadata: dict[str, str]

def entry_info(path: str) -> EntryInfo:
    """``lstat`` ``path`` and describe it; a symlink's type and mode are its target's."""

def list_dir(path: str, depth: int) -> list[EntryInfo]:
    """List ``path`` to ``depth`` levels (``0`` means 1), lexically, as envd's ``ListDir``.

    Symlinks in ``path`` itself are followed; symlinked directories below it are not descended.
    Entries report ``path`` joined under the requested path, not the resolved one. Entries that
    vanish during the walk are skipped. Raises ``NotADirectoryError`` when ``path`` is not a directory.
    """

def list_dir_encoded(path: str, depth: int, json: bool) -> bytes:
    """:func:`list_dir`'s entries as an encoded ``ListDirResponse``: proto3 JSON when ``json`` (fields
    and defaults as ``protojson.message_to_dict`` writes them, strings in UTF-8, ``metadata`` keys
    sorted), else binary protobuf. The walk and the encoding release the GIL. In JSON, a modification
    time RFC 3339 cannot write (outside years 1-9999) is left out of its entry; the binary form keeps
    it. Raises as :func:`list_dir`."""

def make_dir(path: str, uid: int, gid: int) -> EntryInfo:
    """Create ``path`` and its missing parents (mode 0755, chowned to uid/gid when running as root).

    Raises ``FileExistsError`` when ``path`` is an existing directory and ``NotADirectoryError`` when
    it, or a parent, is an existing non-directory.
    """

def rename(source: str, destination: str, uid: int, gid: int) -> EntryInfo:
    """Create the destination's missing parents, then ``rename(2)``; returns the destination's entry."""

def remove_all(path: str) -> None:
    """Remove ``path`` recursively without following symlinks; a missing path is not an error."""

def set_metadata(path: str, metadata: dict[str, str]) -> None:
    """Replace the ``user.e2b.*`` extended attributes of ``path`` with ``metadata``."""

class FileReader:
    """A file opened for chunked reading. Iterating yields chunks of ``chunk`` bytes until EOF."""

    size: int
    """The file's size when it was opened."""
    sized: bool
    """Whether ``size`` is what the read gives: false for ``/proc`` and ``/sys`` files, devices, FIFOs
    and empty files, which are read until EOF (or the requested length)."""

    remaining: int | None
    """Bytes still to read; None for a stream read to its end."""
    def send_to(
        self, fd: int, stop_fd: int, idle_timeout: float
    ) -> tuple[Literal["done", "short", "closed", "stalled", "stopped", "unsupported"], int]:
        """The rest of a sized read to the stream socket ``fd`` with ``sendfile(2)``, without the GIL,
        until ``stop_fd`` (an eventfd) is readable: the outcome and the bytes sent. ``"short"``: the
        file ended first; ``"stalled"``: the socket took nothing for ``idle_timeout`` seconds;
        ``"unsupported"``: nothing sent (a stream, or a file the kernel cannot sendfile from). A
        failed read raises ``OSError``."""
    def __init__(self, path: str, offset: int = 0, length: int | None = None, chunk: int = ...) -> None: ...
    def read(self) -> bytes:
        """The next chunk (at most ``chunk`` bytes, never more than the range left); ``b""`` at the end."""
    def close(self) -> None: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
    def __enter__(self) -> FileReader: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

class AtomicWriter:
    """Writes a file atomically: bytes go to a hidden temporary file in the target's directory,
    which ``commit`` renames over the target. Until then the old file is untouched; ``abort`` (or
    garbage collection, or ``__exit__`` with an exception) removes the temporary file.

    Missing parent directories are created (0755, chowned to uid/gid when running as root); an abort,
    a failed seal or a failed commit removes them again while they are empty (abort the writers of
    one upload last first). An existing target keeps its permission bits; a new one gets
    ``0o666 & ~umask``.
    Raises ``IsADirectoryError`` when the target is a directory.
    """

    path: str
    target: str
    """The file ``commit`` replaces: ``path``, or the resolved target when ``path`` was a symlink
    to a file as it opened."""
    temp_path: str
    """The hidden temporary file the data goes to until ``commit``."""
    written: int

    def __init__(self, path: str, uid: int, gid: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def receive_from(
        self, fd: int, length: int, idle_timeout: float, stop_fd: int | None = None
    ) -> Literal["complete", "closed", "timed out", "too slow", "stopped"]:
        """Append exactly ``length`` bytes read from the stream socket ``fd`` (non-blocking; the caller
        keeps it open and does not read it meanwhile), moved socket → pipe → file with ``splice(2)``
        (``read``/``write`` where refused) without the GIL. ``"closed"``: the client closed early;
        ``"timed out"``: nothing arrived for ``idle_timeout`` seconds; ``"too slow"``: the body came at
        under :data:`RECEIVE_MIN_RATE` on average once ``idle_timeout`` had passed (a drip that keeps
        every gap under the idle timeout); ``"stopped"``: ``stop_fd`` (an eventfd) became readable,
        checked while waiting and between pieces. A failed write raises ``OSError``."""
    def seal(self, metadata: dict[str, str] | None = None) -> None:
        """Set ``user.e2b.*`` metadata and chown as ``commit`` does, and close the temporary file:
        ``commit`` then only renames it. A failed seal removes the temporary file."""
    def commit(self, metadata: dict[str, str] | None = None) -> None:
        """Set ``user.e2b.*`` metadata (replacing any), chown to uid/gid, and rename into place
        (after ``seal``, only the rename: ``metadata`` is not looked at)."""
    def abort(self) -> None: ...
    def __enter__(self) -> AtomicWriter: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

_Ended = Literal["closed", "timed out", "too slow", "stopped"]

class MultipartReader:
    """A ``multipart/form-data`` body read from a socket by a worker thread, a part at a time:
    :meth:`next_part` gives a part's header block, :meth:`copy_part` writes its data to a file (or
    drops it) up to the next delimiter, both without the GIL. Exactly ``length`` bytes are read
    from the socket (the epilogue included). A malformed body raises ``ValueError`` with the
    reason; ``idle_timeout`` and ``stop_fd`` as for :meth:`AtomicWriter.receive_from`."""

    def __init__(
        self, boundary: bytes, prefix: bytes, length: int, idle_timeout: float, stop_fd: int | None = None
    ) -> None: ...
    def next_part(self, fd: int) -> tuple[Literal["part", "complete"] | _Ended, bytes | None]:
        """``("part", headers)`` (CRLF-ended header lines), ``("complete", None)`` once the body is
        read to its end, or how the transfer ended."""
    def copy_part(self, fd: int, writer: AtomicWriter | None = None) -> Literal["part done"] | _Ended:
        """The current part's data into ``writer`` (dropped when None), to the next delimiter."""
    def discard_rest(self, fd: int) -> Literal["complete"] | _Ended:
        """Reads and drops the rest of the body (after a refusal midway)."""

# ------------------------------------------------------------------------------------- processes

def tune_malloc(mmap_threshold: int, trim_threshold: int, top_pad: int, arena_max: int) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``, ``M_TOP_PAD`` (bytes) and ``M_ARENA_MAX``
    (0: the default; it counts only before a second thread allocates) for this process
    (``mallopt(3)``); whether all were accepted (False, nothing changed, on another C library)."""

def trim_malloc() -> bool:
    """Return the allocator's free memory to the kernel (``malloc_trim(0)``, the GIL released): for a
    process gone idle, never on a hot path; whether any was released (False on another C library)."""

def hold_free_chunks() -> int:
    """Take every free chunk of the allocator's main heap (glibc's main arena: call it from the main
    thread) and never give it back, so that later allocations are carved from the heap's top; the
    bytes held (0 on another C library). For a process about to fork many children that allocate
    (the zygote): a child's ``malloc`` from a scattered free chunk writes that chunk's page and its
    bin neighbours', each a copy-on-write fault; from the top, a few contiguous pages. No memory is
    added: the chunks' pages are resident already."""

def collapse_anonymous() -> int:
    """Gather every whole, 2 MiB-aligned range of this process's private anonymous memory (the heap,
    Python's arenas) into transparent huge pages (``madvise(MADV_COLLAPSE)``, the GIL released); the
    bytes collapsed (0 where the kernel cannot: before Linux 6.1, huge pages ``never``, another C
    library). The same pages with the same contents, held by fewer page-table entries: for a process
    about to fork many children (the zygote), each fork copies one entry per huge page, not 512."""

def zygote_serve(
    sock: int,
    spare: Callable[[int, int, bytes | None], object],
    sandbox: Callable[[bytes, list[int], int, int], object],
    spare_delay: float = 0.0,
) -> None:
    """The zygote's serve loop, which runs no Python in this process (``sandboxd.runtime.zygote.serve``):
    answer the create requests on ``sock`` (JSON, one per ``SOCK_SEQPACKET`` message, the disk and
    volumes' mounts as ``SCM_RIGHTS``) until the runtime closes its end. ``spare(channel, report,
    last_request)`` runs in each spare fork, ``sandbox(request, fds, log, report)`` in each fork made
    at request time; neither may return (a fork whose callback does exits with status 1). Each fork
    has closed ``sock`` and the other creates' report pipes, and reset the interpreter as
    ``os.fork()``'s child does. A spare is forked at once, then ``spare_delay`` seconds after each
    create's "A" has exited with no other in flight (0 to 60). ``ValueError`` for a request that is
    not JSON or has no ``id``, or a ``spare_delay`` out of range."""

def default_ignored_glibc_signals() -> None:
    """Set glibc's two internal signals (32: ``SIGCANCEL``, 33: ``SIGSETXID``), which ``signal``
    cannot reach, back to their default when they are ignored (a ``posix_spawn`` parent, such as GNU
    make, leaves them so in every child); a handler glibc installed for them is left alone."""

def split_huge_mappings() -> int:
    """Map this process's huge pages (:func:`collapse_anonymous`) by 4 KiB entries again, keeping the
    huge pages themselves (an ``mprotect`` of one page of each 2 MiB range, read-only and back); the
    2 MiB ranges gone through. A fork then copies each huge page's entries in a batch and inherits no
    2 MiB entry that its first write into the range would have to split."""

class SharedLibrary:
    """A shared library loaded into this process by path (``dlopen``, ``RTLD_NOW | RTLD_LOCAL``; the
    loader's message as :class:`OSError` when it refuses); it stays loaded until :meth:`close`."""

    def __init__(self, path: str) -> None: ...
    def close(self) -> bool:
        """Unload it (once; later calls do nothing); whether the loader accepted."""

STREAM_STDOUT: int
STREAM_STDERR: int
STREAM_PTY: int
PTY_GATHER_BYTES: int
"""The largest chunk a flooding PTY's reads are gathered into (sandboxd-proc's ``PTY_GATHER_BYTES``)."""

class End:
    """How a process ended, mapped exactly as envd maps Go's ``ProcessState`` (spec §4.2)."""

    exited: bool
    exit_code: int
    status: str
    error: str | None

class OutputChunk:
    """A read-only chunk of process output, lent from the ring without a copy: it has the buffer
    protocol (``memoryview``, ``bytes.join``, socket writes); ``bytes(chunk)`` copies it."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def base64_between(before: bytes, data: bytes | Sequence[object], after: bytes) -> bytes:
    """``before + base64(data) + after`` (standard alphabet, padded) as one ``bytes``: process output
    in a JSON stream, ``data`` as ``Subscriber.next_batch`` gives it (``bytes``, or a list or tuple of
    ``bytes`` and ``OutputChunk`` that add up to it), encoded straight into the result. ``TypeError``
    for any other kind of data."""

class Batch:
    """What a subscriber may read now: lost output (if it fell behind), chunks, and the end."""

    lagged_bytes: int
    """Bytes evicted before this subscriber read them (0 when nothing was lost)."""
    chunks: list[tuple[int, bytes | list[OutputChunk | bytes]]]
    """``(STREAM_*, data)`` in order, one item per run of consecutive reads of one stream: ``data``
    is the run joined into one ``bytes``, or (``next_batch(views=True)``) a list of pieces: its
    reads of at least 16 KiB lent uncopied as ``OutputChunk``, the smaller ones between them joined."""
    end: End | None
    """Set once every chunk has been read and the process has been reaped."""
    more: bool
    """True when more is already available (the byte budget cut this batch)."""

class Subscriber:
    """A cursor into a process's output ring. Iterate with ``next_batch``; wait on ``fileno()``
    (readable whenever ``next_batch`` would return something) or with ``wait``.

    While open it takes part in flow control: rather than overwrite output it has not read, the
    process waits for it if it is the most advanced subscriber or keeps reading (has called
    ``next_batch`` and not left output unread for the 2 s stall timeout). A subscriber that stops
    reading delays the process at most once by the stall timeout, one slower than another at most by
    that much in total; after that it is not waited for and sees ``lagged_bytes``."""

    def fileno(self) -> int: ...
    def next_batch(self, max_bytes: int = ..., views: bool = False) -> Batch:
        """Non-blocking: everything available from the cursor, up to ``max_bytes`` (at least one chunk).
        With ``views`` each run's data is a list of ``OutputChunk`` (reads of 16 KiB or more, uncopied)
        and ``bytes`` (the smaller reads between them, joined) instead of one joined ``bytes``."""
    def wait(self, timeout: float | None) -> bool:
        """Block (GIL released) until something is available or ``timeout`` seconds pass."""
    def pump(
        self,
        sock: int,
        cancel: int,
        paths: tuple[list[int], list[int], list[int]],
        keepalive: bytes,
        keepalive_interval: float,
        max_bytes: int = ...,
    ) -> tuple[str, int, bytes]:
        """Block (GIL released) writing the output to the non-blocking socket ``sock`` as binary
        Connect data frames in HTTP/1.1 chunks (``paths``: field numbers down to the stdout, stderr
        and PTY bytes; ``keepalive``: a whole chunk, sent after ``keepalive_interval`` s without a
        frame) until the process's end, a lag, the peer leaving or the eventfd ``cancel`` becoming
        readable: ``("end", 0, b"")`` (the next batch holds the end), ``("lagged", bytes_lost, b"")``,
        ``("closed", 0, b"")`` or ``("cancelled", 0, rest_of_a_frame_cut_short)``. Both descriptors
        must stay open until it returns."""
    def close(self) -> None:
        """Unregister: the process no longer waits for this subscriber. Idempotent.

        Also closes ``fileno()`` (remove it from the event loop first); later calls raise ``ValueError``."""
    def __enter__(self) -> Subscriber: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

class Process:
    """A spawned child (own session and process group) whose output goes to a bounded ring."""

    pid: int
    has_pty: bool

    @staticmethod
    def spawn(
        program: str,
        args: list[str],
        env: dict[str, str],
        *,
        cwd: str | None = None,
        user: str | None = None,
        identity: tuple[str, int, int, str, list[int]] | None = None,
        path: str = ...,
        stdin: bool = True,
        pty: tuple[int, int] | None = None,
        ring_bytes: int = ...,
        oom_score_adj: int | None = None,
    ) -> Process:
        """Start ``program`` with ``args`` (``argv[1:]``).

        The environment is *not* inherited: ``PATH=path`` (default: the agent's own ``PATH``, else a
        standard one), then ``HOME``, ``USER`` and ``LOGNAME`` of ``user`` (default: the agent's
        account), then ``env`` (later wins). ``identity`` is a user already resolved, ``(name, uid, gid,
        home, supplementary groups)``, used as it is instead of looking ``user`` up. ``pty`` is
        ``(cols, rows)``; ``stdin`` applies to pipes only. ``oom_score_adj`` is written to the
        child's ``/proc/self/oom_score_adj`` before exec. Raises ``FileNotFoundError`` for a missing
        cwd or program (``filename`` names it), ``NotADirectoryError`` for a cwd that is not a
        directory, ``PermissionError`` when exec is denied, ``LookupError`` for an unknown user, and
        ``ValueError`` for a NUL byte, an ``=`` in an env name, or an ``oom_score_adj`` outside
        -1000..1000.
        """
    def subscribe(self, from_oldest: bool = True) -> Subscriber:
        """A new subscriber; ``from_oldest`` replays what the ring still holds, else starts at now.

        The first ``subscribe(True)`` gets a subscriber registered before the process's first byte was
        read, so it misses nothing however fast the process writes. Until that one is taken (or a
        first ``subscribe(False)`` discards it), the output is held for it as for a subscriber that
        has not read yet: at most the 2 s stall timeout, once."""
    def end(self) -> End | None:
        """The end, once the process has exited and its output is drained."""
    def wait(self, timeout: float | None) -> End | None:
        """Block (GIL released) until the end or ``timeout`` seconds."""
    def write_stdin(self, data: bytes, timeout: float) -> None:
        """Raises ``BrokenPipeError`` when stdin is disabled or closed, ``TimeoutError`` when the
        child does not read within ``timeout``, and ``io.UnsupportedOperation`` for a PTY process."""
    def close_stdin(self) -> None: ...
    def write_pty(self, data: bytes, timeout: float) -> None: ...
    def resize(self, cols: int, rows: int) -> None: ...
    def signal(self, signal: int) -> None:
        """Send ``signal`` to the process group. ``ValueError`` for an invalid signal number,
        ``ProcessLookupError`` once the process has been reaped."""

# -------------------------------------------------------------------------------------- watching

WATCH_OVERFLOW: int
"""Kind of a batch item that reports lost events: the kernel's ``IN_Q_OVERFLOW`` (name ``""``; the
watcher has rescanned and goes on), or events the watcher's buffer had no room for (name: how many,
in decimal)."""
WATCH_BUFFER_BYTES: int
"""The default bound on a watcher's buffered events, in bytes (names included)."""
WATCH_TAKEOVER_S: float
"""How long a parked caller may leave a readable kernel queue unread before the drain thread takes
it back by itself (``Watcher.park``)."""
WATCH_CLOSED: int
"""Kind of a batch item that reports the watched directory itself was deleted or moved away."""

class Tripwire:
    """A non-blocking inotify instance that becomes readable (``fileno()``, ``POLLIN``) once anything
    at ``paths`` changes: a directory's entries (created, removed, renamed), a file's content,
    metadata or name. A symlink is watched as itself. Raises ``OSError`` for the first path that
    cannot be watched (``ENOENT``, ``ENOSPC``, ``EMFILE``)."""

    def __init__(self, paths: list[str]) -> None: ...
    def fileno(self) -> int: ...
    def rearm(self, paths: list[str]) -> None:
        """Quiet again, watching ``paths`` as they are now: watches on inodes no path names any more
        removed, queued events discarded. The same instance: closing one with watches waits for an
        RCU grace period. ``OSError`` as the constructor's; then it is not to be trusted until a
        ``rearm`` succeeds."""
    def close(self) -> None: ...

class Watcher:
    """A recursive (or flat) inotify watch on a directory. Event kinds are envd's ``EventType``
    numbers (1 CREATE, 2 WRITE, 3 REMOVE, 4 RENAME, 5 CHMOD); names are relative to the root."""

    closed: bool

    def __init__(self, path: str, recursive: bool, buffer_bytes: int = ...) -> None:
        """Watches ``path`` (walking it, GIL released) and starts the thread that drains the kernel's
        queue into a buffer of at most ``buffer_bytes`` (default ``WATCH_BUFFER_BYTES``).

        Raises ``FileNotFoundError``, ``NotADirectoryError``, and ``OSError`` with ``ENOSPC``
        (``fs.inotify.max_user_watches`` reached) or ``EMFILE`` (``max_user_instances`` reached)."""
    def fileno(self) -> int:
        """An eventfd, readable while events are buffered (for ``loop.add_reader``)."""
    def read_batch(self, max_items: int | None = None) -> list[tuple[int, str]]:
        """Non-blocking: up to ``max_items`` buffered ``(kind, name)`` (all for None), possibly none.
        Raises ``OSError`` once for an error met while draining (a directory it could not watch)."""
    def sync(self) -> None:
        """Handle what the kernel holds right now, ahead of the drain thread (GIL released): a
        directory created before the call is watched when it returns."""
    def kernel_fileno(self) -> int:
        """The inotify descriptor, readable while the kernel holds events (for a parked caller)."""
    def park(self) -> None:
        """The caller reads the kernel queue itself while it waits: it polls ``kernel_fileno()`` as
        well as ``fileno()`` and calls ``read_kernel()``; the drain thread stops reading the kernel,
        but takes the queue back by itself (unparks) when it stays readable and unread for
        ``WATCH_TAKEOVER_S`` (the caller busy elsewhere or off the CPU), so a burst is not lost to a
        caller that cannot read. A no-op while parked. The caller should still ``unpark()`` when it
        knows it will stop waiting for long."""
    def unpark(self) -> None:
        """The drain thread reads the kernel queue again (the default)."""
    def read_kernel(self) -> bool:
        """For a parked caller whose ``kernel_fileno()`` is readable: one bounded read into the
        buffer (take the events with ``read_batch``), with the GIL held (it is short). Hands the
        queue back to the thread (returns False) after a burst, on events costly to handle (a
        directory appearing or going, an overflow), on an error, or without reading while the
        thread is still reading (park again only once ``fileno()`` fired); False too once closed."""
    def wait(self, timeout: float | None) -> list[tuple[int, str]]:
        """Block (GIL released) up to ``timeout`` seconds for events, then return them."""
    def close(self) -> None:
        """Stop the drain thread and remove the watch (GIL released). Idempotent."""

# ----------------------------------------------------------------------------------- sandboxes

class Entered:
    """What ``enter_sandbox`` returns, in each of the two processes it returns in."""

    inside: bool
    """True in the payload (PID 2 inside the sandbox); False in the forked caller ("A")."""
    init_pid: int
    """The sandbox init's pid as the host sees it (in A); 1 inside."""

class SandboxStats:
    """Resource use of a sandbox, from its cgroup (None where the kernel does not account it)."""

    memory_bytes: int | None
    cpu_usage_ns: int | None
    pids_current: int | None

class SandboxHandle:
    """A running sandbox: its init process and its cgroup."""

    id: str
    init_pid: int

    @staticmethod
    def adopt(instance: str, id: str, init_pid: int) -> SandboxHandle:
        """Attach to sandbox ``id`` of runtime ``instance`` started earlier (maybe by a previous
        runtime); ``OSError`` when its init is gone or is not that sandbox's."""
    def pidfd(self) -> int:
        """A pidfd of the init: readable once the sandbox has ended (for ``loop.add_reader``)."""
    def is_running(self) -> bool: ...
    def exit_code(self) -> int | None:
        """The init's exit status once it ended (and was reaped by us), else None."""
    def freeze(self) -> None:
        """Freeze every process (cgroup freezer); returns once frozen."""
    def thaw(self) -> None: ...
    def kill(self) -> None:
        """SIGKILL everything, wait until the cgroup is empty, remove it. Synchronous."""
    def set_cpu_weight(self, weight: int) -> None:
        """The cgroup's CPU weight against the other sandboxes (1-10000, the kernel's default 100;
        v1 ``cpu.shares`` in proportion): a claimed warm sandbox goes back to 100."""
    def stats(self) -> SandboxStats: ...
    def disk_usage(self) -> tuple[int, int]:
        """``(used, total)`` bytes of the sandbox's root filesystem as ``df /`` shows them inside:
        its disk (the quota) when it has one. Read through ``/proc/<init>/root``."""
    def socket(self) -> int:
        """A TCP socket fd in the sandbox's network namespace, non-blocking, not connected; the caller owns it."""
    def connect(self, port: int, timeout: float) -> int:
        """A TCP socket fd connected to ``127.0.0.1:port`` inside the sandbox's network namespace."""

def build_base_template(dir: str) -> None:
    """Create (idempotently) the `host` template's root: private /etc, /home/user, mount points; the
    host's /usr is bind-mounted over its /usr at sandbox start."""

def enter_sandbox(
    id: str,
    template_dirs: list[str],
    sandbox_dir: str,
    *,
    instance: str,
    id_base: int,
    host_usr_ro: bool = True,
    disk_image: str | None = None,
    disk_fd: int | None = None,
    nested_userns: bool = False,
    memory_bytes: int | None = None,
    cpu_cores: float | None = None,
    pids_max: int | None = None,
    open_files: int | None = None,
    inotify_instances: int | None = None,
    inotify_watches: int | None = None,
    cpu_weight: int | None = None,
    volumes: Sequence[tuple[str, str]] = (),
    payload: Callable[[], object] | None = None,
    premade_cgroup: PremadeCgroup | None = None,
    report_fd: int | None = None,
) -> Entered:
    """Call in a freshly forked, single-threaded child of a zygote: puts it in a new sandbox and
    returns twice (see ``crates/sandboxd-jail`` docs): ``inside=True`` in the payload, which must
    never return into the zygote's code, and ``inside=False`` in the forked child, which must report
    ``init_pid`` and exit.

    With ``payload`` (and then ``report_fd``, required), it returns only on failure, in the forked
    child, once nothing of the sandbox runs: on success the forked child writes ``P<init pid>\n`` to
    ``report_fd`` and exits (status 0) without returning into Python, because the sandbox's payload,
    which calls ``payload()`` and exits (status 1 if it raised, after printing the traceback), runs
    on the same memory: its init and its payload are clones sharing the forked child's memory, not
    forks: no copy of the caller's page tables (``jail::enter_sandbox_then``). Nor does it return
    on a failure once the payload has started ``payload()`` (the init's own set-up refused, or the
    deadline, after that): the payload was killed mid-Python on this memory, so the forked child
    writes ``E<why>\n`` to ``report_fd`` and exits (status 1) without Python. Only then,
    ``premade_cgroup`` (made by this process) becomes the sandbox's cgroup when it fits, and is
    removed when it does not.

    The sandbox's cgroup is ``sandboxd/<instance>/<id>``; its uids and gids 0-65535 are the host's
    ``id_base..id_base+65536`` (claimed from :class:`IdRegistry`). Its writable layer lives on
    ``disk_fd`` (a disk from :func:`mount_disk`, duplicated here; the caller closes its own) or on
    ``disk_image`` (mounted now), else in ``sandbox_dir/upper`` without a quota.

    ``volumes`` are ``(host_dir, target)`` pairs, at most :data:`MAX_VOLUMES`: each host directory
    (e.g. a detached mount's root as ``/proc/self/fd/<n>``, cloned, so the caller's stays usable) is
    mounted read-write, idmapped (its files keep canonical owners on disk: uid 1000 inside is
    host uid 1000), ``nosuid`` and ``nodev`` at ``target``, which must pass
    :func:`validate_volume_target` and must not be at or under another's. Missing directories on
    the way are created; a symlink or a file on the way fails the create with an ``OSError``
    naming the volume's mount point (never followed)."""

def kill_sandbox(instance: str, id: str) -> None:
    """Kill and clean up sandbox ``id`` of runtime ``instance`` (its cgroup), with or without a handle."""

def list_sandboxes(instance: str) -> list[str]:
    """Ids of runtime ``instance``'s sandboxes whose cgroups exist on this host."""

def become_subreaper() -> None:
    """Make this process the reaper of sandbox inits it started (``PR_SET_CHILD_SUBREAPER``)."""

def configure_budget(
    instance: str,
    *,
    host_memory_bytes: int | None,
    host_pids_max: int | None,
    memory_bytes: int | None,
    pids_max: int | None,
) -> None:
    """Create ``sandboxd/`` and ``sandboxd/<instance>/`` and write their limits: the host-wide budget
    of every runtime's sandboxes together, and this runtime's."""

def remove_instance_if_empty(instance: str) -> None:
    """Remove ``sandboxd/<instance>/`` (and ``sandboxd/``) when no sandbox is left in them (a pre-made
    group that no spare uses any more is none: it goes first)."""

def remove_left_instance(instance: str) -> None:
    """What a runtime that is gone left of ``sandboxd/<instance>/``: its sandboxes' groups that hold
    nothing, then the group itself (a group that still holds a process stays, and so does the instance's)."""

def format_disk_image(path: str, size_mb: int, template: bool = False) -> None:
    """Create ``path`` as a sparse image of ``size_mb`` MiB holding an empty ext4 filesystem;
    ``template``: the layout of the image sandbox disks are copied from (fewer data extents)."""

def copy_sparse(src: str, dst: str) -> None:
    """Copy a file, keeping its holes (a copy of an empty formatted image writes a few MiB)."""

def mount_disk(image: str, scratch: bool = False) -> int:
    """Mount a disk image as a detached mount (attached nowhere until a sandbox attaches it); returns
    its descriptor, which the caller owns and closes. Closing every copy unmounts it. ``scratch``: a
    sandbox's own disk, without write barriers (a flush inside stops at the image file; the runtime
    syncs the image of a disk it keeps)."""

def disk_usage(path: str) -> tuple[int, int]:
    """``(used, total)`` bytes of the filesystem holding ``path``, as ``df`` shows them."""

def check_isolation_support(template: str) -> None:
    """Raise ``OSError`` saying what the host lacks unless it can build sandboxes over ``template``:
    user namespaces, and idmapped mounts of the template's filesystem (Linux >= 5.12)."""

DEFAULT_ID_REGISTRY: str
"""Where the host-wide registry of sandbox id ranges lives by default."""

ID_RANGE_SIZE: int
"""Host ids per sandbox (65536: uids and gids 0-65535 inside)."""

MAX_LAYERS: int
"""Most lower layers one sandbox's overlay may have (128): a template's, and the runtime's trust layer."""

MAX_VOLUMES: int
"""Most volumes one sandbox may mount (16)."""

def validate_volume_target(target: str) -> None:
    """Raise ``ValueError`` saying why unless ``target`` may be a volume's mount point inside a
    sandbox: absolute, normalised (no ``.``, ``..``, empty component or trailing ``/``), not ``/``,
    not at or under ``/proc``, ``/sys`` or ``/dev``, at most 4000 bytes, components of at most 255."""

class PremadeCgroup:
    """A sandbox cgroup made ahead of need, ``sandboxd/<instance>/.spare-<pid>``, with the device
    allow-list and these limits (``jail::PremadeCgroup``). The ``enter_sandbox`` (with a payload) of
    the process that made it renames it to the sandbox's id and rewrites the limits that differ from
    the request's; a group that does not fit is removed and the sandbox's made as usual. Used once.
    ``OSError`` when it cannot be made, always on cgroup v2 (which cannot rename a group)."""

    def __init__(
        self,
        instance: str,
        *,
        memory_bytes: int | None = None,
        cpu_cores: float | None = None,
        pids_max: int | None = None,
    ) -> None: ...
    def discard(self) -> None:
        """Remove the group now, unless an ``enter_sandbox`` took it (``os._exit`` runs no finalizer)."""

class IdRegistry:
    """The host-wide registry of sandboxes' id ranges: one file per claim, made with ``link`` so two
    runtimes never claim the same range; stale claims (data dir gone, no process using the ids) can
    be reclaimed."""

    def __init__(self, dir: str) -> None: ...
    def claim(self, data_dir: str, sandbox_id: str) -> int:
        """Claim a free range for ``sandbox_id`` of the runtime whose data dir is ``data_dir``; its base."""
    def release(self, base: int, data_dir: str, sandbox_id: str) -> None:
        """Release the range at ``base`` if this runtime claimed it for ``sandbox_id``; idempotent."""
    def claims_of(self, data_dir: str) -> list[tuple[int, str]]:
        """``(base, sandbox_id)`` of every claim made by the runtime whose data dir is ``data_dir``."""
    def reclaim_stale(self) -> list[int]:
        """Remove stale claims (their data dir is gone and no process uses their ids); their bases."""

# ------------------------------------------------------------------------------------ network

def net_create_link(
    host_name: str,
    group: int,
    netns_fd: int,
    host_v4: str,
    sandbox_v4: str,
    prefix_v4: int,
    host_v6: str,
    sandbox_v6: str,
    prefix_v6: int,
) -> None:
    """A sandbox's veth pair: ``host_name`` (in link ``group``) in this namespace with the gateway
    addresses, up; its peer created inside the namespace open as ``netns_fd`` as ``eth0`` with the
    sandbox's addresses and default routes, up. ``FileExistsError`` if ``host_name`` is taken;
    nothing is left behind on failure."""

def net_delete_link(name: str) -> bool:
    """Delete interface ``name`` (a veth pair goes whole); False when there was none."""

def net_delete_group(group: int) -> None:
    """Delete every interface of link ``group`` in one request."""

def net_link_stats(name: str) -> tuple[int, int] | None:
    """``(rx_bytes, tx_bytes)`` of interface ``name``, or None when it does not exist."""

def net_list_links(prefix: str) -> list[str]:
    """Names of the interfaces whose name starts with ``prefix``."""
