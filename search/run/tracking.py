"""Experiment tracking for searches: one W&B group per search, one W&B run per trial.

The spec's ``tracking:`` section picks the backend::

    tracking:
      wandb: offline      # offline (default) | online | disabled
      project: my-proj    # default: the search name
      entity: my-team     # optional
      api_key: ...        # discouraged: prefer WANDB_API_KEY; only used for online mode

Offline runs are written inside the run directory (``<run_dir>/wandb/offline-run-*``) and can be
uploaded later with ``wandb sync <run_dir>/wandb/offline-run-*``.

Trial workers (rank 0 only)::

    tracker = start_trial(run_dir, search_name, trial_number, params, spec.tracking)
    ...
    tracker.log_round(metrics)             # once per eval round
    ...
    tracker.finish(summary, "COMPLETE")    # or "PRUNED" / "FAIL"

The driver, at the end of a search::

    log_tables(run_dir, search_name, spec.tracking, {"trials": rows, "pareto": rows})

Tracking must never break or hang a trial: every W&B error is caught, logged once as a warning,
and the tracker degrades to a no-op. ``wandb`` is imported only when a W&B tracker is started.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

from search.store.keys import ANSWERS_KEY, BASE_PREFIX
from search.store.results import SYSTEM_COLUMNS
from search.store.storage import is_secret_key

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'peft-search[wandb]'"
INIT_TIMEOUT_S = 60.0        # online init; offline init is local and fast
FINISH_TIMEOUT_S = 60.0      # online upload at finish; the offline files stay syncable anyway
STATES = ("COMPLETE", "PRUNED", "FAIL")

ANSWER_COLUMNS = ("prompt", "reference", "answer")   # trainers/generation.py's example rows
# Keys of per-round metrics that describe the trial as a whole: copied into the run summary.
SYSTEM_KEYS = (*SYSTEM_COLUMNS, "trainable_params")



# --------------------------------------------------------------------------- protocol + registry

class TrialTracker(Protocol):
    def log_round(self, metrics: Mapping[str, Any]) -> None: ...

    def finish(self, summary: Optional[Mapping[str, Any]] = None, state: str = "COMPLETE") -> None: ...


TrackerFactory = Callable[..., TrialTracker]
TablesLogger = Callable[..., None]


class NullTracker:
    """Does nothing: ``tracking.wandb: disabled`` and the fallback after any tracking error."""

    def log_round(self, metrics: Mapping[str, Any]) -> None:
        pass

    def finish(self, summary: Optional[Mapping[str, Any]] = None, state: str = "COMPLETE") -> None:
        pass


def _disabled_trial(run_dir, search_name, trial_number, params, tracking) -> TrialTracker:
    return NullTracker()


def _disabled_tables(run_dir, search_name, tracking, tables) -> None:
    return None


def _wandb_trial(run_dir, search_name, trial_number, params, tracking) -> TrialTracker:
    return WandbTracker.start(run_dir, search_name, trial_number, params, tracking)


def _wandb_tables(run_dir, search_name, tracking, tables) -> None:
    _wandb_log_tables(run_dir, search_name, tracking, tables)


# name -> (trial tracker factory, tables logger). Factories import their backend lazily.
TRACKERS: Dict[str, tuple] = {
    "wandb": (_wandb_trial, _wandb_tables),
    "disabled": (_disabled_trial, _disabled_tables),
}

# tracking.wandb mode -> registry name
MODE_TO_TRACKER = {"offline": "wandb", "online": "wandb", "disabled": "disabled"}


def register_tracker(name: str, trial_factory: TrackerFactory, tables_logger: Optional[TablesLogger] = None) -> None:
    TRACKERS[name] = (trial_factory, tables_logger or _disabled_tables)


def _get(tracking: Any, key: str, default: Any = None) -> Any:
    if tracking is None:
        return default
    if isinstance(tracking, Mapping):
        value = tracking.get(key, default)
    else:
        value = getattr(tracking, key, default)
    return default if value is None else value


def tracking_mode(tracking: Any) -> str:
    """``offline`` | ``online`` | ``disabled`` (missing tracking section: offline)."""
    mode = str(_get(tracking, "wandb", "offline")).lower()
    if mode not in MODE_TO_TRACKER:
        raise ValueError(f"tracking.wandb: unknown mode {mode!r}; use one of {sorted(MODE_TO_TRACKER)}")
    return mode


def tracker_name(tracking: Any) -> str:
    return MODE_TO_TRACKER[tracking_mode(tracking)]


def start_trial(run_dir: str, search_name: str, trial_number: int, params: Mapping[str, Any],
                tracking: Any) -> TrialTracker:
    """Start tracking one trial (call on rank 0 only). Never raises for tracking-backend errors."""
    factory, _ = TRACKERS[tracker_name(tracking)]
    return factory(run_dir, search_name, trial_number, params, tracking)


def log_tables(run_dir: str, search_name: str, tracking: Any, tables: Mapping[str, List[Mapping[str, Any]]]) -> None:
    """Log result tables (lists of row dicts) as one extra run named ``summary`` in the search's group."""
    _, logger = TRACKERS[tracker_name(tracking)]
    logger(run_dir, search_name, tracking, tables)


def check_available(tracking: Any) -> None:
    """Raise ImportError (with the install hint) early, in the driver, when W&B is asked for but missing."""
    if tracker_name(tracking) == "wandb":
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ImportError(f"tracking.wandb: {tracking_mode(tracking)} needs the wandb package: {INSTALL_HINT} "
                              f"(or set tracking.wandb: disabled)")


# --------------------------------------------------------------------------- helpers

def run_id(search_name: str, trial_number: Any) -> str:
    """Deterministic W&B run id for a search's trial (or ``"summary"``): resumes continue the same run."""
    digest = hashlib.sha1(f"{search_name}\x00{trial_number}".encode("utf-8")).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", search_name.lower()).strip("-")[:40] or "search"
    suffix = f"{int(trial_number):04d}" if isinstance(trial_number, int) else str(trial_number)
    return f"{slug}-{suffix}-{digest}"


def trial_run_name(trial_number: int) -> str:
    return f"trial-{int(trial_number):04d}"


def scrub_secrets(params: Any, secrets: tuple = ()) -> Any:
    """Copy of ``params`` without secret-looking keys or values equal to a known secret."""
    if isinstance(params, Mapping):
        out = {}
        for key, value in params.items():
            if is_secret_key(str(key)):
                continue
            if str(key) == "tracking":   # the tracking section holds the api key: never config
                continue
            out[str(key)] = scrub_secrets(value, secrets)
        return out
    if isinstance(params, (list, tuple)):
        return [scrub_secrets(v, secrets) for v in params]
    if isinstance(params, str) and any(s and s in params for s in secrets):
        return "<redacted>"
    return params


def _clean_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """Numbers and strings only; drop None (e.g. energy_j unavailable) and non-finite values kept as-is."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float, str)):
            out[key] = value
        elif hasattr(value, "item"):        # numpy / torch scalars
            try:
                out[key] = value.item()
            except Exception:
                continue
    return out


def _answer_tables(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """A round's example answers (generation-based evaluation) as W&B tables: prompt, reference, answer."""
    tables = {}
    for key in (ANSWERS_KEY, BASE_PREFIX + ANSWERS_KEY):
        rows = metrics.get(key)
        if rows:
            wandb = _import_wandb()
            tables[key] = wandb.Table(columns=list(ANSWER_COLUMNS),
                                      data=[[str(row.get(column, "")) for column in ANSWER_COLUMNS] for row in rows])
    return tables


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ImportError(f"W&B tracking needs the wandb package: {INSTALL_HINT} "
                          f"(or set tracking.wandb: disabled)") from err
    return wandb


def _settings(wandb, mode: str):
    kwargs = dict(silent=True, quiet=True, console="off", reinit="create_new",
                  init_timeout=INIT_TIMEOUT_S, x_save_requirements=False)
    if mode == "online":
        kwargs["finish_timeout"] = FINISH_TIMEOUT_S
    return wandb.Settings(**kwargs)


def _prepare_env(tracking: Any, mode: str) -> None:
    """Quiet, non-interactive W&B in this process; the spec's api key only for online runs."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
    api_key = _get(tracking, "api_key")
    if mode == "online" and api_key and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_API_KEY"] = str(api_key)   # this process only; never written to config


def _init_run(run_dir: str, search_name: str, tracking: Any, *, run_name: str, rid: str,
              config: Optional[Dict[str, Any]], job_type: str):
    mode = tracking_mode(tracking)
    wandb = _import_wandb()
    _prepare_env(tracking, mode)
    wandb_dir = os.path.join(os.path.abspath(run_dir), "wandb")
    os.makedirs(wandb_dir, exist_ok=True)
    run = wandb.init(
        mode=mode,
        dir=os.path.abspath(run_dir),           # wandb puts its files in <dir>/wandb
        project=_get(tracking, "project") or search_name,
        entity=_get(tracking, "entity"),
        group=search_name,
        job_type=job_type,
        name=run_name,
        id=rid,
        resume="allow",
        config=config,
        settings=_settings(wandb, mode),
    )
    return run


# --------------------------------------------------------------------------- W&B tracker

class WandbTracker:
    """One W&B run per trial; any W&B error turns it into a no-op (warned once)."""

    def __init__(self, run: Any, label: str):
        self._run = run
        self._label = label
        self._warned = False
        self._last: Dict[str, Any] = {}

    @classmethod
    def start(cls, run_dir, search_name, trial_number, params, tracking) -> TrialTracker:
        label = f"{search_name} {trial_run_name(trial_number)}"
        secrets = tuple(s for s in (_get(tracking, "api_key"), os.environ.get("WANDB_API_KEY")) if s)
        config = scrub_secrets(dict(params or {}), secrets)
        config["trial_number"] = int(trial_number)
        try:
            run = _init_run(run_dir, search_name, tracking, run_name=trial_run_name(trial_number),
                            rid=run_id(search_name, trial_number), config=config, job_type="trial")
        except ImportError:
            raise
        except Exception as err:   # wandb.Error, init timeouts, bad settings, ...
            log.warning("W&B tracking disabled for %s: init failed: %s: %s", label, type(err).__name__, err)
            return NullTracker()
        if run is None:
            return NullTracker()
        return cls(run, label)

    def _fail(self, what: str, err: BaseException) -> None:
        if not self._warned:
            log.warning("W&B tracking disabled for %s: %s failed: %s: %s",
                        self._label, what, type(err).__name__, err)
            self._warned = True
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def log_round(self, metrics: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            data = _clean_metrics(metrics)
            self._last.update(data)
            data.update(_answer_tables(metrics))
            step = data.get("round")
            if isinstance(step, int):
                self._run.log(data, step=step)
            else:
                self._run.log(data)
        except Exception as err:
            self._fail("log", err)

    def finish(self, summary: Optional[Mapping[str, Any]] = None, state: str = "COMPLETE") -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            final = {k: self._last[k] for k in SYSTEM_KEYS if k in self._last}
            final.update(_clean_metrics(summary or {}))
            final["state"] = str(state)
            for key, value in final.items():
                run.summary[key] = value
            run.finish(exit_code=0 if str(state) in ("COMPLETE", "PRUNED") else 1)
        except Exception as err:
            self._run = run
            self._fail("finish", err)
            self._run = None


def _table_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        try:
            return value.item()
        except Exception:
            pass
    return str(value)


def _wandb_log_tables(run_dir, search_name, tracking, tables) -> None:
    label = f"{search_name} summary"
    try:
        run = _init_run(run_dir, search_name, tracking, run_name="summary",
                        rid=run_id(search_name, "summary"), config=None, job_type="summary")
    except ImportError:
        raise
    except Exception as err:
        log.warning("W&B tables not logged for %s: init failed: %s: %s", label, type(err).__name__, err)
        return
    if run is None:
        return
    import wandb
    try:
        data = {}
        for name, rows in (tables or {}).items():
            rows = [dict(r) for r in rows or []]
            columns: List[str] = []
            for row in rows:
                columns.extend(k for k in row if k not in columns)
            data[name] = wandb.Table(columns=columns,
                                     data=[[_table_value(r.get(c)) for c in columns] for r in rows])
        if data:
            run.log(data)
        run.finish()
    except Exception as err:
        log.warning("W&B tables not logged for %s: %s: %s", label, type(err).__name__, err)
        try:
            run.finish(exit_code=1)
        except Exception:
            pass


# --------------------------------------------------------------------------- upload later

def offline_runs(run_dir: str) -> List[str]:
    """The W&B offline run directories a search wrote (one per trial, plus the summary run)."""
    import glob

    return sorted(glob.glob(os.path.join(os.path.abspath(run_dir), "wandb", "offline-run-*")))


def sync_command(run_dir: str, dry_run: bool = False, project: Optional[str] = None,
                 entity: Optional[str] = None) -> List[str]:
    """`wandb sync` over the search's offline runs. Online runs land under the spec's project and a group
    named after the search; `project`/`entity` override where they go."""
    import shutil
    import sys

    runs = offline_runs(run_dir)
    if not runs:
        raise FileNotFoundError(f"{run_dir} holds no W&B offline runs (wandb/offline-run-*); "
                                "was the search run with tracking.wandb: disabled?")
    executable = shutil.which("wandb", path=os.path.dirname(sys.executable)) or shutil.which("wandb")
    if executable is None:
        raise ImportError(f"the wandb command is not installed: {INSTALL_HINT}")
    command = [executable, "sync", "--no-include-online"]
    if dry_run:
        command.append("--dry-run")
    if project:
        command += ["--project", project]
    if entity:
        command += ["--entity", entity]
    return command + runs
