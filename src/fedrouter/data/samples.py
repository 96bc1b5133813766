"""Samples and the file formats they come in (JSONL and CSV), with errors that name the file and line."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedrouter.errors import DataError

TASK_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


@dataclass(frozen=True)
class Sample:
    """One instruction/response pair. ``task`` is the true label, used only for splitting and scoring."""

    id: str
    instruction: str
    response: str
    task: str = "unknown"
    references: tuple[str, ...] = field(default_factory=tuple)

    @property
    def golds(self) -> tuple[str, ...]:
        """All gold answers (the response first)."""
        return self.references or (self.response,)


def _text_field(record: dict, name: str, where: str, *, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}' (expected a non-empty string)")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty (expected a non-empty string)")
    return value


def sample_from_record(record: object, where: str, default_id: str) -> Sample:
    """Validate one parsed record (a JSON object or CSV row) and build a Sample."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    instruction = _text_field(record, "instruction", where, required=True)
    response = _text_field(record, "response", where, required=True)
    task = _text_field(record, "task", where, required=False) or "unknown"
    if not TASK_NAME.match(task):
        raise DataError(f"{where}: field 'task' must be 1-64 letters, digits, '_' or '-', got {task!r}")
    sample_id = record.get("id", default_id)
    if not isinstance(sample_id, str | int) or isinstance(sample_id, bool):
        raise DataError(f"{where}: field 'id' must be a string or integer, got {type(sample_id).__name__}")
    refs = record.get("references")
    if refs is None or refs == "":
        references: tuple[str, ...] = ()
    elif isinstance(refs, str):  # CSV: a JSON list or a single answer
        try:
            parsed = json.loads(refs) if refs.lstrip().startswith("[") else [refs]
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'references' is not a JSON list of strings") from None
        references = _check_references(parsed, where)
    else:
        references = _check_references(refs, where)
    return Sample(str(sample_id), instruction, response, task, references)


def _check_references(refs: object, where: str) -> tuple[str, ...]:
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DataError(f"{where}: field 'references' must be a list of non-empty strings")
    return tuple(refs)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): {err.reason}") from None


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read a JSONL file: one object per line with ``instruction``, ``response`` and optional fields."""
    path = Path(path)
    samples: list[Sample] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        samples.append(sample_from_record(record, where, default_id=f"{path.stem}-{number}"))
    return _checked(samples, path)


def load_csv(path: str | Path) -> list[Sample]:
    """Read a CSV file with a header row naming at least ``instruction`` and ``response``."""
    path = Path(path)
    rows = csv.reader(_read_text(path).splitlines())
    try:
        header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header row and samples)") from None
    except csv.Error as err:
        raise DataError(f"{path}:1: invalid CSV: {err}") from None
    missing = {"instruction", "response"} - set(header)
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {sorted(missing)} (got {header})")
    samples: list[Sample] = []
    try:
        for row in rows:
            number = rows.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{number}: expected {len(header)} columns, got {len(row)}")
            record = {k: v for k, v in zip(header, row, strict=True) if v != "" or k in ("instruction", "response")}
            samples.append(sample_from_record(record, f"{path}:{number}", default_id=f"{path.stem}-{number}"))
    except csv.Error as err:
        raise DataError(f"{path}:{rows.line_num}: invalid CSV: {err}") from None
    return _checked(samples, path)


def _checked(samples: list[Sample], path: Path) -> list[Sample]:
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise DataError(f"{path}: duplicate id {sample.id!r} (samples {seen[sample.id] + 1} and {index + 1})")
        seen[sample.id] = index
    return samples


def load_file(path: str | Path) -> list[Sample]:
    """Read a ``.jsonl``/``.json`` or ``.csv`` file by its suffix."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path)
    if path.suffix == ".csv":
        return load_csv(path)
    raise DataError(f"{path}: unsupported data file type {path.suffix!r} (expected .jsonl or .csv)")
