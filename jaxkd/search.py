"""Choosing the distillation temperature and alpha on the eval split (`distill.search`).

Every candidate (the grid of the listed temperatures and alphas) trains the same student from
the same init, seed and data order for `steps` steps, on the same teacher outputs (the logit
cache is computed once for all of them); each is scored on the eval split once, at its last
step; the best by the task's primary metric is chosen (the first in grid order on a tie), unless
`min_gain` is set and the distill section's own setting is a candidate: then the best replaces it
only when it scores more than `min_gain` above it (differences inside the eval split's noise
keep the setting the config names). The distill stage then trains the choice for its full
length. Nothing reads the test split.

The search's record, `workdir/search.json`, gains a candidate's figures as soon as it
finishes: a resumed run skips finished candidates and resumes the unfinished one from its
checkpoints (`checkpoints/search_<i>`), so an interrupted search ends as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from jaxkd import util

RECORD = "search.json"
STAGE_PREFIX = "search_"  # candidate i trains as stage search_<i> (checkpoints, metric rows)


def stage_name(i: int) -> str:
    return f"{STAGE_PREFIX}{i}"


def owner_stage(stage: str | None) -> str | None:
    """The pipeline stage a stage name belongs to: a candidate's to distill, any other its own."""
    return "distill" if str(stage).startswith(STAGE_PREFIX) else stage


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """`distill.search`: the values tried (empty: the distill section's own), each candidate's
    training steps (its budget: the search costs about candidates x steps steps), and the
    eval-metric margin a candidate must beat the section's own setting by to replace it."""

    temperature: tuple[float, ...] = ()
    alpha: tuple[float, ...] = ()
    steps: int = 100
    min_gain: float = 0.0

    def __post_init__(self):
        for t in self.temperature:
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"distill.search.temperature values must be positive, got {t}")
        for a in self.alpha:
            if not 0.0 < a <= 1.0:
                raise ValueError(f"distill.search.alpha values must be in (0, 1] (alpha 0 is the "
                                 f"labels-only baseline: distill.baseline), got {a}")
        if self.steps < 1:
            raise ValueError(f"distill.search.steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.min_gain) and self.min_gain >= 0):
            raise ValueError(f"distill.search.min_gain must be >= 0 (in the eval metric's units, "
                             f"e.g. 0.003 for 0.3 points of accuracy), got {self.min_gain}")

    def candidates(self, temperature: float, alpha: float) -> list[dict[str, float]]:
        """The grid in order (temperature outer), the distill section's value where a key lists
        none."""
        return [{"temperature": t, "alpha": a}
                for t, a in itertools.product(self.temperature or (temperature,),
                                              self.alpha or (alpha,))]


def choose(results: Sequence[dict[str, Any]], metric: str, default: int | None = None,
           min_gain: float = 0.0) -> int:
    """Index of the candidate with the highest eval `metric` (the first on a tie; NaN never);
    with `default` (the section's own setting's index) and `min_gain`, `default` unless the
    best scores more than `min_gain` above it."""
    values = [r["eval"][metric] for r in results]
    finite = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if not finite:
        raise ValueError(f"no search candidate has a finite eval {metric}: {values}")
    best = max(finite, key=lambda i: (values[i], -i))
    # "more than min_gain", read past float rounding (0.903 - 0.900 is 0.0030000000000000027)
    if default in finite and min_gain > 0 and values[best] - values[default] <= min_gain + 1e-9:
        return default
    return best


def read_record(workdir: pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / RECORD
    if not path.is_file():
        return []
    return json.loads(path.read_text())["candidates"]


def write_record(workdir: pathlib.Path, results: Sequence[dict[str, Any]],
                 chosen: int | None = None) -> None:
    record = {"candidates": list(results), "chosen": chosen}
    util.write_atomic(pathlib.Path(workdir) / RECORD,
                      lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))


def run(search: SearchConfig, *, temperature: float, alpha: float, metric: str,
        workdir: pathlib.Path, train: Callable[[int, dict[str, float]], tuple[dict, float]],
        write: bool = True) -> dict[str, Any]:
    """Run the candidates not yet in the record: `train(i, candidate)` trains candidate i for
    `search.steps` steps (resuming from its checkpoints) and returns (its eval scores, its wall
    seconds). Returns {"candidates": [...], "chosen": i, "setting": {...}}; `write`: this
    process records (process 0)."""
    grid = search.candidates(temperature, alpha)
    results = read_record(workdir)
    if [{k: r[k] for k in ("temperature", "alpha")} for r in results] != grid[:len(results)]:
        raise ValueError(f"{pathlib.Path(workdir) / RECORD} holds another search's candidates; "
                         f"use a new workdir, or --restart distill")
    for i in range(len(results), len(grid)):
        scores, seconds = train(i, grid[i])
        results.append({**grid[i], "steps": search.steps, "eval": scores,
                        "seconds": round(seconds, 1)})
        if write:
            write_record(workdir, results)
    own = {"temperature": temperature, "alpha": alpha}
    chosen = choose(results, metric, grid.index(own) if own in grid else None, search.min_gain)
    if write:
        write_record(workdir, results, chosen)
    return {"candidates": results, "chosen": chosen, "setting": grid[chosen],
            "steps_per_candidate": search.steps, "min_gain": search.min_gain,
            "seconds": round(sum(r["seconds"] for r in results), 1)}
