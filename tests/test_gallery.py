"""The inspection page, driven in a real headless Chromium over the DevTools protocol.

One test loads a page of 1,000 candidates, grades them with key presses, reloads (grades kept),
exports the CSV through the browser's download, merges it with a second grader's file and checks
the merged table; a screenshot is saved and checked to be non-blank.
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
from lenscan.images import rgb_bands, rgb_composite, stamp_strip
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
        websocket = pytest.importorskip("websocket")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--window-size=1200,900", f"--user-data-dir={profile}",
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

    def key(self, key: str) -> None:
        codes = {"ArrowRight": 39, "ArrowLeft": 37, "]": 221, "[": 219}
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
    table["edge"] = False
    table.sort("score", reverse=True)
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
        browser.wait("document.querySelectorAll('.card').length === 100")
        browser.wait("[...document.images].filter(i => i.src).every(i => i.complete)")
        # One page of data and its strips only: no other page, no context cutout yet.
        scripts = browser.js("[...document.scripts].map(s => s.src.split('/').pop())")
        assert [n for n in scripts if n] == ["p00001.js"]
        images = browser.js("[...document.images].map(i => i.src.split('/').pop())")
        assert sorted(n for n in images if n) == [f"s{r:05d}.png" for r in range(1, 101)]
        natural, shown = browser.js(
            "(i => [i.naturalWidth, i.getBoundingClientRect().width])"
            "(document.querySelector('img.strip'))"
        )
        assert natural == STAMP * 4  # composite + g, r, i at the model's stamp size
        assert shown >= 2 * natural
        # Grade from the keyboard: nothing is recorded before the grader has a name.
        browser.key("a")
        assert browser.js("Object.keys(lenscan.grades()).length") == 0
        browser.js("document.getElementById('grader').focus()")
        browser.call("Input.insertText", text="alice")
        browser.js("document.activeElement.blur()")
        for key in ["a", "b", "n", "n", "ArrowRight", "c", "u", "ArrowLeft", "ArrowRight", "n"]:
            browser.key(key)
        # ranks 1 A, 2 B, 3 N, 4 N, 5 skipped, 6 C undone, back on 6, left to 5, right, 6 N
        ctx_height = "document.querySelector('.card.current img.context').offsetHeight"
        assert browser.js(ctx_height) == 0  # hidden, and not loaded, until asked for
        browser.key("x")
        browser.wait(f"{ctx_height} >= {2 * 3 * STAMP}")  # laid out once the key is handled
        browser.wait("document.querySelector('.card.current img.context').naturalWidth > 0")
        assert browser.js("document.querySelector('.card.current img.context').naturalWidth") == (
            3 * STAMP
        )
        browser.key("]")
        browser.wait("document.querySelector('.card').dataset.rank === '101'")
        browser.key("a")  # rank 101
        # The screenshot only once the page's first strips are decoded (slow on a loaded box).
        browser.wait(
            "Array.from(document.querySelectorAll('img.strip')).slice(0, 3)"
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
        strip = Image.open(out / "gallery" / c["strip"])
        assert strip.size == (32 * 4, 32)  # the tiny model's 32 px stamp, composite + 3 bands
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
