"""Deployment formats of an exported student, side by side on this machine: the task metric of
the JAX model, ONNX fp32 and ONNX int8 (`jaxkd export --onnx --int8`) on a labelled split, and
latency at batch 1 over real inputs of that split for ONNX fp32, ONNX int8 and PyTorch eager
fp32 (transformers on the same directory), measured in alternating rounds.

    python scripts/deployment_check.py MODEL_DIR --task sst2 --data FILE --out results/deploy/X.json

Writes a JSON record: metric per format, file sizes, p50/p95 latency (ms) per format, the
thread count, and the int8-against-PyTorch speed ratio.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxkd import data as data_lib  # noqa: E402
from jaxkd import exported, util  # noqa: E402
from jaxkd.deploy import export as deploy_export  # noqa: E402
from jaxkd.deploy import runtime  # noqa: E402


def _percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("--task", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--inputs", type=int, default=64, help="real inputs timed at batch 1")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import torch
    import transformers

    threads = runtime.cpu_threads()
    torch.set_num_threads(threads)
    work = pathlib.Path(tempfile.mkdtemp(prefix="deploy_"))
    written = deploy_export.export_directory(args.model_dir, work, int8=True)
    fp32, int8 = written
    info = exported.inspect_model(args.model_dir)
    settings = exported.run_settings(info, {}, columns=True)
    data_cfg = settings.data_config()
    task = exported.model_task(info, data_cfg=data_cfg, defaults=settings.values)
    task = task.for_teacher(info.directory)

    record = {"model_dir": args.model_dir, "task": args.task, "data": args.data,
              "threads": threads, "formats": {}}
    from jaxkd import tasks
    task_eval = tasks.resolve(tasks.task_config(name=args.task), data_cfg)
    for name, model in (("jax_fp32", info), ("onnx_fp32", exported.inspect_model(fp32)),
                        ("onnx_int8", exported.inspect_model(int8))):
        started = time.perf_counter()
        scores = exported.evaluate_model(model, task_eval, data_cfg, args.data)
        record["formats"][name] = {"metrics": scores, "eval_seconds": time.perf_counter() - started}
    weights = info.directory / "model.safetensors"
    record["formats"]["jax_fp32"]["size_mb"] = weights.stat().st_size / 2**20
    record["formats"]["onnx_fp32"]["size_mb"] = fp32.stat().st_size / 2**20
    record["formats"]["onnx_int8"]["size_mb"] = int8.stat().st_size / 2**20

    # Batch-1 inputs: `inputs` rows spread evenly over the split's lengths, each at its own length.
    examples, _ = exported.load_input(task_eval, data_cfg, args.data, require_labels=False)
    tokenizer = exported.load_tokenizer(info, data_cfg.max_seq_len, words=task_eval.pretokenized)
    encoded = task_eval.encode(examples, tokenizer, data_cfg.max_seq_len)
    batches = list(data_lib.EvalBatches(encoded, 1, bucket_multiple=1,
                                        max_seq_len=data_cfg.max_seq_len))
    batches = batches[:: max(1, len(batches) // args.inputs)][: args.inputs]
    inputs = [(np.asarray(b["input_ids"], np.int64), np.asarray(b["attention_mask"], np.int64),
               np.asarray(b["token_type_ids"], np.int64)) for b in batches]
    sessions = {"onnx_fp32": runtime.session(fp32, threads), "onnx_int8": runtime.session(int8, threads)}
    kind = info.head_kind
    auto = {"sequence": transformers.AutoModelForSequenceClassification,
            "token": transformers.AutoModelForTokenClassification,
            "span": transformers.AutoModelForQuestionAnswering}[kind]
    torch_model = auto.from_pretrained(str(info.directory)).eval()
    uses_types = "token_type_ids" in [i.name for i in sessions["onnx_fp32"].get_inputs()]

    def torch_run(ids, mask, types):
        feed = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if uses_types:
            feed["token_type_ids"] = torch.from_numpy(types)
        with torch.no_grad():
            return torch_model(**feed)

    runners = {"onnx_fp32": lambda *x: runtime.run(sessions["onnx_fp32"], *x),
               "onnx_int8": lambda *x: runtime.run(sessions["onnx_int8"], *x),
               "torch_eager_fp32": torch_run}
    times = {name: [] for name in runners}
    for name, fn in runners.items():  # warm-up
        for x in inputs[:8]:
            fn(*x)
    for _ in range(args.rounds):
        for name, fn in runners.items():
            for x in inputs:
                t0 = time.perf_counter()
                fn(*x)
                times[name].append(1000 * (time.perf_counter() - t0))
    record["latency_batch1_ms"] = {name: {"p50": _percentile(t, 50), "p95": _percentile(t, 95),
                                          "median_of_rounds": statistics.median(t)}
                                   for name, t in times.items()}
    lat = record["latency_batch1_ms"]
    record["int8_speedup_vs_torch_eager_fp32_p50"] = lat["torch_eager_fp32"]["p50"] / lat["onnx_int8"]["p50"]
    record["onnx_fp32_speedup_vs_torch_eager_fp32_p50"] = lat["torch_eager_fp32"]["p50"] / lat["onnx_fp32"]["p50"]
    primary = next(iter(record["formats"]["jax_fp32"]["metrics"]))
    record["int8_retention"] = (record["formats"]["onnx_int8"]["metrics"][primary]
                                / record["formats"]["onnx_fp32"]["metrics"][primary])
    import platform
    record["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": threads}
    out = pathlib.Path(args.out)
    util.write_atomic(out, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
