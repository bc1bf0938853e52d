"""distill.search (jaxkd.search): the grid, the choice, and the record a resumed search
continues from."""
import json
import math

import pytest

from jaxkd import search
from jaxkd.config import ConfigError, from_dict


def test_the_grid_is_temperature_outer_and_takes_the_section_values_where_a_key_lists_none():
    grid = search.SearchConfig(temperature=(1.0, 4.0), alpha=(0.5, 0.9)).candidates(2.0, 0.3)
    assert grid == [{"temperature": 1.0, "alpha": 0.5}, {"temperature": 1.0, "alpha": 0.9},
                    {"temperature": 4.0, "alpha": 0.5}, {"temperature": 4.0, "alpha": 0.9}]
    assert search.SearchConfig(alpha=(0.1, 0.7)).candidates(3.0, 0.5) == [
        {"temperature": 3.0, "alpha": 0.1}, {"temperature": 3.0, "alpha": 0.7}]


def test_choose_takes_the_highest_the_first_on_a_tie_and_never_nan():
    results = [{"eval": {"f1": v}} for v in (0.5, math.nan, 0.7, 0.7, 0.6)]
    assert search.choose(results, "f1") == 2
    with pytest.raises(ValueError, match="no search candidate has a finite eval f1"):
        search.choose([{"eval": {"f1": math.nan}}], "f1")


def test_min_gain_keeps_the_sections_setting_unless_a_candidate_beats_it_by_more():
    results = [{"eval": {"f1": v}} for v in (0.850, 0.853, 0.8545, math.nan)]
    assert search.choose(results, "f1", default=1, min_gain=0.002) == 1  # 0.0015 above: kept
    assert search.choose(results, "f1", default=0, min_gain=0.002) == 2  # 0.0045 above: replaced
    assert search.choose(results, "f1", default=1) == 2  # no margin: the best
    assert search.choose(results, "f1", default=None, min_gain=0.01) == 2  # not in the grid
    assert search.choose(results, "f1", default=3, min_gain=0.01) == 2  # the section's is NaN
    # exactly min_gain above is not more, float rounding notwithstanding (0.903 - 0.9 > 0.003)
    assert 0.903 - 0.900 > 0.003
    assert search.choose([{"eval": {"f1": v}} for v in (0.900, 0.903)], "f1", default=0,
                         min_gain=0.003) == 0


def test_run_keeps_the_sections_setting_within_min_gain(tmp_path):
    cfg = search.SearchConfig(temperature=(1.0, 2.0, 4.0), steps=3, min_gain=0.05)
    scores = {1.0: 0.60, 2.0: 0.70, 4.0: 0.74}
    out = search.run(cfg, temperature=2.0, alpha=0.5, metric="accuracy", workdir=tmp_path,
                     train=lambda i, s: ({"accuracy": scores[s["temperature"]]}, 1.0))
    assert out["setting"] == {"temperature": 2.0, "alpha": 0.5} and out["min_gain"] == 0.05


@pytest.mark.parametrize("section, message", [
    ({"search": {"steps": 10}}, "distill.search lists no candidates"),
    ({"search": {"alpha": [0.0, 0.5]}}, r"alpha values must be in \(0, 1\]"),
    ({"search": {"temperature": [-1.0]}}, "temperature values must be positive"),
    ({"search": {"temperature": [1.0], "steps": 0}}, "steps must be >= 1"),
    ({"search": {"temperature": [1.0], "min_gain": -0.1}}, "min_gain must be >= 0"),
    ({"search": {"temprature": [1.0]}}, "did you mean 'temperature'"),
    ({"alpha": 0.0, "search": {"temperature": [1.0]}}, "distill.alpha is 0"),
    ({"alpha": 0.0, "baseline": True}, "distill.baseline compares KD with training on the labels alone"),
])
def test_bad_sections_are_refused_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"distill": section})


def test_run_trains_each_candidate_once_and_a_rerun_continues_from_the_record(tmp_path):
    cfg = search.SearchConfig(temperature=(1.0, 2.0, 4.0), steps=7)
    scores = {1.0: 0.6, 2.0: 0.8, 4.0: 0.7}
    trained = []

    def train(i, setting):
        trained.append(i)
        if i == 1 and len(trained) == 2:
            raise KeyboardInterrupt  # the run stops during candidate 1
        return {"accuracy": scores[setting["temperature"]], "loss": 0.0}, 1.5

    with pytest.raises(KeyboardInterrupt):
        search.run(cfg, temperature=2.0, alpha=0.5, metric="accuracy", workdir=tmp_path, train=train)
    record = json.loads((tmp_path / search.RECORD).read_text())
    assert [c["temperature"] for c in record["candidates"]] == [1.0] and record["chosen"] is None
    out = search.run(cfg, temperature=2.0, alpha=0.5, metric="accuracy", workdir=tmp_path, train=train)
    assert trained == [0, 1, 1, 2]  # candidate 0 was not trained again
    assert out["chosen"] == 1 and out["setting"] == {"temperature": 2.0, "alpha": 0.5}
    assert out["seconds"] == 4.5 and [c["steps"] for c in out["candidates"]] == [7, 7, 7]
    assert json.loads((tmp_path / search.RECORD).read_text())["chosen"] == 1
    # Finished: a rerun trains nothing and chooses the same; another grid is refused.
    assert search.run(cfg, temperature=2.0, alpha=0.5, metric="accuracy", workdir=tmp_path,
                      train=train)["chosen"] == 1 and trained == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="another search's candidates"):
        search.run(search.SearchConfig(temperature=(8.0,)), temperature=2.0, alpha=0.5,
                   metric="accuracy", workdir=tmp_path, train=train)
