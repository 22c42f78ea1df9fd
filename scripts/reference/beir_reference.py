"""The sentence-transformers reference for `shoal eval`'s nDCG@10 (docs/benchmarks.md):
a model dir (loaded from disk, never a hub) encodes a BEIR dataset's corpus and queries
("title text" as shoal ingests them), exact cosine search, nDCG@10 as BEIR computes it
(graded qrels, a query's own id left out). Prints one JSON line.

    /tmp/refvenv/bin/python scripts/reference/beir_reference.py models/all-mpnet-base-v2 \
        ../shared/data/ir/cranfield
"""

import json
import math
import sys
import time

import torch
from sentence_transformers import SentenceTransformer


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(model_dir, dataset):
    torch.set_num_threads(2)
    corpus = read_jsonl(f"{dataset}/corpus.jsonl")
    queries = read_jsonl(f"{dataset}/queries.jsonl")
    qrels = {}
    with open(f"{dataset}/qrels/test.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.strip().split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    queries = [q for q in queries if q["_id"] in qrels]
    model = SentenceTransformer(model_dir, device="cpu")
    t = time.time()
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    docs = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_tensor=True)
    qv = model.encode([q["text"] for q in queries], batch_size=32, normalize_embeddings=True,
                      convert_to_tensor=True)
    scores = qv @ docs.T
    ids = [d["_id"] for d in corpus]
    total = 0.0
    for i, q in enumerate(queries):
        order = torch.argsort(scores[i], descending=True)[:11].tolist()
        ranked = [ids[j] for j in order if ids[j] != q["_id"]][:10]
        rel = qrels[q["_id"]]
        # Linear gains, as trec_eval (and so BEIR's pytrec_eval) and shoal eval compute.
        dcg = sum(max(rel.get(d, 0), 0) / math.log2(r + 2) for r, d in enumerate(ranked))
        ideal = sorted((g for g in rel.values() if g > 0), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        total += dcg / idcg if idcg > 0 else 0.0
    print(json.dumps({"reference": "sentence-transformers", "model": model_dir,
                      "dataset": dataset, "queries": len(queries),
                      "ndcg_at_10": total / len(queries), "seconds": time.time() - t}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
