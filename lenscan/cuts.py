"""How many lenses a colour cut keeps, and how many non-lens galaxies it lets through.

:func:`evaluate_cut` measures a preselection (a :mod:`lenscan.select` colour cut) on synthetic
surveys made by :func:`lenscan.simulate.make_survey`: the injected lenses' catalogue magnitudes
include the light of their lensed arcs within 1" of the lens (a deblending photometer's view),
which makes a lens bluer than its lens galaxy, so a box drawn around red galaxies loses lenses.
It reports the cut's completeness on the lenses, overall, for bright lenses (theta_E >= 1.2"
and source S/N >= 20) and binned by Einstein radius and source magnitude, next to the fraction
of the surveys' non-lens galaxies it selects, and that fraction relative to a reference cut
(``des-jacobs19`` by default). ``lenscan evaluate --cut NAME`` prints it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lenscan.metrics import completeness, completeness_table
from lenscan.select import ColourCut, colour_cut_mask, get_colour_cut

__all__ = [
    "CALIBRATION_SEEDS",
    "CHECK_SEEDS",
    "CutEvaluation",
    "build_cut_surveys",
    "cut_samples",
    "cut_tile_size_pix",
    "evaluate_cut",
]

#: Seeds of the surveys used to choose a cut (never quote figures from them alone).
CALIBRATION_SEEDS = (501, 502, 503)
#: Seeds of the surveys figures are quoted from.
CHECK_SEEDS = (601, 602, 603)
THETA_E_BINS = (0.8, 1.2, 1.6, 2.0, 2.5, 3.0)
SOURCE_MAG_BINS = (21.0, 22.0, 23.0, 24.0, 24.5)


@dataclass
class CutEvaluation:
    """Completeness of a colour cut on simulated lenses and its selected fraction of galaxies."""

    cut: str
    reference: str
    seeds: list[int]
    n_lenses: int
    completeness: float
    n_bright: int
    completeness_bright: float
    completeness_vs_theta_e: list[dict[str, Any]]
    completeness_vs_source_mag: list[dict[str, Any]]
    n_galaxies: int
    selected_fraction: float
    reference_selected_fraction: float
    reference_completeness_bright: float
    n_confusers: int = 0
    confuser_selected_fraction: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def selected_ratio(self) -> float:
        """Selected fraction of non-lens galaxies relative to the reference cut's."""
        return self.selected_fraction / self.reference_selected_fraction

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON)."""
        return asdict(self) | {"selected_ratio": self.selected_ratio}

    def format(self) -> str:
        """Human-readable report."""
        lines = [
            f"colour cut {self.cut!r} on {self.n_lenses} simulated lenses (arc light in the "
            f"catalogue magnitudes) and {self.n_galaxies} non-lens galaxies, survey seeds "
            f"{self.seeds}",
            f'completeness: all lenses {self.completeness:.3f}; theta_E >= 1.2" and source '
            f"S/N >= 20: {self.completeness_bright:.3f} of {self.n_bright} "
            f"({self.reference}: {self.reference_completeness_bright:.3f})",
            f"non-lens galaxies selected: {self.selected_fraction:.4f} "
            f"({self.reference}: {self.reference_selected_fraction:.4f}; ratio "
            f"{self.selected_ratio:.2f})",
        ]
        if self.n_confusers:
            lines.append(
                f"confusers selected: {self.confuser_selected_fraction:.3f} of {self.n_confusers}"
            )
        for title, rows in (
            ('Einstein radius (")', self.completeness_vs_theta_e),
            ("unlensed source i (mag)", self.completeness_vs_source_mag),
        ):
            lines.append(f"completeness vs {title}:")
            for r in rows:
                c = "   -" if r["completeness"] is None else f"{r['completeness']:.3f}"
                lines.append(f"  [{r['lo']:5.2f}, {r['hi']:5.2f})  n={r['n']:5d}  {c}")
        return "\n".join(lines)


def cut_samples(
    survey_urls: Sequence[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Catalogue rows of the lenses, non-lens galaxies and confusers of synthetic surveys.

    Each object counts once (its first tile). Non-lens galaxies are catalogue rows with
    ``extended_class >= 2`` that are neither injected lenses, their companions nor confusers.

    Returns
    -------
    dict
        ``lenses`` (truth columns incl. ``mag_g/r/i``, ``theta_e_arcsec``, ``source_snr``,
        ``source_mag_i``), ``galaxies`` and ``confusers`` (catalogue columns).
    """
    from lenscan.simulate.survey import injected_ids, read_confusers, read_truth
    from lenscan.survey import open_survey

    lenses, galaxies, confusers = [], [], []
    for url in survey_urls:
        truth = read_truth(url, storage_options=storage_options)
        try:
            conf = read_confusers(url, storage_options=storage_options)
        except FileNotFoundError:
            conf = {"id": np.zeros(0, np.int64), "companion_id": np.zeros(0, np.int64)}
        # injected lenses are catalogued as extended, unflagged galaxies (make_survey)
        n = len(truth["id"])
        truth.setdefault("extended_class", np.full(n, 3, np.int16))
        truth.setdefault("flags", np.zeros(n, np.int32))
        lenses.append(truth)
        skip = np.concatenate([injected_ids(truth), conf["id"], conf["companion_id"]])
        store = open_survey(url, storage_options=storage_options)
        seen: set[int] = set()
        for tile_id in store.tile_ids:
            cat = store.tile(tile_id).catalog()
            new = ~np.isin(cat["id"], np.fromiter(seen, np.int64, len(seen)))
            seen.update(cat["id"][new].tolist())
            gal = new & (cat["extended_class"] >= 2) & ~np.isin(cat["id"], skip)
            galaxies.append({k: v[gal] for k, v in cat.items()})
            con = new & np.isin(cat["id"], conf["id"])
            confusers.append({k: v[con] for k, v in cat.items()})
    return {
        "lenses": _stack(lenses),
        "galaxies": _stack(galaxies),
        "confusers": _stack(confusers),
    }


def _stack(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p.get("id", ()))]
    if not parts:
        return {}
    cols = [c for c in parts[0] if all(c in p for p in parts)]
    return {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in cols}


def evaluate_cut(
    cut: str | ColourCut | Mapping[str, Any],
    *,
    survey_urls: Sequence[str] | None = None,
    seeds: Sequence[int] = CHECK_SEEDS,
    n_tiles: int = 4,
    tile_size_pix: int | None = None,
    lenses_per_tile: int = 100,
    reference: str | ColourCut = "des-jacobs19",
    workdir: str | None = None,
    samples: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    preset: str = "des",
) -> CutEvaluation:
    """Completeness of a colour cut on simulated lenses next to its selected galaxy fraction.

    Parameters
    ----------
    cut : str, ColourCut or mapping
        The cut (a preset name such as ``"des-jacobs19"``).
    survey_urls : sequence of str, optional
        Synthetic surveys (``make_survey`` stores, with ``truth.parquet``) to measure on. By
        default one survey per seed in ``seeds`` is built (``n_tiles`` tiles of
        ``tile_size_pix``, ``lenses_per_tile`` lenses each) in ``workdir`` (or a temporary
        directory); surveys already there are reused (``tile_size_pix`` None: 6.7' tiles).
    seeds : sequence of int
        Seeds of those surveys (default :data:`CHECK_SEEDS`; choose cuts on
        :data:`CALIBRATION_SEEDS`).
    reference : str or ColourCut
        Cut whose selected fraction the result is compared with.
    samples : mapping, optional
        Output of :func:`cut_samples` (to compare several cuts on the same objects).
    preset : str
        Simulator survey preset of the surveys built here (``"des"``, ``"lsst"``, ``"hsc"``).

    Returns
    -------
    CutEvaluation
    """
    the_cut = get_colour_cut(cut)
    ref = get_colour_cut(reference)
    tmp = None
    if samples is None:
        if survey_urls is None:
            if workdir is None:
                tmp = tempfile.TemporaryDirectory(prefix="lenscan-cut-")
                workdir = tmp.name
            survey_urls = build_cut_surveys(
                workdir, seeds, n_tiles=n_tiles, tile_size_pix=tile_size_pix,
                lenses_per_tile=lenses_per_tile, preset=preset,
            )  # fmt: skip
        else:
            seeds = []
        samples = cut_samples(survey_urls)
    if tmp is not None:
        tmp.cleanup()
    lenses, gals, conf = samples["lenses"], samples["galaxies"], samples.get("confusers", {})
    if not lenses or not gals:
        raise ValueError("evaluate_cut needs surveys with injected lenses and galaxies")
    sel = colour_cut_mask(lenses, the_cut)
    bright = (lenses["theta_e_arcsec"] >= 1.2) & (lenses["source_snr"] >= 20)
    src = lenses["source_mag_i"] if "source_mag_i" in lenses else np.full(len(sel), np.nan)
    return CutEvaluation(
        cut=the_cut.name,
        reference=ref.name,
        seeds=[int(s) for s in seeds],
        n_lenses=int(sel.size),
        completeness=completeness(sel),
        n_bright=int(bright.sum()),
        completeness_bright=completeness(sel[bright]),
        completeness_vs_theta_e=completeness_table(lenses["theta_e_arcsec"], sel, THETA_E_BINS),
        completeness_vs_source_mag=completeness_table(src, sel, SOURCE_MAG_BINS),
        n_galaxies=len(gals["id"]),
        selected_fraction=completeness(colour_cut_mask(gals, the_cut)),
        reference_selected_fraction=completeness(colour_cut_mask(gals, ref)),
        reference_completeness_bright=completeness(colour_cut_mask(lenses, ref)[bright]),
        n_confusers=len(conf.get("id", ())),
        confuser_selected_fraction=completeness(colour_cut_mask(conf, the_cut))
        if conf
        else float("nan"),
    )


def cut_tile_size_pix(preset: str) -> int:
    """Side of the cut surveys' tiles in ``preset``'s pixels: 1536 DES pixels (6.7')."""
    from lenscan.simulate.presets import get_survey_preset

    return round(1536 * 0.263 / get_survey_preset(preset).pixel_scale_arcsec)


def build_cut_surveys(
    workdir: str,
    seeds: Sequence[int],
    *,
    n_tiles: int = 4,
    tile_size_pix: int | None = None,
    lenses_per_tile: int = 100,
    preset: str = "des",
) -> list[str]:
    """Build (or reuse) one lens-rich synthetic survey per seed under ``workdir``.

    ``preset`` is the simulator survey preset; surveys of another preset than ``"des"`` carry
    its name in their directory; ``tile_size_pix`` None is :func:`cut_tile_size_pix`.
    """
    from lenscan.simulate.survey import make_survey
    from lenscan.survey import SurveyFormatError, open_survey

    if tile_size_pix is None:
        tile_size_pix = cut_tile_size_pix(preset)
    urls = []
    for seed in seeds:
        tag = "" if preset == "des" else f"{preset}-"
        url = str(
            Path(workdir) / f"cut-survey-{tag}s{seed}-t{n_tiles}x{tile_size_pix}-l{lenses_per_tile}"
        )
        try:
            open_survey(url)
        except (SurveyFormatError, FileNotFoundError):
            make_survey(
                url, n_tiles=n_tiles, seed=int(seed), tile_size_pix=tile_size_pix,
                lenses_per_tile=lenses_per_tile, overwrite=True, preset=preset,
            )  # fmt: skip
        urls.append(url)
    return urls
