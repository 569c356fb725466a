"""Optuna's own plots of a study, as inline SVG for report.html.

The plots people know from Optuna's documentation and dashboard, drawn by Optuna's matplotlib
backend (optuna.visualization.matplotlib) rather than by hand: optimization history, a slice per
setting, parallel coordinates, the contour of the two most important settings, and importances.
Each function returns a `StudyFigure`: its SVG (search.report.plots.svg: no script, no URL, the same
bytes for the same study), or None and the reason when Optuna cannot draw it (too few complete
trials, one setting only, ...). Nothing here raises into the report.

Settings appear as Optuna names them in the study, i.e. encoded: `r_log2` for a power-of-two rank.
For a study of several objectives, `objective_index` picks the one drawn (Optuna needs `target=`).
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import matplotlib
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search.report.plots import axis_limits, plain_log_ticks, style, svg

WIDE = (9.4, 4.2)        # inches: about 900 x 400 px, the width of the report's text column
MIN_COMPLETE_TRIALS = 2  # fewer: no history, no spread to slice, and Optuna's importances fail


@dataclass(frozen=True)
class StudyFigure:
    """One of Optuna's plots: `svg` when drawn, else None and `reason` (a short sentence fragment)."""
    title: str
    caption: str
    svg: Optional[str] = None
    reason: str = ""


def _pyplot():
    """pyplot, which Optuna's plots draw with. Headless (the CLI, a Ray worker) it gets the Agg backend,
    so no GUI toolkit or window is involved; a process that chose a backend (a notebook) keeps it."""
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


class _Objective:
    """Which value of a trial is drawn, and how Optuna is told: a single-objective study draws its value
    (so Optuna also draws the best-so-far line); one of several objectives needs `target=`."""

    def __init__(self, study: optuna.Study, metric_name: str, objective_index: int):
        self.name = metric_name
        self.index = objective_index
        self.multi = len(study.directions) > 1
        self.target: Optional[Callable[[FrozenTrial], float]] = \
            (lambda t: t.values[objective_index]) if self.multi else None
        # Importances: PED-ANOVA rates what leads to *low* target values, so a maximized one is negated
        # (study.direction tells Optuna that itself when there is no target).
        sign = -1.0 if study.directions[objective_index] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        self.importance_target: Optional[Callable[[FrozenTrial], float]] = \
            (lambda t: sign * t.values[objective_index]) if self.multi else None

    def kwargs(self) -> dict:
        return {"target": self.target, "target_name": self.name}

    def value(self, trial: FrozenTrial) -> float:
        return trial.values[self.index]


def _complete(study: optuna.Study) -> List[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _params(trials: Sequence[FrozenTrial]) -> List[str]:
    """The settings of the complete trials, in the order they were first suggested."""
    return list(dict.fromkeys(name for t in trials for name in t.params))


def _varied(trials: Sequence[FrozenTrial], name: str) -> bool:
    """Whether the complete trials tried more than one value of `name` (a contour needs two)."""
    return len({repr(t.params[name]) for t in trials if name in t.params}) > 1


def _why_not(study: optuna.Study, objective_index: int, min_params: int = 1) -> str:
    """The reason no plot can be drawn, or "" when one can."""
    if not 0 <= objective_index < len(study.directions):
        return f"the study has no objective {objective_index}"
    trials = _complete(study)
    if len(trials) < MIN_COMPLETE_TRIALS:
        return f"needs at least {MIN_COMPLETE_TRIALS} complete trials, has {len(trials)}"
    if len(_params(trials)) < min_params:
        return f"needs at least {min_params} searched settings, has {len(_params(trials))}"
    return ""


def _quiet() -> None:
    """Inside warnings.catch_warnings(): the plots are marked experimental, and PED-ANOVA warns whenever it
    is given a target, which _Objective has already turned so that lower is better."""
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes the importances")


def _render(title: str, caption: str, draw: Callable[[], object], size=WIDE,
            limit_values: Optional[Sequence[float]] = None) -> StudyFigure:
    """Runs one of Optuna's plot functions (`draw`) and returns its figure as SVG. The figure and any
    other that `draw` opened are closed (pyplot keeps them otherwise); Optuna's experimental warnings
    are silenced; an error becomes the reason. `limit_values`: the objective values, whose y axis
    then follows search.report.plots.axis_limits instead of zooming into their spread."""
    plt = _pyplot()
    before = set(plt.get_fignums())
    try:
        with style(), warnings.catch_warnings():
            _quiet()
            axes = np.atleast_1d(draw()).ravel()
            figure = axes[0].figure
            figure.set_size_inches(*size)
            plain_log_ticks(figure)
            if limit_values is not None:
                for ax in axes:  # slice plots share y; setting each is harmless
                    ax.set_ylim(axis_limits(limit_values))
            return StudyFigure(title, caption, svg(figure, title, bbox_inches="tight"))
    except Exception as error:  # a plot the report can do without: say why, never fail the report
        return StudyFigure(title, caption, reason=f"Optuna could not draw it ({type(error).__name__}: {error})")
    finally:
        for number in set(plt.get_fignums()) - before:
            plt.close(number)


def optimization_history(study: optuna.Study, metric_name: str, objective_index: int = 0) -> StudyFigure:
    title = f"Optimization history of {metric_name}"
    caption = (f"`{metric_name}` of each complete trial by trial number"
               + (", and the best so far" if len(study.directions) == 1 else "") + ".")
    reason = _why_not(study, objective_index, min_params=0)
    if reason:
        return StudyFigure(title, caption, reason=reason)
    from optuna.visualization.matplotlib import plot_optimization_history
    objective = _Objective(study, metric_name, objective_index)
    return _render(title, caption, lambda: plot_optimization_history(study, **objective.kwargs()),
                   limit_values=[objective.value(t) for t in _complete(study)])


def slices(study: optuna.Study, metric_name: str, objective_index: int = 0) -> StudyFigure:
    title = f"{metric_name} per setting (slice plot)"
    caption = (f"`{metric_name}` of each complete trial against each searched setting (as Optuna encodes it, "
               "e.g. `r_log2`); the colour is the trial number, darker later.")
    reason = _why_not(study, objective_index)
    if reason:
        return StudyFigure(title, caption, reason=reason)
    from optuna.visualization.matplotlib import plot_slice
    objective = _Objective(study, metric_name, objective_index)
    count = len(_params(_complete(study)))
    size = (max(WIDE[0], 2.4 * count), WIDE[1])  # at least ~2.4 in per setting; the page scales it to fit
    return _render(title, caption, lambda: plot_slice(study, **objective.kwargs()), size=size,
                   limit_values=[objective.value(t) for t in _complete(study)])


def parallel_coordinates(study: optuna.Study, metric_name: str, objective_index: int = 0) -> StudyFigure:
    title = "Parallel coordinates"
    caption = (f"Each complete trial as a line through its `{metric_name}` and its value of every searched "
               "setting; the colour is its objective value.")
    reason = _why_not(study, objective_index, min_params=2)
    if reason:
        return StudyFigure(title, caption, reason=reason)
    from optuna.visualization.matplotlib import plot_parallel_coordinate
    objective = _Objective(study, metric_name, objective_index)
    return _render(title, caption, lambda: plot_parallel_coordinate(study, **objective.kwargs()))


def most_important_params(study: optuna.Study, objective_index: int = 0, count: int = 2,
                          evaluator=None) -> List[str]:
    """The `count` settings Optuna rates most important (its default evaluator, PED-ANOVA, unless given);
    if the importances cannot be computed, the first settings the trials tried. Only settings the
    complete trials varied: a contour needs two values along each axis."""
    trials = _complete(study)
    varied = [name for name in _params(trials) if _varied(trials, name)]
    try:
        target = _Objective(study, "", objective_index).importance_target
        with warnings.catch_warnings():
            _quiet()
            ranked = list(optuna.importance.get_param_importances(study, evaluator=evaluator, target=target))
    except Exception:  # too few trials or a degenerate study: fall back to the order they were tried
        ranked = []
    return ([name for name in ranked if name in varied] + [name for name in varied if name not in ranked])[:count]


def contour(study: optuna.Study, metric_name: str, objective_index: int = 0, evaluator=None) -> StudyFigure:
    title = "Contour of the two most important settings"
    reason = _why_not(study, objective_index, min_params=2)
    pair = [] if reason else most_important_params(study, objective_index, evaluator=evaluator)
    caption = (f"`{metric_name}` interpolated over " + (" and ".join(f"`{p}`" for p in pair) or "two settings")
               + " (Optuna's names), the two settings rated most important; dots are complete trials.")
    if not reason and len(pair) < 2:
        reason = "needs two settings that the complete trials varied"
    if reason:
        return StudyFigure(title, caption, reason=reason)
    from optuna.visualization.matplotlib import plot_contour
    objective = _Objective(study, metric_name, objective_index)
    return _render(title, caption, lambda: plot_contour(study, params=pair, **objective.kwargs()), size=(7.5, 5.2))


def importances(study: optuna.Study, metric_name: str, objective_index: int = 0, evaluator=None) -> StudyFigure:
    name = type(evaluator).__name__.replace("ImportanceEvaluator", "") if evaluator else "PED-ANOVA"
    title = f"{name} importances for {metric_name}"
    caption = (f"How much each searched setting (as Optuna encodes it) matters for `{metric_name}`, "
               f"by Optuna's {name} evaluator; they sum to 1.")
    reason = _why_not(study, objective_index)
    if reason:
        return StudyFigure(title, caption, reason=reason)
    from optuna.visualization.matplotlib import plot_param_importances
    target = _Objective(study, metric_name, objective_index).importance_target
    count = len(_params(_complete(study)))
    return _render(title, caption, lambda: plot_param_importances(study, evaluator=evaluator, target=target,
                                                                  target_name=metric_name),
                   size=(WIDE[0], 1.4 + 0.45 * count))


def study_figures(study: optuna.Study, metric_name: str, objective_index: int = 0,
                  evaluator=None) -> List[StudyFigure]:
    """All of the above, in reading order: how the search went, what each setting does, how they
    combine, and which matter. Skipped ones are kept, with their reason, for the report to say why."""
    return [optimization_history(study, metric_name, objective_index),
            slices(study, metric_name, objective_index),
            parallel_coordinates(study, metric_name, objective_index),
            contour(study, metric_name, objective_index, evaluator=evaluator),
            importances(study, metric_name, objective_index, evaluator=evaluator)]
