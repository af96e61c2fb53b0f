"""FITS coadd tiles -> ingest -> scan -> candidates, end to end on a real LocalCluster.

The synthetic survey is written as DES DR2-style files (fpack-compressed, lossless), ingested
into a fresh store, and scanned; the result must equal the scan of the original store and its
stamps must equal astropy ``Cutout2D`` cutouts of the FITS files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D

from lenscan.simulate import make_survey
from lenscan.survey import open_survey, read_stamps
from lenscan.survey.ingest import ingest
from lenscan.sweep import read_scored, scan
from tests.helpers import TINY_STAMP_PIX, make_tiny_model

pytestmark = pytest.mark.timeout(400)


def test_fits_ingest_scan_matches_original(tmp_path, cluster_client):
    original = str(tmp_path / "original.zarr")
    fits_dir = tmp_path / "fits"
    info = make_survey(
        original, n_tiles=2, seed=23, tile_size_pix=384, lenses_per_tile=5, fits_dir=str(fits_dir)
    )
    catalog = info.fits.catalog_path
    ingested = str(tmp_path / "ingested.zarr")
    summary = ingest(
        str(fits_dir), ingested, catalog=catalog, client=cluster_client, expected_shape_yx=None
    )
    assert summary.ok and len(summary.ingested) == 2 and not summary.failed

    model = make_tiny_model(tmp_path / "tiny")
    kwargs = dict(model=model, threshold=0.0, client=cluster_client, progress=False)
    scan(original, out=str(tmp_path / "scan-original"), **kwargs)
    scan(ingested, out=str(tmp_path / "scan-ingested"), **kwargs)
    a = read_scored(str(tmp_path / "scan-original"))
    b = read_scored(str(tmp_path / "scan-ingested"))
    assert len(a) == len(b) > 0
    a.sort(["tile", "id"])
    b.sort(["tile", "id"])
    assert a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(b["x"], a["x"], atol=1e-6)
    np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5, atol=1e-6)

    # The scanned stamps are the FITS pixels, placed exactly as Cutout2D places them.
    store = open_survey(ingested)
    for tile_id in store.tile_ids:
        rows = b[b["tile"] == tile_id][:10]
        tile = store.tile(tile_id)
        stamps, edge = read_stamps(
            tile, np.asarray(rows["x"]), np.asarray(rows["y"]), TINY_STAMP_PIX
        )
        for band_index, band in enumerate(tile.bands):
            path = next(Path(fits_dir).glob(f"{tile_id}_*_{band}.fits*"))
            with fits.open(path) as hdul:
                data = hdul[1].data.astype(np.float32)
            for k, row in enumerate(rows):
                ref = Cutout2D(
                    data, (row["x"], row["y"]), TINY_STAMP_PIX, mode="partial", fill_value=np.nan
                ).data
                np.testing.assert_array_equal(stamps[k, band_index], ref)
                assert edge[k] == bool(np.isnan(ref).any())
