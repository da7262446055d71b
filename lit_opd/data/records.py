"""Reading rows of problems from JSONL, JSON, parquet or an HF dataset id, with errors that name
the file and line of a bad row."""

import json
from pathlib import Path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: malformed JSON line ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = line_number
            rows.append(row)
    return rows


def load_records(source: str, split: str = "train") -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file, or of an HF dataset id (`datasets`).

    Rows from a local file carry `_line` (1-based line or row number) for error messages.
    """
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ValueError(f"data file {source!r} does not exist")
        return _read_jsonl(path)
    import datasets

    if path.suffix in (".json", ".parquet"):
        if not path.is_file():
            raise ValueError(f"data file {source!r} does not exist")
        kind = "json" if path.suffix == ".json" else "parquet"
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    elif path.exists():
        raise ValueError(f"data file {source!r}: unsupported format (use .jsonl, .json or .parquet)")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:
            raise ValueError(f"could not load dataset {source!r} (split {split!r}): {error}") from error
    return [dict(row, _line=i + 1) for i, row in enumerate(dataset)]


def _lookup(row: dict, name: str):
    """row["a.b"] = row["a"]["b"]; a list of chat messages gives its last user message's content
    (DAPO-Math-17k stores prompts so)."""
    value = row
    for part in name.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return None
        value = value[part]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m["content"] for m in value if m.get("role", "user") == "user"]
        return users[-1] if users else None
    return value


def field(row: dict, name: str, source: str) -> str:
    """row[name] (dotted names reach into nested fields) as a non-empty string, or a ValueError
    naming the file, line and field."""
    where = f"{source}:{row.get('_line', '?')}"
    value = _lookup(row, name)
    if value is None:
        raise ValueError(f"{where}: row has no field {name!r} (fields: {sorted(k for k in row if k != '_line')})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return value
