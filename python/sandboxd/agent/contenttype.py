"""The ``Content-Type`` of a download: ``mimetypes.guess_type``'s answer, without its whole table.

The first ``mimetypes.guess_type`` reads ``/etc/mime.types`` (and the other ``mimetypes.knownfiles``)
whole into dictionaries, both directions, strict and not: 0.44 MiB of the standalone agent's RSS
(measured) kept for ever, for the few extensions a sandbox downloads. Here the same steps run for the
one extension asked: ``mimetypes``' suffix and encoding maps, then its built-in table, then the files
read line by line in the same order, the last line naming the extension winning as in
``MimeTypes.read``. Each answer is kept (:data:`CACHE_SIZE`); a new extension costs one read of the
files (~75 KB, a few ms) in the download's worker thread. Where ``mimetypes`` has built its table
anyway (something else in the process asked it), that table answers.
"""

from __future__ import annotations

import functools
import mimetypes  # its built-in tables only: 44 KiB; reading the files is what costs
import os
import posixpath

DEFAULT = "application/octet-stream"
"""What a download of an unknown type is sent as (envd's, and the SDKs' default)."""

CACHE_SIZE = 256
"""Extensions whose answer is kept: more than a sandbox's downloads use, and ~30 KiB at most."""


def content_type(path: str) -> str:
    """``mimetypes.guess_type(path)[0] or DEFAULT``, for an absolute path."""
    if mimetypes.inited or not path.startswith("/"):  # a relative "data:..." would be a URL to guess_type
        return mimetypes.guess_type(path)[0] or DEFAULT
    # mimetypes.MimeTypes.guess_type's steps (Python 3.11), for a path without a URL scheme:
    base, ext = posixpath.splitext(path)
    while (lowered := ext.lower()) in mimetypes.suffix_map:  # .tgz is .tar.gz
        base, ext = posixpath.splitext(base + mimetypes.suffix_map[lowered])
    if ext in mimetypes.encodings_map:  # .gz, .bz2...: the type is the one inside (case-sensitive, as there)
        base, ext = posixpath.splitext(base)
    return _type_of(ext.lower()) or DEFAULT


@functools.lru_cache(maxsize=CACHE_SIZE)
def _type_of(ext: str) -> str | None:
    """The type ``mimetypes``' table would hold for ``ext`` (``.html``; lower case): the built-in
    entry, overridden by each line of the known files that lists the extension."""
    found = mimetypes.types_map.get(ext)  # before mimetypes.init(), its built-in strict table
    if not ext:
        return found
    suffix = ext[1:]
    for name in mimetypes.knownfiles:
        if not os.path.isfile(name):
            continue
        with open(name, encoding="utf-8") as lines:
            for line in lines:
                words = line.split()
                for i, word in enumerate(words):
                    if word.startswith("#"):  # a comment runs to the end of the line
                        del words[i:]
                        break
                if suffix in words[1:]:
                    found = words[0]
    return found
