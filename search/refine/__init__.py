"""What the trials say about the settings, and the search acting on it: sensitivity (impact, interval, good
range), Optuna's importances, the refiner that narrows or fixes settings, and the sampler that keeps to it."""
from search.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "sensitivity_table": "sensitivity", "enough_for_sensitivity": "sensitivity", "importances": "importance",
    "Refiner": "refiner", "RefineSettings": "refiner", "RefinedSampler": "sampler",
})
