"""`metaeol serve --collection`: POST /v1/search, GET /v1/collections and the map route on a real uvicorn
server, with and without the API key, and their JSON errors (the fake backend)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import fake

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from metaeol_edge.faces.search import Collection  # noqa: E402
from metaeol_edge.server import Limits, ModelWorker, make_server  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def served(fake_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    for i in range(12):
        (root / f"n{i:02d}.md").write_text(f"Note {i} about topic {i % 3}.\n\nA second paragraph of note {i}.\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("METAEOL_COLLECTIONS", str(tmp_path_factory.mktemp("collections")))
    with Collection.open("docs", model=str(fake_model), backend="fake", level="shipped", cache=False) as c:
        c.index(root)
    collection = Collection.open("docs", create=False, cache=False)
    limits = Limits(max_chars=200)
    model = fake(fake_model, "prompteol", cache=False)
    workers = {"m": ModelWorker("m", model, limits)}
    server, sock, url = make_server(workers, "127.0.0.1", 0, limits, KEY, collections={"docs": collection})
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield url, collection, root
    server.should_exit = True
    thread.join(timeout=60)
    workers["m"].stop()
    model.close()
    collection.close()
    mp.undo()


def client(url, key=KEY):
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_search_and_neighbours_answer_the_contract(served):
    url, collection, root = served
    with client(url) as c:
        r = c.post("/v1/search", json={"collection": "docs", "query": "topic 2", "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["object"], body["collection"], body["model"]) == ("list", "docs", collection.stats()["model"])
        want = collection.search("topic 2", k=3)
        assert body["data"] == [h.to_dict() for h in want]
        assert list(body["data"][0]) == ["rank", "score", "path", "line", "line_end", "chunk_id", "text"]
        to = {"path": str(root / "n04.md"), "line": 3}
        r = c.post("/v1/search", json={"collection": "docs", "to": to, "k": 2})
        assert r.status_code == 200, r.text
        assert [d["chunk_id"] for d in r.json()["data"]] == [h.chunk_id for h in collection.similar(to["path"], 3, 2)]
        listed = c.get("/v1/collections").json()
        assert listed["object"] == "list"
        (one,) = listed["data"]
        assert (one["name"], one["chunks"], one["files"]) == ("docs", 12, 12) and one["config"]["dim"] == 576
        m = c.get("/v1/collections/docs/map", params={"limit": 5}).json()
        assert (m["collection"], m["total"], m["sampled"], len(m["points"])) == ("docs", 12, True, 5)
        assert set(m["points"][0]) == {"chunk_id", "x", "y", "path", "line", "text"}
        assert m == c.get("/v1/collections/docs/map?limit=5").json()  # a seeded sample: the same picture
        full = c.get("/v1/collections/docs/map").json()
        assert not full["sampled"] and len(full["points"]) == 12
        xy = np.array([[p["x"], p["y"]] for p in full["points"]])
        assert abs(xy.mean(axis=0)).max() < 1e-6 and xy[:, 0].var() >= xy[:, 1].var()  # centred, PC1 first


def test_search_routes_need_the_key_and_answer_json_errors(served):
    url, _, root = served
    with client(url, key=None) as c:
        for r in (c.post("/v1/search", json={"collection": "docs", "query": "x"}), c.get("/v1/collections")):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with client(url, key="wrong") as c:
        assert c.get("/v1/collections/docs/map").status_code == 401
    cases = [
        ({"collection": "nope", "query": "x"}, 404, "collection_not_found"),
        ({"collection": "docs", "query": "x", "k": 0}, 400, None),
        ({"collection": "docs", "query": "x", "k": "3"}, 400, None),
        ({"collection": "docs", "query": "x", "to": {"path": "a"}}, 400, None),
        ({"collection": "docs"}, 400, None),
        ({"collection": "docs", "query": "  "}, 400, None),
        ({"collection": "docs", "query": "x" * 201}, 400, None),
        ({"collection": "docs", "query": 5}, 400, None),
        ({"collection": "docs", "to": {"path": str(root / "missing.md")}}, 404, "chunk_not_found"),
        ({"collection": "docs", "to": {"path": str(root / "n01.md"), "line": 0}}, 400, None),
        ({"collection": "docs", "to": "n01.md"}, 400, None),
    ]
    with client(url) as c:
        for body, status, code in cases:
            r = c.post("/v1/search", json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["message"] and "\n" not in error["message"] and error["code"] == code
        assert c.post("/v1/search", content=b"{not json").status_code == 400
        for limit in ("0", "abc", "100001"):
            assert c.get(f"/v1/collections/docs/map?limit={limit}").status_code == 400
        assert c.get("/v1/collections/nope/map").status_code == 404
