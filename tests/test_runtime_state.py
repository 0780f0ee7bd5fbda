"""The runtime's state as a create and a kill use it, without a sandbox: the id of a new sandbox, the
network rows kept in memory beside their table, a new sandbox's row and first event in one transaction,
the firewall elements of settings, and the metrics history's forget. Real SQLite files, no server."""

from __future__ import annotations

import string

from sandboxd.runtime.inputs import SANDBOX_ID
from sandboxd.runtime.manager import new_id


def test_new_ids_are_e2b_shaped_and_use_every_character() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and SANDBOX_ID.fullmatch(i) for i in ids)
    seen = "".join(ids)
    assert set(seen) == set(string.ascii_lowercase + string.digits)
    # 100,000 draws over 36 characters: ~2,778 each (standard deviation ~52). A mapping that favoured
    # some (b % 36 over all 256 byte values gives the first 4 characters 8 chances in 256, not 7)
    # shows as ~3,125 for those.
    counts = [seen.count(c) for c in set(seen)]
    assert max(counts) < 3000 and min(counts) > 2550, sorted(counts)

