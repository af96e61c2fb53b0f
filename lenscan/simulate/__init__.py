"""The lens simulator: batched SIE + shear lensing, Sersic light, PSF and noise in survey counts.

Public API (see ``docs/architecture.md``):

* survey presets: :class:`SurveyPreset`, :func:`get_survey_preset`, :func:`list_survey_presets`
* physics kernels (:mod:`lenscan.simulate.physics`): :func:`sie_deflection`,
  :func:`shear_deflection`, :func:`sersic_profile`, :func:`pixel_grid`, :func:`psf_kernel`,
  :func:`convolve`, :func:`add_noise`, ...
* populations: :class:`LensPopulation`, :func:`sample_lens_systems`, :func:`render_systems`
* training sets: :class:`TrainingSetConfig`, :class:`RealCutouts`, :func:`make_training_batch`,
  :class:`TrainingBatch`
* synthetic surveys: :func:`make_survey` (:mod:`lenscan.simulate.survey`)
"""

from lenscan.simulate.physics import (
    add_noise,
    convolve,
    downsample,
    ellipticity_to_q_phi,
    gaussian_kernel,
    magnitude_to_counts,
    moffat_kernel,
    pixel_grid,
    psf_kernel,
    psf_kernel_from_fwhm,
    q_phi_to_ellipticity,
    ray_shoot,
    sersic_amplitude_from_flux,
    sersic_profile,
    sersic_total_flux,
    shear_deflection,
    sie_deflection,
)
from lenscan.simulate.population import (
    LensPopulation,
    RenderInfo,
    check_lens_params,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.presets import (
    SurveyPreset,
    gain_for_depth,
    get_survey_preset,
    list_survey_presets,
)
from lenscan.simulate.survey import SyntheticSurveyInfo, make_survey, read_truth
from lenscan.simulate.training import (
    RealCutouts,
    TrainingBatch,
    TrainingSetConfig,
    make_training_batch,
)

__all__ = [
    "LensPopulation",
    "RealCutouts",
    "RenderInfo",
    "SurveyPreset",
    "SyntheticSurveyInfo",
    "TrainingBatch",
    "TrainingSetConfig",
    "add_noise",
    "check_lens_params",
    "convolve",
    "downsample",
    "ellipticity_to_q_phi",
    "gain_for_depth",
    "gaussian_kernel",
    "get_survey_preset",
    "list_survey_presets",
    "magnitude_to_counts",
    "make_survey",
    "make_training_batch",
    "moffat_kernel",
    "pixel_grid",
    "psf_kernel",
    "psf_kernel_from_fwhm",
    "q_phi_to_ellipticity",
    "ray_shoot",
    "read_truth",
    "render_systems",
    "sample_lens_systems",
    "sersic_amplitude_from_flux",
    "sersic_profile",
    "sersic_total_flux",
    "shear_deflection",
    "sie_deflection",
]
