"""Which teacher layers to keep: every untrained teacher-layer student scored on the eval split.

    python scripts/layer_choice.py --config configs/experiments/embed_l3_s0.yaml \
        --keep 3 --out results/checks/embed_layer_choice

For each choice of `--keep` of the teacher's layers (all of them, or those given with
`--layers 0,2,4 0,3,5 ...`), runs `train.py` on `--config` with `student.layers` set to it and
`distill.steps: 0` (no training: the student as `student.init: teacher_layers` builds it), no
unlabelled data (nothing trains on it), no export and no plots, and reads the student's metric
on the eval split (`data.eval`) from its report.json. The choice is made there, never on the reported split. Writes `choice.json`
(every choice's eval and test metrics, best first by eval) and each run's report.json under
`--out`, and prints the table; a rerun with the same `--out` keeps the choices already scored
there. `--reference MODEL_DIR` (a sentence-transformers directory, the
teacher's) also scores each choice in PyTorch, the same layers dropped from the model that
sentence-transformers loads, on the eval split's pairs (an STS Benchmark file) and records that
Spearman beside jaxkd's. Runs one at a time; each is a full run's start-up (a minute or two on 2 CPU cores for the MiniLM-L6 teacher and STS-B dev and test).
"""
from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxkd.tasks import similarity  # noqa: E402


def choices(num_layers: int, keep: int, given: list[str] | None) -> list[tuple[int, ...]]:
    if given:
        return [tuple(int(i) for i in g.split(",")) for g in given]
    return list(itertools.combinations(range(num_layers), keep))


def run_choice(base: dict, layers: tuple[int, ...], workdir: pathlib.Path) -> dict:
    cfg = {**base, "workdir": str(workdir),
           "student": {**base.get("student", {}), "init": "teacher_layers", "layers": list(layers)},
           "distill": {**base.get("distill", {}), "steps": 0},
           "export": {"onnx": False, "deployment": False},
           "log": {**base.get("log", {}), "plots": False, "progress": False, "tensorboard": False}}
    cfg["data"] = {k: v for k, v in base.get("data", {}).items() if not k.startswith("unlabeled")}
    cfg["distill"].pop("epochs", None)
    cfg["distill"].pop("eval_every", None)
    path = workdir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path)], check=True,
                   cwd=ROOT)
    return json.loads((workdir / "report.json").read_text())


def reference_spearman(model_dir: str, layers: tuple[int, ...], eval_path: str) -> float:
    """STS Spearman of the teacher cut to `layers`, in PyTorch with sentence-transformers."""
    import scipy.stats
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    encoder = model[0].auto_model.encoder
    encoder.layer = torch.nn.ModuleList([encoder.layer[i] for i in layers])
    table = similarity.read_sts_release(eval_path)
    first, second = table.columns["sentence1"], table.columns["sentence2"]
    gold = [float(s) for s in table.columns["score"]]
    a, b = (model.encode(s, batch_size=64, normalize_embeddings=True) for s in (first, second))
    return float(scipy.stats.spearmanr((a * b).sum(1), gold)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--keep", type=int, default=3, help="layers to keep (with --num-layers)")
    p.add_argument("--num-layers", type=int, default=6, help="the teacher's layers")
    p.add_argument("--layers", nargs="*", help="choices to score, as 0,2,4 (default: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--reference", help="the teacher as a sentence-transformers directory")
    args = p.parse_args()
    base = yaml.safe_load(pathlib.Path(args.config).read_text())
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun keeps the choices already scored in choice.json (and adds the reference to them).
    done = {}
    if (out / "choice.json").is_file():
        done = {tuple(r["layers"]): r for r in json.loads((out / "choice.json").read_text())["choices"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in choices(args.num_layers, args.keep, args.layers):
            name = "layers_" + "-".join(map(str, layers))
            row = done.get(layers)
            if row is None:
                report = run_choice(base, layers, pathlib.Path(tmp) / name)
                shutil.copy(pathlib.Path(tmp) / name / "report.json", out / f"{name}.json")
                splits = report["student"]["splits"]
                row = {"layers": list(layers), "eval": splits["eval"], "test": splits.get("test")}
            if args.reference and "reference_eval_spearman" not in row:
                row["reference_eval_spearman"] = reference_spearman(
                    args.reference, layers, str(ROOT / base["data"]["eval"]))
            rows.append(row)
            print(name, json.dumps(row["eval"]), flush=True)
    teacher = json.loads((out / f"{name}.json").read_text())["teacher"]["splits"]
    metric = next(iter(rows[0]["eval"]))
    rows.sort(key=lambda r: -r["eval"][metric])
    (out / "choice.json").write_text(json.dumps(
        {"config": args.config, "selected_by": f"eval {metric}", "teacher": teacher,
         "choices": rows}, indent=1) + "\n")
    print(f"teacher: eval {metric} {teacher['eval'][metric]:.4f}")
    for r in rows:
        ref = r.get("reference_eval_spearman")
        print(f"{r['layers']}: eval {metric} {r['eval'][metric]:.4f}"
              + (f" (PyTorch reference: spearman {ref:.4f})" if ref is not None else ""))


if __name__ == "__main__":
    main()
