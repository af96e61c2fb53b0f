"""One writer per output folder: the lease on ``--out`` (lenscan._lease), on a local disk and on a
real S3 API (moto on loopback), with real ``lenscan scan`` processes on a real Dask cluster.

The scans are tiny (one 256-pixel tile) and share one cluster (``--scheduler``), so that twenty
pairs of processes fit in a couple of minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

from lenscan._io import storage_failure
from lenscan._lease import LEASE_NAME, LeaseHeld, LeaseLost, acquire_lease, read_lease
from lenscan.simulate import make_survey
from lenscan.sweep import scan
from lenscan.table import read_parquet_table
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("lease") / "survey.zarr")
    make_survey(url, n_tiles=1, seed=5, tile_size_pix=256, lenses_per_tile=4)
    return url


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _result(out) -> list[tuple[str, int, float]]:
    table = read_parquet_table(str(Path(out) / "candidates.parquet"))
    return sorted(
        (str(t), int(i), round(float(s), 6))
        for t, i, s in zip(table["tile"], table["id"], table["score"], strict=True)
    )


@pytest.fixture(scope="module")
def clean(survey_url, model_path, cluster_client, tmp_path_factory):
    """A clean run's candidate rows (threshold 0: every scored source is a candidate)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    scan(survey_url, out=str(out), model=model_path, threshold=0.0, client=cluster_client,
         progress=False, gallery_size=0)  # fmt: skip
    rows = _result(out)
    assert len(rows) >= 3
    return rows


def _command(survey_url, model_path, client, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lenscan.cli", "scan", survey_url, "--out", str(out),
            "--model", model_path, "--threshold", "0", "--scheduler", client.scheduler.address,
            "--no-progress", "--gallery-size", "0", *extra]  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("lenscan scan: error:")]


def _plant_lease(out: Path, run_id: str, *, age_s: float = 0.0, ttl_s: float = 3600.0) -> None:
    """A lease of a run on another machine, last renewed ``age_s`` ago."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"user": "someone", "host": "node-7", "pid": 4242, "run_id": run_id,
              "started": "2026-12-04T08:00:00Z", "ttl_s": ttl_s}  # fmt: skip
    (out / LEASE_NAME).write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(out / LEASE_NAME, (then, then))


def _wait_for_lease(out: Path, pid: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the holder ended before the test could act"
        record = read_lease(str(out))
        if record is not None and record["pid"] == pid:
            return
        time.sleep(0.02)
    raise AssertionError("the holder never took the lease")


# ------------------------------------------------------------------ two scans, one --out


#: A process that runs the ``lenscan scan`` command (``lenscan.cli.main``) once per attempt,
#: each started when the test creates ``BASE<attempt>.go``: the two processes of a pair reach
#: the lease within a millisecond of each other, and torch is imported once per process, not
#: forty times (the test stays within minutes on two loaded cores).
_SCANNER = """
import contextlib, logging, os, sys, time
import lenscan.cli, lenscan.sweep
logging.basicConfig(stream=sys.__stderr__)  # main()'s own basicConfig is then a no-op
base, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
me = str(os.getpid())
for i in range(n):
    open(f"{base}{i}.ready.{me}", "w").close()
    while not os.path.exists(f"{base}{i}.go"):
        time.sleep(0.001)
    with open(f"{base}{i}.err.{me}", "w") as err, contextlib.redirect_stderr(err):
        code = lenscan.cli.main([a.replace("OUT", f"{base}{i}") for a in argv])
    with open(f"{base}{i}.rc.{me}.tmp", "w") as fh:
        fh.write(str(code))
    os.replace(f"{base}{i}.rc.{me}.tmp", f"{base}{i}.rc.{me}")
"""


def _wait_for_files(paths: list[Path], procs: list[subprocess.Popen], timeout: float) -> None:
    t0 = time.monotonic()
    while not all(p.exists() for p in paths):
        assert all(p.poll() is None for p in procs), "a scanner process ended early (its log)"
        assert time.monotonic() - t0 < timeout, f"waited {timeout} s for {paths}"
        time.sleep(0.005)


def test_two_scans_on_one_out_twenty_times_one_runs_and_the_other_is_refused(
    survey_url, model_path, cluster_client, clean, tmp_path
):
    n = 20
    base = tmp_path / "run"
    argv = _command(survey_url, model_path, cluster_client, "OUT")[3:]
    logs = [open(tmp_path / f"scanner{k}.log", "w") for k in range(2)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, "-c", _SCANNER, str(base), str(n), *argv],
                              stdout=log, stderr=log) for log in logs]  # fmt: skip
    try:
        for attempt in range(n):
            out = Path(f"{base}{attempt}")
            each = [(p, Path(f"{out}.rc.{p.pid}"), Path(f"{out}.err.{p.pid}")) for p in procs]
            _wait_for_files([Path(f"{out}.ready.{p.pid}") for p in procs], procs, 300)
            Path(f"{out}.go").touch()  # both scans start now
            _wait_for_files([rc for _, rc, _ in each], procs, 300)
            codes = {p.pid: int(rc.read_text()) for p, rc, _ in each}
            errors = {p.pid: err.read_text() for p, _, err in each}
            assert sorted(codes.values()) == [0, 1], (attempt, codes, errors)
            winner = next(pid for pid, c in codes.items() if c == 0)
            loser = next(pid for pid, c in codes.items() if c == 1)
            assert "Traceback" not in errors[loser], errors[loser]
            (line,) = _error_lines(errors[loser])
            assert f"{out} is in use by another run:" in line
            assert f"pid {winner} " in line and "last renewed" in line
            assert "--break-lease" in line
            assert _result(out) == clean, f"pair {attempt}: the output differs from a clean run's"
            assert not (out / LEASE_NAME).exists(), "the winner releases its lease"
    finally:
        for p, log in zip(procs, logs, strict=True):
            p.kill()
            p.wait()
            log.close()


# ------------------------------------------------------------------ a holder that dies or stalls


def test_a_killed_holder_on_this_host_is_taken_over_at_once(
    survey_url, model_path, cluster_client, clean, tmp_path, caplog
):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(survey_url, model_path, cluster_client, out),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_lease(out, proc.pid, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_lease(str(out))["pid"] == proc.pid, "a SIGKILLed run leaves its lease"
    with caplog.at_level("WARNING", logger="lenscan._lease"):
        scan(survey_url, out=str(out), model=model_path, threshold=0.0, client=cluster_client,
             progress=False, gallery_size=0)  # fmt: skip
    assert f"its process {proc.pid} on this host has ended" in caplog.text
    assert _result(out) == clean


def test_a_stalled_holder_expires_and_learns_it_lost_the_lease(
    survey_url, model_path, cluster_client, clean, tmp_path, caplog
):
    """SIGSTOP the holder: it stops renewing but its process lives. It is refused to others
    until its time to live passes, then taken over; resumed, it stops without writing."""
    out = tmp_path / "run"
    config = tmp_path / "scan.yaml"
    config.write_text("lease_ttl_seconds: 3\n")
    command = _command(survey_url, model_path, cluster_client, out, "--config", str(config))
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kwargs = dict(model=model_path, threshold=0.0, client=cluster_client, progress=False,
                  gallery_size=0, lease_ttl_seconds=3)  # fmt: skip
    try:
        _wait_for_lease(out, holder.pid, holder)
        holder.send_signal(signal.SIGSTOP)
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} "):
            scan(survey_url, out=str(out), **kwargs)
        time.sleep(3.5)  # the time to live passes without a renewal
        with caplog.at_level("WARNING", logger="lenscan._lease"):
            scan(survey_url, out=str(out), **kwargs)
        assert "took over the lease" in caplog.text and "not renewed for" in caplog.text
        assert _result(out) == clean
        written = (out / "candidates.parquet").stat().st_mtime_ns
    finally:
        holder.send_signal(signal.SIGCONT)
    _, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = _error_lines(stderr)
    assert "was taken over" in line and "before writing its results" in line
    assert (out / "candidates.parquet").stat().st_mtime_ns == written
    assert _result(out) == clean


# ------------------------------------------------------------------ --break-lease and orphans


def test_break_lease_and_orphans_of_dead_runs_only(
    survey_url, model_path, cluster_client, clean, tmp_path
):
    out = tmp_path / "run"
    _plant_lease(out, "r-other")  # a live run on another machine
    (out / "scored").mkdir()
    orphans = [out / ".tmp-0123abcd-run.json", out / "scored" / ".tmp-4567-tile-x.parquet"]
    for orphan in orphans:
        orphan.write_bytes(b"half written")
    command = _command(survey_url, model_path, cluster_client, out)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused.stderr[-3000:]
    (line,) = _error_lines(refused.stderr)
    assert "someone@node-7 pid 4242 (run r-other)" in line and "--break-lease" in line
    assert all(o.exists() for o in orphans), "a live run's temporary files are left alone"

    _plant_lease(out, "r-other", age_s=7200)  # that run died two hours ago: its lease expired
    scan(survey_url, out=str(out), model=model_path, threshold=0.0, client=cluster_client,
         progress=False, gallery_size=0)  # fmt: skip
    assert not any(o.exists() for o in orphans), "a dead run's temporary files are cleaned"
    assert _result(out) == clean

    _plant_lease(out, "r-third")  # alive-looking; the user knows that run is dead
    broken = subprocess.run([*command, "--break-lease", "--no-resume"], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert broken.returncode == 0, broken.stderr[-3000:]
    assert "took over the lease" in broken.stderr and "someone@node-7" in broken.stderr
    assert _result(out) == clean
    assert not (out / LEASE_NAME).exists()


# ------------------------------------------------------------------ racing contenders, two stores


def _race(out: str, options: dict, n: int = 8) -> tuple[list, list[str]]:
    barrier = threading.Barrier(n)
    held, refused = [], []

    def contend() -> None:
        barrier.wait()
        try:
            held.append(acquire_lease(out, options, ttl_s=30))
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return held, refused


def _stale_lease(out: str, options: dict) -> None:
    # Another client (its own instance): its plain write is not one lenscan made.
    fs, path = fsspec.core.url_to_fs(out, skip_instance_cache=True, **options)
    record = {"user": "someone", "host": "node-7", "pid": 4242, "run_id": "r-stale", "ttl_s": 0.5}
    fs.makedirs(path, exist_ok=True)  # a released lease leaves no empty local folder
    fs.pipe_file(f"{path}/{LEASE_NAME}", json.dumps(record).encode())
    time.sleep(1.5)  # past its time to live (S3 dates it by the server's LastModified, 1 s)


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_many_contenders_exactly_one_creates_or_takes_over_the_lease(store, tmp_path, request):
    if store == "s3":
        prefix, options = request.getfixturevalue("s3_url")
        out = f"{prefix}/run"
        fs, _ = fsspec.core.url_to_fs(out, **options)
        calls: list[tuple[str, dict]] = []
        fs.s3.meta.events.register(
            "before-parameter-build.s3.PutObject", lambda params, **kw: calls.append(params)
        )
    else:
        out, options = str(tmp_path / "run"), {}
    for setup in ("free", "stale"):
        if setup == "stale":
            _stale_lease(out, options)
        held, refused = _race(out, options)
        assert len(held) == 1 and len(refused) == 7, (setup, refused)
        run_id = held[0].record["run_id"]
        assert all(f"(run {run_id})" in msg for msg in refused), refused
        assert read_lease(out, options)["run_id"] == run_id
        held[0].release()
        assert read_lease(out, options) is None
    if store == "s3":  # every write of the lease object was conditional
        assert calls and all({"IfNoneMatch", "IfMatch"} & set(p) for p in calls), calls


def test_the_lease_is_renewed_while_held_and_a_taken_lease_is_noticed(tmp_path, s3_url):
    prefix, options = s3_url
    for out, opts in ((str(tmp_path / "run"), {}), (f"{prefix}/run", options)):
        lease = acquire_lease(out, opts, ttl_s=1.2)  # renewed every 0.3 s
        first = read_lease(out, opts)["renewed_at"]
        time.sleep(2.5)
        assert read_lease(out, opts)["renewed_at"] > first, "renewals move its date on"
        lease.check()
        fs, path = fsspec.core.url_to_fs(out, **opts)
        fs.rm_file(f"{path}/{LEASE_NAME}")  # another run took it and finished
        acquire_lease(out, opts, ttl_s=30)
        with pytest.raises(RuntimeError, match="was taken over"):
            lease.check()
        lease.release()  # leaves the other run's lease alone
        assert read_lease(out, opts) is not None


def test_a_write_that_fails_after_a_takeover_says_the_lease_was_lost(tmp_path):
    """A holder stopped between writing a temporary file and renaming it resumes after the new
    holder removed that file as an orphan: its rename fails, and it must say why (exit 1 with
    "was taken over", not a bare FileNotFoundError)."""
    out = str(tmp_path / "run")
    lease = acquire_lease(out, ttl_s=30)
    with lease.writing():  # held: the block runs
        (tmp_path / "run" / "first").write_text("kept")
    with pytest.raises(KeyError), lease.writing():  # held: a failing write keeps its error
        raise KeyError("not the lease")
    orphan = tmp_path / "run" / ".tmp-0123-run.json"
    orphan.write_text("{}")
    with pytest.raises(LeaseLost, match="was taken over") as caught, lease.writing():
        # Stalled here, past the time to live: another run took the lease ...
        os.remove(tmp_path / "run" / LEASE_NAME)
        acquire_lease(out, ttl_s=30)
        orphan.unlink()  # ... and cleared the orphans of interrupted writes; then it resumes
        os.replace(orphan, tmp_path / "run" / "run.json")
    assert isinstance(caught.value.__context__, FileNotFoundError)
    written: list[str] = []
    with pytest.raises(LeaseLost), lease.writing():  # and once lost, no later write starts
        written.append("run.json")
    assert written == [] and not (tmp_path / "run" / "run.json").exists()
    lease.release()
    assert read_lease(out) is not None, "the new holder's lease is left alone"


# ------------------------------------------------------------------ storage faults: one line


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_store_is_one_line_naming_it_and_exits_1(survey_url, model_path, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    config = tmp_path / "scan.yaml"
    config.write_text(
        f"survey_url: {survey_url}\nout: s3://bucket/run\nmodel: {model_path}\n"
        f"out_storage_options: {{key: AKIAEXAMPLE, secret: s3cr3t-value, "
        f"client_kwargs: {{endpoint_url: '{endpoint}'}}}}\n"
    )
    command = [sys.executable, "-m", "lenscan.cli", "scan", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "s3cr3t" not in done.stderr
    (line,) = _error_lines(done.stderr)
    assert f"lost the connection to the store at {endpoint}/bucket" in line
    assert "(EndpointConnectionError, after retries)" in line
    assert f"while working on s3://bucket/run and {survey_url}" in line
    assert "re-run the same command to resume" in line
    # Errors that are not a store's transport keep their own type and message.
    assert storage_failure(ValueError("bad cut"), "s3://b") is None
    assert storage_failure(TimeoutError("workers did not join"), "s3://b") is None


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(s3_url):
    """S3 applied the conditional PUT but the answer was cut; the client's retry then fails
    ``If-Match`` against the lease's new ETag. That is not a takeover."""
    from botocore.exceptions import HTTPClientError

    prefix, options = s3_url
    out = f"{prefix}/run"
    lease = acquire_lease(out, options, ttl_s=3600)  # its thread renews in 900 s: not here
    fs, _ = fsspec.core.url_to_fs(out, **options)
    cut: list[str] = []

    def cut_the_answer(model, **kwargs) -> None:
        if not cut:
            cut.append(model.name)
            raise HTTPClientError(error="connection reset after the PUT was applied")

    fs.s3.meta.events.register("after-call.s3.PutObject", cut_the_answer)
    try:
        lease.renew()
    finally:
        fs.s3.meta.events.unregister("after-call.s3.PutObject", cut_the_answer)
    assert cut == ["PutObject"]
    lease.check()
    assert read_lease(out, options)["run_id"] == lease.record["run_id"]
    lease.release()
    assert read_lease(out, options) is None
