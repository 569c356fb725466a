"""Optuna fANOVA and PED-ANOVA importances over a study's COMPLETE trials (see search.refine.sensitivity)."""
from __future__ import annotations

import math
import warnings

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator
from optuna.study import StudyDirection
from optuna.trial import TrialState

MIN_TRIALS = 4


class Importances(dict):
    """{evaluator name: {param: importance}}; `reason` says why it is empty or partial ('' if not)."""

    def __init__(self, values=(), reason: str = ""):
        super().__init__(values)
        self.reason = reason


def importances(study: optuna.Study, metric_index: int = 0) -> Importances:
    """fANOVA (seed 0) and PED-ANOVA importances of the study's params for objective `metric_index`."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.values is not None and len(t.values) > metric_index]
    if len(complete) < MIN_TRIALS:
        return Importances(reason=f"only {len(complete)} complete trial(s); need at least {MIN_TRIALS}")
    values = {t.values[metric_index] for t in complete}
    if len(values) < 2:
        return Importances(reason="every complete trial has the same objective value")
    varied = {name for t in complete for name in t.params
              if len({repr(u.params.get(name)) for u in complete}) > 1}
    if not varied:
        return Importances(reason="no parameter takes more than one value across complete trials")

    sign = -1.0 if study.directions[metric_index] == StudyDirection.MAXIMIZE else 1.0
    evaluators = {
        # Optuna's fANOVA works in linear space even for log distributions (a learning rate's
        # whole good region would sit in its first percent), so it gets a log-space copy
        "fanova": (FanovaImportanceEvaluator(seed=0), lambda t: t.values[metric_index]),
        # PED-ANOVA with a target assumes lower is better: flip a maximised objective
        "ped_anova": (PedAnovaImportanceEvaluator(), lambda t: sign * t.values[metric_index]),
    }
    out, problems = Importances(), []
    for name, (evaluator, target) in evaluators.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                source = _log_space_copy(study, complete) if name == "fanova" else study
                out[name] = dict(optuna.importance.get_param_importances(
                    source, evaluator=evaluator, target=target))
        except Exception as exc:  # one evaluator's failure must not hide the other's answer
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    out.reason = "; ".join(problems)
    return out


def _log_space_copy(study: optuna.Study, complete) -> optuna.Study:
    """An in-memory study of `complete` in which every log-scaled numeric param is its log10."""
    def convert(dist, value):
        if isinstance(dist, (FloatDistribution, IntDistribution)) and dist.log:
            return FloatDistribution(math.log10(dist.low), math.log10(dist.high)), math.log10(value)
        return dist, value

    copy = optuna.create_study(directions=study.directions)
    for t in complete:
        pairs = {k: convert(t.distributions[k], v) for k, v in t.params.items()}
        copy.add_trial(optuna.trial.create_trial(
            values=t.values, params={k: v for k, (_, v) in pairs.items()},
            distributions={k: d for k, (d, _) in pairs.items()}))
    return copy
