"""The Python client against a real `shoal dev` cluster (TLS, root key): every method,
the error mapping, resumable import, and `shoal eval`'s nDCG@10 reproduced."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from shoal_client import (
    Aborted,
    AlreadyExists,
    AsyncClient,
    Client,
    Document,
    InvalidArgument,
    NotFound,
    ShoalError,
    Unauthenticated,
)

_n = [0]


def unique(stem: str) -> str:
    _n[0] += 1
    return f"{stem}-{os.getpid()}-{_n[0]}"


def rng_vectors(n: int, d: int, seed: int = 7) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


TEXTS = [
    ("t1", "Mitochondria produce the energy a cell needs through respiration.", {"topic": "bio", "year": 2001}),
    ("t2", "Stock markets fell sharply after the interest rate decision.", {"topic": "finance", "year": 2015}),
    ("t3", "A recipe for sourdough bread with a crisp crust.", {"topic": "food", "year": 2019}),
    ("t4", "The boundary layer over a wing thickens toward the trailing edge.", {"topic": "aero", "year": 1965}),
]


def test_status_names_the_coordinators_and_the_nodes(client):
    s = client.status()
    assert len(s["members"]) == 3 and s["leader"] in [m["id"] for m in s["members"]]
    assert sorted(n["state"] for n in s["nodes"]) == ["up", "up"]


def test_collections_are_created_listed_described_and_dropped(client):
    name = unique("pycoll")
    c = client.create_collection(name, 8, metric="l2", shards=2, replication_factor=1, index_fields={"lang": "keyword", "year": "number"})
    assert (c.name, c.dimension, c.metric, c.shard_count, c.replication_factor) == (name, 8, "l2", 2, 1)
    assert c.index_fields == {"lang": "keyword", "year": "number"}
    assert name in [x.name for x in client.list_collections()]
    d = client.describe_collection(name)
    assert d.id == c.id and [s["index"] for s in d.shards] == [0, 1]
    with pytest.raises(AlreadyExists) as e:
        client.create_collection(name, 8)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and name in e.value.message
    client.drop_collection(name)
    with pytest.raises(NotFound):
        client.describe_collection(name)


def test_text_documents_search_in_every_mode_with_filters_and_payloads(client):
    name = unique("pytext")
    client.create_collection(name, 384, model="all-MiniLM-L6-v2", replication_factor=1, index_fields={"topic": "keyword", "year": "number"})
    n = client.ingest(name, [{"id": i, "text": t, "metadata": m} for i, t, m in TEXTS], batch_size=3)
    assert n == 4
    q = "how do cells make energy?"
    for mode in ("auto", "dense", "lexical", "hybrid"):
        r = client.search(name, q, k=2, mode=mode)
        assert not r.partial and r.shards_answered == r.shards_total == 3
        assert r.hits[0].id == "t1", (mode, r.hits)
    linear = client.search(name, q, k=3, mode="hybrid", fusion="linear", dense_weight=0.7)
    assert linear.hits[0].id == "t1"
    prf = client.search(name, q, k=3, prf={"depth": 2, "alpha": 0.5, "beta": 0.5})
    assert prf.hits[0].id == "t1"
    r = client.search(name, "bread", k=4, with_text=True, with_payload=True, filter={"must": [{"key": "year", "range": {"gte": 2010}}]})
    assert {h.id for h in r.hits} == {"t2", "t3"}
    top = r.hits[0]
    assert top.id == "t3" and top.text.startswith("A recipe") and top.metadata == {"topic": "food", "year": 2019}
    assert all(a.plan for a in r.shards if a.answered)
    r = client.search(name, "markets", k=4, filter='{"must_not": [{"key": "topic", "in": ["finance", "food"]}]}')
    assert {h.id for h in r.hits} == {"t1", "t4"}
    like = client.search(name, like_id="t4", k=3)
    assert "t4" not in [h.id for h in like.hits] and len(like.hits) == 3
    # Batch: each answer as alone.
    batch = client.search_batch(name, [{"query": q, "k": 2}, {"query": "wing", "k": 1, "mode": "lexical"}])
    assert [b.hits[0].id for b in batch] == ["t1", "t4"]


def test_arrays_get_delete_set_payload_count_scroll(client):
    name = unique("pyvec")
    client.create_collection(name, 16, shards=3, replication_factor=1, index_fields={"half": "keyword", "i": "number"})
    v = rng_vectors(300, 16)
    meta = [{"i": i, "half": "lo" if i < 150 else "hi"} for i in range(300)]
    assert client.ingest_arrays(name, v, ids=[f"v{i}" for i in range(300)], metadata=meta, batch_size=64) == 300
    r = client.search(name, vector=v[42], k=3, exact=True)
    assert r.hits[0].id == "v42" and abs(r.hits[0].score - 1.0) < 1e-4
    got = client.get(name, "v42", with_vector=True)
    assert got.metadata == {"i": 42, "half": "lo"} and np.allclose(got.vector, v[42]) and got.version > 0
    assert client.get(name, "nope") is None
    assert client.count(name).count == 300
    assert client.count(name, {"must": [{"key": "half", "match": "hi"}]}).count == 150
    # Set-payload: merged without the vector; a stale version is refused.
    client.set_payload(name, "v42", {"tag": "x"}, merge=True)
    after = client.get(name, "v42", with_vector=True)
    assert after.metadata == {"i": 42, "half": "lo", "tag": "x"} and np.allclose(after.vector, v[42])
    with pytest.raises(Aborted) as e:
        client.set_payload(name, "v42", {"tag": "y"}, if_version=got.version)
    assert "if_version" in e.value.message
    client.set_payload(name, "v42", {"i": 42, "half": "lo"}, if_version=after.version)
    # Scroll: every document once, in pages.
    ids = [d.id for d in client.scroll_all(name, limit=64)]
    assert sorted(ids) == sorted(f"v{i}" for i in range(300))
    page = client.scroll(name, {"must": [{"key": "i", "range": {"lt": 10}}]}, limit=4, with_payload=True)
    assert len(page.documents) == 4 and page.cursor and all(d.metadata["i"] < 10 for d in page.documents)
    # Deletes.
    assert client.delete(name, ["v1", "v2", "missing"]) == 2
    assert client.delete_by_filter(name, {"must": [{"key": "half", "match": "hi"}]}) == 150
    assert client.count(name).count == 148
    with pytest.raises(InvalidArgument):
        client.delete_by_filter(name, None)


def test_errors_carry_the_code_and_the_servers_message(client, dev):
    name = unique("pyerr")
    client.create_collection(name, 4, replication_factor=1)
    with pytest.raises(NotFound) as e:
        client.search(unique("absent"), vector=[0.1] * 4)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidArgument) as e:
        client.search(name, vector=[0.1] * 4, k=0)
    assert "k = 0" in e.value.message
    with pytest.raises(InvalidArgument) as e:
        client.search(name, vector=[0.1] * 4, k=10**6)
    assert "limit" in e.value.message
    with pytest.raises(InvalidArgument) as e:
        client.ingest(name, [{"id": "a", "vector": [0.1] * 5}])
    assert "dimension" in e.value.message
    with pytest.raises(InvalidArgument) as e:
        client.search(name, vector=[0.1] * 4, filter={"must": [{"key": "nope", "match": 1}]})
    assert "nope" in e.value.message
    with pytest.raises(InvalidArgument):
        client.search(name, vector=[0.1] * 4, mode="fuzzy")
    # A key the cluster does not know.
    with Client.dev(dev["data"], api_key="shoal_" + "0" * 40) as bad:
        with pytest.raises(Unauthenticated):
            bad.search(name, vector=[0.1] * 4)
    assert issubclass(Unauthenticated, ShoalError)


def _write_npy(tmp: pathlib.Path, n: int, d: int):
    v = rng_vectors(n, d, seed=11)
    path = tmp / "vecs.npy"
    np.save(path, v)
    ids = tmp / "vecs.ids"
    ids.write_text("".join(f"doc-{i:06d}\n" for i in range(n)))
    return v, str(path), str(ids)


def test_import_npy_resumes_after_a_kill_without_duplicates_or_gaps(client, dev, tmp_path):
    name = unique("pyimport")
    client.create_collection(name, 16, shards=3, replication_factor=1)
    v, path, ids = _write_npy(tmp_path, 30_000, 16)
    # A first import killed partway (a separate process), then the same import again.
    script = (
        "import sys; from shoal_client import Client\n"
        f"c = Client.dev({dev['data']!r})\n"
        f"c.import_file({name!r}, {path!r}, ids={ids!r}, batch_size=250, concurrency=2)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script])
    prog = pathlib.Path(path + ".shoal-import")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if prog.exists():
            done = json.loads(prog.read_text())["rows_done"]
            if done >= 2_000:
                break
        time.sleep(0.02)
    p.kill()
    p.wait()
    first = json.loads(prog.read_text())
    assert 0 < first["rows_done"] < 30_000 and not first["complete"], first
    r = client.import_file(name, path, ids=ids, batch_size=250, concurrency=2)
    assert r.skipped == first["rows_done"] and r.skipped + r.rows == 30_000
    assert json.loads(prog.read_text())["complete"]
    assert client.count(name).count == 30_000
    seen = [d.id for d in client.scroll_all(name, limit=1000)]
    assert len(seen) == len(set(seen)) == 30_000
    got = client.get(name, "doc-012345", with_vector=True)
    assert np.allclose(got.vector, v[12345])
    # Run again: nothing to do.
    again = client.import_file(name, path, ids=ids, batch_size=250)
    assert again.rows == 0 and again.skipped == 30_000


def test_import_parquet_and_bad_files_name_the_file_and_row(client, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = unique("pyparquet")
    client.create_collection(name, 8, shards=2, replication_factor=1, index_fields={"k": "keyword"})
    v = rng_vectors(1000, 8, seed=3)
    table = pa.table({
        "id": [f"p{i}" for i in range(1000)],
        "vector": pa.array(v.tolist(), type=pa.list_(pa.float32())),
        "text": [f"row {i}" for i in range(1000)],
        "metadata": [json.dumps({"k": "even" if i % 2 == 0 else "odd"}) for i in range(1000)],
    })
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path, row_group_size=300)
    r = client.import_file(name, str(path), batch_size=128)
    assert r.rows == 1000
    assert client.count(name, {"must": [{"key": "k", "match": "odd"}]}).count == 500
    assert client.get(name, "p7").text == "row 7"
    # A NaN at row 17: refused before anything of that chunk is sent, naming file and row.
    bad = v.copy()
    bad[17, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(InvalidArgument) as e:
        client.import_file(name, str(tmp_path / "bad.npy"))
    assert "bad.npy, row 17" in e.value.message
    (tmp_path / "short.ids").write_text("a\nb\n")
    with pytest.raises(InvalidArgument) as e:
        client.import_file(name, str(tmp_path / "bad.npy"), ids=str(tmp_path / "short.ids"))
    assert "2 ids for 1000 rows" in e.value.message
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "novec.parquet")
    with pytest.raises(InvalidArgument) as e:
        client.import_file(name, str(tmp_path / "novec.parquet"))
    assert "no 'vector' column" in e.value.message


async def test_the_asyncio_client_does_the_same(dev):
    async with AsyncClient.dev(dev["data"]) as c:
        name = unique("pyasync")
        await c.create_collection(name, 8, replication_factor=1, index_fields={"g": "number"})
        v = rng_vectors(50, 8, seed=5)
        assert await c.ingest_arrays(name, v, metadata=[{"g": i % 5} for i in range(50)]) == 50
        r = await c.search(name, vector=v[9], k=1, exact=True)
        assert r.hits[0].id == "9"
        assert (await c.count(name, {"must": [{"key": "g", "match": 0}]})).count == 10
        assert len([d async for d in c.scroll_all(name, limit=7)]) == 50
        got = await c.get(name, "3", with_vector=True)
        assert np.allclose(got.vector, v[3])
        assert await c.delete(name, ["3"]) == 1
        batch = await c.search_batch(name, [{"vector": v[1], "k": 1, "exact": True}, {"vector": v[2], "k": 1, "exact": True}])
        assert [b.hits[0].id for b in batch] == ["1", "2"]
        with pytest.raises(InvalidArgument):
            await c.search(name, vector=[0.0] * 3)
        s = await c.status()
        assert len(s["nodes"]) == 2
        await c.drop_collection(name)
        with pytest.raises(NotFound):
            await c.describe_collection(name)


def _ndcg_at_10(ranked, rels):
    dcg = sum(rels.get(d, 0) / np.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:10]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def test_cranfield_ndcg_from_python_equals_shoal_eval(client, dev):
    """The vendored Cranfield set ingested and scored from Python (BEIR's nDCG@10), next
    to `shoal eval` over the same collection: the same figure (0.4114 hybrid, the
    default mode, in docs/benchmarks.md)."""
    data = pathlib.Path(dev["repo"]) / "data" / "cranfield"
    name = unique("pycranfield")
    client.create_collection(name, 384, model="all-MiniLM-L6-v2", replication_factor=1)
    docs = []
    for line in open(data / "corpus.jsonl"):
        d = json.loads(line)
        text = f"{d['title']} {d['text']}" if d.get("title") else d["text"]
        if text.strip():
            docs.append({"id": d["_id"], "text": text})
    assert client.ingest(name, docs, batch_size=64) == len(docs)
    qrels = {}
    for line in open(data / "qrels" / "test.tsv").read().splitlines()[1:]:
        q, d, g = line.split("\t")
        qrels.setdefault(q, {})[d] = int(g)
    queries = [json.loads(l) for l in open(data / "queries.jsonl")]
    queries = [q for q in queries if q["_id"] in qrels]
    scores = []
    for q in queries:
        r = client.search(name, q["text"], k=100)
        assert not r.partial
        # As BEIR scores: a document with the query's own id is not counted.
        scores.append(_ndcg_at_10([h.id for h in r.hits if h.id != q["_id"]], qrels[q["_id"]]))
    ours = float(np.mean(scores))
    out = subprocess.run(
        [dev["bin"], "eval", str(data), "--collection", name],
        cwd=dev["repo"],
        capture_output=True,
        text=True,
        env={**os.environ, **{k.upper(): v for k, v in {
            "shoal_tls_ca": f"{dev['data']}/tls/ca.pem",
            "shoal_tls_cert": f"{dev['data']}/tls/client.pem",
            "shoal_tls_key": f"{dev['data']}/tls/client.key",
            "shoal_api_key_file": f"{dev['data']}/keys/root.key",
        }.items()}},
        check=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])["ndcg_at_10"]
    assert abs(ours - theirs) < 1e-9, (ours, theirs)
    assert abs(ours - 0.4114) < 0.002, ours


def test_the_http_json_api_takes_the_same_tls_and_keys(client, dev):
    """The node's HTTP/JSON API on its public port (issue 23), as curl or urllib reach
    it: TLS from the cluster's CA, the key in `authorization`."""
    import ssl
    import urllib.error
    import urllib.request

    name = unique("pyhttp")
    client.create_collection(name, 4, replication_factor=1)
    ctx = ssl.create_default_context(cafile=f"{dev['data']}/tls/ca.pem")
    key = pathlib.Path(f"{dev['data']}/keys/root.key").read_text().splitlines()[0].strip()

    def post(path, body, auth=True):
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"https://127.0.0.1:7201{path}", data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    s, r = post(f"/v1/collections/{name}/ingest", {"documents": [{"id": "a", "vector": [1, 0, 0, 0]}, {"id": "b", "vector": [0, 1, 0, 0]}]})
    assert (s, r.get("ingested")) == (200, "2"), r
    s, r = post(f"/v1/collections/{name}/search", {"vector": [0, 1, 0, 0], "k": 1, "exact": True})
    assert s == 200 and r["hits"][0]["id"] == "b", r
    s, r = post(f"/v1/collections/{name}/search", {"vector": [0, 1, 0, 0]}, auth=False)
    assert (s, r["code"]) == (401, "UNAUTHENTICATED"), r
    assert client.get(name, "a") is not None
