"""Logging sinks and the teacher-against-student report (JSON, Markdown, PNG plots)."""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np



class MetricsSink:
    """metrics.jsonl (one JSON object per row) plus TensorBoard events; process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = f"{row.get('stage', 'run')}/{row.get('split', 'train')}"
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, row.get("step", 0))

    def truncate(self, stage: str, step: int) -> None:
        """Drop a stage's rows after `step`: a resumed run writes them again."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r.get("stage") != stage or r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _Progress:
    def __init__(self, stage: str, total: int, start: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True)
        self._at = start

    def update(self, step: int, loss: float, examples_per_second: float) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._at)
        self._at = step
        self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_second:.0f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(stage: str, total: int, start: int, enabled: bool) -> _Progress:
    """A progress bar with loss, examples per second and time left (tqdm's estimate)."""
    return _Progress(stage, total, start, enabled)


def _time(fn: Callable, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_speed(logits_fn: Callable, params, batch_size: int, seq_len: int,
                  repeats: int = 5) -> dict:
    """Median latency at batch 1 and throughput at `batch_size`, `seq_len` tokens, one device.

    `logits_fn(params, batch)` is jitted here, without shardings: serving runs one model copy.
    """
    fn = jax.jit(logits_fn)
    params = jax.device_put(params, jax.devices()[0])

    def batch(b):
        ids = np.full((b, seq_len), 1000, np.int32)
        return jax.device_put({"input_ids": ids, "attention_mask": np.ones_like(ids),
                               "token_type_ids": np.zeros_like(ids)}, jax.devices()[0])

    one, full = batch(1), batch(batch_size)
    latency = _time(lambda: fn(params, one), repeats)
    per_batch = _time(lambda: fn(params, full), repeats)
    return {"latency_ms": 1000 * latency, "throughput": batch_size / per_batch,
            "speed_seq_len": seq_len, "device": jax.devices()[0].device_kind}


def build_report(cfg, task, models: dict, agreement: dict) -> dict:
    """teacher/student entries with metrics, retention, agreement (per split) and speed-up."""
    from jaxkd.config import to_dict
    teacher, student = models["teacher"], models["student"]
    retention = {k: (student["metrics"][k] / teacher["metrics"][k] if teacher["metrics"].get(k) else None)
                 for k in student["metrics"]}
    return {
        "task": task.name,
        "task_type": task.type,
        "metric_names": list(task.metrics),
        "report_split": "test" if "test" in teacher["splits"] else "eval",
        "teacher": {**teacher, "model": cfg.teacher.model},
        "student": {**student, "init": cfg.student.init},
        "retention": retention,
        "agreement": agreement,
        "speedup": teacher["latency_ms"] / student["latency_ms"],
        "throughput_ratio": student["throughput"] / teacher["throughput"],
        "compression": teacher["params"] / student["params"],
        "distill": to_dict(cfg.distill),
        "student_config": to_dict(cfg.student),
        "seed": cfg.seed,
    }


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def report_markdown(report: dict) -> str:
    t, s = report["teacher"], report["student"]
    rows = [("parameters", t["params"], s["params"]),
            ("size (MiB, fp32)", t["size_mb"], s["size_mb"]),
            ("layers x hidden", f"{t['layers']} x {t['hidden_size']}", f"{s['layers']} x {s['hidden_size']}")]
    for split in ("eval", "test"):
        for name in t["splits"].get(split, {}):
            rows.append((f"{name} ({split})", t["splits"][split][name], s["splits"][split][name]))
    rows += [(f"latency, batch 1 x {t['speed_seq_len']} (ms)", t["latency_ms"], s["latency_ms"]),
             ("throughput (examples/s)", t["throughput"], s["throughput"])]
    lines = [f"# Distillation report: {report['task']}", "",
             f"Teacher `{t['model']}`, student init `{s['init']}`, device {t['device']}.", "",
             "| | teacher | student |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} |" for name, a, b in rows]
    lines += ["", f"Retention ({report['report_split']}): "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in report["retention"].items()),
              "Agreement with the teacher: "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in report["agreement"].items()),
              f"Speed-up at batch 1: {report['speedup']:.2f}x; compression {report['compression']:.2f}x.", ""]
    return "\n".join(lines)


def _plots(report: dict, workdir: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = workdir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage in sorted({r.get("stage") for r in rows}):
        train = [r for r in rows if r.get("stage") == stage and "loss" in r]
        evals = [r for r in rows if r.get("stage") == stage and r.get("split") == "eval"]
        if train:
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=stage)
        if evals:
            name = report["metric_names"][0]
            axes[1].plot([r["step"] for r in evals], [r.get(name) for r in evals], "o-", label=stage)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title=f"eval {report['metric_names'][0]}", xlabel="step")
    for ax in axes:
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "training_curves.png", dpi=100)
    plt.close(fig)

    name = report["metric_names"][0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    who = ["teacher", "student"]
    axes[0].bar(who, [report[w]["metrics"].get(name, 0.0) for w in who], color=["#888", "#3a7"])
    axes[0].set(title=f"{name} ({report['report_split']})")
    axes[1].bar(who, [report[w]["latency_ms"] for w in who], color=["#888", "#3a7"])
    axes[1].set(title="latency, batch 1 (ms)")
    fig.tight_layout()
    fig.savefig(workdir / "teacher_vs_student.png", dpi=100)
    plt.close(fig)


def write_report(report: dict, workdir: pathlib.Path, plots: bool = True) -> None:
    workdir = pathlib.Path(workdir)
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (workdir / "report.md").write_text(report_markdown(report))
    if plots:
        _plots(report, workdir)
