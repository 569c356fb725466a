"""The run directory's record of packing: packing.json (the K a search packs, and how it was chosen) and
packing/<tune run>-group<N>.json (each packing group's measured steps per K), for the report and resume."""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Optional

PACKING_FILE = "packing.json"
MEASURED_DIR = "packing"


def record_measured(run_dir: str, name: str, group: int, meter) -> None:
    """A packing group's measured steps per K (trainers.packing.probe.StepMeter), for the report."""
    write_json(os.path.join(run_dir, MEASURED_DIR, f"{name}-group{group}.json"), meter.to_dict())


def read_packing(run_dir: str) -> Optional[Dict[str, Any]]:
    """packing.json with `measured`: per K, the steps of every group summed (peaks and widths: the largest).
    None for run directories from before packing.json."""
    decision = read_json(os.path.join(run_dir, PACKING_FILE))
    if decision is None:
        return None
    measured: Dict[int, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, MEASURED_DIR, "*.json"))):
        for k, entry in ((read_json(path) or {}).get("by_k") or {}).items():
            total = measured.setdefault(int(k), {"steps": 0, "seconds": 0.0, "positions": 0, "max_positions": 0,
                                                 "peak_bytes": None})
            for key in ("steps", "seconds", "positions"):
                total[key] += entry[key]
            total["max_positions"] = max(total["max_positions"], entry["max_positions"])
            if entry.get("peak_bytes") is not None:
                total["peak_bytes"] = max(total["peak_bytes"] or 0.0, entry["peak_bytes"])
    return {**decision, "measured": measured}


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):   # missing (a run from before packing.json, or no packed step yet), not JSON
        return None


def write_json(path: str, data: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    os.replace(path + ".tmp", path)   # a report built meanwhile reads the old file or the new, never half
