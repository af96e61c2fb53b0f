"""Figures for sweeps: colour-colour diagram, score histogram, completeness, candidate grid.

Every function draws on a Matplotlib ``Axes`` (a new figure when none is given) and returns it
(or the figure, for grids), so notebooks show them inline and scripts save them. The numbers
behind the completeness plot come from :func:`binned_completeness`, a pure function.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.stats import binom_conf_interval
from astropy.table import Table

from lenscan.select import MAG_SENTINEL, ColourCut

__all__ = [
    "CONFIDENCE",
    "axis_label",
    "binned_completeness",
    "candidate_grid",
    "candidates_html",
    "colour",
    "colour_colour",
    "completeness",
    "format_score",
    "score_histogram",
]

#: Confidence level of the completeness error bars (one sigma).
CONFIDENCE = 0.6827


def format_score(score: Any) -> str:
    """A score with the digits that tell near-1 scores apart (two of ``1 - score``).

    >>> [format_score(s) for s in (0.8731, 0.99812, 0.999953, 1 - 3.2e-7, 1.0)]
    ['0.873', '0.9981', '0.999953', '1 - 3.2e-07', '1']
    """
    s = float(score)
    gap = 1.0 - s
    if not math.isfinite(s) or gap >= 0.01:
        return f"{s:.3f}"
    if gap <= 0:
        return "1"
    if gap < 1e-5:
        return f"1 - {gap:.1e}"
    return f"{s:.{math.ceil(-math.log10(gap)) + 1}f}"


def _axes(ax: Any = None, **subplot: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(**subplot)
    return ax


def colour(table: Any, name: str) -> np.ndarray:
    """The colour ``name`` (``"g-r"``) of each row; NaN where a magnitude is missing or a sentinel.

    Raises
    ------
    KeyError
        When a ``mag_<band>`` column is missing, naming it.
    """
    a, b = name.split("-")
    mags = []
    names = list(table.keys())  # Table and mapping alike
    for band in (a, b):
        col = f"mag_{band}"
        if col not in names:
            raise KeyError(f"colour {name!r} needs column {col!r}, which the table lacks")
        m = np.asarray(table[col], dtype=np.float64)
        mags.append(np.where(np.isfinite(m) & (m < MAG_SENTINEL), m, np.nan))
    return mags[0] - mags[1]


def colour_colour(
    catalogue: Any,
    cut: ColourCut | None = None,
    *,
    selected: np.ndarray | None = None,
    candidates: Any = None,
    x: str = "g-r",
    y: str = "g-i",
    ax: Any = None,
) -> Any:
    """Colour-colour diagram like Jacobs et al. (2019) Figure 2: g-i against g-r.

    Parameters
    ----------
    catalogue : Table or mapping of arrays
        All sources (``mag_<band>`` columns), drawn in grey.
    cut : ColourCut, optional
        Its box in these two colours is drawn (colours it does not limit extend to the axes).
    selected : bool array, optional
        Rows of ``catalogue`` that passed the cut, drawn in blue.
    candidates : Table, optional
        Candidates (``mag_<band>`` columns), drawn as red stars.
    x, y : str
        The colours on the axes.
    ax : matplotlib Axes, optional
    """
    ax = _axes(ax, figsize=(5.5, 5))
    cx, cy = colour(catalogue, x), colour(catalogue, y)
    ax.scatter(cx, cy, s=3, c="0.6", lw=0, label=f"all sources ({np.isfinite(cx + cy).sum()})")
    if selected is not None:
        sel = np.asarray(selected, dtype=bool)
        if sel.shape != cx.shape:
            raise ValueError(f"selected has shape {sel.shape}, the catalogue {cx.shape}")
        ax.scatter(cx[sel], cy[sel], s=5, c="tab:blue", lw=0, label=f"selected ({sel.sum()})")
    if candidates is not None and len(candidates):
        ax.scatter(
            colour(candidates, x), colour(candidates, y), s=40, marker="*", c="tab:red",
            label=f"candidates ({len(candidates)})",
        )  # fmt: skip
    if cut is not None:
        _draw_box(ax, cut, x, y)
    ax.set_xlabel(f"{x} (mag)")
    ax.set_ylabel(f"{y} (mag)")
    ax.legend(loc="upper left", fontsize="small", markerscale=2)
    return ax


def _draw_box(ax: Any, cut: ColourCut, x: str, y: str) -> None:
    from matplotlib.patches import Rectangle

    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    xr = cut.colour_ranges.get(x, (x0, x1))
    yr = cut.colour_ranges.get(y, (y0, y1))
    box = Rectangle(
        (xr[0], yr[0]), xr[1] - xr[0], yr[1] - yr[0], fill=False, ec="k", lw=1.5, ls="--",
        label=f"cut {cut.name}",
    )  # fmt: skip
    ax.add_patch(box)
    ax.set_xlim(min(x0, xr[0] - 0.2), max(x1, min(xr[1], x1 + 1)))
    ax.set_ylim(min(y0, yr[0] - 0.2), max(y1, min(yr[1], y1 + 1)))


def score_histogram(
    scores: Any,
    *,
    threshold: float | None = None,
    is_lens: np.ndarray | None = None,
    bins: int = 40,
    ax: Any = None,
) -> Any:
    """Histogram of CNN scores (log counts), split into lenses and others when ``is_lens`` given."""
    ax = _axes(ax, figsize=(6, 3.5))
    s = np.asarray(scores, dtype=np.float64)
    edges = np.linspace(0, 1, bins + 1)
    if is_lens is None:
        ax.hist(s, bins=edges, color="0.4", label=f"scored ({s.size})")
    else:
        lens = np.asarray(is_lens, dtype=bool)
        ax.hist(s[~lens], bins=edges, color="0.5", label=f"non-lenses ({(~lens).sum()})")
        ax.hist(s[lens], bins=edges, color="tab:red", alpha=0.7, label=f"lenses ({lens.sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("stamps")
    ax.legend(fontsize="small")
    return ax


def binned_completeness(values: Any, found: Any, bins: Sequence[float] | int = 6) -> Table:
    """Fraction found per bin of ``values`` with binomial (Wilson, one sigma) intervals.

    Values outside the bins (and NaN) are left out.

    Returns
    -------
    astropy.table.Table
        ``lo, hi, centre`` (bin edges and middle), ``n`` (injected), ``k`` (found),
        ``completeness``, ``err_lo``, ``err_hi`` (the interval's bounds); NaN for empty bins.
    """
    v = np.asarray(values, dtype=np.float64)
    f = np.asarray(found, dtype=bool)
    if v.shape != f.shape:
        raise ValueError(f"values {v.shape} and found {f.shape} must have the same shape")
    edges = np.histogram_bin_edges(v[np.isfinite(v)], bins=bins)
    # Values outside the bins are left out; the last bin includes its upper edge.
    idx = np.clip(np.digitize(v, edges) - 1, 0, len(edges) - 2)
    ok = np.isfinite(v) & (v >= edges[0]) & (v <= edges[-1])
    n = np.bincount(idx[ok], minlength=len(edges) - 1)
    k = np.bincount(idx[ok], weights=f[ok], minlength=len(edges) - 1).astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    lo_hi = np.full((2, n.size), np.nan)
    has = n > 0
    if has.any():
        lo_hi[:, has] = binom_conf_interval(
            k[has], n[has], confidence_level=CONFIDENCE, interval="wilson"
        )
    return Table(
        {
            "lo": edges[:-1], "hi": edges[1:], "centre": 0.5 * (edges[:-1] + edges[1:]),
            "n": n, "k": k, "completeness": frac, "err_lo": lo_hi[0], "err_hi": lo_hi[1],
        }
    )  # fmt: skip


def _unit_of(values: Any) -> str | None:
    """The unit of a column: its astropy unit, else lenscan's naming (``*_arcsec``, ``*mag_*``)."""
    unit = getattr(values, "unit", None)
    if unit is not None:
        return str(unit)
    name = str(getattr(values, "name", None) or "")
    if name.endswith("_arcsec"):
        return "arcsec"
    if name.startswith("mag_") or "_mag_" in name:
        return "mag"
    return None


def axis_label(label: str, values: Any = None) -> str:
    """``label`` (default: the column's name) with the unit of ``values`` unless it names one.

    >>> from astropy.table import Column
    >>> axis_label("source magnitude i", Column([22.1], name="source_mag_i"))
    'source magnitude i (mag)'
    >>> axis_label("", Column([1.2], name="theta_e_arcsec"))
    'theta_e_arcsec (arcsec)'
    >>> axis_label("Einstein radius (arcsec)", Column([1.2], name="theta_e_arcsec"))
    'Einstein radius (arcsec)'
    """
    label = label or str(getattr(values, "name", None) or "")
    unit = _unit_of(values)
    if unit and label and "(" not in label:
        label = f"{label} ({unit})"
    return label


def completeness(
    values: Any,
    found: Any,
    *,
    bins: Sequence[float] | int = 6,
    xlabel: str = "",
    label: str | None = None,
    model: str | None = None,
    threshold: float | None = None,
    ax: Any = None,
) -> Any:
    """Completeness against ``values`` (e.g. Einstein radius) with binomial error bars.

    Parameters
    ----------
    values : array or astropy Column
        The quantity on the x axis; a Column's unit (or a ``*_arcsec`` / ``*mag_*`` name) is
        added to ``xlabel`` when the label names none.
    found : bool array
        Whether each injected lens was recovered.
    bins : int or sequence of float
        Bins of ``values``.
    xlabel, label : str
        Axis label and legend entry.
    model, threshold : optional
        The model and score threshold that decided "found"; named in the title.
    ax : matplotlib Axes, optional
    """
    ax = _axes(ax, figsize=(5, 3.5))
    t = binned_completeness(values, found, bins)
    has = t["n"] > 0
    yerr = np.vstack([t["completeness"] - t["err_lo"], t["err_hi"] - t["completeness"]])
    ax.errorbar(
        t["centre"][has], t["completeness"][has], yerr=yerr[:, has],
        xerr=0.5 * (t["hi"] - t["lo"])[has], fmt="o", capsize=2, label=label,
    )  # fmt: skip
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(axis_label(xlabel, values))
    ax.set_ylabel("completeness")
    found_by = [f"model {model}" if model else "", _threshold_text(threshold)]
    if any(found_by):
        ax.set_title("found by " + ", ".join(t for t in found_by if t), fontsize="small")
    if label:
        ax.legend(fontsize="small")
    return ax


def _threshold_text(threshold: float | None) -> str:
    return "" if threshold is None else f"score >= {format_score(threshold)}"


def _stamps_rgb(candidates: Table, survey: Any, stamp_pix: int) -> list[np.ndarray]:
    """Colour composites (rows top-down) of the candidates, read tile by tile."""
    from lenscan.images import rgb_bands, rgb_composite
    from lenscan.survey import read_stamps

    bands = rgb_bands(survey.bands)
    out: list[np.ndarray] = [np.zeros((stamp_pix, stamp_pix, 3), np.uint8)] * len(candidates)
    tiles = np.asarray(candidates["tile"]).astype(str)
    for tile_id in dict.fromkeys(tiles.tolist()):
        rows = np.flatnonzero(tiles == tile_id)
        x = np.asarray(candidates["x"], dtype=np.float64)[rows]
        y = np.asarray(candidates["y"], dtype=np.float64)[rows]
        stamps, _ = read_stamps(survey.tile(tile_id), x, y, stamp_pix, bands=bands)
        for row, stamp in zip(rows.tolist(), stamps, strict=True):
            out[row] = np.ascontiguousarray(rgb_composite(stamp)[::-1])
    return out


def _open(candidates: Table, survey: Any) -> Any:
    if survey is not None:
        return survey
    from lenscan.survey import open_survey

    url = candidates.meta.get("survey_url")
    if not url:
        raise ValueError("give survey=...: the candidate table's meta names no survey_url")
    return open_survey(url)


def candidate_grid(
    candidates: Table, survey: Any = None, *, n: int = 16, ncols: int = 4, stamp_pix: int = 0
) -> Any:
    """A grid of the top ``n`` candidates' colour composites, titled with rank and score.

    Scores near 1 are written with the digits that tell them apart (:func:`format_score`).

    ``survey`` defaults to the one named in ``candidates.meta["survey_url"]``; ``stamp_pix`` to
    the model's stamp size recorded in the table (``meta["stamp_size_pix"]``), else 64.
    """
    import matplotlib.pyplot as plt

    top = candidates[:n]
    survey = _open(candidates, survey)
    size = stamp_pix or int(candidates.meta.get("stamp_size_pix", 64))
    rgbs = _stamps_rgb(top, survey, size)
    nrows = max(1, -(-len(top) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2 * ncols, 2.15 * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(top):
            ax.imshow(rgbs[k], interpolation="nearest")
            title = f"#{int(top['rank'][k])}  {format_score(top['score'][k])}"
            ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig


def candidates_html(candidates: Table, survey: Any = None, *, max_rows: int = 10) -> str:
    """An HTML table of the top ``max_rows`` candidates with inline colour thumbnails.

    Used by :meth:`lenscan.table.CandidateTable._repr_html_`. When the survey cannot be opened
    the thumbnails are left out and the page says why.
    """
    from lenscan.images import png_bytes

    top = candidates[:max_rows]
    note = ""
    thumbs: list[str] = [""] * len(top)
    try:
        survey = _open(candidates, survey)
        size = int(candidates.meta.get("stamp_size_pix", 64))
        need = ("tile", "x", "y")
        if all(c in top.colnames for c in need):
            for k, rgb in enumerate(_stamps_rgb(top, survey, size)):
                data = base64.b64encode(png_bytes(rgb)).decode()
                thumbs[k] = (
                    f'<img src="data:image/png;base64,{data}" width="{2 * size}" '
                    f'style="image-rendering: pixelated" alt="candidate">'
                )
    except (OSError, ValueError, KeyError) as exc:
        note = f"<p>(no thumbnails: {html.escape(str(exc))})</p>"
    shown = [c for c in top.colnames if not c.startswith(("score_m", "magerr_"))]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["stamp", *shown])
    rows = []
    for k in range(len(top)):
        cells = "".join(f"<td>{_cell(top[c][k])}</td>" for c in shown)
        rows.append(f"<tr><td>{thumbs[k]}</td>{cells}</tr>")
    return (
        f"<p>CandidateTable: {len(candidates)} candidates"
        + (f", the top {len(top)} shown" if len(top) < len(candidates) else "")
        + f"</p>{note}<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.5g}"
    return html.escape(str(value))
