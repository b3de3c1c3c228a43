"""An HTML report of an evaluation: case figures, reliability diagram, risk-coverage curve, metrics tables.

``write_report`` builds ``out_dir`` atomically (:func:`entrust_nnunet.data.io.atomic_directory`) with

* ``case_<CASE>.png`` for a few cases (cases with true conflict first): each modality with the
  predicted mask outlined (one colour per label) and the true conflict outlined (dashed), the
  error mask, and the ``total`` and ``conflict`` maps as colour overlays; 3D images show the axial
  slice (numpy axis 0) that maximises (true conflict voxels / their slice maximum) + (reference, else
  mask, foreground voxels / their slice maximum);
* ``reliability.png`` and ``risk_coverage.png``, drawn from the pooled curves that
  :func:`entrust_nnunet.evaluation.evaluate.evaluate_folder` computed with :func:`metrics.reliability_curve` and
  :func:`metrics.risk_coverage_curve` (so the probabilities source is the evaluation's);
* ``index.html`` with the figures and the metric tables, and ``summary.json``.

Every number shown comes from the summary or the maps. Matplotlib is used through its object API
with the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from entrust_nnunet.evaluation.evaluate import load_dataset_json, map_file
from entrust_nnunet.evaluation.summary import headline, load_summary, to_json
from entrust_nnunet.data.io import HYPOTHESIS_FOLDER, MAP_NAMES, InputError, atomic_directory, numbered_files, read_image

LABEL_COLOURS = ("#ffd700", "#00e676", "#ff5252", "#40c4ff", "#e040fb", "#ff9100", "#b2ff59", "#ffffff")
CONFLICT_COLOUR = "#00ffff"
#: hypotheses drawn beside the mask (from PRED/hypotheses/, when entrust predict --save-hypotheses wrote them)
NUM_HYPOTHESES_DRAWN = 3
UNCERTAINTY_ROWS = (
    ("ece", "ECE"), ("ece_fg_boundary", "ECE (foreground + boundary)"), ("brier", "Brier score"),
    ("nll", "NLL (nats)"), ("error_rate", "error rate"), ("error_auroc", "error AUROC of total"),
    ("aurc", "AURC of total"), ("conflict_auroc_total", "conflict AUROC of total"),
    ("conflict_auroc_conflict", "conflict AUROC of conflict map"), ("entanglement", "AU/EU entanglement (Spearman)"),
    *((f"{m}_{w}_conflict", f"mean {m} {w} conflict") for m in MAP_NAMES for w in ("in", "outside")),
)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c) if i else html.escape(str(c))}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _label_names(dataset_json: dict) -> dict[str, str]:
    """summary key (``str(label)`` or ``str(tuple)``) -> label name from dataset.json."""
    names = {}
    for name, value in dataset_json.get("labels", {}).items():
        key = str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
        names.setdefault(key, name)
    return names


def _array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = read_image(path)
    return sitk.GetArrayFromImage(image), tuple(image.GetSpacing())


def _slice(arr: np.ndarray, z: int | None) -> np.ndarray:
    return arr if arr.ndim == 2 else arr[z]


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _case_figure(path: Path, case: str, entry: dict, pred: np.ndarray, spacing, images: list[tuple[str, np.ndarray]],
                 maps: dict[str, np.ndarray], gt: np.ndarray | None, conflict: np.ndarray | None,
                 label_values: list[int], label_names: dict[str, str],
                 hypotheses: list[np.ndarray] = ()) -> None:
    """One row of panels for one case (all arrays 2-D slices); ``hypotheses`` are drawn as outlines."""
    unc = entry.get("uncertainty") or {}
    seg = entry.get("metrics") or {}
    aspect = spacing[0] / spacing[1]  # (row, column) spacing in numpy order: pixel height / width
    background = images[0][1] if images else None
    panels = [(name, img, None) for name, img in images]
    if gt is not None:
        dice = ", ".join(f"{label_names.get(k, k)} {_fmt(v.get('Dice'))}" for k, v in seg.items())
        panels.append((f"errors (mask != reference)\nDice {dice}", background, ("error", (pred != gt).astype(float))))
    for name, cmap, what in (("total", "inferno", f"error AUROC {_fmt(unc.get('error_auroc'))}"),
                             ("conflict", "viridis", f"conflict AUROC {_fmt(unc.get('conflict_auroc_conflict'))}")):
        title = f"{name} map\n{what}" if name in maps else f"{name} map: missing"
        panels.append((title, background, (cmap, maps.get(name))))
    panels += [(f"hypothesis {k}", background, ("labels", h)) for k, h in enumerate(hypotheses)]
    if not images and gt is None:
        panels.insert(0, ("mask", None, None))

    fig = Figure(figsize=(3.1 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, img, overlay) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if img is not None:
            lo, hi = _window(img)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        else:
            ax.imshow(np.zeros_like(pred, dtype=float), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        outlined = overlay[1] if overlay is not None and overlay[0] == "labels" else pred
        if overlay is not None and overlay[1] is not None and overlay[0] != "labels":
            cmap, values = overlay
            if cmap == "error":
                cmap = ListedColormap(["#ff1744"])
                values = np.ma.masked_where(values == 0, values)
                ax.imshow(values, cmap=cmap, alpha=0.7, aspect=aspect, interpolation="nearest")
            else:
                im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.65, aspect=aspect,
                               interpolation="nearest")
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        for j, value in enumerate(label_values):
            if (outlined == value).any():
                ax.contour(outlined == value, levels=[0.5], colors=[LABEL_COLOURS[j % len(LABEL_COLOURS)]],
                           linewidths=1.0)
        if conflict is not None and conflict.any():
            ax.contour(conflict, levels=[0.5], colors=[CONFLICT_COLOUR], linewidths=1.2, linestyles="dashed")
        ax.set_title(title if i else f"{case}: {title}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    legend = "outlines: " + ", ".join(f"{label_names.get(str(v), v)} (mask)" for v in label_values)
    if conflict is not None:
        legend += "; dashed cyan: true conflict"
    fig.text(0.01, 0.01, legend, fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path)


def _reliability_figure(path: Path, pooled: dict) -> None:
    rel = pooled["reliability"]
    edges = np.asarray(rel["bin_edges"], dtype=float)
    conf = np.array([np.nan if v is None else v for v in rel["confidence"]], dtype=float)
    acc = np.array([np.nan if v is None else v for v in rel["accuracy"]], dtype=float)
    count = np.asarray(rel["count"], dtype=float)
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = Figure(figsize=(5, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    filled = count > 0
    ax.bar(centres[filled], acc[filled], width=width[filled], edgecolor="black", color="#4a90d9",
           label=f"pooled ({pooled.get('ece_source', '?')}), ECE = {_fmt(pooled.get('ece'))}")
    ax.bar(centres[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled], color="#ff5252",
           alpha=0.35, edgecolor="#ff5252", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability diagram (all voxels, all cases)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax2.bar(centres, np.maximum(count, 0), width=width, color="gray", edgecolor="black")
    if count.max() > 0:
        ax2.set_yscale("log")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("voxels")
    fig.tight_layout()
    fig.savefig(path)


def _risk_figure(path: Path, pooled: dict) -> None:
    rc = pooled["risk_coverage"]
    coverage, risk = np.asarray(rc["coverage"], float), np.asarray(rc["risk"], float)
    fig = Figure(figsize=(5, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(coverage, risk, color="#d62728", linewidth=1.5, label=f"total (AURC = {_fmt(pooled.get('aurc'))})")
    if risk.size:
        ax.axhline(risk[-1], color="gray", linestyle="--", linewidth=1,
                   label=f"error rate at full coverage = {_fmt(float(risk[-1]))}")
    ax.set_xlabel("coverage (fraction of most certain voxels kept)")
    ax.set_ylabel("risk (error rate among kept voxels)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title("risk-coverage (all voxels, all cases)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)


def _case_name(entry: dict, ending: str) -> str:
    name = Path(entry["prediction_file"]).name
    return name[: -len(ending)] if name.endswith(ending) else name


def _dataset_labels(dj: dict) -> tuple[list[int], list[str]]:
    """Foreground label values (regions' members included) and the channel names, from dataset.json."""
    label_values = sorted({int(v) for v in dj["labels"].values() if not isinstance(v, (list, tuple)) and int(v) != 0}
                          | {int(x) for v in dj["labels"].values() if isinstance(v, (list, tuple)) for x in v if x})
    channels = [str(n) for _, n in sorted((dj.get("channel_names") or dj.get("modality") or {}).items(),
                                          key=lambda kv: int(kv[0]))]
    return label_values, channels


def _cases_to_draw(entries: list[dict], conflict_dir: Path | None, ending: str, num_cases: int) -> list[int]:
    """Indices of the cases that get a figure: cases containing conflict first, then in order."""
    def conflict_fraction(entry) -> float:
        v = (entry.get("uncertainty") or {}).get("conflict_fraction")
        if v is None and conflict_dir is not None:
            f = conflict_dir / (_case_name(entry, ending) + ending)
            if f.is_file():
                v = float((_array(f)[0] > 0).mean())
        return v or 0.0

    return sorted(range(len(entries)), key=lambda i: (conflict_fraction(entries[i]) <= 0, i))[:max(num_cases, 0)]


def _best_slice(pred: np.ndarray, gt, conflict) -> int | None:
    """In 3D, the axial slice showing most conflict and foreground (each normalised); None in 2D."""
    if pred.ndim != 3:
        return None
    score = np.zeros(pred.shape[0])
    for a in (conflict, gt if gt is not None else pred):
        if a is not None:
            per_slice = (a > 0).reshape(a.shape[0], -1).sum(1)
            score += per_slice / max(per_slice.max(), 1)
    return int(np.argmax(score))


def _draw_case(path: Path, entry: dict, case: str, ctx: dict) -> None:
    """The figure of one case: modalities, mask outline, total and conflict maps, true conflict."""
    pred_dir, ending = ctx["pred_dir"], ctx["ending"]
    pred, spacing = _array(pred_dir / (case + ending))
    ref = Path(entry["reference_file"])
    gt_file = ctx["gt_dir"] / ref.name if ctx["gt_dir"] is not None else ref
    gt = _array(gt_file)[0] if gt_file.is_file() else None
    conflict = _array(ctx["conflict_dir"] / (case + ending))[0] > 0 if ctx["conflict_dir"] is not None else None
    maps = {name: _array(f)[0].astype(float) for name in ("total", "conflict")
            if (f := map_file(pred_dir, case, name, ending)) is not None}
    images = []
    if ctx["images_dir"] is not None:
        for c, cname in enumerate(ctx["channels"] or ["image"]):
            images.append((cname, _array(ctx["images_dir"] / f"{case}_{c:04d}{ending}")[0].astype(float)))
    hypotheses = [_array(f)[0] for f in
                  numbered_files(pred_dir / HYPOTHESIS_FOLDER, case, "h", ending)[:ctx["num_hypotheses"]]]
    z = _best_slice(pred, gt, conflict)
    sp2 = tuple(reversed(spacing))[-2:]  # numpy order, in-plane
    _case_figure(path, case if z is None else f"{case} (slice {z})", entry, _slice(pred, z), sp2,
                 [(n, _slice(a, z)) for n, a in images], {k: _slice(v, z) for k, v in maps.items()},
                 None if gt is None else _slice(gt, z), None if conflict is None else _slice(conflict, z),
                 ctx["label_values"], ctx["label_names"], [_slice(h, z) for h in hypotheses])


def _draw_curves(folder: Path, pooled: dict) -> list[str]:
    curves = []
    if isinstance(pooled.get("reliability"), dict):
        _reliability_figure(folder / "reliability.png", pooled)
        curves.append("reliability.png")
    if isinstance(pooled.get("risk_coverage"), dict):
        _risk_figure(folder / "risk_coverage.png", pooled)
        curves.append("risk_coverage.png")
    return curves


#: what a report folder holds (index.html, summary.json and figures): only such a folder is replaced
REPORT_SUFFIXES = {".html", ".json", ".png"}


def check_report_folder(out_dir: Path, inputs) -> None:
    """Refuse, with one line, a report folder that is or holds one of ``inputs`` (replacing it would delete them)
    or that exists and is neither empty nor an earlier report (``index.html`` beside figures and JSON only)."""
    out = out_dir.resolve()
    for folder in inputs:
        if folder is not None and (Path(folder).resolve() == out or out in Path(folder).resolve().parents):
            raise InputError(f"{out_dir}: the report folder would replace {folder}, an input of the report; "
                             f"choose another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another report folder")
    entries = list(out.iterdir())
    if entries and not ((out / "index.html").is_file()
                        and all(e.is_file() and e.suffix in REPORT_SUFFIXES for e in entries)):
        raise InputError(f"{out_dir}: exists and is not an earlier report (it holds other files); choose another "
                         f"folder or remove it")


def write_report(pred_dir, summary, out_dir, images_dir=None, gt_dir=None, conflict_dir=None,
                 num_cases: int = 3) -> Path:
    """Write ``out_dir/index.html`` plus PNGs for the evaluation ``summary`` of ``pred_dir``.

    Args:
        pred_dir: the prediction folder that was evaluated (masks + ``uncertainty/``).
        summary: the summary dict of :func:`evaluate_folder` or the path of its JSON file.
        out_dir: report folder, replaced atomically if it is an earlier report (or empty); any other existing
            folder, and one that is or holds an input folder, is refused (:func:`check_report_folder`).
        images_dir: optional images ``CASE_XXXX<ending>`` to draw under the masks (else a blank canvas).
        gt_dir: reference labels (default: the summary's); needed for the error panel.
        conflict_dir: true conflict masks (default: the summary's, if it had one).
        num_cases: how many cases get a figure (cases containing conflict first).
    """
    pred_dir = Path(pred_dir).absolute()
    summary = load_summary(summary) if not isinstance(summary, dict) else to_json(summary)
    if not isinstance(summary.get("metric_per_case"), list):
        raise InputError("summary: not an evaluation summary (no metric_per_case list)")
    settings = summary.get("entrust") or {}
    gt_dir = Path(gt_dir) if gt_dir is not None else (Path(settings["gt_dir"]) if settings.get("gt_dir") else None)
    conflict_dir = conflict_dir if conflict_dir is not None else settings.get("conflict_dir")
    images_dir = None if images_dir is None else Path(images_dir)
    if images_dir is not None and not images_dir.is_dir():
        raise InputError(f"{images_dir}: images folder does not exist")
    dj_file = settings.get("dataset_json")
    _, dj = load_dataset_json(pred_dir, gt_dir, dj_file if dj_file and Path(dj_file).is_file() else None)
    label_values, channels = _dataset_labels(dj)
    ctx = {"pred_dir": pred_dir, "ending": dj["file_ending"], "gt_dir": gt_dir, "images_dir": images_dir,
           "conflict_dir": None if conflict_dir is None else Path(conflict_dir), "channels": channels,
           "label_values": label_values, "label_names": _label_names(dj), "num_hypotheses": NUM_HYPOTHESES_DRAWN}
    entries = summary["metric_per_case"]
    check_report_folder(Path(out_dir), [pred_dir, gt_dir, images_dir, ctx["conflict_dir"]])
    with atomic_directory(out_dir, overwrite=True) as tmp:
        figures = []
        for i in _cases_to_draw(entries, ctx["conflict_dir"], ctx["ending"], num_cases):
            case = _case_name(entries[i], ctx["ending"])
            _draw_case(tmp / f"case_{case}.png", entries[i], case, ctx)
            figures.append((case, f"case_{case}.png"))
        curves = _draw_curves(tmp, summary.get("uncertainty_pooled") or {})
        with open(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=4, sort_keys=True, allow_nan=False)
        (tmp / "index.html").write_text(_html(summary, figures, curves, ctx["label_names"], pred_dir), encoding="utf-8")
    return Path(out_dir).absolute()


def _postprocessing_html(summary: dict) -> list[str]:
    """Where ``entrust postprocess`` removed regions that the conflict map marks (nnU-Net's post-processing
    removes small components, which is where the modalities often disagree)."""
    pp = summary.get("postprocessing")
    if not pp:
        return []
    rows = [[Path(e["prediction_file"]).name, r.get("removed_regions"), r.get("removed_voxels"),
             r.get("removed_conflict_regions"), r.get("removed_conflict_voxels")]
            for e in summary["metric_per_case"] if (r := e.get("postprocessing")) and r.get("removed_voxels")]
    marked = pp.get("cases_with_removed_conflict") or []
    note = (f"Post-processing ({', '.join(pp.get('postprocessing_fns') or []) or 'none'}) removed "
            f"{pp.get('removed_conflict_voxels')} voxels in {len(marked)} case(s) where the conflict map marks "
            f"conflict (&gt; {pp.get('conflict_mark')}): the modalities disagree there, so what was removed may be "
            "real; the P(error) map there is the probability that removing it was wrong.") if marked else \
        "Post-processing removed no region that the conflict map marks."
    return ["<h2>Post-processing</h2>", f"<p>{note}</p>",
            _table(["case", "removed regions", "removed voxels", "conflict-marked regions", "conflict-marked voxels"],
                   rows) if rows else ""]


def _html(summary: dict, figures, curves, label_names, pred_dir: Path) -> str:

    mean, fg = summary.get("mean") or {}, summary.get("foreground_mean") or {}
    umean, pooled = summary.get("uncertainty_mean") or {}, summary.get("uncertainty_pooled") or {}
    settings = summary.get("entrust") or {}
    entries = summary["metric_per_case"]
    keys = list(mean)

    head = headline(summary)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>EnTrust evaluation report</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1400px} table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right} th{background:#eee}"
        "td:first-child{text-align:left} img{max-width:100%;border:1px solid #ddd;margin:4px}"
        ".note{color:#555;font-size:90%}</style></head><body>",
        "<h1>EnTrust evaluation report</h1>",
        f"<p class='note'>predictions: {html.escape(str(pred_dir))}<br>reference: "
        f"{html.escape(str(settings.get('gt_dir', 'n/a')))}<br>conflict masks: "
        f"{html.escape(str(settings.get('conflict_dir') or 'none'))}<br>cases: {len(entries)}; calibration source: "
        f"{_fmt(pooled.get('ece_source', umean.get('ece_source')))}</p>",
        "<h2>Headline</h2>",
        _table(["metric", "value"], [["Dice (foreground mean)", head["dice"]], ["ECE (pooled)", head["ece"]],
                                     ["error AUROC of total (pooled)", head["error_auroc"]],
                                     ["conflict AUROC of total (pooled)", head["conflict_auroc_total"]],
                                     ["conflict AUROC of conflict map (pooled)", head["conflict_auroc_conflict"]]]),
        "<h2>Segmentation (mean over cases)</h2>",
        _table(["label / region", "Dice", "HD95 (mm)"],
               [[f"{label_names.get(k, k)} ({k})", mean[k].get("Dice"), mean[k].get("HD95")] for k in keys]
               + [["foreground mean", fg.get("Dice"), fg.get("HD95")]]),
        "<h2>Uncertainty</h2>",
    ]
    rows = [[label, umean.get(k), pooled.get(k)] for k, label in UNCERTAINTY_ROWS if k in umean or k in pooled]
    if rows:
        parts.append(_table(["metric", "mean over cases", "pooled over voxels"], rows))
        parts.append(f"<p class='note'>pooled AUROC/AURC over {_fmt(pooled.get('num_sampled_voxels'))} of "
                     f"{_fmt(pooled.get('num_voxels'))} voxels; per-case AUROCs are undefined (n/a) for cases without "
                     "conflict or without errors.</p>")
    else:
        parts.append(f"<p>{html.escape(str(umean.get('note', pooled.get('note', 'no uncertainty maps'))))}</p>")
    parts += _postprocessing_html(summary)
    if curves:
        parts.append("<h2>Calibration and selective prediction</h2><p>"
                     + "".join(f"<img src='{c}' alt='{c}'>" for c in curves) + "</p>")
    if figures:
        parts.append("<h2>Cases</h2>")
        for case, name in figures:
            parts.append(f"<h3>{html.escape(case)}</h3><img src='{html.escape(name)}' alt='{html.escape(case)}'>")
    per_case_cols = [("ece", "ECE"), ("error_auroc", "error AUROC"), ("conflict_auroc_total", "conflict AUROC total"),
                     ("conflict_auroc_conflict", "conflict AUROC conflict")]
    parts.append("<h2>Per case</h2>")
    parts.append(_table(["case"] + [f"Dice {label_names.get(k, k)}" for k in keys] + [c for _, c in per_case_cols],
                        [[Path(e["prediction_file"]).name] + [(e["metrics"].get(k) or {}).get("Dice") for k in keys]
                         + [(e.get("uncertainty") or {}).get(k) for k, _ in per_case_cols] for e in entries]))
    parts.append("</body></html>")
    return "\n".join(parts)
