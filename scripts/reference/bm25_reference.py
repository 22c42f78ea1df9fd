"""The BM25 reference for `shoal eval --mode lexical` (issue 22, docs/benchmarks.md):
`bm25s` (PyPI) with the settings shoal's BM25 uses — Lucene's scoring
(method="lucene"), k1 = 0.9, b = 0.4 (Anserini's defaults), its default tokeniser
(lower-cased `\\w\\w+` runs) with no stop words and PyStemmer's English (Snowball)
stemmer — over "title text" as shoal ingests it; nDCG@10 as BEIR computes it (graded
qrels, a query's own id left out, linear gains). Prints one JSON line; with a third
argument, each query's nDCG@10 as JSON lines there (for `paired.py`).

    python3 -m venv /tmp/bm25venv && /tmp/bm25venv/bin/pip install bm25s PyStemmer numpy
    /tmp/bm25venv/bin/python scripts/reference/bm25_reference.py ../shared/data/ir/cranfield
"""

import json
import math
import sys
import time

import bm25s
import Stemmer


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(dataset, per_query=None):
    corpus = read_jsonl(f"{dataset}/corpus.jsonl")
    queries = read_jsonl(f"{dataset}/queries.jsonl")
    qrels = {}
    with open(f"{dataset}/qrels/test.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.strip().split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    queries = [q for q in queries if q["_id"] in qrels]
    t = time.time()
    stemmer = Stemmer.Stemmer("english")
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    texts = [x for x in texts if x]
    kept = [d for d in corpus if (d.get("title", "") + " " + d["text"]).strip()]
    ids = [d["_id"] for d in kept]
    tokens = bm25s.tokenize(texts, stopwords=None, stemmer=stemmer, show_progress=False)
    retriever = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    retriever.index(tokens, show_progress=False)
    total = 0.0
    lines = []
    for q in queries:
        qt = bm25s.tokenize([q["text"]], stopwords=None, stemmer=stemmer, show_progress=False)
        k = min(11, len(ids))
        docs, scores = retriever.retrieve(qt, k=k, show_progress=False)
        ranked = [ids[j] for j, s in zip(docs[0].tolist(), scores[0].tolist()) if s > 0]
        ranked = [d for d in ranked if d != q["_id"]][:10]
        rel = qrels[q["_id"]]
        dcg = sum(max(rel.get(d, 0), 0) / math.log2(r + 2) for r, d in enumerate(ranked))
        ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        this = dcg / idcg if idcg > 0 else 0.0
        total += this
        lines.append(json.dumps({"query": q["_id"], "ndcg_at_10": this}))
    if per_query:
        with open(per_query, "w") as f:
            f.write("\n".join(lines) + "\n")
    print(json.dumps({"reference": "bm25s", "version": bm25s.__version__,
                      "settings": {"method": "lucene", "k1": 0.9, "b": 0.4,
                                   "stopwords": None, "stemmer": "PyStemmer english"},
                      "dataset": dataset, "queries": len(queries),
                      "ndcg_at_10": total / len(queries), "seconds": time.time() - t}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
