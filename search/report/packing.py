"""The report's Packing section: the K the worker groups packed, how it was chosen (the spec, or the cost
model with its prediction per K and the budget), and the packed steps measured beside the prediction."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

from search.report.blocks import Block, Section, Table

MIB = 2 ** 20


def _mib(value) -> Optional[float]:
    return None if value is None else round(value / MIB, 1)


def packing_section(packing: Optional[Mapping[str, Any]]) -> Optional[Section]:
    if not packing:
        return None   # a run directory from before packing.json
    from trainers.packing.cost_model import CostModel

    k = packing["k"]
    model = CostModel.from_dict(packing) if packing.get("chosen_by") == "cost model" else None
    blocks: List[Block] = []
    if model is None:
        blocks.append(f"Each worker group trained up to **K = {k}** trials at once on its one base, as the spec "
                      f"fixed it (`search.pack: {k}`)." if k > 1 else
                      "Each worker group trained one trial at a time (`search.pack: 1`): no packing.")
    else:
        member = packing["member"]
        blocks += [
            f"**K = {k}**, chosen by the cost model (`search.pack: auto`) from a {packing['probe_s']:.1f} s probe on "
            f"{packing['device']}: packed steps of the costliest settings in the space ({member['rows']} rows x "
            f"{member['seq']} tokens, {member['trainable_params']} trainable parameters a trial) at the pack sizes "
            f"below, fitted, and larger packs predicted. Memory budget {_mib(packing['budget_bytes']):g} MiB "
            f"({packing['budget_from']}), at most {packing['k_max']} a pack; one more was not taken because "
            f"{packing['reason']}.",
            Table(["K", "predicted peak MiB", "predicted step s", "predicted tokens/s", "gain"],
                  [{"K": row["k"], "predicted peak MiB": _mib(row["memory_bytes"]), "predicted step s": row["step_s"],
                    "predicted tokens/s": round(row["tokens_per_s"]),
                    "gain": "" if row["gain"] is None else f"{row['gain']:+.1%}"} for row in packing["predicted"]]),
            "The probe's measurements and the fitted model's values for them:",
            Table(["K", "rows", "peak MiB", "fitted peak MiB", "step s", "fitted step s"],
                  [{"K": p["k"], "rows": p["rows"], "peak MiB": _mib(p["peak_bytes"]),
                    "fitted peak MiB": _mib(p["predicted_bytes"]), "step s": p["step_s"],
                    "fitted step s": p["predicted_step_s"]} for p in packing["probe"]]),
        ]
    measured = packing.get("measured") or {}
    if measured:
        blocks.append(
            "Measured in the search's packed steps, per number of trials that trained together (all groups; tokens "
            "are token positions, padding included). On CPU a peak is the worker process' whole resident memory, "
            "which holds more than the probe's process did (Ray Train, the members' data and eval batches): "
            "compare differences between pack sizes there, not absolute values."
            + (" Predicted: for the measured mean width per trial (tokens/s) and the widest step (peak); the "
               "probe's rows are full width and its adapter the largest rank's, so real steps are usually lighter."
               if model else ""))
        rows = []
        for k_measured, figures in sorted(measured.items()):
            row = {"K": k_measured, "steps": figures["steps"],
                   "tokens/s": round(figures["positions"] / figures["seconds"]) if figures["seconds"] else None,
                   "peak MiB": _mib(figures["peak_bytes"])}
            if model:
                mean = _members(packing["member"], figures["positions"] / figures["steps"], k_measured)
                widest = _members(packing["member"], figures["max_positions"], k_measured)
                row.update({"predicted tokens/s": round(model.tokens_per_s(mean)),
                            "predicted peak MiB": _mib(model.memory_bytes(widest))})
            rows.append(row)
        columns = ["K", "steps", "tokens/s"] + (["predicted tokens/s"] if model else []) + ["peak MiB"] + \
            (["predicted peak MiB"] if model else [])
        blocks.append(Table(columns, rows))
    return Section("Packing", blocks)


def _members(member: Mapping[str, Any], positions: float, k: int):
    """k members like the probe's, sharing `positions` token positions of one step equally."""
    from trainers.packing.cost_model import MemberShape

    rows = member["rows"]
    return [MemberShape(rows, max(1, round(positions / k / rows)), member["trainable_params"],
                        member["optimizer"])] * k
