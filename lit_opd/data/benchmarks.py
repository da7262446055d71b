"""The evaluation problems: the four packaged benchmarks (AIME24, AIME25, MATH500, AMC23; see
benchmarks/README.md for their provenance), or any local file or HF dataset of problems."""

from dataclasses import dataclass
from pathlib import Path

from lit_opd.data.records import field, load_records

BENCHMARK_DIR = Path(__file__).parent / "benchmarks"
# Packaged name → the HF hub dataset it was taken from (the same problems, online).
BENCHMARKS = {
    "aime24": "HuggingFaceH4/aime_2024",
    "aime25": "math-ai/aime25",
    "math500": "HuggingFaceH4/MATH-500",
    "amc23": "math-ai/amc23",
}
# Field names tried in order when none is given: the packaged files and the hub datasets above.
PROBLEM_FIELDS = ("problem", "question")
ID_FIELDS = ("id", "unique_id")


@dataclass(frozen=True)
class Problem:
    """One math problem: `answer` is the reference final answer (LaTeX), checked by
    `lit_opd.verify`, never by string equality."""

    id: str
    problem: str
    answer: str


def benchmark_name(source: str) -> str:
    """The short name a benchmark's metrics are logged under: the packaged name, a file's stem,
    or the last part of an HF dataset id ("HuggingFaceH4/MATH-500" → "MATH-500")."""
    if source in BENCHMARKS:
        return source
    path = Path(source)
    return path.stem if path.suffix in (".jsonl", ".json", ".parquet") else source.rstrip("/").split("/")[-1]


def load_problems(
    source: str,
    split: str = "test",
    max_problems: int | None = None,
    problem_field: str | None = None,
    answer_field: str = "answer",
    id_field: str | None = None,
) -> list[Problem]:
    """Problems from a packaged benchmark name ("aime24", "aime25", "math500", "amc23"), a local
    .jsonl / .json / .parquet file, or an HF dataset id (`datasets.load_dataset(source, split)`).

    problem_field / id_field: None tries PROBLEM_FIELDS / ID_FIELDS in order; rows without an
    id field get "<name>-<row index>". max_problems keeps the first ones. A row without a problem
    or answer, or a repeated id, is a ValueError naming the file and line.
    """
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be ≥ 1 or None, got {max_problems}")
    location = str(BENCHMARK_DIR / f"{source}.jsonl") if source in BENCHMARKS else source
    if location == source and "/" not in source and not Path(source).expanduser().exists():
        raise ValueError(
            f"benchmark {source!r} is neither a packaged benchmark {sorted(BENCHMARKS)}, a local file, "
            "nor an HF dataset id (owner/name)"
        )
    rows = load_records(location, split=split)
    if not rows:
        raise ValueError(f"{location}: no problems")
    name = benchmark_name(source)
    problems, seen = [], {}
    for index, row in enumerate(rows[:max_problems]):
        where = f"{location}:{row['_line']}"
        text = field(row, problem_field or _first_present(row, PROBLEM_FIELDS), location)
        answer = field(row, answer_field, location)
        id_name = id_field or next((n for n in ID_FIELDS if row.get(n) is not None), None)
        problem_id = field(row, id_name, location) if id_name else f"{name}-{index:03d}"
        if problem_id in seen:
            raise ValueError(f"{where}: id {problem_id!r} repeats the one on line {seen[problem_id]}")
        seen[problem_id] = row["_line"]
        problems.append(Problem(id=problem_id, problem=text, answer=answer))
    return problems


def _first_present(row: dict, names: tuple[str, ...]) -> str:
    """The first of `names` that `row` has (else the first, so the error names what was expected)."""
    return next((name for name in names if row.get(name) is not None), names[0])
