"""Logging sinks and the teacher-against-student report (JSON, Markdown, PNG plots), with the
deployment table of the student's formats where the run measured one (`jaxkd.deploy.table`)."""
from __future__ import annotations

import json
import logging
import math
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxkd import util
from jaxkd.data import make_batch
from jaxkd.deploy import table as deploy_table

log = logging.getLogger("jaxkd")


METRICS = "metrics.jsonl"  # a workdir's metric rows, one JSON object a line


class MetricsSink:
    """metrics.jsonl (one JSON object per row) plus TensorBoard events; process 0 only."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS
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
        write_metrics(self.path.parent, [r for r in read_metrics(self.path.parent)
                                         if r.get("stage") != stage or r.get("step", 0) <= step])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


_PLAIN_EVERY_S = 30.0  # with output to a file or a pipe: one progress line this often


def _interactive() -> bool:
    return sys.stderr.isatty()


class _Progress:
    """tqdm on a terminal; in a log file or a pipe, a plain line every `_PLAIN_EVERY_S` seconds
    (a bar's carriage returns would pile up on one line of the log)."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool):
        self._bar, self._plain = None, enabled and not _interactive()
        if enabled and not self._plain:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True)
        self._stage, self._total, self._at = stage, total, start
        self._started, self._last_line = time.perf_counter(), 0.0
        self._start = start

    def update(self, step: int, loss: float, examples_per_second: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._at)
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_second:.0f}")
        elif self._plain:
            now = time.perf_counter()
            if now - self._last_line >= _PLAIN_EVERY_S or step == self._total:
                self._last_line = now
                done = max(step - self._start, 1)
                left = (now - self._started) / done * (self._total - step)
                print(f"{self._stage}: step {step}/{self._total} loss {loss:.4f} "
                      f"{examples_per_second:.0f} ex/s, {left / 60:.1f} min left",
                      file=sys.stderr, flush=True)
        self._at = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(stage: str, total: int, start: int, enabled: bool) -> _Progress:
    """A progress bar with loss, examples per second and time left."""
    return _Progress(stage, total, start, enabled)


def progress_iter(iterable, desc: str, enabled: bool):
    """Iterate with a bar on a terminal; elsewhere a plain line every `_PLAIN_EVERY_S` seconds."""
    if not enabled:
        yield from iterable
        return
    if _interactive():
        from tqdm import tqdm
        yield from tqdm(iterable, desc=desc, leave=False)
        return
    total = len(iterable) if hasattr(iterable, "__len__") else None
    last = time.perf_counter()
    for i, item in enumerate(iterable):
        if time.perf_counter() - last >= _PLAIN_EVERY_S:
            last = time.perf_counter()
            print(f"{desc}: {i}/{total if total is not None else '?'} batches", file=sys.stderr,
                  flush=True)
        yield item


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
        return jax.device_put(make_batch(ids, np.ones_like(ids), np.zeros_like(ids),
                                         np.zeros(b, np.int32), np.ones(b)), jax.devices()[0])

    one, full = batch(1), batch(batch_size)
    latency = _time(lambda: fn(params, one), repeats)
    per_batch = _time(lambda: fn(params, full), repeats)
    return {"latency_ms": 1000 * latency, "throughput": batch_size / per_batch,
            "speed_seq_len": seq_len, "device": jax.devices()[0].device_kind}


NOT_CODE = ("results", "docs")  # tracked folders whose changes do not change what code ran


def code_version(root: str | pathlib.Path | None = None) -> dict:
    """What code wrote a report: the package version, and the git commit of the checkout it was
    imported from with whether tracked files outside `NOT_CODE` differed from it (both None when
    it is not a git checkout, e.g. an installed wheel, or git is missing)."""
    import jaxkd  # pylint: disable=import-outside-toplevel
    root = pathlib.Path(root) if root is not None else pathlib.Path(jaxkd.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # Only a checkout whose top is this package's parent counts: an installed copy inside some
    # other repository must not report that repository's commit.
    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and pathlib.Path(top).resolve() == root.resolve() else None
    # Results and docs are not code: a report copied into results/ by an earlier run of a batch
    # must not mark the next run's code as modified.
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){d}" for d in NOT_CODE)) if commit else None
    return {"version": jaxkd.__version__, "commit": commit,
            "modified": None if changes is None else bool(changes)}


def _distill_summary(distill, steps_run: int | None) -> dict:
    """The distill section as it was run: `epochs` left out where `steps` set the length,
    `steps_run` the steps the stage ran."""
    from jaxkd.config import to_dict
    out = to_dict(distill)
    if distill.steps is not None:
        out.pop("epochs")
    out["steps_run"] = steps_run
    return out


def _retention(teacher: float | None, student: float | None, lower_is_better: bool) -> float | None:
    """student / teacher (teacher / student where lower is better): below 1, a worse student."""
    if teacher is None or student is None:
        return None
    over, under = (teacher, student) if lower_is_better else (student, teacher)
    return over / under if under else None


def build_report(cfg, task, models: dict, agreement: dict, distill_steps: int | None = None) -> dict:
    """teacher/student entries with metrics, retention, agreement (per split) and speed-up;
    `distill_steps`: the steps the distill stage ran."""
    teacher, student = models["teacher"], models["student"]
    retention = {k: _retention(teacher["metrics"].get(k), student["metrics"][k],
                               k in task.lower_is_better)
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
        "distill": _distill_summary(cfg.distill, distill_steps),
        "loss": task.describe_loss(cfg.distill),
        "student_config": cfg.student.summary(),
        "seed": cfg.seed,
        "precision": cfg.precision.compute,
        "code": code_version(),
    }


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    if isinstance(x, dict):  # a task's several agreement figures
        return "(" + ", ".join(f"{k} {_fmt(v)}" for k, v in x.items()) + ")"
    return str(x)


def report_markdown(report: dict) -> str:
    t, s = report["teacher"], report["student"]
    b = report.get("baseline")  # the labels-only student: scores only (its shape is the student's)
    rows = [("parameters", t["params"], s["params"]),
            ("size (MiB, fp32)", t["size_mb"], s["size_mb"]),
            ("layers x hidden", f"{t['layers']} x {t['hidden_size']}", f"{s['layers']} x {s['hidden_size']}")]
    rows = [(*row, "") for row in rows]
    for split in ("eval", "test"):
        for name in t["splits"].get(split, {}):
            rows.append((f"{name} ({split})", t["splits"][split][name], s["splits"][split][name],
                         b["splits"][split][name] if b else ""))
    rows += [(f"latency, batch 1 x {t['speed_seq_len']} (ms)", t["latency_ms"], s["latency_ms"], ""),
             ("throughput (examples/s)", t["throughput"], s["throughput"], "")]
    lines = [f"# Distillation report: {report['task']}", "",
             f"Teacher `{t['model']}`, student init `{s['init']}`, device {t['device']}.", "",
             "| | teacher | student |" + (" labels-only baseline |" if b else ""),
             "|---|---|---|" + ("---|" if b else "")]
    lines += [f"| {name} | {_fmt(x)} | {_fmt(y)} |" + (f" {_fmt(z)} |" if b else "")
              for name, x, y, z in rows]
    if report["report_split"] == "eval":
        lines += ["", "No test split: these figures are on the eval split, which also chose the "
                  "checkpoint (and a search's settings), so they read optimistic. Set data.test "
                  "for a figure no choice has seen."]
    lines += ["", f"Retention ({report['report_split']}): "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in report["retention"].items()),
              "Agreement with the teacher: "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in report["agreement"].items()),
              f"Speed-up at batch 1: {report['speedup']:.2f}x; compression {report['compression']:.2f}x.", ""]
    if report.get("kd_verdict"):
        lines += [report["kd_verdict"], "KD gain over the baseline: " + "; ".join(
            f"{split} " + ", ".join(f"{k} {v:+.4f}" for k, v in gains.items())
            for split, gains in report["kd_gain"].items()), ""]
    for split, terms in (report.get("heldout") or {}).items():
        lines += [f"Held-out distillation terms ({split}): "
                  + ", ".join(f"{k.removeprefix('loss/')} {_fmt(v)}" for k, v in terms.items()), ""]
    for note in report.get("teacher_readiness", []):
        lines += [f"Teacher: {note}", ""]
    if report.get("search"):
        lines += _search_markdown(report["search"], report["metric_names"][0])
    if report.get("deployment"):
        lines += deploy_table.markdown(report["deployment"])
    shown = report.get("examples") or []
    if shown:
        keys = list(shown[0])
        lines += [f"## Examples ({report['report_split']})", "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in shown]
        lines.append("")
    return "\n".join(lines)


def _search_markdown(search: dict, metric: str) -> list[str]:
    lines = ["## Search (eval split)", "",
             f"{len(search['candidates'])} candidates of {search['steps_per_candidate']} steps each, "
             f"{search['seconds']:.0f} s in all"
             + (f" ({search['cost_ratio']:.2f}x the chosen setting's full run, "
                f"{search['full_run_seconds']:.0f} s)" if search.get("cost_ratio") else "") + "."
             + (f" The distill section's own setting is kept unless a candidate scores more than "
                f"{search['min_gain']:g} above it." if search.get("min_gain") else ""), "",
             f"| temperature | alpha | eval {metric} | |", "|---|---|---|---|"]
    for i, c in enumerate(search["candidates"]):
        lines.append(f"| {c['temperature']:g} | {c['alpha']:g} | {c['eval'][metric]:.4f} | "
                     + ("chosen |" if i == search["chosen"] else "|"))
    return lines + [""]


def _cell(text: str, width: int = 160) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The rows of workdir/metrics.jsonl ([] before the first). A last line cut short (a run
    killed while appending it) is dropped with a warning; a bad line elsewhere is an error."""
    path = pathlib.Path(workdir) / METRICS
    if not path.is_file():
        return []
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not a JSON object ({e}); "
                                 "remove or mend it") from None
            log.warning("%s: its last line is cut short (a run killed while writing it); "
                        "ignored", path)
    return rows


def write_metrics(workdir: pathlib.Path, rows: list[dict]) -> None:
    """Replace workdir/metrics.jsonl with `rows`, whole or not at all (a resumed or restarted
    stage drops the rows it writes again)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    util.write_atomic(pathlib.Path(workdir) / METRICS,
                      lambda tmp: tmp.write_text(text, encoding="utf-8"))


def eval_curve(workdir: pathlib.Path, stage: str, metric: str) -> list[tuple[int, float]]:
    """A stage's eval `metric` by step, from metrics.jsonl."""
    return [(r["step"], r[metric]) for r in read_metrics(workdir)
            if r.get("stage") == stage and r.get("split") == "eval" and metric in r]


def _plots(report: dict, workdir: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    name = report["metric_names"][0]
    stages = sorted({r.get("stage") for r in rows if r.get("stage")})
    train = {st: [r for r in rows if r.get("stage") == st and "loss" in r] for st in stages}
    evals = {st: [r for r in rows if r.get("stage") == st and r.get("split") == "eval" and name in r]
             for st in stages}
    # Only panels with data: a run without an eval split draws no empty eval panel.
    panels = [(title, series) for title, series in (("training loss (mean per log interval)", train),
                                                    (f"eval {name}", evals))
              if any(series.values())]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (title, series) in zip(axes[0], panels):
            key = "loss" if series is train else name
            for stage, points in series.items():
                if points:
                    ax.plot([r["step"] for r in points], [r[key] for r in points],
                            "-" if series is train else "o-", label=stage)
            ax.set(title=title, xlabel="step")
            ax.legend()
        fig.tight_layout()
        fig.savefig(workdir / "training_curves.png", dpi=100)
        plt.close(fig)

    who = ["teacher", "student"]
    # The first metric both models have (a held-out run without masked-LM heads has none).
    name = next((m for m in report["metric_names"]
                 if all(report[w]["metrics"].get(m) is not None for w in who)), None)
    fig, axes = plt.subplots(1, 2 if name else 1, figsize=(8 if name else 4, 3.5), squeeze=False)
    if name:
        axes[0][0].bar(who, [report[w]["metrics"][name] for w in who], color=["#888", "#3a7"])
        axes[0][0].set(title=f"{name} ({report['report_split']})")
    axes[0][-1].bar(who, [report[w]["latency_ms"] for w in who], color=["#888", "#3a7"])
    axes[0][-1].set(title="latency, batch 1 (ms)")
    fig.tight_layout()
    fig.savefig(workdir / "teacher_vs_student.png", dpi=100)
    plt.close(fig)
    if report.get("deployment"):
        deploy_table.plot(report["deployment"], workdir / "deployment.png")


def write_report(report: dict, workdir: pathlib.Path, plots: bool = True) -> None:
    workdir = pathlib.Path(workdir)
    for name, text in (("report.json", json.dumps(report, indent=2, default=float)),
                       ("report.md", report_markdown(report))):
        util.write_atomic(workdir / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
    if plots:
        _plots(report, workdir)
