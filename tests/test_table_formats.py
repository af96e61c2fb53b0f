"""What lenscan writes, read by clients nobody here wrote: STILTS (TOPCAT's engine), xarray."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.io.votable import parse
from astropy.table import Table

from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.table import CandidateTable, column_ucd, read_parquet_table, write_table

STILTS = shutil.which("stilts")


def _candidates():
    n = 5
    rng = np.random.default_rng(4)
    scored = Table(
        {
            "tile": ["DES0001-3000"] * n,
            "id": np.arange(1, n + 1, dtype=np.int64),
            "ra": 40.0 + 0.01 * np.arange(n),
            "dec": np.full(n, -30.0),
            "x": rng.uniform(0, 100, n),
            "y": rng.uniform(0, 100, n),
            "mag_g": rng.uniform(19, 23, n).astype(np.float32),
            "magerr_g": np.full(n, 0.05, np.float32),
            "mag_i": rng.uniform(18, 22, n).astype(np.float32),
            "colour_g_i": rng.uniform(0, 2, n).astype(np.float32),
            "edge": np.zeros(n, bool),
            "score_m0": rng.uniform(0.5, 1, n).astype(np.float32),
            "score": rng.uniform(0.5, 1, n).astype(np.float32),
        },
        meta={"model_name": "tiny", "model_sha256": "ab" * 32, "summary": {"tiles": 1}},
    )
    cand = CandidateTable(scored[scored["score"] >= 0.5], copy=True)
    cand.sort("score", reverse=True)
    cand["n_detections"] = np.ones(len(cand), np.int32)
    cand.add_column(np.arange(1, len(cand) + 1, dtype=np.int32), name="rank", index=0)
    cand.meta["threshold"] = 0.5
    return cand


EXPECTED_UNITS = {"ra": u.deg, "dec": u.deg, "x": u.pix, "y": u.pix, "mag_g": u.mag,
                  "magerr_g": u.mag, "colour_g_i": u.mag}  # fmt: skip


def _stilts_meta(path, fmt):
    out = subprocess.run(
        [STILTS, "tpipe", f"in={path}", f"ifmt={fmt}", "cmd=meta Name Units UCD", "omode=out",
         "ofmt=csv"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return {r["Name"]: r for r in csv.DictReader(io.StringIO(out))}


def _stilts_count(path, fmt):
    out = subprocess.run(
        [STILTS, "tpipe", f"in={path}", f"ifmt={fmt}", "omode=count"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    return int(out.split("rows:")[1])


@pytest.mark.skipif(STILTS is None, reason="needs STILTS; .ci/run installs it (Debian)")
@pytest.mark.parametrize("fmt", ["fits", "votable"])
def test_stilts_reads_columns_units_and_rows(tmp_path, fmt):
    cand = _candidates()
    path = tmp_path / f"candidates.{fmt}"
    write_table(cand, str(path), fmt)
    meta = _stilts_meta(path, fmt)
    assert list(meta) == cand.colnames
    for name, unit in EXPECTED_UNITS.items():
        assert u.Unit(meta[name]["Units"]) == unit, name
    assert meta["score"]["Units"] == ""
    assert meta["ra"]["UCD"] == "pos.eq.ra;meta.main"
    assert meta["mag_g"]["UCD"] == "phot.mag;em.opt.B"
    assert meta["score"]["UCD"] == "stat.probability"
    assert _stilts_count(path, fmt) == len(cand)


def test_votable_infos_and_parquet_metadata_round_trip(tmp_path):
    cand = _candidates()
    write_table(cand, str(tmp_path / "c.vot.xml"), "votable")
    vot = parse(str(tmp_path / "c.vot.xml"))
    infos = {i.name: i.value for i in vot.resources[0].infos}
    assert infos["model_name"] == "tiny" and infos["threshold"] == "0.5"
    assert infos["summary"] == '{"tiles": 1}'
    assert {f.name: f.ucd for f in vot.get_first_table().fields}["dec"] == "pos.eq.dec;meta.main"
    write_table(cand, str(tmp_path / "c.parquet"), "parquet")
    back = Table.read(tmp_path / "c.parquet")  # astropy's own reader, no lenscan code
    assert back.meta["model_name"] == "tiny" and back.meta["summary"] == {"tiles": 1}
    assert back["ra"].unit == u.deg and back["x"].unit == u.pix and back["mag_i"].unit == u.mag
    assert back["score"].description == "lens probability (ensemble mean)"
    assert back["tile"].tolist() == cand["tile"].tolist()
    ours = read_parquet_table(str(tmp_path / "c.parquet"))
    assert ours["dec"].unit == u.deg and ours.meta["threshold"] == 0.5
    header = fits.getheader(_write(cand, tmp_path / "c.fits", "fits"), 1)
    assert header["TUCD2"] == column_ucd(cand.colnames[1]) and header["TUNIT4"] == "deg"


def _write(table, path, fmt):
    write_table(table, str(path), fmt)
    return path


def test_xarray_opens_a_tile_and_its_catalogue_with_units(tmp_path):
    # pytest turns warnings into errors here: the documented call opens without one.
    xr = pytest.importorskip("xarray")
    url = str(tmp_path / "s.zarr")
    make_survey(url, n_tiles=1, seed=2, tile_size_pix=256, lenses_per_tile=1)
    survey = open_survey(url)
    tile = survey.tile(survey.tile_ids[0])
    ds = xr.open_zarr(url, group=f"tiles/{tile.id}", consolidated=False)
    assert ds["image"].dims == ("band", "y", "x")
    assert [str(b) for b in ds["band"].values] == list(survey.bands)
    np.testing.assert_array_equal(ds["image"].sel(band="r").values, tile.image[1])
    assert ds["image"].attrs["units"] == "count" and "zero_point" in ds["image"].attrs["long_name"]
    assert u.Unit(ds["weight"].attrs["units"]) == u.count**-2
    cat = xr.open_zarr(url, group=f"tiles/{tile.id}/catalog", consolidated=False)
    assert cat["ra"].dims == ("source",) and cat.sizes["source"] == tile.n_sources
    np.testing.assert_array_equal(cat["id"].values, tile.catalog(["id"])["id"])
    units = {name: cat[name].attrs.get("units") for name in cat.data_vars}
    for name, unit in EXPECTED_UNITS.items():
        if name in units:
            assert u.Unit(units[name]) == unit, name
    assert units["mag_r"] == "mag" and units["magerr_i"] == "mag" and units["id"] is None
    assert cat["extended_class"].attrs["long_name"].startswith("star/galaxy")
    # Every xarray call the documentation shows passes the flag that keeps it quiet.
    docs = Path(__file__).parents[1]
    texts = [p.read_text() for p in [docs / "README.md", *sorted((docs / "docs").glob("*.md"))]]
    calls = [line for t in texts for line in t.splitlines() if "open_zarr(" in line]
    assert calls and all("consolidated=False" in c for c in calls), calls


def test_every_column_described_with_a_valid_ucd():
    from astropy.io.votable.ucd import check_ucd

    from lenscan.table import COLUMN_UCDS, annotate_columns

    cand = _candidates()
    n = len(cand)
    cand["flags"] = np.zeros(n, np.int32)
    cand["extended_class"] = np.full(n, 3, np.int16)
    cand["masked_fraction"] = np.zeros(n, np.float32)
    annotate_columns(cand)
    undescribed = [c for c in cand.colnames if not cand[c].description]
    assert undescribed == []
    assert cand["colour_g_i"].description == "colour g - i (mag_g - mag_i)"
    assert "masked" in cand["masked_fraction"].description
    assert "star/galaxy" in cand["extended_class"].description
    assert "flags" in cand["flags"].description.lower()
    assert column_ucd("masked_fraction") is not None
    ucds = {column_ucd(c) for c in cand.colnames} | set(COLUMN_UCDS.values())
    assert None not in ucds
    for ucd in ucds:
        assert check_ucd(ucd, check_controlled_vocabulary=True), ucd  # UCD1+ words, in order


def test_votable_positions_refer_to_an_icrs_coosys(tmp_path):
    path = _write(_candidates(), tmp_path / "c.vot.xml", "votable")
    vot = parse(str(path))
    (coosys,) = vot.resources[0].coordinate_systems
    assert coosys.system == "ICRS" and coosys.ID
    fields = {f.name: f for f in vot.get_first_table().fields}
    assert fields["ra"].ref == coosys.ID and fields["dec"].ref == coosys.ID
    assert fields["score"].ref is None
    if STILTS is not None:  # TOPCAT's engine agrees
        out = subprocess.run(
            [STILTS, "tpipe", f"in={path}", "ifmt=votable", "cmd=meta Name CoosysSystem",
             "omode=out", "ofmt=csv"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        rows = {r["Name"]: r for r in csv.DictReader(io.StringIO(out))}
        assert rows["ra"]["CoosysSystem"] == rows["dec"]["CoosysSystem"] == "ICRS"
        assert rows["score"]["CoosysSystem"] == ""


def test_fits_tile_is_a_character_column_read_back_as_text(tmp_path):
    cand = _candidates()
    # A table built from pandas or Arrow holds its strings as objects: FITS refused those.
    cand["tile"] = np.array(["DES0001-3000", "DES0002-3000", "B", "DES0001-3000", "C"], object)
    path = _write(cand, tmp_path / "c.fits", "fits")
    header = fits.getheader(path, 1)
    n = cand.colnames.index("tile") + 1
    assert header[f"TFORM{n}"] == "12A" and header[f"TTYPE{n}"] == "tile"
    text = Table.read(path, character_as_bytes=False)
    assert text["tile"].dtype.kind == "U"
    assert text["tile"].tolist() == list(cand["tile"])
    plain = Table.read(path)  # astropy's default: FITS characters as bytes, elements as str
    assert plain["tile"].tolist() == list(cand["tile"]) and isinstance(plain["tile"][0], str)
    vot = Table.read(_write(cand, tmp_path / "c.vot.xml", "votable"), format="votable")
    assert vot["tile"].dtype.kind == "U" and vot["tile"].tolist() == list(cand["tile"])
