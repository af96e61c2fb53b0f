"""Visual grades of candidates: read graders' CSV files, merge them, turn them into labels.

The inspection page (:mod:`lenscan.gallery`) exports one CSV per grader with the columns
:data:`CSV_COLUMNS`. Grades are ``A`` (certainly a lens), ``B`` (probably), ``C`` (possibly) and
``N`` (not a lens), scored 3, 2, 1 and 0 (:data:`GRADE_SCORES`) for the mean.
:func:`merge_grades` combines several graders (a grader's latest grade of a candidate wins) into
one row per candidate, :func:`join_candidates` puts them onto the candidate table, and
:func:`grade_labels` turns the merged grades into training labels (A/B lenses, N non-lenses).
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from astropy.table import Table, join

from lenscan._io import atomic_write_bytes

__all__ = [
    "CSV_COLUMNS",
    "DISAGREE_SPREAD",
    "GRADE_SCORES",
    "GradedExamples",
    "GradedMix",
    "add_grades_arguments",
    "file_sha256",
    "grade_labels",
    "grades_sha256",
    "join_candidates",
    "load_graded_examples",
    "merge_grades",
    "merge_to_file",
    "read_grade_csv",
    "run_grades_cli",
    "write_scripted_grades",
]

#: Columns of a grader's CSV file, in the order the inspection page writes them.
CSV_COLUMNS = ("id", "tile", "ra", "dec", "grade", "grader", "time")
#: Numerical value of each grade (for the mean grade).
GRADE_SCORES = {"A": 3, "B": 2, "C": 1, "N": 0}
#: Graders disagree when their grades of one candidate differ by at least this much.
DISAGREE_SPREAD = 2


def read_grade_csv(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Read one grader's CSV file into a list of checked rows.

    Raises
    ------
    ValueError
        When the file is not UTF-8 text (a Parquet table, say), a column is missing or a row
        holds a bad grade, id or coordinate; the message names the file and line.
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        kind = " (it is a Parquet file)" if data[:4] == b"PAR1" else ""
        raise ValueError(
            f"{url}: not a lenscan grades CSV file{kind}: give the .csv files the inspection "
            "page exports (its 'export CSV' button)"
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"{url}: not a lenscan grades file: missing column(s) {missing} "
            f"(need {list(CSV_COLUMNS)}, got {reader.fieldnames})"
        )
    rows = []
    for line, raw in enumerate(reader, start=2):
        rows.append(_check_row(raw, f"{url}, line {line}"))
    return rows


def _check_row(raw: Mapping[str, str], where: str) -> dict[str, Any]:
    grade = (raw["grade"] or "").strip().upper()
    if grade not in GRADE_SCORES:
        raise ValueError(f"{where}: grade {raw['grade']!r} is not one of {list(GRADE_SCORES)}")
    grader = (raw["grader"] or "").strip()
    if not grader:
        raise ValueError(f"{where}: the grader column is empty")
    try:
        row: dict[str, Any] = {
            "id": int(raw["id"]),
            "ra": float(raw["ra"]),
            "dec": float(raw["dec"]),
        }
    except ValueError as exc:
        raise ValueError(f"{where}: bad id, ra or dec ({exc})") from None
    row.update(tile=str(raw["tile"]).strip(), grade=grade, grader=grader, time=raw["time"] or "")
    return row


def merge_grades(urls: Sequence[str], *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """Merge graders' CSV files into one row per graded candidate.

    A grader who graded a candidate more than once (in one file or several) counts once, with
    the latest grade (by the ``time`` column, ISO 8601).

    Returns
    -------
    astropy.table.Table
        Columns ``tile, id, ra, dec, n_graders, mean_grade, min_grade, max_grade, grade``
        (the consensus letter nearest the mean), ``disagree`` (grades differ by at least
        :data:`DISAGREE_SPREAD`) and ``grades`` (``grader:letter`` pairs); ``meta`` records the
        files and their SHA-256.
    """
    if not urls:
        raise ValueError("merge_grades: give at least one grades CSV file")
    latest: dict[tuple[str, int, str], dict[str, Any]] = {}
    for url in urls:
        for row in read_grade_csv(url, storage_options=storage_options):
            key = (row["tile"], row["id"], row["grader"])
            if key not in latest or row["time"] >= latest[key]["time"]:
                latest[key] = row
    by_candidate: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (tile, ident, _), row in sorted(latest.items()):
        by_candidate.setdefault((tile, ident), []).append(row)
    table = Table(rows=[_merge_one(rows) for rows in by_candidate.values()], names=_MERGED_NAMES)
    if not len(table):
        table = Table(names=_MERGED_NAMES, dtype=_MERGED_DTYPES)
    table["mean_grade"].info.description = "mean grade (A=3, B=2, C=1, N=0)"
    table.meta["grade_files"] = list(urls)
    table.meta["grade_files_sha256"] = grades_sha256(urls, storage_options=storage_options)
    return table


_MERGED_NAMES = (
    "tile", "id", "ra", "dec", "n_graders", "mean_grade", "min_grade", "max_grade", "grade",
    "disagree", "grades",
)  # fmt: skip
_MERGED_DTYPES = (str, np.int64, float, float, np.int32, float, np.int8, np.int8, str, bool, str)


def _merge_one(rows: Sequence[Mapping[str, Any]]) -> tuple:
    scores = np.array([GRADE_SCORES[r["grade"]] for r in rows])
    mean = float(scores.mean())
    letters = {v: k for k, v in GRADE_SCORES.items()}
    return (
        rows[0]["tile"],
        rows[0]["id"],
        rows[0]["ra"],
        rows[0]["dec"],
        len(rows),
        mean,
        int(scores.min()),
        int(scores.max()),
        letters[int(np.floor(mean + 0.5))],
        bool(scores.max() - scores.min() >= DISAGREE_SPREAD),
        ";".join(f"{r['grader']}:{r['grade']}" for r in rows),
    )


def grades_sha256(urls: Sequence[str], *, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 over the bytes of the given files, in the order given."""
    digest = hashlib.sha256()
    for url in urls:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            digest.update(fh.read())
    return digest.hexdigest()


def join_candidates(candidates: Table, merged: Table) -> Table:
    """Left-join merged grades onto the candidate table by ``(tile, id)``.

    Ungraded candidates get ``n_graders = 0`` and an empty ``grade``.

    Raises
    ------
    ValueError
        When a graded candidate is not in the table (grades from another scan).
    """
    keys = {(str(t), int(i)) for t, i in zip(candidates["tile"], candidates["id"], strict=True)}
    stray = [
        (str(t), int(i))
        for t, i in zip(merged["tile"], merged["id"], strict=True)
        if (str(t), int(i)) not in keys
    ]
    if stray:
        raise ValueError(
            f"{len(stray)} graded candidate(s) are not in the candidate table, e.g. (tile, id) = "
            f"{stray[:3]}: were the grades made on another scan's page?"
        )
    left = Table(candidates, copy=True)
    left["tile"] = np.asarray(left["tile"]).astype(str)
    right = Table(merged, copy=True)
    right.remove_columns(["ra", "dec"])
    right.meta = {}
    out = join(left, right, keys=("tile", "id"), join_type="left", metadata_conflicts="silent")
    fills = {"n_graders": 0, "grade": "", "grades": "", "disagree": False}
    for name in right.colnames:
        if name in ("tile", "id") or not hasattr(out[name], "mask"):
            continue
        out[name] = out[name].filled(fills.get(name, np.nan if out[name].dtype.kind == "f" else -1))
    if "rank" in out.colnames:
        out.sort("rank")
    out.meta.update(merged.meta)
    return out


def merge_to_file(
    csv_urls: Sequence[str],
    out: str,
    *,
    candidates: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Table:
    """``lenscan grades merge``: merge CSV files, join onto ``candidates``, write ``out``."""
    from lenscan.table import read_parquet_table, write_table

    merged = merge_grades(csv_urls, storage_options=storage_options)
    table = merged
    if candidates:
        cand = read_parquet_table(candidates, storage_options=storage_options)
        table = join_candidates(cand, merged)
        table.meta["candidates"] = candidates
    fmt = posixpath.splitext(out)[1].lstrip(".").lower()
    if fmt != "parquet":
        raise ValueError(f"--out {out!r}: grades are written as Parquet (a .parquet name)")
    write_table(table, out, "parquet", storage_options=storage_options)
    return table


def grade_labels(graded: Table) -> tuple[np.ndarray, np.ndarray]:
    """Training labels from merged grades: indices of usable rows and their labels.

    Consensus A or B is a lens (1), N a non-lens (0); C and ungraded rows are left out.
    """
    if "grade" not in graded.colnames:
        raise ValueError(
            f"not a merged grades table: no 'grade' column (has {graded.colnames}); "
            "make one with `lenscan grades merge`"
        )
    letters = np.asarray(graded["grade"]).astype(str)
    rows = np.flatnonzero(np.isin(letters, ["A", "B", "N"]))
    return rows, (letters[rows] != "N").astype(np.int64)


def add_grades_arguments(parser: Any) -> None:
    """Register ``lenscan grades merge`` on an argparse parser."""
    sub = parser.add_subparsers(dest="grades_command", required=True)
    p = sub.add_parser("merge", help="merge graders' CSV files into one Parquet table")
    p.add_argument("csv", nargs="+", help="grades CSV files exported by the inspection page")
    p.add_argument("--out", required=True, help="merged table to write (.parquet)")
    p.add_argument(
        "--candidates", help="candidate table (OUT/candidates.parquet) to join the grades onto"
    )


def run_grades_cli(args: Any) -> int:
    """Run ``lenscan grades merge`` from parsed arguments."""
    table = merge_to_file(args.csv, args.out, candidates=args.candidates)
    graded = table[np.asarray(table["n_graders"]) > 0]
    counts = {g: int(np.sum(np.asarray(graded["grade"]) == g)) for g in GRADE_SCORES}
    print(
        f"{len(graded)} graded candidates from {len(args.csv)} file(s): "
        + ", ".join(f"{g} {n}" for g, n in counts.items())
        + f"; {int(np.sum(graded['disagree']))} with disagreeing graders"
    )
    print(f"written to {args.out}")
    return 0


# --------------------------------------------------------------------------------------
# Grades as training examples (``lenscan train --grades``)
# --------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    """SHA-256 of one file's bytes (recorded in the model metadata)."""
    with fsspec.open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@dataclass
class GradedExamples:
    """Normalised stamps of graded candidates and their labels (1 lens, 0 not a lens)."""

    x: Any
    y: Any
    info: dict[str, Any]


def load_graded_examples(
    path: str,
    *,
    bands: Sequence[str],
    stamp_size_pix: int,
    normalisation: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> GradedExamples:
    """Cut and normalise the stamps of a merged grades table's A/B (lens) and N (non-lens) rows.

    The stamps come from the survey the candidates were found in (``meta["survey_url"]``, which
    ``lenscan grades merge --candidates`` carries over), at the positions in the table.
    """
    import torch

    from lenscan.stamps import normalise_stamps
    from lenscan.survey import open_survey, read_model_stamps
    from lenscan.table import read_parquet_table

    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(p):
        raise FileNotFoundError(
            f"grades file {path} not found (make it with `lenscan grades merge`)"
        )
    table = read_parquet_table(path, storage_options=storage_options)
    rows, labels = grade_labels(table)
    survey_url = table.meta.get("survey_url")
    missing = [c for c in ("tile", "x", "y") if c not in table.colnames]
    if not survey_url or missing:
        raise ValueError(
            f"{path}: the grades are not joined onto a candidate table (no survey_url or columns "
            f"{missing}); merge with `lenscan grades merge ... --candidates OUT/candidates.parquet`"
        )
    if rows.size == 0:
        raise ValueError(f"{path}: no candidate graded A, B or N; nothing to train on")
    scan_config = table.meta.get("config") or {}
    survey = open_survey(survey_url, storage_options=scan_config.get("storage_options") or None)
    used = table[rows]
    stamps = np.zeros((rows.size, len(bands), stamp_size_pix, stamp_size_pix), np.float32)
    tiles = np.asarray(used["tile"]).astype(str)
    for tile_id in dict.fromkeys(tiles.tolist()):
        sel = np.flatnonzero(tiles == tile_id)
        px = np.asarray(used["x"], dtype=np.float64)[sel]
        py = np.asarray(used["y"], dtype=np.float64)[sel]
        # As the scan scored them: masked pixels blanked.
        tile = survey.tile(tile_id)
        stamps[sel], _, _ = read_model_stamps(tile, px, py, stamp_size_pix, bands=bands)
    x = normalise_stamps(torch.from_numpy(stamps), normalisation)
    info = {
        "file": str(path),
        "sha256": file_sha256(path),
        "n_lenses": int(labels.sum()),
        "n_nonlenses": int((labels == 0).sum()),
        "survey_url": survey_url,
    }
    return GradedExamples(x=x, y=torch.from_numpy(labels.astype(np.float32)), info=info)


class GradedMix:
    """A stamp source whose batches replace a fraction of the simulated stamps by graded ones.

    The simulated classes stay in every batch (so the model does not forget them); the graded
    stamps (drawn with replacement) bring the hard negatives the survey really contains.
    """

    def __init__(self, source: Any, graded: GradedExamples, fraction: float) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"the graded fraction of a batch must be in (0, 1), got {fraction}")
        self.source, self.graded, self.fraction = source, graded, fraction

    @property
    def n_simulated(self) -> int:
        return self.source.n_simulated

    def next(self, gen: Any) -> tuple[Any, Any]:
        """``(x, y)`` of one batch: simulated stamps with ``fraction`` of them graded ones."""
        import torch

        x, y = self.source.next(gen)
        m = max(1, round(self.fraction * len(y)))
        idx = torch.randint(0, len(self.graded.y), (m,), generator=gen, device=gen.device).cpu()
        x = x.clone()
        y = y.clone()
        x[:m] = self.graded.x[idx].to(x.device, x.dtype)
        y[:m] = self.graded.y[idx].to(y.device, y.dtype)
        return x, y


def write_scripted_grades(
    candidates: Table,
    lens_ids: Sequence[int],
    url: str,
    *,
    possible_ids: Sequence[int] = (),
    grader: str = "truth",
    time: str = "1970-01-01T00:00:00Z",
) -> int:
    """Write a grades CSV for ``candidates`` as a grader who knows the lenses would.

    Candidates whose ``id`` is in ``lens_ids`` (e.g. a simulation's injected lenses) are graded
    ``A``, those in ``possible_ids`` (e.g. companions, whose stamps hold a neighbour's arcs)
    ``C``, all others ``N``. Returns the number of rows written.
    """
    known = set(int(i) for i in lens_ids)
    possible = set(int(i) for i in possible_ids)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    for row in candidates:
        ident = int(row["id"])
        grade = "A" if ident in known else "C" if ident in possible else "N"
        writer.writerow(
            [int(row["id"]), str(row["tile"]), repr(float(row["ra"])), repr(float(row["dec"])),
             grade, grader, time]
        )  # fmt: skip
    atomic_write_bytes(url, buf.getvalue().encode("utf-8"))
    return len(candidates)
