"""Simulator physics against lenstronomy and analytic expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from lenscan.simulate import (
    LensPopulation,
    SurveyPreset,
    add_noise,
    convolve,
    downsample,
    ellipticity_to_q_phi,
    gain_for_depth,
    get_survey_preset,
    list_survey_presets,
    pixel_grid,
    psf_kernel,
    psf_kernel_from_fwhm,
    q_phi_to_ellipticity,
    ray_shoot,
    render_systems,
    sample_lens_systems,
    sersic_profile,
    sersic_total_flux,
    shear_deflection,
    sie_deflection,
)

lt_lens = pytest.importorskip("lenstronomy.LensModel.lens_model")
lt_light = pytest.importorskip("lenstronomy.LightModel.light_model")

F64 = torch.float64


def _random_lenses(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    out = []
    for _ in range(n):
        out.append(
            {
                "theta_e": rng.uniform(0.5, 3.0),
                "q": rng.uniform(0.3, 1.0),
                "phi": rng.uniform(-math.pi, math.pi),
                "cx": rng.uniform(-0.3, 0.3),
                "cy": rng.uniform(-0.3, 0.3),
                "g1": rng.uniform(-0.1, 0.1),
                "g2": rng.uniform(-0.1, 0.1),
            }
        )
    return out


def _lt_kwargs(p: dict[str, float]) -> list[dict[str, float]]:
    e1, e2 = (float(v) for v in q_phi_to_ellipticity(torch.tensor(p["q"], dtype=F64), p["phi"]))
    return [
        {"theta_E": p["theta_e"], "e1": e1, "e2": e2, "center_x": p["cx"], "center_y": p["cy"]},
        {"gamma1": p["g1"], "gamma2": p["g2"], "ra_0": p["cx"], "dec_0": p["cy"]},
    ]


def test_ellipticity_round_trip_matches_lenstronomy_convention():
    from lenstronomy.Util import param_util

    q, phi = 0.62, 0.7
    e1, e2 = q_phi_to_ellipticity(torch.tensor(q, dtype=F64), phi)
    phi_lt, q_lt = param_util.ellipticity2phi_q(float(e1), float(e2))
    assert q_lt == pytest.approx(q, rel=1e-12)
    assert phi_lt == pytest.approx(phi, rel=1e-12)
    q2, phi2 = ellipticity_to_q_phi(e1, e2)
    assert float(q2) == pytest.approx(q) and float(phi2) == pytest.approx(phi)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_sie_shear_deflection_matches_lenstronomy(dtype, tol):
    rng = np.random.default_rng(42)
    model = lt_lens.LensModel(["SIE", "SHEAR"])
    xs = rng.uniform(-6, 6, 400)
    ys = rng.uniform(-6, 6, 400)
    lenses = _random_lenses(rng, 25)
    # batched: all 25 lenses at once on the same points
    x = torch.tensor(xs, dtype=dtype).view(1, 20, 20)
    y = torch.tensor(ys, dtype=dtype).view(1, 20, 20)

    def col(k):
        return torch.tensor([p[k] for p in lenses], dtype=dtype)

    ax, ay = sie_deflection(x, y, col("theta_e"), col("q"), col("phi"), col("cx"), col("cy"))
    sx, sy = shear_deflection(x, y, col("g1"), col("g2"), center_x=col("cx"), center_y=col("cy"))
    for i, p in enumerate(lenses):
        rx, ry = model.alpha(xs, ys, _lt_kwargs(p))
        mine_x = (ax[i] + sx[i]).reshape(-1).double().numpy()
        mine_y = (ay[i] + sy[i]).reshape(-1).double().numpy()
        norm = np.hypot(rx, ry)
        err = np.hypot(mine_x - rx, mine_y - ry) / norm
        assert err.max() < tol, (i, p, err.max())


def test_sie_round_lens_is_sis():
    x, y = pixel_grid(9, 0.5, dtype=F64)
    ax, ay = sie_deflection(x, y, 1.3, 1.0, 0.3)
    r = torch.hypot(x, y)
    ok = r > 0
    assert torch.allclose(ax[ok], 1.3 * x[ok] / r[ok], rtol=1e-7)
    assert torch.allclose(ay[ok], 1.3 * y[ok] / r[ok], rtol=1e-7)
    assert torch.isfinite(ax).all() and torch.isfinite(ay).all()


def test_lensed_surface_brightness_matches_lenstronomy_at_points():
    rng = np.random.default_rng(7)
    lens_model = lt_lens.LensModel(["SIE", "SHEAR"])
    light = lt_light.LightModel(["SERSIC_ELLIPSE"])
    xs = rng.uniform(-4, 4, 2500)
    ys = rng.uniform(-4, 4, 2500)
    for p in _random_lenses(rng, 8):
        sq, sphi = rng.uniform(0.4, 1.0), rng.uniform(0, math.pi)
        src = {"r": rng.uniform(0.05, 0.5), "n": rng.uniform(0.5, 4.0), "x": 0.3, "y": -0.2}
        se1, se2 = (float(v) for v in q_phi_to_ellipticity(torch.tensor(sq, dtype=F64), sphi))
        bx_lt, by_lt = lens_model.ray_shooting(xs, ys, _lt_kwargs(p))
        kw = {"amp": 3.0, "R_sersic": src["r"], "n_sersic": src["n"], "e1": se1, "e2": se2}
        ref = light.surface_brightness(bx_lt, by_lt, [{**kw, "center_x": 0.3, "center_y": -0.2}])
        x = torch.tensor(xs, dtype=F64).view(50, 50)
        y = torch.tensor(ys, dtype=F64).view(50, 50)
        bx, by = ray_shoot(
            x, y, theta_e=p["theta_e"], q=p["q"], phi=p["phi"], center_x=p["cx"],
            center_y=p["cy"], gamma1=p["g1"], gamma2=p["g2"],
        )  # fmt: skip
        mine = sersic_profile(bx, by, 3.0, src["r"], src["n"], sq, sphi, 0.3, -0.2)
        mine = mine.reshape(-1).numpy()
        assert np.abs(mine - ref).max() / ref.max() < 1e-7
        bright = ref > 1e-3 * ref.max()
        assert (np.abs(mine - ref)[bright] / ref[bright]).max() < 1e-6


def _lt_image(size, pix, ss, kwargs_lens, kwargs_source, kwargs_lens_light, kernel=None):
    from lenstronomy.Data.pixel_grid import PixelGrid
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel

    c = size // 2
    grid = PixelGrid(
        nx=size, ny=size, transform_pix2angle=np.eye(2) * pix,
        ra_at_xy_0=-c * pix, dec_at_xy_0=-c * pix,
    )  # fmt: skip
    psf = (
        PSF(psf_type="NONE")
        if kernel is None
        else PSF(psf_type="PIXEL", kernel_point_source=kernel)
    )
    model = ImageModel(
        grid, psf,
        lens_model_class=lt_lens.LensModel(["SIE", "SHEAR"]),
        # a clumpy source: the smooth Sersic, then one Gaussian per clump
        source_model_class=lt_light.LightModel(
            ["SERSIC_ELLIPSE"] + ["GAUSSIAN"] * (len(kwargs_source) - 1)
        ),
        lens_light_model_class=lt_light.LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": ss, "supersampling_convolution": False},
    )  # fmt: skip
    return model.image(
        kwargs_lens=kwargs_lens, kwargs_source=kwargs_source, kwargs_lens_light=kwargs_lens_light
    )


def _lt_clumps(params: dict[str, torch.Tensor], i: int, band: str, zp: float) -> list[dict]:
    """lenstronomy GAUSSIAN kwargs (amp = total flux) of system ``i``'s clumps in ``band``."""
    total = 10 ** (-0.4 * (float(params[f"source_mag_{band}"][i]) - zp))
    clumps = min(10 ** (-0.4 * (float(params[f"source_clump_mag_{band}"][i]) - zp)), 0.9 * total)
    out = []
    for j in range(5):
        w = float(params[f"source_clump{j}_weight"][i])
        if w > 0:
            cx = params["source_x_arcsec"][i] + params[f"source_clump{j}_dx_arcsec"][i]
            cy = params["source_y_arcsec"][i] + params[f"source_clump{j}_dy_arcsec"][i]
            sigma = float(params[f"source_clump{j}_sigma_arcsec"][i])
            out.append({"amp": w * clumps, "sigma": sigma, "center_x": float(cx),
                        "center_y": float(cy)})  # fmt: skip
    return out


# lenstronomy's pixel-PSF convolution calls numpy FFTs in a deprecated way (its code, not ours).
@pytest.mark.filterwarnings("ignore:`axes` should not be `None`:DeprecationWarning")
@pytest.mark.parametrize("with_psf", [False, True])
def test_rendered_stamps_match_lenstronomy_image_model(with_psf):
    """Noiseless lens + lensed clumpy source vs lenstronomy's ImageModel, same supersampling."""
    preset = get_survey_preset("des")
    size, ss = 40, 3
    gen = torch.Generator().manual_seed(3)
    pop = LensPopulation(clumpy_fraction=1.0)
    params = sample_lens_systems(pop, 3, generator=gen, dtype=F64)
    params["companion_present"] = torch.zeros(3, dtype=F64)
    images = render_systems(
        params, preset, size, bands=["g", "i"], noise=False, psf=with_psf,
        supersample=ss, dtype=F64,
    )  # fmt: skip
    kernels = psf_kernel(preset, ["g", "i"], dtype=F64) if with_psf else None
    zp, pix = preset.zero_point, preset.pixel_scale_arcsec
    for i in range(3):

        def f(k, i=i):
            return float(params[k][i])

        kl = _lt_kwargs(
            {"theta_e": f("theta_e_arcsec"), "q": f("lens_q"), "phi": f("lens_phi_rad"),
             "cx": f("lens_center_x_arcsec"), "cy": f("lens_center_y_arcsec"),
             "g1": f("gamma1"), "g2": f("gamma2")}
        )  # fmt: skip
        for j, band in enumerate(["g", "i"]):
            light = {}
            for prefix, qk, pk, cxk, cyk in (
                ("source", "source_q", "source_phi_rad", "source_x_arcsec", "source_y_arcsec"),
                ("lens", "lens_light_q", "lens_light_phi_rad", "lens_center_x_arcsec",
                 "lens_center_y_arcsec"),
            ):  # fmt: skip
                e1, e2 = (float(v) for v in q_phi_to_ellipticity(params[qk][i], params[pk][i]))
                r, n = f(f"{prefix}_r_eff_arcsec"), f(f"{prefix}_n_sersic")
                flux = 10 ** (-0.4 * (f(f"{prefix}_mag_{band}") - zp))
                unit = lt_light.LightModel(["SERSIC_ELLIPSE"]).total_flux(
                    [{"amp": 1.0, "R_sersic": r, "n_sersic": n, "e1": e1, "e2": e2}]
                )[0]
                clumps = _lt_clumps(params, i, band, zp) if prefix == "source" else []
                smooth = flux - sum(c["amp"] for c in clumps)
                light[prefix] = [
                    {"amp": smooth / unit, "R_sersic": r, "n_sersic": n, "e1": e1, "e2": e2,
                     "center_x": f(cxk), "center_y": f(cyk)},
                    *clumps,
                ]  # fmt: skip
            assert len(light["source"]) > 1
            kernel = kernels[j].numpy() if with_psf else None
            ref = _lt_image(size, pix, ss, kl, light["source"], light["lens"], kernel)
            mine = images[i, j].numpy()
            assert np.abs(mine - ref).max() / np.abs(ref).max() < 1e-6, (i, band)


def test_sersic_total_flux_is_the_profile_integral():
    from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

    for n in (0.5, 1.0, 2.5, 4.0, 6.0):
        r_eff, amp = 0.7, 2.0

        def integrand(r, n=n, r_eff=r_eff, amp=amp):
            b = 1.9992 * n - 0.3271
            return 2 * math.pi * r * amp * math.exp(-b * ((r / r_eff) ** (1 / n) - 1))

        ref = sum(integrate.quad(integrand, a, b, limit=200)[0] for a, b in
                  ((0, r_eff), (r_eff, 10 * r_eff), (10 * r_eff, 1e4 * r_eff)))  # fmt: skip
        mine = float(sersic_total_flux(torch.tensor(amp, dtype=F64), r_eff, n))
        assert mine == pytest.approx(ref, rel=1e-6)
        assert mine == pytest.approx(SersicElliptic().total_flux(amp, r_eff, n), rel=1e-10)


@pytest.mark.parametrize("n_sersic,r_eff", [(1.0, 1.0), (4.0, 1.5)])
def test_rendered_sersic_counts_match_magnitude(n_sersic, r_eff):
    """A rendered (noiseless, no PSF) galaxy holds 10^(-0.4 (m - ZP)) counts to < 1 %."""
    preset = get_survey_preset("des")
    mag = 19.0
    size = 501 if n_sersic > 2 else 201
    params = sample_lens_systems(None, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    params.pop("companion_present")
    params.update(
        lens_r_eff_arcsec=torch.tensor([r_eff], dtype=F64),
        lens_n_sersic=torch.tensor([n_sersic], dtype=F64),
        lens_light_q=torch.tensor([0.7], dtype=F64),
        lens_mag_i=torch.tensor([mag], dtype=F64),
    )
    img = render_systems(
        params, preset, size, bands=["i"], with_source=False, noise=False, psf=False,
        supersample=5, dtype=F64,
    )  # fmt: skip
    expected = 10 ** (-0.4 * (mag - preset.zero_point))
    assert float(img.sum()) == pytest.approx(expected, rel=0.01)


def _fwhm_from_area(kernel: torch.Tensor, pix: float) -> float:
    above = (kernel >= 0.5 * kernel.max()).sum().item()
    return 2 * math.sqrt(above / math.pi) * pix


@pytest.mark.parametrize("model", ["gaussian", "moffat"])
def test_psf_kernels_normalised_with_right_fwhm(model):
    pix = 0.01  # fine pixels: the area above half maximum measures the FWHM directly
    kern = psf_kernel_from_fwhm([0.9, 1.2], pix, model=model, oversample=1, radius_fwhm=2.0)
    assert kern.shape[0] == 2 and kern.shape[1] % 2 == 1
    assert torch.allclose(kern.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    for k, fwhm in zip(kern, (0.9, 1.2), strict=True):
        assert _fwhm_from_area(k, pix) == pytest.approx(fwhm, rel=0.01)
        # centred and symmetric
        c = k.shape[0] // 2
        assert int(k.argmax()) == c * k.shape[1] + c
        assert torch.allclose(k, k.flip(0)) and torch.allclose(k, k.T)


def test_preset_psf_kernels_per_band():
    preset = get_survey_preset("des")
    kern = psf_kernel(preset, ["g", "r", "i"])
    assert kern.shape[0] == 3 and kern.shape[-1] % 2 == 1
    assert torch.allclose(kern.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    # worse seeing -> lower peak: g (1.11") < r (0.95") < i (0.88")
    peaks = kern.amax(dim=(1, 2))
    assert peaks[0] < peaks[1] < peaks[2]


def test_convolve_delta_and_flux():
    kern = psf_kernel_from_fwhm([1.0, 2.0], 0.263, model="gaussian")
    img = torch.zeros(2, 2, 96, 96)
    img[:, :, 48, 40] = 100.0
    out = convolve(img, kern)
    k = kern.shape[-1] // 2
    assert torch.allclose(
        out[0, 1, 48 - k : 48 + k + 1, 40 - k : 40 + k + 1], 100 * kern[1], atol=1e-4
    )
    assert torch.allclose(out.sum(dim=(2, 3)), torch.full((2, 2), 100.0), rtol=1e-5)
    # per-system kernels
    out2 = convolve(img, kern.unsqueeze(0).expand(2, -1, -1, -1))
    assert torch.allclose(out, out2, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        convolve(img, torch.ones(2, 4, 4))


def test_pixel_grid_centre_and_supersampling():
    x, y = pixel_grid(10, 0.2)
    assert x[0, 5] == 0 and y[5, 0] == 0 and x[0, 6] == pytest.approx(0.2)
    xs, ys = pixel_grid(10, 0.2, 3)
    assert xs.shape == (30, 30)
    assert torch.allclose(downsample(xs, 3), x, atol=1e-6)
    assert torch.allclose(downsample(ys, 3), y, atol=1e-6)


def test_noise_mean_and_variance():
    gen = torch.Generator().manual_seed(11)
    signal = torch.zeros(4, 2, 64, 64)
    signal[:, 1] = 300.0
    sky, gain, rn = torch.tensor([500.0, 100.0]), torch.tensor([20.0, 5.0]), 3.0
    out = add_noise(
        signal, sky_counts=sky, gain_e_per_count=gain, read_noise_counts=rn, generator=gen
    )
    expect_var = (torch.tensor([500.0, 400.0]) / gain) + rn**2
    var = out.var(dim=(0, 2, 3))
    assert torch.allclose(var, expect_var, rtol=0.04)
    mean = out.mean(dim=(0, 2, 3))
    sem = torch.sqrt(expect_var / (4 * 64 * 64))
    assert (mean - torch.tensor([0.0, 300.0])).abs().max() < 5 * sem.max()
    # reproducible with the same seed, different with another
    again = add_noise(signal, sky_counts=sky, gain_e_per_count=gain, read_noise_counts=rn,
                      generator=torch.Generator().manual_seed(11))  # fmt: skip
    assert torch.equal(out, again)


def test_noise_exact_poisson_at_low_counts():
    """Faint arcs on zero sky (kind 2) get exact Poisson noise: integer electrons, var = mean."""
    gen = torch.Generator().manual_seed(12)
    signal = torch.full((2, 1, 64, 64), 0.5)  # 0.5 counts * gain 4 = 2 electrons per pixel
    out = add_noise(signal, sky_counts=0.0, gain_e_per_count=4.0, generator=gen)
    electrons = out * 4.0
    assert torch.equal(electrons, electrons.round())  # Poisson draws, not Gaussian
    assert float(electrons.mean()) == pytest.approx(2.0, rel=0.05)
    assert float(electrons.var()) == pytest.approx(2.0, rel=0.08)
    assert (out >= 0).all()


def test_rendered_sky_noise_matches_preset_depth():
    """Background noise of rendered stamps equals the preset's, and the depth gives S/N 10."""
    preset = get_survey_preset("des")
    params = sample_lens_systems(None, 8, generator=torch.Generator().manual_seed(1))
    params["lens_mag_g"] = torch.full((8,), 35.0)  # effectively no light
    params["lens_mag_i"] = torch.full((8,), 35.0)
    params["companion_present"] = torch.zeros(8)
    img = render_systems(
        params, preset, 48, bands=["g", "i"], with_source=False,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    std = img.std(dim=(0, 2, 3))
    assert std[0] == pytest.approx(preset.pixel_noise_sigma("g"), rel=0.03)
    assert std[1] == pytest.approx(preset.pixel_noise_sigma("i"), rel=0.03)
    # point source at the 10-sigma depth in the 1.95" aperture: S/N = 10
    for band in preset.bands:
        flux = 10 ** (-0.4 * (preset.depth_mag_10sigma[band] - preset.zero_point))
        area = math.pi * (1.95 / 2) ** 2 / preset.pixel_scale_arcsec**2
        noise = math.sqrt(area * preset.pixel_noise_sigma(band) ** 2 + flux / preset.gain(band))
        assert flux / noise == pytest.approx(10.0, rel=1e-9)


def test_des_preset_values_and_lookup():
    des = get_survey_preset("DES")
    assert des.pixel_scale_arcsec == 0.263 and des.zero_point == 30.0
    assert des.bands == ("g", "r", "i", "z", "y") and des.default_bands == ("g", "r", "i")
    assert des.seeing_fwhm_arcsec["i"] == 0.88 and des.depth_mag_10sigma["g"] == 24.7
    assert "des" in list_survey_presets()
    with pytest.raises(ValueError, match="known presets: .*des"):
        get_survey_preset("hsc-wide")
    with pytest.raises(ValueError, match="unknown band 'u'.*g, r, i"):
        des.check_bands(["g", "u"])
    assert gain_for_depth(
        depth_mag_10sigma=24.7, sky_mag_per_arcsec2=22.0, zero_point=30.0,
        pixel_scale_arcsec=0.263, aperture_diameter_arcsec=1.95,
    ) == pytest.approx(des.gain("g"))  # fmt: skip
    with pytest.raises(ValueError, match="read_noise_counts"):
        des.replace(read_noise_counts=100.0)
    with pytest.raises(ValueError, match="seeing_fwhm_arcsec lacks"):
        SurveyPreset(
            name="x", pixel_scale_arcsec=0.2, bands=("g", "r"), zero_point=27.0,
            seeing_fwhm_arcsec={"g": 1.0}, sky_mag_per_arcsec2={"g": 22, "r": 21},
            depth_mag_10sigma={"g": 24, "r": 24},
        )  # fmt: skip


def test_bad_parameters_raise_naming_the_parameter():
    x, y = pixel_grid(8, 0.263)
    with pytest.raises(ValueError, match="theta_e"):
        sie_deflection(x, y, torch.tensor([1.0, -0.5]), 0.8, 0.0)
    with pytest.raises(ValueError, match="q must be <= 1"):
        sie_deflection(x, y, 1.0, 1.2, 0.0)
    with pytest.raises(ValueError, match="q must be > 0"):
        sersic_profile(x, y, 1.0, 0.5, 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="theta_e contains non-finite"):
        sie_deflection(x, y, float("nan"), 0.8, 0.0)
    with pytest.raises(ValueError, match="fwhm_arcsec"):
        psf_kernel_from_fwhm([-1.0], 0.263)

    preset = get_survey_preset("des")
    base = sample_lens_systems(None, 4, generator=torch.Generator().manual_seed(0))
    bad = dict(base, theta_e_arcsec=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="'theta_e_arcsec' must be > 0"):
        render_systems(bad, preset, 16)
    bad = dict(base, source_q=torch.tensor([0.5, 1.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="'source_q'.*\\(0, 1\\]"):
        render_systems(bad, preset, 16)
    bad = dict(base, lens_mag_r=torch.tensor([20.0, float("inf"), 20.0, 20.0]))
    with pytest.raises(ValueError, match="'lens_mag_r' contains non-finite"):
        render_systems(bad, preset, 16)
    with pytest.raises(ValueError, match="unknown band 'u'"):
        render_systems(base, preset, 16, bands=["u"])
    with pytest.raises(ValueError, match="lack 'source_mag_g'"):
        render_systems({k: v for k, v in base.items() if k != "source_mag_g"}, preset, 16)
    with pytest.raises(ValueError, match="theta_e_arcsec must be > 0"):
        LensPopulation(theta_e_arcsec=(-1.0, 2.0))
    with pytest.raises(ValueError, match="lens_q must be <= 1"):
        LensPopulation(lens_q=(0.5, 1.5))
    with pytest.raises(ValueError, match="low <= high"):
        LensPopulation(source_mag_i=(24.0, 21.0))


def test_render_info_snr_and_magnification():
    preset = get_survey_preset("des")
    params = sample_lens_systems(None, 6, generator=torch.Generator().manual_seed(5))
    img, info = render_systems(params, preset, 64, noise=False, return_info=True)
    assert img.shape == (6, 3, 64, 64) and (img >= 0).all()
    assert info.source_snr.shape == (6, 3) and (info.source_snr > 0).all()
    assert (info.magnification > 1).all()  # strongly lensed sources are magnified
    # a source ten times fainter (2.5 mag) has a lower S/N (not 10x: the lens dominates var)
    faint = dict(params, **{f"source_mag_{b}": params[f"source_mag_{b}"] + 2.5 for b in "gri"})
    _, info_f = render_systems(faint, preset, 64, noise=False, return_info=True)
    assert (info_f.source_snr_total < info.source_snr_total / 3).all()
    # lensed magnitude = intrinsic - 2.5 log10(magnification) up to the PSF's loss at the edge
    expect = params["source_mag_i"] - 2.5 * torch.log10(info.magnification)
    assert torch.allclose(info.lensed_source_mag[:, 2], expect, atol=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_render_matches_cpu():
    preset = get_survey_preset("des")
    params = sample_lens_systems(None, 4, generator=torch.Generator().manual_seed(9))
    cpu = render_systems(params, preset, 48, noise=False)
    gpu = render_systems({k: v.cuda() for k, v in params.items()}, preset, 48, noise=False)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    noisy = render_systems({k: v.cuda() for k, v in params.items()}, preset, 48, generator=gen)
    assert torch.isfinite(noisy).all()


def _one_clumpy_source(theta_e: float, beta: float) -> dict[str, torch.Tensor]:
    """One round SIS (no shear) with a compact clumpy source at ``beta`` arcsec along x."""
    pop = LensPopulation(clumpy_fraction=1.0, n_clumps=(3, 3), clump_flux_fraction_i=(0.4, 0.4))
    params = sample_lens_systems(pop, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    one = {"theta_e_arcsec": theta_e, "lens_q": 1.0, "gamma1": 0.0, "gamma2": 0.0,
           "lens_center_x_arcsec": 0.0, "lens_center_y_arcsec": 0.0, "source_x_arcsec": beta,
           "source_y_arcsec": 0.0, "source_r_eff_arcsec": 0.05, "source_n_sersic": 1.0}  # fmt: skip
    for j, (dx, sigma) in enumerate(((0.12, 0.04), (-0.1, 0.05), (0.0, 0.06))):
        one |= {f"source_clump{j}_dx_arcsec": dx, f"source_clump{j}_dy_arcsec": 0.0,
                f"source_clump{j}_sigma_arcsec": sigma}  # fmt: skip
    params.update({k: torch.tensor([v], dtype=F64) for k, v in one.items()})
    return params


def _clump_counts(params: dict[str, torch.Tensor], band: str, zp: float) -> tuple[float, float]:
    """(smooth, clump) unlensed counts of the source in ``band``."""
    total = 10 ** (-0.4 * (float(params[f"source_mag_{band}"]) - zp))
    clumps = min(10 ** (-0.4 * (float(params[f"source_clump_mag_{band}"]) - zp)), 0.9 * total)
    return total - clumps, clumps


def test_clumpy_source_conserves_flux_and_is_magnified_through_the_lens():
    """Clumps carry their share of the source's light, bluer, through the same ray-shooting.

    Without a lens (theta_E -> 0) the stamp holds exactly the source's counts in each band;
    through a singular isothermal sphere each compact component at distance beta_j from the
    lens is magnified 2 theta_E / beta_j (point-source limit), clumps included.
    """
    preset = get_survey_preset("des")
    zp = preset.zero_point
    render = {"with_lens": False, "noise": False, "psf": False, "supersample": 15,
              "dtype": F64, "return_info": True}  # fmt: skip
    free = _one_clumpy_source(1e-4, 0.6)
    img, info = render_systems(free, preset, 64, **render)
    smooth_only = render_systems({k: v for k, v in free.items() if "clump" not in k},
                                 preset, 64, **render)[0]  # fmt: skip
    for bi, band in enumerate("gri"):
        expected = 10 ** (-0.4 * (float(free[f"source_mag_{band}"]) - zp))
        # (the compact smooth part's cusp, 0.05" r_eff, is what limits the pixel sums)
        assert float(img[0, bi].sum()) == pytest.approx(expected, rel=5e-3), band
        assert float(smooth_only[0, bi].sum()) == pytest.approx(expected, rel=5e-3), band
    assert float(info.magnification[0]) == pytest.approx(1.0, abs=5e-3)
    # the clumps hold 40 % of the i light and more of the g light (bluer), off the centre
    shares = [_clump_counts(free, b, zp) for b in "gri"]
    assert shares[0][1] / sum(shares[0]) > shares[2][1] / sum(shares[2]) == pytest.approx(0.4)
    assert float((img - smooth_only).abs().max()) > 0.1 * float(img.max())

    theta_e, beta = 1.5, 0.6
    lensed = _one_clumpy_source(theta_e, beta)
    img, info = render_systems(lensed, preset, 64, **render)
    dx = [float(lensed[f"source_clump{j}_dx_arcsec"]) for j in range(3)]
    weight = [float(lensed[f"source_clump{j}_weight"]) for j in range(3)]
    for bi, band in enumerate("gri"):
        smooth, clumps = _clump_counts(lensed, band, zp)
        expected = 2 * theta_e / beta * smooth + sum(
            w * clumps * 2 * theta_e / abs(beta + d) for w, d in zip(weight, dx, strict=True)
        )
        assert float(img[0, bi].sum()) == pytest.approx(expected, rel=0.02), band
    total = sum(sum(_clump_counts(lensed, b, zp)) for b in "gri")
    assert float(info.magnification[0]) == pytest.approx(float(img.sum()) / total, rel=1e-6)


def test_seeing_factor_changes_the_measured_psf_fwhm():
    """render_systems(seeing_factor=...) widens the PSF by that factor, band by band."""
    preset = get_survey_preset("des")
    params = sample_lens_systems(LensPopulation(companion_probability=0.0), 3,
                                 generator=torch.Generator().manual_seed(2), dtype=F64)  # fmt: skip
    params |= {"lens_r_eff_arcsec": torch.full((3,), 0.01, dtype=F64),
               "lens_n_sersic": torch.ones(3, dtype=F64),
               "lens_center_x_arcsec": torch.zeros(3, dtype=F64),
               "lens_center_y_arcsec": torch.zeros(3, dtype=F64)}  # fmt: skip
    factor = torch.tensor([[0.85, 0.85, 0.85], [1.35, 1.35, 1.35], [1.0, 1.2, 0.9]], dtype=F64)
    img = render_systems(params, preset, 63, with_source=False, noise=False, supersample=5,
                         seeing_factor=factor, dtype=F64)  # fmt: skip
    nominal = render_systems(params, preset, 63, with_source=False, noise=False, supersample=5,
                             dtype=F64)  # fmt: skip
    pix = preset.pixel_scale_arcsec

    def measured_fwhm(stamp: torch.Tensor) -> float:
        # a point source: the half-maximum area of the (bicubic 8x upsampled) image is the
        # PSF's, broadened by the pixel
        fine = torch.nn.functional.interpolate(stamp[None, None], scale_factor=8, mode="bicubic")
        return _fwhm_from_area(fine[0, 0], pix / 8)

    for i in range(3):
        for bi, band in enumerate("gri"):
            fwhm = measured_fwhm(img[i, bi])
            assert fwhm == pytest.approx(float(factor[i, bi]) * preset.seeing_for(band), rel=0.08)
            assert float(img[i, bi].sum()) == pytest.approx(float(nominal[i, bi].sum()), rel=1e-3)
    wide, narrow = measured_fwhm(img[1, 2]), measured_fwhm(img[0, 2])
    assert wide / narrow == pytest.approx(1.35 / 0.85, rel=0.1)
    with pytest.raises(ValueError, match="seeing_factor"):
        render_systems(params, preset, 63, seeing_factor=torch.ones(2))
