"""report.md and report.html from made-up studies (no training): the same sections in the same order,
the plots, the Pareto front, escaping of user data, nothing loaded from the network, and refresh()
on a run directory with a SQLite study."""
import csv
import json
import math
import random
import re
from html import escape
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from search.report import outputs, plots
from search.report.html import build_html
from search.report.sections import ReportInput, build_report
from search.store.results import best_trial, objectives, trial_rows
from search.store.rundir import trial_dir, write_summary
from search.store.storage import STUDY_NAME, open_storage

DISTS = {"r_log2": IntDistribution(1, 5), "learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
         "lora_dropout": FloatDistribution(0.0, 0.2), "target": CategoricalDistribution(["qv", "all"])}
REFINEMENTS = [{"after_trials": 8, "fixed": {"target": "qv"}, "narrowed": {"learning_rate": [1e-4, 1e-3]},
                "reason": "learning_rate HIGH: kept to its optimal range"}]


def add_lora_trials(study, n_complete=14, seed=0):
    """Complete trials whose accuracy grows with the rank and peaks at lr 3e-4; one pruned, one failed."""
    rng = random.Random(seed)
    for i in range(n_complete + 2):
        k = 1 + i % 5
        # learning rates spread over three decades (1e-5 .. 1e-2), in an order unrelated to the rank
        params = {"r_log2": k, "learning_rate": 10 ** (-5 + 3 * (i * 7 % 16) / 15), "lora_dropout": rng.uniform(0, 0.2),
                  "target": ["qv", "all"][i % 2]}
        r = 2 ** k
        acc = 0.6 + 0.04 * k - 0.1 * abs(math.log10(params["learning_rate"] / 3e-4)) + rng.uniform(-0.01, 0.01)
        state = TrialState.COMPLETE if i < n_complete else (TrialState.PRUNED, TrialState.FAIL)[i - n_complete]
        attrs = {"param_r": r, "param_learning_rate": params["learning_rate"],
                 "param_lora_dropout": params["lora_dropout"], "param_target": params["target"],
                 "tokens_per_s": 1000.0 / (1 + r / 16), "peak_mem_mb": 300.0 + 4 * r, "adapter_mb": 0.05 * r,
                 "eval_loss": 1.0 - acc, "diag_effective_rank_ratio": 0.5, "round": 2}
        if state == TrialState.PRUNED:
            attrs.update(eval_accuracy=acc - 0.2, fail_reason="stopped by the scheduler after round 1")
        if state == TrialState.FAIL:
            attrs = {"param_r": r, "fail_reason": "diverged at step 3 (loss=nan)"}
        if i == 3:
            attrs["stopped_early"] = "eval loss rose 3 rounds in a row"
        study.add_trial(create_trial(state=state, value=acc if state == TrialState.COMPLETE else None,
                                     params=params, distributions=DISTS, user_attrs=attrs))
    return study


def summary(**changes):
    base = {"name": "lora-test", "model": "minilm", "task": "sequence-classification", "method": "lora",
            "metric": "eval_accuracy", "mode": "max", "algorithm": "tpe", "scheduler": "asha", "trials": 20,
            "storage": "sqlite", "baseline": {"majority_label": "files", "eval_accuracy": 0.3, "eval_rows": 50}}
    return {**base, **changes}


def report_input(study, spec_summary, **extra):
    objs = objectives(spec_summary)
    rows = trial_rows(study.get_trials(), [m for m, _ in objs])
    return ReportInput("/runs/x", spec_summary, rows, best_trial(rows, objs), **extra)


def md_headings(text):
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def html_headings(text):
    return re.findall(r"<h2>(.*?)</h2>", text)


@pytest.fixture(scope="module")
def single():
    study = add_lora_trials(optuna.create_study(direction="maximize"))
    data = report_input(study, summary(), wall_s=90, refinements=REFINEMENTS,
                        importances={"fanova": {"learning_rate": 0.7, "r_log2": 0.2, "lora_dropout": 0.1},
                                     "ped_anova": {"learning_rate": 0.6, "r_log2": 0.4}},
                        peft_config=("LoraConfig(**config)", {"r": 8, "lora_alpha": 16, "task_type": "SEQ_CLS"}),
                        settings_path="/runs/x/best/settings.json")
    return data, build_report(data), build_html(data)


def test_single_objective_sections_are_the_same_and_in_the_same_order(single):
    _, md, html = single
    expected = ["Best trial", "Sensitivity", "LoRA rank", "Refinements", "All trials", "Failed trials"]
    assert md_headings(md) == expected and html_headings(html) == expected
    assert md.startswith("# peft-search report: lora-test") and "<h1>peft-search report: lora-test</h1>" in html
    assert "Trials: 16 of 20 (14 complete, 1 pruned, 1 fail); wall time 90 s." in md
    assert "Pareto front" not in md  # one objective: no front


def test_best_section_gives_the_peft_config_and_the_reproduce_command(single):
    _, md, html = single
    best = md.split("## Best trial")[1].split("## Sensitivity")[0]
    assert "majority class (always predicts `files`) | 0.3 |" in best
    assert "`LoraConfig(**config)` accepts it" in best and '"lora_alpha": 16' in best
    assert "python -m trainers.recipe --settings /runs/x/best/settings.json --out reproduced-trial-" in best
    assert "<code>LoraConfig(**config)</code>" in html


def test_sensitivity_has_the_table_importances_and_one_slice_per_searched_setting(single):
    data, md, html = single
    section = md.split("## Sensitivity")[1].split("## LoRA rank")[0]
    assert "| Setting | Range tested |" in section and "fanova importance: learning_rate 0.70" in section
    html_section = html.split('id="sensitivity"')[1].split('id="lora-rank"')[0]
    assert html_section.count("<svg") == 4  # r, learning_rate, lora_dropout, target (importances: section Plots)
    assert "learning_rate (log)" in html_section  # lr spans > 2 decades: log x
    assert "lora_dropout (log)" not in html_section
    # pruned trials are drawn as rings (no fill), complete ones as dots
    assert "fill-opacity: 0; stroke: #9a9a9a" in html_section
    assert "<svg" not in md


def test_rank_panel_table_and_normalized_plot(single):
    _, md, html = single
    section = md.split("## LoRA rank")[1].split("## Refinements")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| r | complete | pruned | eval_accuracy | eval_accuracy/max | tokens_per_s |")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| 2", "| 4", "| 8", "| 16", "| 32"]
    assert table[-1].split(" | ")[4] == "1"  # the largest rank is its own reference
    assert "do not depend on how long a trial trained" in section
    assert "LoRA rank r (log2)" in html.split('id="lora-rank"')[1].split('id="refinements"')[0]


def test_refinements_all_trials_diagnostics_and_failure_counts(single):
    _, md, _ = single
    refinements = md.split("## Refinements")[1].split("## All trials")[0]
    assert "| 8 | target=qv | learning_rate: 1e-4–0.001 | learning_rate HIGH" in refinements
    all_trials = md.split("## All trials")[1].split("## Failed trials")[0]
    head = next(line for line in all_trials.splitlines() if line.startswith("| number"))
    assert "diag_effective_rank_ratio" in head and "stopped_early" in head and head.endswith("fail_reason |")
    assert "eval loss rose 3 rounds in a row" in all_trials
    failed = md.split("## Failed trials")[1]
    assert "- trial 15: diverged at step 3 (loss=nan)" in failed and "| diverged at step 3 (loss=nan) | 1 |" in failed


def test_refinements_say_none_when_the_search_made_none():
    study = add_lora_trials(optuna.create_study(direction="maximize"), n_complete=3)
    md = build_report(report_input(study, summary()))
    assert "None: the search space stayed as the spec gave it." in md
    # 3 complete trials and the pruned ones' last results already give the small-search table
    assert "| 3 + " in md.split("## Sensitivity")[1].split("## Plots")[0] and "Needs at least" not in md


def two_objective_study():
    """(eval_accuracy max, adapter_mb min): trial 2 is dominated by trial 1; trial 4 is pruned."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    points = [(0.90, 4.0), (0.85, 1.0), (0.80, 2.0), (0.70, 0.5), (0.99, 0.1)]
    for number, (acc, mb) in enumerate(points):
        complete = number != 4
        params = {"r_log2": 1 + number % 3, "learning_rate": 1e-4 * (number + 1), "lora_dropout": 0.1,
                  "target": "qv"}
        study.add_trial(create_trial(
            state=TrialState.COMPLETE if complete else TrialState.PRUNED, values=[acc, mb] if complete else None,
            params=params, distributions=DISTS,
            user_attrs={"param_r": 2 ** params["r_log2"], "param_learning_rate": params["learning_rate"],
                        "adapter_mb": mb, **({} if complete else {"eval_accuracy": acc})}))
    return study


def test_multi_objective_front_excludes_the_dominated_trial():
    spec_summary = summary(metric=["eval_accuracy", "adapter_mb"], mode=["max", "min"], algorithm="nsga2")
    data = report_input(two_objective_study(), spec_summary)
    md, html = build_report(data), build_html(data)
    assert md_headings(md) == ["Best trial", "Sensitivity", "LoRA rank", "Refinements", "Pareto front", "All trials"]
    assert html_headings(html) == md_headings(md)
    front = md.split("## Pareto front")[1].split("## All trials")[0]
    numbers = [line.split(" | ")[0][2:] for line in front.splitlines() if re.match(r"\| \d", line)]
    assert numbers == ["0", "1", "3"]
    assert data.best["number"] == 0 and "Pareto-front trial best on the first objective, `eval_accuracy`" in md
    assert "objectives `eval_accuracy` (max), `adapter_mb` (min)" in md
    figure = html.split('id="pareto-front"')[1].split('id="all-trials"')[0]
    assert "<svg" in figure and "Pareto front" in figure and "trial 2: eval_accuracy=0.8, adapter_mb=2" in figure


MALICIOUS = "<script>alert(1)</script>"


def test_user_data_is_escaped_in_html():
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, params={"lora_dropout": 0.1},
                                 distributions={"lora_dropout": DISTS["lora_dropout"]},
                                 user_attrs={"param_target_modules": f"<img src=x onerror=alert(1)>{MALICIOUS}",
                                             "param_lora_dropout": 0.1}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": MALICIOUS}))
    data = report_input(study, summary(name=MALICIOUS, model=MALICIOUS, baseline={"majority_label": MALICIOUS}),
                        refinements=[{"after_trials": 1, "fixed": {MALICIOUS: MALICIOUS}, "reason": MALICIOUS}],
                        peft_config=("LoraConfig(**config)", {"target_modules": [MALICIOUS]}))
    html = build_html(data)
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 8  # title, h1, model, baseline, param, reason x2, refinement, config


def test_html_loads_nothing_from_outside(single):
    _, _, html = single
    for needle in ("http://", "https://", "<script", "<link", " src=", "@import"):
        assert needle not in html, needle
    assert not re.search(r"url\((?!#)", html)  # only the plots' clip paths, url(#id): in the page itself
    # the nav's anchors and the plots' markers refer into the page; a colour bar is an inline data: image
    assert not re.search(r'href="(?!#|data:image/png;base64,)', html)
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html


def test_plots_escape_user_data():
    """Titles, labels and hover tips reach the SVG as text (axes and ticks: tests/search/report/test_plots.py)."""
    svg = plots.xy_chart([plots.Series("s", [(1, 2.0)], tips=[MALICIOUS])], MALICIOUS, "x", "y")
    bars = plots.bar_chart([MALICIOUS], [0.5], "t", "v")
    assert "<script" not in svg + bars and "&lt;script&gt;" in svg and "&lt;script&gt;" in bars
    assert f"<title>{escape(MALICIOUS)}</title>" in svg


# --- refresh() on a run directory ----------------------------------------------------------------
def make_run_dir(tmp_path, metric, mode, add_trials):
    run_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    spec = SimpleNamespace(name="refresh-test", model=SimpleNamespace(name_or_path="minilm", task="causal-lm"),
                           peft=SimpleNamespace(method="lora"),
                           objective=SimpleNamespace(metric=metric, mode=mode, task_kind=None, threshold=None),
                           search=SimpleNamespace(algorithm="tpe", scheduler="asha", trials=20), storage="sqlite",
                           resources=SimpleNamespace(storage_path=None))
    write_summary(run_dir, spec)
    directions = [{"max": "maximize", "min": "minimize"}[m] for m in ([mode] if isinstance(mode, str) else mode)]
    study = optuna.create_study(study_name=STUDY_NAME, storage=open_storage("sqlite", run_dir),
                                directions=directions)
    add_trials(study)
    study.set_user_attr("refinements", REFINEMENTS)
    return run_dir, study


def save_trial_outputs(run_dir, number):
    adapter = f"{trial_dir(run_dir, number)}/adapter"
    import os

    os.makedirs(adapter)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "inference_mode": True,
              "base_model_name_or_path": "minilm", "layers_to_transform": None, "alpha_pattern": {}}
    with open(f"{adapter}/adapter_config.json", "w") as handle:
        json.dump(config, handle)
    with open(f"{adapter}/adapter_model.safetensors", "wb") as handle:
        handle.write(b"weights")
    with open(f"{trial_dir(run_dir, number)}/settings.json", "w") as handle:
        json.dump({"model": {"name_or_path": "minilm"}, "data": {"train": "train.jsonl"}}, handle)


def test_refresh_writes_both_reports_and_best_with_its_settings(tmp_path):
    run_dir, study = make_run_dir(tmp_path, "eval_accuracy", "max", add_lora_trials)
    best_number = best_trial(trial_rows(study.get_trials(), ["eval_accuracy"]), [("eval_accuracy", "max")])["number"]
    save_trial_outputs(run_dir, best_number)
    rows = outputs.refresh(run_dir, wall_s=12.0)
    assert len(rows) == 16
    md = open(f"{run_dir}/report.md").read()
    html = open(f"{run_dir}/report.html").read()
    assert md_headings(md) == html_headings(html)
    assert "Sensitivity" in md_headings(md) and "fanova importance:" in md  # real importances from the study
    assert f"python -m trainers.recipe --settings {run_dir}/best/settings.json" in md
    assert json.load(open(f"{run_dir}/best/settings.json"))["model"]["name_or_path"] == "minilm"
    assert f'PeftModel.from_pretrained(base, "{run_dir}/best")' in md
    assert '"lora_alpha": 16' in md and "inference_mode" not in md.split("## Best trial")[1].split("## Sens")[0]
    assert "learning_rate HIGH: kept to its optimal range" in md  # study.user_attrs["refinements"]
    header = next(csv.reader(open(f"{run_dir}/trials.csv")))
    assert "diag_effective_rank_ratio" in header and "stopped_early" in header
    # Optuna's own plots, drawn inline: history, parallel coordinates, contour, importances
    plots = html.split('id="plots"')[1].split("</section>")[0]
    assert plots.count("<svg") == 4 and "<script" not in plots and "## Plots" in md


def test_refresh_with_two_objectives_publishes_the_front_member_best_on_the_first(tmp_path):
    def add(study):
        for trial in two_objective_study().get_trials():
            study.add_trial(trial)

    run_dir, _ = make_run_dir(tmp_path, ["eval_accuracy", "adapter_mb"], ["max", "min"], add)
    save_trial_outputs(run_dir, 0)
    outputs.refresh(run_dir)
    back = list(csv.DictReader(open(f"{run_dir}/trials.csv")))
    assert [r["adapter_mb"] for r in back][:4] == ["4", "1", "2", "0.5"]
    assert json.load(open(f"{run_dir}/best/metrics.json"))["number"] == 0
    md = open(f"{run_dir}/report.md").read()
    assert "## Pareto front" in md and "<h2>Pareto front</h2>" in open(f"{run_dir}/report.html").read()
