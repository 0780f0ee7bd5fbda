"""What an upload tells the agent's directory watchers, so they report envd's events for it.

envd writes an upload in place: ``open(O_CREAT|O_TRUNC)``, ``chown``, then the data. Its watchers see,
for the target's name, CREATE, CHMOD, WRITE for a new file, and CHMOD (the chown it does first on an
existing file) then WRITE (the truncation and the data) for an overwrite; a new empty file has no
WRITE. The agent writes a hidden temporary file and renames it over the target, so the kernel only
reports a rename. Two things let the watchers report envd's sequence anyway:

* **A barrier before each commit.** The upload creates the target's missing directories, and a
  recursive watcher adds a watch on a new directory only when it reads that directory's CREATE. Before
  renaming, the upload asks every watcher to read what the kernel holds (:meth:`WatchHub.settle`), so
  the rename always happens inside a watched directory and is seen as an event, never only found by
  the scan of a directory that appeared (which can only say CREATE), however the body was chunked.
* **A note per commit** (:meth:`WatchHub.note_commit`): whether the target existed and whether data was
  written, keyed by the temporary file's unique name, which the rename event carries. The watcher
  turns the rename into envd's sequence from it. Notes are kept for the last :data:`NOTES_KEPT`
  commits, so a watcher that reads its queue late still finds them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


class Settles(Protocol):
    """A watcher that can handle the kernel's pending events now."""

    def settle(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Commit:
    """What one upload's rename stands for."""

    existed: bool
    """The target existed before (an overwrite)."""
    wrote: bool
    """Data was written (envd's ``write(2)`` calls, so a WRITE event)."""


NOTES_KEPT = 4096
"""Commits remembered. A note is needed only until every watcher has read the rename it explains,
which the barrier of the next upload forces; 4096 outlasts any realistic backlog at ~100 bytes each."""


class WatchHub:
    """The live watchers, and the notes of recent upload commits."""

    def __init__(self) -> None:
        self._watchers: set[Settles] = set()
        self._notes: OrderedDict[str, Commit] = OrderedDict()

    def add(self, watcher: Settles) -> None:
        """Registers a watcher while it lives."""
        self._watchers.add(watcher)

    def discard(self, watcher: Settles) -> None:
        """Forgets a watcher (closed)."""
        self._watchers.discard(watcher)

    def settle(self) -> None:
        """Makes every watcher handle the events the kernel holds for it now, ahead of its drain
        thread, so that new directories are watched (in a worker thread: a watcher's lock may be held for
        a walk of a whole tree)."""
        for watcher in list(self._watchers):
            watcher.settle()

    def note_commit(self, temp_name: str, commit: Commit) -> None:
        """Records what the rename of the temporary file ``temp_name`` (a base name) stands for. Called
        by an upload's commit in a worker thread, before its renames: each of the dict's operations
        holds the GIL, and two commits that trim at once only trim one note more."""
        self._notes[temp_name] = commit
        while len(self._notes) > NOTES_KEPT:
            self._notes.popitem(last=False)

    def commit_for(self, temp_name: str) -> Commit | None:
        """The note for a temporary file's base name, if one was made."""
        return self._notes.get(temp_name)
