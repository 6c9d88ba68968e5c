"""Search collections (issue 31) on the fake backend: real folders in a temporary directory, results
against a brute-force search written here, incremental and kill-safe indexing, the approximate index's
recall, and one-line errors. No llama.cpp."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAKE, fake, run_cli

from metaeol_edge.core.embedder import MetaEOL
from metaeol_edge.core.presets import get_preset
from metaeol_edge.errors import InputError
from metaeol_edge.faces.search import Collection, list_collections, remove_collection
from metaeol_edge.faces.search.chunking import Budget, split_text
from metaeol_edge.faces.search.config import WITHOUT_FIT
from metaeol_edge.faces.search.rank import ApproxIndex, Ranker, exact_top_k, normalize
from metaeol_edge.faces.search.store import NewChunk, NewFile, Store

A_MD = """# Pets

Cats are small furry animals that sleep most of the day.
They purr when they are happy.

Dogs bark at strangers and love long walks in the park.
"""
B_TXT = "The stock market fell sharply today.\nInvestors sold their shares in banks.\n"
C_PY = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n'


@pytest.fixture(autouse=True)
def _collections(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEOL_COLLECTIONS", str(tmp_path / "collections"))


def make_tree(root: Path) -> Path:
    """Nested folders with text, code and a table; a binary file, a non-UTF-8 file, a symlink loop, a hidden folder."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.md").write_text(A_MD)
    (root / "sub" / "b.txt").write_text(B_TXT)
    (root / "sub" / "deeper" / "c.py").write_text(C_PY)
    (root / "sub" / "rows.csv").write_text("id,text\nr1,A chef slices vegetables.\nr2,A man plays the guitar.\n")
    (root / "image.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (root / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")
    os.symlink("..", root / "sub" / "loop")
    return root


def open_fake(fake_model, name="notes", **kwargs) -> Collection:
    return Collection.open(name, model=str(fake_model), backend="fake", level="shipped", **kwargs)


def stored_chunks(path: Path) -> list[tuple]:
    """(id, path, line, line_end, text, vector bytes) straight from the SQLite file."""
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT c.id, f.path, c.line, c.line_end, c.text, c.vector FROM chunks c JOIN files f ON f.id = c.file_id "
            "ORDER BY c.id"
        ).fetchall()


def brute_force(fake_model, rows, query: str, k: int) -> list[tuple[int, float]]:
    """Cosine of the query with every chunk's text, embedded afresh, with a loop: the reference ranking."""
    with fake(fake_model, cache=False, level="shipped", **WITHOUT_FIT) as model:  # the fake model has no fit
        vectors = model.encode([r[4] for r in rows] + [query], show_progress_bar=False)
    q = vectors[-1]
    scored = []
    for row, v in zip(rows, vectors[:-1], strict=True):
        scored.append((row[0], float(np.dot(v, q) / (np.linalg.norm(v) * np.linalg.norm(q)))))
    scored.sort(key=lambda p: (-p[1], p[0]))
    return scored[:k]


def test_index_search_equals_brute_force_and_reindex_follows_the_folder(fake_model, tmp_path):
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model) as c:
        report = c.index(root, text_column="text", id_column="id")
        assert (report.added, report.changed, report.removed) == (4, 0, 0)
        reasons = {Path(s.path).name: s.reason for s in report.skipped}
        assert reasons["image.txt"].startswith("binary")
        assert reasons["latin.txt"].startswith("not UTF-8 (byte 0xe9 on line 1)")
        assert reasons["loop"].startswith("symbolic link loop")
        assert set(reasons) == {"image.txt", "latin.txt", "loop"}  # the hidden folder is left out, not skipped
        rows = stored_chunks(c.path)
        assert {Path(r[1]).name for r in rows} == {"a.md", "b.txt", "c.py", "rows.csv"}
        for query in ("a dog barking in the park", "shares of banks"):
            hits = c.search(query, k=5)
            want = brute_force(fake_model, rows, query, 5)
            assert [h.chunk_id for h in hits] == [i for i, _ in want]
            assert [h.score for h in hits] == pytest.approx([s for _, s in want], abs=1e-5)
            assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        (table_hit,) = [h for h in c.search("A chef slices vegetables.", k=6) if h.path.endswith("rows.csv")][:1]
        assert table_hit.line == 1 and table_hit.row_id == '"r1"' and table_hit.text == "A chef slices vegetables."
        two = c.search(["cats", "stock market"], k=2)  # a list of queries: a list of lists, as encode
        assert len(two) == 2 and all(len(h) == 2 for h in two)

    with Collection.open("notes") as c:
        # Unchanged: nothing read past its size and time, nothing embedded, the model never loaded.
        again = c.index()
        assert (again.unchanged, again.added, again.changed, again.removed, again.chunks_embedded) == (4, 0, 0, 0, 0)
        assert c.model._backend is None

        # A file changed (one paragraph added), one deleted: only the new chunk is embedded.
        (root / "a.md").write_text(A_MD + "\nParrots can learn to say a few words.\n")
        (root / "sub" / "b.txt").unlink()
        third = c.index()
        assert (third.changed, third.removed, third.unchanged) == (1, 1, 2)
        assert third.chunks_removed >= 1 and third.chunks_embedded >= 1
        paths = {Path(r[1]).name for r in stored_chunks(c.path)}
        assert "b.txt" not in paths
        assert not any("stock market" in h.text for h in c.search("stock market", k=10))
        assert any("Parrots" in h.text for h in c.search("parrots talking", k=10))


def test_similar_finds_neighbours_of_a_stored_chunk_without_the_model(fake_model, tmp_path):
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model) as c:
        c.index(root)
        rows = stored_chunks(c.path)
    with Collection.open("notes", create=False) as c:
        a = str(root / "a.md")
        me = c.chunk_at(a, 3)
        assert me.line <= 3 <= me.line_end
        hits = c.similar(a, 3, k=3)
        assert me.id not in [h.chunk_id for h in hits] and len(hits) == 3
        vectors = {r[0]: np.frombuffer(r[5], dtype="<f4") for r in rows}
        mine = vectors[me.id]
        want = sorted(
            ((i, float(v @ mine / np.linalg.norm(v) / np.linalg.norm(mine))) for i, v in vectors.items() if i != me.id),
            key=lambda p: (-p[1], p[0]),
        )[:3]
        assert [h.chunk_id for h in hits] == [i for i, _ in want]
        assert c._model is None  # similar never builds the model
        with pytest.raises(InputError, match="is not in collection notes"):
            c.similar(root / "nothing.md")


def test_chunks_fit_max_length_and_are_never_cut(fake_model):
    with fake(fake_model, "prompteol", cache=False, max_length=48) as model:
        budget = Budget.for_model(model)
        long_sentence = " ".join(f"word{i}" for i in range(300))  # no punctuation: split by tokens
        text = "First paragraph. It is short.\n\n" + long_sentence + "\n\nA last line.\nAnd another one."
        chunks = split_text(text, budget)
        assert len(chunks) > 5
        for chunk in chunks:
            assert budget.fits(chunk.text)
        words = " ".join(c.text for c in chunks).split()
        assert words == text.split()  # every word once, in order: nothing cut, nothing repeated
        assert chunks[0].line == 1 and chunks[-1].line_end == 6
        model.encode([c.text for c in chunks], truncate=False, show_progress_bar=False)  # would raise on a cut
        sentences = " ".join(f"Sentence {i} is short." for i in range(40))
        plain = split_text(sentences, budget)
        overlapping = split_text(sentences, Budget.for_model(model, overlap=8))
        assert " ".join(c.text for c in plain) == sentences
        assert len(overlapping) > len(plain) > 2 and all(budget.fits(c.text) for c in overlapping)
        for before, after in zip(overlapping[:-1], overlapping[1:], strict=True):  # starts with the last sentence
            assert before.text.endswith(after.text[: after.text.index(".") + 1])
        with pytest.raises(InputError, match="overlap"):
            Budget.for_model(model, overlap=1000)


def test_another_configuration_is_refused_naming_what_differs(fake_model, tmp_path):
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model) as c:
        c.index(root)
    made = rf"made with templates \(their exact text\) {WITHOUT_FIT['templates']} .*not prompteol "
    with pytest.raises(InputError, match=made):
        open_fake(fake_model, templates="prompteol")
    with pytest.raises(InputError, match="made with model file and backend"):
        open_fake(fake_model, backend_options={"seed": 1})
    with pytest.raises(InputError, match=r"made with layer \d+, not 10"):
        open_fake(fake_model, layer=10)
    with pytest.raises(InputError, match="chunk overlap 0, not 16"):
        open_fake(fake_model, overlap=16)
    with open_fake(fake_model, max_length=512) as same:  # the same configuration, spelled out: accepted
        assert same.search("cats", k=1)


def test_bad_inputs_are_one_line_errors(fake_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with open_fake(fake_model) as c:
        with pytest.raises(InputError, match="no such file or folder"):
            c.index(tmp_path / "missing")
        with pytest.raises(InputError, match="holds no files to index"):
            c.index(tmp_path / "empty")
        with pytest.raises(InputError, match="has no folders yet"):
            c.index()
    assert not (tmp_path / "collections" / "notes.sqlite3").exists()  # nothing written before the inputs check
    with pytest.raises(InputError, match="no collection nope"):
        Collection.open("nope", create=False)
    with pytest.raises(InputError, match="is not a collection name"):
        Collection.open("..")
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model) as c:
        c.index(root)
        for k in (0, -1, 1001, 2.5, True):
            with pytest.raises(InputError, match="k must be an integer"):
                c.search("cats", k=k)
        with pytest.raises(InputError, match="query #1 is empty"):
            c.search("   ")
        with pytest.raises(InputError, match="line must be a positive integer"):
            c.similar(root / "a.md", 0)
    with open_fake(fake_model, truncate=False) as strict:
        with pytest.raises(InputError, match="over max_length 512 .*truncation is off"):
            strict.search("word " * 600)
    with open_fake(fake_model) as lenient, pytest.warns(UserWarning, match="truncated from"):
        assert lenient.search("word " * 600, k=1)  # a stated truncation, as embed does
    # The CLI: one line on stderr, exit code 2.
    out = run_cli("search", "nope", "cats")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no collection nope" in out.stderr
    out = run_cli("index", "x", tmp_path / "missing", "--model", fake_model, *FAKE)
    assert out.returncode == 2 and out.stderr.strip() == f"error: no such file or folder: {tmp_path / 'missing'}"


def test_collections_list_show_rm(fake_model, tmp_path):
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model) as c:
        c.index(root)
    (row,) = list_collections()
    assert (row["name"], row["files"], row["model"]) == ("notes", 4, str(fake_model))
    assert row["config"]["templates"] == WITHOUT_FIT["templates"]  # the default, for a model with no fit
    assert row["roots"] == {str(root): row["roots"][str(root)]}
    out = run_cli("collections", "list")
    assert out.returncode == 0 and out.stdout.startswith("notes") and str(fake_model) in out.stdout
    remove_collection("notes")
    assert list_collections() == []
    with pytest.raises(InputError, match="no collection notes"):
        remove_collection("notes")


def test_kill_mid_index_leaves_it_usable_and_a_rerun_equals_a_clean_index(fake_model, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02d}.txt").write_text(f"Note number {i} is about topic {i % 7}.\n")
    env = os.environ | {"METAEOL_FAKE_DELAY": "0.05"}
    cmd = [sys.executable, "-m", "metaeol_edge", "index", "killed", str(root), "--model", str(fake_model), *FAKE,
           "--templates", "prompteol", "--batch-size", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = tmp_path / "collections" / "killed.sqlite3"
    deadline = time.time() + 60
    files = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=5) as conn:
                files = conn.execute("SELECT count(*) FROM files").fetchone()[0]
        except sqlite3.Error:
            files = 0
        if files >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= files < 30, "the job finished before the kill: slow the fake backend more"
    with Collection.open("killed", create=False) as c:  # usable as it was left
        assert 5 <= len(c) < 30 and len(c.search("topic 3", k=3)) == 3
    rerun = run_cli(*cmd[3:])
    assert rerun.returncode == 0, rerun.stderr
    assert "0 removed" in rerun.stdout and "chunks" in rerun.stdout
    with Collection.open("clean", model=str(fake_model), backend="fake", templates="prompteol", cache=False) as c:
        c.index(root)
    a = [r[1:] for r in stored_chunks(db)]
    b = [r[1:] for r in stored_chunks(tmp_path / "collections" / "clean.sqlite3")]
    assert sorted(a) == sorted(b) and len(a) == 30


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors around 50 centres (as embeddings are), seeded."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    return (centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim))).astype(np.float32)


def test_approximate_index_recall_at_10_is_at_least_099_against_exact():
    pytest.importorskip("usearch")
    data = normalize(clustered(6000, 64, seed=1))
    queries = normalize(clustered(200, 64, seed=2))
    ids = np.arange(1, len(data) + 1, dtype=np.int64)
    exact = exact_top_k(data, ids, queries, 10)
    index = ApproxIndex(64)
    index.add(ids, data)
    approx = index.search(queries, 10)
    assert index.search(queries[:1], 10) == approx[:1]  # one query (usearch answers it in another type)
    recall = np.mean([len({i for i, _ in a} & {i for i, _ in e}) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.99
    assert approx[0][0][1] == pytest.approx(exact[0][0][1], abs=1e-4)  # the scores are cosines too


def _put(store: Store, name: str, vectors: np.ndarray) -> None:
    chunks = [NewChunk(i, i + 1, i + 1, None, os.urandom(16), f"{name} {i}", v) for i, v in enumerate(vectors)]
    store.put_files([NewFile(f"/x/{name}", "/x", "text", 1, 1, name, chunks)])


def test_ranker_keeps_in_step_with_the_table_and_rebuilds_an_index_that_disagrees(tmp_path):
    pytest.importorskip("usearch")
    store = Store(tmp_path / "c.sqlite3", create=True)
    store.set_meta({"dim": 32})
    for j in range(4):
        _put(store, f"f{j}", clustered(300, 32, seed=10 + j))
    index_path = tmp_path / "c.usearch"
    queries = clustered(20, 32, seed=99)

    def check(ranker: Ranker) -> None:
        ids, vectors = zip(*store.vectors(), strict=True)
        want = exact_top_k(normalize(np.concatenate(vectors)), np.concatenate(ids), normalize(queries), 10)
        got = ranker.search(queries, 10)
        recall = np.mean([len({i for i, _ in a} & {i for i, _ in e}) / 10 for a, e in zip(got, want, strict=True)])
        # The queries' centres are none of the files' (each clustered() seed draws its own), so their 10th
        # neighbours are near-ties, and the graph is built on every core (not bit-reproducible): a CI run under
        # load found 0.985 here. What the index holds is checked directly below (its ids are the table's); the
        # recall bar itself is test_approximate_index_recall_at_10_is_at_least_099_against_exact's.
        assert recall >= 0.95
        assert np.array_equal(ranker.ids, store.ids())

    approx, exact = Ranker(store, index_path, approx=True), Ranker(store, tmp_path / "none", approx=False)
    check(approx)
    assert approx.rebuilt and index_path.is_file() and approx.mode == "approximate"
    assert exact.search(queries, 10) == exact_top_k(
        normalize(np.concatenate([v for _, v in store.vectors()])), store.ids(), normalize(queries), 10
    )
    store.remove_files(["/x/f1"])  # a removal and an update, seen by both at their next search
    _put(store, "f0", clustered(300, 32, seed=50))
    check(approx)
    assert exact.search(queries, 3) == exact_top_k(
        normalize(np.concatenate([v for _, v in store.vectors()])), store.ids(), normalize(queries), 3
    )
    approx.save()
    assert Ranker(store, index_path, approx=True).search(queries, 1) and not Ranker(store, index_path, True).rebuilt
    trusted = Ranker(store, index_path, approx=True)
    trusted.sync()
    assert not trusted.rebuilt  # the saved index agrees with the table: loaded, not rebuilt
    _put(store, "f9", clustered(10, 32, seed=7))  # the table moves on while the file is stale
    stale = Ranker(store, index_path, approx=True)
    check(stale)
    assert stale.rebuilt  # the file's ids disagree with the table's: rebuilt, not trusted
    store.close()


def test_a_new_collection_takes_the_quality_preset_where_its_fit_exists(fake_model, tmp_path, monkeypatch):
    """The default method (chosen on benchmarks/retrieval.py's rows): the quality preset for a model with
    its fit, its prompt and read without the fit for any other model; a named method is kept as given."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))  # the fit below is stored there
    with open_fake(fake_model, name="unfitted") as c:
        assert "preset" not in c.options and c.options["templates"] == WITHOUT_FIT["templates"]
    with fake(fake_model, preset="quality", level="shipped") as model:
        model.fit_postprocess([f"Note {i}: the cat sat on mat {i}." for i in range(200)], show_progress_bar=False)
    with open_fake(fake_model, name="fitted") as c:
        assert c.options["preset"] == "quality" and "templates" not in c.options
        assert c.model.postprocess and c.model.templates.name == WITHOUT_FIT["templates"]
    with open_fake(fake_model, name="named", templates="prompteol") as c:
        assert c.options["templates"] == "prompteol" and "preset" not in c.options


@pytest.mark.parametrize("current_exits_early", [False, True])
def test_a_collection_pins_its_presets_revision_and_opens_after_the_preset_moves_on(
    fake_model, tmp_path, monkeypatch, current_exits_early
):
    """A new collection stores ``quality@3``, not ``quality``. One that 0.2 made with ``quality`` (revision 1,
    stored by its bare name) still opens and searches once the preset has a new revision: its vectors are
    revision 1's, so its queries are too; without that, a mismatch of templates would refuse it.

    ``current_exits_early``: the current revision's vectors come from another file, as on llama.cpp, where
    revision 3 reads smollm2-135m's blocks 29 and 24 from a copy cut after block 29 (the fake never cuts)."""
    monkeypatch.setenv("METAEOL_HOME", str(tmp_path / "home"))  # the fits below are stored there
    if current_exits_early:
        plain = MetaEOL._vector_source

        def source(self):
            current = self.preset is not None and self.preset.current
            return plain(self) + (":exit-29" if current else "")

        monkeypatch.setattr(MetaEOL, "_vector_source", source)
    notes = [f"Note {i}: the cat sat on mat {i}." for i in range(200)]
    for name in ("quality@1", "quality"):
        with fake(fake_model, preset=name, level="shipped") as model:
            model.fit_postprocess(notes, show_progress_bar=False)
    root = make_tree(tmp_path / "notes")
    with open_fake(fake_model, name="new") as c:
        c.index(root, show_progress_bar=False)
        assert c.store.meta("options")["preset"] == get_preset("quality").pinned
    with open_fake(fake_model, name="old", preset="quality@1") as c:
        c.index(root, show_progress_bar=False)
        before = [(h.path, h.score) for h in c.search("furry animals", k=3)]
        c.store.set_meta({"options": c.store.meta("options") | {"preset": "quality"}})  # as 0.2 stored it
    with open_fake(fake_model, name="old") as c:
        assert [(h.path, h.score) for h in c.search("furry animals", k=3)] == before
        assert c.model.templates.name == "prompteol-icl-music" and c.options["preset"] == "quality@1"
    with pytest.raises(InputError, match="made with (templates|model file)"):  # a revision named is not another's
        open_fake(fake_model, name="old", preset=get_preset("quality").pinned).search("cats")


def test_the_default_without_a_fit_is_the_quality_presets_prompt_and_read():
    preset = get_preset("quality")  # its own settings: those of a model it holds no choice for
    assert WITHOUT_FIT == {"templates": preset.templates, "layer": preset.layer}
