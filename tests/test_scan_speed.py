"""Speed never changes a score: the optimised tile task equals a plain per-tile loop.

The optimised path (position-ordered blocks, a prefetch thread reading and normalising block
k + 1 during forward k, the selection-based NaN median) must give the scores of the plainest
possible loop over the same stamps: read every selected stamp of the tile at once, mask,
normalise with ``torch.nanmedian`` and score in one call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lenscan.models import load_model
from lenscan.select import ColourCut, colour_cut_mask
from lenscan.simulate import make_survey
from lenscan.stamps import _asinh_inplace, _median_and_sigma_cpu, mask_stamps, normalise_stamps
from lenscan.survey import open_survey, read_stamps
from lenscan.sweep import worker
from lenscan.sweep.worker import ModelPayload, TileJob, part_url, score_tile
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(120)

#: Every galaxy with a measured r magnitude: many sources, so a tile spans several blocks.
ALL_GALAXIES = ColourCut(name="all", mag_max={"r": 99.0})


def plain_normalise(stamps: torch.Tensor, softening: float) -> torch.Tensor:
    """The reference normalisation, written with ``torch.nanmedian`` (sorts every row)."""
    n, b = stamps.shape[:2]
    flat = stamps.reshape(n, b, -1)
    med = torch.nanmedian(flat, dim=-1, keepdim=True).values
    mad = torch.nanmedian((flat - med).abs(), dim=-1, keepdim=True).values
    sigma = 1.4826 * mad
    sigma = torch.where(torch.isfinite(sigma) & (sigma > 0), sigma, torch.ones_like(sigma))
    z = (flat - torch.nan_to_num(med, nan=0.0)) / sigma
    out = torch.asinh(z / softening)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).reshape(stamps.shape)


def test_fast_asinh_matches_float64_over_the_float32_range():
    """The normalisation's stretch: 1.6e-7 relative at |asinh| >= 1, 1.5e-7 absolute below."""
    pos = np.concatenate([np.geomspace(1e-30, 3e38, 100_001), np.linspace(0, 12, 100_001)]).astype(
        np.float32
    )
    x = np.concatenate([pos, -pos, np.float32([np.inf, -np.inf, np.nan, -0.0])])
    got = x.copy()
    _asinh_inplace(got)
    want = np.arcsinh(x.astype(np.float64))
    fin = np.isfinite(x)
    big = np.abs(want) >= 1
    np.testing.assert_allclose(got[fin & big], want[fin & big], rtol=1.7e-7, atol=0)
    np.testing.assert_allclose(got[fin & ~big], want[fin & ~big], rtol=0, atol=1.6e-7)
    assert got[-4] == np.inf and got[-3] == -np.inf and np.isnan(got[-2])
    assert got[-1] == 0 and np.signbit(got[-1])


def test_fast_normalisation_equals_nanmedian_exactly():
    """The statistics are bit-identical to ``torch.nanmedian``'s; the stretch agrees with
    ``torch.asinh`` to 3e-7 (each is within ~1.6e-7 of the exact value)."""
    rng = np.random.default_rng(3)
    stamps = rng.normal(100.0, 10.0, size=(40, 3, 33, 32)).astype(np.float32)
    stamps[:6, :, :10] = np.nan  # edge stamps
    stamps[7, 1] = np.nan  # a band with no data
    stamps[8, 2] = 5.0  # a flat band
    stamps[9, 0, 3, 4] = np.nan  # one masked pixel
    flat = torch.from_numpy(stamps).reshape(40, 3, -1)
    med, sigma = _median_and_sigma_cpu(flat)
    want_med = torch.nanmedian(flat, dim=-1, keepdim=True).values
    want_mad = torch.nanmedian((flat - want_med).abs(), dim=-1, keepdim=True).values
    assert torch.allclose(med, want_med, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(sigma, 1.4826 * want_mad, rtol=0, atol=0, equal_nan=True)
    got = normalise_stamps(stamps, {"method": "asinh_mad", "softening_sigma": 3.0})
    want = plain_normalise(torch.from_numpy(stamps), 3.0)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=3e-7, atol=3e-7)
    assert (got[:6, :, :10] == 0).all() and (got[7, 1] == 0).all() and (got[8, 2] == 0).all()


@pytest.fixture(scope="module")
def dense_survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("survey") / "survey.zarr")
    make_survey(url, n_tiles=1, seed=5, tile_size_pix=512, lenses_per_tile=6)
    return url


@pytest.mark.parametrize(
    ("precision", "atol", "readers"), [("fp32", 1e-6, 1), ("fp32", 1e-6, 3), ("bf16", 2e-2, 1)]
)
def test_pipelined_tile_task_equals_a_plain_loop(
    dense_survey, tmp_path, monkeypatch, precision, atol, readers
):
    """fp32: equal to float rounding, with one reader thread (CPU workers) or several (the GPU
    worker's); bf16 (opt-in autocast): within bf16 rounding."""
    model_ref = make_tiny_model(tmp_path / "tiny")
    model = load_model(model_ref)
    payload = ModelPayload.from_model(model_ref)
    tile_id = open_survey(dense_survey).tile_ids[0]
    job = TileJob(
        survey_url=dense_survey,
        storage_options={},
        cut=ALL_GALAXIES,
        payload_sha256=payload.sha256,
        device="cpu",
        batch_size=8,
        scored_url=str(tmp_path / "scored"),
        out_storage_options={},
        run_token="t",
        reduce_floor=0.0,
        overlap_margin_arcsec=60.0,
        precision=precision,
    )
    monkeypatch.setattr(worker, "MIN_BLOCK", 16)  # several pipelined blocks in one small tile
    monkeypatch.setattr(worker, "_reader_threads", lambda device: readers)
    result = score_tile(tile_id, job, payload)
    part = pq.read_table(part_url(job.scored_url, tile_id)).to_pydict()

    tile = open_survey(dense_survey).tile(tile_id)
    cat = tile.catalog()
    sel = np.flatnonzero(colour_cut_mask(cat, ALL_GALAXIES))
    assert sel.size > 3 * 16, "the tile must span several blocks"
    x, y = (np.asarray(v) for v in tile.wcs.world_to_pixel_values(cat["ra"][sel], cat["dec"][sel]))
    meta = model.meta
    stamps, _ = read_stamps(tile, x, y, meta.stamp_size_pix, bands=meta.bands)
    plane = "mask" if tile.mask is not None else "weight" if tile.weight is not None else None
    if plane is not None:
        aux, _ = read_stamps(tile, x, y, meta.stamp_size_pix, array=plane, bands=meta.bands)
        stamps, _ = mask_stamps(stamps, **{plane: aux})
    keep = np.isfinite(stamps).any(axis=(1, 2, 3))
    normalised = plain_normalise(
        torch.from_numpy(stamps[keep]), meta.normalisation["softening_sigma"]
    )
    want = model.score(normalised, batch_size=len(normalised)).numpy().mean(axis=1)

    assert part["id"] == cat["id"][sel][keep].tolist(), "rows must come back in catalogue order"
    assert result.n_scored == int(keep.sum())
    np.testing.assert_allclose(part["score"], want, rtol=0, atol=atol)
    fast = worker.worker_model(payload, "cpu", precision=precision)
    if precision == "fp32":  # the optimised form really scored: no batch norm left
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.members[0].modules())
    else:
        assert np.abs(np.asarray(part["score"]) - want).max() > 0, "bf16 must round somewhere"


@pytest.mark.parametrize("architecture", ["bundled", "resnet-small"])
def test_inference_model_scores_as_the_plain_model(tmp_path, architecture):
    """Folded batch norm + channels-last: the plain model's scores, any batch, dihedral too."""
    from lenscan.models import DEFAULT_MODEL, build_members
    from lenscan.models.inference import inference_model

    model = load_model(DEFAULT_MODEL)
    if architecture != "bundled":
        meta = model.meta.__class__.from_dict(
            {**model.meta.to_dict(), "architecture": architecture, "arch_kwargs": {}}
        )
        torch.manual_seed(0)
        members = build_members(meta)
        for m in members:  # non-trivial running statistics, so folding has something to do
            m.train()
            with torch.no_grad():
                m(torch.randn(64, 3, 48, 48) * 2 + 0.5)
        model = type(model)(meta, members, sha256="0" * 64, path=None)
    rng = np.random.default_rng(4)
    raw = rng.normal(100.0, 10.0, size=(37, 3, 48, 48)).astype(np.float32)
    raw[:5, :, :12] = np.nan
    x = model.normalise(raw)
    fast = inference_model(model)
    fast_x = x.contiguous(memory_format=torch.channels_last)
    for dihedral in (False, True):
        want = model.score(x, batch_size=16, dihedral=dihedral).numpy()
        got = fast.score(fast_x, batch_size=16, dihedral=dihedral).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert model.members[0] is not fast.members[0], "the plain model must stay untouched"
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.members[0].modules())
    plain = model.score(x).numpy()
    bf16 = inference_model(model, precision="bf16").score(fast_x).numpy()
    assert np.abs(bf16 - plain).max() > 0, "bf16 autocast must really run"
    np.testing.assert_allclose(bf16, plain, rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_model(model, precision="fp16")


def test_prefetched_keeps_order_and_raises_at_the_failing_item():
    def prepare(k):
        if k == 5:
            raise KeyError("item 5")
        time.sleep(0.01 * (k % 3 == 0))  # later items may finish first
        return k * 10

    got = []
    with pytest.raises(KeyError, match="item 5"):
        for value in worker._prefetched(list(range(8)), prepare, depth=3):
            got.append(value)
    assert got == [0, 10, 20, 30, 40]


_FAULTS = """
import resource, sys
import numpy as np
from lenscan.sweep.worker import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# 1 MiB: over glibc's 128 KiB mmap threshold, under a 2 MiB huge page (so the count of page
# faults does not depend on transparent huge pages).
np.ones(1 << 18, np.float32)
before = faults()
for _ in range(40):
    np.ones(1 << 18, np.float32)
print(faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_workers_reuse_freed_memory_despite_the_nannys_trim_threshold():
    """Under Dask's MALLOC_TRIM_THRESHOLD_=65536 each 1 MiB array is a fresh mmap whose 256
    pages fault in again every time (~10,000 faults for 40); after keep_freed_memory() the heap
    reuses it (0)."""
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, check=True,
                             capture_output=True, text=True)  # fmt: skip
        return int(run.stdout.split()[-1])

    assert faults("plain") > 40 * 100
    assert faults("keep") < 500
