"""report.md (and, through search.report.html, report.html): what the search found and why.

Both files are rendered from one list of `Section`s built here, so they hold the same headings,
explanations and tables in the same order; report.html adds the plots (`Figure` blocks, which
report.md skips). Sections: header, best trial (vs the majority-class baseline or the base model's zero-shot
answers, as a ready PEFT config and a command that reproduces it), generated answers (search/report/answers.py),
sensitivity, LoRA rank, refinements, Pareto front (several objectives only), packing (search/report/packing.py),
all trials, failed trials.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from search.numbers import is_number
from search.spec.guidance import quality_verdict
from search.refine.sensitivity import (MIN_COMPLETE, MIN_TRIALS_FOR_SENSITIVITY, enough_for_sensitivity,
                                       sensitivity_table)
from search.report import plots
from search.report.answers import answers_section, score_table
from search.report.blocks import Block, Bullets, Code, Figure, Section, Table, cell, to_markdown, write_text
from search.report.packing import packing_section
from search.store.keys import DIAG_PREFIX, STOPPED_EARLY_KEY
from search.store.results import (SYSTEM_COLUMNS, Objective, columns, failure_counts, objectives,
                                  pareto_front, rank_panel, ranks_tested)

REPORT_MD = "report.md"


@dataclass(frozen=True)
class ReportInput:
    """Everything the report shows, read from the run directory and the Optuna storage by search.report.outputs."""
    run_dir: str
    summary: Mapping[str, object]            # search.json
    rows: List[Dict[str, object]]            # search.store.results.trial_rows
    best: Optional[Dict[str, object]]
    wall_s: Optional[float] = None
    importances: Optional[Mapping[str, Mapping[str, float]]] = None  # None: too few trials to compute
    refinements: Sequence[object] = ()       # study.user_attrs["refinements"]
    peft_config: Optional[Tuple[str, dict]] = None  # (how to build it, its kwargs) of the best trial
    settings_path: Optional[str] = None      # best/settings.json, when the best trial saved its settings
    adapter_dir: Optional[str] = None        # best/, when it holds the best trial's adapter
    packing: Optional[Mapping[str, object]] = None  # store/packing_file.read_packing: K, how chosen, measured steps
    next_search: Optional[object] = None     # search/refine/next_search.Written: next_spec.yaml's diff, edges
    study_figures: Sequence[object] = ()     # search/report/figures.StudyFigure: Optuna's own plots
    answers: Optional[object] = None         # search/report/answers.GeneratedAnswers: generation-based evaluation

    @property
    def objectives(self) -> List[Objective]:
        return objectives(self.summary)


def build_report(data: ReportInput) -> str:
    return to_markdown(sections(data))


# --- sections ------------------------------------------------------------------------------------
def sections(data: ReportInput) -> List[Section]:
    built = [header(data), best_section(data), answers_section(data.answers), sensitivity(data), optuna_plots(data),
             rank_section(data), refinements(data), next_search(data), pareto_section(data),
             packing_section(data.packing), all_trials(data), failed_trials(data)]
    return [section for section in built if section is not None]


def _objective_text(objs: Sequence[Objective]) -> str:
    return ", ".join(f"`{metric}` ({mode})" for metric, mode in objs)


def header(data: ReportInput) -> Section:
    s, objs = data.summary, data.objectives
    counts = {state: sum(1 for r in data.rows if r["state"] == state)
              for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    status = ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)
    wall = f"; wall time {data.wall_s:.0f} s." if data.wall_s else "."
    return Section(f"peft-search report: {s['name']}", [
        f"Model `{s['model']}` ({s['task']}), PEFT method `{s['method']}`, "
        f"objective{'s' if len(objs) > 1 else ''} {_objective_text(objs)}, {s['algorithm']} search with "
        f"{s['scheduler']} scheduling.",
        f"Trials: {len(data.rows)} of {s['trials']} ({status or 'none yet'}){wall}",
        "COMPLETE trials ran every round; PRUNED ones were stopped early by the scheduler (their objective "
        "is the last value they reported); FAIL ones stopped with an error (see Failed trials).",
    ], level=1)


def best_section(data: ReportInput) -> Section:
    best, objs = data.best, data.objectives
    metric = objs[0][0]
    if best is None:
        return Section("Best trial", ["No trial completed yet."])
    blocks: List[Block] = []
    if len(objs) > 1:
        blocks.append(f"Several objectives: no single trial is best on all of them. `best/` holds the Pareto-front "
                      f"trial best on the first objective, `{metric}`; the Pareto front section lists the others.")
    elif data.summary.get("baseline"):
        blocks.append(f"The complete trial with the best `{metric}`, next to what a model that learned nothing "
                      "scores (always predicting the most frequent training label).")
    else:
        blocks.append(f"The complete trial with the best `{metric}`.")
    values = ", ".join(f"{m} = {cell(best.get(m))}" for m, _ in objs[1:])
    blocks.append(f"Trial {best['number']}: **{metric} = {cell(best.get(metric))}**"
                  + (f", {values}" if values else ""))
    verdict = quality_verdict(data.summary.get("task_kind"), best, data.summary.get("threshold"), metric)
    if verdict:
        blocks.append(verdict)
    baseline = data.summary.get("baseline")
    if baseline:
        shown = list(dict.fromkeys(["eval_accuracy", *(m for m, _ in objs)]))
        blocks.append(Table(["model", *shown], [
            {"model": f"majority class (always predicts `{baseline['majority_label']}`)",
             "eval_accuracy": baseline.get("eval_accuracy")},
            {"model": f"best trial ({best['number']})", **{m: best.get(m) for m in shown}},
        ]))
    if data.answers is not None:
        blocks += score_table(data.answers)
    params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
    blocks += ["Searched values of this trial:",
               Code(json.dumps(params, indent=2, sort_keys=True, default=str), "json")]
    if data.peft_config is not None:
        build, config = data.peft_config
        blocks += [f"Ready PEFT config (from its `adapter_config.json`, load-time bookkeeping and unset keys left "
                   f"out): `{build}` accepts it as it is.",
                   Code(json.dumps(config, indent=2, default=str), "json")]
    else:
        blocks.append("This trial saved no `adapter_config.json`, so there is no PEFT config to show.")
    if data.settings_path:
        command = (f"python -m trainers.recipe --settings {shlex.quote(data.settings_path)} "
                   f"--out reproduced-trial-{best['number']}")
        blocks += ["Reproduce it (one process, same data split, seed and settings; run where the trainers "
                   "package is importable):", Code(command, "bash")]
    else:
        blocks.append("This trial saved no `settings.json` (it ran before trials wrote one), so no command "
                      "to reproduce it is given.")
    blocks += ["System figures (tokens per second in training, peak memory in MiB, adapter size in MiB, "
               "training seconds, energy in joules where measurable, seconds spent generating answers in the last "
               "round):",
               Table(SYSTEM_COLUMNS, [{k: best.get(k) for k in SYSTEM_COLUMNS}])]
    blocks.append(f"The adapter is in `best/` (load it with `PeftModel.from_pretrained(base, \"{data.adapter_dir}\")`)."
                  if data.adapter_dir else "This trial saved no adapter, so `best/` was not updated for it.")
    return Section("Best trial", blocks)


# log x for a slice whose values span more than two decades (learning rates, weight decay)
LOG_SPAN = 100.0


def searched_params(rows) -> List[str]:
    """param_* columns that take more than one value over COMPLETE and PRUNED trials."""
    tried = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    return [c for c in columns(rows) if c.startswith("param_")
            and len({repr(r.get(c)) for r in tried if r.get(c) is not None}) > 1]


def sensitivity_blocks(rows, metric: str, mode: str, importances_by_method: Optional[Mapping],
                       derived: Sequence[str] = ()) -> List[Block]:
    """Which setting matters for this task, how much, and where its good range lies; `derived`: settings
    computed from searched ones (lora_alpha from alpha_ratio and r), left out of the table."""
    if not enough_for_sensitivity(rows):
        complete = sum(r["state"] == "COMPLETE" for r in rows)
        pruned = sum(r["state"] == "PRUNED" for r in rows)
        return [f"Needs at least {MIN_TRIALS_FOR_SENSITIVITY} trials with a result, {MIN_COMPLETE} of them "
                f"complete; has {complete} complete and {pruned} pruned."]
    params = [c[len("param_"):] for c in searched_params(rows) if c[len("param_"):] not in derived]
    table = sensitivity_table(rows, params, metric, mode)
    pruned_used = any(r.pruned for r in table)
    blocks: List[Block] = [
        f"Impact: how far `{metric}` moves between a setting's best and worst tested range (points: x100 for "
        "scores in [0, 1]), with other settings' effects removed, and its 90% interval. A rating only where the "
        "evidence supports one: the impact beats the same setting shuffled (noise), or enough trials keep it "
        "within noise (LOW); otherwise how many more trials would tell, were the effect as large as it looks."
        + (" Pruned trials count with their last result (lower fidelity: fewer rounds, adjusted for)."
           if pruned_used else ""),
        Table(["Setting", "Range tested", "Optimal range", "Impact (points)", "90% CI", "Trials", "Rating",
               "Guidance"],
              [{"Setting": r.param, "Range tested": r.range_tested, "Optimal range": r.optimal_range,
                "Impact (points)": f"{r.impact_points:.2f}", "90% CI": f"{r.impact_ci[0]:.2f}–{r.impact_ci[1]:.2f}",
                "Trials": r.evidence, "Rating": r.verdict, "Guidance": r.guidance}
               for r in table]),
        "Importances (Optuna, on its encoded parameters such as `r_log2`): fANOVA is the share of the "
        "objective's variance a setting explains in a random-forest fit; PED-ANOVA how differently a setting "
        "is spread in the top trials than in all. Each sums to 1 over the settings.",
    ]
    for method, scores in (importances_by_method or {}).items():
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        blocks.append(f"{method} importance: " + ", ".join(f"{name} {score:.2f}" for name, score in ranked))
    reason = getattr(importances_by_method, "reason", "")
    if reason or not importances_by_method:
        blocks.append(f"Importances {'partly ' if importances_by_method else ''}not computed: "
                      f"{reason or 'none were given'}.")
    blocks += [_slice(rows, p, metric) for p in searched_params(rows)]
    return blocks


def _slice(rows, column: str, metric: str) -> Figure:
    name = column[len("param_"):]
    series = []
    for state, hollow in (("COMPLETE", False), ("PRUNED", True)):
        picked = [r for r in rows if r["state"] == state and r.get(column) is not None and is_number(r.get(metric))]
        series.append(plots.Series(state.lower(), [(_plain(r[column]), r[metric]) for r in picked],
                                   tips=[f"trial {r['number']}: {name}={cell(r[column])}, {metric}={cell(r[metric])}"
                                         for r in picked],
                                   hollow=hollow, color=plots.MUTED if hollow else None))
    series = [s for s in series if s.points] or series[:1]
    xs = [x for s in series for x, _ in s.points]
    log = all(is_number(x) and x > 0 for x in xs) and xs and max(xs) / min(xs) > LOG_SPAN
    return Figure(plots.xy_chart(series, f"{metric} vs {name}", name + (" (log)" if log else ""), metric,
                                 log_x=10 if log else None),
                  f"`{metric}` of each trial against its `{name}`: dots are complete trials, rings pruned ones "
                  "(their last reported value, after fewer rounds).")


def _plain(value):
    """A param value as a plot coordinate: numbers stay numbers, anything else (lists, bools) a category."""
    return value if is_number(value) else str(value)


def sensitivity(data: ReportInput) -> Section:
    (metric, mode), objs = data.objectives[0], data.objectives
    blocks = sensitivity_blocks(data.rows, metric, mode, data.importances, derived_settings(data))
    edges = data.next_search.edges if data.next_search is not None else []
    if edges:   # before the table: the one finding a user acts on at once
        blocks.insert(1 if len(blocks) > 1 else 0,
                      Bullets([f"**Range edge**: {edge.text()} (next_spec.yaml does)." for edge in edges]))
    if len(objs) > 1:
        blocks.insert(0, f"On the first objective, `{metric}`.")
    return Section("Sensitivity", blocks)


def optuna_plots(data: ReportInput) -> Optional[Section]:
    """Optuna's own plots (report.html; report.md names what was not drawn and why)."""
    if not data.study_figures:
        return None
    drawn = [figure.title for figure in data.study_figures if figure.svg]
    blocks: List[Block] = [f"Optuna's own plots, in report.html: {'; '.join(drawn)}." if drawn else
                           "Optuna drew no plot."]
    for figure in data.study_figures:
        blocks.append(Figure(figure.svg, figure.caption) if figure.svg
                      else f"{figure.title}: not drawn, {figure.reason}.")
    return Section("Plots", blocks)


def derived_settings(data: ReportInput) -> List[str]:
    """The settings of the rows that a searched ratio derives (lora_alpha from alpha_ratio and r)."""
    from spaces.methods import get_method

    try:
        ratios = get_method(str(data.summary.get("method"))).ratios
    except (KeyError, ValueError):   # a method registered in another process, or none
        return []
    names = set(columns(data.rows))
    return [target for ratio, (target, _other) in ratios.items() if f"param_{ratio}" in names]


def rank_section(data: ReportInput) -> Optional[Section]:
    if data.summary.get("method") != "lora" or not any("param_r" in r for r in data.rows):
        return None  # the rank was not searched
    metric, mode = data.objectives[0]
    ranks = ranks_tested(data.rows)
    if len(ranks) < 2:
        tested = ", ".join(map(str, ranks)) or "none"
        return Section("LoRA rank", [f"Only rank{'s' if len(ranks) != 1 else ''} {tested} tested so far: "
                                     "nothing to compare."])
    panel = rank_panel(data.rows, metric, mode)
    measures = [metric, "tokens_per_s", "peak_mem_mb", "adapter_mb"]
    blocks: List[Block] = [
        f"Per rank r tested: the best `{metric}` over complete trials, and the median tokens_per_s, peak_mem_mb "
        "and adapter_mb over complete and pruned trials (these system figures do not depend on how long a trial "
        f"trained). Each `/max` column divides by the value at the largest rank tested (r={ranks[-1]}): 0.25 is a "
        "quarter of it, so a rank whose objective is near 1 at a small memory ratio is a cheap near-equal choice.",
        Table(["r", "complete", "pruned"] + [c for m in measures for c in (m, f"{m}/max")], panel),
    ]
    series = [plots.Series(m, [(e["r"], e[f"{m}/max"]) for e in panel if is_number(e[f"{m}/max"])], line=True)
              for m in measures]
    series = [s for s in series if s.points]
    if series:
        blocks.append(Figure(plots.xy_chart(series, "normalized to the largest rank", "LoRA rank r (log2)",
                                            f"value / value at r={ranks[-1]}", log_x=2)))
    return Section("LoRA rank", blocks)


def _refinement_row(item) -> Dict[str, object]:
    if not isinstance(item, Mapping):
        return {"after trials": "", "fixed": "", "narrowed": "", "reason": str(item)}
    fixed = item.get("fixed") or {}
    narrowed = item.get("narrowed") or {}
    return {"after trials": item.get("after_trials"),
            "fixed": ", ".join(f"{k}={v}" for k, v in fixed.items()) if isinstance(fixed, Mapping) else str(fixed),
            "narrowed": ", ".join(f"{k}: {_span(v)}" for k, v in narrowed.items())
                        if isinstance(narrowed, Mapping) else str(narrowed),
            "reason": item.get("reason", "")}


def _span(bounds) -> str:
    if isinstance(bounds, (list, tuple)) and len(bounds) == 2:
        return f"{cell(bounds[0])}–{cell(bounds[1])}"
    return str(bounds)


def refinements(data: ReportInput) -> Section:
    items = list(data.refinements or [])
    if not items:
        return Section("Refinements", ["None: the search space stayed as the spec gave it."])
    return Section("Refinements", [
        "Changes the search made to its own space as results came in: after that many trials, settings "
        "fixed at a value or ranges narrowed to where the good trials were. Later trials sample the new space.",
        Table(["after trials", "fixed", "narrowed", "reason"], [_refinement_row(item) for item in items])])


def next_search(data: ReportInput) -> Optional[Section]:
    if data.next_search is None:
        return None
    from search.refine.next_search import NEXT_SPEC_FILE

    path = os.path.join(data.run_dir, NEXT_SPEC_FILE)
    diff = data.next_search.diff
    changed = [line for line in diff.splitlines() if line.startswith("+  # ")]
    return Section("Next search", [
        f"`{path}` is this search's spec with its space changed by what the trials showed (each change says "
        f"why in a comment), under a new name. Run it: `peft-search run {path}`."
        + ("" if changed else " No setting had the evidence for a change yet; only the name differs."),
        Code(diff, "diff")])


def pareto_section(data: ReportInput) -> Optional[Section]:
    objs = data.objectives
    if len(objs) < 2:
        return None
    front = pareto_front(data.rows, objs)
    metrics = [m for m, _ in objs]
    params = [c for c in columns(data.rows) if c.startswith("param_")]
    blocks: List[Block] = [
        "The complete trials that no other complete trial beats on every objective at once ("
        + _objective_text(objs) + "): each is a best trade-off, and which to take depends on what matters more.",
        Table(["number", *metrics, *params], front) if front else "No complete trial yet.",
    ]
    complete = [r for r in data.rows if r["state"] == "COMPLETE" and all(is_number(r.get(m)) for m in metrics)]
    if complete:
        (x, _), (y, _) = objs[0], objs[1]
        on_front = {r["number"] for r in front}

        def series(name, picked, **style):
            tips = [f"trial {r['number']}: {x}={cell(r[x])}, {y}={cell(r[y])}" for r in picked]
            return plots.Series(name, [(r[x], r[y]) for r in picked], tips=tips, **style)

        blocks.append(Figure(plots.xy_chart(
            [series("dominated", [r for r in complete if r["number"] not in on_front], color=plots.MUTED),
             series("Pareto front", front, line=True, emphasis=True)], "Pareto front", x, y),
            f"Complete trials by `{x}` and `{y}`" + (" (the first two objectives)" if len(objs) > 2 else "")
            + "; the front is joined."))
    return Section("Pareto front", blocks)


def all_trials(data: ReportInput) -> Section:
    rows, metrics = data.rows, [m for m, _ in data.objectives]
    names = columns(rows)
    diag = [c for c in names if c.startswith(DIAG_PREFIX)] + ([STOPPED_EARLY_KEY] if STOPPED_EARLY_KEY in names else [])
    shown = ["number", "state"] + [c for c in names if c.startswith("param_")] + metrics + \
            [c for c in ("eval_loss", "rounds", "tokens_per_s", "peak_mem_mb", "train_s") if c not in metrics] + \
            diag + ["fail_reason"]
    blocks: List[Block] = ["Every trial, by number: its searched values, objective, system figures and why it "
                           "was pruned or failed."]
    if diag:
        blocks.append("`diag_*` columns are per-trial diagnostics (e.g. `diag_effective_rank_ratio`: how much of "
                      "the LoRA rank the trained update uses; `diag_overfit_gap`: eval loss less train loss); "
                      "`stopped_early` says why a trial stopped itself before its last round.")
    return Section("All trials", blocks + [Table(shown, rows)])


def failed_trials(data: ReportInput) -> Optional[Section]:
    failed = [r for r in data.rows if r["state"] == "FAIL"]
    if not failed:
        return None
    counts = failure_counts(data.rows)
    return Section("Failed trials", [
        Bullets([f"trial {r['number']}: {r.get('fail_reason') or 'no reason recorded'}" for r in failed]),
        "Failures by reason:",
        Table(["reason", "trials"], [{"reason": reason, "trials": n} for reason, n in counts]),
    ])


def write_report(run_dir: str, text: str) -> str:
    return write_text(os.path.join(run_dir, REPORT_MD), text)
