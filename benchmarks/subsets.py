"""The missing-modality table of ``benchmarks/run.py --subsets``: every non-empty subset of the modalities.

For each method and each of the 2^M - 1 subsets the test cases are predicted with the other modalities
absent (``entrust predict --drop-modalities``) and scored: Dice per label and ECE over foreground + boundary
(``ece_fg_boundary``, from the saved class probabilities; ``ece_fg_boundary_perror`` from ``total``) and the
mean ``total`` over the true lesion (it should rise when a modality that shows the lesion is missing). The
table has one row per subset plus their mean, one column group per method; numbers are mean ± std over seeds.
"""
from __future__ import annotations

#: method -> (trainer, plans, folds, K, absent channels zero-filled by a model trained without dropout)
SUBSET_METHODS = {
    "EnTrust + modality dropout (K=8)": ("nnUNetTrainerEnTrustModDrop_demo", "nnUNetEnTrustPlans", [0], 8, False),
    "nnU-Net, absent zero-filled": ("nnUNetTrainer_demo", "nnUNetPlans", [0], 1, True),
    "nnU-Net + modality dropout (zero-fill)": ("nnUNetTrainerModDrop_demo", "nnUNetPlans", [0], 1, False),
}
#: the smoke run's trainers for the same methods
SMOKE_SUBSET_TRAINERS = {"nnUNetTrainerEnTrustModDrop_demo": "nnUNetTrainerEnTrustModDrop_tinyCPU",
                         "nnUNetTrainer_demo": "nnUNetTrainer_tinyCPU",
                         "nnUNetTrainerModDrop_demo": "nnUNetTrainerModDrop_tinyCPU"}
#: the per-subset numbers kept (besides ``dice_<label>``)
SUBSET_KEYS = ("dice", "ece_fg_boundary", "ece_fg_boundary_perror", "total_on_lesion",
               "total_on_lesion_outside_conflict")
MEAN_ROW = "mean over subsets"


def modality_subsets(names: list[str]) -> list[tuple[str, str | None]]:
    """Every non-empty subset of ``names`` (2^M - 1), smallest first, as (label "T1+T2", the
    ``--drop-modalities`` value that leaves exactly it; None for the full set)."""
    m = len(names)
    codes = sorted(range(1, 2 ** m), key=lambda c: (bin(c).count("1"), [-(c >> i & 1) for i in range(m)]))
    out = []
    for code in codes:
        kept = [n for i, n in enumerate(names) if code >> i & 1]
        dropped = [n for i, n in enumerate(names) if not code >> i & 1]
        out.append(("+".join(kept), ",".join(dropped) or None))
    return out


def subset_methods(smoke: bool) -> dict:
    """SUBSET_METHODS, with the tiny trainers and K = 2 for the smoke run."""
    if not smoke:
        return dict(SUBSET_METHODS)
    return {m: (SMOKE_SUBSET_TRAINERS[t], p, f, min(k, 2), zf) for m, (t, p, f, k, zf) in SUBSET_METHODS.items()}


def subset_row(row: dict) -> dict:
    """The numbers the table keeps of one ``evaluate_row``: SUBSET_KEYS and every ``dice_<label>``."""
    return {k: v for k, v in row.items() if k in SUBSET_KEYS or k.startswith("dice_")}


def with_mean(per_subset: dict[str, dict]) -> dict[str, dict]:
    """``per_subset`` (subset -> key -> number) plus MEAN_ROW: each key's mean over the subsets that have it."""
    keys = sorted({k for row in per_subset.values() for k in row})
    mean = {}
    for key in keys:
        values = [row[key] for row in per_subset.values() if isinstance(row.get(key), (int, float))]
        mean[key] = sum(values) / len(values) if values else None
    return {**per_subset, MEAN_ROW: mean}


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """method -> subset -> key -> {"mean", "std", "values"} over the seeds' ``method -> subset -> key -> number``."""
    from entrust_nnunet.evaluation.seeds import mean_std

    out: dict = {}
    for record in per_seed:
        for method, rows in record.items():
            for subset, row in rows.items():
                for key, value in row.items():
                    cell = out.setdefault(method, {}).setdefault(subset, {}).setdefault(key, {"values": []})
                    cell["values"].append(value)
    for rows in out.values():
        for row in rows.values():
            for cell in row.values():
                cell["mean"], cell["std"] = mean_std(cell["values"])
    return out


def _cell(cell: dict | None, digits: int) -> str:
    """'mean ± std' over the seeds (no ± with one seed), 'n/a' without a number."""
    from entrust_nnunet.evaluation.seeds import format_mean_std

    return format_mean_std(*(cell.get("mean"), cell.get("std")) if cell else (None, None), digits)


def subsets_markdown(table: dict, labels: list[str]) -> str:
    """One table per method: rows = subsets then their mean; columns = Dice per label, mean Dice, ECE_fg."""
    lines = []
    for method, rows in table.items():
        cols = [f"dice_{label}" for label in labels] + ["dice", "ece_fg_boundary", "ece_fg_boundary_perror",
                                                        "total_on_lesion", "total_on_lesion_outside_conflict"]
        heads = [f"Dice {label}" for label in labels] + ["Dice (fg mean)", "ECE_fg class prob.", "ECE_fg P(error)",
                                                         "total on lesion", "total on lesion outside conflict"]
        lines += ["", f"**{method}**", "", "| modalities present | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        for subset, row in rows.items():
            name = f"**{subset}**" if subset == MEAN_ROW else subset
            lines.append(f"| {name} | " + " | ".join(_cell(row.get(c), 4 if "ece" in c or "total" in c else 3) for c in cols) + " |")
    return "\n".join(lines).strip() + "\n"
