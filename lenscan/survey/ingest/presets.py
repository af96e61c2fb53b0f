"""Ingest presets: a survey's conventions (files, HDUs, catalogue columns) as YAML data."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "IngestPreset",
    "list_ingest_presets",
    "load_ingest_preset",
    "patch_words",
    "survey_scan_defaults",
]

_PRESET_DIR = "presets"


@dataclass(frozen=True)
class IngestPreset:
    """Survey conventions for ingest, loaded from YAML (see ``docs/ingest.md``).

    Attributes
    ----------
    name : str
        Preset name (``"des-dr2"``).
    survey_name : str
        Name given to a store that ingest creates.
    bands : tuple of str
        Lower-case bands, in store order.
    file_patterns : tuple of str
        File-name patterns with ``{tilename}`` and ``{band}``, tried in order.
    tilename_regex : str
        Regular expression a tile name matches (no anchors; it must not contain ``_`` if the
        patterns separate fields with ``_``).
    band_tokens : dict
        Band -> the token used in file names and ``{BAND}`` column templates.
    hdu_science, hdu_weight, hdu_mask : str, int or None
        EXTNAME or index of each plane; weight and mask may be None (not read).
    shape_yx : tuple of int or None
        Expected image shape, or None for any.
    pixel_scale_arcsec : float or None
        Nominal pixel scale, checked against the WCS within ``pixel_scale_rtol``.
    pixel_scale_rtol : float
        Relative tolerance of that check.
    zero_point : float
        Photometric zero point of the images.
    catalog_tile_column : str or None
        Catalogue column holding the tile name (None when tract / patch columns place rows).
    catalog_columns : dict
        lenscan column -> survey column (``id``, ``ra``, ``dec``, ``extended_class``).
    catalog_band_columns : dict
        lenscan prefix (``mag``, ``magerr``) -> survey template with ``{BAND}`` / ``{band}``.
    catalog_flag_columns : str or None
        Template of the per-band flag columns, combined by bitwise OR into ``flags``.
    description : str
        Free text.
    zero_point_keyword : str or None
        Science-header keyword holding the zero point; for ``des_coadd`` a file that has it
        must equal ``zero_point`` (a tile on another photometric scale fails instead of being
        mislabelled); ``afw_exposure`` rescales such a file to ``zero_point``.
    format : str
        The file layout's reader (:mod:`lenscan.survey.formats`): ``des_coadd``,
        ``afw_exposure``.
    survey : str or None
        The survey (``des``, ``lsst``, ``hsc``), recorded in the store; the scan picks its
        model and cut from it.
    hdu_variance : str, int or None
        The variance plane (``afw_exposure``: weight = 1 / variance).
    mask_blank_planes : tuple of str
        Mask planes (``afw_exposure``: by their ``MP_*`` names) that blank a pixel.
    pixel_unit : str or None
        ``"nJy"`` for images in nanojansky (then ``zero_point`` is 31.4); None otherwise.
    tract_regex, patch_regex : str
        What a tract and a patch look like in file names (patterns with ``{tract}`` and
        ``{patch}``); the tile id is ``<tract>-<patch>`` with ``,`` written as ``.``.
    catalog_tract_column, catalog_patch_column : str or None
        Catalogue columns giving each row's tract and patch (instead of ``tile_column``).
    catalog_patch_format : str
        ``"int"`` (Rubin integer patch ids) or ``"xy100"`` (HSC: integer ``100 x + y``, for
        ``x,y``); string patch columns (``"4,4"``) are taken as they are.
    catalog_primary_column : str or None
        Boolean column; rows where it is false (duplicates in patch overlaps, deblend
        parents) are dropped, so each object is ingested once.
    catalog_flux_unit : str or None
        ``"nJy"`` when ``band_columns`` maps ``flux`` / ``fluxerr`` (converted to AB magnitudes;
        a flux <= 0 gives a NaN magnitude) instead of ``mag`` / ``magerr``.
    catalog_extendedness : str or None
        Column of a 0-1 extendedness (1 = extended), mapped to ``extended_class`` 3 (galaxy),
        0 (star), -9 (not finite).
    scan_model, scan_colour_cut : str or None
        The model and colour cut ``lenscan scan`` uses on this survey's stores by default.
    plane_patterns : dict
        Plane -> file-name patterns (``{tilename}``, ``{band}``, ``*``) of layouts that keep
        each plane of a band in its own file (Euclid MER: ``rms``, ``flag``); empty when the
        planes are HDUs of the band file.
    catalog_band_overrides : dict
        Band -> {kind: survey column}, for bands whose columns the templates do not give
        (Euclid: ``FLUX_VIS_PSF`` beside ``FLUX_Y_TEMPLFIT``).
    catalog_extra_columns : dict
        lenscan column -> survey column, stored as they are (numbers; what a cut reads).
    catalog_match_columns : dict
        lenscan column -> survey id column, stored as 1 where the row has an id (> 0), else 0
        (Euclid ``gaia_match`` from ``GAIA_ID``, null for no match).
    catalog_inner_margin_fraction : float or None
        Tiles overlap by this fraction of their side on each side (Euclid: 1/32): a catalogue
        that is not one file per tile keeps only the rows in a tile's inner footprint, so each
        object is ingested once.
    catalog_tile_keyword : str or None
        Header keyword of a per-tile FITS catalogue naming its tile (Euclid ``TILEID``); a
        catalogue of another tile fails that tile.
    """

    name: str
    survey_name: str
    bands: tuple[str, ...]
    file_patterns: tuple[str, ...]
    tilename_regex: str
    band_tokens: dict[str, str]
    hdu_science: str | int
    hdu_weight: str | int | None
    hdu_mask: str | int | None
    shape_yx: tuple[int, int] | None
    pixel_scale_arcsec: float | None
    pixel_scale_rtol: float
    zero_point: float
    catalog_tile_column: str | None
    catalog_columns: dict[str, str]
    catalog_band_columns: dict[str, str]
    catalog_flag_columns: str | None
    description: str = ""
    zero_point_keyword: str | None = None
    format: str = "des_coadd"
    survey: str | None = None
    hdu_variance: str | int | None = None
    mask_blank_planes: tuple[str, ...] = ()
    pixel_unit: str | None = None
    tract_regex: str = "[0-9]+"
    patch_regex: str = "[0-9]+"
    catalog_tract_column: str | None = None
    catalog_patch_column: str | None = None
    catalog_patch_format: str = "int"
    catalog_primary_column: str | None = None
    catalog_flux_unit: str | None = None
    catalog_extendedness: str | None = None
    band_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scan_model: str | None = None
    scan_colour_cut: str | None = None
    plane_patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    catalog_band_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    catalog_extra_columns: dict[str, str] = field(default_factory=dict)
    catalog_match_columns: dict[str, str] = field(default_factory=dict)
    catalog_inner_margin_fraction: float | None = None
    catalog_tile_keyword: str | None = None

    def __post_init__(self) -> None:
        ctx = f"ingest preset {self.name!r}"
        if not self.bands:
            raise ValueError(f"{ctx}: bands must not be empty")
        for p in self.file_patterns:
            if "{band}" not in p or not ("{tilename}" in p or ("{tract}" in p and "{patch}" in p)):
                raise ValueError(
                    f"{ctx}: file pattern {p!r} needs {{band}} and {{tilename}} (or {{tract}} "
                    "and {patch})"
                )
        missing = [b for b in self.bands if b not in self.band_tokens]
        if missing:
            raise ValueError(f"{ctx}: files.band_tokens lacks bands {missing}")
        for key in ("id", "ra", "dec"):
            if key not in self.catalog_columns:
                raise ValueError(f"{ctx}: catalog.columns must map {key!r}")
        self._check_catalog_fields(ctx)
        if self.shape_yx is not None and (len(self.shape_yx) != 2 or min(self.shape_yx) < 1):
            raise ValueError(f"{ctx}: image.shape_yx must be two positive integers or null")
        if not math.isfinite(self.zero_point):
            raise ValueError(f"{ctx}: image.zero_point must be finite")
        re.compile(self.tilename_regex)

    def _check_catalog_fields(self, ctx: str) -> None:
        kinds = ("flux", "fluxerr") if self.catalog_flux_unit else ("mag", "magerr")
        for key in kinds:
            if key not in self.catalog_band_columns:
                raise ValueError(f"{ctx}: catalog.band_columns must map {key!r}")
        if self.catalog_flux_unit not in (None, "nJy", "uJy"):
            raise ValueError(f"{ctx}: catalog.flux_unit must be 'nJy', 'uJy' or absent")
        if self.catalog_patch_format not in ("int", "xy100"):
            raise ValueError(f"{ctx}: catalog.patch_format must be 'int' or 'xy100'")
        if bool(self.catalog_tract_column) != bool(self.catalog_patch_column):
            raise ValueError(f"{ctx}: catalog.tract_column and patch_column go together")
        placed = self.catalog_tile_column or self.catalog_tract_column
        if not placed and self.catalog_inner_margin_fraction is None:
            raise ValueError(
                f"{ctx}: catalog needs tile_column, tract_column + patch_column, or "
                "inner_margin_fraction"
            )

    @property
    def uses_tract_patch(self) -> bool:
        """True when tiles are (tract, patch) pairs (Rubin, HSC) rather than named tiles."""
        return self.catalog_tract_column is not None

    def band_column(self, kind: str, band: str) -> str:
        """Survey column of ``kind`` (``"mag"``, ``"flux"``, ``"flags"``, ...) in ``band``."""
        override = self.catalog_band_overrides.get(band, {}).get(kind)
        if override:
            return override
        template = self.catalog_flag_columns if kind == "flags" else self.catalog_band_columns[kind]
        if template is None:
            raise ValueError(f"ingest preset {self.name!r} has no flag columns")
        token = self.band_tokens[band]
        return template.format(BAND=token.upper(), band=token.lower())

    @staticmethod
    def plane_key(band: str, plane: str) -> str:
        """Key of a band's plane file among a tile's files (``"vis:rms"``)."""
        return f"{band}:{plane}"

    def tile_id(self, tract: Any, patch: Any) -> str:
        """Store tile id of a tract and patch (in survey words): ``9813-4,4`` -> ``9813-4.4``."""
        return f"{tract}-{patch}".replace(",", ".")

    def survey_tile(self, tile_id: str) -> str:
        """The tile in the survey's own words (``9813-4.4`` -> ``9813-4,4``; DES: unchanged)."""
        if not self.uses_tract_patch or "-" not in tile_id:
            return tile_id
        tract, patch = tile_id.split("-", 1)
        return f"{tract}-{patch.replace('.', ',')}"


def patch_words(values: Any, patch_format: str) -> Any:
    """Catalogue patch values in the survey's words: ``404`` -> ``"4,4"`` (``xy100``), ``14``
    -> ``"14"`` (``int``); strings (``"4,4"``) are kept, stripped.

    Parameters
    ----------
    values : array-like
        The catalogue's patch column.
    patch_format : {"int", "xy100"}

    Returns
    -------
    numpy.ndarray of str
    """
    import numpy as np

    arr = np.asarray(values)
    if arr.dtype.kind in "SUO":
        return np.char.strip(arr.astype(str))
    ints = arr.astype(np.int64)
    if patch_format == "xy100":
        return np.array([f"{p // 100},{p % 100}" for p in ints], dtype=str)
    return ints.astype(str)


def survey_scan_defaults(attrs: Mapping[str, Any]) -> dict[str, str]:
    """The model and colour cut a scan uses on a store, from its ``lenscan_survey`` attributes.

    A store ingested with a shipped preset takes that preset's current ``scan`` section (so a
    newer lenscan's model applies to an older store); otherwise the copy recorded at ingest.
    Stores without either (DES, ``make_survey``) give ``{}``: the scan's DES defaults.
    """
    name = attrs.get("ingest_preset")
    if isinstance(name, str) and name in list_ingest_presets():
        p = load_ingest_preset(name)
        current = {"model": p.scan_model, "colour_cut": p.scan_colour_cut}
        return {k: v for k, v in current.items() if v}
    recorded = attrs.get("scan_defaults") or {}
    return {k: str(v) for k, v in recorded.items() if k in ("model", "colour_cut") and v}


def list_ingest_presets() -> list[str]:
    """Names of the ingest presets shipped with lenscan."""
    folder = resources.files("lenscan.survey") / _PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_ingest_preset(name_or_path: str | os.PathLike[str]) -> IngestPreset:
    """Load an ingest preset by name (``"des-dr2"``) or from a YAML file path.

    Parameters
    ----------
    name_or_path : str or path
        A shipped preset name (see :func:`list_ingest_presets`) or a path to a YAML file with
        the same fields.

    Returns
    -------
    IngestPreset
    """
    text: str
    source = os.fspath(name_or_path)
    if source.endswith((".yaml", ".yml")) or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ingest preset file {source} does not exist")
        text = path.read_text()
    else:
        res = resources.files("lenscan.survey") / _PRESET_DIR / f"{source}.yaml"
        if not res.is_file():
            raise ValueError(
                f"unknown ingest preset {source!r}; known: {list_ingest_presets()} "
                "(or pass the path of a YAML preset file)"
            )
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"ingest preset {source}: not valid YAML ({err})") from None
    return _preset_from_dict(data, source)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _preset_from_dict(data: Any, source: str) -> IngestPreset:
    if not isinstance(data, Mapping):
        raise ValueError(f"ingest preset {source}: top level must be a mapping")
    try:
        files, hdus, image, cat = data["files"], data["hdus"], data["image"], data["catalog"]
        flags = cat.get("flags") or {}
        if flags and flags.get("combine", "or") != "or":
            raise ValueError(f"ingest preset {source}: catalog.flags.combine must be 'or'")
        return IngestPreset(
            name=str(data["name"]),
            survey_name=str(data.get("survey_name", data["name"])),
            description=str(data.get("description", "")),
            bands=tuple(str(b) for b in data["bands"]),
            format=str(data.get("format", "des_coadd")),
            survey=_opt_str(data.get("survey")),
            **_file_fields(files),
            **_image_fields(hdus, image),
            **_catalog_fields(cat, flags),
            scan_model=_opt_str((data.get("scan") or {}).get("model")),
            scan_colour_cut=_opt_str((data.get("scan") or {}).get("colour_cut")),
            plane_patterns={
                str(k): tuple(str(p) for p in v) for k, v in (files.get("planes") or {}).items()
            },
            **_catalog_extras(cat),
        )
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"ingest preset {source}: missing or malformed field ({err!r})") from None


def _file_fields(files: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "file_patterns": tuple(str(p) for p in files["patterns"]),
        "tilename_regex": str(files.get("tilename_regex", "[A-Za-z0-9][A-Za-z0-9+.-]*")),
        "tract_regex": str(files.get("tract_regex", "[0-9]+")),
        "patch_regex": str(files.get("patch_regex", "[0-9]+")),
        "band_tokens": {str(k): str(v) for k, v in files["band_tokens"].items()},
        "band_aliases": {
            str(k): tuple(str(t) for t in v) for k, v in (files.get("band_aliases") or {}).items()
        },
    }


def _image_fields(hdus: Mapping[str, Any], image: Mapping[str, Any]) -> dict[str, Any]:
    shape = image.get("shape_yx")
    scale = image.get("pixel_scale_arcsec")
    return {
        "hdu_science": hdus["science"],
        "hdu_weight": hdus.get("weight"),
        "hdu_mask": hdus.get("mask"),
        "hdu_variance": hdus.get("variance"),
        "mask_blank_planes": tuple(str(m) for m in hdus.get("mask_blank_planes") or ()),
        "shape_yx": None if shape is None else (int(shape[0]), int(shape[1])),
        "pixel_scale_arcsec": None if scale is None else float(scale),
        "pixel_scale_rtol": float(image.get("pixel_scale_rtol", 0.01)),
        "zero_point": float(image["zero_point"]),
        "zero_point_keyword": image.get("zero_point_keyword"),
        "pixel_unit": _opt_str(image.get("pixel_unit")),
    }


def _catalog_extras(cat: Mapping[str, Any]) -> dict[str, Any]:
    margin = cat.get("inner_margin_fraction")
    return {
        "catalog_band_overrides": {
            str(b): {str(k): str(c) for k, c in cols.items()}
            for b, cols in (cat.get("band_columns_by_band") or {}).items()
        },
        "catalog_extra_columns": {str(k): str(v) for k, v in (cat.get("extra") or {}).items()},
        "catalog_match_columns": {str(k): str(v) for k, v in (cat.get("match") or {}).items()},
        "catalog_inner_margin_fraction": None if margin is None else float(margin),
        "catalog_tile_keyword": _opt_str(cat.get("tile_keyword")),
    }


def _catalog_fields(cat: Mapping[str, Any], flags: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "catalog_tile_column": _opt_str(cat.get("tile_column")),
        "catalog_tract_column": _opt_str(cat.get("tract_column")),
        "catalog_patch_column": _opt_str(cat.get("patch_column")),
        "catalog_patch_format": str(cat.get("patch_format", "int")),
        "catalog_primary_column": _opt_str(cat.get("primary_column")),
        "catalog_flux_unit": _opt_str(cat.get("flux_unit")),
        "catalog_extendedness": _opt_str(cat.get("extendedness")),
        "catalog_columns": {str(k): str(v) for k, v in cat["columns"].items()},
        "catalog_band_columns": {str(k): str(v) for k, v in cat["band_columns"].items()},
        "catalog_flag_columns": flags.get("columns"),
    }
