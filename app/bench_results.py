"""Recorded kernel benchmarks (benchmarks/results/*.json) turned into chart series. No Streamlit here.

A result file holds a list of measurement records (top level, or under "results"/"rows"/"records"),
each a flat object with a context length and either (long form) a time in milliseconds with the
implementation measured, optionally its stage and shape, or (wide form) several fields named *_ms or
*_s. Long records are grouped into one chart per shape with one line per (stage, implementation);
wide ones into one chart with a line per field. The file's scalar fields (card, date, versions,
method) describe it.
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
_GROUP = ("shape", "config", "head_dim")  # one chart per shape
_STAGE = ("stage", "op")
# Stages named "tune:..." are kernel-configuration sweeps and "probe:..." copies of a kernel with parts
# taken out (benchmarks/probe_stages.py): listed in the table, left out of the charts.
_TABLE_ONLY_PREFIXES = ("tune:", "probe:")  # a stage is part of the line name: "nsa · triton"


class ResultsError(ValueError):
    """A result file that cannot be read as benchmark records."""


@dataclass(frozen=True)
class Recorded:
    description: str
    charts: dict[str, dict[str, tuple[list[int], list[float]]]]  # title -> implementation -> (lengths, ms)
    rows: list[dict]
    date: str = ""  # the file's "date" field (ISO), empty when it has none


def newest_first(recorded: dict[str, Recorded]) -> list[str]:
    """File names ordered for the picker: files with charts before table-only ones (tuning sweeps and
    probes), then the latest date first, then the most charts and records, so that the page opens on
    a chart and a day's full run comes before that day's partial sweeps and earlier cards' runs."""
    return sorted(recorded, key=lambda n: (bool(recorded[n].charts), recorded[n].date, len(recorded[n].charts),
                                           len(recorded[n].rows)), reverse=True)


def result_files(folder: Path = RESULTS_DIR) -> list[Path]:
    return sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else []


def _pick(record: dict, names: tuple[str, ...]):
    return next((record[n] for n in names if n in record), None)


def _measurements(record: dict, wide_title: str):
    """(chart title, line name, ms) of one record: long form (an implementation and its time) or wide
    form (one line per field named *_ms or *_s, seconds converted to milliseconds)."""
    ms, impl = _pick(record, _TIME), _pick(record, _IMPL)
    if isinstance(ms, int | float) and impl is not None:
        title = " · ".join(f"{k} {record[k]}" for k in _GROUP if k in record) or "attention forward"
        stage = _pick(record, _STAGE)
        if str(stage).startswith(_TABLE_ONLY_PREFIXES):
            return
        yield title, f"{stage} · {impl}" if stage is not None else str(impl), float(ms)
        return
    for key, value in record.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            if key.endswith("_ms"):
                yield wide_title, key[:-3], float(value)
            elif key.endswith("_s"):
                yield wide_title, key[:-2], float(value) * 1e3


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
    wide_title = str(meta.get("benchmark", "timings"))
    for record in records:
        length = _pick(record, _LENGTH)
        if not isinstance(length, int | float):
            continue
        for title, line, ms in _measurements(record, wide_title):
            xs, ys = charts[title].setdefault(line, ([], []))
            xs.append(int(length))
            ys.append(ms)
    for series in charts.values():
        for impl, (xs, ys) in series.items():
            order = sorted(range(len(xs)), key=xs.__getitem__)
            series[impl] = ([xs[i] for i in order], [ys[i] for i in order])
    description = " · ".join(f"{k}: {v}" for k, v in meta.items()) or name
    return Recorded(description=description, charts=dict(charts), rows=records, date=str(meta.get("date", "")))
