"""Read raw training records (a list of dicts) from .jsonl, .csv, .txt files or an HF dataset id.

Shared by `peft-search validate` (which checks rows and fields before anything starts) and the
trainer recipe (which tokenizes them).
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and what is wrong."""


def is_local_source(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES) or os.path.exists(source)


def read_records(source: str, split: str = "train") -> List[Dict[str, Any]]:
    """All rows of `source`. `.txt` gives one record per non-empty line under the key "text"."""
    if not is_local_source(source):
        return _read_hub_dataset(source, split)
    if os.path.isdir(source):
        raise DataError(f"{source}: is a directory, not a data file ({', '.join(LOCAL_SUFFIXES)})")
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    try:
        if source.endswith((".jsonl", ".json")):
            return _read_jsonl(source)
        if source.endswith(".csv"):
            return _read_csv(source)
        with open(source, encoding="utf-8") as handle:
            return [{"text": line.rstrip("\n")} for line in handle if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:   # unreadable (permissions, a device that fails): say so rather than crash
        raise DataError(f"{source}: cannot read ({exc.strerror or exc})") from exc


def _read_csv(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        try:
            return [dict(row) for row in reader]
        except csv.Error as exc:   # e.g. a field over csv's 128 KiB limit: a file that is not a table
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from exc


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_hub_dataset(dataset_id: str, split: str) -> List[Dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{dataset_id}: HF dataset ids need `pip install 'peft-search[hub-datasets]'`") from exc
    try:
        return [dict(row) for row in datasets.load_dataset(dataset_id, split=split)]
    except Exception as exc:  # hub errors come in many types; the reason is what matters to the user
        raise DataError(f"{dataset_id}: cannot load as an HF dataset ({type(exc).__name__}: {exc})") from exc
