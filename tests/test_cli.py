"""The ``lenscan`` command as a user runs it (a real subprocess, a real local cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from astropy.table import Table

from lenscan.simulate import make_survey
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)


def _lenscan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lenscan.cli", *args], capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def small_survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=3, tile_size_pix=384, lenses_per_tile=4)
    return url


def test_scan_command_writes_tables_and_summary(small_survey, tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "out"
    run = _lenscan(
        "scan", small_survey, "--model", model, "--out", str(out), "--workers", "1",
        "--threads-per-worker", "1", "--threshold", "0.0", "--formats", "parquet", "fits",
        "ecsv", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "candidates" in run.stdout and "stamps/s" in run.stdout
    for name in ("candidates.parquet", "candidates.fits", "candidates.ecsv", "run.json"):
        assert (out / name).is_file(), name
    assert len(Table.read(out / "candidates.fits")) > 0


def test_scan_from_yaml_config_with_override(small_survey, tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    config = tmp_path / "scan.yaml"
    out = tmp_path / "from-yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scan": {
                    "survey_url": small_survey,
                    "out": str(out),
                    "model": model,
                    "threshold": 0.0,
                    "gallery_size": 0,
                    "cluster": {"n_workers": 1, "threads_per_worker": 1},
                }
            }
        )
    )
    run = _lenscan("scan", "--config", str(config), "--threshold", "1.0", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "at score >= 1.000" in run.stdout  # the flag overrides the file
    assert not (out / "gallery").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "no model named 'no-such-model'"),
        (["--threshold", "2"], "threshold must be within [0, 1]"),
        (["--cut", "sdss"], "unknown colour cut 'sdss'"),
    ],
)
def test_bad_input_gives_a_clear_error(small_survey, tmp_path, args, message):
    run = _lenscan("scan", small_survey, "--out", str(tmp_path / "o"), *args)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_not_a_survey_is_named(tmp_path):
    (tmp_path / "plain").mkdir()
    model = make_tiny_model(tmp_path / "tiny")
    run = _lenscan("scan", str(tmp_path / "plain"), "--model", model, "--out", str(tmp_path / "o"))
    assert run.returncode == 2
    assert str(Path(tmp_path / "plain")) in run.stderr


def test_version_and_help():
    run = _lenscan("--version")
    assert run.returncode == 0 and run.stdout.startswith("lenscan ")
    for command, flag in [
        ("scan", "--scheduler"),
        ("ingest", "--preset"),
        ("train", "config"),
        ("evaluate", "model"),
        ("demo", "--out"),
    ]:
        run = _lenscan(command, "--help")
        assert run.returncode == 0 and flag in run.stdout, (command, run.stderr)
