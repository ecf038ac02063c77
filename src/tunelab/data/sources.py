"""Dataset files -> raw rows, and dataset names -> :class:`DatasetSpec`.

Two jobs live here, both about *finding* data rather than interpreting it:

* :func:`read_rows` reads json, jsonl, csv, parquet, arrow and txt files (or a directory of
  them) into :class:`RawRow` objects that remember where they came from, so that every
  later error can name the file and the line (or record index) to fix.
* :class:`DatasetRegistry` reads LLaMA-Factory's ``dataset_info.json`` unchanged, so users
  can point tunelab at the data directory they already have, and turns a registry name or
  a plain path into a :class:`DatasetSpec` that says how to interpret the rows.

What the rows *mean* (alpaca, sharegpt, ...) is decided in :mod:`tunelab.data.formats`.
Record indices are 0-based (``data[3]`` in a JSON list); line numbers are 1-based.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, get_args

from tunelab.data.hub import HubSource, HubUnavailable, hub_dataset, quiet_datasets
from tunelab.errors import DataError

Formatting = Literal["alpaca", "sharegpt", "openai", "text"]
FORMATTINGS: tuple[str, ...] = get_args(Formatting)

INFO_FILE = "dataset_info.json"

# Metadata that `datasets.save_to_disk` writes next to its .arrow shards; not records.
_HF_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


# --------------------------------------------------------------------------- raw rows


@dataclass
class RawRow:
    """One record as read from a file, before any interpretation.

    ``line`` is set for line-based files (jsonl, csv, txt); ``index`` (0-based position in
    the file) is always set, so errors can point at the record either way.
    """

    data: dict[str, Any]
    file: str
    line: int | None
    index: int

    @property
    def origin(self) -> str:
        """``file:line`` where the line is known, else ``file#index``."""
        return f"{self.file}:{self.line}" if self.line is not None else f"{self.file}#{self.index}"


# A reader yields (line or None, parsed value) for each record of one file.
_Reader = Callable[[Path], Iterator[tuple[int | None, Any]]]

_UTF8_HINT = ("Re-save the file as UTF-8 (most editors offer it when saving), or fix or delete the bytes "
              "there; a file in another encoding can be converted with `iconv -f LATIN1 -t UTF-8`.")


def decode_utf8(data: bytes, path: Path | str, line: int | None = None) -> str:
    """``data`` as text, or a :class:`DataError` naming the line and column of the first invalid byte.

    ``line`` is the line ``data`` starts on (a single line's bytes); without it ``data`` is a whole
    file and the line is counted. A leading byte-order mark is dropped (editors on Windows write one).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        at = line if line is not None else 1 + data.count(b"\n", 0, err.start)
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise DataError(f"invalid UTF-8: byte 0x{data[err.start]:02x} at column {column} is not UTF-8 text.",
                        file=str(path), line=at, hint=_UTF8_HINT) from None
    return text[1:] if text.startswith("\ufeff") else text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, text with its line break) of every line, decoded one line at a time so that an
    invalid byte is reported on its own line instead of failing the whole file."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            yield number, decode_utf8(raw, path, number)


def parse_json_line(text: str, path: Path | str, number: int) -> Any:
    """One record of a JSON-lines file; invalid JSON names the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"invalid JSON ({err.msg} at column {err.colno}).", file=str(path), line=number,
            hint="Each line of a JSON-lines file must hold one complete JSON object; "
                 "fix or delete this line.") from None


def _json_lines(lines: Iterable[tuple[int, str]], path: Path) -> Iterator[tuple[int | None, Any]]:
    for number, line in lines:
        if line.strip():
            yield number, parse_json_line(line, path, number)


def _read_jsonl(path: Path) -> Iterator[tuple[int | None, Any]]:
    yield from _json_lines(_lines(path), path)


def _read_json(path: Path) -> Iterator[tuple[int | None, Any]]:
    """A JSON list of records, or, as often found in the wild, JSON lines in a .json file."""
    text = decode_utf8(path.read_bytes(), path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise DataError(
                f"invalid JSON: {err.msg} at line {err.lineno}, column {err.colno}.", file=str(path),
                hint="The file starts like a JSON list of records; fix the syntax at that position "
                     "(a missing comma or quote is the usual cause).") from None
        yield from _json_lines(enumerate(text.splitlines(), start=1), path)
        return
    if isinstance(document, list):
        yield from ((None, item) for item in document)
    elif isinstance(document, dict):  # a one-line JSON-lines file, or one pretty-printed record
        yield 1 + text[: len(text) - len(text.lstrip())].count("\n"), document
    else:
        raise DataError(f"the file holds a single JSON {type_name(document)}.", file=str(path),
                        hint="Expected a JSON list of records or one JSON object per line.")


def _read_csv(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Rows keyed by the header; the line is where the row starts (quoted cells may span lines)."""
    reader = csv.DictReader(line for _, line in _lines(path))
    for row in reader:
        extra = row.pop(None, None)  # type: ignore[call-overload]
        start = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
        if extra:
            raise DataError(f"the row has {len(extra)} more value(s) than the header has columns.",
                            file=str(path), line=start,
                            hint="Quote cells that contain commas, or add the missing header names.")
        yield start, row


def _read_parquet(path: Path) -> Iterator[tuple[int | None, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read the parquet file: it is truncated or not a parquet file ({err}).",
                        file=str(path), hint="Write the file again (an interrupted copy or download leaves a "
                                             "file without its footer).") from None
    index = 0
    try:
        for batch in reader.iter_batches():
            for item in batch.to_pylist():
                yield None, item
                index += 1
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read the parquet file: the data after record {index - 1} is damaged ({err}).",
                        file=str(path), record=index, hint="Write the file again from its source.") from None


def _read_arrow(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Arrow IPC, as written by ``datasets.save_to_disk`` (stream format) or pyarrow (file format)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read the arrow file: {err}", file=str(path)) from None
    yield from ((None, item) for item in table.to_pylist())


def _read_txt(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Plain text for pre-training: every non-blank line is one record ``{"text": line}``."""
    for number, line in _lines(path):
        text = line.rstrip("\r\n")
        if text.strip():
            yield number, {"text": text}


_READERS: dict[str, _Reader] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
    ".txt": _read_txt,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_READERS)


def type_name(value: Any) -> str:
    """A JSON-flavoured type name for error messages."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _reader_for(path: Path) -> _Reader:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"unsupported file type '{path.suffix or '(no extension)'}'.", file=str(path),
                        hint=f"Supported: {', '.join(SUPPORTED_SUFFIXES)} (or a directory of such "
                             "files); convert the file or rename it with the right extension.")
    return reader


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def dataset_files(path: Path) -> list[Path]:
    """The files ``path`` stands for: itself, or the supported files of a directory sorted by name."""
    if not path.is_dir():
        _reader_for(path)
        return [path]
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in _READERS
                   and not p.name.startswith(".") and p.name not in _HF_METADATA)
    if not files:
        raise DataError("the directory contains no dataset files.", file=str(path),
                        hint=f"Supported: {', '.join(SUPPORTED_SUFFIXES)}.")
    return files


def as_row(value: Any, file: str, line: int | None, index: int) -> RawRow:
    """A parsed record as a :class:`RawRow`; anything but an object is an error naming where it is."""
    if not isinstance(value, dict):
        raise DataError(f"the record is a {type_name(value)}, not an object.", file=file, line=line,
                        record=index, hint='Each record must be an object of named fields, such as '
                                          '{"instruction": "...", "output": "..."}.')
    return RawRow(data=value, file=file, line=line, index=index)


def _read_file(path: Path) -> Iterator[RawRow]:
    reader = _reader_for(path)
    if not path.is_file():
        raise DataError("the file does not exist", file=str(path))
    for index, (line, value) in enumerate(reader(path)):
        yield as_row(value, str(path), line, index)


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Yield every record of a file, or of all supported files in a directory (sorted by name).

    Files are streamed where the format allows it (jsonl, csv, txt, parquet). A file that
    cannot be parsed raises :class:`DataError` naming the file and line (or line and column
    for a JSON document); such damage is never skipped, because later rows cannot be trusted.
    """
    for file in dataset_files(Path(path)):
        yield from _read_file(file)


def typed_rows(batch: dict[str, list], indices: Iterable[int], file: str) -> list[RawRow]:
    """Rows of a batch of typed Arrow records (parquet, arrow, a saved or hub dataset); a field that is
    null here is left out, as if the record had no such field (Arrow gives every record every column)."""
    keys = list(batch)
    return [RawRow({key: value for key, value in zip(keys, values) if value is not None}, file, None, index)
            for values, index in zip(zip(*(batch[key] for key in keys)), indices)]


def dataset_rows(table: Any, label: str, batch_size: int = 1000) -> Iterator[RawRow]:
    """The rows of a ``datasets.Dataset`` of typed records, in order."""
    start = 0
    for batch in table.iter(batch_size=batch_size):
        count = len(next(iter(batch.values()), []))
        yield from typed_rows(batch, range(start, start + count), label)
        start += count


def saved_dataset(path: Path, split: str) -> Any:
    """A directory written by ``save_to_disk``; for a DatasetDict, its ``split``."""
    datasets = quiet_datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises many types for a damaged directory
        raise DataError(f"cannot read the saved dataset: {type(err).__name__}: {err}", file=str(path),
                        hint="Save it again with datasets' save_to_disk.") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"the saved dataset has no split '{split}' (it has {', '.join(loaded)}).",
                            file=str(path), hint='Set "split" in its dataset_info.json entry.')
        loaded = loaded[split]
    return loaded


# --------------------------------------------------------------------------- dataset specs

COLUMN_KEYS: tuple[str, ...] = ("prompt", "query", "response", "history", "messages", "system", "tools",
                                "images", "videos", "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS: tuple[str, ...] = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
                             "function_tag", "system_tag")
_MEDIA_COLUMNS = ("images", "videos", "audios")

_PAIR_COLUMNS = {"chosen": "chosen", "rejected": "rejected"}
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", **_PAIR_COLUMNS},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", **_PAIR_COLUMNS},
    "openai": {"messages": "messages", "tools": "tools", **_PAIR_COLUMNS},
    "text": {"prompt": "text"},
}
_SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                  "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "alpaca": {}, "sharegpt": _SHAREGPT_TAGS, "openai": _OPENAI_TAGS, "text": {},
}


def _check_keys(dataset: str, what: str, given: Iterable[str], valid: tuple[str, ...]) -> None:
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            guess = f"Did you mean '{close[0]}'? " if close else ""
            raise DataError(f"dataset '{dataset}': unknown {what} key '{key}'.",
                            hint=f"{guess}Valid {what} keys: {', '.join(valid)}.")


@dataclass
class DatasetSpec:
    """How to read one dataset: its files, its layout, and which file columns mean what.

    ``columns`` and ``tags`` hold only the overrides when constructed; ``__post_init__``
    merges them over the defaults of ``formatting`` (LLaMA-Factory's defaults), so code
    reading a spec can always index ``spec.columns["messages"]``.
    """

    name: str
    files: list[Path]
    formatting: Formatting = "alpaca"
    ranking: bool = False
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    num_samples: int | None = None
    split: str = "train"
    hub: HubSource | None = None  # a Hugging Face Hub split instead of files

    def __post_init__(self) -> None:
        if self.formatting not in FORMATTINGS:
            raise DataError(f"dataset '{self.name}': unknown formatting '{self.formatting}'.",
                            hint=f"Use one of: {', '.join(FORMATTINGS)}.")
        _check_keys(self.name, "column", self.columns, COLUMN_KEYS)
        _check_keys(self.name, "tag", self.tags, TAG_KEYS)
        media = [key for key in _MEDIA_COLUMNS if self.columns.get(key)]
        if media:
            raise DataError(f"dataset '{self.name}' maps {', '.join(media)} columns; tunelab trains "
                            "text-only models.", hint="Remove those columns from the dataset entry.")
        self.columns = {**DEFAULT_COLUMNS[self.formatting],
                        **{key: value for key, value in self.columns.items() if value}}
        self.tags = {**DEFAULT_TAGS[self.formatting], **self.tags}
        if self.ranking and self.kto:
            raise DataError(f"dataset '{self.name}' sets both ranking and a kto_tag column.",
                            hint="A dataset is either preference pairs (ranking) or KTO labels, not both.")

    @property
    def kto(self) -> bool:
        """KTO data: each answer carries a desirable/undesirable label in ``columns["kto_tag"]``."""
        return bool(self.columns.get("kto_tag"))

    def rows(self) -> Iterator[RawRow]:
        """All rows of all files (or of the hub split), in order."""
        if self.hub is not None:
            yield from dataset_rows(hub_dataset(self.hub), self.hub.label)
        for file in self.files:
            if is_saved_dataset(file):
                yield from dataset_rows(saved_dataset(file, self.split), str(file))
            else:
                yield from read_rows(file)


# --------------------------------------------------------------------------- auto-detection

# First-row keys -> (formatting, column overrides). Checked in order; the first match wins.
_LAYOUTS: tuple[tuple[frozenset[str], Formatting, dict[str, str]], ...] = (
    (frozenset({"conversations"}), "sharegpt", {"messages": "conversations"}),
    (frozenset({"messages"}), "sharegpt", {"messages": "messages"}),
    (frozenset({"instruction"}), "alpaca", {}),
    (frozenset({"prompt", "chosen", "rejected"}), "alpaca", {"prompt": "prompt"}),
    (frozenset({"prompt", "completion"}), "alpaca", {"prompt": "prompt", "response": "completion"}),
    (frozenset({"text"}), "text", {}),
)
_LABEL_KEYS = ("kto_tag", "label")


def _chat_formatting(first: dict[str, Any], column: str) -> Formatting:
    """sharegpt (``from``/``value`` turns) or openai (``role``/``content``), by the first turn's keys."""
    turns = first.get(column)
    head = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    return "openai" if "role" in head else "sharegpt"


def detect_spec(path: Path, name: str | None = None) -> DatasetSpec:
    """Guess a spec for a file or directory that has no ``dataset_info.json`` entry.

    The first record's keys decide: ``conversations``/``messages`` -> a chat (sharegpt or
    openai by the turn keys), ``instruction`` -> alpaca, ``prompt``+``chosen``+``rejected``
    or ``prompt``+``completion`` -> alpaca with those columns, ``text`` -> text. A
    ``chosen``+``rejected`` pair makes it a preference dataset; a boolean ``label`` or
    ``kto_tag`` makes it KTO. Anything else needs an explicit registry entry.
    """
    spec = DatasetSpec(name=name or path.name, files=[path])
    return _detected(spec, next(spec.rows(), None), str(path))


def detect_hub_spec(source: HubSource, name: str) -> DatasetSpec:
    """Like :func:`detect_spec`, for a hub split named in data.train (``org/name``)."""
    spec = DatasetSpec(name=name, files=[], split=source.split, hub=source)
    return _detected(spec, next(spec.rows(), None), source.label)


def _detected(spec: DatasetSpec, first: RawRow | None, where: str) -> DatasetSpec:
    if first is None:
        raise DataError("the dataset has no records", file=where)
    keys = set(first.data)
    for required, formatting, columns in _LAYOUTS:
        if required <= keys:
            break
    else:
        raise DataError(f"cannot tell the dataset layout from the first record's keys ({', '.join(sorted(keys))}).",
                        file=where, hint="Expected alpaca (instruction/output), sharegpt (conversations), "
                                         "openai (messages), preference (chosen/rejected) or text (text) "
                                         f"records; or describe the dataset in {INFO_FILE}.")
    if "messages" in columns:
        formatting = _chat_formatting(first.data, columns["messages"])
    columns = dict(columns)
    label = next((key for key in _LABEL_KEYS if isinstance(first.data.get(key), bool)), None)
    if label:
        columns["kto_tag"] = label
    ranking = {"chosen", "rejected"} <= keys
    return DatasetSpec(name=spec.name, files=spec.files, formatting=formatting, ranking=ranking,
                       columns=columns, split=spec.split, hub=spec.hub)


# --------------------------------------------------------------------------- the registry

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo(name: str) -> bool:
    """``org/name`` (not a path to a file of a supported type: that is a missing local file)."""
    return bool(_REPO_ID.fullmatch(name)) and not name.lower().endswith(SUPPORTED_SUFFIXES)


_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")


def _load_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        info = json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
                        file=str(path)) from None
    if not isinstance(info, dict):
        raise DataError(f"expected an object mapping dataset names to entries, found a {type_name(info)}",
                        file=str(path))
    return info


def _entry_formatting(entry: dict[str, Any]) -> str:
    """LLaMA-Factory's formatting, where an entry mapping only ``prompt`` is pre-training text.

    LLaMA-Factory describes text corpora as ``{"columns": {"prompt": "text"}}`` with the
    default (alpaca) formatting and lets the training stage decide; tunelab records carry
    their kind, so such entries become ``text`` here.
    """
    formatting = entry.get("formatting", "alpaca")
    columns = {key for key, value in (entry.get("columns") or {}).items() if value}
    if formatting == "alpaca" and columns == {"prompt"} and not entry.get("ranking"):
        return "text"
    return formatting


class DatasetRegistry:
    """Dataset names from ``<dataset_dir>/dataset_info.json`` (LLaMA-Factory's file, unchanged).

    Works without that file too: then paths and hub ids (``org/name``) resolve. Entries are
    checked when they are resolved, so one entry that cannot be used (for example a hub
    dataset that is not cached while offline) does not stop the others from working.
    """

    def __init__(self, dataset_dir: str | Path = "data") -> None:
        self.dataset_dir = Path(dataset_dir)
        self.info_path = self.dataset_dir / INFO_FILE
        self._entries = _load_info(self.info_path)

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name_or_path: str) -> DatasetSpec:
        """A registry name, else an existing file or directory (as given, or under dataset_dir), else a
        Hugging Face Hub dataset id (``org/name``, its train split)."""
        if name_or_path in self._entries:
            return self._from_entry(name_or_path)
        for candidate in (Path(name_or_path), self.dataset_dir / name_or_path):
            if candidate.exists():
                return detect_spec(candidate, name=name_or_path)
        if looks_like_repo(name_or_path):
            try:
                return detect_hub_spec(HubSource(name_or_path), name_or_path)
            except HubUnavailable as err:
                raise self._unknown(name_or_path, hub=err.reason) from None
        raise self._unknown(name_or_path)

    def _from_entry(self, name: str) -> DatasetSpec:
        entry = self._entries[name]
        if not isinstance(entry, dict):
            raise DataError(f"the entry for dataset '{name}' is a {type_name(entry)}, not an object",
                            file=str(self.info_path))
        hub = None if entry.get("file_name") else self._entry_hub(name, entry)
        return DatasetSpec(name=name, files=[] if hub else [self._entry_file(name, entry)],
                           formatting=_entry_formatting(entry),  # type: ignore[arg-type]
                           ranking=bool(entry.get("ranking", False)),
                           columns=dict(entry.get("columns") or {}), tags=dict(entry.get("tags") or {}),
                           num_samples=entry.get("num_samples"), split=entry.get("split") or "train", hub=hub)

    def _entry_hub(self, name: str, entry: dict[str, Any]) -> HubSource:
        """An ``hf_hub_url`` entry, checked loadable now (so a run fails before training, not after)."""
        hub = next((key for key in _HUB_KEYS if entry.get(key)), None)
        if hub is None:
            raise DataError(f"dataset '{name}' has no \"file_name\".", file=str(self.info_path),
                            hint=f"Set \"file_name\" to a file or directory inside {self.dataset_dir}.")
        local = (f"download the dataset's files into {self.dataset_dir}, then set \"file_name\" in its "
                 f"{INFO_FILE} entry (a file or a directory name)")
        if hub != "hf_hub_url":
            raise DataError(f"dataset '{name}' is only available from {hub} '{entry[hub]}', and it cannot be "
                            "downloaded here: tunelab reads local files and Hugging Face Hub datasets "
                            "(hf_hub_url) only.", file=str(self.info_path), hint=f"To use it, {local}.")
        source = HubSource(str(entry[hub]), subset=entry.get("subset"), split=entry.get("split") or "train",
                           data_dir=entry.get("folder"))
        try:
            hub_dataset(source)
        except HubUnavailable as err:
            raise DataError(f"dataset '{name}' is only available from {hub} '{entry[hub]}', and it cannot be "
                            f"downloaded here: {err.reason}.", file=str(self.info_path),
                            hint=f"Run once with network access (HF_HUB_OFFLINE unset) to cache it, or "
                                 f"{local}.") from None
        return source

    def _entry_file(self, name: str, entry: dict[str, Any]) -> Path:
        file_name = entry["file_name"]
        path = self.dataset_dir / file_name
        if not path.exists():
            raise DataError(f"dataset '{name}': file_name '{file_name}' does not exist in {self.dataset_dir}.",
                            file=str(self.info_path), hint="Put the file there or correct \"file_name\".")
        return path

    def _unknown(self, name: str, hub: str | None = None) -> DataError:
        on_hub = f", nor a Hugging Face Hub dataset available here ({hub})" if hub else ""
        if not self._entries:
            return DataError(f"'{name}' is not an existing file or directory{on_hub}, and there is no {INFO_FILE} "
                             f"in {self.dataset_dir} to look dataset names up in.",
                             hint="Pass a path to a dataset file or directory, or set data.dataset_dir.")
        close = difflib.get_close_matches(name, self._entries, n=1, cutoff=0.5)
        guess = f"Did you mean '{close[0]}'? " if close else ""
        return DataError(f"'{name}' is neither a dataset in {self.info_path} nor an existing file or "
                         f"directory{on_hub}.", hint=f"{guess}Known datasets: {_listing(self.names)}.")


def _listing(names: list[str], limit: int = 30) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
