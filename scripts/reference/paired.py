"""Paired significance of two runs' per-query nDCG@10 (issue 22): files of JSON lines
{"query": id, "ndcg_at_10": x} as `shoal eval --per-query` and `bm25_reference.py`
write them, over the same judged queries. Prints one JSON line: the mean of each, the
mean difference (b - a), a two-sided paired t-test and a two-sided paired
randomisation test (sign flips, 20,000 rounds, seeded) — MEDLINE and CACM have 30 and
52 judged queries, so a difference is only read with its p-value.

    python3 scripts/reference/paired.py dense.jsonl hybrid.jsonl
"""

import json
import math
import random
import sys


def read(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["query"]: r["ndcg_at_10"] for r in rows}


def t_test(d):
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    if var == 0.0:
        return 0.0 if mean == 0 else float("inf"), 0.0 if mean else 1.0
    t = mean / math.sqrt(var / n)
    try:
        from scipy import stats

        p = 2 * stats.t.sf(abs(t), n - 1)
    except ImportError:  # normal approximation
        p = math.erfc(abs(t) / math.sqrt(2))
    return t, p


def randomisation(d, rounds=20000, seed=7):
    rng = random.Random(seed)
    observed = abs(sum(d))
    hits = 0
    for _ in range(rounds):
        s = sum(x if rng.random() < 0.5 else -x for x in d)
        if abs(s) >= observed - 1e-12:
            hits += 1
    return (hits + 1) / (rounds + 1)


def main(a_path, b_path):
    a, b = read(a_path), read(b_path)
    common = sorted(set(a) & set(b))
    if len(common) != len(a) or len(common) != len(b):
        sys.exit(f"the runs judge different queries: {len(a)}, {len(b)}, {len(common)} shared")
    d = [b[q] - a[q] for q in common]
    t, p_t = t_test(d)
    print(json.dumps({"a": a_path, "b": b_path, "queries": len(common),
                      "mean_a": sum(a[q] for q in common) / len(common),
                      "mean_b": sum(b[q] for q in common) / len(common),
                      "mean_diff": sum(d) / len(d), "t": t, "p_t_test": p_t,
                      "p_randomisation": randomisation(d)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
