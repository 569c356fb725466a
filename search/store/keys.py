"""Keys a trial's config, results and stored attributes carry between the Tune trial function, the worker groups
and the searcher.

Here, not in search/run/searcher.py, so that the trial function's and the workers' processes need not import Optuna
to read them (Optuna's import is a large part of a process's start)."""

from trainers.settings import ANSWERS_KEY, BASE_PREFIX, GENERATE_SECONDS_KEY  # noqa: F401 (the trainer's, named here)

TRIAL_NUMBER_KEY = "__optuna_trial_number"   # the Optuna trial number, in the config the searcher gives Tune
FAIL_REASON_KEY = "fail_reason"
ROUNDS_TOTAL_KEY = "rounds_total"
DIAG_PREFIX = "diag_"               # per-trial diagnostics (trainers/diagnostics.py), stored as user attrs
STOPPED_EARLY_KEY = "stopped_early"  # the reason a trial stopped itself before its last round
REFINEMENTS_ATTR = "refinements"     # study user attr: the search's own changes to its space (search/refine/)
REFINEMENT_ATTR = "refinement"       # trial user attr: the index of the refinement it was sampled in

# What the cluster did to a trial, carried in its reports and stored on the Optuna trial (search/run/driver.py):
NODE_KEY = "node_id"              # in each report: the Ray node of the trial's rank 0
NODES_ATTR = "nodes"              # user attr: every node the trial's rank 0 ran on, in order
RETRIES_KEY = "retries"           # report and user attr: times the trial went on after losing its workers
# report and user attr of a FAIL trial: INFRASTRUCTURE when only the cluster failed it (a lost node or worker,
# with its retries used up; the lost trial pool). `peft-search resume` runs such a trial again (search/run/resume.py);
# one that failed on its own merits (divergence, out of memory, a bad setting) has no such attr and stays FAIL.
FAILED_ON_KEY = "failed_on"
INFRASTRUCTURE = "infrastructure"
INFRASTRUCTURE_RERUNS_ATTR = "infrastructure_reruns"   # user attr: times resume ran the trial again after one
