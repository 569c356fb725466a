"""report.md: what the search found, next to the baseline a user would compare it with.

This first report holds the best trial, the majority-class baseline, the trials by state and every
trial with its pruned or failed reason. (The sensitivity analysis joins it in a later version.)
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from search.results import SYSTEM_COLUMNS, columns

REPORT_MD = "report.md"


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def build_report(run_dir: str, spec_summary: Dict[str, object], rows: List[Dict[str, object]],
                 best: Optional[Dict[str, object]], baseline: Optional[Dict[str, object]],
                 wall_s: Optional[float] = None, importances_by_method: Optional[dict] = None) -> str:
    metric, mode = spec_summary["metric"], spec_summary["mode"]
    counts = {state: sum(1 for r in rows if r["state"] == state) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    out = [f"# peft-search report: {spec_summary['name']}", ""]
    out.append(f"Model `{spec_summary['model']}` ({spec_summary['task']}), PEFT method `{spec_summary['method']}`, "
               f"objective `{metric}` ({mode}), {spec_summary['algorithm']} search with {spec_summary['scheduler']} "
               f"scheduling.")
    status = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    out.append(f"Trials: {len(rows)} of {spec_summary['trials']} ({status})" + (f"; wall time {wall_s:.0f} s." if wall_s else "."))
    out += ["", "## Best trial", ""]
    if best is None:
        out.append("No trial completed yet.")
    else:
        out.append(f"Trial {best['number']}: **{metric} = {_fmt(best.get(metric))}**")
        if baseline:
            out.append("")
            out.append(markdown_table([
                {"model": "majority class (always predicts "
                          f"`{baseline['majority_label']}`)", metric: baseline.get(metric)},
                {"model": f"best trial ({best['number']})", metric: best.get(metric)},
            ], ["model", metric]))
        params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
        out += ["", "Configuration:", "", "```json", json.dumps(params, indent=2, sort_keys=True, default=str), "```"]
        figures = {k: best.get(k) for k in SYSTEM_COLUMNS}
        out += ["", markdown_table([figures], list(figures))]
        out.append(f"\nThe adapter is in `best/` (load it with `PeftModel.from_pretrained(base, \"{os.path.join(run_dir, 'best')}\")`).")
    out += sensitivity_section(rows, metric, mode, importances_by_method)
    out += ["", "## All trials", ""]
    trial_columns = ["number", "state"] + [c for c in columns(rows) if c.startswith("param_")] + \
                    [metric] + [c for c in ("eval_loss", "rounds", "tokens_per_s", "peak_mem_mb", "train_s", "fail_reason")
                                if c != metric]
    out.append(markdown_table(rows, trial_columns))
    failed = [r for r in rows if r["state"] == "FAIL"]
    if failed:
        out += ["", "## Failed trials", ""]
        out += [f"- trial {r['number']}: {r.get('fail_reason') or 'no reason recorded'}" for r in failed]
    return "\n".join(out) + "\n"


# Below this, bins hold one or two trials and an impact cannot be told from noise (seen: 5 complete
# trials gave 28-point impacts rated LOW against their own shuffled noise).
MIN_TRIALS_FOR_SENSITIVITY = 10


def enough_for_sensitivity(rows) -> bool:
    return sum(r["state"] == "COMPLETE" for r in rows) >= MIN_TRIALS_FOR_SENSITIVITY


def sensitivity_section(rows, metric: str, mode: str, importances_by_method: Optional[dict]) -> List[str]:
    """Which setting matters for this task, how much, and where its good range lies."""
    from search.sensitivity import sensitivity_table, to_markdown

    out = ["", "## Sensitivity", ""]
    if not enough_for_sensitivity(rows):
        complete = sum(r["state"] == "COMPLETE" for r in rows)
        return out + [f"Needs at least {MIN_TRIALS_FOR_SENSITIVITY} complete trials to tell an effect from noise; "
                      f"has {complete}."]
    params = [c[len("param_"):] for c in columns(rows) if c.startswith("param_")]
    out += [f"Impact: how far `{metric}` moves between a setting's best and worst tested range (points: "
            "x100 for scores in [0, 1]), with other settings' effects removed; rated against the impact of "
            "the same setting shuffled (noise). From complete trials only.", ""]
    out.append(to_markdown(sensitivity_table(rows, params, metric, mode)))
    for method, scores in (importances_by_method or {}).items():
        ranked = ", ".join(f"{name} {score:.2f}" for name, score in sorted(scores.items(), key=lambda kv: -kv[1]))
        out.append(f"\n{method} importance: {ranked}")
    return out


def write_report(run_dir: str, text: str) -> str:
    path = os.path.join(run_dir, REPORT_MD)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path
