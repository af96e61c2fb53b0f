"""Schemathesis against the served OpenAPI schema: no generated request gets a 5xx.

Two real servers (uvicorn subprocesses on loopback): one with a survey, one without (where
``POST /score/positions`` must refuse cleanly). Examples are bounded so the run stays short.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.openapi.checks import response_schema_conformance  # noqa: E402

from lenscan.simulate import make_survey  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402
from tests.test_serve import bench  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["with-survey", "no-survey"])
def served_schema(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    model = make_tiny_model(root / "tiny")
    args = ["--model", model, "--max-upload-mb", "1", "--max-stamps", "64",
            "--batch-window-ms", "1", "--torch-threads", "1"]  # fmt: skip
    if request.param == "with-survey":
        url = str(root / "survey.zarr")
        make_survey(url, n_tiles=1, seed=3, tile_size_pix=256, lenses_per_tile=2)
        args += ["--survey", url]
    with bench.start_server(args) as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("served_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_no_generated_request_gets_a_server_error(case):
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])
