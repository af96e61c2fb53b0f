"""Ingest presets: a survey's conventions (files, HDUs, catalogue columns) as YAML data."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["IngestPreset", "list_ingest_presets", "load_ingest_preset"]

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
    catalog_tile_column : str
        Catalogue column holding the tile name.
    catalog_columns : dict
        lenscan column -> survey column (``id``, ``ra``, ``dec``, ``extended_class``).
    catalog_band_columns : dict
        lenscan prefix (``mag``, ``magerr``) -> survey template with ``{BAND}`` / ``{band}``.
    catalog_flag_columns : str or None
        Template of the per-band flag columns, combined by bitwise OR into ``flags``.
    description : str
        Free text.
    zero_point_keyword : str or None
        Science-header keyword holding the zero point; when a file has it, it must equal
        ``zero_point`` (a tile on another photometric scale fails instead of being mislabelled).
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
    catalog_tile_column: str
    catalog_columns: dict[str, str]
    catalog_band_columns: dict[str, str]
    catalog_flag_columns: str | None
    description: str = ""
    zero_point_keyword: str | None = None

    def __post_init__(self) -> None:
        ctx = f"ingest preset {self.name!r}"
        if not self.bands:
            raise ValueError(f"{ctx}: bands must not be empty")
        for p in self.file_patterns:
            if "{tilename}" not in p or "{band}" not in p:
                raise ValueError(f"{ctx}: file pattern {p!r} needs {{tilename}} and {{band}}")
        missing = [b for b in self.bands if b not in self.band_tokens]
        if missing:
            raise ValueError(f"{ctx}: files.band_tokens lacks bands {missing}")
        for key in ("id", "ra", "dec"):
            if key not in self.catalog_columns:
                raise ValueError(f"{ctx}: catalog.columns must map {key!r}")
        for key in ("mag", "magerr"):
            if key not in self.catalog_band_columns:
                raise ValueError(f"{ctx}: catalog.band_columns must map {key!r}")
        if self.shape_yx is not None and (len(self.shape_yx) != 2 or min(self.shape_yx) < 1):
            raise ValueError(f"{ctx}: image.shape_yx must be two positive integers or null")
        if not math.isfinite(self.zero_point):
            raise ValueError(f"{ctx}: image.zero_point must be finite")
        re.compile(self.tilename_regex)

    def band_column(self, kind: str, band: str) -> str:
        """Survey column of ``kind`` (``"mag"``, ``"magerr"``, ``"flags"``) in ``band``."""
        template = self.catalog_flag_columns if kind == "flags" else self.catalog_band_columns[kind]
        if template is None:
            raise ValueError(f"ingest preset {self.name!r} has no flag columns")
        token = self.band_tokens[band]
        return template.format(BAND=token.upper(), band=token.lower())


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


def _preset_from_dict(data: Any, source: str) -> IngestPreset:
    if not isinstance(data, Mapping):
        raise ValueError(f"ingest preset {source}: top level must be a mapping")
    try:
        files, hdus, image, cat = data["files"], data["hdus"], data["image"], data["catalog"]
        shape = image.get("shape_yx")
        scale = image.get("pixel_scale_arcsec")
        flags = cat.get("flags") or {}
        if flags and flags.get("combine", "or") != "or":
            raise ValueError(f"ingest preset {source}: catalog.flags.combine must be 'or'")
        return IngestPreset(
            name=str(data["name"]),
            survey_name=str(data.get("survey_name", data["name"])),
            description=str(data.get("description", "")),
            bands=tuple(str(b) for b in data["bands"]),
            file_patterns=tuple(str(p) for p in files["patterns"]),
            tilename_regex=str(files["tilename_regex"]),
            band_tokens={str(k): str(v) for k, v in files["band_tokens"].items()},
            hdu_science=hdus["science"],
            hdu_weight=hdus.get("weight"),
            hdu_mask=hdus.get("mask"),
            shape_yx=None if shape is None else (int(shape[0]), int(shape[1])),
            pixel_scale_arcsec=None if scale is None else float(scale),
            pixel_scale_rtol=float(image.get("pixel_scale_rtol", 0.01)),
            zero_point=float(image["zero_point"]),
            zero_point_keyword=image.get("zero_point_keyword"),
            catalog_tile_column=str(cat["tile_column"]),
            catalog_columns={str(k): str(v) for k, v in cat["columns"].items()},
            catalog_band_columns={str(k): str(v) for k, v in cat["band_columns"].items()},
            catalog_flag_columns=flags.get("columns"),
        )
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"ingest preset {source}: missing or malformed field ({err!r})") from None
