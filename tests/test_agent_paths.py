"""Path resolution as envd's ``ExpandAndResolve`` (:func:`sandboxd.agent.paths.expand_and_resolve`)."""

from __future__ import annotations

import pytest
from sandboxd.agent.paths import expand_and_resolve
from sandboxd.agent.users import User

USER = User("user", 1000, 1000, "/home/user", (1000,))


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("~", "/home/user"),
        ("~/", "/home/user"),
        ("~/x", "/home/user/x"),
        ("~/x/", "/home/user/x"),
        ("~/a/../x", "/home/user/x"),
        ("x/", "/home/user/x"),
        ("/abs/x/", "/abs/x/"),  # an absolute path is used as given
    ],
)
def test_a_path_from_the_home_is_cleaned_as_envd_cleans_it(path: str, resolved: str) -> None:
    """envd expands ``~/…`` with ``filepath.Join``, which cleans: ``~/x/`` is ``/home/user/x`` (an
    upload writes the file ``x``), as ``x/`` is. Before, ``~/x/`` kept its slash, and an upload to it
    failed (its rename onto ``x/``: not a directory)."""
    assert expand_and_resolve(path, USER) == resolved
