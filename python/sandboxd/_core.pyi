"""Typed interface of ``sandboxd._core``, the PyO3 extension built from ``crates/sandboxd-py``.

Every function that touches the kernel releases the GIL while it does. Errors are raised as the
built-in ``OSError`` subclasses (``FileNotFoundError``, ``NotADirectoryError``, ...) with ``errno``
set, so the service layer maps them in one table (``sandboxd.agent.errors``).
"""

from collections.abc import Iterator
from types import TracebackType

__version__: str

FILE_TYPE_UNSPECIFIED: int
FILE_TYPE_FILE: int
FILE_TYPE_DIRECTORY: int
FILE_TYPE_SYMLINK: int

READ_CHUNK: int
"""Default chunk size of ``FileReader`` in bytes."""

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

    Missing parent directories are created (0755, chowned to uid/gid when running as root). An
    existing target keeps its permission bits; a new one gets ``0o666 & ~umask``.
    Raises ``IsADirectoryError`` when the target is a directory.
    """

    path: str
    written: int

    def __init__(self, path: str, uid: int, gid: int) -> None: ...
    def write(self, data: bytes) -> None: ...
    def commit(self, metadata: dict[str, str] | None = None) -> None:
        """Set ``user.e2b.*`` metadata (replacing any), chown to uid/gid, and rename into place."""
    def abort(self) -> None: ...
    def __enter__(self) -> AtomicWriter: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...
