"""Manifest readers: every supported list format becomes one canonical Arrow table.

Canonical columns: ``path`` (str), ``label`` (int64), ``line`` (int64, the 1-based line or row of
the source file, so later errors and reject lists can point back at it), plus ``source`` (str),
``start_s`` and ``end_s`` (float64) when the file has them.

Formats are auto-detected:

* PPMA split files ``relative/path;label``; the label is after the *last* ``;`` because some
  HMDB51 file names contain ``;``. CRLF endings and a missing final newline are fine.
* VideoMAE lists ``path label`` (whitespace) and ``path,label`` (CSV) without a header.
* CSV with a header naming the columns (``path``, ``label``, optional ``source``, ``start_s``,
  ``end_s``), and Parquet files with those columns.
* Kinetics CSV (``label,youtube_id,time_start,time_end,split``): the video of a row is
  ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4``, the name the Kinetics downloaders give the
  trimmed clip.
* Something-Something v2 JSON (``.json``: a list of ``{"id", "template", ...}``): the video is
  ``<id>.webm``, the class its template with ``[something]`` as ``something`` (the names of the
  dataset's ``labels.json``).

Labels are integers, or class names: names become ids through a label map (``{name: id}``, given
as a dict or a JSON file), else through the sorted names of the file itself. The map used is kept in
the table's schema metadata (``label_map``), so a held-out list is read with the training list's map
and a run can write it next to its outputs (``label_map_of``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ppma_ray.data import objectstore
from ppma_ray.errors import one_line
from ppma_ray.files import write_text_atomic

REQUIRED = ("path", "label")
OPTIONAL = {"source": pa.string(), "start_s": pa.float64(), "end_s": pa.float64()}


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file, the line and the problem."""

    def __init__(self, file: str | os.PathLike, line: int | None, problem: str):
        self.file, self.line, self.problem = str(file), line, problem
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # pickle/copy (Ray moves exceptions between processes)
        return type(self), (self.file, self.line, self.problem)


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None,
                  label_map: dict[str, int] | str | os.PathLike | None = None) -> pa.Table:
    """Read a manifest of any supported format into the canonical table.

    Args:
        path: the manifest file (``.parquet`` is read as Parquet, ``.json`` as Something-Something
            v2, anything else as text).
        root: directory that relative video paths are joined to: a local folder or a bucket URI
            (``s3://bucket/prefix``, ``gs://...``; ``ppma_ray.data.objectstore``). With a root, an
            absolute path or a ``..`` that leaves the root is an error (a manifest must not reach
            outside its data). Without one, paths are used as written, bucket URIs included.
        label_map: class name -> id for a manifest whose labels are names (a dict, or a JSON file of
            one); a name not in it is an error. Without it, ids follow the sorted names.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, None, "manifest file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix == ".json":
        rows = _ssv2_rows(path)
    else:
        rows = _text_rows(path)
    if not rows:
        raise ManifestError(path, None, "manifest has no rows")
    return _to_table(path, rows, root, _read_label_map(label_map))


def label_map_of(table: pa.Table) -> dict[str, int] | None:
    """The class name -> id map a manifest with named labels was read with (None: integer labels)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[b"label_map"]) if b"label_map" in meta else None


def _read_label_map(label_map) -> tuple[dict[str, int], str] | None:
    """(map, where it came from) of ``read_manifest``'s argument."""
    if label_map is None:
        return None
    if isinstance(label_map, dict):
        return {str(k): int(v) for k, v in label_map.items()}, "the given label map"
    file = Path(label_map)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(file, None, f"not a readable label map ({one_line(e)})") from None
    # Something-Something's labels.json writes its ids as strings ("43"): take those too
    if not isinstance(data, dict) or not all(str(v).isdigit() for v in data.values()):
        raise ManifestError(file, None, "a label map is a JSON object of class name -> non-negative integer id")
    return {str(k): int(v) for k, v in data.items()}, str(file)


def write_ppma_manifest(table: pa.Table, out: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Write ``path;label`` lines (paths relative to ``root`` when given), the PPMA split format."""
    lines = []
    for p, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist()):
        lines.append(f"{relative_path(p, root)};{label}\n")
    write_text_atomic(out, "".join(lines))  # a torn list would be a smaller dataset that looks whole


def relative_path(path: str, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` (a folder or a bucket URI); as it is without a root."""
    if root is None:
        return path
    if objectstore.is_uri(str(root)):
        prefix = f"{str(root).rstrip('/')}/"
        return path[len(prefix):] if path.startswith(prefix) else path
    return os.path.relpath(path, root)


def _text_rows(path: Path) -> list[dict]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.splitlines()  # handles \n, \r\n and a missing final newline
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are harmless
    if not lines:
        return []
    if _is_kinetics_header(lines[0]):
        return _kinetics_rows(path, text)
    if _is_header(lines[0]):
        return _named_csv_rows(path, text)
    sep = ";" if ";" in lines[0] else "," if "," in lines[0] else None
    rows = []
    for i, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            raise ManifestError(path, i, "empty line in the middle of the manifest")
        parts = line.rsplit(sep, 1) if sep else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise ManifestError(path, i, f"expected 'path{sep or ' '}label', got {line!r}")
        rows.append({"path": parts[0].strip(), "label": parts[1].strip(), "line": i})
    return rows


KINETICS = ("label", "youtube_id", "time_start", "time_end")


def _is_kinetics_header(first_line: str) -> bool:
    fields = {f.strip().lower() for f in next(csv.reader([first_line]))}
    return set(KINETICS) <= fields


def _kinetics_rows(path: Path, text: str) -> list[dict]:
    """Kinetics' CSV: ``<youtube_id>_<start:06d>_<end:06d>.mp4``, the trimmed clip's usual name."""
    rows = []
    for i, rec in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        rec = {(k or "").strip().lower(): (v or "").strip() for k, v in rec.items()}
        if not any(rec.values()):
            raise ManifestError(path, i, "empty line in the middle of the manifest")
        try:
            start, end = int(float(rec["time_start"])), int(float(rec["time_end"]))
        except ValueError:
            raise ManifestError(path, i, f"time_start / time_end are not numbers ({rec['time_start']!r}, "
                                         f"{rec['time_end']!r})") from None
        if not rec["youtube_id"] or not rec["label"]:
            raise ManifestError(path, i, "youtube_id and label must not be empty")
        rows.append({"path": f"{rec['youtube_id']}_{start:06d}_{end:06d}.mp4", "label": rec["label"], "line": i})
    return rows


def _ssv2_rows(path: Path) -> list[dict]:
    """Something-Something v2's JSON list: ``<id>.webm``, labelled by its template."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(path, None, f"not a JSON list of videos ({e})") from None
    if not isinstance(items, list):
        raise ManifestError(path, None, "expected a JSON list of {\"id\", \"template\"} objects")
    rows = []
    for i, item in enumerate(items, start=1):  # "line": the item's 1-based position in the list
        if not isinstance(item, dict) or "id" not in item:
            raise ManifestError(path, i, "item without an 'id'")
        if "template" not in item:
            raise ManifestError(path, i, "item without a 'template' (the test list has no labels)")
        label = str(item["template"]).replace("[", "").replace("]", "")
        rows.append({"path": f"{item['id']}.webm", "label": label, "line": i})
    return rows


def _is_header(first_line: str) -> bool:
    fields = [f.strip().lower() for f in next(csv.reader([first_line]))]
    return "path" in fields


def _named_csv_rows(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    reader.fieldnames = fields
    for col in REQUIRED:
        if col not in fields:
            raise ManifestError(path, 1, f"header has no '{col}' column (columns: {fields})")
    rows = []
    for i, rec in enumerate(reader, start=2):
        if not any((v or "").strip() for v in rec.values()):
            raise ManifestError(path, i, "empty line in the middle of the manifest")
        rec = {k: (v.strip() if isinstance(v, str) else v) for k, v in rec.items() if k in REQUIRED or k in OPTIONAL}
        rec["line"] = i
        rows.append(rec)
    return rows


def _parquet_rows(path: Path) -> list[dict]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise ManifestError(path, None, f"not a readable Parquet file ({e})") from None
    for col in REQUIRED:
        if col not in table.column_names:
            raise ManifestError(path, None, f"no '{col}' column (columns: {table.column_names})")
    keep = [c for c in table.column_names if c in REQUIRED or c in OPTIONAL]
    rows = table.select(keep).to_pylist()
    for i, rec in enumerate(rows, start=1):
        rec["line"] = i
    return rows


def _label_ids(path: Path, rows: list[dict], label_map: tuple[dict[str, int], str] | None) -> tuple[list[int], dict | None]:
    """Integer labels as they are; class names through ``label_map`` or the file's sorted names."""
    def is_int(v) -> bool:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return True
        return isinstance(v, str) and v.strip().lstrip("-").isdigit()

    numeric = [is_int(r.get("label")) for r in rows]
    if label_map is None and any(numeric):  # integer ids; a name among them is a typo, not a class
        return [_as_int(path, r["line"], "label", r.get("label")) for r in rows], None
    names = [str(r.get("label") or "").strip() for r in rows]
    for r, name in zip(rows, names):
        if not name:
            raise ManifestError(path, r["line"], "field 'label' is empty")
    mapping, where = label_map or ({n: i for i, n in enumerate(sorted(set(names)))}, "")
    ids = []
    for r, name in zip(rows, names):
        if name not in mapping:
            raise ManifestError(path, r["line"], f"label {name!r} is not in {where} ({len(mapping)} classes)")
        ids.append(mapping[name])
    return ids, mapping


def _to_table(path: Path, rows: list[dict], root, label_map=None) -> pa.Table:
    remote = objectstore.is_uri(root)
    root_abs = (root.rstrip("/") if remote else os.path.abspath(root)) if root is not None else None
    real = _RealPaths(root_abs) if root_abs is not None and not remote else None
    out: dict[str, list] = {"path": [], "label": [], "line": []}
    optional = [c for c in OPTIONAL if c in rows[0]]
    for c in optional:
        out[c] = []
    labels, mapping = _label_ids(path, rows, label_map)
    for rec, label in zip(rows, labels):
        i = rec["line"]
        out["path"].append(_resolve(path, i, str(rec.get("path") or ""), root_abs, real))
        out["label"].append(label)
        out["line"].append(i)
        for c in optional:
            out[c].append(_as_optional(path, i, c, rec.get(c)))
    schema = pa.schema(
        [("path", pa.string()), ("label", pa.int64()), ("line", pa.int64())] + [(c, OPTIONAL[c]) for c in optional],
        metadata={"label_map": json.dumps(mapping)} if mapping is not None else None,
    )
    return pa.table(out, schema=schema)


class _RealPaths:
    """Where paths under a root really are, symlinks followed: one ``realpath`` per directory
    (manifests list thousands of files in a few class folders) and one ``lstat`` per file."""

    def __init__(self, root_abs: str):
        self.root = os.path.realpath(root_abs)
        self.dirs: dict[str, str] = {}

    def inside(self, full: str) -> tuple[bool, str]:
        """(whether ``full`` resolves inside the root, where it resolves to)."""
        head, name = os.path.split(full)
        if head not in self.dirs:
            self.dirs[head] = os.path.realpath(head)
        real = os.path.join(self.dirs[head], name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        return os.path.commonpath([real, self.root]) == self.root, real


def _resolve(path: Path, line: int, p: str, root_abs: str | None, real: _RealPaths | None) -> str:
    if not p:
        raise ManifestError(path, line, "field 'path' is empty")
    if root_abs is None:
        return p
    if os.path.isabs(p) or objectstore.is_uri(p):
        raise ManifestError(path, line, f"field 'path' is absolute ({p!r}) but a root was given")
    if real is None:  # a bucket: no symlinks there, only ".." can leave the root
        rel = objectstore.normalize(p)
        if rel == ".." or rel.startswith("../"):
            raise ManifestError(path, line, f"field 'path' escapes the root ({p!r})")
        return objectstore.join(root_abs, rel)
    full = os.path.normpath(os.path.join(root_abs, p))
    if os.path.commonpath([full, root_abs]) != root_abs:
        raise ManifestError(path, line, f"field 'path' escapes the root ({p!r})")
    # ".." is caught above; a symlink under the root that points elsewhere is caught here (the
    # root itself may be a symlink: both sides are compared resolved)
    inside, target = real.inside(full)
    if not inside:
        raise ManifestError(path, line, f"field 'path' leaves the root through a symlink ({p!r} -> {target})")
    return full


def _as_int(path: Path, line: int, field: str, value) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = int(value) if not isinstance(value, str) else int(value.strip())
    except (TypeError, ValueError):
        raise ManifestError(path, line, f"field '{field}' is not an integer ({value!r})") from None
    if out < 0:
        raise ManifestError(path, line, f"field '{field}' is negative ({out})")
    return out


def _as_optional(path: Path, line: int, field: str, value):
    if value is None or value == "":
        return None
    if OPTIONAL[field] == pa.string():
        return str(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ManifestError(path, line, f"field '{field}' is not a number ({value!r})") from None
