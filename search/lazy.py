"""Package re-exports that import their module on first use: a wing's `__init__` names its public API
without importing Optuna, Ray or torch for a caller that needs one small module of it."""
from importlib import import_module
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, names: Dict[str, str]) -> Tuple[Callable[[str], object], List[str]]:
    """(__getattr__, __all__) for `package`, whose public `names` live in the given submodules."""
    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{names[name]}"), name)

    return __getattr__, sorted(names)
