"""Writes the encoder exactness fixture: sentence-transformers (torch, CPU) embeddings of
varied texts with all-MiniLM-L6-v2, the reference the Burn encoder is tested against.

Run once, commit only the output (the venv is ~6 GB):
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install sentence-transformers torch
    scripts/fetch-model.sh
    /tmp/refvenv/bin/python scripts/reference/encoder_fixture.py models/all-MiniLM-L6-v2 \
        node/tests/fixtures/minilm_reference.json
"""

import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG = (
    "Dense retrieval maps queries and documents into one vector space, where nearness "
    "stands for relevance. A bi-encoder embeds each side independently, so a corpus can be "
    "encoded once, indexed with an approximate nearest-neighbour structure such as an "
    "inverted file with product quantisation, and searched in milliseconds. "
)

TEXTS = [
    # short
    "hello", "a", "ok", "Why?", "search", "cats", "x", "42",
    # ordinary sentences
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Vaccination reduces the risk of severe disease in older adults.",
    "Protein folding is determined by the amino acid sequence.",
    "Stock markets fell sharply after the announcement.",
    "Rust guarantees memory safety without a garbage collector.",
    "What is the capital of Australia?",
    "The mitochondria is the powerhouse of the cell.",
    "Aspirin inhibits platelet aggregation by blocking cyclooxygenase.",
    "I can't believe it's not butter!",
    # punctuation and symbols
    "Wait... what?!?! No way -- really??",
    "e-mail: someone@example.com; url: https://example.org/a?b=c&d=e#f",
    "(nested [brackets {and} braces]) <angle> \"quotes\" 'single'",
    "C++ vs. C# vs. F#: which one?",
    "50% off!!! $19.99 -> €17.50 (limited time)",
    "snake_case, camelCase, kebab-case & SCREAMING_CASE",
    "#hashtag @mention ~tilde ^caret |pipe| \\backslash/",
    "…ellipsis — em dash – en dash « guillemets » „low quotes“",
    # accents and other scripts
    "Café au lait, crème brûlée et pâté de campagne.",
    "Ångström, Øresund, Þingvellir, straße, naïve façade",
    "El niño comió jalapeños en la península.",
    "Zürich und München sind schöne Städte.",
    "Привет, как дела? Москва — столица России.",
    "Γειά σου κόσμε, η φιλοσοφία είναι αρχαία.",
    "東京は日本の首都です。",
    "北京是中国的首都，人口众多。",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "สวัสดีชาวโลก",
    "emoji 🚀🔥 are fun 😀👍🏽",
    "mixed 日本語 and English and русский text",
    "Ç'est l'été à Noël? Señor Müller's café.",
    # numbers
    "3.14159 2.71828 1.41421",
    "The year 1969 saw 3 astronauts travel 384,400 km.",
    "Call 555-0123 or +1 (800) 555-0199 ext. 42",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 10000 1e10 -7",
    "IPv4 192.168.0.1, version 2.0.1-beta+build.7",
    "COVID-19 cases rose 12.5% in Q3 2021 (n=4,512; p<0.001).",
    # whitespace
    "   leading and trailing spaces   ",
    "tabs\tbetween\twords",
    "line one\nline two\nline three",
    "multiple     internal      spaces",
    "\n\n\tonly a little text\n\n",
    "CRLF\r\nline endings\r\n",
    # casing
    "ALL CAPS SENTENCE ABOUT NOTHING",
    "MiXeD cAsE wOrDs",
    "lowercase words only here",
    # long: beyond 256 word pieces (truncated by the model) and near it
    LONG * 6,
    LONG * 3,
    " ".join(f"token{i}" for i in range(400)),
    "word " * 300,
    ("Mitochondrial DNA is inherited maternally and encodes 13 proteins of the "
     "respiratory chain; mutations cause diverse disorders. ") * 8,
    # code and misc
    "fn main() { println!(\"hello\"); }",
    "SELECT * FROM users WHERE id = 42;",
    "<html><body><p>Hello</p></body></html>",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "Dr. Smith et al. (2020) reported a 2-fold increase.",
    "U.S.A. vs U.K.: a 1-0 win",
]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(TEXTS, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)
    tokens = [len(model.tokenizer(t, truncation=False)["input_ids"]) for t in TEXTS]
    fixture = {
        "source": "sentence-transformers %s, torch %s, CPU; model %s (max_seq_length %d)"
        % (sentence_transformers.__version__, torch.__version__, model_dir, model.max_seq_length),
        "texts": TEXTS,
        "untruncated_tokens": tokens,
        "embeddings": [[round(float(x), 7) for x in row] for row in emb],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(TEXTS)} embeddings of dim {emb.shape[1]} to {out}; "
          f"{sum(t > 256 for t in tokens)} texts exceed 256 tokens")


if __name__ == "__main__":
    main()
