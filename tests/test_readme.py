"""Every ```bash, ```sh and ```python block of README.md runs as written (the way doctests run
docstrings), so the documented commands cannot drift from the code.

Blocks run in order in one temporary folder that holds a copy of ``workflows/`` and the state
``make demo`` leaves (``demo-output/``: the demo run on a 2-tile survey instead of 4, so that
the whole file runs in about a minute). Shell blocks run under ``bash -e``, Python blocks as
``python script.py`` (so a missing ``__main__`` guard fails as it would for a user). A block
that needs a cloud account, a GPU, a cluster or a long run says so in the markdown, just above
it, with ``<!-- readme-test: skip (why) -->``; the test reports it as skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lenscan.simulate import make_survey

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md",)
LANGUAGES = ("bash", "sh", "python")
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!--\s*readme-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->\s*$")

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text and its marker."""

    document: str
    line: int
    language: str
    text: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}:{self.language}"


def extract_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the ``readme-test`` marker just above each."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = lines[i - 1].strip() if i else ""
        mark = _MARK.match(above)
        if mark and mark.group(1) != "skip":
            raise ValueError(f"{path.name}:{i}: unknown readme-test marker {above!r}")
        if mark and not mark.group(2):
            raise ValueError(f"{path.name}:{i}: a skipped block must say why: skip (reason)")
        text = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(path.name, i + 1, m.group(1), text, mark.group(2) if mark else None))
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCUMENTS for b in extract_blocks(REPO / doc) if b.language in LANGUAGES]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # `lenscan` and `python` as a user's activated venv would give them
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A folder as a newcomer's clone is after ``make demo`` (on a 2-tile survey)."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "workflows", root / "workflows")
    make_survey(str(root / "demo-output" / "survey.zarr"), n_tiles=2, seed=2019, tile_size_pix=1024)
    demo = subprocess.run(
        [sys.executable, "-m", "lenscan.cli", "demo", "--out", "demo-output"],
        cwd=root, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert "using the synthetic survey already at" in demo.stdout
    return root


def test_markers_parse_and_every_skip_names_a_reason():
    readme = [b for b in BLOCKS if b.document == "README.md"]
    assert any(b.skip is None for b in readme), "README.md must have blocks that run"
    assert all(b.skip.strip() for b in readme if b.skip is not None)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_written(block: Block, clone: Path):
    if block.skip is not None:
        pytest.skip(f"{block.id} is marked in the markdown: {block.skip}")
    if block.language == "python":
        script = clone / f"readme_{block.line}.py"
        script.write_text(block.text)
        command = [sys.executable, script.name]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    run = subprocess.run(
        command, cwd=clone, env=_env(), capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, (
        f"{block.id} failed (exit {run.returncode}):\n{block.text}\n"
        f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    )
