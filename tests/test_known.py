"""Known lenses and cross-matching: flags, the recovery report, HATS output and matches.

The survey holds a lens at a real lenscat position (J0011-0845) among its simulated ones; scans
run on the real LocalCluster of ``cluster_client``; HATS catalogues are written by lsdb and by
hats-import and read back by lsdb.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from lenscan.catalogs import (
    KNOWN_COLUMNS,
    crossmatch_catalog,
    load_known_lenses,
    nearest_within,
    read_sky_table,
)
from lenscan.cli import main
from lenscan.crossmatch import known_recovery, recovery_summary
from lenscan.select import colour_cut_mask, get_colour_cut
from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.sweep import read_scored, scan
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(600)
LENSCAT_NAME = "J0011-0845"


@pytest.fixture(scope="module")
def known_lens():
    lenses = load_known_lenses()
    row = lenses[np.flatnonzero(lenses["name"] == LENSCAT_NAME)[0]]
    return float(row["ra"]), float(row["dec"])


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory, known_lens):
    # Two 512 px tiles side by side with the patch centre 248 px (half a tile step) east of the
    # lenscat lens, so that it lands at the middle of one tile.
    ra, dec = known_lens
    shift = 248 * 0.263 / 3600 / math.cos(math.radians(dec))
    url = str(tmp_path_factory.mktemp("survey") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=3, tile_size_pix=512, lenses_per_tile=4,
                centre_deg=(ra + shift, dec), lens_positions_deg=[(ra, dec)])  # fmt: skip
    return url


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def sweep(survey_url, model, cluster_client, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "run")
    table = scan(survey_url, out=out, model=model, threshold=0.0, colour_cut="all",
                 formats=["parquet", "fits", "hats"], hats_scored=True, client=cluster_client,
                 progress=False)  # fmt: skip
    return out, table


def test_a_candidate_at_a_lenscat_lens_is_flagged_known_and_the_rest_new(sweep, known_lens):
    out, table = sweep
    assert set(KNOWN_COLUMNS) <= set(table.colnames)
    known = np.asarray(table["known_name"], str) != ""
    assert known.sum() == 1
    row = table[np.flatnonzero(known)[0]]
    assert row["known_name"] == LENSCAT_NAME and row["known_grading"] == "confident"
    assert row["known_type"] == "galaxy" and row["known_sep_arcsec"] < 1.0
    assert np.isnan(np.asarray(table["known_sep_arcsec"])[~known]).all()
    summary = json.loads(Path(out, "run.json").read_text())["summary"]["known"]
    assert summary["n_known"] == 1 and summary["n_new"] == len(table) - 1
    assert "lenscat" in summary["catalogue"] and summary["radius_arcsec"] == 3.0
    fits = Table.read(Path(out, "candidates.fits"))
    assert list(fits["known_name"][known]) == [LENSCAT_NAME]


def test_a_catalogue_with_other_column_names_flags_the_same(sweep, known_lens, tmp_path):
    _, table = sweep
    other = Table({"Name": ["MyLens-1", "Far-away"], "RAJ2000": [known_lens[0], 100.0],
                   "DEJ2000": [known_lens[1], 20.0], "Grade": ["A", "B"]})  # fmt: skip
    path = tmp_path / "mine.csv"
    other.write(path, format="ascii.csv")
    known = load_known_lenses(str(path))
    assert known["name"].tolist() == ["MyLens-1", "Far-away"] and known["grading"][0] == "A"
    from lenscan.catalogs import flag_known

    flagged = flag_known(Table(table, copy=True), known)
    assert sorted(set(flagged["known_name"]) - {""}) == ["MyLens-1"]
    with pytest.raises(ValueError, match="no RA column"):
        read_sky_table(Table({"x": [1.0], "y": [2.0]}))


def _catalogue_rows(survey_url):
    """From the tile holding the lenscat lens: a source passing the default cut and one failing."""
    survey = open_survey(survey_url)
    cut = get_colour_cut("des-jacobs19-wide")
    for tile_id in survey.tile_ids:
        cat = survey.tile(tile_id).catalog()
        ok = colour_cut_mask(cat, cut)
        if ok.any() and (~ok).any():
            i, j = np.flatnonzero(ok)[0], np.flatnonzero(~ok)[0]
            return (cat["ra"][i], cat["dec"][i]), (cat["ra"][j], cat["dec"][j])
    raise AssertionError("no tile with sources on both sides of the cut")


def test_the_recovery_report_counts_what_reached_each_stage(
    survey_url, model, cluster_client, tmp_path, known_lens
):
    out = str(tmp_path / "run")
    scan(survey_url, out=out, model=model, threshold=0.0, client=cluster_client, progress=False)
    passes, fails = _catalogue_rows(survey_url)
    blank = (known_lens[0], known_lens[1] + 20 / 3600)  # in the tile, 20" from anything?
    outside = (known_lens[0] + 1.0, known_lens[1])
    known = Table({
        "name": ["passes-cut", "fails-cut", "blank-sky", "outside"],
        "ra": [passes[0], fails[0], blank[0], outside[0]],
        "dec": [passes[1], fails[1], blank[1], outside[1]],
        "grading": ["confident", "probable", "probable", "confident"],
    })  # fmt: skip
    cat_ra = np.concatenate([open_survey(survey_url).tile(t).catalog()["ra"]
                             for t in open_survey(survey_url).tile_ids])  # fmt: skip
    cat_dec = np.concatenate([open_survey(survey_url).tile(t).catalog()["dec"]
                              for t in open_survey(survey_url).tile_ids])  # fmt: skip
    blank_is_blank = nearest_within(np.array([blank[0]]), np.array([blank[1]]), cat_ra, cat_dec,
                                    3.0)[0][0] < 0  # fmt: skip
    report = known_recovery(out, known=known)
    assert report["name"].tolist() == ["passes-cut", "fails-cut", "blank-sky"]  # in footprint
    counts = {r["grading"]: dict(r) for r in recovery_summary(report, top=1)}
    # Hand counts: passes-cut is in the catalogue, selected, scored, a candidate (threshold 0);
    # fails-cut is only in the catalogue; blank-sky (if no source lies within 3") is nothing.
    assert counts["confident"]["in_footprint"] == 1 and counts["confident"]["candidates"] == 1
    assert counts["confident"]["passed_cut"] == counts["confident"]["scored"] == 1
    assert counts["probable"]["in_footprint"] == 2
    assert counts["probable"]["in_catalogue"] == (1 if blank_is_blank else 2)
    assert counts["probable"]["passed_cut"] == counts["probable"]["scored"] == 0
    assert counts["all"]["candidates"] == 1 and counts["all"]["recovered_fraction"] == 1 / 3
    assert counts["all"]["top_1"] == int(report["rank"][0] == 1)


def test_known_recovery_command_prints_the_table_and_writes_each_lens(sweep, capsys):
    out, _ = sweep
    assert main(["known-recovery", out]) == 0
    printed = capsys.readouterr().out
    assert "confident" in printed and "in_footprint" in printed
    per_lens = Table.read(Path(out, "known_recovery.ecsv"))
    assert per_lens["name"].tolist() == [LENSCAT_NAME] and per_lens["rank"][0] >= 1


def test_hats_outputs_are_read_back_by_lsdb(sweep):
    from lenscan.catalogs import quiet_hats

    out, table = sweep
    with quiet_hats():  # pandas-3 deprecations inside lsdb and nested-pandas
        import lsdb

        candidates = lsdb.open_catalog(f"{out}/candidates.hats").compute()
        scored = lsdb.open_catalog(f"{out}/scored.hats").compute()
    assert sorted(candidates["id"]) == sorted(table["id"])
    by_id = dict(zip(candidates["id"], candidates["score"], strict=True))
    np.testing.assert_allclose([by_id[i] for i in table["id"]], table["score"], rtol=1e-6)
    assert len(scored) == len(read_scored(out)) > 0


def test_crossmatch_with_a_hats_catalogue_built_by_hats_import(
    sweep, survey_url, cluster_client, tmp_path
):
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.pipeline import pipeline_with_client

    out, table = sweep
    # Another survey's catalogue: every third candidate's position 0.3" away, with its own column.
    pick = np.arange(0, len(table), 3)
    other = Table({
        "objid": np.arange(len(pick)) + 1000,
        "ra": np.asarray(table["ra"])[pick] + 0.3 / 3600,
        "dec": np.asarray(table["dec"])[pick],
        "z_phot": np.linspace(0.2, 0.8, len(pick)),
    })  # fmt: skip
    csv = tmp_path / "other.csv"
    other.write(csv, format="ascii.csv")
    args = ImportArguments(
        output_path=str(tmp_path), output_artifact_name="other", input_file_list=[str(csv)],
        file_reader="csv", ra_column="ra", dec_column="dec", progress_bar=False,
        tmp_dir=str(tmp_path / "tmp"),
    )  # fmt: skip
    pipeline_with_client(args, cluster_client)
    hats_dir = tmp_path / "other"
    assert (hats_dir / "hats.properties").exists()
    via_hats = crossmatch_catalog(table, str(hats_dir), radius_arcsec=1.0, suffix="_o")
    via_table = crossmatch_catalog(table, str(csv), radius_arcsec=1.0, suffix="_o")
    assert len(via_hats) == len(via_table) == len(table)
    hit = np.isfinite(np.asarray(via_table["sep_o_arcsec"], float))
    assert hit.sum() == len(pick)
    assert sorted(np.asarray(via_hats["objid_o"], float)[np.isfinite(np.asarray(
        via_hats["sep_o_arcsec"], float))].astype(int)) == sorted(other["objid"])  # fmt: skip
    assert main(["crossmatch", out, str(hats_dir), "--suffix", "_o"]) == 0
    written = Table.read(Path(out, "crossmatch.parquet"))
    assert np.isfinite(np.asarray(written["sep_o_arcsec"], float)).sum() == len(pick)
