"""Peak memory and store size of ingesting one large Euclid MER tile (euclid-q1 preset).

Writes a VIS image, RMS and FLAG file of ``--n-pix``² pixels in the MER layout row block by row
block (so the writer itself never holds a plane), then ingests it in a child process and
reports the child's peak RSS, the FITS and store bytes and the time. A Q1 tile is 19,200² px
(1.47 GB per float32 plane); ingest streams ``shard_pix`` rows at a time, so its peak should
not grow with the tile's height.

Usage::

    PYTHONPATH=. python benchmarks/bench_ingest_euclid.py --n-pix 8000 --dir /tmp/mer-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.simulate.euclid_export import mer_file_name


def _header(n: int, ny: int, tile: str) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [52.0, -28.0]
    w.wcs.crpix = [n / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = [[-0.1 / 3600, 0.0], [0.0, 0.1 / 3600]]
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = -32
    h["NAXIS"] = 2
    h["NAXIS1"] = n
    h["NAXIS2"] = ny
    h.update(w.to_header())
    h["TILEID"] = int(tile)
    h["MAGZERO"] = 23.9
    return h


def write_plane(path: Path, n: int, ny: int, tile: str, kind: str, rows: int = 512) -> None:
    """One MER plane file (``ny`` x ``n``) written with a streaming HDU, ``rows`` at a time."""
    h = _header(n, ny, tile)
    if kind == "flag":
        h["BITPIX"] = 32
    rng = np.random.default_rng(0)
    stream = fits.StreamingHDU(str(path), h)
    for y0 in range(0, ny, rows):
        m = min(rows, ny - y0)
        if kind == "image":
            block = rng.normal(0, 0.0011, (m, n)).astype(">f4")
        elif kind == "rms":
            block = rng.uniform(0.001, 0.0012, (m, n)).astype(">f4")
        else:
            block = np.zeros((m, n), ">i4")
            block[:, :16] = 1
        stream.write(block)
    stream.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-pix", type=int, default=8000)
    ap.add_argument("--ny", type=int, default=None, help="rows (default: --n-pix, square)")
    ap.add_argument("--dir", default="/tmp/lenscan-mer-bench")
    args = ap.parse_args()
    root = Path(args.dir)
    ny = args.ny or args.n_pix
    shutil.rmtree(root, ignore_errors=True)
    tile = "102018211"
    folder = root / "q1" / "MER" / tile / "VIS"
    folder.mkdir(parents=True)
    for kind in ("image", "rms", "flag"):
        write_plane(
            folder / mer_file_name(kind, "vis", tile, "ABC123_20241025T024806.3"),
            args.n_pix,
            ny,
            tile,
            kind,
        )
    cat_dir = root / "q1" / "catalogs" / "MER_FINAL_CATALOG" / tile
    cat_dir.mkdir(parents=True)
    cols = {
        "OBJECT_ID": np.array([1], np.int64), "RIGHT_ASCENSION": [52.0], "DECLINATION": [-28.0],
        "FLUX_VIS_PSF": [10.0], "FLUXERR_VIS_PSF": [0.1], "VIS_DET": [1], "SPURIOUS_PROB": [0.0],
        "POINT_LIKE_PROB": [0.0], "EXTENDED_PROB": [1.0], "SEGMENTATION_AREA": [300],
        "MU_MAX": [17.0], "MUMAX_MINUS_MAG": [-1.0], "FLUX_DETECTION_TOTAL": [10.0],
        "GAIA_ID": np.array([-1], np.int64),
    }  # fmt: skip
    from astropy.table import Table

    Table({k: np.asarray(v) for k, v in cols.items()}).write(
        cat_dir / "EUC_MER_FINAL-CAT_TILE102018211-X_0Z_00.00.fits"
    )
    fits_bytes = sum(p.stat().st_size for p in folder.iterdir())
    store = root / "euclid.zarr"
    cat = "/catalogs/MER_FINAL_CATALOG/{tilename}/EUC_MER_FINAL-CAT_TILE{tilename}-*.fits"
    code = (
        "from lenscan.survey.ingest import ingest; import sys; "
        f"s = ingest({str(root / 'q1')!r}, {str(store)!r}, preset='euclid-q1', client='sync', "
        f"catalog={str(root / 'q1') + cat!r}); "
        "print(s); sys.exit(0 if s.ok else 1)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    print(json.dumps({
        "n_pix": args.n_pix, "ny": ny, "fits_mb": round(fits_bytes / 1e6, 1),
        "plane_mb": round(args.n_pix * ny * 4 / 1e6, 1), "store_mb": round(store_bytes / 1e6, 1),
        "store_over_fits": round(store_bytes / fits_bytes, 3), "peak_rss_mb": round(peak_mb, 1),
        "seconds": round(seconds, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
