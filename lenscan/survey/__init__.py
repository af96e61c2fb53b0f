"""The survey store: tiles of multi-band images, WCS and catalogues in Zarr v3 at any fsspec URL.

See ``docs/survey-format.md`` for the layout. FITS ingest lives in :mod:`lenscan.survey.ingest`
(import it explicitly).
"""

from lenscan.survey.reader import read_model_stamps, read_stamps
from lenscan.survey.store import (
    SCHEMA_VERSION,
    SurveyFormatError,
    SurveyStore,
    Tile,
    TileWriter,
    create_survey,
    open_survey,
    required_catalog_columns,
)

__all__ = [
    "SCHEMA_VERSION",
    "SurveyFormatError",
    "SurveyStore",
    "Tile",
    "TileWriter",
    "create_survey",
    "open_survey",
    "read_model_stamps",
    "read_stamps",
    "required_catalog_columns",
]
