"""The next search, ready to run: the spec that ran with its space changed by what the trials showed.

Ranges whose best value sits at an edge are widened (search/refine/edges.py); settings the analysis can act
on are narrowed to their good range or fixed at the best trial's value, by the refiner's own rule
(search/refine/refiner.plan_refinement, which asks for firmer evidence than the report's rating). Every
change carries its reason as a comment above the key. The result is written as RUN_DIR/next_spec.yaml, under
a new name so that it runs beside this search, and the report shows its diff against the spec that ran.
"""
from __future__ import annotations

import copy
import difflib
import re
import textwrap
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from search.refine.edges import Edge, edge_findings, limits_for
from search.refine.refiner import RefineSettings, Refiner, SearchedParam, plan_refinement
from search.store.results import best_row
from spaces.kinds import Categorical, Kind, RatioTo

NEXT_SPEC_FILE = "next_spec.yaml"


@dataclass(frozen=True)
class NextSearch:
    spec: Dict[str, Any]             # the next spec, as YAML data
    reasons: Dict[str, str]          # space key -> why it changed
    edges: List[Edge]

    def text(self, ran_from: str) -> str:
        """The spec as YAML, with a header and each change's reason above its key."""
        header = (f"# The next search, proposed by peft-search from the trials of {ran_from}.\n"
                  f"# Each change to `space` says why above it. Run it: peft-search run <this file>\n")
        lines = yaml.safe_dump(self.spec, sort_keys=False, allow_unicode=True).splitlines()
        out, in_space = [], False
        for line in lines:
            if not line.startswith(" "):
                in_space = line.startswith("space:")
            key = re.match(r"^  ([A-Za-z_][\w]*):", line) if in_space else None
            if key and key.group(1) in self.reasons:
                out += textwrap.wrap(self.reasons[key.group(1)], 110, initial_indent="  # ",
                                     subsequent_indent="  #   ")
            out.append(line)
        return header + "\n".join(out) + "\n"


def plan_next_search(ran: Mapping[str, Any], study, rows: Sequence[Dict[str, object]], metric: str,
                     mode: str, scores=None) -> Optional[NextSearch]:
    """The next search from `ran` (the run directory's spec.yaml, as data), or None when the spec's space
    cannot be read back or no trial completed; `scores`: the study's importances, if computed already."""
    from search.spec.params import display_name, parse_space

    method = (ran.get("peft") or {}).get("method", "lora")
    problems: List[str] = []
    space = parse_space(ran.get("space"), method, problems)
    best = best_row(list(rows), metric, mode)
    if space is None or problems or best is None:
        return None
    names = {key: display_name(key, kind) for key, kind in space.items()}
    params = [SearchedParam(names[key], kind.optuna_name(key), kind) for key, kind in space.items() if kind.searched]
    settings = RefineSettings(every=1)
    importance = Refiner(params, metric, mode, settings).importance(study, scores)
    plan = plan_refinement(rows, params, metric, mode, importance, settings)
    edges = edge_findings(space, {key: best.get(f"param_{names[key]}") for key in space}, limits_for(method))
    new_space = dict(ran.get("space") or {})
    reasons: Dict[str, str] = {}
    for edge in edges:
        new_space[edge.param] = edge.proposed.to_yaml()
        reasons[edge.param] = f"widened: {edge.text()}."
    for key, kind in space.items():
        name = names[key]
        if key in reasons or not kind.searched:
            continue
        note = next((n for n in plan.notes if n.startswith(f"{name} ")), "")
        if name in plan.fixed:
            new_space[key] = plan.fixed[name]
            reasons[key] = f"fixed: {note}."
        elif name in plan.narrowed:
            new_space[key] = _narrowed(kind, plan.narrowed[name]).to_yaml()
            reasons[key] = f"narrowed: {note}."
    spec = copy.deepcopy(dict(ran))
    spec["name"] = next_name(str(ran.get("name", "search")))
    spec["space"] = new_space
    return NextSearch(spec, reasons, edges)


def _narrowed(kind: Kind, values: list) -> Kind:
    """`kind` kept to `values` (a [low, high] range, or the choices kept), as the refiner gives them."""
    if isinstance(kind, RatioTo):
        return replace(kind, ratio=_narrowed(kind.ratio, values))
    if isinstance(kind, Categorical):
        return replace(kind, choices=tuple(values))
    return replace(kind, low=values[0], high=values[-1])


def next_name(name: str) -> str:
    """quickstart -> quickstart-2 -> quickstart-3: a new run directory and study beside this one."""
    found = re.fullmatch(r"(.*)-(\d+)", name)
    return f"{found.group(1)}-{int(found.group(2)) + 1}" if found else f"{name}-2"


def spec_diff(ran_text: str, next_text: str, ran_name: str = "spec.yaml") -> str:
    return "".join(difflib.unified_diff(ran_text.splitlines(keepends=True), next_text.splitlines(keepends=True),
                                        ran_name, NEXT_SPEC_FILE))


@dataclass(frozen=True)
class Written:
    diff: str            # next_spec.yaml against spec.yaml
    edges: List[Edge]    # the ranges it widened, as found


def write_next_search(run_dir: str, study, rows, metric: str, mode: str, scores=None) -> Optional[Written]:
    """RUN_DIR/next_spec.yaml from RUN_DIR/spec.yaml (None: nothing written)."""
    import os

    from search.store.rundir import SPEC_FILE

    try:
        with open(os.path.join(run_dir, SPEC_FILE), encoding="utf-8") as handle:
            ran_text = handle.read()
        ran = yaml.safe_load(ran_text)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(ran, dict):
        return None
    found = plan_next_search(ran, study, rows, metric, mode, scores)
    if found is None:
        return None
    path = os.path.join(run_dir, NEXT_SPEC_FILE)
    text = found.text(os.path.basename(os.path.normpath(run_dir)))
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return Written(spec_diff(ran_text, text), found.edges)
