"""Schemathesis against the served OpenAPI schema: no generated request gets a 5xx.

Two real servers (uvicorn subprocesses on loopback): one with a survey, one without (where
``POST /score/positions`` must refuse cleanly). For every operation of the schema, Hypothesis
draws requests that follow the schema (positive) and requests that break it (negative); each
must get an answer that is not a server error and, where the schema describes it, conforms.
Examples are bounded so the whole run takes well under a minute.
"""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from lenscan.simulate import make_survey  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402
from tests.test_serve import bench  # noqa: E402

pytestmark = pytest.mark.timeout(300)
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/models"),
    ("POST", "/score"),
    ("POST", "/score/positions"),
]
MODES = {
    "positive": schemathesis.GenerationMode.POSITIVE,
    "negative": schemathesis.GenerationMode.NEGATIVE,
}


@pytest.fixture(scope="module", params=["with-survey", "no-survey"])
def served_schema(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    model = make_tiny_model(root / "tiny")
    args = [
        "--model",
        model,
        "--max-upload-mb",
        "1",
        "--max-stamps",
        "64",
        "--batch-window-ms",
        "1",
        "--torch-threads",
        "1",
    ]
    if request.param == "with-survey":
        url = str(root / "survey.zarr")
        make_survey(url, n_tiles=1, seed=3, tile_size_pix=256, lenses_per_tile=2)
        args += ["--survey", url]
    with bench.start_server(args) as base:
        yield request.param, base, schemathesis.openapi.from_url(f"{base}/openapi.json")


def test_positions_need_a_survey_and_say_how_to_give_one(served_schema):
    kind, base, _ = served_schema
    r = httpx.post(f"{base}/score/positions", json={"positions": [[40.0, -30.0]]}, timeout=60)
    if kind == "no-survey":
        assert r.status_code == 404 and "--survey URL" in r.json()["detail"]
    else:
        assert r.status_code == 200 and r.json()["results"][0]["tile"]


def test_the_schema_lists_every_operation(served_schema):
    served_schema = served_schema[2]
    found = {(op.ok().method.upper(), op.ok().path) for op in served_schema.get_all_operations()}
    assert set(OPERATIONS) <= found


CASES = [(m, p, "positive") for m, p in OPERATIONS] + [
    (m, p, "negative")
    for m, p in OPERATIONS
    if m == "POST"  # GETs take no input to break
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_generated_request_gets_a_server_error(served_schema, method, path, mode):
    operation = served_schema[2][path][method]
    checks = [not_a_server_error]
    if mode == "positive":
        checks.append(response_schema_conformance)

    @given(case=operation.as_strategy(generation_mode=MODES[mode]))
    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def call(case):
        case.call_and_validate(checks=checks)

    call()
