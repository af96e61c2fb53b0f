"""The notebooks in notebooks/, executed with a real Jupyter kernel on a tiny synthetic survey."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ORDER = ("01-sweep", "02-completeness", "03-grade-and-retrain", "04-known-lenses")
pytestmark = pytest.mark.timeout(600)


def _outputs(nb) -> str:
    """Text, HTML and the kinds of rich output of every cell, as one string to search."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts.append(data.get("text/plain", "") + data.get("text/html", ""))
            parts.extend(f"<{kind}>" for kind in data)
    return "\n".join(parts)


def test_committed_notebooks_have_no_outputs():
    for name in ORDER:
        nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), name


def test_notebooks_run_on_a_tiny_survey(tmp_path, monkeypatch, cluster_client):
    settings = {
        "LENSCAN_NB_WORK": str(tmp_path / "work"),
        "LENSCAN_NB_SCHEDULER": cluster_client.scheduler.address,
        "LENSCAN_NB_TILES": "2",
        "LENSCAN_NB_TILE_SIZE": "512",
        "LENSCAN_NB_PER_TILE": "10",
        "LENSCAN_NB_STEPS": "2",
        "LENSCAN_NB_SUPERSAMPLE": "1",
        "LENSCAN_NB_INSPECT": "0.0",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "OMP_NUM_THREADS": "1",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    text = {}
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbclient.NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # kept for reading failures
        text[name] = _outputs(nb)
    sweep = text["01-sweep"]
    assert "Dask dashboard: http" in sweep and "stamps scored in the tiles finished" in sweep
    assert "CandidateTable:" in sweep  # the table's HTML view
    assert sweep.count("<image/png>") == 3  # colour-colour, histogram, candidate grid
    completeness = text["02-completeness"]
    assert "arcs injected around real galaxies" in completeness
    assert "recovered" in completeness and completeness.count("<image/png>") == 1
    assert "completeness" in completeness  # the binned table
    graded = text["03-grade-and-retrain"]
    assert "stamps to grade: open" in graded and "'sha256':" in graded
    assert "'N': 0" not in graded  # the scripted grader found non-lenses to train on
    assert "false per 1000" in graded
    known = text["04-known-lenses"]
    assert "'n_known': 1" in known and "J0011-0845" in known
    assert "in_footprint" in known and "candidates matched in" in known
    assert known.count("<image/png>") == 1
    # The original survey was never written: injection went to a new store.
    assert (tmp_path / "work" / "injected.zarr").is_dir()
