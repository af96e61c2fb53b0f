"""Ingest survey coadd tiles (FITS) and their object catalogue into a lenscan survey store.

The graph is one Dask task per tile (:mod:`lenscan.survey.ingest.graph`); the task
(:mod:`lenscan.survey.ingest.tile_task`) opens the tile's band files through fsspec with astropy
(plain ``.fits`` or fpack ``.fits.fz``), checks shapes, WCS and pixel scale, places the
catalogue rows on the tile with its WCS (:mod:`lenscan.survey.ingest.catalog`), and streams the
science / weight / mask planes into the store in blocks of shard rows, never holding a tile
whole; the tile's ``complete`` flag is written last. Tiles already complete in the store are
skipped, so ingest can be rerun after an interruption. A problem with one tile's input fails
that tile only, with a message naming the file; the summary lists the failures.

Survey conventions (file layout, file names, bands, HDUs, mask planes, catalogue columns and
units, pixel scale, zero point, the scan's model and cut) are data: an :class:`IngestPreset`
(:mod:`lenscan.survey.ingest.presets`), loaded from a YAML file in ``lenscan/survey/presets/``
(``des-dr2``, ``lsst-dp1``, ``lsst-dp02``, ``hsc-pdr3``). Each file layout is a reader in
:mod:`lenscan.survey.formats` (``des_coadd``, ``afw_exposure``), named by the preset.
"""

from lenscan.survey.ingest.catalog import (
    CATALOG_EXTENSIONS,
    TileInputError,
    place_sources,
    read_catalog_file,
)
from lenscan.survey.ingest.cli import add_ingest_arguments, run_ingest_cli
from lenscan.survey.ingest.graph import IngestSummary, discover_tiles, ingest
from lenscan.survey.ingest.presets import IngestPreset, list_ingest_presets, load_ingest_preset

__all__ = [
    "CATALOG_EXTENSIONS",
    "IngestPreset",
    "IngestSummary",
    "TileInputError",
    "add_ingest_arguments",
    "discover_tiles",
    "ingest",
    "list_ingest_presets",
    "load_ingest_preset",
    "place_sources",
    "read_catalog_file",
    "run_ingest_cli",
]
