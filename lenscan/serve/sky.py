"""Sky positions to tiles and stamps: the survey side of ``POST /score/positions``.

Coarse, then fine: each tile's footprint is summarised once, at start-up, as a cap on the sphere
(the unit vector of its centre and the angle to its farthest corner); a position is tested with
the tile's WCS only where it falls inside a cap. Where tiles overlap, the tile in which the
position lies farthest from the edge wins (its stamp is the least likely to be padded).

Stamps are then cut exactly as the scan cuts them: pixel positions from the tile's WCS
(``world_to_pixel_values``), :func:`lenscan.survey.read_model_stamps` (masked pixels blanked)
with the model's stamp size and bands, and the model's normalisation in
:func:`lenscan.stamps.normalise_stamps`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lenscan.models import ModelMeta
from lenscan.serve.inputs import InputError
from lenscan.stamps import normalise_stamps
from lenscan.survey import SurveyStore, Tile, open_survey, read_model_stamps

__all__ = [
    "Placed",
    "SkyIndex",
    "edge_margin",
    "pick_best",
    "unit_vectors",
]

#: Extra angle added to every tile cap before the exact WCS test (radians, ~1 arcsec).
_CAP_PAD_RAD = np.deg2rad(1.0 / 3600.0)


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors ``(n, 3)`` of sky positions in degrees."""
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def edge_margin(x: np.ndarray, y: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
    """Distance in pixels from ``(x, y)`` to the nearest tile edge; negative outside, -inf NaN."""
    ny, nx = shape_yx
    margin = np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])
    return np.where(np.isfinite(margin), margin, -np.inf)


def pick_best(
    n: int, query: np.ndarray, tile: np.ndarray, margin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n`` queries, the candidate ``(query, tile)`` pair with the largest margin.

    Returns
    -------
    pair : ndarray of int, shape (n,)
        Index into the candidate arrays of the chosen pair, -1 for a query without candidates.
    tile : ndarray of int, shape (n,)
        The chosen tile index, -1 where there is none.
    """
    pair = np.full(n, -1, dtype=np.int64)
    if query.size:
        order = np.lexsort((-margin, query))  # by query, then largest margin first
        first = np.ones(order.size, dtype=bool)
        first[1:] = query[order][1:] != query[order][:-1]
        pair[query[order][first]] = order[first]
    chosen = np.where(pair >= 0, tile[np.maximum(pair, 0)] if tile.size else -1, -1)
    return pair, chosen


def _cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


@dataclass(frozen=True)
class Placed:
    """Where positions land: tile index (into :attr:`SkyIndex.tile_ids`), pixel x, y."""

    tile: np.ndarray
    x: np.ndarray
    y: np.ndarray


class SkyIndex:
    """The tiles of a survey with their footprints, for finding and cutting sky positions.

    Parameters
    ----------
    survey : SurveyStore
        An opened survey; every complete tile is indexed.
    """

    def __init__(self, survey: SurveyStore) -> None:
        self.survey = survey
        self.tile_ids: list[str] = list(survey.tile_ids)
        if not self.tile_ids:
            raise ValueError(f"survey {survey.url} has no complete tiles to serve")
        self.tiles: list[Tile] = [survey.tile(t) for t in self.tile_ids]
        self.wcs = [t.wcs for t in self.tiles]
        centres, radii = [], []
        for tile, wcs in zip(self.tiles, self.wcs, strict=True):
            ny, nx = tile.shape_yx
            px = np.array([(nx - 1) / 2, -0.5, nx - 0.5, nx - 0.5, -0.5])
            py = np.array([(ny - 1) / 2, -0.5, -0.5, ny - 0.5, ny - 0.5])
            ra, dec = wcs.pixel_to_world_values(px, py)
            vec = unit_vectors(np.asarray(ra), np.asarray(dec))
            centres.append(vec[0])
            radii.append(float(np.max(np.arccos(np.clip(vec[1:] @ vec[0], -1.0, 1.0)))))
        self._centres = np.array(centres)
        self._cos_cap = np.cos(np.minimum(np.array(radii) + _CAP_PAD_RAD, np.pi))
        self._catalogue: dict[str, np.ndarray] | None = None
        self._catalogue_lock = threading.Lock()

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> SkyIndex:
        """Open the survey at ``url`` read-only and index its tiles."""
        return cls(open_survey(url, storage_options=storage_options))

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel scale of the first tile (the scan checks models against the same)."""
        return self.tiles[0].pixel_scale_arcsec

    # ------------------------------------------------------------------------ positions
    def locate(self, ra: np.ndarray, dec: np.ndarray) -> Placed:
        """Find the tile holding each position (tile -1 where none does) and its pixel x, y."""
        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        vec = unit_vectors(ra, dec)
        near = vec @ self._centres.T >= self._cos_cap  # (n, tiles)
        pairs_q, pairs_t, xs, ys, margins = [], [], [], [], []
        for k in np.flatnonzero(near.any(axis=0)):
            q = np.flatnonzero(near[:, k])
            x, y = self.wcs[k].world_to_pixel_values(ra[q], dec[q])
            margin = edge_margin(np.asarray(x), np.asarray(y), self.tiles[k].shape_yx)
            keep = margin >= 0
            pairs_q.append(q[keep])
            pairs_t.append(np.full(int(keep.sum()), k))
            xs.append(np.asarray(x)[keep])
            ys.append(np.asarray(y)[keep])
            margins.append(margin[keep])
        return self._choose(ra.size, pairs_q, pairs_t, xs, ys, margins)[0]

    @staticmethod
    def _choose(n, pairs_q, pairs_t, xs, ys, margins) -> tuple[Placed, np.ndarray]:
        q, t = _cat(pairs_q, np.int64), _cat(pairs_t, np.int64)
        x, y, margin = _cat(xs, np.float64), _cat(ys, np.float64), _cat(margins, np.float64)
        pair, tile = pick_best(n, q, t, margin)
        ok = pair >= 0
        px = np.full(n, np.nan)
        py = np.full(n, np.nan)
        px[ok], py[ok] = x[pair[ok]], y[pair[ok]]
        return Placed(tile=tile, x=px, y=py), pair

    # ------------------------------------------------------------------------ catalogue ids
    def _global_catalogue(self) -> dict[str, np.ndarray]:
        """``id``, ``ra``, ``dec`` and tile index of every catalogue row, sorted by id (cached)."""
        with self._catalogue_lock:
            if self._catalogue is None:
                parts = [t.catalog(["id", "ra", "dec"]) for t in self.tiles]
                ids = np.concatenate([np.asarray(p["id"], dtype=np.int64) for p in parts])
                order = np.argsort(ids, kind="stable")
                self._catalogue = {
                    "id": ids[order],
                    "ra": np.concatenate([np.asarray(p["ra"], np.float64) for p in parts])[order],
                    "dec": np.concatenate([np.asarray(p["dec"], np.float64) for p in parts])[order],
                    "tile": np.concatenate([np.full(len(p["id"]), k) for k, p in enumerate(parts)])[
                        order
                    ],
                }
            return self._catalogue

    def _tile_catalogue(self, tile_id: str) -> dict[str, np.ndarray]:
        if tile_id not in self.tile_ids:
            raise InputError(f"tile {tile_id!r} is not a complete tile of {self.survey.url}")
        k = self.tile_ids.index(tile_id)
        cat = self.tiles[k].catalog(["id", "ra", "dec"])
        order = np.argsort(np.asarray(cat["id"], dtype=np.int64), kind="stable")
        return {
            "id": np.asarray(cat["id"], dtype=np.int64)[order],
            "ra": np.asarray(cat["ra"], np.float64)[order],
            "dec": np.asarray(cat["dec"], np.float64)[order],
            "tile": np.full(order.size, k),
        }

    def find_ids(
        self, ids: np.ndarray, tile_id: str | None = None
    ) -> tuple[Placed, np.ndarray, np.ndarray]:
        """Place catalogue sources by id, exactly where the scan cuts their stamps.

        A source listed by several overlapping tiles is cut from the one where it lies farthest
        from the edge. ``tile_id`` restricts the search to one tile's catalogue (no survey-wide
        id index is built then).

        Returns
        -------
        placed : Placed
            Tile index (-1 for an unknown id) and pixel position from that tile's WCS.
        ra, dec : ndarray
            The catalogue positions (NaN for unknown ids).
        """
        ids = np.asarray(ids, dtype=np.int64)
        cat = self._tile_catalogue(tile_id) if tile_id is not None else self._global_catalogue()
        lo = np.searchsorted(cat["id"], ids, side="left")
        hi = np.searchsorted(cat["id"], ids, side="right")
        query = np.repeat(np.arange(ids.size), hi - lo)
        rows = _cat([np.arange(a, b) for a, b in zip(lo, hi, strict=True)], np.int64)
        tiles = cat["tile"][rows]
        pairs_q, pairs_t, xs, ys, margins, pair_rows = [], [], [], [], [], []
        for k in np.unique(tiles):
            sel = tiles == k
            pair_rows.append(rows[sel])
            x, y = self.wcs[k].world_to_pixel_values(cat["ra"][rows[sel]], cat["dec"][rows[sel]])
            pairs_q.append(query[sel])
            pairs_t.append(tiles[sel])
            xs.append(np.asarray(x))
            ys.append(np.asarray(y))
            margins.append(edge_margin(np.asarray(x), np.asarray(y), self.tiles[k].shape_yx))
        placed, pair = self._choose(ids.size, pairs_q, pairs_t, xs, ys, margins)
        row = _cat(pair_rows, np.int64)
        ok = pair >= 0
        ra, dec = np.full(ids.size, np.nan), np.full(ids.size, np.nan)
        ra[ok], dec[ok] = cat["ra"][row[pair[ok]]], cat["dec"][row[pair[ok]]]
        return placed, ra, dec

    # ------------------------------------------------------------------------ stamps
    def cut(self, placed: Placed, meta: ModelMeta) -> tuple[torch.Tensor, np.ndarray]:
        """Cut and normalise the model's stamps at placed positions, as the scan does.

        Returns
        -------
        normalised : Tensor, shape (n, len(meta.bands), S, S)
        edge : ndarray of bool, shape (n,)
            The stamp overhangs its tile's edge (padded, like the scan's ``edge`` column).
        """
        n, size = placed.tile.size, meta.stamp_size_pix
        stamps = np.empty((n, len(meta.bands), size, size), dtype=np.float32)
        edge = np.zeros(n, dtype=bool)
        for k in np.unique(placed.tile):
            sel = np.flatnonzero(placed.tile == k)
            stamps[sel], edge[sel], _ = read_model_stamps(
                self.tiles[k], placed.x[sel], placed.y[sel], size, bands=meta.bands
            )
        return normalise_stamps(torch.from_numpy(stamps), meta.normalisation), edge
