"""Build the results tables of docs/results.md from results/*/report.json (never typed by hand).

  python scripts/results_table.py           # rewrite the tables in docs/results.md
  python scripts/results_table.py --check   # exit 1 if docs/results.md and the reports disagree

Runs named <name>_s<seed> are grouped: one row with mean +- standard deviation over seeds.
Experiments kept in their own folder (results/<experiment>/<student>_<variant>_s<seed>/, with the
experiment's teacher in results/<experiment>/teacher/) get a second table, between the transfer
markers, that sets every variant beside the same student trained on hard labels only.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
TRANSFER_START, TRANSFER_END = "<!-- transfer:start -->", "<!-- transfer:end -->"
EMBEDDING_START, EMBEDDING_END = "<!-- embedding:start -->", "<!-- embedding:end -->"
SEARCH_START, SEARCH_END = "<!-- search:start -->", "<!-- search:end -->"
GENERAL_START, GENERAL_END = "<!-- general:start -->", "<!-- general:end -->"


def load_reports(results: pathlib.Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob("*/report.json"))}


def load_experiments(results: pathlib.Path) -> dict[str, dict[str, dict]]:
    """results/<experiment>/<run>/report.json, by experiment then run (results/checks excluded)."""
    return {d.name: load_reports(d) for d in sorted(results.iterdir())
            if d.is_dir() and d.name != "checks" and not (d / "report.json").exists()
            and any(d.glob("*/report.json"))}


def _describe(report: dict) -> str:
    d, s = report["distill"], report["student_config"]
    if s["init"] == "teacher_layers":
        init = f"teacher layers {s['layers']}"
    elif s["init"] == "shape":
        init = f"random {s['num_layers']}x{s['hidden_size']}"
    else:
        init = f"pretrained {s['pretrained']}"
    if s.get("export_as"):
        init += f", {s['export_as']} architecture"
    terms = [name.replace("_weight", "") for name in
             ("hidden_weight", "embedding_weight", "attention_score_weight", "attention_kl_weight",
              "value_relation_weight", "relation_weight", "cosine_weight") if d.get(name)]
    if report.get("task_type") in ("sentence_embedding", "general"):  # the kind's own terms
        loss = report.get("loss", "embedding loss (not recorded by this report's code)")
    elif d.get("steps") == 0:
        loss = "none (teacher layers, untrained)"
    elif d["alpha"] == 0 and not terms:
        loss = "hard labels only"
    elif report.get("search"):  # each seed may choose its own setting: the search table has them
        loss = "KD, T and alpha searched on the eval split" + (f" + {', '.join(terms)}" if terms else "")
    else:
        loss = f"KD T={d['temperature']:g} alpha={d['alpha']:g}" + (f" + {', '.join(terms)}" if terms else "")
    return f"{init}; {loss}"


def _stat(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def _is_teacher_run(report: dict) -> bool:
    return "student_config" not in report or report["distill"].get("steps") == 0


def _teacher_seconds(name: str, report: dict, results: pathlib.Path) -> float | None:
    """The teacher stage's wall time: from the report, else from the run's own metrics.jsonl."""
    seconds = report.get("stages", {}).get("teacher", {}).get("seconds")
    if seconds is not None:
        return seconds
    rows_path, config_path = results / name / "metrics.jsonl", results / name / "config.yaml"
    if not (rows_path.is_file() and config_path.is_file()):
        return None
    import yaml
    batch = yaml.safe_load(config_path.read_text())["data"]["batch_size"]
    rows = [json.loads(x) for x in rows_path.read_text().splitlines() if x.strip()]
    last = [r for r in rows if r.get("stage") == "teacher" and "examples_per_second" in r][-1]
    return batch * last["step"] / last["examples_per_second"]


def teacher_table(reports: dict[str, dict], results: pathlib.Path) -> str:
    lines = ["| teacher run | task | model | metric (split) | teacher | params (M) | latency b1 (ms) "
             "| fine-tune wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        if not _is_teacher_run(report):
            continue
        seconds = _teacher_seconds(name, report, results)
        for metric in report["metric_names"]:
            lines.append(
                f"| {name} | {report['task']} | {report['teacher']['model']} "
                f"| {metric} ({report['report_split']}) | {100 * report['teacher']['metrics'][metric]:.1f} "
                f"| {report['teacher']['params'] / 1e6:.1f} | {report['teacher']['latency_ms']:.1f} "
                f"| {'n/a' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def table(reports: dict[str, dict]) -> str:
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, report in reports.items():
        if not _is_teacher_run(report) and report.get("task_type") != "general":
            groups.setdefault(re.sub(r"_s\d+$", "", name), []).append((name, report))
    lines = ["| run | task | student | metric (split) | student | teacher | retention % | params (M) "
             "| latency b1 (ms) | distill steps | distill wall (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, members in groups.items():
        # A group is described by a member whose report records its loss in words, if any.
        first = next((r for _, r in members if "loss" in r), members[0][1])
        for metric in first["metric_names"]:
            student = [r["student"]["metrics"][metric] for _, r in members]
            teacher = [r["teacher"]["metrics"][metric] for _, r in members]
            retention = [r["retention"][metric] for _, r in members]
            wall = [r["stages"].get("distill", {}).get("seconds", 0.0) for _, r in members]
            latency = [r["student"]["latency_ms"] for _, r in members]
            # Epoch-based runs differ by a step between seeds (their held-out part differs).
            steps = [r["stages"].get("distill", {}).get("steps", 0) for _, r in members]
            lines.append(
                f"| {group} | {first['task']} | {_describe(first)} | {metric} ({first['report_split']}) "
                f"| {_stat(student)} | {_stat(teacher)} | {_stat(retention)} "
                f"| {first['student']['params'] / 1e6:.1f} | {statistics.median(latency):.1f} "
                f"| {statistics.median(steps):.0f} | {statistics.median(wall):.0f} | {len(members)} |")
    return "\n".join(lines)


def _variant(report: dict) -> str:
    """What the student learnt from: hard labels, KD, and the transfer rows KD alone sees."""
    d, transfer = report["distill"], report.get("transfer")
    words = "hard labels only" if d["alpha"] == 0 else f"KD T={d['temperature']:g} alpha={d['alpha']:g}"
    if transfer:
        for u in transfer["unlabeled"]:
            words += f" + {u['rows']:,} unlabelled rows"
        if transfer["augment"]:
            a = transfer["augment"]
            words += (f" + augmented x{a['factor']} ({a['rows']:,} rows; mask {a['mask_prob']:g}, "
                      f"replace {a['replace_prob']:g} of {a['neighbours']} neighbours, "
                      f"n-gram {a['ngram_prob']:g})")
        per_batch = transfer["rows_per_batch"]
        words += f", {per_batch} of {per_batch + transfer['labelled_rows_per_batch']} rows a batch"
    return words


def transfer_table(experiments: dict[str, dict[str, dict]]) -> str:
    lines = ["| experiment | student | variant | metric (split) | student | vs hard (points) | teacher "
             "| distill steps | distill wall (s) | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for experiment, reports in experiments.items():
        groups: dict[tuple[str, str], list[dict]] = {}
        for name, report in reports.items():
            match = re.fullmatch(r"([^_]+)_(.+)_s\d+", name)
            if match and not _is_teacher_run(report):
                groups.setdefault(match.groups(), []).append(report)
        order = ["hard", "kd", "kd_unlabeled", "kd_augment"]  # others after these, by name
        for (student, variant), members in sorted(groups.items(), key=lambda g: (
                g[0][0], order.index(g[0][1]) if g[0][1] in order else len(order), g[0][1])):
            first = members[0]
            hard = groups.get((student, "hard"), [])
            for metric in first["metric_names"]:
                values = [r["student"]["metrics"][metric] for r in members]
                gain = ""
                if variant != "hard" and hard:
                    baseline = statistics.mean(r["student"]["metrics"][metric] for r in hard)
                    gain = f"{100 * (statistics.mean(values) - baseline):+.1f}"
                wall = statistics.median(r["stages"]["distill"]["seconds"] for r in members)
                lines.append(
                    f"| {experiment} | {student}: {_describe(first).split(';')[0]} | {variant}: {_variant(first)} "
                    f"| {metric} ({first['report_split']}) | {_stat(values)} | {gain} "
                    f"| {_stat([r['teacher']['metrics'][metric] for r in members])} "
                    f"| {first['stages']['distill']['steps']} | {wall:.0f} | {len(members)} |")
    return "\n".join(lines)


def embedding_table(reports: dict[str, dict]) -> str:
    """Sentence-embedding runs: the STS score of the reported split, retention, agreement with
    the teacher (recall@k of its nearest neighbours, mean cosine) and speed, mean +- sd over seeds."""
    groups: dict[str, list[dict]] = {}
    for name, report in reports.items():
        if report.get("task_type") == "sentence_embedding" and not _is_teacher_run(report):
            groups.setdefault(re.sub(r"_s\d+$", "", name), []).append(report)
    lines = ["| run | student | Spearman (split) | teacher | retention % | recall@k | mean cosine "
             "| params (M) | speed-up b1 | throughput ratio | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, members in groups.items():
        first = next((r for r in members if "loss" in r), members[0])
        split = first["report_split"]
        agreement = [r["agreement"][split] for r in members]
        recall_key = next(k for k in agreement[0] if k.startswith("recall@"))
        lines.append(
            f"| {group} | {_describe(first)} | {_stat([r['student']['metrics']['spearman'] for r in members])} "
            f"({split}) | {_stat([r['teacher']['metrics']['spearman'] for r in members])} "
            f"| {_stat([r['retention']['spearman'] for r in members])} "
            f"| {recall_key} {_stat([a[recall_key] for a in agreement])} "
            f"| {_stat([a['mean_cosine'] for a in agreement], scale=1.0, digits=3)} "
            f"| {first['student']['params'] / 1e6:.1f} "
            f"| {statistics.median(r['speedup'] for r in members):.2f}x "
            f"| {statistics.median(r['throughput_ratio'] for r in members):.2f}x | {len(members)} |")
    return "\n".join(lines)


def search_table(reports: dict[str, dict]) -> str:
    """Runs <task>_search[-<variant>]_s<seed> (distill.search and distill.baseline) beside
    <task>_fixed_s<seed> (the same data and seed, the fixed T and alpha): one row per seed, then
    mean +- sd, for each task and variant; `min gain` is the search's `min_gain`."""
    lines = ["| task | min gain (points) | seed | chosen T / alpha | searched (test) | fixed T=2, alpha=0.5 (test) "
             "| labels-only baseline (test) | KD gain over baseline (eval) | search cost (s; x full run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[tuple[str, dict, dict | None]]] = {}
    for name, report in reports.items():
        match = re.fullmatch(r"(.+?)_search(-[\w-]+)?_s(\d+)", name)
        if match and "search" in report:
            fixed = reports.get(f"{match[1]}_fixed_s{match[3]}")
            groups.setdefault((match[1], match[2] or ""), []).append((match[3], report, fixed))
    for (task, _), members in sorted(groups.items()):
        metric = members[0][1]["metric_names"][0]
        margin = f"{100 * members[0][1]['search'].get('min_gain', 0.0):g}"
        columns: dict[str, list[float]] = {"searched": [], "fixed": [], "baseline": [], "gain": []}
        for seed, report, fixed in members:
            search = report["search"]
            values = {"searched": report["student"]["metrics"][metric],
                      "fixed": None if fixed is None else fixed["student"]["metrics"][metric],
                      "baseline": report["baseline"]["metrics"][metric],
                      "gain": report["kd_gain"]["eval"][metric]}
            for key, value in values.items():
                if value is not None:
                    columns[key].append(value)
            shown = {k: "n/a" if v is None else f"{100 * v:.1f}" for k, v in values.items()}
            lines.append(
                f"| {task} ({metric}) | {margin} | {seed} | {search['setting']['temperature']:g} / "
                f"{search['setting']['alpha']:g} | {shown['searched']} | {shown['fixed']} "
                f"| {shown['baseline']} | {100 * values['gain']:+.1f} | {search['seconds']:.0f}; "
                f"{search['cost_ratio']:.1f}x |")
        if len(members) > 1:
            lines.append(f"| {task} ({metric}) | {margin} | mean ± sd | | {_stat(columns['searched'])} "
                         f"| {_stat(columns['fixed']) if columns['fixed'] else 'n/a'} "
                         f"| {_stat(columns['baseline'])} | {_stat(columns['gain'])} | |")
    return "\n".join(lines)


def _figure(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def general_table(reports: dict[str, dict]) -> str:
    """General-distillation runs (results/general_<student>): the stage's steps and wall time,
    its held-out terms and masked-LM figures on the reported split; then each task run from a
    general student (<task>_<student>_general_s<seed>) beside the same student without the
    general stage (<task>_<student>_taskonly_s<seed>), mean +- sd over seeds. A variant of a
    general stage for the same student (<student>-<variant>) is compared with that student's
    taskonly runs."""
    lines = ["| general run | student | steps | wall (s) | held-out terms (split) | student masked-LM "
             "accuracy / perplexity | teacher's | params (M) |", "|---|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        if report.get("task_type") != "general":
            continue
        split = report["report_split"]
        distill = report["stages"].get("distill", {})
        terms = ", ".join(f"{k.removeprefix('loss/')} {v:.4f}"
                          for k, v in report["heldout"].get(split, {}).items())
        figures = {who: report[who]["metrics"] for who in ("student", "teacher")}
        shown = {who: f"{_figure(f.get('mlm_accuracy'))} / {_figure(f.get('perplexity'), 1.0)}"
                 for who, f in figures.items()}
        lines.append(f"| {name} | {_describe(report)} | {distill.get('steps', 0)} "
                     f"| {distill.get('seconds', 0.0):.0f} | {terms} ({split}) | {shown['student']} "
                     f"| {shown['teacher']} | {report['student']['params'] / 1e6:.1f} |")
    lines += ["", "| task | student | metric (split) | from the general student | without it | "
              "lift | seeds |", "|---|---|---|---|---|---|---|"]
    pairs: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for name, report in reports.items():
        match = re.fullmatch(r"(.+)_(.+)_general_s(\d+)", name)
        student = match and match[2].split("-")[0]
        other = match and reports.get(f"{match[1]}_{student}_taskonly_s{match[3]}")
        if other:
            pairs.setdefault((match[1], match[2]), []).append((report, other))
    for (task, student), members in pairs.items():
        metric = members[0][0]["metric_names"][0]
        general = [g["student"]["metrics"][metric] for g, _ in members]
        alone = [t["student"]["metrics"][metric] for _, t in members]
        lines.append(f"| {task} | {student} | {metric} ({members[0][0]['report_split']}) "
                     f"| {_stat(general)} | {_stat(alone)} "
                     f"| {_stat([g - t for g, t in zip(general, alone)])} | {len(members)} |")
    return "\n".join(lines)


def render(page: str, body: str, start: str = START, end: str = END, name: str = "the page") -> str:
    if start not in page or end not in page:
        raise SystemExit(f"{name} lacks the {start} ... {end} markers")
    head, rest = page.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--page", "--readme", type=pathlib.Path, default=PAGE,
                        help="the Markdown page holding the table markers (default docs/results.md)")
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    page = args.page.read_text(encoding="utf-8")
    name = str(args.page.relative_to(ROOT)) if args.page.is_relative_to(ROOT) else str(args.page)
    reports = load_reports(args.results)
    wanted = render(page, teacher_table(reports, args.results) + "\n\n" + table(reports), name=name)
    if EMBEDDING_START in page:
        wanted = render(wanted, embedding_table(reports), EMBEDDING_START, EMBEDDING_END, name)
    if SEARCH_START in page:
        wanted = render(wanted, search_table(reports), SEARCH_START, SEARCH_END, name)
    if GENERAL_START in page:
        wanted = render(wanted, general_table(reports), GENERAL_START, GENERAL_END, name)
    experiments = load_experiments(args.results)
    if experiments:
        wanted = render(wanted, transfer_table(experiments), TRANSFER_START, TRANSFER_END, name)
    if args.check:
        if wanted != page:
            print(f"{name}: the results tables are out of date: run python scripts/results_table.py",
                  file=sys.stderr)
            return 1
        return 0
    args.page.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
