"""search.report.figures: Optuna's own plots of a made-up study as inline SVG (no script, no URL, the
same bytes each time, the study's names on the axes), and a reason instead of a plot, never an error,
when Optuna cannot draw one."""
import math
import re

import matplotlib
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

from search.report import figures

DISTS = {"r_log2": IntDistribution(1, 5), "learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
         "target": CategoricalDistribution(["qv", "all"])}
TITLES = ["Optimization history of eval_accuracy", "eval_accuracy per setting (slice plot)", "Parallel coordinates",
          "Contour of the two most important settings", "PED-ANOVA importances for eval_accuracy"]


def params(i):
    # learning rates over three decades in an order unrelated to the rank; the target alternates
    return {"r_log2": 1 + i % 5, "learning_rate": 10 ** (-5 + 3 * (i * 7 % 10) / 9), "target": ["qv", "all"][i % 2]}


def accuracy(p):
    """Peaks at lr 3e-4 (the strongest effect), grows a little with the rank, ignores the target."""
    return 0.6 + 0.02 * p["r_log2"] - 0.08 * abs(math.log10(p["learning_rate"] / 3e-4))


def make_study(n=10, directions=("maximize",), dists=DISTS):
    study = optuna.create_study(directions=list(directions))
    for i in range(n):
        p = {k: v for k, v in params(i).items() if k in dists}
        values = [accuracy(params(i)), 2.0 ** params(i)["r_log2"] / 8][:len(directions)]
        study.add_trial(create_trial(params=p, distributions=dists, values=values))
    return study


def texts(svg):
    return re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)


@pytest.fixture(scope="module")
def study():
    return make_study()


@pytest.fixture(scope="module")
def drawn(study):
    return figures.study_figures(study, "eval_accuracy")


def test_all_five_are_drawn_in_reading_order_as_inline_svg(drawn):
    assert [f.title for f in drawn] == TITLES
    for figure in drawn:
        assert figure.svg and not figure.reason, figure.title
        assert figure.svg.startswith('<svg class="chart"') and figure.svg.endswith("</svg>")
        for needle in ("<script", "http", "<?xml", "xlink"):
            assert needle not in figure.svg, (figure.title, needle)
        # a colour bar's gradient is an embedded PNG: in the page, nothing to fetch
        assert set(re.findall(r'<image [^>]*?href="([a-z]+:)', figure.svg)) <= {"data:"}, figure.title


def test_axes_name_the_metric_and_optuna_s_params(drawn):
    history, slices, parallel, contour, importances = (set(texts(f.svg)) for f in drawn)
    assert "eval_accuracy" in history and "Trial" in history
    assert {"learning_rate", "r_log2", "target", "eval_accuracy"} <= slices  # encoded names, as Optuna has them
    assert {"learning_rate", "r_log2", "target", "eval_accuracy"} <= parallel
    assert {"learning_rate", "r_log2"} <= contour and "target" not in contour
    assert {"learning_rate", "r_log2", "target"} <= importances
    assert {"1e-4", "0.001"} <= slices  # log axes in the report's numbers, not mathtext


def test_contour_is_of_the_two_most_important_settings(study, drawn):
    assert figures.most_important_params(study) == ["learning_rate", "r_log2"]  # the target has no effect
    assert "`learning_rate` and `r_log2`" in drawn[3].caption


def test_the_same_study_gives_the_same_svg(study, drawn):
    assert [f.svg for f in figures.study_figures(study, "eval_accuracy")] == [f.svg for f in drawn]


def test_figures_are_closed_and_matplotlib_settings_restored(study):
    plt = figures._pyplot()
    open_before, rc_before = plt.get_fignums(), dict(matplotlib.rcParams)
    figures.importances(study, "eval_accuracy")  # Optuna calls plt.style.use("ggplot") inside
    assert plt.get_fignums() == open_before and dict(matplotlib.rcParams) == rc_before


def test_too_few_trials_give_reasons_not_plots():
    for figure in figures.study_figures(make_study(n=1), "eval_accuracy"):
        assert figure.svg is None and "at least 2 complete trials, has 1" in figure.reason, figure.title


def test_one_setting_has_slices_but_no_parallel_coordinates_or_contour():
    one = make_study(n=6, dists={"learning_rate": DISTS["learning_rate"]})
    history, slices, parallel, contour, _ = figures.study_figures(one, "eval_accuracy")
    assert history.svg and slices.svg
    assert parallel.svg is None and "at least 2 searched settings" in parallel.reason
    assert contour.svg is None and "at least 2 searched settings" in contour.reason


def test_one_of_several_objectives_is_drawn_with_its_name():
    two = make_study(directions=("maximize", "minimize"))
    drawn = figures.study_figures(two, "adapter_mb", objective_index=1)
    assert all(f.svg for f in drawn), [f.reason for f in drawn if not f.svg]
    assert "adapter_mb" in texts(drawn[0].svg)
    assert "best so far" not in drawn[0].caption  # Optuna draws no best line for a `target=`
    assert figures.most_important_params(two, objective_index=1)[0] == "r_log2"  # adapter_mb is 2**r_log2 / 8
    assert "no objective 2" in figures.optimization_history(two, "x", objective_index=2).reason


def test_an_optuna_error_becomes_a_reason(study, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("boom")
    monkeypatch.setattr(optuna.visualization.matplotlib, "plot_parallel_coordinate", broken)
    figure = figures.parallel_coordinates(study, "eval_accuracy")
    assert figure.svg is None and figure.reason == "Optuna could not draw it (ValueError: boom)"
