"""Bring your own model: exported graphs, plug-in architectures and timm, swept on real workers.

Every sweep here runs on a real LocalCluster with worker processes; the plug-in is a real package
built and installed by pip (into a folder put on the path), found through its entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from lenscan.models import create_model, load_model
from lenscan.models.checkpoint import export_model
from lenscan.models.commands import check_model
from lenscan.simulate import make_survey
from lenscan.sweep import scan
from lenscan.sweep.execute import ModelUnavailable
from tests.helpers import TINY_STAMP_PIX, make_tiny_model

pytestmark = pytest.mark.timeout(600)
PLUGIN = "lenscan_test_plugin"


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("survey") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=5, tile_size_pix=512, lenses_per_tile=6)
    return url


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def eager_table(survey_url, eager, cluster_client, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eager") / "run")
    return scan(survey_url, out=out, model=eager, threshold=0.0, client=cluster_client,
                progress=False)  # fmt: skip


def _assert_same_table(table, reference) -> None:
    assert len(table) == len(reference) > 0
    assert table["id"].tolist() == reference["id"].tolist()
    np.testing.assert_allclose(table["score"], reference["score"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["export", "onnx", "torchscript"])
def test_an_exported_model_scores_like_the_eager_one(eager, tmp_path, fmt):
    weights, meta_path = export_model(eager, tmp_path / "exported", fmt)
    assert weights.suffix == {"export": ".pt2", "onnx": ".onnx", "torchscript": ".pt"}[fmt]
    exported, original = load_model(meta_path), load_model(eager)
    assert exported.meta.runtime == fmt and exported.meta.bands == original.meta.bands
    assert json.loads(meta_path.read_text())["training"]["exported_from"]["sha256"] == (
        original.sha256
    )
    raw = torch.randn(37, 3, TINY_STAMP_PIX, TINY_STAMP_PIX) * 5 + 100
    x = original.normalise(raw)
    for dihedral in (False, True):
        torch.testing.assert_close(
            exported.score(x, batch_size=16, dihedral=dihedral),
            original.score(x, batch_size=16, dihedral=dihedral),
            atol=1e-5,
            rtol=0,
        )
    report = check_model(str(meta_path), batch=8)
    assert report["ok"] and report["shape"] == [8, 2] and report["runtime"] == fmt


@pytest.mark.parametrize("fmt", ["onnx", "export", "torchscript"])
def test_a_sweep_with_an_exported_model_equals_the_eager_sweep(
    survey_url, eager, eager_table, cluster_client, tmp_path, fmt
):
    _, meta_path = export_model(eager, tmp_path / "exported", fmt)
    table = scan(survey_url, out=str(tmp_path / "run"), model=str(meta_path), threshold=0.0,
                 client=cluster_client, progress=False)  # fmt: skip
    _assert_same_table(table, eager_table)
    assert table.meta["model_runtime"] == fmt


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """A real package registering an architecture by entry point, installed by pip into a folder."""
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "lenscan-test-plugin"
        version = "0.1"
        [project.entry-points."lenscan.architectures"]
        test-plugin-cnn = "{PLUGIN}:plugin_cnn"
        """))  # fmt: skip
    (src / PLUGIN).mkdir()
    (src / PLUGIN / "__init__.py").write_text(textwrap.dedent("""\
        from lenscan.models import JacobsCNN

        def plugin_cnn(*, in_chans, stamp_size_pix, **kwargs):
            return JacobsCNN(in_chans=in_chans, stamp_size_pix=stamp_size_pix, **kwargs)
        """))  # fmt: skip
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--target", str(site), str(src)],
        check=True, timeout=300,
    )  # fmt: skip
    assert (site / PLUGIN / "__init__.py").exists()
    return site


def _as_plugin(eager: str, architecture: str, tmp_path: Path) -> str:
    """The eager model's weights with its metadata naming the plug-in architecture."""
    stem = tmp_path / architecture.replace(":", "-")
    doc = json.loads(Path(eager + ".json").read_text())
    doc["architecture"] = architecture
    stem.with_suffix(".json").write_text(json.dumps(doc))
    stem.with_suffix(".safetensors").write_bytes(Path(eager + ".safetensors").read_bytes())
    return str(stem)


def test_a_plugin_architecture_sweeps_on_workers_that_have_its_package(
    survey_url, eager, eager_table, plugin_site, monkeypatch, tmp_path
):
    monkeypatch.syspath_prepend(str(plugin_site))  # workers started below inherit the path
    assert "test-plugin-cnn" in __import__("lenscan").models.list_architectures()
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as client,
    ):
        for arch in ("test-plugin-cnn", f"{PLUGIN}:plugin_cnn"):
            model = _as_plugin(eager, arch, tmp_path)
            out = str(tmp_path / f"run-{arch.replace(':', '-')}")
            table = scan(survey_url, out=out, model=model, threshold=0.0, client=client,
                         progress=False)  # fmt: skip
            _assert_same_table(table, eager_table)


def test_a_worker_without_the_plugin_is_named_before_any_tile_is_scored(
    survey_url, eager, plugin_site, monkeypatch, tmp_path
):
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as client,
    ):
        monkeypatch.syspath_prepend(str(plugin_site))  # the client has it, the worker does not
        model = _as_plugin(eager, f"{PLUGIN}:plugin_cnn", tmp_path)
        out = tmp_path / "run"
        with pytest.raises(ModelUnavailable) as err:
            scan(survey_url, out=str(out), model=model, client=client, progress=False)
        worker = next(iter(client.scheduler_info()["workers"]))
        assert worker in str(err.value) and f"'{PLUGIN}'" in str(err.value)
        assert not list(out.glob("scored/tile-*"))


def test_architecture_names_that_cannot_be_built_say_why():
    from lenscan.models.architectures import ArchitectureUnavailable, architecture_problem

    with pytest.raises(ArchitectureUnavailable, match="'no_such_pkg'"):
        create_model("no_such_pkg.nets:net", in_chans=3, stamp_size_pix=32)
    assert "no callable 'nothing'" in architecture_problem("lenscan.models:nothing")
    assert architecture_problem("jacobs-cnn") is None
    with pytest.raises(ValueError, match="unknown model architecture 'not-registered'"):
        create_model("not-registered", in_chans=3, stamp_size_pix=32)


def _timm_or_skip():
    try:
        import timm
    except Exception as exc:  # timm imports torchvision, which may be a build for another torch
        pytest.skip(f"timm cannot be imported here ({type(exc).__name__}: {exc})")
    return timm


def test_a_timm_architecture_is_a_lens_finder(tmp_path):
    _timm_or_skip()
    net = create_model("timm:resnet18", in_chans=5, stamp_size_pix=48)
    assert net(torch.zeros(3, 5, 48, 48)).shape == (3,)
    assert net.forward_head(net.forward_features(torch.zeros(2, 5, 48, 48))).shape == (2,)
