"""A download's ``Content-Type`` (``sandboxd.agent.contenttype``) is ``mimetypes.guess_type``'s for
every extension ``mimetypes`` knows (its built-in table and the system's files), compressed or not,
in any case, without ``mimetypes`` building its table (issue 16, the agent's memory)."""

from __future__ import annotations

import json
import subprocess
import sys

COMPARE = r"""
import json, mimetypes, os
from sandboxd.agent.contenttype import content_type
exts = set(mimetypes.types_map) | set(mimetypes.common_types)
for name in mimetypes.knownfiles:
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            for line in f:
                words = line.split("#")[0].split()
                exts.update("." + w for w in words[1:])
paths = ["/d/noext", "/d/.bashrc", "/d/a.", "/d/x.tar.gz", "/d/x.tgz", "/d/x.TGZ", "/d/x.svgz", "/d/x.gz",
         "/d/x.Z", "/d/x.txt.bz2", "/d/x.unknownext", "/d.dir/file", "/d/x.tar.xz", "/d/x.json.br"]
for ext in sorted(exts):
    paths += [f"/d/f{ext}", f"/d/f{ext.upper()}", f"/d/f{ext}.gz"]
ours = [content_type(p) for p in paths]
inited_by_us = mimetypes.inited
theirs = [mimetypes.guess_type(p)[0] or "application/octet-stream" for p in paths]
print(json.dumps({
    "extensions": len(exts),
    "differ": [(p, a, b) for p, a, b in zip(paths, ours, theirs) if a != b][:20],
    "inited_by_us": inited_by_us,
    "after_init": [content_type(p) for p in paths] == theirs,
}))
"""


def test_every_known_extension_gets_guess_types_answer() -> None:
    out = subprocess.run([sys.executable, "-c", COMPARE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["extensions"] > 100  # the built-in table alone has ~200
    assert got["differ"] == []
    assert got["inited_by_us"] is False, "content_type built mimetypes' whole table"
    assert got["after_init"] is True
