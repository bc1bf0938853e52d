"""The run manifest: what determines each stage's result, recorded in the work directory.

A run records `manifest.json` in its workdir before its first stage: every config key that can
change a result (as dotted keys), the content keys of the teacher's files and of the data
files, and the code version. A later run of the same workdir compares its own manifest first
(`check`): a key that differs is owned by the first stage that reads it (`STAGES` order;
`stage_of`), and if that stage or any after it has started, the run is refused with one
message listing the keys, old and new values, and what to do (`ChangedConfig`). Keys that
cannot change a result (`FREE`: logging, progress, the compilation cache, the eval batch size,
checkpoint intervals, where caches live, the process layout) may change freely.

`restart(workdir, stage)` removes what stage `stage` and those after it wrote, so that the run
redoes them (`train.py --restart STAGE`).
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import Any

import jaxkd
from jaxkd import report as report_lib
from jaxkd import search, tasks, util
from jaxkd.config import Config, ConfigError, to_dict
from jaxkd.loop import read_stages, write_stages

log = logging.getLogger("jaxkd")

STAGES = ("teacher", "distill", "baseline", "export", "report")
FILE = "manifest.json"

# Keys (or prefixes ending in ".") that cannot change what a stage produces.
FREE = ("workdir", "compilation_cache", "log.", "distributed.", "data.eval_batch_size",
        "data.cache_dir", "checkpoint.every_steps", "checkpoint.keep")
# The first stage that reads a key, for keys not read by the teacher stage (the rest are).
_LATER = {"student.": "distill", "content.student": "distill", "distill.": "distill", "data.unlabeled": "distill", "data.unlabeled_ratio": "distill",
          "data.unlabeled_max_rows": "distill",
          "content.data.unlabeled": "distill", "distill.baseline": "baseline",
          "optim.learning_rate": "distill",  # the teacher's is teacher.finetune.learning_rate
          "export.": "export", "export.deployment": "report", "export.latency_inputs": "report",
          "export.throughput_batch": "report",
          "data.test": "report", "content.data.test": "report"}


class ChangedConfig(ConfigError):
    """A rerun of a workdir whose recorded manifest differs in keys a started stage read."""


def _matches(key: str, pattern: str) -> bool:
    return key == pattern or (pattern.endswith(".") and key.startswith(pattern)) or \
        key.startswith(pattern + ".") or key.startswith(pattern + "[")


def stage_of(key: str) -> str | None:
    """The first stage whose result `key` can change (None: no stage's)."""
    if any(_matches(key, p) for p in FREE):
        return None
    owners = [(len(p), stage) for p, stage in _LATER.items() if _matches(key, p)]
    return max(owners)[1] if owners else STAGES[0]


def _flatten(tree: Any, prefix: str, out: dict) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = tree


def content_keys(cfg: Config, teacher_dir: pathlib.Path | None) -> dict[str, str]:
    """Content keys of the teacher's directory, a pretrained student's, and every data file the
    config names (a Hub id or split is keyed by its name: its content is the Hub's)."""
    out = {}
    if teacher_dir is not None:
        out["content.teacher"] = util.path_key(pathlib.Path(teacher_dir))
    if cfg.student.pretrained is not None and pathlib.Path(cfg.student.pretrained).is_dir():
        out["content.student"] = util.path_key(pathlib.Path(cfg.student.pretrained))
    data = cfg.data
    sources = {"train": data.train, "eval": data.eval, "test": data.test}
    for i, source in enumerate(data.unlabeled or ()):
        sources[f"unlabeled[{i}]"] = source
    for name, source in sources.items():
        files = tasks.source_files(cfg.task, source) if source is not None else []
        if len(files) == 1:
            out[f"content.data.{name}"] = util.path_key(files[0])
        elif files:  # several files of one split (a general corpus): one key over them all
            out[f"content.data.{name}"] = util.content_hash(
                f"{f.name}\0{util.path_key(f)}\0".encode() for f in files)
    return out


def build(cfg: Config, teacher_dir: pathlib.Path | None) -> dict[str, Any]:
    """The manifest of a run: dotted config keys (free ones left out), content keys, code."""
    keys: dict[str, Any] = {}
    _flatten(json.loads(json.dumps(to_dict(cfg))), "", keys)
    keys = {k: v for k, v in keys.items() if stage_of(k) is not None}
    keys.update(content_keys(cfg, teacher_dir))
    keys["code.version"] = jaxkd.__version__
    return dict(sorted(keys.items()))


def read(workdir: pathlib.Path) -> dict | None:
    """The recorded manifest's keys (None: none recorded)."""
    path = pathlib.Path(workdir) / FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["keys"]
    except (ValueError, KeyError, TypeError) as e:
        raise ChangedConfig(f"{path} is not a jaxkd manifest ({e}); use a new workdir, or "
                            f"delete {path} if you know the workdir's settings are these") from None


def write(workdir: pathlib.Path, keys: dict) -> None:
    util.write_atomic(pathlib.Path(workdir) / FILE,
                      lambda tmp: tmp.write_text(json.dumps({"version": 1, "keys": keys},
                                                            indent=1, default=str)))


def started(workdir: pathlib.Path) -> list[str]:
    """The stages that have written anything into `workdir`, in order."""
    workdir = pathlib.Path(workdir)
    recorded = read_stages(workdir)
    out = []
    for stage in STAGES:
        ckpts = workdir / "checkpoints" / stage
        if (stage in recorded or (ckpts.is_dir() and any(ckpts.iterdir()))
                or any(p.exists() for p in _outputs(workdir, stage))):
            out.append(stage)
    return out


def _outputs(workdir: pathlib.Path, stage: str) -> list[pathlib.Path]:
    """What a stage writes besides its checkpoints and its stage record."""
    return {"teacher": [workdir / "teacher"],
            "distill": [workdir / search.RECORD,
                        *sorted((workdir / "checkpoints").glob(f"{search.STAGE_PREFIX}*"))],
            "baseline": [], "export": [workdir / "student", *util.leftovers(workdir / "student")],
            "report": [workdir / name for name in ("report.json", "report.md", "training_curves.png",
                                                    "teacher_vs_student.png", "deployment.png")]}[stage]


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check(workdir: pathlib.Path, keys: dict, restart_from: str | None = None) -> None:
    """Refuse (`ChangedConfig`) when `keys` differ from the recorded manifest in a key read by
    a stage that has started, unless `restart_from` is at or before that stage."""
    old = read(workdir)
    if old is None:
        begun = started(workdir)
        if begun:
            log.warning("workdir %s holds %s but no %s: this run's settings are recorded now, "
                        "not compared with the earlier run's", workdir, ", ".join(begun), FILE)
        return
    differ = sorted(k for k in set(old) | set(keys) if old.get(k, "<unset>") != keys.get(k, "<unset>"))
    if not differ:
        return
    begun = started(workdir)
    blocked = []
    for key in differ:
        stage = stage_of(key)
        if stage is None:
            continue
        later = STAGES[STAGES.index(stage):]
        redone = restart_from is not None and STAGES.index(restart_from) <= STAGES.index(stage)
        if not redone and any(s in begun for s in later):
            blocked.append((key, stage))
    if not blocked:
        return
    first = min((stage for _, stage in blocked), key=STAGES.index)
    lines = "; ".join(
        f"{k}: {_show(old.get(k, '<unset>'))} -> {_show(keys.get(k, '<unset>'))}"
        + (" (file contents changed)" if k.startswith("content.") and k in old and k in keys else "")
        for k, _ in blocked)
    after = STAGES[STAGES.index(first):]
    raise ChangedConfig(
        f"workdir {workdir} was run with other settings: {lines}. These change the "
        f"{first} stage's result, which was already started ({', '.join(begun)} in the workdir). "
        f"Use a new workdir, or rerun with --restart {first} to redo {', '.join(after)}.")


def check_stage(stage: str) -> None:
    """Refuse a `--restart` stage that is not one of `STAGES`."""
    if stage not in STAGES:
        raise ConfigError(f"--restart {stage!r}: unknown stage{util.did_you_mean(stage, STAGES)}; "
                          f"stages: {', '.join(STAGES)}")


def restart(workdir: pathlib.Path, stage: str) -> list[str]:
    """Remove what `stage` and the stages after it wrote (checkpoints, records, outputs and
    metric rows); returns the paths removed."""
    check_stage(stage)
    workdir = pathlib.Path(workdir)
    redo = STAGES[STAGES.index(stage):]
    removed = []
    for s in redo:
        for path in [workdir / "checkpoints" / s, *_outputs(workdir, s)]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed.append(str(path))
    if (workdir / "stages.json").is_file():
        write_stages(workdir, {k: v for k, v in read_stages(workdir).items() if k not in redo})
    if (workdir / report_lib.METRICS).is_file():
        report_lib.write_metrics(workdir, [r for r in report_lib.read_metrics(workdir)
                                           if search.owner_stage(r.get("stage")) not in redo])
    log.info("--restart %s: redoing %s (removed %s)", stage, ", ".join(redo),
             ", ".join(removed) or "nothing")
    return removed
