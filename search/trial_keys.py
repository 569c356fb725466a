"""Keys a trial's config and results carry between the Tune trial function, the worker groups and the searcher.

Here, not in search/searcher.py, so that the trial function's and the workers' processes need not import Optuna
to read them (1.5 s of CPU each, at a search's start)."""

TRIAL_NUMBER_KEY = "__optuna_trial_number"   # the Optuna trial number, in the config the searcher gives Tune
FAIL_REASON_KEY = "fail_reason"
ROUNDS_TOTAL_KEY = "rounds_total"
