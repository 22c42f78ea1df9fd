#!/usr/bin/env bash
# Retrieval modes through a local cluster (issue 22): each BEIR collection in
# ../shared/data/ir ingested once into `shoal dev` (3 shards, encoded on the nodes,
# exact scan), then scored in every mode — dense, lexical (BM25), hybrid (RRF and
# linear), dense + PRF, hybrid + PRF — each query's nDCG@10 kept for paired tests,
# next to the bm25s reference on the same text (`scripts/reference/bm25_reference.py`,
# its venv at $BM25_VENV, default /tmp/bm25venv: `pip install bm25s PyStemmer scipy`),
# and each mode's paired difference to dense and to BM25 (`paired.py`). Output: JSON
# lines, tagged; per-query files under $SHOAL_EVAL_DIR/per-query.
# Usage: scripts/evals-modes.sh [COLLECTION...]   (default: scifact medline cacm cranfield)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
shoal="$CARGO_TARGET_DIR/release/shoal"
ir="${SHOAL_IR_DIR:-../shared/data/ir}"
venv="${BM25_VENV:-/tmp/bm25venv}"
data="${SHOAL_EVAL_DIR:-$(mktemp -d)}"; mkdir -p "$data/per-query"
sets=("$@"); [[ ${#sets[@]} -gt 0 ]] || sets=(scifact medline cacm cranfield)
start_dev "$data" "$data/dev.log"
modes=(
  "dense|--mode dense"
  "lexical|--mode lexical"
  "hybrid-rrf|--mode hybrid --fusion rrf"
  "hybrid-linear|--mode hybrid --fusion linear"
  "dense-prf|--mode dense --prf"
  "hybrid-rrf-prf|--mode hybrid --fusion rrf --prf"
)
for s in "${sets[@]}"; do
  pq="$data/per-query/$s"
  ref=$("$venv/bin/python" scripts/reference/bm25_reference.py "$ir/$s" "$pq.bm25s.jsonl" | tail -1)
  echo "{\"run\":\"bm25s\",\"collection\":\"$s\",\"result\":$ref}"
  for m in "${modes[@]}"; do
    name="${m%%|*}"; flags="${m#*|}"
    # shellcheck disable=SC2086
    out=$("$shoal" eval "$ir/$s" --collection "$s" $flags --per-query "$pq.$name.jsonl" | tail -1)
    echo "{\"run\":\"$name\",\"collection\":\"$s\",\"result\":$out}"
  done
  for m in "${modes[@]}"; do
    name="${m%%|*}"
    [[ $name == dense ]] || echo "{\"run\":\"paired\",\"collection\":\"$s\",\"vs\":\"dense\",\"mode\":\"$name\",\"result\":$("$venv/bin/python" scripts/reference/paired.py "$pq.dense.jsonl" "$pq.$name.jsonl")}"
    echo "{\"run\":\"paired\",\"collection\":\"$s\",\"vs\":\"bm25s\",\"mode\":\"$name\",\"result\":$("$venv/bin/python" scripts/reference/paired.py "$pq.bm25s.jsonl" "$pq.$name.jsonl")}"
  done
done
