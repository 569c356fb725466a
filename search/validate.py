"""`peft-search validate SPEC.yaml`: load and check a spec, its data files and its model reference.

Launches nothing. The CLI prints each problem on stderr and exits 2 when there is any.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from search.spec import SearchSpec, SpecError, load_spec


def validate_file(path: str, check_files: bool = True, check_model: bool = True) -> Tuple[Optional[SearchSpec], List[str]]:
    """(the spec, []) when `path` is valid, else (None, one line per problem naming its key path)."""
    try:
        return load_spec(path, check_files=check_files, check_model=check_model), []
    except SpecError as exc:
        return None, list(exc.problems)
