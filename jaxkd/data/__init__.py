"""Task-independent data: reading files and Hub splits, encoded splits, and fixed-shape,
length-bucketed, resumable batches.

Pipeline: a task (`jaxkd.tasks`) reads and validates a split (`read_split`) and encodes it
into an `Encoded` (token ids back to back, cached on disk with `cached_arrays`) ->
`TrainBatches` (infinite, shuffled, bucketed, resumable), `MixedBatches` (the same with
transfer rows in every batch) or `EvalBatches` (every row once) ->
`jaxkd.sharding.global_batch` (jax Arrays over a mesh, each process giving its own rows).
The keys, shapes and dtypes of a batch are in `jaxkd.data.batches`.

Modules, each importing only those above it:
  config    DataConfig (YAML section `data`), DataError, FORMATS, nearest, holdout, sample_rows
  read      Table and the readers: read_split -> read_file (local) or read_hub
  encoded   Encoded, with_transfer, tokenizer facts, the token cache (content_key, cached_arrays)
  batches   the batch layout, bucket lengths, TrainBatches, MixedBatches, EvalBatches
Raw text for general distillation (imported by their module name, not re-exported):
  rawtext   text files as sources of documents (plain, gzip, JSONL, Parquet), checked up front
  corpus    tokenized once into memory-mapped shards (resumable), packed into fixed-length rows
  masking   masked-LM targets drawn from (seed, step, row)
  masked    masked training and held-out batches of packed rows
This package re-exports the public names of the first four: import them from `jaxkd.data`.
"""
from jaxkd.data.config import FORMATS, DataConfig, DataError, holdout, nearest, sample_rows
from jaxkd.data.read import (LOCAL_SUFFIXES, Table, check_columns, file_format, is_local_path,
                             read_file, read_hub, read_split)
from jaxkd.data.encoded import (Encoded, ReadOnlyDir, cache_location, cached_arrays, content_key,
                                flatten, gives_token_types, offsets_of, special_tokens_around,
                                tokenize_rows, tokenizer_fingerprint, with_transfer)
from jaxkd.data.batches import (Batch, EvalBatches, MixedBatches, PaddingStats, TokenGather,
                                TrainBatches, batch_rows, bucket_lengths, epoch_order, make_batch,
                                padded_batch, padding_stats, transfer_batch_size)

__all__ = [
    "FORMATS", "DataConfig", "DataError", "holdout", "nearest", "sample_rows",
    "LOCAL_SUFFIXES", "Table", "check_columns", "file_format", "is_local_path", "read_file",
    "read_hub", "read_split",
    "Encoded", "ReadOnlyDir", "cache_location", "cached_arrays", "content_key", "flatten",
    "gives_token_types", "offsets_of", "special_tokens_around", "tokenize_rows",
    "tokenizer_fingerprint", "with_transfer",
    "Batch", "EvalBatches", "MixedBatches", "PaddingStats", "TokenGather", "TrainBatches",
    "batch_rows", "bucket_lengths", "epoch_order", "make_batch", "padded_batch", "padding_stats",
    "transfer_batch_size",
]
