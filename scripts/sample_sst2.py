"""Write the SST-2 sample that ships in data/sst2/ (the default job's data), from the full files.

  python scripts/sample_sst2.py ../shared/data/sst2 data/sst2

train.tsv: 8,000 rows of the full train.tsv drawn without replacement with numpy's
default_rng(0), kept in file order. glue_dev.tsv: the GLUE SST-2 validation set, copied whole.
"""
import pathlib
import shutil
import sys

import numpy as np

ROWS, SEED = 8000, 0


def main(source: str, out: str) -> None:
    source, out = pathlib.Path(source), pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, *rows = (source / "train.tsv").read_text(encoding="utf-8").splitlines()
    keep = np.sort(np.random.default_rng(SEED).choice(len(rows), ROWS, replace=False))
    (out / "train.tsv").write_text("\n".join([header] + [rows[i] for i in keep]) + "\n",
                                   encoding="utf-8")
    shutil.copyfile(source / "glue_dev.tsv", out / "glue_dev.tsv")


if __name__ == "__main__":
    main(*sys.argv[1:3])
