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

Limits (``data.max_file_bytes``, ``data.max_rows``, ``data.max_sample_bytes``, ``data.on_too_long``): a file's
size is checked before it is opened, a JSON file's rows and texts before ``datasets`` reads it, every table's rows
and every text a sample is made of as it becomes samples. A text over the limit is an error naming file, row and
field, or (``truncate``) is cut, and the number of samples cut is logged per file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedrouter.config import SETTINGS
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
# What stands for the middle of a prompt cut to data.max_sample_bytes (as model.max_seq_len shortening writes it).
CUT_MARK = " … "


@dataclass(frozen=True)
class Reading:
    """How rows become samples: ``data.format``, ``data.columns.*`` and ``data.ignore_columns``, within the
    limits ``data.max_file_bytes``, ``data.max_rows``, ``data.max_sample_bytes`` and ``data.on_too_long``."""

    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (role, column) the user mapped
    ignore: tuple[str, ...] = ()
    max_file_bytes: int = SETTINGS["data.max_file_bytes"].default
    max_rows: int = SETTINGS["data.max_rows"].default  # per file (or saved split)
    max_sample_bytes: int = SETTINGS["data.max_sample_bytes"].default  # per text of a sample
    on_too_long: str = SETTINGS["data.on_too_long"].default  # 'refuse' or 'truncate'

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Reading:
        columns = tuple((role, cfg[f"data.columns.{role}"]) for role in ROLES if cfg[f"data.columns.{role}"])
        ignore = tuple(c.strip() for c in cfg["data.ignore_columns"].split(",") if c.strip())
        limits = (cfg["data.max_file_bytes"], cfg["data.max_rows"], cfg["data.max_sample_bytes"])
        return cls(cfg["data.format"], columns, ignore, *limits, cfg["data.on_too_long"])


@dataclass(frozen=True)
class Layout:
    """The format of one table and the column of each role it reads."""

    format: str
    columns: dict[str, str]
    ignored: tuple[str, ...]
    detected: bool
    notes: tuple[str, ...] = ()  # what else the user should know, e.g. how many samples were cut

    def describe(self) -> str:
        how = "detected" if self.detected else "data.format"
        mapped = ", ".join(f"{role}={column!r}" for role, column in self.columns.items())
        ignored = f"; ignored: {', '.join(self.ignored)}" if self.ignored else ""
        notes = "".join(f"; {note}" for note in self.notes)
        return f"format {self.format!r} ({how}); columns {mapped}{ignored}{notes}"


@dataclass
class TextLimit:
    """``data.max_sample_bytes`` and ``data.on_too_long`` applied to the texts of one table's samples."""

    max_bytes: int
    truncate: bool
    cut: int = 0  # texts cut so far

    @classmethod
    def of(cls, reading: Reading) -> TextLimit:
        return cls(reading.max_sample_bytes, reading.on_too_long == "truncate")

    def text(self, text: str, place: str, *, ends: bool) -> str:
        """``text`` (of the field at ``place``) within the limit: as it is, cut, or an error.

        ``ends``: a prompt keeps its start and end (where a task is usually stated and asked), as
        ``model.prompts`` shortens one to ``model.max_seq_len`` tokens; an answer keeps its start, the part
        training reads and generation is scored against."""
        size = _over(text, self.max_bytes)
        if size is None:
            return text
        if not self.truncate:
            raise DataError(_too_long(place, size, self.max_bytes))
        self.cut += 1
        return cut_text(text, self.max_bytes, ends=ends)

    def name(self, text: str, place: str) -> None:
        """An id, client or task name over the limit is an error whatever data.on_too_long says: cut, two
        names could become one."""
        size = _over(text, self.max_bytes)
        if size is not None:
            raise DataError(
                f"{place}: {size:,} bytes, over data.max_sample_bytes = {self.max_bytes:,} (a name is never cut)"
            )


def _over(text: str, limit: int) -> int | None:
    """The UTF-8 size of ``text`` where it is over ``limit`` bytes, else None (cheap for short texts)."""
    if len(text) * 4 <= limit:  # a character is at most 4 bytes
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def _too_long(place: str, size: int, limit: int) -> str:
    return (
        f"{place}: {size:,} bytes of text, over data.max_sample_bytes = {limit:,}: raise data.max_sample_bytes, "
        "or set data.on_too_long=truncate to cut such texts (the model reads at most model.max_seq_len tokens of "
        "a sample)"
    )


def cut_text(text: str, limit: int, *, ends: bool) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (never inside a character): its start, or (``ends``) its
    first three quarters and last quarter around ``CUT_MARK``."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    if not ends:
        return data[:limit].decode("utf-8", "ignore")
    room = limit - len(CUT_MARK.encode())
    head = (room * 3) // 4
    tail = data[len(data) - (room - head) :]
    return data[:head].decode("utf-8", "ignore") + CUT_MARK + tail.decode("utf-8", "ignore")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _check_rows(count: int, where: str, reading: Reading) -> None:
    if count > reading.max_rows:
        raise DataError(
            f"{where}: {count:,} rows, over data.max_rows = {reading.max_rows:,}: raise data.max_rows, or split "
            "the file (rows are not dropped: which ones to keep is yours to choose)"
        )


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


def read_file(path: Path, reading: Reading | None = None) -> Table:
    """One data file as a ``datasets.Dataset``; errors name the file (and the line, for bad JSON).

    The file's size (``data.max_file_bytes``) is checked before it is opened; a JSON file's rows and texts
    (``data.max_rows``, ``data.max_sample_bytes``) and a Parquet file's row count before ``datasets`` reads it."""
    reading = reading or Reading()
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    size = path.stat().st_size
    if size > reading.max_file_bytes:
        raise DataError(
            f"{path}: {size:,} bytes ({_size(size)}), over data.max_file_bytes = {reading.max_file_bytes:,} "
            f"({_size(reading.max_file_bytes)}): a data file is read into memory whole, several times its size; "
            "raise data.max_file_bytes where the memory is, or split the file"
        )
    if builder == "parquet":
        _check_parquet_rows(path, reading)
    else:
        _check_text(path, builder, reading)
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


def _check_parquet_rows(path: Path, reading: Reading) -> None:
    """A Parquet file's row count from its footer, before its rows are read."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except Exception:  # not Parquet after all: datasets says why, below
        return
    _check_rows(rows, str(path), reading)


def _check_text(path: Path, builder: str, reading: Reading) -> None:
    """UTF-8 and (for JSON) valid syntax and the limits, checked here so the error can name the line."""
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
        _check_json_rows(path, [(f"{path} row {i + 1}", row) for i, row in enumerate(rows)], reading)
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
    _check_json_rows(path, [(f"{path} row {i + 1} (line {n})", row) for i, (n, row) in enumerate(parsed)], reading)


def _check_json_rows(path: Path, rows: list[tuple[str, dict]], reading: Reading) -> None:
    """A JSON file's row count and (data.on_too_long = 'refuse') every text in a column that is not ignored,
    before ``datasets`` spends seconds and memory on a row that will be refused."""
    _check_rows(len(rows), str(path), reading)
    if reading.on_too_long != "refuse":
        return  # texts are cut as rows become samples
    limit = reading.max_sample_bytes
    for place, row in rows:
        for key, value in row.items():
            if key in reading.ignore:
                continue
            stack = [(f"{place}, field '{key}'", value)]
            while stack:  # a chat's turns and a list of references: texts inside lists and objects
                here, value = stack.pop()
                if isinstance(value, str):
                    if (size := _over(value, limit)) is not None:
                        raise DataError(_too_long(here, size, limit))
                elif isinstance(value, list):
                    items = [
                        (f"{here} {'turn' if isinstance(item, dict) else 'item'} {j + 1}", item)
                        for j, item in enumerate(value)
                    ]
                    stack += reversed(items)
                elif isinstance(value, dict):
                    stack += [(here, item) for item in reversed(value.values())]


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


def read_source(path: Path, reading: Reading | None = None) -> dict[str, list[Table]]:
    """A file or folder as tables per split: ``train`` and ``test``, or ``all`` when it holds no split."""
    if path.is_file():
        return {"all": [read_file(path, reading)]}
    if not path.is_dir():
        raise DataError(f"data source {path} does not exist")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path)
    splits = {split: _split_files(path, split) for split in SPLITS}
    if not splits["test"]:
        splits["test"] = _split_files(path, "validation")
    if splits["train"] and splits["test"]:
        return {split: [read_file(f, reading) for f in files] for split, files in splits.items()}
    if splits["train"] or splits["test"]:
        have = "train" if splits["train"] else "test"
        raise DataError(f"{path}: has {have} files but no {'test' if have == 'train' else 'train'} files")
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(SUFFIXES)}) and no `datasets` save_to_disk folder")
    return {"all": [read_file(f, reading) for f in files]}


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
    """Every row of a table as a sample, or an error naming the table, row and field; within the limits
    ``data.max_rows`` and ``data.max_sample_bytes`` (the samples cut are counted, logged and noted in the
    layout)."""
    _check_rows(len(table.rows), table.where, reading)
    layout = resolve_layout(table.rows.column_names, reading, table.where)
    limit = TextLimit.of(reading)
    samples, cut = [], 0
    for i, row in enumerate(table.rows.to_list()):
        texts_cut = limit.cut
        samples.append(row_sample(row, layout, f"{table.where} row {i + 1}", f"{table.stem}-{i + 1}", limit))
        cut += limit.cut > texts_cut
    if cut:
        note = f"{cut} samples cut to {reading.max_sample_bytes} bytes (data.max_sample_bytes)"
        log.warning("data: %s: %s", table.where, note)
        layout = replace(layout, notes=(*layout.notes, note))
    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise DataError(f"{table.where}: duplicate id {sample.id!r} (rows {seen[sample.id] + 1} and {index + 1})")
        seen[sample.id] = index
    return samples, layout


def row_sample(
    row: Mapping[str, Any], layout: Layout, where: str, default_id: str, limit: TextLimit | None = None
) -> Sample:
    """One row as a sample under ``layout``, every text within ``limit`` (default: the default limits)."""
    limit = limit or TextLimit.of(Reading())
    cols = layout.columns
    system = _text(row, cols.get("system"), where, limit, required=False)
    context: tuple[tuple[str, str], ...] = (("system", system),) if system else ()
    if layout.format == "messages":
        context, instruction, response = _chat(row[cols["messages"]], cols["messages"], where, context, limit)
    else:
        instruction = _text(row, cols["prompt"], where, limit, required=True)
        extra = _text(row, cols.get("input"), where, limit, required=False)
        if extra and extra.strip():
            instruction = instruction + INPUT_JOIN + extra
        response = _text(row, cols["response"], where, limit, required=True, ends=False)
    task = _label(row, cols.get("task"), where, limit) or NO_TASK
    if not TASK_NAME.match(task):
        raise DataError(
            f"{where}: field '{cols['task']}' (the task) must be 1-64 letters, digits, '_' or '-', got {task!r}"
        )
    sample_id = _label(row, cols.get("id"), where, limit) or default_id
    client = _label(row, cols.get("client"), where, limit)
    references = _references(row, cols.get("references"), where, limit)
    return Sample(sample_id, instruction, response, task, references, context, client)


def _text(
    row: Mapping[str, Any], column: str | None, where: str, limit: TextLimit, *, required: bool, ends: bool = True
) -> str | None:
    value = row.get(column) if column else None
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{column}' (expected a non-empty string)")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{column}' must be a string, got {type(value).__name__}")
    value = limit.text(value, f"{where}, field '{column}'", ends=ends)
    if required and not value.strip():
        raise DataError(f"{where}: field '{column}' is empty (expected a non-empty string)")
    return value


def _label(row: Mapping[str, Any], column: str | None, where: str, limit: TextLimit) -> str | None:
    """A task, client or id: a string or a whole number (CSV and Parquet type them as numbers)."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: field '{column}' must be a string or integer, got {type(value).__name__}")
    limit.name(str(value), f"{where}, field '{column}'")
    return str(value)


def _references(row: Mapping[str, Any], column: str | None, where: str, limit: TextLimit) -> tuple[str, ...]:
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
    return tuple(limit.text(ref, f"{where}, field '{column}' item {j + 1}", ends=False) for j, ref in enumerate(refs))


def _chat(turns: object, column: str, where: str, context: tuple, limit: TextLimit) -> tuple[tuple, str, str]:
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
        chat.append((role, limit.text(content, here, ends=role != "assistant")))
    if len(chat) < 2 or chat[-1][0] != "assistant" or chat[-2][0] != "user":
        raise DataError(f"{where}: field '{column}' must end with a user turn and the assistant's answer")
    if not chat[-1][1].strip() or not chat[-2][1].strip():
        raise DataError(f"{where}: field '{column}': the last user turn and the answer must not be empty")
    return tuple(chat[:-2]), chat[-2][1], chat[-1][1]


def load_file(path: str | Path, reading: Reading | None = None) -> list[Sample]:
    """Every sample of one data file (format auto-detected unless ``reading`` says otherwise)."""
    reading = reading or Reading()
    samples, _ = table_samples(read_file(Path(path), reading), reading)
    return samples
