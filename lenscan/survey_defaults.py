"""Which bundled model and colour cut a survey's store is scanned with by default.

A store records the survey it holds in its name (``des-dr2``, ``lsst-dp1``, ``hsc-pdr3``,
``synthetic-lsst``, ...). :func:`survey_family` reduces such a name to the survey (``des``,
``lsst``, ``hsc``, ``euclid``), and :func:`default_model_for_survey` /
:func:`default_cut_for_survey` give the model trained for that survey's pixels and the colour
cut chosen for its photometry (see ``docs/surveys.md``). Unknown surveys get the package
defaults (the DES model and cut), whose compatibility check then says what does not fit.

>>> survey_family("lsst-dp1"), survey_family("synthetic-hsc"), survey_family("HSC")
('lsst', 'hsc', 'hsc')
>>> default_cut_for_survey("lsst-dp02"), default_model_for_survey("hsc-pdr3")
('lsst-gri-wide', 'lenscan-hsc-v1')
>>> default_cut_for_survey("euclid"), default_cut_for_survey("synthetic-euclid")
('euclid-q1', 'euclid-vis-bright')
"""

from __future__ import annotations

from types import MappingProxyType

from lenscan.select import DEFAULT_COLOUR_CUT

__all__ = [
    "SURVEY_CUTS",
    "SURVEY_MODELS",
    "SYNTHETIC_CUTS",
    "default_cut_for_survey",
    "default_model_for_survey",
    "survey_family",
]

#: Bundled model per survey family; ``des`` is :data:`lenscan.models.DEFAULT_MODEL`.
SURVEY_MODELS = MappingProxyType(
    {"lsst": "lenscan-lsst-v1", "hsc": "lenscan-hsc-v1", "euclid": "lenscan-euclid-v1"}
)
#: Colour-cut preset (:data:`lenscan.select.COLOUR_CUTS`) per survey family.
SURVEY_CUTS = MappingProxyType(
    {
        "des": DEFAULT_COLOUR_CUT,
        "lsst": "lsst-gri-wide",
        "hsc": "hsc-gri-wide",
        "euclid": "euclid-q1",
    }
)
#: Cuts for ``make_survey``'s ``synthetic-<survey>`` stores where the survey's bundled model
#: was calibrated with another cut than the survey's (Euclid: ``lenscan-euclid-v1``'s
#: threshold and figures were measured with ``euclid-vis-bright``; ``--cut euclid-q1`` runs on
#: such stores too, their catalogues carry the MER columns it reads).
SYNTHETIC_CUTS = MappingProxyType({"euclid": "euclid-vis-bright"})
_FAMILIES = ("des", "lsst", "hsc", "euclid")
# Names a survey is also known by (Rubin's data previews, the HSC release).
_ALIASES = {"rubin": "lsst", "dp1": "lsst", "dp02": "lsst", "dp0": "lsst", "hsc-ssp": "hsc"}


def survey_family(name: str | None) -> str | None:
    """The survey (``des``, ``lsst``, ``hsc``) a store or preset name belongs to, else None.

    The name's dash-separated words are read in order, after a ``synthetic`` prefix: the first
    that is a survey (or one of its aliases, e.g. ``rubin``, ``dp1``) decides.
    """
    if not name:
        return None
    words = str(name).strip().lower().replace("_", "-").split("-")
    for word in words:
        family = _ALIASES.get(word, word)
        if family in _FAMILIES:
            return family
    return None


def default_model_for_survey(name: str | None) -> str:
    """Name of the bundled model that scans a store of survey ``name`` by default.

    ``lsst`` stores (Rubin DP1, DP0.2, LSST) get ``lenscan-lsst-v1``, ``hsc`` stores
    ``lenscan-hsc-v1``, ``euclid`` stores ``lenscan-euclid-v1``; DES and unknown surveys the
    package default (:data:`lenscan.models.DEFAULT_MODEL`).
    """
    family = survey_family(name)
    if family is not None and family in SURVEY_MODELS:
        return SURVEY_MODELS[family]
    from lenscan.models.registry import DEFAULT_MODEL  # loads torch: only when needed

    return DEFAULT_MODEL


def default_cut_for_survey(name: str | None) -> str:
    """Name of the colour-cut preset a store of survey ``name`` is scanned with by default.

    ``synthetic-euclid`` (``make_survey``) stores get ``euclid-vis-bright``, the cut
    ``lenscan-euclid-v1``'s threshold was calibrated with on such stores.
    """
    family = survey_family(name)
    if family is None:
        return DEFAULT_COLOUR_CUT
    synthetic = str(name).strip().lower().startswith("synthetic")
    if synthetic and family in SYNTHETIC_CUTS:
        return SYNTHETIC_CUTS[family]
    return SURVEY_CUTS[family]
