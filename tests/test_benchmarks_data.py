"""The packaged benchmarks (AIME24, AIME25, MATH500, AMC23) and `load_problems`."""

import hashlib
import json
import re

import pytest

from lit_opd.data.benchmarks import BENCHMARK_DIR, BENCHMARKS, Problem, benchmark_name, load_problems
from lit_opd.verify import Verifier

SIZES = {"aime24": 30, "aime25": 30, "math500": 500, "amc23": 40}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_packaged_benchmark_loads_by_name(name):
    problems = load_problems(name)
    assert len(problems) == SIZES[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.id.startswith(f"{name}-") and p.problem.strip() and p.answer.strip() for p in problems)
    assert not any("boxed" in p.problem for p in problems), "the template adds the instruction, not the data"


def test_packaged_files_match_the_provenance_checksums():
    readme = (BENCHMARK_DIR / "README.md").read_text(encoding="utf-8")
    listed = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+\.jsonl)$", readme, re.M))
    assert sorted(listed) == sorted(f"{name}.jsonl" for name in BENCHMARKS)
    for file_name, digest in listed.items():
        assert hashlib.sha256((BENCHMARK_DIR / file_name).read_bytes()).hexdigest() == digest, file_name
    assert all(hub_id in readme for hub_id in BENCHMARKS.values())


def test_every_reference_answer_verifies_against_itself():
    """math-verify can parse every reference: a right answer can be recognised as right."""
    problems = [p for name in BENCHMARKS for p in load_problems(name)]
    with Verifier(timeout=10.0) as verifier:
        verdicts = verifier.verify_batch([f"\\boxed{{{p.answer}}}" for p in problems], [p.answer for p in problems])
    assert [(p.id, p.answer) for p, ok in zip(problems, verdicts) if not ok] == []


def test_local_jsonl_max_problems_and_field_fallbacks(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "1+1?", "answer": 2, "unique_id": "q/one"},
        {"question": "2+2?", "answer": "4", "unique_id": "q/two"},
        {"question": "3+3?", "answer": "6", "unique_id": "q/three"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_problems(str(path), max_problems=2) == [Problem("q/one", "1+1?", "2"), Problem("q/two", "2+2?", "4")]
    assert benchmark_name(str(path)) == "mine"


def test_rows_without_ids_get_numbered(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n', encoding="utf-8")
    assert [p.id for p in load_problems(str(path))] == ["plain-000", "plain-001"]


def test_json_and_parquet_files(tmp_path):
    rows = [{"id": "x1", "problem": "1+1?", "answer": "2"}, {"id": "x2", "problem": "2+3?", "answer": "5"}]
    json_path = tmp_path / "set.json"
    json_path.write_text(json.dumps(rows), encoding="utf-8")
    parquet_path = tmp_path / "set.parquet"
    pyarrow = pytest.importorskip("pyarrow.parquet")
    pyarrow.write_table(pytest.importorskip("pyarrow").Table.from_pylist(rows), parquet_path)
    expected = [Problem("x1", "1+1?", "2"), Problem("x2", "2+3?", "5")]
    assert load_problems(str(json_path)) == expected
    assert load_problems(str(parquet_path)) == expected


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": "a", "problem": "p", "answer": "1"}', '{"id": "b", "problem": "q"}'], r"bad\.jsonl:2: .*'answer'"),
        (['{"id": "a", "problem": "p", "answer": "  "}'], r"bad\.jsonl:1: field 'answer' is empty"),
        (['{"id": "a", "answer": "1"}'], r"bad\.jsonl:1: .*'problem'"),
        (['{"id": "a", "problem": "p", "answer": "1"}', "{not json"], r"bad\.jsonl:2: malformed JSON"),
        (['["a", "b"]'], r"bad\.jsonl:1: expected a JSON object"),
        (['{"id": "a", "problem": "p", "answer": "1"}', '{"id": "a", "problem": "q", "answer": "2"}'],
         r"bad\.jsonl:2: id 'a' repeats the one on line 1"),
        ([], r"no problems"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_problems(str(path))


def test_missing_local_file_is_an_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(str(tmp_path / "absent.jsonl"))


def test_benchmark_names():
    assert benchmark_name("aime25") == "aime25"
    assert benchmark_name("HuggingFaceH4/MATH-500") == "MATH-500"
    assert benchmark_name("/data/sets/olympiad.parquet") == "olympiad"
