"""report.md: what the search found, next to the baseline a user would compare it with.

This first report holds the best trial, the majority-class baseline, the trials by state and every
trial with its pruned or failed reason. (The sensitivity analysis joins it in a later version.)
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

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
                 wall_s: Optional[float] = None) -> str:
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
        figures = {k: best.get(k) for k in ("tokens_per_s", "peak_mem_mb", "adapter_mb", "train_s", "energy_j")}
        out += ["", markdown_table([figures], list(figures))]
        out.append(f"\nThe adapter is in `best/` (load it with `PeftModel.from_pretrained(base, \"{os.path.join(run_dir, 'best')}\")`).")
    out += ["", "## All trials", ""]
    columns = ["number", "state"] + [c for c in _columns(rows) if c.startswith("param_")] + \
              [metric] + [c for c in ("eval_loss", "rounds", "tokens_per_s", "peak_mem_mb", "train_s", "fail_reason")
                          if c != metric]
    out.append(markdown_table(rows, columns))
    failed = [r for r in rows if r["state"] == "FAIL"]
    if failed:
        out += ["", "## Failed trials", ""]
        out += [f"- trial {r['number']}: {r.get('fail_reason') or 'no reason recorded'}" for r in failed]
    return "\n".join(out) + "\n"


def _columns(rows):
    seen: List[str] = []
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def write_report(run_dir: str, text: str) -> str:
    path = os.path.join(run_dir, REPORT_MD)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path
