"""The RoBERTa family's tokenizer in token-classification windows: its specials, and a space
before each pre-split word."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import family_teacher_dir  # noqa: E402
from jaxkd import hf, tasks  # noqa: E402
from jaxkd.data import DataConfig  # noqa: E402


def test_roberta_token_windows_use_its_specials_and_a_space_before_each_word(tmp_path, pair_data):
    teacher = family_teacher_dir(tmp_path / "teacher", "roberta", pair_data)
    tokenizer = hf.load_tokenizer(teacher, words=True)
    task = tasks.resolve(tasks.task_config(name="custom", type="token_classification", labels=["O", "B-X"]))
    (tmp_path / "t.conll").write_text("the O\ncat B-X\nsat O\n\nred B-X\ndog O\n")
    examples = task.load(DataConfig(), str(tmp_path / "t.conll"))
    enc = task.encode(examples, tokenizer, 16)
    plain = hf.load_tokenizer(teacher)  # sentence tasks: no space added before the first word
    first = enc.input_ids[enc.offsets[0]:enc.offsets[1]].tolist()
    assert first == tokenizer("the cat sat")["input_ids"] != plain("the cat sat")["input_ids"]
    assert first[0] == tokenizer.bos_token_id == 0 and first[-1] == tokenizer.eos_token_id == 2
    assert not enc.token_type_ids.any()
