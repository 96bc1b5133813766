"""Users' data as they hold it: files read by Hugging Face ``datasets``, rows turned into samples by a format
and a column map, and no field dropped without being told to.

Files: JSON Lines or a JSON array (``.jsonl``, ``.json``), ``.csv``, ``.parquet`` and ``save_to_disk`` folders,
all through ``datasets`` (one reader for every type, as the ecosystem reads them). Formats, in the vocabulary of
LlamaFactory's ``dataset_info.json``:

- ``plain``: a prompt and a response per row;
- ``alpaca``: instruction, optional input (Dolly's ``context``) and output; a non-empty input is joined to the
  instruction after a blank line (``INPUT_JOIN``), the way Alpaca's template sets it apart;
- ``messages``: a chat per row, OpenAI ``messages`` ({role, content}) or ShareGPT ``conversations``
  ({from, value}); it must end with a user turn and the assistant's answer.

Every column either has a role (the format's known names, or ``data.columns.ROLE``), is named in
``data.ignore_columns``, or is an error that names it and both settings.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrouter.data.samples import NO_TASK, TASK_NAME, DataError, Sample

log = logging.getLogger("fedrouter")

FORMATS = ("auto", "plain", "alpaca", "messages")
INPUT_JOIN = "\n\n"
# A column's role and the names it goes by when no data.columns.ROLE is set (first match wins, two is an error).
KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "prompt": ("instruction", "prompt"),
    "input": ("input", "context"),
    "response": ("response", "output", "completion"),
    "system": ("system",),
    "messages": ("messages", "conversations"),
    "task": ("task", "category"),
    "client": ("client",),
    "id": ("id",),
    "references": ("references",),
}
ROLES = tuple(KNOWN_NAMES)
_COMMON = ("system", "task", "client", "id", "references")
FORMAT_ROLES: dict[str, tuple[str, ...]] = {
    "plain": ("prompt", "response", *_COMMON),
    "alpaca": ("prompt", "input", "response", *_COMMON),
    "messages": ("messages", *_COMMON),
}
REQUIRED: dict[str, tuple[str, ...]] = {"plain": ("prompt", "response"), "alpaca": ("prompt", "response")}
REQUIRED["messages"] = ("messages",)
# A chat turn's speaker as OpenAI and ShareGPT write it.
TURN_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Reading:
    """How rows become samples: ``data.format``, ``data.columns.*`` and ``data.ignore_columns``."""

    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (role, column) the user mapped
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Reading:
        columns = tuple((role, cfg[f"data.columns.{role}"]) for role in ROLES if cfg[f"data.columns.{role}"])
        ignore = tuple(c.strip() for c in cfg["data.ignore_columns"].split(",") if c.strip())
        return cls(cfg["data.format"], columns, ignore)


@dataclass(frozen=True)
class Layout:
    """The format of one table and the column of each role it reads."""

    format: str
    columns: dict[str, str]
    ignored: tuple[str, ...]
    detected: bool

    def describe(self) -> str:
        how = "detected" if self.detected else "data.format"
        mapped = ", ".join(f"{role}={column!r}" for role, column in self.columns.items())
        ignored = f"; ignored: {', '.join(self.ignored)}" if self.ignored else ""
        return f"format {self.format!r} ({how}); columns {mapped}{ignored}"


@dataclass
class Table:
    """One file's (or saved split's) rows, with the name errors use for it."""

    where: str
    rows: Any  # a datasets.Dataset
    stem: str


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


# --- reading tables -----------------------------------------------------------------------------------------


def read_file(path: Path) -> Table:
    """One data file as a ``datasets.Dataset``; errors name the file (and the line, for bad JSON)."""
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if builder != "parquet":
        _check_text(path, builder)
    try:
        # A throw-away cache, the rows kept in memory: datasets' cache knows a file by its path, size and
        # time stamp, which a file rewritten within one clock tick keeps, and would serve the old rows.
        with tempfile.TemporaryDirectory(prefix="fedrouter-data-") as cache:
            rows = _datasets().load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
    except Exception as err:  # datasets and pyarrow raise many kinds; the cause is named below
        raise DataError(f"{path}: could not be read as {builder}: {_root_cause(err)}") from None
    if len(rows) == 0:
        raise DataError(f"{path}: no samples (the file is empty)")
    return Table(str(path), rows, path.stem)


def _check_text(path: Path, builder: str) -> None:
    """UTF-8 and (for JSON) valid syntax, checked here so the error can name the line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): {err.reason}") from None
    if not text.strip():
        raise DataError(f"{path}: no samples (the file is empty)")
    if builder != "json":
        return
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        _check_objects(path, rows, lambda i: f"{path} row {i + 1}")
        return
    parsed = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
    for number, row in parsed:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")


def _check_objects(path: Path, rows: object, where) -> None:
    if not isinstance(rows, list):
        raise DataError(f"{path}: a .json file holds JSON Lines or one array of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where(i)}: expected a JSON object, got {type(row).__name__}")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _split_files(folder: Path, split: str) -> list[Path]:
    """``split.jsonl``, ``split-00000-of-00002.parquet`` (the hub's layout, also under ``data/``) and the like."""
    found = []
    for place in (folder, folder / "data"):
        for path in sorted(place.glob(f"{split}*")):
            rest = path.name[len(split) :]
            if path.is_file() and path.suffix.lower() in SUFFIXES and rest[:1] in (".", "-", "_"):
                found.append(path)
    return found


def read_source(path: Path) -> dict[str, list[Table]]:
    """A file or folder as tables per split: ``train`` and ``test``, or ``all`` when it holds no split."""
    if path.is_file():
        return {"all": [read_file(path)]}
    if not path.is_dir():
        raise DataError(f"data source {path} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path)
    splits = {split: _split_files(path, split) for split in SPLITS}
    if not splits["test"]:
        splits["test"] = _split_files(path, "validation")
    if splits["train"] and splits["test"]:
        return {split: [read_file(f) for f in files] for split, files in splits.items()}
    if splits["train"] or splits["test"]:
        have = "train" if splits["train"] else "test"
        raise DataError(f"{path}: has {have} files but no {'test' if have == 'train' else 'train'} files")
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(SUFFIXES)}) and no `datasets` save_to_disk folder")
    return {"all": [read_file(f) for f in files]}


def _read_saved(path: Path) -> dict[str, list[Table]]:
    datasets = _datasets()
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: could not be read as a `datasets` save_to_disk folder: {_root_cause(err)}") from None
    if isinstance(saved, datasets.Dataset):
        return {"all": [Table(str(path), saved, path.name)]}
    names = list(saved)
    test = "test" if "test" in saved else "validation" if "validation" in saved else None
    if "train" in saved and test:
        return {"train": [Table(f"{path} (split train)", saved["train"], "train")], "test": [_saved(saved, path, test)]}
    if len(names) == 1:
        return {"all": [_saved(saved, path, names[0])]}
    raise DataError(f"{path}: splits {names}: expected 'train' and 'test' (or 'validation'), or a single split")


def _saved(saved, path: Path, split: str) -> Table:
    return Table(f"{path} (split {split})", saved[split], split)


# --- columns and formats ------------------------------------------------------------------------------------


def resolve_layout(columns: Iterable[str], reading: Reading, where: str) -> Layout:
    """Which column plays which role, or an error naming every column that nothing would read."""
    columns = list(columns)
    mapped = dict(reading.columns)
    for role, column in mapped.items():
        if column not in columns:
            raise DataError(f"setting 'data.columns.{role}': no column {column!r} in {where} (columns: {columns})")
    ignored = tuple(c for c in columns if c in reading.ignore)
    clash = [c for c in ignored if c in mapped.values()]
    if clash:
        raise DataError(f"settings 'data.columns.*' and 'data.ignore_columns' both name {clash}")

    def find(role: str) -> str | None:
        if role in mapped:
            return mapped[role]
        free = [c for c in KNOWN_NAMES[role] if c in columns and c not in ignored and c not in mapped.values()]
        if len(free) > 1:
            raise DataError(
                f"{where}: columns {free} could each be the {role}: choose one with data.columns.{role}=COLUMN "
                f"and put the other in data.ignore_columns"
            )
        return free[0] if free else None

    fmt, detected = reading.format, reading.format == "auto"
    if detected:
        fmt = "messages" if find("messages") else "alpaca" if find("input") else "plain"
    unread = [role for role in mapped if role not in FORMAT_ROLES[fmt]]
    if unread:
        raise DataError(
            f"setting 'data.columns.{unread[0]}': format {fmt!r} reads no {unread[0]} "
            f"(its roles: {', '.join(FORMAT_ROLES[fmt])})"
        )
    layout = {role: column for role in FORMAT_ROLES[fmt] if (column := find(role))}
    for role in REQUIRED[fmt]:
        if role not in layout:
            raise DataError(
                f"{where}: format {fmt!r} needs a {role} column (known names: {', '.join(KNOWN_NAMES[role])}; "
                f"or set data.columns.{role}=COLUMN); the columns are {columns}"
            )
    unknown = [c for c in columns if c not in layout.values() and c not in ignored]
    if unknown:
        roles = ", ".join(r for r in FORMAT_ROLES[fmt] if r not in layout)
        raise DataError(
            f"{where}: column(s) {unknown} are read by nothing in format {fmt!r}: map each to a role with "
            f"data.columns.ROLE=COLUMN (free roles: {roles or 'none'}; data.format chooses another format) or "
            f"leave it out on purpose with data.ignore_columns={','.join(unknown)}"
        )
    return Layout(fmt, layout, ignored, detected)


def table_samples(table: Table, reading: Reading) -> tuple[list[Sample], Layout]:
    """Every row of a table as a sample, or an error naming the table, row and field."""
    layout = resolve_layout(table.rows.column_names, reading, table.where)
    samples = [
        row_sample(row, layout, f"{table.where} row {i + 1}", f"{table.stem}-{i + 1}")
        for i, row in enumerate(table.rows.to_list())
    ]
    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise DataError(f"{table.where}: duplicate id {sample.id!r} (rows {seen[sample.id] + 1} and {index + 1})")
        seen[sample.id] = index
    return samples, layout


def row_sample(row: Mapping[str, Any], layout: Layout, where: str, default_id: str) -> Sample:
    """One row as a sample under ``layout``."""
    cols = layout.columns
    system = _text(row, cols.get("system"), where, required=False)
    context: tuple[tuple[str, str], ...] = (("system", system),) if system else ()
    if layout.format == "messages":
        context, instruction, response = _chat(row[cols["messages"]], cols["messages"], where, context)
    else:
        instruction = _text(row, cols["prompt"], where, required=True)
        extra = _text(row, cols.get("input"), where, required=False)
        if extra and extra.strip():
            instruction = instruction + INPUT_JOIN + extra
        response = _text(row, cols["response"], where, required=True)
    task = _label(row, cols.get("task"), where) or NO_TASK
    if not TASK_NAME.match(task):
        raise DataError(
            f"{where}: field '{cols['task']}' (the task) must be 1-64 letters, digits, '_' or '-', got {task!r}"
        )
    sample_id = _label(row, cols.get("id"), where) or default_id
    client = _label(row, cols.get("client"), where)
    references = _references(row, cols.get("references"), where)
    return Sample(sample_id, instruction, response, task, references, context, client)


def _text(row: Mapping[str, Any], column: str | None, where: str, *, required: bool) -> str | None:
    value = row.get(column) if column else None
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{column}' (expected a non-empty string)")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{column}' is empty (expected a non-empty string)")
    return value


def _label(row: Mapping[str, Any], column: str | None, where: str) -> str | None:
    """A task, client or id: a string or a whole number (CSV and Parquet type them as numbers)."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: field '{column}' must be a string or integer, got {type(value).__name__}")
    return str(value)


def _references(row: Mapping[str, Any], column: str | None, where: str) -> tuple[str, ...]:
    refs = row.get(column) if column else None
    if refs is None or refs == "":
        return ()
    if isinstance(refs, str):  # CSV: a JSON list or a single answer
        try:
            refs = json.loads(refs) if refs.lstrip().startswith("[") else [refs]
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{column}' is not a JSON list of strings") from None
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DataError(f"{where}: field '{column}' must be a list of non-empty strings")
    return tuple(refs)


def _chat(turns: object, column: str, where: str, context: tuple) -> tuple[tuple, str, str]:
    """(turns before the last user turn, the last user turn, the last assistant turn) of a chat."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{column}' must be a non-empty list of turns")
    chat = list(context)
    for j, turn in enumerate(turns):
        here = f"{where}, field '{column}' turn {j + 1}"
        if not isinstance(turn, dict):
            raise DataError(f"{here}: expected an object with role and content, got {type(turn).__name__}")
        keys = ("role", "content") if turn.get("role") is not None else ("from", "value")
        extra = [k for k, v in turn.items() if v is not None and k not in keys]
        if extra:
            raise DataError(f"{here}: key(s) {extra} are not read (a turn holds role and content, or from and value)")
        speaker, content = turn.get(keys[0]), turn.get(keys[1])
        if speaker not in TURN_ROLES:
            raise DataError(f"{here}: role {speaker!r} is not one of {', '.join(TURN_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{here}: '{keys[1]}' must be a string, got {type(content).__name__}")
        role = TURN_ROLES[speaker]
        if role == "system" and any(r != "system" for r, _ in chat):
            raise DataError(f"{here}: a system turn must come before the others")
        chat.append((role, content))
    if len(chat) < 2 or chat[-1][0] != "assistant" or chat[-2][0] != "user":
        raise DataError(f"{where}: field '{column}' must end with a user turn and the assistant's answer")
    if not chat[-1][1].strip() or not chat[-2][1].strip():
        raise DataError(f"{where}: field '{column}': the last user turn and the answer must not be empty")
    return tuple(chat[:-2]), chat[-2][1], chat[-1][1]


def load_file(path: str | Path, reading: Reading | None = None) -> list[Sample]:
    """Every sample of one data file (format auto-detected unless ``reading`` says otherwise)."""
    samples, _ = table_samples(read_file(Path(path)), reading or Reading())
    return samples
