"""Transfer data: unlabeled text and augmented variants, labelled by the teacher alone.

Augmentation against independent word-level expectations (neighbours recomputed here with NumPy
from the embedding matrix), batch composition, the hard-label weight of transfer rows in a step
against NumPy, config errors before any work, and a tiny pipeline run with both sources."""
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from helpers import (NEIGHBOURS as K, ROOT, TRANSFER_VOCAB as VOCAB, assert_kill_resume_matches,
                     expected_neighbours, run_in_process, synthetic_encoded, tiny_config,
                     tiny_model_config)
from jaxkd import cache as cache_lib
from jaxkd import config as config_lib
from jaxkd import data, hf, plan, steps, transfer, util
from jaxkd.config import ConfigError
from jaxkd.losses import LossConfig
from jaxkd.model import apply_model, init_params, word_embeddings
from jaxkd.tasks import sequence, task_config

# Fixtures of conftest.py: tiny_teacher, sst2_small (the pipeline's random checkpoint and SST-2
# sample), small_tokenizer and embeddings (of helpers.TRANSFER_VOCAB: a WordPiece vocabulary small enough to know every whole word by
# eye; "unbelievable" splits into three pieces).

SENTENCES = ["the movie was very good .", "a dull plot , not fun !", "the cast is unbelievable",
             "great actor", "awful"]


def augment(texts, pairs, tokenizer, embeddings_VxE, **settings):
    cfg = transfer.AugmentConfig(**{"factor": 6, "neighbours": K, **settings})
    table = transfer.word_table(tokenizer, embeddings_VxE, list(texts) + list(pairs or []), K)
    return transfer.augment_texts(texts, pairs, cfg, table)


# ----------------------------------------------------------------------------- augmentation


def test_same_seed_same_set_other_seed_another_and_factor_rows(small_tokenizer, embeddings):
    settings = dict(mask_prob=0.2, replace_prob=0.3, ngram_prob=0.3)
    first = augment(SENTENCES, None, small_tokenizer, embeddings, seed=1, **settings)
    again = augment(SENTENCES, None, small_tokenizer, embeddings, seed=1, **settings)
    other = augment(SENTENCES, None, small_tokenizer, embeddings, seed=2, **settings)
    assert first == again
    assert first[0] != other[0]
    assert len(first[0]) == 6 * len(SENTENCES) and first[1] is None
    # Example i's variants depend on (seed, i) only: the same example alone gives the same rows.
    cfg = transfer.AugmentConfig(factor=6, neighbours=K, seed=1, **settings)
    table = transfer.word_table(small_tokenizer, embeddings, SENTENCES, K)
    alone = transfer.augment_example(2, (SENTENCES[2],), cfg, table)
    assert [v[0] for v in alone] == first[0][12:18]


def test_masks_and_replacements_fall_on_whole_words(small_tokenizer, embeddings):
    texts, _ = augment(SENTENCES * 4, None, small_tokenizer, embeddings, mask_prob=0.3,
                       replace_prob=0.5, ngram_prob=0.0)
    replaced = masked = 0
    for k, variant in enumerate(texts):
        original = (SENTENCES * 4)[k // 6].split()
        words = variant.split()
        assert len(words) == len(original)  # n-grams off: word for word
        for before, after in zip(original, words):
            if after == before:
                continue
            if after == "[MASK]":
                masked += 1
                continue
            # Only a single whole-word entry has neighbours; "unbelievable" (three pieces) has none.
            assert before in VOCAB and after in expected_neighbours(before, embeddings), (before, after)
            replaced += 1
    assert replaced > 20 and masked > 10


def test_whole_word_vocabulary_leaves_out_pieces_and_specials(small_tokenizer):
    ids, texts = transfer.whole_words(small_tokenizer)
    assert texts == [t for t in VOCAB if not t.startswith("##") and not t.startswith("[")]
    assert [VOCAB[i] for i in ids] == texts


def test_kept_words_change_no_other_words_fate():
    """A kept word still takes its draws, so every other word (and the n-gram) comes out as it
    would without `keep`."""
    words = [f"w{i}" for i in range(40)]
    table = transfer.WordTable("[MASK]", {w: tuple(f"{w}-{j}" for j in range(7)) for w in words})
    cfg = transfer.AugmentConfig(mask_prob=0.2, replace_prob=0.6, ngram_prob=0.5)
    keep = [i % 3 == 0 for i in range(len(words))]
    differed = 0
    for seed in range(20):
        free = transfer.augment_words(words, np.random.default_rng(seed), cfg, table)
        kept = transfer.augment_words(words, np.random.default_rng(seed), cfg, table, keep)
        assert len(kept) == len(free)  # the same n-gram
        for a, b in zip(free, kept):
            if a != b:  # only a kept word differs, and it is the word its draw would change
                assert b in words and keep[words.index(b)]
                assert a == "[MASK]" or a.startswith(b + "-")
                differed += 1
        if len(kept) == len(words):  # no n-gram cut: every kept word is where it was, as it was
            assert all(k == w for k, w, on in zip(kept, words, keep) if on)
    assert differed > 0  # keep changed some words' fate: the checks above are not vacuous


def test_ngrams_are_contiguous_runs_of_the_original_words(small_tokenizer, embeddings):
    texts, _ = augment(SENTENCES, None, small_tokenizer, embeddings, mask_prob=0.0,
                       replace_prob=0.0, ngram_prob=1.0)
    sizes = set()
    for k, variant in enumerate(texts):
        original, words = SENTENCES[k // 6].split(), variant.split()
        n = len(words)
        assert 1 <= n <= min(5, len(original))
        assert any(original[s:s + n] == words for s in range(len(original) - n + 1)), variant
        sizes.add(n)
    assert len(sizes) >= 3  # n is drawn, not fixed


def test_pairs_keep_both_sides_each_augmented_on_its_own(small_tokenizer, embeddings):
    left = ["the movie was very good .", "a dull plot , not fun !"]
    right = ["the film is great !", "awful story"]
    texts, pairs = augment(left, right, small_tokenizer, embeddings, mask_prob=0.0,
                           replace_prob=0.0, ngram_prob=1.0, factor=20)
    assert len(texts) == len(pairs) == 40
    for k, (a, b) in enumerate(zip(texts, pairs)):
        assert a.strip() and b.strip()
        assert a in _runs(left[k // 20]) and b in _runs(right[k // 20])
    # Independent draws: the two sides' n-gram lengths are not tied together.
    assert len({(len(a.split()), len(b.split())) for a, b in zip(texts, pairs)}) > 3


def _runs(text: str) -> set[str]:
    words = text.split()
    return {" ".join(words[s:s + n]) for n in range(1, 6) for s in range(len(words) - n + 1)}


def _cached_files(directory):
    """The cache's data files (each has its check record beside it)."""
    return [p for p in directory.iterdir() if not p.name.endswith(util.CHECK_SUFFIX)]


def test_augmented_set_is_cached_on_disk(small_tokenizer, embeddings, tmp_path):
    cfg = transfer.AugmentConfig(factor=3, neighbours=K, seed=5)
    built = transfer.augmented_set(tmp_path, SENTENCES, None, cfg, small_tokenizer, lambda: embeddings)
    assert len(_cached_files(tmp_path)) == 1
    reread = transfer.augmented_set(tmp_path, SENTENCES, None, cfg, small_tokenizer, lambda: embeddings)
    assert reread == built and len(built[0]) == 15
    other = transfer.augmented_set(tmp_path, SENTENCES, None, transfer.AugmentConfig(
        factor=3, neighbours=K, seed=6), small_tokenizer, lambda: embeddings)
    assert other != built and len(_cached_files(tmp_path)) == 2
    pairs = transfer.augmented_set(tmp_path, SENTENCES, SENTENCES[::-1], cfg, small_tokenizer,
                                   lambda: embeddings)
    assert len(pairs[1]) == 15 and pairs == transfer.augmented_set(
        tmp_path, SENTENCES, SENTENCES[::-1], cfg, small_tokenizer, lambda: embeddings)
    assert len(_cached_files(tmp_path)) == 3


# ----------------------------------------------------------------------------- loading


def test_unlabeled_file_ignores_its_label_column(tmp_path):
    path = tmp_path / "more.tsv"
    path.write_text("sentence\tlabel\ngood fun\tnot-a-label\nsome text\t\n", encoding="utf-8")
    task = sequence.resolve(task_config("sst2"))
    examples = task.load_unlabeled(data.DataConfig(), str(path))
    assert examples.texts == ["good fun", "some text"] and not examples.has_labels
    assert examples.labels.tolist() == [-1, -1]
    (tmp_path / "bad.tsv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(data.DataError, match="no column 'sentence'"):
        task.load_unlabeled(data.DataConfig(), str(tmp_path / "bad.tsv"))


# ----------------------------------------------------------------------------- batches


def _mixed(num_labelled=29, num_transfer=50):
    labelled = synthetic_encoded(num_labelled)
    extra = synthetic_encoded(num_transfer, seed=1)
    return data.with_transfer(labelled, [extra]), labelled, extra


def test_transfer_batch_size_rounds_to_processes():
    assert data.transfer_batch_size(32, 0.5) == 16
    assert data.transfer_batch_size(8, 0.01) == 1 and data.transfer_batch_size(8, 0.99) == 7
    assert data.transfer_batch_size(8, 0.3, process_count=4) == 4
    with pytest.raises(data.DataError, match="at least 8"):
        data.transfer_batch_size(6, 0.5, process_count=4)


def test_unlabeled_ratio_gives_the_batch_composition():
    encoded, labelled, extra = _mixed()
    per_batch = data.transfer_batch_size(8, 0.25)
    batches = data.MixedBatches(encoded, 8, per_batch, seed=3, bucket_multiple=8, max_seq_len=32)
    assert per_batch == 2 and batches.epoch_steps == 29 // 6
    seen = []
    for _ in range(batches.epoch_steps):
        batch = next(batches)
        transfer_rows = batch["index"] >= len(labelled)
        assert transfer_rows.tolist() == [False] * 6 + [True] * 2
        assert batch["hard_weights"].tolist() == [1.0] * 6 + [0.0] * 2
        assert (batch["weights"] == 1).all()
        for row, i in enumerate(batch["index"]):
            ids = batch["input_ids"][row][batch["attention_mask"][row] > 0]
            source = labelled if i < len(labelled) else extra
            j = i if i < len(labelled) else i - len(labelled)
            np.testing.assert_array_equal(ids, source.input_ids[source.offsets[j]:source.offsets[j + 1]])
        seen += batch["index"][:6].tolist()
    assert len(set(seen)) == len(seen) == 24  # one pass over the labelled rows per epoch


def test_mixed_batches_resume_and_split_over_processes():
    encoded, _, _ = _mixed()
    kwargs = dict(seed=3, bucket_multiple=8, max_seq_len=32)
    whole = data.MixedBatches(encoded, 8, 4, **kwargs)
    expected = [next(whole) for _ in range(12)]
    first = data.MixedBatches(encoded, 8, 4, **kwargs)
    for _ in range(5):
        next(first)
    resumed = data.MixedBatches(encoded, 8, 4, position=json.loads(json.dumps(first.position)),
                                **kwargs)
    for want in expected[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    parts = [data.MixedBatches(encoded, 8, 4, process_index=p, process_count=2, **kwargs)
             for p in range(2)]
    for want in expected[:4]:
        got = [next(p) for p in parts]
        for g in got:  # each process: its labelled share, then its transfer share
            assert g["hard_weights"].tolist() == [1.0, 1.0, 0.0, 0.0]
        np.testing.assert_array_equal(np.sort(np.concatenate([g["index"] for g in got])),
                                      np.sort(want["index"]))


# ----------------------------------------------------------------------------- the step



def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# The regression case is slow (another compile of the step; still run in CI).
@pytest.mark.parametrize("regression", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_transfer_rows_weigh_zero_in_the_hard_loss_and_fully_in_kd(regression):
    num_labels = 1 if regression else 3
    cfg = tiny_model_config("sequence", num_labels, vocab_size=2000, num_layers=1,
                            hidden_dropout=0.0, attention_dropout=0.0)
    labelled = synthetic_encoded(29)
    if regression:
        labelled = data.Encoded(labelled.input_ids, labelled.token_type_ids, labelled.offsets,
                                labelled.labels.astype(np.float32) / 2, True)
    extra = synthetic_encoded(40, seed=1)
    # Transfer rows carry "no label": -1, or NaN for a regression.
    no_label = np.full(len(extra), np.nan if regression else -1, labelled.labels.dtype)
    extra = data.Encoded(extra.input_ids, extra.token_type_ids, extra.offsets, no_label, False)
    encoded = data.with_transfer(labelled, [extra])
    table = np.random.default_rng(4).normal(size=(len(encoded), num_labels)).astype(np.float32)
    batch = next(data.MixedBatches(encoded, 8, 4, seed=0, bucket_multiple=8, max_seq_len=32))
    batch = cache_lib.TeacherLogits(table, encoded, per_token=False).attach(batch)
    params = init_params(cfg, jax.random.key(1))
    loss_cfg = LossConfig(alpha=0.3, temperature=2.0)
    state = steps.TrainState.create(params, optax.sgd(0.1))
    step = jax.jit(steps.make_distill_step(cfg, cfg, loss_cfg, teacher="cached"))
    _, metrics = step(state, None, batch, jax.random.key(0))

    s = np.asarray(jax.jit(steps.make_logits_fn(cfg))(params, batch), np.float64)
    t = batch["teacher_logits"].astype(np.float64)
    labelled_rows = batch["index"] < len(labelled)
    assert labelled_rows.tolist() == [True] * 4 + [False] * 4
    if regression:
        kd = np.mean((s[:, 0] - t[:, 0]) ** 2)
        hard = np.mean((s[labelled_rows, 0] - batch["labels"][labelled_rows]) ** 2)
        hard_name = "loss/mse"
    else:
        T = loss_cfg.temperature
        t_logp, s_logp = _log_softmax(t / T), _log_softmax(s / T)
        kd = np.mean((np.exp(t_logp) * (t_logp - s_logp)).sum(-1)) * T**2
        y = batch["labels"][labelled_rows]
        hard = np.mean(-_log_softmax(s[labelled_rows])[np.arange(len(y)), y])
        hard_name = "loss/ce"
        np.testing.assert_allclose(metrics["accuracy"], np.mean(s[labelled_rows].argmax(-1) == y))
    np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-5)
    np.testing.assert_allclose(metrics[hard_name], hard, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/total"], 0.3 * kd + 0.7 * hard, rtol=1e-5)
    assert np.isfinite(metrics["grad_norm"])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("mapping, message", [
    ({"data": {"unlabeled": "more.tsv"}, "distill": {"alpha": 0.0}},
     r"data.unlabeled .* needs distill.alpha > 0"),
    ({"distill": {"alpha": 0.0, "augment": {}}}, r"distill.augment .* needs distill.alpha > 0"),
    ({"task": {"name": "squad"}, "distill": {"augment": {}}},
     "distill.augment is not available for question_answering tasks: .*answer spans"),
    ({"task": {"name": "squad"}, "data": {"unlabeled": "more.jsonl"}},
     "data.unlabeled is not available for question_answering"),
    ({"task": {"name": "conll2003"}, "distill": {"augment": {"factor": 2}}},
     "ngram_prob must be 0 for token_classification"),
    ({"distill": {"augment": {"mask_prb": 0.2}}}, "did you mean 'mask_prob'"),
    ({"distill": {"augment": {"mask_prob": 1.5}}}, r"mask_prob must be a probability in \[0, 1\]"),
    ({"distill": {"augment": {"ngram_prob": -0.1}}}, r"ngram_prob must be a probability"),
    ({"distill": {"augment": {"mask_prob": 0.6, "replace_prob": 0.6}}}, "at most 1"),
    ({"distill": {"augment": {"factor": 0}}}, "factor must be a positive integer"),
    ({"data": {"unlabeled": "more.tsv", "unlabeled_ratio": 1.0}}, r"unlabeled_ratio must be in \(0, 1\)"),
    ({"data": {"unlabeled": []}}, "at least one file"),
    ({"data": {"unlabeled_max_rows": 10}}, "caps the rows of data.unlabeled, which is not set"),
    ({"data": {"unlabeled": "more.tsv", "unlabeled_max_rows": 0}},
     "unlabeled_max_rows must be a positive integer"),
])
def test_bad_transfer_config_is_refused_when_read(mapping, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.from_dict(mapping)


def test_check_refuses_bad_transfer_config_before_work(tmp_path, capsys):
    from jaxkd import launch
    code = launch.main(["--check", f"workdir={tmp_path / 'run'}", "data.train=missing.tsv",
                        "data.unlabeled=more.tsv", "distill.alpha=0"])
    assert code == 2 and "needs distill.alpha > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the pipeline


def _unlabeled_file(directory: pathlib.Path) -> pathlib.Path:
    """40 rows of glue_dev.tsv (not in sst2_small), their label column kept (it is ignored)."""
    lines = (ROOT / "data" / "sst2" / "glue_dev.tsv").read_text(encoding="utf-8").splitlines()
    path = directory / "more.tsv"
    path.write_text("\n".join([lines[0]] + lines[300:340]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("sizes, limit", [((40, 60), 50), ((5, 0, 300), 17), ((3, 4), 7), ((3, 4), 100)])
def test_sample_rows_keeps_a_fixed_count_of_rows_of_every_source_in_file_order(sizes, limit):
    kept = data.sample_rows(sizes, limit)
    assert [k.dtype.kind for k in kept] == ["i"] * len(sizes)
    assert sum(map(len, kept)) == min(limit, sum(sizes))
    for rows, n in zip(kept, sizes):
        assert np.all(np.diff(rows) > 0) and (len(rows) == 0 or 0 <= rows[0] <= rows[-1] < n)
    again = data.sample_rows(sizes, limit)
    assert all(np.array_equal(a, b) for a, b in zip(kept, again))


def test_sample_rows_shares_follow_the_source_sizes():
    """Each source keeps about its share of the rows: within 4 sd of the hypergeometric
    count of a uniform draw without replacement."""
    sizes, limit = (1_000, 3_000, 6_000), 2_000
    kept = data.sample_rows(sizes, limit)
    total = sum(sizes)
    for rows, n in zip(kept, sizes):
        mean = limit * n / total
        sd = np.sqrt(limit * n / total * (1 - n / total) * (total - limit) / (total - 1))
        assert abs(len(rows) - mean) < 4 * sd


def test_unlabeled_max_rows_keeps_the_same_rows_in_file_order_for_every_seed(
        tmp_path, tiny_teacher, sst2_small):
    lines = (ROOT / "data" / "sst2" / "glue_dev.tsv").read_text(encoding="utf-8").splitlines()
    files = []
    for name, part in (("a.tsv", lines[300:340]), ("b.tsv", lines[340:400])):
        files.append(tmp_path / name)
        files[-1].write_text("\n".join([lines[0]] + part) + "\n", encoding="utf-8")
    texts = {str(f): [row.split("\t")[0] for row in f.read_text().splitlines()[1:]] for f in files}

    def transfer_rows(seed):
        cfg = config_lib.from_dict(tiny_config(tmp_path / f"run{seed}", tiny_teacher, sst2_small, **{
            "seed": seed, "data.unlabeled": [str(f) for f in files], "data.unlabeled_max_rows": 50}))
        prepared = plan.prepare(cfg, write_cache=False)
        return prepared, [(s.source, s.examples.texts) for s in prepared.unlabeled]

    prepared, rows = transfer_rows(0)
    assert rows == transfer_rows(1)[1]
    assert sum(len(kept) for _, kept in rows) == 50
    for (source, kept), path in zip(rows, files):
        whole = texts[str(path)]
        assert source == f"{path} ({len(kept)} of {len(whole)} rows)"
        positions = [whole.index(text) for text in kept]
        assert positions == sorted(positions)  # a subset, in file order
    assert sum(len(s.encoded) for s in prepared.unlabeled) == 50


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, tiny_teacher, sst2_small):
    """One tiny run with both sources: 40 unlabeled rows (their labels ignored) and 2 variants
    of each of the 160 training examples."""
    unlabeled = _unlabeled_file(tmp_path_factory.mktemp("unlabeled"))
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(workdir, tiny_teacher, sst2_small, **{
        "data.unlabeled": [str(unlabeled)], "data.unlabeled_ratio": 0.5,
        "distill.augment": {"factor": 2, "mask_prob": 0.2, "replace_prob": 0.2, "ngram_prob": 0.3,
                            "seed": 7},
        "distill.steps": 8, "distill.eval_every": 8})
    described = plan.describe(config_lib.from_dict(cfg),
                              plan.prepare(config_lib.from_dict(cfg), write_cache=False))
    return dict(cfg=cfg, report=run_in_process(cfg), workdir=workdir, described=described)


@pytest.mark.slow
def test_pipeline_with_unlabeled_and_augmented_rows(transfer_run):
    report, workdir = transfer_run["report"], transfer_run["workdir"]
    stages = json.loads((workdir / "stages.json").read_text())
    assert all(stages[s]["done"] for s in ("teacher", "distill", "export", "report"))
    assert stages["distill"]["rows"] == 160 + 40 + 320
    t = report["transfer"]
    assert t["unlabeled"][0]["rows"] == 40 and t["rows"] == 360
    assert t["augment"] == {"factor": 2, "mask_prob": 0.2, "replace_prob": 0.2, "neighbours": 15,
                            "ngram_prob": 0.3, "seed": 7, "examples": 160, "rows": 320}
    assert (t["rows_per_batch"], t["labelled_rows_per_batch"]) == (4, 4)
    assert json.loads((workdir / "report.json").read_text())["transfer"] == t
    described = transfer_run["described"]
    assert "transfer: 360 rows" in described and "2 x 160 labelled examples = 320 rows" in described
    assert "40 steps per epoch" in described  # 160 labelled rows, 4 per batch


@pytest.mark.slow
def test_cached_teacher_logits_of_augmented_rows_are_the_teachers(transfer_run, sst2_small):
    workdir, cfg = transfer_run["workdir"], transfer_run["cfg"]
    cache_files = sorted((workdir / "cache").glob("teacher_logits-*.npy"))
    assert len(cache_files) == 1
    table = np.load(cache_files[0])
    assert table.shape == (520, 2)
    teacher_cfg, teacher_params = hf.load_hf(workdir / "teacher")
    tokenizer = hf.load_tokenizer(workdir / "teacher")
    train = sequence.resolve(task_config("sst2")).load(data.DataConfig(), str(sst2_small / "train.tsv"))
    augment = config_lib.from_dict(cfg).distill.augment
    texts, _ = transfer.augmented_set(workdir / "cache", train.texts, None, augment, tokenizer,
                                      lambda: word_embeddings(teacher_params))
    assert len(texts) == 320 and texts[:2] != [train.texts[0]] * 2
    picked = [0, 1, 77, 319]
    out = tokenizer([texts[i] for i in picked], truncation=True, max_length=32, padding=True,
                    return_tensors="np")
    logits = apply_model(teacher_cfg, teacher_params, out["input_ids"], out["attention_mask"],
                         out["token_type_ids"]).logits
    np.testing.assert_allclose(table[[200 + i for i in picked]], np.asarray(logits), atol=1e-4)


@pytest.mark.slow
def test_killed_transfer_run_resumes_to_the_same_result(tmp_path, tiny_teacher, sst2_small):
    """Both row groups' positions are saved with the checkpoint and restored."""
    over = {"data.unlabeled": [str(_unlabeled_file(tmp_path))], "distill.augment": {"factor": 2},
            "distill.steps": 60, "distill.eval_every": 30, "checkpoint.every_steps": 8,
            "log.every_steps": 2, "teacher.finetune.steps": 0, "distributed.cpu_devices": 4}
    assert_kill_resume_matches(
        lambda workdir, **o: tiny_config(workdir, tiny_teacher, sst2_small, **o), tmp_path, over, 20)


def test_too_few_transfer_rows_for_a_batch_are_refused_by_the_plan(tmp_path, tiny_teacher,
                                                                    sst2_small):
    """Refused when the run is planned (train.py --check too), not after teacher fine-tuning."""
    cfg = config_lib.from_dict(tiny_config(tmp_path / "run", tiny_teacher, sst2_small, **{
        "data.unlabeled": str(_unlabeled_file(tmp_path)), "data.unlabeled_max_rows": 3,
        "data.unlabeled_ratio": 0.5}))
    with pytest.raises(ConfigError, match=r"3 transfer rows do not fill the 4 transfer rows of "
                                          r"one batch of 8 .*unlabeled_max_rows"):
        plan.prepare(cfg, write_cache=False)
