"""Split SST-2's train.tsv into a small labelled set and the rest as unlabelled text.

  python scripts/split_sst2_small.py ../shared/data/sst2/train.tsv runs/exp/sst2_small/data

labelled.tsv: 1,000 rows drawn without replacement with numpy's default_rng(0), kept in file
order (sentence and label). unlabeled.tsv: every other row, its sentence only (the labels are
dropped, so nothing downstream can read them). Deterministic: the same input gives the same files.
"""
import pathlib
import sys

import numpy as np

ROWS, SEED = 1000, 0


def main(source: str, out: str) -> None:
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, *rows = pathlib.Path(source).read_text(encoding="utf-8").splitlines()
    if header.split("\t") != ["sentence", "label"]:
        raise SystemExit(f"{source}: expected the header 'sentence<TAB>label', got {header!r}")
    chosen = np.zeros(len(rows), bool)
    chosen[np.random.default_rng(SEED).choice(len(rows), ROWS, replace=False)] = True
    labelled = [row for row, keep in zip(rows, chosen) if keep]
    unlabeled = [row.split("\t")[0] for row, keep in zip(rows, chosen) if not keep]
    (out_dir / "labelled.tsv").write_text("\n".join([header] + labelled) + "\n", encoding="utf-8")
    (out_dir / "unlabeled.tsv").write_text("\n".join(["sentence"] + unlabeled) + "\n",
                                           encoding="utf-8")
    print(f"{out_dir}: {len(labelled)} labelled rows, {len(unlabeled)} unlabelled (seed {SEED})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
