"""`jaxkd.exported`: the settings a run exports with a model (and transformers still loading the
directory), their precedence under flags and configs, and input line numbers."""
import io
import json

import jax
import pytest

from helpers import tiny_model_config
from jaxkd import exported, tasks
from jaxkd.data import DataConfig
from jaxkd.hf import SETTINGS_KEY, save_hf
from jaxkd.model import HeadConfig, init_params
from jaxkd.tasks import qa, sequence, token

QA_MODEL = tiny_model_config(qa.HEAD.kind, 2, vocab_size=128, num_layers=1, max_position_embeddings=512)


def _settings(name, **data):
    data_cfg = DataConfig(**data)
    return exported.export_settings(tasks.resolve(tasks.task_config(name=name), data_cfg), data_cfg)


def test_export_settings_of_each_kind():
    assert _settings("mrpc", max_seq_len=64) == {
        "task_type": sequence.TYPE, "task_name": "mrpc", "labels": ["not_equivalent", "equivalent"],
        "max_seq_len": 64, "text": "sentence1", "text_pair": "sentence2"}
    found = _settings("conll2003", max_seq_len=256)
    assert found["task_type"] == token.TYPE and found["max_seq_len"] == 256
    assert found["tokens"] == "tokens" and found["tag_scheme"] == "iob2"
    assert found["labels"][0] == "O" and "doc_stride" not in found
    assert _settings("squad", max_seq_len=384, doc_stride=128) == {
        "task_type": qa.TYPE, "task_name": "squad", "labels": ["start", "end"],
        "max_seq_len": 384, "doc_stride": 128}
    assert _settings("squad", max_seq_len=384)["doc_stride"] == 96  # data.window_stride
    stsb = _settings("stsb")
    assert stsb["labels"] == [] and stsb["max_seq_len"] == 128
    json.dumps(stsb)  # JSON-able as is


@pytest.fixture(scope="module")
def qa_export(tmp_path_factory):
    """A tiny BertForQuestionAnswering exported with a SQuAD run's settings."""
    cfg = QA_MODEL
    params = init_params(cfg, jax.random.key(0))
    settings = _settings("squad", max_seq_len=384, doc_stride=128)
    return save_hf(cfg, params, tmp_path_factory.mktemp("qa") / "student", settings=settings), settings


def test_settings_round_trip_and_transformers_still_loads(qa_export):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    directory, settings = qa_export
    raw = json.loads((directory / "config.json").read_text())
    assert raw[SETTINGS_KEY] == settings
    config = transformers.AutoConfig.from_pretrained(directory)
    assert getattr(config, SETTINGS_KEY) == settings  # kept as an attribute
    model, info = transformers.BertForQuestionAnswering.from_pretrained(directory,
                                                                        output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.to_dict()[SETTINGS_KEY] == settings
    assert exported.inspect_model(directory).settings == settings


def test_save_hf_refuses_settings_it_cannot_write(tmp_path):
    cfg = QA_MODEL
    for bad, error in (([("max_seq_len", 8)], TypeError), ({"when": object()}, TypeError)):
        with pytest.raises(error):
            save_hf(cfg, {}, tmp_path / "out", settings=bad)
        assert not (tmp_path / "out").exists()  # refused before anything is written


def _info(kind_module, settings):
    return exported.ModelInfo(directory=None, hf_config={},
                              head=HeadConfig(kind=kind_module.HEAD.kind, num_labels=2),
                              label_names=("a", "b"), max_length=512, vocab_size=128,
                              settings=settings)


def test_run_settings_precedence():
    info = _info(qa, {"max_seq_len": 384, "doc_stride": 128})
    none = dict.fromkeys(exported.DATA_KEYS)
    got = exported.run_settings(info, none)
    assert got.values == {"max_seq_len": 384, "doc_stride": 128, "batch_size": 32, "bucket_multiple": 8}
    assert got.origins == {"max_seq_len": "model", "doc_stride": "model", "batch_size": "default",
                           "bucket_multiple": "default"}
    assert got.data_config().window_stride == 128
    # A flag wins; the model's stride stays with its own length only.
    got = exported.run_settings(info, {**none, "max_seq_len": 256})
    assert got.values["doc_stride"] is None and got.data_config().window_stride == 64
    got = exported.run_settings(info, {**none, "max_seq_len": 384})
    assert (got.values["doc_stride"], got.origins["doc_stride"]) == (128, "model")
    got = exported.run_settings(info, {**none, "doc_stride": 100})
    assert got.values["doc_stride"] == 100 and got.origins["doc_stride"] == "--doc-stride"
    # A training config describes its run: the model's settings are not consulted.
    config = {"max_seq_len": 200, "doc_stride": None, "batch_size": 16, "bucket_multiple": 8}
    got = exported.run_settings(info, none, config=config)
    assert set(got.origins.values()) == {"config"}
    base = DataConfig(max_seq_len=200, batch_size=16, eval_batch_size=64)
    assert got.data_config(base) == base  # eval_batch_size untouched without a flag
    got = exported.run_settings(info, {**none, "batch_size": 8}, config=config)
    assert got.data_config(base).eval_batch_size == 8
    # Without settings: the built-in defaults.
    got = exported.run_settings(_info(qa, {}), none)
    assert got.values["max_seq_len"] == 128 and got.data_config().window_stride == 32


def test_run_settings_columns_from_the_model():
    info = _info(sequence, {"max_seq_len": 64, "text": "review", "text_pair": "reply",
                            "tokens": "words"})
    got = exported.run_settings(info, {"text": "body"}, columns=True)
    assert got.values["text"] == "body" and got.origins["text"] == "--text"
    assert got.values["text_pair"] == "reply" and got.origins["text_pair"] == "model"
    assert "tokens" not in got.values  # not a column of this kind
    assert "tokens" not in exported.run_settings(info, {}).values


def test_bad_settings_are_a_usage_error(qa_export, tmp_path):
    directory, _ = qa_export
    raw = json.loads((directory / "config.json").read_text())
    for bad, message in (("x", "must be an object"), ({"max_seq_len": 0}, "max_seq_len must be"),
                         ({"doc_stride": "96"}, "doc_stride must be")):
        (tmp_path / "config.json").write_text(json.dumps({**raw, SETTINGS_KEY: bad}))
        with pytest.raises(exported.UsageError, match=message):
            exported.inspect_model(tmp_path)


def test_load_input_lines(sst2_task, tmp_path):
    data_cfg = DataConfig()
    examples, lines = exported.load_input(sst2_task, data_cfg, "-",
                                          stdin=io.StringIO("\nfine film\n\n \t\nbad\r\nok"))
    assert lines == [2, 5, 6] and examples.texts == ["fine film", "bad", "ok"]
    path = tmp_path / "in.tsv"
    path.write_text("sentence\tlabel\na\t1\n\nb\t0\n")
    examples, lines = exported.load_input(sst2_task, data_cfg, str(path))
    assert lines == [1, 2] and examples.texts == ["a", "b"]
    with pytest.raises(exported.UsageError, match="no input lines"):
        exported.load_input(sst2_task, data_cfg, "-", stdin=io.StringIO("\n \n"))


def test_load_input_names_the_format_as_the_user_sets_it(sst2_task, tmp_path):
    path = tmp_path / "in.data"
    path.write_text("sentence\na\n")
    with pytest.raises(exported.UsageError) as err:
        exported.load_input(sst2_task, DataConfig(), str(path), format_flag="--format")
    assert "pass --format" in str(err.value) and "data.format" not in str(err.value)
    with pytest.raises(exported.UsageError, match="set data.format"):
        exported.load_input(sst2_task, DataConfig(), str(path))
    _, lines = exported.load_input(sst2_task, DataConfig(format="tsv"), str(path))
    assert lines == [1]

