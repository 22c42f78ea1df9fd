"""The PyTorch side of the GPU encoder benchmark (run on a lent GPU machine by
scripts/device/encoder-gpu.sh, before shoal-gpu-bench).

The real all-MiniLM-L6-v2 weights are too large to carry to that machine, so this
builds the same architecture from the model dir's config.json with seeded random
weights and writes them as model.safetensors into that dir; Burn then loads exactly
these. It embeds the exactness texts on the CPU in fp32 (the reference the CUDA
outputs are checked against), then times Hugging Face's BertModel on the GPU in fp32
and fp16 at the batch sizes and lengths shoal-gpu-bench uses, each call including the
host-to-device copy of the ids, mean pooling, L2 normalisation and the read-back.
"""

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel


def pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    v = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(v.float(), dim=-1)


def run(model, ids, mask, device):
    ids_d = ids.to(device)
    mask_d = mask.to(device)
    hidden = model(input_ids=ids_d, attention_mask=mask_d).last_hidden_state
    return pool(hidden, mask_d).cpu()


def random_ids(gen, batch, length, vocab):
    ids = torch.randint(1000, vocab, (batch, length), generator=gen)
    ids[:, 0] = 101
    ids[:, -1] = 102
    return ids, torch.ones_like(ids)


def throughput(model, ids, mask, min_secs):
    for _ in range(3):
        run(model, ids, mask, "cuda")
    start = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - start < min_secs:
        run(model, ids, mask, "cuda")
        calls += 1
    return calls * ids.shape[0] / (time.perf_counter() - start)


def latency(model, ids, mask, runs):
    for _ in range(20):
        run(model, ids, mask, "cuda")
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        run(model, ids, mask, "cuda")
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    pct = lambda p: ms[round((len(ms) - 1) * p)]
    return pct(0.50), pct(0.99)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--texts", required=True, help="JSON with a 'texts' list")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--doc-len", type=int, default=256)
    ap.add_argument("--query-len", type=int, default=16)
    ap.add_argument("--min-secs", type=float, default=2.0)
    ap.add_argument("--latency-runs", type=int, default=300)
    a = ap.parse_args()

    cfg = BertConfig.from_json_file(os.path.join(a.model_dir, "config.json"))
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(a.model_dir, "model.safetensors"),
    )

    with open(os.path.join(a.model_dir, "sentence_bert_config.json")) as f:
        max_len = json.load(f)["max_seq_length"]
    tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding()
    with open(a.texts) as f:
        texts = json.load(f)["texts"]
    vectors = []
    with torch.inference_mode():
        for i in range(0, len(texts), 16):
            enc = tok.encode_batch(texts[i : i + 16])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            vectors.extend(run(model, ids, mask, "cpu").tolist())

    batches = [int(b) for b in a.batches.split(",")]
    gen = torch.Generator().manual_seed(7)
    results = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            m = BertModel(cfg, add_pooling_layer=False).eval()
            m.load_state_dict(model.state_dict())
            m = m.to("cuda", dtype=dtype)
            r = {}
            for b in batches:
                ids, mask = random_ids(gen, b, a.doc_len, cfg.vocab_size)
                r[f"b{b}"] = throughput(m, ids, mask, a.min_secs)
                print(f"torch {name} batch {b:>4} x {a.doc_len}: {r[f'b{b}']:.1f} texts/s", flush=True)
            ids, mask = random_ids(gen, 1, a.query_len, cfg.vocab_size)
            r["p50_ms"], r["p99_ms"] = latency(m, ids, mask, a.latency_runs)
            print(f"torch {name} query: p50 {r['p50_ms']:.3f} ms p99 {r['p99_ms']:.3f} ms", flush=True)
            results[name] = r
            del m
            torch.cuda.empty_cache()

    out = {
        "texts": texts,
        "vectors": vectors,
        "batches": batches,
        "doc_len": a.doc_len,
        "query_len": a.query_len,
        "results": results,
        "device": torch.cuda.get_device_name(),
        "torch": f"{torch.__version__}, attention sdpa, "
        f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}",
    }
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
