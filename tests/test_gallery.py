"""The inspection gallery, opened in a real headless browser (Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from lenscan.gallery import _rgb_bands, rgb_composite
from lenscan.scan import scan
from lenscan.simulate import make_survey
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_rgb_composite_and_band_choice():
    stamp = np.zeros((3, 8, 8), np.float32)
    stamp[0, 4, 4] = 100.0  # a red point
    rgb = rgb_composite(stamp)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[4, 4, 0] > rgb[4, 4, 2]
    assert _rgb_bands(("g", "r", "i", "z")) == ["i", "r", "g"]
    with pytest.raises(ValueError, match="3, y, x"):
        rgb_composite(np.zeros((2, 4, 4)))


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium; .ci/run installs it (Debian)")
def test_gallery_renders_in_a_browser(tmp_path, cluster_client):
    survey = str(tmp_path / "survey.zarr")
    make_survey(survey, n_tiles=2, seed=5, tile_size_pix=384, lenses_per_tile=4)
    out = tmp_path / "scan"
    table = scan(
        survey, out=str(out), model=make_tiny_model(tmp_path / "m"), threshold=0.0,
        gallery_size=6, client=cluster_client, progress=False,
    )  # fmt: skip
    index = out / "gallery" / "index.html"
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(
        [CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--dump-dom", index.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    ranks = [int(r) for r in re.findall(r'<figure data-rank="(\d+)"', dom)]
    assert ranks == [1, 2, 3, 4, 5, 6]
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', dom)]
    assert ids == [int(i) for i in table["id"][:6]]
    for src in re.findall(r'<img src="([^"]+)"', dom):
        assert (index.parent / src).is_file()
    shot = tmp_path / "page.png"
    subprocess.run(
        [CHROMIUM, *HEADLESS, f"--user-data-dir={profile}", "--window-size=1000,700",
         f"--screenshot={shot}", index.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    # The stamps (noise, galaxies) make the page far from a flat background.
    assert pixels.std() > 10
