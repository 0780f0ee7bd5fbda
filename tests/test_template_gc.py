"""The template store's garbage collector and its build cache records, on a real store directory and
real runtime databases (no sandbox): which records a template's removal and ``template prune``
forget, which layers then go, and that a collection waits for a build that holds the store."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sandboxd.runtime.layers import LayerStore
from sandboxd.runtime.store import Store, TemplateRow
from sandboxd.runtime.templates import collect_garbage


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    if os.geteuid() != 0:
        pytest.skip("the template store is root's (it keeps layers' canonical owners)")
    return LayerStore(tmp_path / "store")


def _digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def _layer(store: LayerStore, name: str) -> str:
    """A one-file layer committed under a digest of its own."""
    digest = _digest(name)
    tree = store.staging() / "tree"
    tree.mkdir()
    (tree / name).write_text(name)
    store.commit(tree, digest, "tar", f"test {name}")
    return digest


def _runtime_db(store: LayerStore, path: Path, templates: dict[str, list[str]]) -> Store:
    db = Store(path)
    for name, layers in templates.items():
        db.put_template(TemplateRow(name, layers, {}, "test", time.time()))
    store.register_user(path)
    return db


def test_a_removed_templates_own_records_go_and_what_others_build_on_stays(store: LayerStore, tmp_path: Path) -> None:
    base, shared, mine, theirs, failed = (_layer(store, n) for n in ("base", "shared", "mine", "theirs", "failed"))
    # Records as builds leave them: each lists the layers up to one step, topmost first.
    store.cache_put(_digest("base recipe"), {"layers": [base]})
    store.cache_put(_digest("shared step"), {"layers": [shared, base]})
    store.cache_put(_digest("my last step"), {"layers": [mine, shared, base]})
    store.cache_put(_digest("their last step"), {"layers": [theirs, shared, base]})
    store.cache_put(_digest("a failed build's step"), {"layers": [failed, base]})
    db = _runtime_db(store, tmp_path / "one.db", {"base": [base], "theirs": [theirs, shared, base]})
    # Another runtime sharing the store built on my template.
    _runtime_db(store, tmp_path / "two.db", {"on-mine": [mine, shared, base]})

    removed_chain = [mine, shared, base]
    stale = lambda record: removed_chain[len(removed_chain) - len(record) :] == record  # noqa: E731
    collected = collect_garbage(store, stale)
    assert collected.records == 0 and collected.layers == [], "a template another runtime builds on lost its cache"

    (tmp_path / "two.db").unlink()  # that runtime is gone (its registration is dropped)
    collected = collect_garbage(store, stale)
    assert collected.records == 1 and collected.layers == [mine]
    assert collected.size == len("mine")
    left = {tuple(layers) for layers in store.cache_records().values()}
    assert left == {(base,), (shared, base), (theirs, shared, base), (failed, base)}
    assert not store.path(mine).exists() and store.path(theirs).is_dir() and store.path(shared).is_dir()

    # `template prune`: every record no template ends with, except the ones named as kept.
    kept = {store.cache_record_name(_digest("base recipe"))}
    db.delete_template("base")
    collected = collect_garbage(store, lambda record: True, kept)
    assert collected.records == 1 and collected.layers == [failed]
    left = {tuple(layers) for layers in store.cache_records().values()}
    assert left == {(base,), (shared, base), (theirs, shared, base)}


def test_a_collection_waits_for_a_build_that_holds_the_store(store: LayerStore, tmp_path: Path) -> None:
    made = _layer(store, "made by a build that has not recorded it yet")
    _runtime_db(store, tmp_path / "one.db", {})
    done = threading.Event()
    result: list[list[str]] = []

    def collect() -> None:
        result.append(collect_garbage(store, lambda record: True).layers)
        done.set()

    with store.lock("gc", shared=True):
        worker = threading.Thread(target=collect)
        worker.start()
        assert not done.wait(0.5), "the collection ran while a build held the store"
        store.cache_put(_digest("the build's step"), {"layers": [made]})
        # The build's record lists its layer before it lets go: nothing of it may be taken.
        db = Store(tmp_path / "one.db")
        db.put_template(TemplateRow("built", [made], {}, "test", time.time()))
    worker.join(10)
    assert result == [[]] and store.path(made).is_dir()


def test_an_api_removal_during_a_build_answers_at_once_and_collects_after_it(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the template store is root's (it keeps layers' canonical owners)")
    from sandboxd.runtime.templates import Templates

    templates = Templates(Store(tmp_path / "sandboxd.db"), tmp_path / "store")
    layers = templates.layers
    base, mine = _layer(layers, "base"), _layer(layers, "mine")
    layers.cache_put(_digest("my step"), {"layers": [mine, base]})
    templates.db.put_template(TemplateRow("mine", [mine, base], {}, "test", time.time()))
    templates.db.put_template(TemplateRow("other", [base], {}, "test", time.time()))

    with layers.lock("gc", shared=True):  # a build in progress
        assert templates.remove("mine", lambda name: [], wait=False) is None
        assert templates.db.template("mine") is None, "the template is gone at once"
        time.sleep(0.2)
        assert layers.path(mine).is_dir(), "the collection ran while a build held the store"
    deadline = time.monotonic() + 10
    while layers.path(mine).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not layers.path(mine).exists() and layers.path(base).is_dir()
    assert list(layers.cache_records().values()) == []


def test_the_prune_command_reports_what_it_freed_and_keeps_the_built_in_recipes(tmp_path: Path) -> None:
    """``sandboxd template prune`` on a store of its own: the records no template ends with go, with
    their layers; the built-in templates' current recipes stay; a runtime database that exists but
    cannot be read stops the collection (its templates' layers are unknown)."""
    if os.geteuid() != 0:
        pytest.skip("the template store is root's (it keeps layers' canonical owners)")
    from sandboxd.runtime.templates import BUILT, Templates

    data, store_dir = tmp_path / "data", tmp_path / "store"
    data.mkdir()
    templates = Templates(Store(data / "sandboxd.db"), store_dir)
    layers = templates.layers
    built_in = _layer(layers, "a built-in recipe's")
    layers.cache_put(templates._key(BUILT[0]), {"layers": [built_in]})
    replaced = _layer(layers, "a replaced build's")
    layers.cache_put(_digest("replaced step"), {"layers": [replaced, built_in]})

    def prune() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sandboxd", "template", "prune", "--data-dir", str(data)]
        command += ["--template-store", str(store_dir)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not an SQLite database" * 100)
    layers.register_user(broken)
    assert "nothing was deleted" in prune().stdout and layers.path(replaced).is_dir()
    broken.unlink()

    assert "1 build cache records and 1 layers" in prune().stdout
    assert not layers.path(replaced).exists() and layers.path(built_in).is_dir()


def test_a_deferred_collection_that_its_runtime_did_not_live_to_run_is_finished_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A removal answered while a build held the store, by a runtime that then stopped before the
    build ended: the layers are not left for ever; the next runtime start finishes the collection."""
    if os.geteuid() != 0:
        pytest.skip("the template store is root's (it keeps layers' canonical owners)")
    from sandboxd.runtime.templates import Templates

    db_path, store_dir = tmp_path / "sandboxd.db", tmp_path / "store"
    templates = Templates(Store(db_path), store_dir)
    layers = templates.layers
    base, mine = _layer(layers, "base"), _layer(layers, "mine")
    layers.cache_put(_digest("my step"), {"layers": [mine, base]})
    templates.db.put_template(TemplateRow("mine", [mine, base], {}, "test", time.time()))
    templates.db.put_template(TemplateRow("other", [base], {}, "test", time.time()))

    removal = f"""
import sys
from pathlib import Path
from sandboxd.runtime.store import Store
from sandboxd.runtime.templates import Templates
templates = Templates(Store(Path({str(db_path)!r})), Path({str(store_dir)!r}))
assert templates.remove("mine", lambda name: [], wait=False) is None
"""  # then the process ends, and its collection thread with it
    with layers.lock("gc", shared=True):  # a build in progress
        subprocess.run([sys.executable, "-c", removal], check=True, timeout=120)
    assert Store(db_path).template("mine") is None
    assert layers.path(mine).is_dir() and len(layers.pending_collections()) == 1

    Templates(Store(db_path), store_dir).resume_collections()  # what `sandboxd serve` does at start
    deadline = time.monotonic() + 10
    while layers.pending_collections() and time.monotonic() < deadline:  # the note goes last
        time.sleep(0.05)
    assert not layers.path(mine).exists() and layers.path(base).is_dir()
    assert list(layers.cache_records().values()) == [] and layers.pending_collections() == []


def test_prune_does_what_deferred_collections_would_and_drops_their_notes(store: LayerStore, tmp_path: Path) -> None:
    from sandboxd.runtime.templates import Templates

    templates = Templates(Store(tmp_path / "sandboxd.db"), store.root)
    layers = templates.layers
    mine = _layer(layers, "mine")
    layers.cache_put(_digest("my step"), {"layers": [mine]})
    layers.note_collection([[mine]])
    (layers.pending / "torn.json").write_text("{")  # a note cut short is dropped, not fatal
    assert len(layers.pending_collections()) == 1 and not (layers.pending / "torn.json").exists()
    collected = templates.prune()
    assert collected.layers == [mine] and layers.pending_collections() == []
