"""The inspection page, driven in a real headless Chromium over the DevTools protocol.

One test loads a page of 1,000 candidates, checks the layout a grader works in (a dozen cards on
a 1400 x 1000 screen, no horizontal scrolling at 1200 and 1000 px, the current card in view after
each key, the wider cutout opening in view, the flags on each card), grades them with key presses,
reloads (grades kept), exports the CSV through the browser's download, merges it with a second
grader's file and checks the merged table; a screenshot is saved and checked to be non-blank.
The stretch is tested as a pure function: a bright core keeps its structure, noise stays low, and
the bands of a stamp share one scale.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table, vstack
from PIL import Image

from lenscan.cli import main
from lenscan.gallery import render_gallery
from lenscan.images import (
    band_stretch,
    rgb_bands,
    rgb_composite,
    stamp_panels,
    stamp_strip,
    stretch_scale,
)
from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.sweep import scan
from lenscan.table import read_parquet_table, write_table
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium; .ci/run installs it (Debian)"
)
STAMP = 24


class Browser:
    """A headless Chromium and one page, driven over the Chrome DevTools protocol."""

    def __init__(self, url: str, profile: Path, downloads: Path) -> None:
        self.url = url
        websocket = pytest.importorskip("websocket")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1400,1000", f"--user-data-dir={profile}",
             url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.msg_id = 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version") as r:
            browser_ws = json.load(r)["webSocketDebuggerUrl"]
        self.browser = websocket.create_connection(browser_ws, timeout=60)
        self.call(
            "Browser.setDownloadBehavior", ws=self.browser, behavior="allow",
            downloadPath=str(downloads),
        )  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.page = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)

    def call(self, method: str, ws=None, **params):
        ws = ws or self.page
        self.msg_id += 1
        ws.send(json.dumps({"id": self.msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == self.msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def stored_grades(self) -> int:
        """Grades in localStorage for this page (DevTools' view of the page's storage)."""
        origin = self.js("location.origin")
        storage = {
            "securityOrigin": origin if origin != "null" else "file://",
            "isLocalStorage": True,
        }
        items = self.call("DOMStorage.getDOMStorageItems", storageId=storage)["entries"]
        return max((len(json.loads(v)) for k, v in items if k.endswith(":grades")), default=0)

    def wait_stored_grades(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.stored_grades() != n:
            if time.monotonic() > deadline:
                raise AssertionError(f"localStorage holds {self.stored_grades()} grades, not {n}")
            time.sleep(0.05)

    def viewport(self, width: int, height: int) -> None:
        """Lay the page out as in a ``width`` x ``height`` window (CSS pixels)."""
        self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height,
            deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        self.wait(f"innerWidth === {width} && innerHeight === {height}")

    def key(self, key: str) -> None:
        codes = {"ArrowRight": 39, "ArrowLeft": 37, "]": 221, "[": 219, "Escape": 27}
        vk = codes[key] if key in codes else ord(key.upper())
        down = {"type": "keyDown", "key": key, "windowsVirtualKeyCode": vk}
        if len(key) == 1:
            down["text"] = key
        self.call("Input.dispatchKeyEvent", **down)
        self.call("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=vk)

    def close(self) -> None:
        for ws in (self.page, self.browser):
            ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


#: Cards wholly on screen, below the sticky header.
VISIBLE_CARDS = """(() => {
  const top = document.getElementById('header').getBoundingClientRect().bottom;
  const inside = (r) => r.top >= top - 1 && r.bottom <= innerHeight + 1 && r.left >= -1 &&
    r.right <= innerWidth + 1;
  return [...document.querySelectorAll('.card')].filter(c => inside(c.getBoundingClientRect()));
})()"""
CURRENT_IN_VIEW = f"{VISIBLE_CARDS}.includes(document.querySelector('.card.current'))"
NO_HORIZONTAL_SCROLL = (
    "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
)


def _check_layout(browser: Browser) -> None:
    """A dozen cards at 1400 x 1000, no sideways scrolling down to 1000 px, flags on the cards."""
    assert browser.js(f"{VISIBLE_CARDS}.length") >= 12
    assert browser.js(NO_HORIZONTAL_SCROLL)
    for width in (1200, 1000):
        browser.viewport(width, 1000)
        assert browser.js(NO_HORIZONTAL_SCROLL), f"horizontal scrollbar at {width} px"
        assert browser.js(f"{VISIBLE_CARDS}.length") >= 8
    browser.viewport(1400, 1000)
    text = browser.js("[...document.querySelectorAll('.card')].slice(0, 5).map(c => c.innerText)")
    titles = [next(line for line in t.splitlines() if line.startswith("#")) for t in text]
    assert titles[:2] == ["#1 \u00b7 0.999910", "#2 \u00b7 0.99985"]  # not "1.000" twice
    assert len(set(t.split()[-1] for t in titles)) == 5
    assert "clean" in text[0] and "edge" in text[1] and "masked 25%" in text[2]
    assert "2 det" in text[3] and "edge" not in text[0] + text[2] + text[3]
    assert "known: J0011-0845 (confident)" in text[4] and "known" not in "".join(text[:4])
    # Far down the page and back: the current card follows every key into view.
    for key in ["ArrowRight"] * 40 + ["ArrowLeft"] * 25 + ["ArrowRight"] * 3:
        browser.key(key)
        assert browser.js(CURRENT_IN_VIEW), f"the current card left the screen after {key}"
    assert browser.js("document.querySelector('.card.current').dataset.rank") == "19"
    for _ in range(18):
        browser.key("ArrowLeft")
    assert browser.js("document.querySelector('.card.current').dataset.rank") == "1"


def _check_context(browser: Browser) -> None:
    """``X`` opens the wider cutout over the page, inside the window; ``X``/Esc close it."""
    assert browser.js("document.getElementById('context').hidden")
    assert browser.js("[...document.images].some(i => /x\\d+\\.png/.test(i.src))") is False
    browser.key("x")
    img = "document.getElementById('context-img')"
    browser.wait(f"{img}.complete && {img}.naturalWidth > 0")
    assert browser.js(f"{img}.naturalWidth") == 3 * STAMP
    assert browser.js(f"{img}.src").endswith("x00007.png")  # the current card's (rank 7)
    box = browser.js(f"(r => [r.left, r.top, r.right, r.bottom])({img}.getBoundingClientRect())")
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= 1400 and box[3] <= 1000, box
    assert box[2] - box[0] >= 2 * 3 * STAMP  # upscaled, pixels visible
    browser.key("x")
    assert browser.js("document.getElementById('context').hidden")
    browser.key("x")
    browser.key("Escape")
    assert browser.js("document.getElementById('context').hidden")


def _candidates(survey_url: str, n: int) -> Table:
    """A ranked candidate table of ``n`` catalogue sources with seeded scores."""
    survey = open_survey(survey_url)
    parts = []
    for tile_id in survey.tile_ids:
        part = Table(survey.tile(tile_id).catalog())
        part["tile"] = tile_id
        parts.append(part)
    table = vstack(parts)[:n]
    if len(table) < n:
        raise AssertionError(f"the test survey has only {len(table)} sources, need {n}")
    table["score"] = np.random.default_rng(0).uniform(0.5, 1.0, n).astype(np.float32)
    table["score"][:3] = [0.99991, 0.99985, 0.99972]  # near 1: each title must still differ
    table["edge"] = False
    table["masked_fraction"] = np.zeros(n, np.float32)
    table["n_detections"] = np.ones(n, np.int32)
    table.sort("score", reverse=True)
    table["edge"][1] = True  # rank 2
    table["masked_fraction"][2] = 0.25  # rank 3
    table["n_detections"][3] = 2  # rank 4
    table["known_name"] = np.full(n, "", dtype="U16")
    table["known_grading"] = np.full(n, "", dtype="U16")
    table["known_name"][4], table["known_grading"][4] = "J0011-0845", "confident"  # rank 5
    table.add_column(np.arange(1, n + 1, dtype=np.int32), name="rank", index=0)
    table.meta.update(survey_url=survey_url, stamp_size_pix=STAMP, model_name="tiny")
    return table


def test_rgb_composite_strip_and_band_choice():
    stamp = np.zeros((3, 8, 8), np.float32)
    stamp[0, 4, 4] = 100.0  # a red point
    rgb = rgb_composite(stamp)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert rgb[4, 4, 0] > rgb[4, 4, 2]
    assert rgb_bands(("g", "r", "i", "z")) == ["i", "r", "g"]
    with pytest.raises(ValueError, match="3, y, x"):
        rgb_composite(np.zeros((2, 4, 4)))
    strip = stamp_strip(np.random.default_rng(1).normal(size=(3, 8, 8)), ("g", "r", "i"))
    assert strip.shape == (8, 32, 3)  # composite + 3 bands
    with pytest.raises(ValueError, match="bands"):
        stamp_strip(np.zeros((2, 8, 8)), ("g", "r", "i"))


def _galaxy_stamp(peaks=(1000.0, 2500.0, 5000.0), size=48, sky=(10.0, 20.0, 30.0)):
    """g, r, i planes: unit Gaussian noise on a sky, a red galaxy (steep core) at the centre."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[:size, :size] - size // 2
    r = np.hypot(yy, xx)
    profile = np.exp(-((r / 2.0) ** 0.5) * 3)  # steep core, faint wings
    return np.stack(
        [s + p * profile + rng.normal(0, 1, (size, size)) for p, s in zip(peaks, sky, strict=True)]
    )


def test_stretch_keeps_cores_and_keeps_noise_low():
    stamp = _galaxy_stamp()
    grey = band_stretch(stamp)
    assert grey.shape == stamp.shape and grey.dtype == np.uint8
    i_band = grey[2].astype(int)
    # The core is not clipped: only the brightest pixel reaches white, and the pixels around it
    # keep distinct levels (a per-band percentile stretch saturates a plateau there).
    assert (i_band == 255).sum() == 1
    core = i_band[22:27, 22:27]
    assert len(np.unique(core)) >= 6
    # Noise does not dominate: the sky-only corner sits low in the range in every band.
    for band in grey:
        assert np.percentile(band[:8, :8], 84) < 0.15 * 255
    # The galaxy's faint wings (about 10 sigma) stay visible above the noise.
    assert i_band[24, 24 + 12] > 2 * np.median(i_band[:8, :8]) + 10
    rgb = rgb_composite(stamp[::-1])  # i, r, g as red, green, blue
    # Where a channel passes white all three scale down together: the core stays red (a clip per
    # channel turns it white), and fewer than a dozen pixels reach the top at all.
    assert (rgb.min(axis=2) == 255).sum() == 0 and (rgb.max(axis=2) == 255).sum() < 12
    assert rgb[24, 24, 0] > rgb[24, 24, 1] > rgb[24, 24, 2]  # red, as the galaxy is


def test_stretch_is_shared_by_the_bands():
    stamp = _galaxy_stamp()
    scale = stretch_scale(stamp)
    np.testing.assert_allclose(scale.sky, [10, 20, 30], atol=1.0)  # within a sigma
    grey = band_stretch(stamp, scale).astype(int)
    # One scale: the g galaxy (5x fainter than i) is drawn fainter than i, pixel by pixel.
    centre = (slice(18, 31), slice(18, 31))
    assert (grey[0][centre] < grey[2][centre]).all()
    assert grey[0].max() < 0.9 * 255
    # A band with only noise beside a bright one stays dark (a per-band stretch fills its
    # range with noise).
    blank = stamp.copy()
    blank[0] = 10 + np.random.default_rng(3).normal(0, 1, blank[0].shape)
    assert np.percentile(band_stretch(blank)[0], 99) < 0.3 * 255
    # The same pixels in two bands get the same grey levels.
    twin = np.stack([stamp[2], stamp[2], stamp[1]])
    same = band_stretch(twin)
    np.testing.assert_array_equal(same[0], same[1])
    colour, bands = stamp_panels(stamp, ("g", "r", "i"))
    assert colour.shape == (48, 48, 3) and bands.shape == (48, 3 * 48, 3)
    np.testing.assert_array_equal(bands[::-1, 96:, 0], grey[2])  # north up: rows flipped


@needs_chromium
def test_grading_round_trip_in_chromium(tmp_path):
    survey_url = str(tmp_path / "survey.zarr")
    make_survey(
        survey_url, n_tiles=2, seed=3, tile_size_pix=512, lenses_per_tile=4,
        galaxies_per_arcmin2=120,
    )  # fmt: skip
    cand = _candidates(survey_url, 1000)
    write_table(cand, str(tmp_path / "candidates.parquet"), "parquet")
    index = render_gallery(cand, open_survey(survey_url), str(tmp_path / "gallery"))
    gallery = tmp_path / "gallery"
    assert len(list((gallery / "pages").glob("p*.js"))) == 10
    assert len(list((gallery / "img").glob("x*.png"))) == 1000
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    assert index.endswith(str(gallery / "index.html"))
    browser = Browser((gallery / "index.html").as_uri(), tmp_path / "profile", downloads)
    try:
        browser.viewport(1400, 1000)
        browser.wait("document.querySelectorAll('.card').length === 100")
        browser.wait("[...document.images].filter(i => i.src).every(i => i.complete)")
        # One page of data and its pictures only: no other page, no wider cutout yet.
        scripts = browser.js("[...document.scripts].map(s => s.src.split('/').pop())")
        assert [n for n in scripts if n] == ["p00001.js"]
        images = browser.js("[...document.images].map(i => i.src.split('/').pop())")
        assert sorted(n for n in images if n) == sorted(
            f"{k}{r:05d}.png" for r in range(1, 101) for k in "bc"
        )
        natural, shown = browser.js(
            "(i => [i.naturalWidth, i.getBoundingClientRect().width])"
            "(document.querySelector('img.colour'))"
        )
        assert natural == STAMP and shown >= 2 * natural
        assert browser.js("document.querySelector('img.bands').naturalWidth") == 3 * STAMP
        _check_layout(browser)
        # Grade from the keyboard: nothing is recorded before the grader has a name.
        browser.key("a")
        assert browser.js("Object.keys(lenscan.grades()).length") == 0
        browser.js("document.getElementById('grader').focus()")
        browser.call("Input.insertText", text="alice")
        browser.js("document.activeElement.blur()")
        for key in ["a", "b", "n", "n", "ArrowRight", "c", "u", "ArrowLeft", "ArrowRight", "n"]:
            browser.key(key)
            assert browser.js(CURRENT_IN_VIEW), f"the current card left the screen after {key}"
        # ranks 1 A, 2 B, 3 N, 4 N, 5 skipped, 6 C undone, back on 6, left to 5, right, 6 N
        assert browser.js("document.querySelector('.card.current').dataset.rank") == "7"
        _check_context(browser)
        browser.key("]")
        browser.wait("document.querySelector('.card').dataset.rank === '101'")
        browser.key("a")  # rank 101
        # The screenshot only once the page's first pictures are decoded (slow on a loaded box).
        browser.wait(
            "Array.from(document.querySelectorAll('img.colour, img.bands')).slice(0, 24)"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(shot)
        pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10  # stamps of noise and galaxies, not a flat background
        # The page stores each grade at once, but Chromium hands localStorage writes from the
        # page's process to its storage service asynchronously: a reload issued within
        # milliseconds (no person is that fast) can start before they land. Wait until the
        # page's storage holds all six, then give the hand-over a second.
        browser.wait_stored_grades(6)
        time.sleep(1.0)
        browser.js("window.beforeReload = true")
        browser.call("Page.reload")
        browser.wait("!window.beforeReload && document.querySelectorAll('.card').length === 100")
        assert browser.js("Object.keys(lenscan.grades()).length") == 6  # kept over the reload
        assert browser.js("document.querySelector('.card.current').dataset.rank") == "102"
        browser.key("e")
        deadline = time.monotonic() + 30
        while not list(downloads.glob("*.csv")) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        browser.close()
    (exported,) = downloads.glob("*.csv")
    rows = list(csv.DictReader(exported.open()))
    assert list(rows[0]) == ["id", "tile", "ra", "dec", "grade", "grader", "time"]
    by_rank = {int(cand["rank"][cand["id"] == int(r["id"])][0]): r["grade"] for r in rows}
    assert by_rank == {1: "A", 2: "B", 3: "N", 4: "N", 6: "N", 101: "A"}
    assert {r["grader"] for r in rows} == {"alice"}
    # A second grader disagrees on rank 1 and grades rank 7.
    bob = tmp_path / "bob.csv"
    with bob.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "tile", "ra", "dec", "grade", "grader", "time"])
        for rank, grade in ((1, "N"), (2, "A"), (7, "B")):
            c = cand[rank - 1]
            w.writerow([c["id"], c["tile"], c["ra"], c["dec"], grade, "bob", "2026-01-01T00:00Z"])
    merged_url = tmp_path / "grades.parquet"
    assert main(["grades", "merge", str(exported), str(bob), "--out", str(merged_url),
                 "--candidates", str(tmp_path / "candidates.parquet")]) == 0  # fmt: skip
    merged = read_parquet_table(str(merged_url))
    assert len(merged) == 1000 and merged["rank"].tolist() == list(range(1, 1001))
    graded = merged[merged["n_graders"] > 0]
    assert graded["rank"].tolist() == [1, 2, 3, 4, 6, 7, 101]
    assert graded["n_graders"].tolist() == [2, 2, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(graded["mean_grade"], [1.5, 2.5, 0, 0, 0, 2, 3])
    assert graded["disagree"].tolist() == [True, False, False, False, False, False, False]
    assert graded["grade"].tolist() == ["B", "A", "N", "N", "N", "B", "A"]
    assert len(merged.meta["grade_files_sha256"]) == 64


def test_gallery_command_on_a_scan(tmp_path, cluster_client):
    survey = str(tmp_path / "survey.zarr")
    make_survey(survey, n_tiles=2, seed=5, tile_size_pix=384, lenses_per_tile=4)
    out = tmp_path / "scan"
    table = scan(
        survey, out=str(out), model=make_tiny_model(tmp_path / "m"), threshold=0.0,
        gallery_size=0, client=cluster_client, progress=False,
    )  # fmt: skip
    assert main(["gallery", str(out), "--top", "7", "--page-size", "5"]) == 0
    pages = sorted((out / "gallery" / "pages").glob("*.js"))
    assert [p.name for p in pages] == ["p00001.js", "p00002.js"]
    first = json.loads(pages[0].read_text().split(", ", 1)[1].rsplit(");", 1)[0])
    assert [c["id"] for c in first] == [int(i) for i in table["id"][:5]]
    for c in first:
        assert Image.open(out / "gallery" / c["colour"]).size == (32, 32)  # the tiny model's
        assert Image.open(out / "gallery" / c["bands"]).size == (32 * 3, 32)  # g, r, i
        assert c["n_detections"] >= 1 and 0 <= c["masked_fraction"] <= 1
    with pytest.raises(SystemExit):
        main(["gallery"])
    assert main(["gallery", str(tmp_path / "nowhere")]) == 2


def test_grade_files_are_checked(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,tile,ra,dec,grade,grader,time\n1,t,1.0,2.0,Q,al,2026\n")
    assert main(["grades", "merge", str(bad), "--out", str(tmp_path / "g.parquet")]) == 2
    from lenscan.grades import merge_grades

    with pytest.raises(ValueError, match=r"bad.csv, line 2: grade 'Q'"):
        merge_grades([str(bad)])
    bad.write_text("id,tile,grade\n1,t,A\n")
    with pytest.raises(ValueError, match="missing column"):
        merge_grades([str(bad)])
