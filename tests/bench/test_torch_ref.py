"""jaxkd.bench.torch_ref: the PyTorch side's labels and SQuAD windows, and the reference step
under bf16 autocast."""
import pytest

from jaxkd.bench import epoch, torch_ref


def test_first_subtoken_labels_mask_the_rest():
    # [CLS] w0 w1 w1 w2 [SEP]: only the first sub-token of each word keeps its tag.
    assert torch_ref.first_subtoken_labels([None, 0, 1, 1, 2, None], [5, 3, 0]) == [-100, 5, 3, -100, 0, -100]


@pytest.mark.slow
def test_torch_autocast_command_runs_the_script_under_bf16_autocast(tmp_path):
    pytest.importorskip("torch")
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text("import sys, torch\n"
                      "x = torch.ones(2, 2)\n"
                      "print(sys.argv[1:], (x @ x).dtype, __name__)\n")
    for dtype, seen in (("float32", "torch.float32"), ("bfloat16", "torch.bfloat16")):
        out = subprocess.run(torch_ref.torch_step_cmd(script, ["--steps", "1"], dtype), check=True,
                             capture_output=True, text=True).stdout
        assert out.strip() == f"['--steps', '1'] {seen} __main__"


def test_squad_features_label_the_answer_tokens(tiny_teacher, tiny_squad):
    """The PyTorch side's windows: the labelled tokens spell the answer, or point at [CLS] when
    the window does not hold it whole; every question has a window with its answer."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tiny_teacher))
    setup = epoch.EpochSetup(teacher=str(tiny_teacher), train=str(tiny_squad), limit=None,
                             task="squad", batch=4, max_seq_len=24)
    features = torch_ref.squad_features(setup, tokenizer)
    rows = torch_ref.read_squad(setup)
    assert len(rows) == 12 and len(features) > 12  # contexts longer than a window: several each
    spelled = [tokenizer.decode(f["input_ids"][f["labels"][0]:f["labels"][1] + 1]) for f in features
               if f["labels"] != [0, 0]]
    assert set(spelled) == {answer for _, _, answer, _ in rows}
