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
    from search.spec.checks import (completion_findings, embedded_gpu_problems, generation_problems, inspect_reference,
                                    overlap_findings)
    from search.spec.guidance import guidance_findings

    try:
        spec = load_spec(path, check_files=check_files, check_model=check_model)
    except SpecError as exc:
        return None, list(exc.problems), []
    problems = embedded_gpu_problems(spec.resources) if embedded else []
    warnings: List[str] = []
    if check_files:
        overlap, warnings = overlap_findings(spec.trial_settings({}).data, spec.model.task)
        problems += overlap + generation_problems(spec)
        if check_model:   # prompt-completion / messages rows: rendered with the model's tokenizer
            unfit, notes = completion_findings(spec)
            problems += unfit
            warnings += notes
            if spec.objective.task_kind is not None:
                warnings += guidance_findings(spec, inspect_reference(spec.model.name_or_path, spec.model.task)[0])
    return (None if problems else spec), problems, warnings


# The preview shows at most this many characters of the row.
PREVIEW_CHARS = 3000


def data_preview(spec) -> List[str]:
    """Lines that show how train's first row is trained on, for prompt-completion and messages rows: the
    text the model reads (rendered with the chat template, cut to the smallest max_length) with the part the
    loss covers between ⟦ and ⟧. Empty for text rows (every token counts) and where the tokenizer is not here."""
    from search.spec.checks import chat_data, smallest_max_length
    from trainers.data import MESSAGES, chat_example, marked_text
    from trainers.records import DataError, read_records

    found = chat_data(spec)
    if found is None:
        return []
    data, fmt, tokenizer = found
    max_length, where = smallest_max_length(spec)
    rows = read_records(data.train, split="train")
    try:
        example, mask, fits = chat_example(rows[0], tokenizer, data, fmt, max_length=max_length)
    except DataError:
        return []   # validate has said what is wrong with it
    counted = sum(label != -100 for label in example["labels"][1:])   # the first token is predicted by nothing
    if fmt == MESSAGES or not isinstance(rows[0].get(data.prompt_field), str):
        template = "data.chat_template" if data.chat_template else "the tokenizer's chat template"
        how = f"rendered with {template}"
    else:
        how = "prompt and completion joined, EOS added"
    part = "the assistant turns" if fmt == MESSAGES else "the completion"
    loss = (f"the loss covers {part} only" if data.completion_only_loss
            else f"the loss covers every token (completion_only_loss: false; ⟦ ⟧ marks {part})")
    text = marked_text(tokenizer, example["input_ids"], mask)
    if len(text) > PREVIEW_CHARS:
        text = text[:PREVIEW_CHARS] + f" [... {len(text) - PREVIEW_CHARS} more characters]"
    cut = "" if fits else f"; its completion does not fit {where} {max_length} and is cut"
    lines = [f"data: {fmt} rows ({'data.format' if spec.data.format else 'from the first row'}), {how}; {loss}",
             f"{rows.where(0)} as trained ({len(example['input_ids'])} tokens, {counted} in the loss, "
             f"{part} between ⟦ and ⟧{cut}):"]
    lines += ["    " + line for line in text.split("\n")]
    return lines
