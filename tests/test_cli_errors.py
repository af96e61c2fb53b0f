"""Bad input and broken surroundings end in one line, a non-zero exit, in seconds (issue 19).

Every test runs the ``lenscan`` command in a real subprocess, as a user would, and checks what
reaches the terminal: the exit code, a short stderr without a traceback that names the input,
and the time taken where the failure used to be a hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lenscan.simulate import make_survey
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _lenscan(*args: str, env: dict | None = None, timeout: float = 240):
    """Run ``lenscan ARGS``; return the finished process and the seconds it took."""
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "lenscan.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip
    return run, time.monotonic() - t0


def _one_line(run: subprocess.CompletedProcess, *names: str, code: int = 2) -> str:
    """Assert a short, traceback-free stderr naming every one of ``names``; return it.

    ``code``: 2 for bad arguments, 1 for runtime failures (a store that cannot be reached).
    """
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, run.stderr[-3000:]
    for name in names:
        assert name in run.stderr, (name, run.stderr)
    return run.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again on exit: nothing listens there


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("errors") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=5, tile_size_pix=256, lenses_per_tile=2)
    return url


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint on loopback that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def _env(**extra: str) -> dict[str, str]:
    """This environment without AWS settings of the machine, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, **extra)
    return env


# ------------------------------------------------------------------ outputs that are files


@pytest.mark.parametrize("command", ["scan", "demo", "gallery"])
def test_an_out_that_is_an_existing_file_is_refused(command, survey, model, tmp_path):
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    args = {
        "scan": ["scan", survey, "--model", model, "--out", str(afile)],
        "demo": ["demo", "--out", str(afile)],
        "gallery": ["gallery", str(tmp_path), "--out", str(afile)],
    }[command]
    run, _ = _lenscan(*args)
    assert "is a file" in _one_line(run, str(afile), "--out")
    assert afile.read_text() == "not a folder"


# ------------------------------------------------------------------ object stores


def test_s3_without_credentials_says_which_variables_to_set(model, tmp_path):
    run, seconds = _lenscan(
        "scan", "s3://lenscan-test/none.zarr", "--model", model, "--out", str(tmp_path / "o"),
        env=_env(),
    )  # fmt: skip
    err = _one_line(run, "s3://lenscan-test/none.zarr", "AWS_ACCESS_KEY_ID", code=1)
    assert "no credentials" in err
    assert seconds < 60


def test_s3_endpoint_that_refuses_fails_in_seconds(model, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options = json.dumps({"client_kwargs": {"endpoint_url": endpoint}})
    run, seconds = _lenscan(
        "scan", "s3://bucket/survey.zarr", "--model", model, "--out", str(tmp_path / "o"),
        "--storage-options", options,
        env=_env(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y"),
    )  # fmt: skip
    err = _one_line(run, "s3://bucket/survey.zarr", endpoint, code=1)
    assert "cannot connect" in err
    assert seconds < 60


def test_s3_endpoint_that_never_answers_times_out(model, tmp_path, silent_endpoint):
    """Before: silent until killed at 120 s. Now the read timeout (1 s here) and the retry bound
    (none here) end it, and the message says which setting to raise."""
    options = json.dumps({"client_kwargs": {"endpoint_url": silent_endpoint}})
    run, seconds = _lenscan(
        "scan", "s3://bucket/survey.zarr", "--model", model, "--out", str(tmp_path / "o"),
        "--storage-options", options,
        env=_env(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", LENSCAN_READ_TIMEOUT="1",
                 LENSCAN_RETRIES="0"),
        timeout=110,
    )  # fmt: skip
    err = _one_line(run, "s3://bucket/survey.zarr", silent_endpoint, code=1)
    assert "did not answer within 1 s" in err and "LENSCAN_READ_TIMEOUT" in err
    assert seconds < 60


@pytest.mark.parametrize("url, package", [("gs://b/s.zarr", "gcsfs"), ("s3://b/s.zarr", "s3fs")])
def test_a_missing_cloud_package_names_the_extra(url, package, model, tmp_path):
    # The package is made unimportable in the child only, as if it were not installed.
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from lenscan.cli import main\n"
        f"sys.exit(main(['scan', {url!r}, '--model', {model!r}, '--out', {str(tmp_path)!r}]))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240, cwd=REPO)  # fmt: skip
    assert "pip install 'lenscan[cloud]'" in _one_line(run, url, package, code=1)


def test_storage_options_must_be_a_json_object_and_are_never_echoed(survey, model, tmp_path):
    secret = "hunter2-do-not-print"
    run, _ = _lenscan("scan", survey, "--model", model, "--out", str(tmp_path / "o"),
                      "--storage-options", '{"secret": "' + secret)  # fmt: skip
    assert "not valid JSON" in _one_line(run, "--storage-options")
    assert secret not in run.stderr + run.stdout
    run, _ = _lenscan("scan", survey, "--model", model, "--out", str(tmp_path / "o"),
                      "--out-storage-options", f'["{secret}"]')  # fmt: skip
    assert "JSON object" in _one_line(run, "--out-storage-options")
    assert secret not in run.stderr + run.stdout


def test_storage_options_flag_reaches_the_store(survey, model, s3_server, tmp_path):
    """--storage-options alone (no YAML) points the scan at an S3 endpoint; the credentials
    come from the environment."""
    endpoint, options = s3_server
    fs = fsspec.filesystem("s3", **options)
    prefix = f"lenscan-test/flag-{os.getpid()}-{time.monotonic_ns()}"
    fs.put(survey, f"{prefix}/survey.zarr", recursive=True)
    out = tmp_path / "out"
    flag = json.dumps({"client_kwargs": {"endpoint_url": endpoint}})
    run, _ = _lenscan(
        "scan", f"s3://{prefix}/survey.zarr", "--model", model, "--out", str(out),
        "--storage-options", flag, "--workers", "1", "--threads-per-worker", "1",
        "--threshold", "0", "--gallery-size", "0", "--no-progress",
        env=_env(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert endpoint in json.dumps(record["config"]["storage_options"])
    assert record["summary"]["tiles"] == 2 and record["summary"]["tiles_failed"] == 0


# ------------------------------------------------------------------ clusters and devices


def test_a_scheduler_that_is_not_there_fails_in_seconds(survey, model, tmp_path):
    """Before: 36 s and two tracebacks (distributed retries for its 30 s connect timeout)."""
    address = f"tcp://127.0.0.1:{_closed_port()}"
    out = tmp_path / "o"
    run, seconds = _lenscan("scan", survey, "--model", model, "--out", str(out),
                            "--scheduler", address)  # fmt: skip
    assert "no Dask scheduler answers" in _one_line(run, address, "--scheduler")
    assert seconds < 30
    assert not out.exists(), "refused before anything is written"


def test_the_unedited_slurm_spec_names_the_field_to_edit(survey, model, tmp_path):
    pytest.importorskip("dask_jobqueue")
    run, _ = _lenscan("scan", survey, "--model", model, "--out", str(tmp_path / "o"),
                      "--cluster", "cluster/slurm-cpu.yaml")  # fmt: skip
    err = _one_line(run, "'ib0'", "interface")
    assert "edit the `interface:` line" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_cluster(survey, model, tmp_path):
    out = tmp_path / "o"
    run, _ = _lenscan("scan", survey, "--model", model, "--out", str(out), "--device", "cuda")
    assert "no CUDA GPU" in _one_line(run, "--device cuda")
    assert "distributed" not in run.stderr  # no cluster started
    assert not out.exists()


# ------------------------------------------------------------------ Ctrl-C


@pytest.fixture(scope="module")
def survey_8(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("sigint") / "survey.zarr")
    make_survey(url, n_tiles=8, seed=9, tile_size_pix=384, lenses_per_tile=4)
    return url


def test_ctrl_c_says_what_is_committed_and_the_same_command_resumes(survey_8, model, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "scan.yaml"
    config.write_text(
        f"survey_url: {survey_8}\nout: {out}\nmodel: {model}\ngallery_size: 0\n"
        "commit_interval_seconds: 0\ncluster: {n_workers: 1, threads_per_worker: 1}\n"
    )
    command = [sys.executable, "-m", "lenscan.cli", "scan", "--config", str(config),
               "--no-progress"]  # fmt: skip
    # A terminal sends Ctrl-C's SIGINT to the whole process group: the client and its workers.
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    t0 = time.monotonic()
    while not list((out / "ledger").glob("*.tiles.parquet")) and time.monotonic() - t0 < 200:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    t1 = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.monotonic() - t1 < 60
    assert "Traceback" not in stderr
    # Dask's INFO lines are another matter (logging); what lenscan and Dask add is one line.
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("INFO ")]
    assert len(lines) == 1, stderr[-3000:]
    m = re.search(r"interrupted: (\d+) of 8 tiles are committed under (\S+);", lines[0])
    assert m and m.group(2) == str(out), lines[0]
    assert "run the same command again to resume" in lines[0]
    committed = int(m.group(1))
    assert 1 <= committed < 8, "the interrupt must land mid-scan, after a commit"

    again = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["tiles_skipped"] >= committed
    assert summary["tiles_skipped"] + summary["tiles_scanned"] == 8


# ------------------------------------------------------------------ grades


def test_grades_merge_given_parquet_names_the_file(tmp_path):
    table = tmp_path / "grades.parquet"
    pq.write_table(pa.table({"id": [1, 2], "grade": [3, 0]}), table)
    run, _ = _lenscan("grades", "merge", str(table), "--out", str(tmp_path / "merged.parquet"))
    assert "not a lenscan grades CSV file (it is a Parquet file)" in _one_line(run, str(table))


def test_an_unexpected_error_prints_its_traceback_without_credentials(monkeypatch, capsys):
    """A bug's traceback still reaches the terminal, scrubbed of what its message echoes."""
    import lenscan.gallery

    secret = "s3cr3t-t0ken-0123456789"

    def broken(args):
        raise RuntimeError(f"cannot read https://reader:{secret}@data.example.org/x?sig={secret}")

    monkeypatch.setattr(lenscan.gallery, "run_gallery_cli", broken)
    from lenscan.cli import main

    assert main(["gallery", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: cannot read https://data.example.org/x" in err
    assert secret not in err
