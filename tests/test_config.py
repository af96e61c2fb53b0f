"""ScanConfig: YAML in, validation at the boundary, redacted provenance."""

import pytest
import yaml

from lenscan.config import ClusterSpec, ScanConfig
from lenscan.select import DES_JACOBS19_WIDE


def test_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "scan.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "scan": {
                    "survey_url": "s3://bucket/survey.zarr",
                    "out": "s3://bucket/run1",
                    "threshold": 0.9,
                    "storage_options": {"key": "AKIA", "secret": "hush", "anon": False},
                    "cluster": {"scheduler": "tcp://10.0.0.1:8786"},
                }
            }
        )
    )
    config = ScanConfig.from_yaml(path, threshold=0.8, model=None)
    assert config.threshold == 0.8
    assert config.colour_cut == DES_JACOBS19_WIDE  # the default cut (issue 11)
    assert isinstance(config.cluster, ClusterSpec)
    assert config.cluster.scheduler == "tcp://10.0.0.1:8786"
    d = config.to_dict()
    assert d["storage_options"] == {"anon": False}  # credentials are never recorded
    assert d["colour_cut"]["name"] == "des-jacobs19-wide"


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("threshold", 1.5, "threshold"),
        ("batch_size", 0, "batch_size"),
        ("device", "tpu", "device"),
        ("formats", ["parquet", "xlsx"], "formats"),
        ("colour_cut", "nope", "unknown colour cut"),
        ("tiles", "DES0001", "tiles"),
        ("model", "", "model"),
    ],
)
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ScanConfig(survey_url="/tmp/s", out="/tmp/o", **{field: value})


def test_unknown_keys_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown scan config fields"):
        ScanConfig.from_dict({"survey_url": "a", "out": "b", "treshold": 0.5})
    with pytest.raises(ValueError, match="cluster.n_workers"):
        ScanConfig.from_dict({"survey_url": "a", "out": "b", "cluster": {"n_workers": 0}})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        ScanConfig.from_yaml(tmp_path / "nope.yaml")


def test_workflow_files_are_valid():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].joinpath("workflows").glob("scan-*.yaml"))
    assert files, "workflows/ must hold at least one scan config"
    for f in files:
        assert isinstance(ScanConfig.from_yaml(f), ScanConfig)


def test_scan_des_yaml_documents_every_field_and_workflows_use_the_demo_cut():
    import dataclasses
    from pathlib import Path

    workflows = Path(__file__).parents[1] / "workflows"
    documented = yaml.safe_load((workflows / "scan-des.yaml").read_text())["scan"]
    assert set(documented) == {f.name for f in dataclasses.fields(ScanConfig)}
    # the demo's cut (lenscan demo builds its config from ScanConfig's defaults)
    default_cut = ScanConfig(survey_url="s", out="o").colour_cut.name
    for name in ("scan-des.yaml", "scan-demo.yaml"):
        assert ScanConfig.from_yaml(workflows / name).colour_cut.name == default_cut, name
