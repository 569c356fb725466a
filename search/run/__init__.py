"""Running a search: the driver, the Tune trial function, the pool of persistent worker groups and their
loops, the protocol between them, the searcher and schedulers, progress lines, resume, W&B tracking, and
the choice of how many trials share a base model (packing)."""
from search.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "run_search": "driver", "tune_trial": "trial", "start_pool": "pool", "TrialPool": "pool",
    "PeftOptunaSearch": "searcher", "make_sampler": "searcher",
    "make_scheduler": "schedulers", "failure_reason": "protocol", "choose_pack": "packing",
})
