"""`peft-search validate SPEC.yaml`: load and check a spec, its data files and its model reference.

Launches nothing. The CLI prints each problem on stderr and exits 2 when there is any; warnings
(`warning: ...`, e.g. a few eval rows that also appear in train) go to stderr too and leave it at 0.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from search.spec.search_spec import SearchSpec, SpecError, load_spec


def validate_file(path: str, check_files: bool = True, check_model: bool = True,
                  embedded: bool = True) -> Tuple[Optional[SearchSpec], List[str]]:
    """(the spec, []) when `path` is valid, else (None, one line per problem naming its key path)."""
    spec, problems, _warnings = check_file(path, check_files=check_files, check_model=check_model, embedded=embedded)
    return spec, problems


def check_file(path: str, check_files: bool = True, check_model: bool = True,
               embedded: bool = True) -> Tuple[Optional[SearchSpec], List[str], List[str]]:
    """As `validate_file`, plus warnings that leave the spec valid (a few eval rows copied from train).

    `embedded`: the search runs on this machine's embedded Ray (no --address / RAY_ADDRESS), so the GPUs
    it asks for must be here; False for a cluster, whose nodes hold them. The machine and overlap checks
    run once the spec itself is valid (the overlap check reads the rows the trials would use)."""
    from search.spec.checks import embedded_gpu_problems, overlap_findings

    try:
        spec = load_spec(path, check_files=check_files, check_model=check_model)
    except SpecError as exc:
        return None, list(exc.problems), []
    problems = embedded_gpu_problems(spec.resources) if embedded else []
    warnings: List[str] = []
    if check_files:
        overlap, warnings = overlap_findings(spec.trial_settings({}).data)
        problems += overlap
    return (None if problems else spec), problems, warnings
