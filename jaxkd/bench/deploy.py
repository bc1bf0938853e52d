"""`bench deploy`: the deployment table (`jaxkd.deploy.table`, what a run's report holds) of
any model directory on a labelled file, with PyTorch eager fp32 beside it for reference.

    python -m jaxkd.bench deploy MODEL_DIR --task sst2 --data glue_dev.tsv [--teacher DIR]
        [--torch] [--per-tensor] [--gather] [--full-range] [--inputs 64] [--rounds 5] [--out results/deploy/X.json]

The formats: JAX fp32 and bf16 from the directory's weights; ONNX fp32 and int8 written into a
temporary directory (`jaxkd.deploy.export`, as `jaxkd export --onnx --int8`); with
`--per-tensor`, int8 with one scale per weight matrix as well (the int8 file has one per output
channel); with `--full-range`, int8 with 8-bit weights (the int8 file's use 7,
`jaxkd.deploy.quantize`); with `--gather`, int8 with the embedding tables quantised as well;
with `--torch`,
transformers' model of the directory in eager PyTorch fp32 (not for sentence embedders).
Agreement is with `--teacher`'s outputs where given. Everything runs in this process, timed in
alternating rounds (`table.measure`); the record names the CPU and the thread count.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

from jaxkd import exported, util
from jaxkd.bench.common import machine_description
from jaxkd.deploy import table


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=pathlib.Path, help="a model directory jaxkd reads")
    p.add_argument("--task", required=True, help="the data's task preset (sst2, conll2003, squad, sts, ...)")
    p.add_argument("--data", required=True, help="labelled examples: the split the metric is reported on")
    p.add_argument("--teacher", type=pathlib.Path, default=None,
                   help="a model directory of the same task: agreement with its outputs")
    p.add_argument("--torch", action="store_true", help="PyTorch eager fp32 (transformers) as well")
    p.add_argument("--per-tensor", action="store_true",
                   help="also int8 with one scale per weight matrix (onnx_int8_per_tensor)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="default: the length the directory records (its training run's), else 128")
    p.add_argument("--full-range", action="store_true",
                   help="also int8 with full-range (8-bit) weights (onnx_int8_full_range); the "
                        "int8 file's use 7 bits")
    p.add_argument("--gather", action="store_true",
                   help="also int8 with the embedding tables quantised too (onnx_int8_gather)")
    p.add_argument("--inputs", type=int, default=64, help="real inputs timed at batch 1")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--out", type=pathlib.Path, default=None, help="write the record as JSON here")


def _loaded(directory: pathlib.Path, task_name: str, data: str, *, max_seq_len: int | None = None,
            data_cfg=None):
    """The model of `directory`, the task of `task_name` read for it, the data config (default:
    the one the directory records, `max_seq_len` winning), the labelled split encoded with its
    tokenizer, and its output columns in the task's order."""
    from jaxkd import tasks

    info = exported.inspect_model(directory)
    data_cfg = data_cfg or exported.run_settings(info, {"max_seq_len": max_seq_len}).data_config()
    task = tasks.resolve(tasks.task_config(name=task_name), data_cfg).for_teacher(info.directory)
    order = exported.label_order(task, info)
    tokenizer = exported.load_tokenizer(info, data_cfg.max_seq_len, words=task.pretokenized)
    model = exported.load_model(info, tokenizer, None, task)
    examples, _ = exported.load_input(task, data_cfg, data, require_labels=True)
    encoded = task.encode(examples, tokenizer, data_cfg.max_seq_len)
    return model, task, data_cfg, examples, encoded, order


def _reordered(fmt: table.Format, order: np.ndarray | None) -> table.Format:
    if order is None:
        return fmt
    return table.Format(fmt.name, lambda batch: np.asarray(fmt.run(batch))[..., order], fmt.size_mb)


def torch_format(model, threads: int) -> table.Format:
    """transformers' model of the directory (its family's class of the head), eager, fp32."""
    import torch
    import transformers

    from jaxkd.deploy import graph

    spec = model.config.head.spec
    if spec.bare:
        raise SystemExit(f"--torch: a {spec.kind} head has no transformers class of its own; "
                         "leave --torch out")
    torch.set_num_threads(threads)
    auto = getattr(transformers, f"AutoModel{spec.hf_suffix}")
    net = auto.from_pretrained(str(model.info.directory)).eval()
    names = graph.input_names(model.config)

    def run(batch):
        feed = {name: torch.from_numpy(np.asarray(batch[name], np.int64)) for name in names}
        with torch.no_grad():
            out = net(**feed)
        if getattr(out, "start_logits", None) is not None:  # span heads: jaxkd's [B, L, 2]
            return torch.stack([out.start_logits, out.end_logits], -1).numpy()
        return out.logits.numpy()

    size = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return table.Format("torch_eager_fp32", run, size)


def run_deploy(a: argparse.Namespace) -> dict:
    from jaxkd import deploy
    from jaxkd.deploy import export as deploy_export, quantize

    deploy.require()
    model, task, data_cfg, examples, encoded, order = _loaded(a.model_dir, a.task, a.data,
                                                              max_seq_len=a.max_seq_len)
    threads = util.usable_cores()
    reference = None
    if a.teacher is not None:
        teacher, _, teacher_data, _, teacher_encoded, teacher_order = _loaded(a.teacher, a.task,
                                                                              a.data, data_cfg=data_cfg)
        if not np.array_equal(teacher_encoded.input_ids, encoded.input_ids):
            raise SystemExit(f"--teacher {a.teacher} tokenizes {a.data} differently from "
                             f"{a.model_dir}: agreement needs the same rows")
        reference = exported.model_outputs(
            teacher, teacher_encoded, per_token=task.outputs_per_token,
            batch_size=teacher_data.batch_size, max_seq_len=teacher_data.max_seq_len,
            bucket_multiple=teacher_data.bucket_multiple)
        if teacher_order is not None:
            reference = reference[..., teacher_order]
    with tempfile.TemporaryDirectory(prefix="jaxkd-deploy-") as tmp:
        fp32, int8 = deploy_export.write(model.config, model.params, tmp, int8=True)
        formats = [table.jax_format("jax_fp32", model.config, model.params, "float32"),
                   table.jax_format("jax_bf16", model.config, model.params, "bfloat16"),
                   table.onnx_format("onnx_fp32", fp32, threads),
                   table.onnx_format("onnx_int8", int8, threads)]
        if a.per_tensor:
            per_tensor = quantize.quantize_int8(fp32, pathlib.Path(tmp) / "model.int8.per_tensor.onnx",
                                                per_channel=False)
            formats.append(table.onnx_format("onnx_int8_per_tensor", per_tensor, threads))
        if a.full_range:
            full = quantize.quantize_int8(fp32, pathlib.Path(tmp) / "model.int8.full_range.onnx",
                                          reduce_range=False)
            formats.append(table.onnx_format("onnx_int8_full_range", full, threads))
        if a.gather:
            gather = quantize.quantize_int8(fp32, pathlib.Path(tmp) / "model.int8.gather.onnx",
                                            op_types=("MatMul", "Gather"))
            formats.append(table.onnx_format("onnx_int8_gather", gather, threads))
        if a.torch:
            formats.append(torch_format(model, threads))
        result = table.measure([_reordered(f, order) for f in formats], task=task, encoded=encoded,
                               examples=examples, split=pathlib.Path(a.data).name, reference=reference,
                               reference_name=None if a.teacher is None else "teacher",
                               latency_inputs=a.inputs, throughput_batch=a.throughput_batch,
                               rounds=a.rounds, bucket_multiple=data_cfg.bucket_multiple,
                               max_seq_len=data_cfg.max_seq_len, threads=threads)
    lat = {name: entry["latency_ms"]["p50"] for name, entry in result["formats"].items()}
    record = {"model_dir": str(a.model_dir), "task": a.task, "data": a.data,
              "teacher": None if a.teacher is None else str(a.teacher),
              "machine": machine_description(), **result}
    if "torch_eager_fp32" in lat:
        record["p50_speedup_vs_torch_eager_fp32"] = {name: lat["torch_eager_fp32"] / ms
                                                     for name, ms in lat.items()}
    primary = task.metrics[0]
    fp32_metric = result["formats"]["onnx_fp32"]["metrics"][primary]
    record["int8_retention"] = {name: entry["metrics"][primary] / fp32_metric
                                for name, entry in result["formats"].items()
                                if name.startswith("onnx_int8") and fp32_metric}
    print("\n".join(table.markdown(result)))
    for key in ("p50_speedup_vs_torch_eager_fp32", "int8_retention"):
        if key in record:
            print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in record[key].items()))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        util.write_atomic(a.out, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
        print(f"wrote {a.out}", file=sys.stderr)
    return record
