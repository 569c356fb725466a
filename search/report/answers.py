"""The report's view of generation-based evaluation (trainers/generation.py): the best trial's scores beside the
base model's zero-shot scores (the first trial also answered with its adapter off), and a few eval prompts with
the reference, the best trial's answer and the base model's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from search.numbers import is_number, show_number
from search.report.blocks import Block, Code, Section, Table
from search.store.keys import ANSWERS_KEY, BASE_PREFIX
from trainers.settings import GENERATION_METRICS

@dataclass(frozen=True)
class GeneratedAnswers:
    best_number: int
    best_scores: Mapping[str, float]     # eval_* of the best trial's last round
    base_scores: Mapping[str, float]     # the same metrics with the adapter off ({} when no trial answered so)
    best: Sequence[Mapping[str, str]]    # prompt, reference, answer
    base: Sequence[Mapping[str, str]]    # the same rows answered by the base model


def read_answers(trials: Sequence[object], best: Optional[Mapping[str, object]]) -> Optional[GeneratedAnswers]:
    """From the study's trials (Optuna FrozenTrials): None when the best trial generated nothing."""
    if best is None:
        return None
    best_trial = next((trial for trial in trials if trial.number == int(best["number"])), None)
    if best_trial is None or not best_trial.user_attrs.get(ANSWERS_KEY):
        return None
    # the trial that also answered with its adapter off (the search's first, unless it failed before)
    base_attrs = next((trial.user_attrs for trial in trials if BASE_PREFIX + ANSWERS_KEY in trial.user_attrs), {})
    base_scores = {name: base_attrs[BASE_PREFIX + name] for name in GENERATION_METRICS
                   if is_number(base_attrs.get(BASE_PREFIX + name))}
    best_scores = {name: best_trial.user_attrs[name] for name in GENERATION_METRICS if name in best_trial.user_attrs}
    return GeneratedAnswers(best_number=best_trial.number, best_scores=best_scores, base_scores=base_scores,
                            best=best_trial.user_attrs[ANSWERS_KEY],
                            base=base_attrs.get(BASE_PREFIX + ANSWERS_KEY) or [])


def score_table(answers: GeneratedAnswers) -> List[Block]:
    """The best trial's generation scores beside the base model's, and the gain, for the Best trial section."""
    metrics = list(answers.best_scores)
    rows: List[Dict[str, object]] = []
    if answers.base_scores:
        rows.append({"model": "base model, no adapter (zero-shot)", **answers.base_scores})
    rows.append({"model": f"best trial ({answers.best_number})", **answers.best_scores})
    blocks: List[Block] = [Table(["model", *metrics], rows)]
    gains = [f"{metric} {_signed(answers.best_scores[metric] - answers.base_scores[metric])}" for metric in metrics
             if is_number(answers.best_scores.get(metric)) and is_number(answers.base_scores.get(metric))]
    if gains:
        blocks.insert(0, "Scored on generated answers (greedy) of the same eval rows; the base model answered "
                         f"them with the adapter off. Gain of the best trial over the base model: {', '.join(gains)}.")
    else:
        blocks.insert(0, "Scored on generated answers (greedy) of a fixed subset of eval rows; no trial answered "
                         "them with its adapter off (generation.base_model: false, or the first trial failed "
                         "before it could), so there is no base model score to compare with.")
    return blocks


def answers_section(answers: Optional[GeneratedAnswers]) -> Optional[Section]:
    """A few eval prompts with the reference, the best trial's answer and the base model's."""
    if answers is None or not answers.best:
        return None
    base = {row.get("prompt"): row.get("answer") for row in answers.base}
    blocks: List[Block] = [f"Eval rows answered by the best trial ({answers.best_number}) and, with its adapter "
                           "off, by the base model (each prompt as the model saw it, shortened to its end):"]
    for index, row in enumerate(answers.best, start=1):
        lines = [f"prompt:      {_one_line(row.get('prompt', ''))}", f"reference:   {row.get('reference', '')}",
                 f"best trial:  {row.get('answer', '')}"]
        if row.get("prompt") in base:
            lines.append(f"base model:  {base[row.get('prompt')]}")
        blocks += [f"Example {index}:", Code("\n".join(lines))]
    return Section("Generated answers", blocks)


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "") + show_number(value)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
