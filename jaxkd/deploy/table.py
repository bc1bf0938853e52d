"""The deployment table: what each format of one model keeps and costs on this machine.

For every format given (JAX fp32 and bf16 from the params, ONNX fp32 and int8 from their files,
and in `jaxkd.bench deploy` PyTorch eager fp32 for reference), on one labelled split:

- the task's metrics, computed through the one prediction path (`jaxkd.inference.predict`, host
  batches of the split's own bucketed lengths, as `jaxkd predict` runs a model);
- agreement with a reference model's outputs on that split (the teacher, where there is one);
- the size of what is loaded (MiB);
- latency at batch 1, p50 and p95 in ms, over a fixed set of real inputs of the split (spread
  evenly over its lengths, each padded to its bucket as `jaxkd predict` pads it), after a
  warm-up pass over every input, in rounds that alternate the formats (a noisy machine slows
  them alike);
- throughput at a fixed batch size (examples/s), over batches of real inputs spread the same
  way, timed in the same alternating rounds.

Timings run from host arrays in to host arrays out, on one model copy: what a server sees.
ONNX Runtime is given every core this process may use (`threads` in the table); XLA's CPU
backend uses its own thread pool over the same cores.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxkd import data as data_lib, util
from jaxkd.data import Batch, Encoded

LATENCY_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class Format:
    """One way of running the model: `run(batch)` -> its outputs (array-like, [B, C] or
    [B, L, C]) for a host batch; `size_mb`: what is loaded, in MiB."""

    name: str
    run: Callable[[Batch], Any]
    size_mb: float


def jax_format(name: str, model_cfg, params, dtype: str) -> Format:
    """The model in JAX on this process's first device, computing in `dtype` (params fp32)."""
    from jaxkd import steps
    from jaxkd.model import param_mib

    logits = jax.jit(steps.make_logits_fn(model_cfg.replace(dtype=dtype)))
    placed = jax.device_put(params, jax.devices()[0])
    return Format(name, lambda batch: logits(placed, _model_inputs(batch)), param_mib(params))


def onnx_format(name: str, path: str | os.PathLike, threads: int | None = None) -> Format:
    """The ONNX file `path` in ONNX Runtime on the CPU (`threads`: default every core)."""
    from jaxkd.deploy import runtime

    sess = runtime.session(path, threads)
    logits = runtime.logits_fn(sess)
    return Format(name, lambda batch: logits(None, batch), pathlib.Path(path).stat().st_size / 2**20)


def _model_inputs(batch: Batch) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def spread_rows(lengths_N: np.ndarray, count: int) -> np.ndarray:
    """`count` rows (all, if fewer) spread evenly over the rows sorted by length: the short, the
    typical and the long inputs of the split alike; fixed for a split."""
    order = np.argsort(lengths_N, kind="stable")
    if len(order) <= count:
        return order
    return order[np.linspace(0, len(order) - 1, count).round().astype(int)]


def fixed_batches(encoded: Encoded, rows: np.ndarray, batch_size: int, *, bucket_multiple: int,
                  max_seq_len: int) -> list[Batch]:
    """`rows` in batches of `batch_size` (in length order, the last one possibly smaller), each
    padded to its bucket length as the prediction path pads."""
    rows = rows[np.argsort(encoded.lengths[rows], kind="stable")]
    return [data_lib.padded_batch(encoded, rows[start:start + batch_size], max_seq_len=max_seq_len,
                                  bucket_multiple=bucket_multiple)
            for start in range(0, len(rows), batch_size)]


def _percentile(ms: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    np.asarray(fn())  # the outputs on the host, as a server returns them
    return time.perf_counter() - t0


def measure(formats: Sequence[Format], *, task, encoded: Encoded, examples, split: str,
            reference: np.ndarray | None = None, reference_name: str | None = None,
            latency_inputs: int = 64, throughput_batch: int = 32, rounds: int = LATENCY_ROUNDS,
            bucket_multiple: int, max_seq_len: int, threads: int | None = None) -> dict:
    """The deployment table of `formats` on one split (`encoded`, `examples`) as a JSON-able
    dict: {"split", "rows", "threads", "latency_inputs", "throughput_batch", "rounds", "reference",
    "formats": {name: {"metrics", "agreement", "size_mb", "latency_ms": {"p50", "p95"},
    "throughput"}}}. `reference`: another model's outputs on the split (the teacher's), for
    agreement; `task`: the split's task kind (scores, agreement, outputs per token)."""
    from jaxkd import inference

    table: dict[str, Any] = {
        "split": split, "rows": len(encoded), "threads": threads or util.usable_cores(),
        "jax_device": jax.devices()[0].device_kind, "latency_inputs": 0,
        "throughput_batch": throughput_batch, "rounds": rounds, "reference": reference_name,
        "formats": {}}
    for fmt in formats:
        outputs = inference.predict(lambda params, batch, run=fmt.run: run(batch), None, encoded,
                                    batch_size=throughput_batch, mesh=None,
                                    bucket_multiple=bucket_multiple, max_seq_len=max_seq_len,
                                    per_token=task.outputs_per_token)
        entry = {"metrics": task.scores(outputs, encoded, examples), "size_mb": fmt.size_mb}
        if reference is not None:
            entry["agreement"] = task.agreement(outputs, reference, encoded, examples)
        table["formats"][fmt.name] = entry
    one = fixed_batches(encoded, spread_rows(encoded.lengths, latency_inputs), 1,
                        bucket_multiple=bucket_multiple, max_seq_len=max_seq_len)
    full = fixed_batches(encoded, spread_rows(encoded.lengths, 8 * throughput_batch),
                         throughput_batch, bucket_multiple=bucket_multiple, max_seq_len=max_seq_len)
    table["latency_inputs"] = len(one)
    table["throughput_examples"] = sum(len(b["index"]) for b in full)
    for fmt in formats:  # warm-up: every shape compiled (JAX) and every buffer allocated
        for batch in one + full:
            _timed(lambda: fmt.run(batch))
    latency: dict[str, list[float]] = {f.name: [] for f in formats}
    seconds: dict[str, list[float]] = {f.name: [] for f in formats}
    for _ in range(rounds):
        for fmt in formats:
            latency[fmt.name] += [1000 * _timed(lambda: fmt.run(batch)) for batch in one]
            seconds[fmt.name].append(sum(_timed(lambda: fmt.run(batch)) for batch in full))
    for fmt in formats:
        entry = table["formats"][fmt.name]
        entry["latency_ms"] = {"p50": _percentile(latency[fmt.name], 50),
                               "p95": _percentile(latency[fmt.name], 95)}
        entry["throughput"] = table["throughput_examples"] / float(np.median(seconds[fmt.name]))
    return table


def markdown(table: Mapping[str, Any]) -> list[str]:
    """The table as Markdown lines (a heading, a sentence of method, the rows)."""
    formats = table["formats"]
    first = next(iter(formats.values()))
    metric = next(iter(first["metrics"]))
    has_agreement = "agreement" in first
    head = ["format", f"{metric} ({table['split']})"]
    if has_agreement:
        head.append(f"agreement with the {table['reference']}")
    head += ["size (MiB)", "batch-1 p50 (ms)", "batch-1 p95 (ms)",
             f"throughput at batch {table['throughput_batch']} (ex/s)"]
    lines = ["## Deployment", "",
             f"Each format on the {table['split']} split ({table['rows']} rows): the metric "
             f"over all of it; latency at batch 1 over {table['latency_inputs']} of its inputs "
             f"spread over their lengths and throughput over {table['throughput_examples']}, in "
             f"{table['rounds']} alternating rounds after a warm-up; {table['threads']} threads, "
             f"JAX on {table['jax_device']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in formats.items():
        row = [name, f"{entry['metrics'][metric]:.4f}"]
        if has_agreement:
            agreement = entry["agreement"]
            row.append(", ".join(f"{k} {v:.4f}" for k, v in agreement.items())
                       if isinstance(agreement, dict) else f"{agreement:.4f}")
        row += [f"{entry['size_mb']:.1f}", f"{entry['latency_ms']['p50']:.2f}",
                f"{entry['latency_ms']['p95']:.2f}", f"{entry['throughput']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def plot(table: Mapping[str, Any], path: pathlib.Path) -> None:
    """deployment.png: the metric and the batch-1 p50 latency of each format."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table["formats"])
    entries = [table["formats"][n] for n in names]
    metric = next(iter(entries[0]["metrics"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(names, [e["metrics"][metric] for e in entries], color="#3a7")
    axes[0].set(title=f"{metric} ({table['split']})")
    axes[1].bar(names, [e["latency_ms"]["p50"] for e in entries], color="#37a")
    axes[1].set(title="latency, batch 1, p50 (ms)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
