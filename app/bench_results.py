"""Recorded kernel benchmarks (benchmarks/results/*.json) turned into chart series. No Streamlit here.

A result file holds a list of measurement records (top level, or under "results"/"rows"/"records"),
each a flat object with a context length, a time in milliseconds, the implementation measured, and
optionally the stage and the shape. Records are grouped into one chart per (stage, shape) with one
line per implementation; everything else in the file is shown as its description.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MAX_FILE_BYTES = 8 << 20
_LENGTH = ("T", "seq_len", "length", "tokens", "context")
_TIME = ("ms", "median_ms", "time_ms", "ms_median")
_IMPL = ("impl", "provider", "implementation", "method", "name", "backend")
_GROUP = ("stage", "shape", "config", "dim", "head_dim")


class ResultsError(ValueError):
    """A result file that cannot be read as benchmark records."""


@dataclass(frozen=True)
class Recorded:
    description: str
    charts: dict[str, dict[str, tuple[list[int], list[float]]]]  # title -> implementation -> (lengths, ms)
    rows: list[dict]


def result_files(folder: Path = RESULTS_DIR) -> list[Path]:
    return sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else []


def _pick(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if n in record), None)


def load(path: Path) -> Recorded:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ResultsError(f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MB")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path.name} is not JSON: {err}") from None
    return parse(doc, name=path.name)


def parse(doc, *, name: str = "results") -> Recorded:
    records = doc
    meta = {}
    if isinstance(doc, dict):
        key = next((k for k in ("results", "rows", "records") if isinstance(doc.get(k), list)), None)
        if key is None:
            raise ResultsError(f"{name} has no list of records under results, rows or records")
        records = doc[key]
        meta = {k: v for k, v in doc.items() if k != key and not isinstance(v, list | dict)}
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ResultsError(f"{name}: the records must be a list of objects")
    charts: dict[str, dict[str, tuple[list[int], list[float]]]] = defaultdict(dict)
    for record in records:
        length, ms, impl = _pick(record, _LENGTH), _pick(record, _TIME), _pick(record, _IMPL)
        if not isinstance(length, int | float) or not isinstance(ms, int | float) or impl is None:
            continue
        title = " · ".join(f"{k} {record[k]}" for k in _GROUP if k in record) or "attention forward"
        xs, ys = charts[title].setdefault(str(impl), ([], []))
        xs.append(int(length))
        ys.append(float(ms))
    for series in charts.values():
        for impl, (xs, ys) in series.items():
            order = sorted(range(len(xs)), key=xs.__getitem__)
            series[impl] = ([xs[i] for i in order], [ys[i] for i in order])
    description = " · ".join(f"{k}: {v}" for k, v in meta.items()) or name
    return Recorded(description=description, charts=dict(charts), rows=records)
