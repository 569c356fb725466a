"""A search's Optuna storage, opened the way optuna-dashboard opens it (its WSGI app, no server): the study is
listed, objectives carry their metric names, and trials carry readable attributes (param_*, metrics, reasons)."""
import json
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from search.run.searcher import PeftOptunaSearch, make_sampler
from search.store.storage import STUDY_NAME, open_storage

dashboard = pytest.importorskip("optuna_dashboard")


def api(app, path, query=""):
    environ = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, QUERY_STRING=query)
    status = {}
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.setdefault("code", code)))
    assert status["code"].startswith("200"), (path, status, body[:500])
    return json.loads(body)


def test_the_study_opens_in_optuna_dashboard_with_named_objectives_and_readable_attributes(tmp_path):
    storage = open_storage("sqlite", str(tmp_path))
    searcher = PeftOptunaSearch(
        space={"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)},
        metric="eval_accuracy", mode="max", sampler=make_sampler("tpe", 0), study_name=STUDY_NAME,
        storage=storage, seed=0, decode=lambda params: dict(params))
    config = searcher.suggest("t0")
    result = {"eval_accuracy": 0.8, "round": 1, "training_iteration": 1, "rounds_total": 1, "tokens_per_s": 900.0}
    searcher.on_trial_result("t0", result)
    searcher.on_trial_complete("t0", result)

    app = dashboard.wsgi(storage)
    studies = api(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [STUDY_NAME]
    study = api(app, f"/api/studies/{studies[0]['study_id']}", "after=0")
    assert study["objective_names"] == ["eval_accuracy"]
    attrs = {a["key"]: a["value"] for a in study["trials"][0]["user_attrs"]}
    assert attrs["param_learning_rate"] == str(config["learning_rate"])
    assert attrs["eval_accuracy"] == "0.8" and attrs["tokens_per_s"] == "900.0"
