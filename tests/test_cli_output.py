"""What ``lenscan`` prints, read from a real subprocess: quiet by default, paths at the end,
a resumed run's summary, the gallery's cut, ``run.json`` usable from any directory, and a
script without a ``__main__`` guard stopped by one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lenscan.simulate import make_survey
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DASK_LOGGING__DISTRIBUTED", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=240, cwd=cwd, env=env
    )


def _lenscan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return _run("-m", "lenscan.cli", *args, cwd=cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding a 2-tile survey (``survey.zarr``) and a tiny model."""
    root = tmp_path_factory.mktemp("cli-output")
    make_survey(str(root / "survey.zarr"), n_tiles=2, seed=3, tile_size_pix=384, lenses_per_tile=4)
    make_tiny_model(root / "tiny")
    return root


def _model(workdir: Path) -> str:
    return str(workdir / "tiny")


def _scan(workdir: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    # A relative survey path, run from workdir: run.json must still name it from elsewhere.
    return _lenscan(
        "scan", "survey.zarr", "--out", out, "--model", _model(workdir), "--workers", "1",
        "--threads-per-worker", "1", "--threshold", "0.0", "--no-progress", *extra, cwd=workdir,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quiet_run(workdir) -> subprocess.CompletedProcess:
    return _scan(workdir, "quiet", "--gallery-size", "2")


def test_scan_is_quiet_prints_paths_and_resumes_readably(workdir, quiet_run):
    run = quiet_run
    assert run.returncode == 0, run.stderr
    # (a worker's ERROR at teardown on a loaded machine is Dask's to print; INFO is not)
    assert "INFO" not in run.stderr, run.stderr
    out = workdir / "quiet"
    n = json.loads((out / "run.json").read_text())["summary"]["n_candidates"]
    assert n > 2
    assert f"candidate table: {out}/candidates.parquet (+ candidates.fits)" in run.stdout
    assert f"provenance:      {out / 'run.json'}" in run.stdout
    assert f"gallery:         {out / 'gallery' / 'index.html'}" in run.stdout
    assert f"the top 2 of {n} candidates; all of them: lenscan gallery quiet --top {n}" in (
        run.stdout
    )
    again = _scan(workdir, "quiet", "--gallery-size", "2")
    assert again.returncode == 0, again.stderr
    assert "resumed     skipped 2 tiles already committed" in again.stdout
    assert f"candidates  {n} at score >= 0.000, from all " in again.stdout
    assert "stamps/s" not in again.stdout and "scored      0" not in again.stdout


@pytest.mark.parametrize(
    ("flag", "present", "absent"),
    [("-v", "INFO lenscan.cluster", "INFO distributed."), ("-vv", "INFO distributed.", None)],
)
def test_verbose_flags_add_lenscan_then_dask_logs(workdir, flag, present, absent):
    run = _scan(workdir, f"verbose{flag}", "--gallery-size", "0", flag)
    assert run.returncode == 0, run.stderr
    assert present in run.stderr
    if absent:
        assert absent not in run.stderr


def test_gallery_from_another_directory_and_with_survey_option(workdir, quiet_run, tmp_path):
    assert quiet_run.returncode == 0, quiet_run.stderr
    record = json.loads((workdir / "quiet" / "run.json").read_text())
    assert record["survey_url"] == str(workdir / "survey.zarr")
    assert record["config"]["survey_url"] == str(workdir / "survey.zarr")
    page = _lenscan("gallery", str(workdir / "quiet"), "--top", "3", "--out", "p1", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert (tmp_path / "p1" / "index.html").is_file()
    # The survey moved: the error says how to point at it; --survey does.
    (workdir / "survey.zarr").rename(workdir / "survey-moved.zarr")
    try:
        lost = _lenscan("gallery", str(workdir / "quiet"), "--out", "p2", cwd=tmp_path)
        assert lost.returncode != 0
        assert "--survey" in lost.stderr.strip().splitlines()[-1]
        found = _lenscan(
            "gallery", str(workdir / "quiet"), "--survey", str(workdir / "survey-moved.zarr"),
            "--out", str(tmp_path / "page"), cwd=tmp_path,
        )  # fmt: skip
        assert found.returncode == 0, found.stderr
        assert (tmp_path / "page" / "index.html").is_file()
    finally:
        (workdir / "survey-moved.zarr").rename(workdir / "survey.zarr")


def test_script_without_main_guard_gets_one_clear_error(workdir, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import lenscan

            lenscan.scan({str(workdir / "survey.zarr")!r}, out={str(tmp_path / "o")!r},
                         model={_model(workdir)!r}, cluster={{"n_workers": 1}})
            """
        )
    )
    run = _run(str(script), cwd=tmp_path)
    assert run.returncode != 0
    assert "Nanny failed" not in run.stderr
    assert "bootstrapping" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and 'if __name__ == "__main__":' in last, last
    assert str(script) in last
    assert len(run.stderr.splitlines()) < 25, run.stderr
