"""Small searches (5 to 20 trials), fed made-up results of known structure: the sensitivity rows and their
intervals, range edges, and the next search's spec (search/refine/sensitivity.py, edges.py, next_search.py).

The made-up task: accuracy rises steeply with log10(learning_rate) over the searched 1e-4..3e-3 (so the best
trials sit at the top edge), lora_dropout does nothing; a little seeded noise on top.
"""
import math
import os

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from search.refine.edges import edge_findings, limits_for
from search.refine.next_search import NEXT_SPEC_FILE, next_name, plan_next_search, write_next_search
from search.refine.sensitivity import enough_for_sensitivity, more_trials_to_tell, sensitivity_table
from search.spec.params import parse_space
from search.store.results import trial_rows
from spaces.kinds import Categorical, Float, PowerOfTwo

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")
LR = (1e-4, 3e-3)


def accuracy(lr: float, noise: float) -> float:
    return 0.40 + 0.2 * (math.log10(lr) - math.log10(LR[0])) + noise


def rows_of(n_complete: int, n_pruned: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for number in range(n_complete + n_pruned):
        lr = float(10 ** rng.uniform(math.log10(LR[0]), math.log10(LR[1])))
        dropout = float(rng.uniform(0.0, 0.2))
        pruned = number >= n_complete
        # a pruned trial stopped after round 1 of 3, 10 points below where it would have ended
        value = accuracy(lr, float(rng.normal(0, 0.01))) - (0.10 if pruned else 0.0)
        rows.append({"number": number, "state": "PRUNED" if pruned else "COMPLETE", "rounds": 1 if pruned else 3,
                     "param_learning_rate": lr, "param_lora_dropout": dropout, "eval_accuracy": value})
    return rows


def test_six_complete_trials_give_every_setting_a_row_with_an_interval():
    rows = rows_of(6)
    assert enough_for_sensitivity(rows) and not enough_for_sensitivity(rows[:3])
    table = {r.param: r for r in sensitivity_table(rows, ["learning_rate", "lora_dropout"], "eval_accuracy", "max")}
    assert set(table) == {"learning_rate", "lora_dropout"}
    lr, dropout = table["learning_rate"], table["lora_dropout"]
    assert lr.rated and lr.rating in ("HIGH", "VERY HIGH") and lr.verdict == lr.rating
    assert lr.impact_ci[0] <= lr.impact_points <= lr.impact_ci[1] and lr.impact_points > lr.noise_floor
    # the setting that does nothing is left open, with how many more trials would tell
    assert not dropout.rated and dropout.verdict.startswith("not yet distinguishable from noise")
    assert dropout.more_trials is None or dropout.more_trials >= 1
    assert "keep searching" in dropout.guidance and (lr.complete, lr.pruned) == (6, 0)


def test_pruned_trials_count_as_marked_lower_fidelity_evidence():
    rows = rows_of(5, n_pruned=3)
    table = {r.param: r for r in sensitivity_table(rows, ["learning_rate"], "eval_accuracy", "max")}
    lr = table["learning_rate"]
    assert (lr.complete, lr.pruned) == (5, 3) and lr.evidence == "5 + 3 pruned"
    assert lr.rated and lr.rating in ("HIGH", "VERY HIGH")


def test_more_trials_estimate_follows_the_noise_floor():
    # the floor shrinks as 1/sqrt(n): an effect at half the floor needs 4x the trials
    assert more_trials_to_tell(6, impact=1.0, floor=2.0) == 18
    assert more_trials_to_tell(6, impact=2.0, floor=2.1) == 1
    assert more_trials_to_tell(6, impact=0.01, floor=2.0) is None and more_trials_to_tell(6, 0.0, 1.0) is None


@pytest.mark.parametrize("kind, best, side, proposed", [
    (Float(1e-4, 3e-3, log=True), 2.9e-3, "high", (1e-4, 1.64e-2)),
    (Float(1e-4, 3e-3, log=True), 1.1e-4, "low", (1.83e-5, 3e-3)),
    (Float(1e-4, 3e-3, log=True), 6e-4, None, None),
    (PowerOfTwo(2, 32), 32, "high", (2, 64)),
    (Categorical((1, 2, 4)), 4, "high", (1, 2, 4, 8)),
    (Categorical((1, 2, 4)), 2, None, None),
])
def test_edges_of_log_ranges_powers_and_ordered_lists(kind, best, side, proposed):
    found = edge_findings({"learning_rate": kind}, {"learning_rate": best}, {})
    if side is None:
        assert found == []
        return
    (edge,) = found
    assert edge.side == side and edge.best == best
    new = edge.proposed
    got = new.choices if isinstance(new, Categorical) else (new.low, new.high)
    assert got == pytest.approx(proposed, rel=1e-2)
    assert "widen it to" in edge.text()


def test_edges_stay_inside_what_the_parameter_allows():
    limits = limits_for("lora")
    # dropout best at 0: the range cannot grow below 0, nothing to flag
    assert edge_findings({"lora_dropout": Float(0.0, 0.2)}, {"lora_dropout": 0.0}, limits) == []
    # dropout best at the top of 0..0.8: widened, but below 1 (an open bound)
    (edge,) = edge_findings({"lora_dropout": Float(0.0, 0.8)}, {"lora_dropout": 0.79}, limits)
    assert 0.8 < edge.proposed.high < 1.0
    # r best at its lowest power of two, 1: no lower rank exists
    assert edge_findings({"r": PowerOfTwo(1, 16)}, {"r": 1}, limits) == []


def test_next_name_numbers_the_next_search():
    assert next_name("quickstart") == "quickstart-2" and next_name("quickstart-2") == "quickstart-3"


def _run_dir(tmp_path, n_trials: int):
    """A run directory as a search leaves it: the quickstart's spec.yaml and a study with made-up trials."""
    from search.spec.search_spec import load_spec

    spec = load_spec(os.path.join(EXAMPLES, "quickstart.yaml"))
    spec_dict = spec.to_dict(redact=True)
    spec_dict["space"]["learning_rate"] = {"low": LR[0], "high": LR[1], "log": True}
    run_dir = tmp_path / "quickstart"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    space = parse_space(spec_dict["space"], "lora", [])
    distributions = {kind.optuna_name(key): kind.to_optuna() for key, kind in space.items()}
    rng = np.random.default_rng(1)
    study = optuna.create_study(direction="maximize")
    for number in range(n_trials):
        # the first trial near the top of the range: its best value sits at the edge
        lr = 2.9e-3 if number == 0 else float(10 ** rng.uniform(math.log10(LR[0]), math.log10(LR[1])))
        r_log2, ratio, dropout = int(rng.integers(1, 6)), [1.0, 2.0, 4.0][number % 3], float(rng.uniform(0, 0.2))
        if number == 0:   # its other settings mid-range: only learning_rate is at an edge
            r_log2, ratio, dropout = 3, 2.0, 0.1
        params = {"r_log2": r_log2, "alpha_ratio": ratio, "learning_rate": lr, "lora_dropout": dropout}
        attrs = {"param_r": 2 ** r_log2, "param_alpha_ratio": ratio, "param_lora_alpha": ratio * 2 ** r_log2,
                 "param_learning_rate": lr, "param_lora_dropout": dropout}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=accuracy(lr, float(rng.normal(0, 0.01))),
                                     params=params, distributions=distributions, user_attrs=attrs))
    return str(run_dir), study, trial_rows(study.get_trials(), ["eval_accuracy"])


def test_the_next_spec_widens_the_edge_says_why_and_validates(tmp_path):
    from search.spec.validate import check_file

    run_dir, study, rows = _run_dir(tmp_path, 8)
    written = write_next_search(run_dir, study, rows, "eval_accuracy", "max")
    path = os.path.join(run_dir, NEXT_SPEC_FILE)
    assert written is not None and os.path.isfile(path)
    assert [edge.param for edge in written.edges] == ["learning_rate"]
    text = open(path).read()
    assert "name: quickstart-2" in text and "# widened: learning_rate:" in text
    nxt = yaml.safe_load(text)
    assert nxt["space"]["learning_rate"]["high"] > LR[1] and nxt["space"]["learning_rate"]["low"] == LR[0]
    assert "+  learning_rate:" in written.diff or "+    high:" in written.diff
    assert "-name: quickstart" in written.diff and "+name: quickstart-2" in written.diff
    spec, problems, _warnings = check_file(path)
    assert problems == [] and spec.name == "quickstart-2"


def test_no_next_spec_without_a_complete_trial(tmp_path):
    run_dir, study, rows = _run_dir(tmp_path, 0)
    assert write_next_search(run_dir, study, rows, "eval_accuracy", "max") is None
    ran = yaml.safe_load(open(os.path.join(run_dir, "spec.yaml")))
    assert plan_next_search(ran, study, rows, "eval_accuracy", "max") is None
