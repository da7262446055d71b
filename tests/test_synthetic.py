"""The synthetic arithmetic task: correct answers and worked solutions, determinism, disjoint
splits, and rows the benchmark loader reads."""

import ast
import json
import operator
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_opd.data.benchmarks import load_problems
from lit_opd.data.synthetic import (ArithmeticTask, extra_heldout, make_problem, make_splits, render_expression,
                                   write_jsonl)

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
STEP = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


def evaluate(expression: str) -> int:
    """Ordinary precedence (Python's parser), independent of the generator's left-to-right code."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def expression_of(problem: str) -> str:
    assert problem.startswith("Compute ") and problem.endswith(".")
    return problem[len("Compute ") : -1]


def check_row(row: dict, task: ArithmeticTask) -> None:
    assert int(row["answer"]) == evaluate(expression_of(row["problem"]))
    *steps, last = row["solution"].split("\n\n")
    assert last == f"\\boxed{{{row['answer']}}}"
    assert task.min_operands - 1 <= len(steps) <= task.max_operands - 1
    numbers = [int(n) for n in re.findall(r"\d+", row["problem"])]
    value = numbers[0]
    for step, number in zip(steps, numbers[1:]):
        left, op, right, result = STEP.match(step).groups()
        assert (int(left), int(right)) == (value, number)
        value = int(result)
        assert value == evaluate(f"{left} {op} {right}")
        assert 0 <= value <= task.max_value
    assert value == int(row["answer"])


def test_render_expression_keeps_left_to_right_order():
    assert render_expression(17, [("+", 5), ("*", 3), ("-", 8)]) == "(17 + 5) * 3 - 8"
    assert render_expression(2, [("*", 3), ("+", 4), ("*", 5)]) == "(2 * 3 + 4) * 5"
    assert render_expression(9, [("-", 4), ("-", 3)]) == "9 - 4 - 3"
    assert render_expression(3, [("*", 2), ("*", 4)]) == "3 * 2 * 4"
    assert evaluate("(2 * 3 + 4) * 5") == 50


def test_a_hand_checked_problem():
    train, heldout = make_splits(ArithmeticTask(), num_train=0, num_heldout=1, seed=0)
    assert train == []
    (row,) = heldout
    assert row == {
        "id": "arith-heldout-000",
        "problem": "Compute (14 + 9) * 5 - 10.",
        "answer": "105",
        "solution": "14 + 9 = 23\n\n23 * 5 = 115\n\n115 - 10 = 105\n\n\\boxed{105}",
    }


def test_answers_and_solutions_are_correct():
    task = ArithmeticTask()
    train, heldout = make_splits(task, num_train=300, num_heldout=100, seed=1)
    for row in train + heldout:
        check_row(row, task)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    min_operands=st.integers(2, 4),
    extra_operands=st.integers(0, 3),
    max_operand=st.integers(1, 50),
    max_factor=st.integers(2, 12),
    extra_value=st.integers(0, 500),
)
def test_every_task_gives_correct_rows(seed, min_operands, extra_operands, max_operand, max_factor, extra_value):
    import random

    task = ArithmeticTask(min_operands, min_operands + extra_operands, max_operand, max_factor, max_operand + extra_value)
    rng = random.Random(seed)
    for _ in range(5):
        check_row(make_problem(rng, task), task)


def test_same_seed_same_rows_other_seed_other_rows():
    task = ArithmeticTask()
    assert make_splits(task, 50, 20, seed=3) == make_splits(task, 50, 20, seed=3)
    assert make_splits(task, 50, 20, seed=3) != make_splits(task, 50, 20, seed=4)


def test_splits_are_disjoint_and_ids_unique():
    train, heldout = make_splits(ArithmeticTask(), num_train=2000, num_heldout=200, seed=0)
    assert (len(train), len(heldout)) == (2000, 200)
    assert not {r["problem"] for r in train} & {r["problem"] for r in heldout}
    assert len({r["problem"] for r in train}) == 2000
    assert len({r["id"] for r in train + heldout}) == 2200


def test_extra_heldout_rows_are_new_correct_problems_with_continued_ids():
    task = ArithmeticTask()
    train, heldout = make_splits(task, num_train=3000, num_heldout=200, seed=0)
    extra = extra_heldout(task, train, heldout, 300, seed=0)
    assert [row["id"] for row in extra] == [f"arith-heldout-{i:03d}" for i in range(200, 500)]
    problems = [row["problem"] for row in extra]
    assert len(set(problems)) == 300
    assert not set(problems) & {row["problem"] for row in train + heldout}
    for row in extra:
        check_row(row, task)
    assert extra_heldout(task, train, heldout, 300, seed=0) == extra
    assert extra_heldout(task, train, heldout, 300, seed=1) != extra


def test_extra_heldout_from_too_small_a_task_is_an_error():
    task = ArithmeticTask(min_operands=2, max_operands=2, max_operand=2, max_value=4)
    train, heldout = make_splits(task, num_train=4, num_heldout=2, seed=0)
    with pytest.raises(ValueError, match="too few distinct problems"):
        extra_heldout(task, train, heldout, 100)


def test_too_small_a_task_is_an_error():
    with pytest.raises(ValueError, match="too few distinct problems"):
        make_splits(ArithmeticTask(min_operands=2, max_operands=2, max_operand=2, max_value=4), 100, 10)
    with pytest.raises(ValueError, match="min_operands"):
        ArithmeticTask(min_operands=4, max_operands=3)


def test_jsonl_rows_read_by_the_benchmark_loader(tmp_path):
    train, heldout = make_splits(ArithmeticTask(), num_train=5, num_heldout=3, seed=0)
    path = write_jsonl(heldout, tmp_path / "sub" / "heldout.jsonl")
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == heldout
    assert all(set(json.loads(line)) == {"id", "problem", "answer", "solution"} for line in lines)
    problems = load_problems(str(path))
    assert [(p.id, p.problem, p.answer) for p in problems] == [(r["id"], r["problem"], r["answer"]) for r in heldout]


WORDED = re.compile(r"^Step (\d+): take (\d+) and (add|subtract|multiply by) (\d+), so (\d+ [-+*] \d+ = \d+)\.$")


def test_worded_steps_state_each_operation_and_give_the_granular_lengths():
    from lit_opd.data.char_tokenizer import build_char_tokenizer
    from lit_opd.quickstart import TASKS

    task = TASKS["granular"].task
    train, _ = make_splits(task, num_train=500, num_heldout=0, seed=0)
    words = {"add": "+", "subtract": "-", "multiply by": "*"}
    for row in train:
        *steps, last = row["solution"].split("\n\n")
        equations = []
        for index, step in enumerate(steps, start=1):
            number, left, word, right, equation = WORDED.match(step).groups()
            assert int(number) == index and equation.startswith(f"{left} {words[word]} {right} = ")
            equations.append(equation)
        check_row({**row, "solution": "\n\n".join([*equations, last])}, task)
    tokenizer = build_char_tokenizer()
    lengths = sorted(len(tokenizer(row["solution"]).input_ids) for row in train)
    assert 120 <= lengths[0] and lengths[-1] <= 210 and 140 <= lengths[len(lengths) // 2] <= 170
