"""What a token-classification (NER) spec needs, checked before anything starts: keys that fit the task, a PEFT
method PEFT can train it with, and the rows of its data files (trainers/token_data.py reads and checks them the
same way when a trial starts). Each function returns problems (`key.path: what is wrong, got X`)."""
from __future__ import annotations

from typing import List

from trainers.data import TOKEN_CLASSIFICATION, TOKENS

PER_TYPE_F1 = "eval_f1_"   # eval_f1_<TYPE>: the F1 of one entity type


def is_per_type_f1(task: str, name: str) -> bool:
    """A per-type F1 objective (eval_f1_PER), which only token-classification reports."""
    return task == TOKEN_CLASSIFICATION and name.startswith(PER_TYPE_F1) and len(name) > len(PER_TYPE_F1)


def token_key_problems(model, data, peft) -> List[str]:
    """Keys and methods that do not fit token-classification (None for a section with problems of its own)."""
    if model is None or model.task != TOKEN_CLASSIFICATION:
        return []
    from trainers.adapters import method_task_problem

    problems = []
    if data is not None and data.label_field:
        problems.append(f"data.label_field: token-classification reads one tag per word from data.tags_field "
                        f"({data.tags_field!r}); remove label_field, got {data.label_field!r}")
    if data is not None and data.format is not None:
        problems.append(f"data.format: token-classification rows are words and tags (data.tokens_field, "
                        f"data.tags_field); format is for causal-lm, got {data.format!r}")
    problem = method_task_problem(peft.method, model.task) if peft is not None else None
    if problem:
        problems.append(f"peft.method: {problem}")
    return problems


def token_data_problems(data) -> List[str]:
    """Files exist and have rows, every row is words with one BIO tag each (each bad row named by file, row and
    field), train holds an entity tag, and eval holds no tag train lacks."""
    from search.spec.checks import _MAX_SHOWN, local_rows
    from trainers.data import rows_problems
    from trainers.records import DataError
    from trainers.token_data import read_token_records, tag_mapping, unseen_tags

    problems: List[str] = []
    rows_by_key = {}
    for key, rows in local_rows(data, lambda source, key: read_token_records(source, data, split=key),
                                problems).items():
        shown, bad = rows_problems(rows, data, TOKENS, split=key, limit=_MAX_SHOWN)
        problems += [f"data.{key}: {problem}" for problem in shown]
        if bad > len(shown):
            problems.append(f"data.{key}: {bad} of {len(rows)} rows are bad (the first {len(shown)} above)")
        if not bad:
            rows_by_key[key] = rows
    train = rows_by_key.get("train")
    if train is None:
        return problems
    if data.eval is None and int(len(train) * data.eval_fraction) < 1:
        problems.append(f"data.eval_fraction: {data.eval_fraction} of {len(train)} rows leaves no eval row; "
                        f"give data.eval or more rows, got {data.eval_fraction}")
    try:
        tags = tag_mapping(train, data)
    except DataError as exc:
        return problems + [f"data.train: {exc}"]
    if "eval" in rows_by_key:
        unseen = unseen_tags(rows_by_key["eval"], tags, data)
        if unseen:
            problems.append(f"data.eval: {unseen}")
    return problems
