"""Config: YAML + dotted overrides onto typed dataclasses, with errors that name the key."""
import pathlib

import pytest

from jaxkd import config as config_lib
from jaxkd.config import ConfigError

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = config_lib.load_config(path)
    assert cfg.data.batch_size > 0


def test_overrides_are_typed_and_nested():
    cfg = config_lib.load_config(CONFIGS / "sst2.yaml", [
        "distill.temperature=4", "data.batch_size=64", "student.layers=[0,1]",
        "teacher.finetune.steps=0", "distill.layer_map=[[0,1],[1,3]]", "optim.learning_rate=1e-4"])
    assert cfg.distill.temperature == 4.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.data.batch_size == 64
    assert cfg.student.layers == (0, 1)
    assert cfg.teacher.finetune.steps == 0
    assert cfg.distill.layer_map == ((0, 1), (1, 3))
    assert cfg.optim.learning_rate == pytest.approx(1e-4)


def test_misspelled_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"distill.temprature.*did you mean 'temperature'"):
        config_lib.load_config(None, ["distill.temprature=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'dat'.*'data'"):
        config_lib.from_dict({"dat": {"batch_size": 3}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"data.batch_size must be int"):
        config_lib.load_config(None, ["data.batch_size=lots"])
    with pytest.raises(ConfigError, match=r"distill.teacher_cache must be true or false"):
        config_lib.load_config(None, ["distill.teacher_cache=3"])


def test_impossible_values_fail_before_work():
    with pytest.raises(ConfigError, match="alpha"):
        config_lib.load_config(None, ["distill.alpha=1.5"])
    with pytest.raises(ConfigError, match="distill.temperature must be a positive number"):
        config_lib.load_config(None, ["distill.temperature=-1"])
    # Every LossConfig field is a key of the distill section, relation_heads included.
    assert config_lib.load_config(None, ["distill.relation_heads=4"]).distill.relation_heads == 4
    with pytest.raises(ConfigError, match="student.init"):
        config_lib.load_config(None, ["student.init=magic"])
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load_config("/no/such/config.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        config_lib.load_config(None, ["distill.alpha"])
    with pytest.raises(ConfigError, match="seed must be an integer >= 0, got -2"):
        config_lib.load_config(None, ["seed=-2"])


def test_student_export_as_is_checked():
    assert config_lib.load_config(None, ["student.export_as=distilbert"]).student.export_as == "distilbert"
    with pytest.raises(ConfigError, match=r"student.export_as must be .* got 'distilbret' "
                                          r"\(did you mean 'distilbert'\?\)"):
        config_lib.load_config(None, ["student.export_as=distilbret"])
    with pytest.raises(ConfigError, match="student.export_as does not apply to student.init pretrained"):
        config_lib.load_config(None, ["student.export_as=distilbert", "student.init=pretrained",
                                      "student.pretrained=some/dir"])


def test_round_trip_through_yaml(tmp_path):
    cfg = config_lib.load_config(CONFIGS / "mrpc.yaml", ["distill.layer_map=[[0,1]]"])
    config_lib.dump_config(cfg, tmp_path / "c.yaml")
    assert config_lib.load_config(tmp_path / "c.yaml") == cfg


def test_override_text_that_yaml_would_drop_is_kept():
    """`#1 String` is a YAML comment; typed on the command line it means the text itself. An
    empty value or an explicit null unsets the key."""
    cfg = config_lib.load_config(None, ["task.name=mrpc", "task.text=#1 String",
                                        "task.text_pair=#2 String", "task.label=Quality"])
    assert (cfg.task.text, cfg.task.text_pair) == ("#1 String", "#2 String")
    assert config_lib.load_config(None, ["task.text=null"]).task.text is None
    assert config_lib.load_config(None, ["task.text="]).task.text is None
    assert config_lib.load_config(None, ["data.batch_size=64"]).data.batch_size == 64


def test_eval_fraction_is_checked():
    with pytest.raises(ConfigError, match=r"data.eval_fraction must be in \(0, 0.5\)"):
        config_lib.load_config(None, ["data.eval_fraction=0.7"])
    with pytest.raises(ConfigError, match="remove data.eval"):
        config_lib.load_config(None, ["data.eval_fraction=0.1", "data.eval=dev.tsv"])


def test_shipped_configs_never_select_on_the_reported_split():
    for path in sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "experiments").rglob("*.yaml")):
        data = config_lib.load_config(path).data
        assert data.eval is None or data.eval != data.test, path


def test_student_summary_holds_the_keys_of_its_init_only():
    from jaxkd.config import StudentConfig

    layers = StudentConfig(layers=(0, 3)).summary()
    assert layers == {"init": "teacher_layers", "layers": [0, 3], "hidden_dropout": None,
                      "attention_dropout": None, "export_as": None}
    shape = StudentConfig(init="shape", num_layers=4, hidden_size=256).summary()
    assert {k: shape[k] for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")} == \
        {"num_layers": 4, "hidden_size": 256, "num_heads": 12, "intermediate_size": 1200}
    assert "layers" not in shape and "pretrained" not in shape


def test_report_distill_leaves_out_epochs_when_steps_set_the_length():
    from jaxkd.config import DistillConfig
    from jaxkd.report import _distill_summary

    assert "epochs" not in _distill_summary(DistillConfig(steps=318, epochs=3.0), 318)
    by_epochs = _distill_summary(DistillConfig(epochs=2.0), 400)
    assert by_epochs["epochs"] == 2.0 and by_epochs["steps_run"] == 400
