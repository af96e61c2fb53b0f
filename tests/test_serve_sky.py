"""The service's sky index against brute force: tile footprints across RA = 0, overlaps, ids."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from lenscan.serve.sky import SkyIndex, edge_margin, pick_best
from lenscan.survey import create_survey, open_survey
from tests.conftest import _tile_data

SHAPE = (150, 200)


def _tile(seed, crval, ids):
    data = _tile_data(seed=seed, shape_yx=SHAPE, n_sources=len(ids))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [SHAPE[1] / 2 + 0.5, SHAPE[0] / 2 + 0.5]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    cat = data["catalog"]
    ra, dec = wcs.wcs_pix2world(cat["x"], cat["y"], 0)
    cat.update(id=np.asarray(ids, dtype=np.int64), ra=ra, dec=dec)
    data["wcs_header"] = wcs.to_header()
    return data


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """Two overlapping tiles on either side of RA = 0, and one far away; ids 5-9 in both."""
    url = str(tmp_path_factory.mktemp("sky") / "s.zarr")
    survey = create_survey(url, name="wrap", bands=("g", "r", "i"))
    survey.write_tile("a", **_tile(1, (359.998, -30.0), range(0, 10)))
    survey.write_tile("b", **_tile(2, (0.006, -30.0), range(5, 15)))
    survey.write_tile("c", **_tile(3, (120.0, 10.0), range(20, 30)))
    return SkyIndex(open_survey(url))


def _brute_force(sky, ra, dec):
    best = np.full(ra.size, -1)
    margin_best = np.full(ra.size, -np.inf)
    for k, wcs in enumerate(sky.wcs):
        x, y = wcs.world_to_pixel_values(ra, dec)
        margin = edge_margin(np.asarray(x), np.asarray(y), SHAPE)
        better = (margin >= 0) & (margin > margin_best)
        best[better], margin_best[better] = k, margin[better]
    return best


def test_locate_matches_brute_force_across_ra_zero(sky):
    rng = np.random.default_rng(0)
    ra = (rng.uniform(-0.03, 0.03, 3000)) % 360.0
    dec = rng.uniform(-30.03, -29.97, 3000)
    placed = sky.locate(ra, dec)
    expected = _brute_force(sky, ra, dec)
    np.testing.assert_array_equal(placed.tile, expected)
    names = {sky.tile_ids[k] for k in placed.tile[placed.tile >= 0]}
    assert names == {"a", "b"} and (placed.tile < 0).any()  # both tiles, and misses
    inside = placed.tile >= 0
    for k in np.unique(placed.tile[inside]):
        sel = placed.tile == k
        x, y = sky.wcs[k].world_to_pixel_values(ra[sel], dec[sel])
        np.testing.assert_array_equal(placed.x[sel], x)  # the tile's own WCS, as the scan
        np.testing.assert_array_equal(placed.y[sel], y)
    far = sky.locate(np.array([120.0, 300.0]), np.array([10.0, 80.0]))
    assert [sky.tile_ids[k] if k >= 0 else None for k in far.tile] == ["c", None]


def test_ids_in_two_tiles_come_from_the_tile_where_they_sit_deeper(sky):
    placed, ra, dec = sky.find_ids(np.array([3, 7, 12, 25, 99]))
    assert np.isnan(dec[-1]) and np.isfinite(dec[:4]).all()
    assert placed.tile[-1] == -1 and np.isnan(ra[-1])
    names = [sky.tile_ids[k] for k in placed.tile[:4]]
    assert names[0] == "a" and names[2] == "b" and names[3] == "c"
    # id 7 is in both catalogues (at different positions): the deeper placement wins.
    margins = {}
    for tile_id in ("a", "b"):
        k = sky.tile_ids.index(tile_id)
        cat = sky.tiles[k].catalog(["id", "ra", "dec"])
        row = int(np.flatnonzero(cat["id"] == 7)[0])
        x, y = sky.wcs[k].world_to_pixel_values(cat["ra"][row], cat["dec"][row])
        margins[tile_id] = float(edge_margin(np.atleast_1d(x), np.atleast_1d(y), SHAPE)[0])
    assert names[1] == max(margins, key=margins.get)
    only_b, _, _ = sky.find_ids(np.array([7]), "b")
    assert sky.tile_ids[int(only_b.tile[0])] == "b"


def test_pick_best_takes_the_largest_margin_per_query():
    query = np.array([0, 0, 1, 2, 2, 2])
    tile = np.array([4, 5, 6, 7, 8, 9])
    margin = np.array([1.0, 3.0, 0.5, 2.0, 9.0, 2.0])
    pair, chosen = pick_best(4, query, tile, margin)
    np.testing.assert_array_equal(pair, [1, 2, 4, -1])
    np.testing.assert_array_equal(chosen, [5, 6, 8, -1])
