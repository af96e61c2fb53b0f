"""No credential reaches an output file, a log line or a message (issue 18; issue 25 row 3).

Secrets are passed in every form a user passes them: storage options flat and nested (keys,
secrets, session tokens, connection strings, headers), URL user info, signed query strings and
the environment. Every file a scan writes is then read as bytes, with the captured logs and the
command's output, and searched for each secret value.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from lenscan._secrets import safe_storage_options, safe_text, safe_url
from lenscan.cli import main
from lenscan.config import ScanConfig
from lenscan.simulate import make_survey
from lenscan.sweep.ledger import LedgerState
from lenscan.sweep.plan import plan_scan, write_run_record
from lenscan.sweep.reduce import candidate_table, failure_records, write_failures
from lenscan.table import CandidateTable, read_parquet_table
from tests.conftest import S3_BUCKET
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(420)

FORMATS = ["parquet", "fits", "votable", "ecsv"]
SECRET = "S3cr3tValue-0123456789abcdef"


@pytest.fixture(scope="module")
def survey_dir(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("secrets") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=5, tile_size_pix=256, lenses_per_tile=2)
    return url


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _leaks(root: Path, secrets: list[str]) -> list[tuple[str, str]]:
    """(file, secret) for every secret found in the bytes of any file under ``root``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in secrets:
            if secret.encode() in data:
                found.append((str(path.relative_to(root)), secret))
    return found


def _in_text(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


# ------------------------------------------------------------ every key spelling and nesting

#: (storage options, the secret values they carry): flat, nested, odd spellings.
OPTION_CASES = {
    "key-secret": ({"key": "AKIA" + SECRET, "secret": SECRET}, ["AKIA" + SECRET, SECRET]),
    "Secret": ({"Secret": SECRET}, [SECRET]),
    "AWS_SECRET_ACCESS_KEY": ({"AWS_SECRET_ACCESS_KEY": SECRET}, [SECRET]),
    "client_kwargs.aws_session_token": (
        {"client_kwargs": {"aws_session_token": SECRET, "region_name": "eu-west-1"}},
        [SECRET],
    ),
    "client_kwargs.headers.Authorization": (
        {"client_kwargs": {"headers": {"Authorization": f"Bearer {SECRET}"}}},
        [SECRET],
    ),
    "headers.X-Api-Key": ({"headers": {"X-Api-Key": SECRET}}, [SECRET]),
    "connection_string": (
        {
            "connection_string": "DefaultEndpointsProtocol=https;AccountName=acct;"
            f"AccountKey={SECRET};EndpointSuffix=core.windows.net"
        },
        [SECRET],
    ),
    "config_kwargs.s3.sse_key": ({"config_kwargs": {"s3": {"SSECustomerKey": SECRET}}}, [SECRET]),
    "list-of-tokens": ({"tokens": [SECRET, {"id_token": SECRET}]}, [SECRET]),
    "endpoint user info": (
        {"client_kwargs": {"endpoint_url": f"https://admin:{SECRET}@minio.example:9000"}},
        [SECRET],
    ),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_no_spelling_or_nesting_of_a_credential_reaches_config_run_json_or_a_table(
    case, survey_dir, model_path, tmp_path
):
    """The config dump, ``run.json``, ``failures.parquet`` and the candidate table in every
    format, written by the scan's own writers with a real plan of a real survey."""
    options, secrets = OPTION_CASES[case]
    out = tmp_path / "out"
    config = ScanConfig(
        survey_url=survey_dir, out=str(out), model=model_path, formats=FORMATS,
        storage_options=options, out_storage_options=options, threshold=0.0,
    )  # fmt: skip
    assert not _in_text(json.dumps(config.to_dict()) + repr(config), secrets)
    plan = plan_scan(config)  # a local store: fsspec takes (and ignores) the extra options
    write_run_record(plan, status="complete")
    failures = failure_records(plan, LedgerState(), [])
    write_failures(plan, failures)
    table = candidate_table(plan, None)
    table.write_all(str(out), formats=FORMATS)
    assert {"run.json", "failures.parquet", "candidates.fits"} <= {p.name for p in out.iterdir()}
    assert _leaks(out, secrets) == []
    run = json.loads((out / "run.json").read_text())
    if case != "endpoint user info":  # that one is recorded, cleaned
        assert run["storage_options_withheld"], "withheld options are recorded by name only"
    if case == "client_kwargs.aws_session_token":  # the reproducible part is kept
        assert run["config"]["storage_options"] == {"client_kwargs": {"region_name": "eu-west-1"}}
    if case == "endpoint user info":
        endpoint = run["config"]["storage_options"]["client_kwargs"]["endpoint_url"]
        assert endpoint == "https://minio.example:9000"


SIGNED_URLS = {
    "aws presigned": "https://bucket.s3.amazonaws.com/des.zarr?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIA{SECRET}%2F20261204&X-Amz-Security-Token={SECRET}t"
    f"&X-Amz-Signature={SECRET}s&versionId=7",
    "azure sas": "https://acct.blob.core.windows.net/c/des.zarr?sv=2022-11-02&ss=b&srt=co"
    f"&sp=rl&se=2026-12-31&st=2026-12-01&spr=https&sig={SECRET}%3D",
    "gcs signed": "https://storage.googleapis.com/b/des.zarr?X-Goog-Algorithm=GOOG4-RSA-SHA256"
    f"&X-Goog-Credential=sa%40p.iam&X-Goog-Signature={SECRET}g",
    "cloudfront": f"https://d1.cloudfront.net/des.zarr?Expires=1&Signature={SECRET}-&Key-Pair-Id=K",
    "user info": f"https://user:{SECRET}@data.example.org/des.zarr",
    "token param": f"https://data.example.org/des.zarr?access_token={SECRET}&format=zarr",
    "chained": f"simplecache::https://u:{SECRET}@data.example.org/des.zarr",
}


@pytest.mark.parametrize("case", sorted(SIGNED_URLS))
def test_signed_urls_and_user_info_never_reach_a_record_or_a_table(case, tmp_path):
    url = SIGNED_URLS[case]
    config = ScanConfig(survey_url=url, out=str(tmp_path / "out"), formats=FORMATS)
    record = json.dumps(config.to_dict())
    assert SECRET not in record and "des.zarr" in record
    host = url.split("::")[-1].split("/")[2].split("@")[-1]
    assert host in safe_url(url), "the host stays: it says where the data were"
    if case == "aws presigned":
        assert safe_url(url).endswith("des.zarr?versionId=7")
    # Meta written by every table format (the writers scrub whatever meta they are given).
    table = CandidateTable({"rank": [1], "score": [0.5]}, meta={"survey_url": url, "note": url})
    table.write_all(str(tmp_path / "tables"), formats=FORMATS)
    assert _leaks(tmp_path / "tables", [SECRET]) == []
    assert read_parquet_table(str(tmp_path / "tables" / "candidates.parquet")).meta["survey_url"]


def test_the_command_names_a_store_without_its_user_info_or_signature(tmp_path, capsys):
    """The one-line error about a missing store, printed by ``lenscan scan``."""
    url = f"{tmp_path}/missing.zarr?X-Amz-Signature={SECRET}&sig={SECRET}"
    spec = tmp_path / "scan.yaml"
    spec.write_text(yaml.safe_dump({"survey_url": url, "out": str(tmp_path / "out")}))
    assert main(["scan", "--config", str(spec), "--no-progress"]) == 2
    err = capsys.readouterr()
    assert "missing.zarr" in err.err and SECRET not in err.out + err.err


def test_safe_text_removes_secrets_a_message_echoes():
    ScanConfig(survey_url="s.zarr", out="o", storage_options={"Authorization": f"Bearer {SECRET}"})
    assert SECRET not in safe_text(f"request refused (header was Bearer {SECRET})")
    assert SECRET not in safe_text(f"Could not parse token {SECRET}")  # a remembered value
    kept = "tile DES0001+0001 failed: ValueError: bands ['z'] are missing"
    assert safe_text(kept) == kept


def test_allow_list_keeps_what_reproduces_a_run():
    options = {
        "anon": False, "requester_pays": True, "use_ssl": True, "version_aware": True,
        "default_block_size": 2**20, "key": "k", "profile": "survey-ro",
        "client_kwargs": {"endpoint_url": "http://u:p@127.0.0.1:9000", "region_name": "r"},
        "config_kwargs": {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 9}},
    }  # fmt: skip
    assert safe_storage_options(options) == {
        "anon": False, "requester_pays": True, "use_ssl": True, "version_aware": True,
        "default_block_size": 2**20, "profile": "survey-ro",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "r"},
        "config_kwargs": {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 9}},
    }  # fmt: skip


# ------------------------------------------------------------------ a live scan on loopback S3


def _s3_leaks(fs, prefix: str, secrets: list[str]) -> list[tuple[str, str]]:
    """(object, secret) for every secret found in the bytes of any object under ``prefix``."""
    fs.invalidate_cache()
    found = []
    for path in sorted(fs.find(prefix)):
        data = fs.cat_file(path)
        found += [(path, s) for s in secrets if s.encode() in data]
    return found


def test_a_scan_on_s3_with_real_credentials_writes_none_of_them(
    survey_dir, model_path, s3_server, tmp_path, monkeypatch, caplog, capfd
):
    """``lenscan scan`` on the moto S3 server: the survey read anonymously through an endpoint
    whose URL carries a proxy password, the output written with key, secret and session token,
    more secrets in the environment; one tile broken so the failure paths (the worker's log of
    the failed task, failures.parquet, the command's message) run too."""
    endpoint, _ = s3_server
    host = endpoint.split("://")[1]
    key, secret, token = f"AKIA{SECRET[:12]}", f"moto-{SECRET}", f"FwoG{SECRET}tok"
    proxy_password = f"px{SECRET}"
    env_secrets = {
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey=az{SECRET};",
        "LENSCAN_TEST_API_TOKEN": f"env-token-{SECRET}",
    }
    for name, value in env_secrets.items():
        monkeypatch.setenv(name, value)
    secrets = [key, secret, token, proxy_password, f"az{SECRET}", f"env-token-{SECRET}"]
    survey_options = {
        "anon": True,
        "client_kwargs": {
            "endpoint_url": f"http://proxyuser:{proxy_password}@{host}",
            "region_name": "us-east-1",
        },
    }
    out_options = {
        "key": key,
        "secret": secret,
        "client_kwargs": {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_session_token": token,
        },
    }
    fs = fsspec.filesystem("s3", **out_options)
    prefix = f"{S3_BUCKET}/secrets-{tmp_path.name}"
    fs.put(survey_dir, f"{prefix}/survey.zarr", recursive=True)
    broken = sorted(fs.ls(f"{prefix}/survey.zarr/tiles", detail=False))[0]
    fs.rm(f"{broken}/image/zarr.json")  # this tile fails at read time on the worker
    spec = tmp_path / "scan.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "survey_url": f"s3://{prefix}/survey.zarr",
                "out": f"s3://{prefix}/out",
                "model": model_path,
                "threshold": 0.0,
                "gallery_size": 3,
                "formats": FORMATS,
                "storage_options": survey_options,
                "out_storage_options": out_options,
                "cluster": {"n_workers": 1, "threads_per_worker": 1},
            }
        )
    )
    caplog.set_level(logging.INFO)
    code = main(["-v", "scan", "--config", str(spec), "--no-progress"])
    captured = capfd.readouterr()  # fd-level: worker processes' logs included
    logs = captured.out + captured.err + caplog.text
    assert code == 1, logs[-2000:]  # the broken tile failed; everything else was written
    assert "Compute Failed" in logs, "the worker logged the failed task"
    assert _in_text(logs, secrets) == []
    fs.invalidate_cache()
    names = {p.split("/out/", 1)[1] for p in fs.find(f"{prefix}/out")}
    assert {"run.json", "failures.parquet", "candidates.vot.xml", "candidates.ecsv"} <= names
    assert any(n.startswith("gallery/") for n in names) and any("scored/" in n for n in names)
    assert _s3_leaks(fs, f"{prefix}/out", secrets) == []
    run = json.loads(fs.cat_file(f"{prefix}/out/run.json"))
    config = run["config"]
    assert config["storage_options"] == {
        "anon": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }, "the reproducible fields (anonymous, endpoint host and port, region) are recorded"
    assert config["out_storage_options"] == {
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}
    }
    assert run["storage_options_withheld"] == []  # the survey's: nothing but a URL's user info
    assert run["out_storage_options_withheld"] == [
        "client_kwargs.aws_session_token", "key", "secret"
    ]  # fmt: skip
    assert run["summary"]["tiles_failed"] == 1 and run["summary"]["tiles_scanned"] == 1


# ------------------------------------------------------------------ the service


def test_the_service_echoes_no_credential_in_replies_or_logs(survey_dir, model_path, s3_server):
    """``lenscan serve`` of a survey read over HTTP from loopback S3 through a URL with a
    password and an API-key header: /health, /models and the 4xx replies that name the survey
    show neither, nor does the server's log."""
    httpx = pytest.importorskip("httpx")
    from benchmarks.bench_serve import _log_path, start_server

    endpoint, options = s3_server
    fs = fsspec.filesystem("s3", **options)
    prefix = f"{S3_BUCKET}/serve-secrets-{time.monotonic_ns()}"
    fs.put(survey_dir, f"{prefix}/survey.zarr", recursive=True)
    password, api_key = f"pw{SECRET}", f"hdr{SECRET}"
    host = endpoint.split("://")[1]
    url = f"http://reader:{password}@{host}/{prefix}/survey.zarr"
    storage = json.dumps({"headers": {"X-Api-Key": api_key}})
    args = ["--model", model_path, "--survey", url, "--storage-options", storage]
    with start_server([*args, "--log-level", "info"]) as base:
        with httpx.Client(base_url=base, timeout=60) as http:
            health = http.get("/health")
            replies = [
                health,
                http.get("/models"),
                http.post("/score/positions", json={"positions": [[10.0, 10.0]]}),
                http.post("/score/positions", json={"ids": [-12345]}),
            ]
            # A signed query in a request's path reaches only uvicorn's access log.
            signed = http.get("/models", params={"X-Amz-Signature": f"sig{SECRET}", "a": "1"})
        log = Path(_log_path(int(base.rsplit(":", 1)[1]))).read_text(errors="replace")
    assert signed.status_code == 200 and '"GET /models?' in log, log[-2000:]
    assert f"sig{SECRET}" not in log, "the access log prints the request's signature"
    assert health.status_code == 200 and health.json()["survey"].endswith("survey.zarr")
    assert host in health.json()["survey"]
    assert all(400 <= r.status_code < 500 for r in replies[2:]), [r.text for r in replies]
    assert "survey" in replies[2].json()["detail"]
    texts = [r.text for r in replies] + [log]
    assert [s for s in (password, api_key) for t in texts if s in t] == []


def test_a_log_record_filtered_while_the_secret_registry_is_locked_does_not_deadlock():
    """A garbage collection inside ``safe_text`` can make asyncio log an unclosed session on the
    same thread; that record's filter calls ``safe_text`` again (a scan hung here once)."""
    import threading

    from lenscan import _secrets

    results: list[str] = []

    def nested() -> None:
        with _secrets._seen_lock:
            results.append(safe_text(f"Bearer {SECRET}"))

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "safe_text deadlocked on the registry's lock"
    assert results and SECRET not in results[0]
