"""Optuna behind Ray Tune, with trial states and results that the run directory can trust.

Ray's `OptunaSearch` marks an errored trial that reported anything as COMPLETE and an
early-stopped one as COMPLETE with its intermediate value. Here a trial stopped before its last
eval round is PRUNED, an errored one is FAIL with its reason, and every finished trial carries its
metrics and system figures as Optuna user attributes, so the Optuna storage alone is enough to
rebuild trials.csv and the report (also while the search runs, also after the driver died).
"""
from __future__ import annotations

import json
import logging
import pickle
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from search.numbers import is_number
from search.refine.sampler import RefinedSampler
from search.run.gp import PrunedAwareGPSampler
from search.spec.redact import secret_free_dumps
from search.store.keys import (ANSWERS_KEY, BASE_PREFIX, DIAG_PREFIX, FAIL_REASON_KEY,  # noqa: F401 (also read here)
                               FAILED_ON_KEY, NODE_KEY, NODES_ATTR, RETRIES_KEY, ROUNDS_TOTAL_KEY, STOPPED_EARLY_KEY,
                               TRIAL_NUMBER_KEY)
from search.store.results import SYSTEM_COLUMNS

if TYPE_CHECKING:
    from search.refine.refiner import Refiner

log = logging.getLogger("peft_search")

# Figures stored on each Optuna trial besides its metrics: trials.csv's system columns and bookkeeping.
SYSTEM_KEYS = (*SYSTEM_COLUMNS, "trainable_params", ROUNDS_TOTAL_KEY, "resumed_after_round")
# The trainer's failure diagnostics (any JSON value) and why it stopped before its planned steps.
SECRET_FREE_STATE = "secret_free_state"   # the one key of a pickled searcher's state


def _sampler_tpe(seed: int) -> optuna.samplers.BaseSampler:
    # multivariate: rank/alpha/lr interact, and PEFT spaces are small enough for it
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)


def _sampler_gp(seed: int) -> optuna.samplers.BaseSampler:
    return PrunedAwareGPSampler(seed)


def _sampler_random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _sampler_nsga2(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


# name -> factory(seed); grid needs the space, so the driver builds it through `make_sampler`.
SAMPLERS: Dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "gp": _sampler_gp,
    "tpe": _sampler_tpe,
    "random": _sampler_random,
    "nsga2": _sampler_nsga2,
}


class TuneGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its stop: once the grid is used up it calls Study.stop, which raises outside
    Study.optimize (the last trials of a full grid, told by the searcher, crashed the driver).
    Tune's num_samples ends the search instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(algorithm: str, seed: int, grid: Optional[Dict[str, list]] = None) -> optuna.samplers.BaseSampler:
    if algorithm == "grid":
        return TuneGridSampler(grid or {}, seed=seed)
    return SAMPLERS[algorithm](seed)


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)   # what Optuna's storage accepts as a user attribute
        return True
    except (TypeError, ValueError):
        return False


def _stored_on_trial(key: str, value: Any) -> bool:
    """Whether a result key is kept on the Optuna trial (so trials.csv and the report can show it)."""
    if key.startswith(DIAG_PREFIX) or key in (STOPPED_EARLY_KEY, ANSWERS_KEY, BASE_PREFIX + ANSWERS_KEY):
        return _json_value(value)
    if key.startswith(("eval_", "train_", BASE_PREFIX + "eval_")) or key in SYSTEM_KEYS or \
            key in ("round", "step", "epoch"):
        return value is None or is_number(value)
    return False


class PeftOptunaSearch(OptunaSearch):
    """OptunaSearch with correct PRUNED / FAIL states and results stored on the Optuna trial.

    With a `refiner` (search/refine/refiner.py), the space is refined in the same study every
    `refine_every` finished trials; the sampler is then wrapped in a RefinedSampler.
    `resume`: numbers of the study's interrupted (RUNNING) trials; the first suggestions hand them out
    again, same Optuna trial and parameters, before new trials are asked for (search/run/resume.py).
    Each Optuna trial also keeps what the cluster did to it (search/store/keys.py): the nodes its rank 0 ran
    on (`nodes`), its retries after lost workers (`retries`), and, on a trial that the cluster alone failed,
    `failed_on: infrastructure` (`peft-search resume` runs such a trial again)."""

    def __init__(self, *args, decode: Callable[[dict], dict], refiner: Optional["Refiner"] = None,
                 resume: Sequence[int] = (), **kwargs):
        if refiner is not None and not isinstance(kwargs.get("sampler"), RefinedSampler):
            seed = kwargs.get("seed") or 0
            kwargs["sampler"] = RefinedSampler(kwargs.get("sampler") or make_sampler("tpe", seed), seed)
        super().__init__(*args, **kwargs)
        self._decode = decode
        self._last_results: Dict[str, dict] = {}
        self._cluster_seen: Dict[str, dict] = {}   # trial id -> what was stored of the cluster's doing, once each
        self._refiner = refiner
        self._resume = self._storage_ids(resume) if resume else []   # handed out in this order
        if refiner is not None:
            refiner.attach(self._ot_study)   # a resumed study continues in its last refined region
        self._name_objectives()

    def _storage_ids(self, numbers: Sequence[int]) -> list:
        ids = {trial.number: trial._trial_id for trial in self._ot_study.get_trials(deepcopy=False)}
        return [ids[number] for number in numbers]

    # Ray Tune pickles the searcher into RUN_DIR/ray/tune/ (tuner.pkl, searcher-state-*.pkl): both go through
    # secret_free_dumps, so neither holds the storage's password nor the W&B API key (search/spec/redact.py).
    def __getstate__(self) -> Dict[str, bytes]:
        return {SECRET_FREE_STATE: secret_free_dumps(self.__dict__.copy())}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(pickle.loads(state[SECRET_FREE_STATE]) if SECRET_FREE_STATE in state else state)

    def save(self, checkpoint_path: str) -> None:
        """What OptunaSearch.save writes (the searcher's attributes, read back by its `restore`), secret-free."""
        with open(checkpoint_path, "wb") as handle:
            handle.write(secret_free_dumps(self.__dict__.copy()))

    def _name_objectives(self) -> None:
        """Store the metric names with the study: optuna-dashboard then shows `eval_accuracy`, not "Objective 0"."""
        import warnings

        if getattr(self, "_ot_study", None) is None or self.metric is None:
            return
        with warnings.catch_warnings():   # set_metric_names is marked experimental
            warnings.simplefilter("ignore")
            self._ot_study.set_metric_names(self.metric if isinstance(self.metric, list) else [self.metric])

    def suggest(self, trial_id: str) -> Optional[Dict]:
        if trial_id not in self._ot_trials and self._resume:
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self._resume.pop(0))
        params = super().suggest(trial_id)
        if params is None:
            return None
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        if self._refiner is not None:
            self._refiner.mark(ot_trial)
        for name, value in self._decode(dict(ot_trial.params)).items():
            ot_trial.set_user_attr(f"param_{name}", value)
        return {**params, TRIAL_NUMBER_KEY: ot_trial.number}

    def on_trial_result(self, trial_id: str, result: Dict):
        self._record_cluster(trial_id, result)
        self._last_results[trial_id] = result
        metric = result.get(self.metric) if isinstance(self.metric, str) else None
        if is_number(metric) and trial_id not in self._completed_trials:  # a failure report carries no metric
            # at the trial's own round: a trial resumed after round k reports round k+1 as its first result
            self._ot_trials[trial_id].report(metric, int(result.get("round") or result["training_iteration"]))

    def on_trial_complete(self, trial_id: str, result: Optional[Dict] = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        last = result or self._last_results.pop(trial_id, None) or {}
        self._record_cluster(trial_id, last)
        for key, value in last.items():
            if _stored_on_trial(key, value):
                ot_trial.set_user_attr(key, value)
        state, values = self._final_state(last, error)
        if state == TrialState.FAIL:
            reason = last.get(FAIL_REASON_KEY) or "the trial process failed (see the Ray trial logs)"
            ot_trial.set_user_attr(FAIL_REASON_KEY, str(reason))
        elif state == TrialState.PRUNED:
            ot_trial.set_user_attr(FAIL_REASON_KEY, f"stopped by the scheduler after round {last.get('round')}")
        self._ot_study.tell(ot_trial, values if state == TrialState.COMPLETE else None, state=state)
        self._completed_trials.add(trial_id)
        if self._refiner is not None:
            self._refine()

    def _record_cluster(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        seen = self._cluster_seen.setdefault(trial_id, {})
        node = result.get(NODE_KEY)
        if node:
            if NODES_ATTR not in seen:   # a resumed trial's earlier nodes come first
                seen[NODES_ATTR] = list(ot_trial.user_attrs.get(NODES_ATTR) or [])
            if not seen[NODES_ATTR] or seen[NODES_ATTR][-1] != node:
                seen[NODES_ATTR].append(node)
                ot_trial.set_user_attr(NODES_ATTR, list(seen[NODES_ATTR]))
        for key in (RETRIES_KEY, FAILED_ON_KEY):
            value = result.get(key)
            if value and seen.get(key) != value:
                seen[key] = value
                ot_trial.set_user_attr(key, value)

    def _refine(self) -> None:
        try:
            self._refiner.maybe_refine(self._ot_study)
        except Exception:  # a failed analysis must not end a search that can go on in its current region
            log.warning("refinement skipped: the sensitivity analysis failed", exc_info=True)

    def _final_state(self, last: dict, error: bool):
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [last.get(name) for name in metrics]
        if error or last.get(FAIL_REASON_KEY):
            return TrialState.FAIL, None
        if not all(is_number(v) for v in values):
            return TrialState.FAIL, None
        rounds_total = last.get(ROUNDS_TOTAL_KEY)
        if rounds_total is not None and last.get("round", rounds_total) < rounds_total:
            return TrialState.PRUNED, None
        return TrialState.COMPLETE, values if len(values) > 1 else values[0]
