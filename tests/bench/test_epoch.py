"""bench epoch on tiny SST-2, CoNLL-2003 and SQuAD files: both sides' CLI, the same rows and
windows on both sides, bad input, and the jaxkd side running jaxkd.loop's step loop."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from jaxkd.bench import common, epoch, torch_ref
from jaxkd.bench.__main__ import main


@pytest.mark.slow  # the CLI end to end (test_jaxkd_epoch_runs_the_trainers_step_loop: fast)
@pytest.mark.parametrize("impl", ["jaxkd", "torch"])
def test_epoch_cli(tiny_teacher, tiny_tsv, impl, capsys):
    if impl == "torch":
        pytest.importorskip("torch")
    main(["epoch", "--impl", impl, "--teacher", str(tiny_teacher), "--train", str(tiny_tsv),
                "--limit", "20", "--batch", "4", "--student-layers", "1", "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert f"{impl}: 20 examples in 5 steps" in out
    assert float(out.strip().splitlines()[-1]) > 0


def test_conll_limit_takes_whole_sentences_as_the_torch_reader_does(tiny_conll):
    setup = epoch.EpochSetup(teacher="unused", train=str(tiny_conll), limit=7, task="conll2003",
                             batch=4)
    first = epoch.read_examples(setup)
    whole = epoch.read_examples(dataclasses.replace(setup, limit=None))
    assert len(first) == 7 and len(whole) == 24
    assert len(first.tags) == sum(map(len, first.words)) == int(whole.word_offsets[7])
    np.testing.assert_array_equal(first.tags, whole.tags[:len(first.tags)])
    words, tags = torch_ref.read_conll(setup)
    assert words == first.words and [t for s in tags for t in s] == first.tags.tolist()


@pytest.mark.slow  # the CLI end to end
@pytest.mark.parametrize("impl", ["jaxkd", "torch"])
def test_epoch_conll_cli(tiny_teacher, tiny_conll, impl, capsys):
    if impl == "torch":
        pytest.importorskip("torch")
    main(["epoch", "--task", "conll2003", "--impl", impl, "--teacher", str(tiny_teacher),
                "--train", str(tiny_conll), "--limit", "20", "--batch", "4", "--student-layers", "1",
                "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert f"{impl}: 20 examples in 5 steps" in out  # every sentence fits one window of 16
    assert 0 < float(out.strip().splitlines()[-1]) < math.inf


@pytest.mark.slow
def test_epoch_conll_vs_torch_prints_a_ratio(tiny_teacher, tiny_conll, capsys):
    pytest.importorskip("torch")
    main(["epoch", "--task", "conll2003", "--vs-torch", "--teacher", str(tiny_teacher),
                "--train", str(tiny_conll), "--limit", "8", "--batch", "4", "--student-layers", "1",
                "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert "round 1 jaxkd: 8 examples in 2 steps" in out and "round 1 torch: 8 examples" in out
    assert "task conll2003" in out
    assert 0 < float(out.strip().splitlines()[-1]) < math.inf


def test_epoch_rejects_missing_file_and_random_teacher(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        main(["epoch", "--impl", "jaxkd", "--train", str(tmp_path / "nothere.tsv")])
    with pytest.raises(ValueError, match="tokenizer"):
        main(["epoch", "--impl", "jaxkd", "--teacher", common.RANDOM_BASE,
                    "--train", str(tmp_path)])


@pytest.mark.slow  # the CLI end to end (test_jaxkd_epoch_runs_the_trainers_step_loop: fast)
def test_epoch_squad_cli_same_windows_on_both_sides(tiny_teacher, tiny_squad, capsys):
    """jaxkd's windows and the PyTorch loop's (transformers' overflowing tokens) are as many."""
    pytest.importorskip("torch")
    counts = {}
    for impl in ("jaxkd", "torch"):
        main(["epoch", "--task", "squad", "--impl", impl, "--teacher", str(tiny_teacher),
                    "--train", str(tiny_squad), "--limit", "8", "--batch", "4", "--student-layers", "1",
                    "--max-seq-len", "24"])
        out = capsys.readouterr().out
        counts[impl] = int(re.search(rf"{impl}: \d+ examples in (\d+) steps", out).group(1))
        assert 0 < float(out.strip().splitlines()[-1]) < math.inf
    # 8 questions in windows of 24 tokens: more windows than questions, the same on both sides.
    assert counts["jaxkd"] == counts["torch"] >= 3


@pytest.mark.slow
def test_jaxkd_epoch_runs_the_trainers_step_loop(tiny_teacher, tiny_tsv, capsys, monkeypatch):
    """The jaxkd side times jaxkd.loop.run_steps over one epoch of jaxkd.loop.train_batches, as
    the distill stage runs them; compilation falls inside the epoch, so warm and cold are data,
    the teacher cache (read or filled) and the epoch's steps."""
    from jaxkd import loop

    calls = []

    def spy(step_fn, state, batches, **kw):
        calls.append((type(batches), kw["stop"], kw["start"] if "start" in kw else 0))
        return run_steps(step_fn, state, batches, **kw)

    run_steps = loop.run_steps
    monkeypatch.setattr(loop, "run_steps", spy)
    main(["epoch", "--impl", "jaxkd", "--teacher", str(tiny_teacher), "--train", str(tiny_tsv),
          "--limit", "20", "--batch", "4", "--student-layers", "1", "--max-seq-len", "16"])
    out = capsys.readouterr().out
    assert [(kind.__name__, stop, start) for kind, stop, start in calls] == [("TrainBatches", 5, 0)]
    result = json.loads(next(line for line in out.splitlines()
                             if line.startswith(common.RESULT))[len(common.RESULT):])
    assert "compile_s" not in result and result["steps"] == 5 and result["shapes"] >= 1
    assert result["warm_s"] == pytest.approx(result["data_s"] + result["cache_read_s"] + result["epoch_s"])
    assert result["cold_s"] == pytest.approx(result["data_s"] + result["cache_fill_s"] + result["epoch_s"])
