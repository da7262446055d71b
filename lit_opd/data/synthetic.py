"""A synthetic verifiable math task: multi-step integer arithmetic, for the offline quickstart.

A problem is a chain of operations evaluated left to right, written with the fewest
parentheses that keep that order: "Compute (17 + 5) * 3 - 8.". Its worked solution does one
operation per step, steps separated by a blank line (the span delimiter), and ends with the
answer boxed:

    17 + 5 = 22

    22 * 3 = 66

    66 - 8 = 58

    \\boxed{58}

With `worded_steps` each step is a sentence that states the operation before doing it, so that
the solution is about 45 characters a step (123-203 character tokens at 4-5 operands, median
155: for granularity experiments where steps, blocks and tokens are different units):

    Step 1: take 17 and add 5, so 17 + 5 = 22.

Rows are {"id", "problem", "answer", "solution"}: the packaged benchmarks' fields plus the
solution, so the same loaders read both.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

Operator = str  # one of "+", "-", "*"


@dataclass(frozen=True)
class ArithmeticTask:
    """The difficulty knobs. A problem has `min_operands`..`max_operands` numbers; a number added
    or subtracted is in [1, max_operand], a factor in [2, max_factor]; every intermediate
    value stays in [0, max_value] (operations that would leave it are not drawn); worded_steps:
    each step a sentence ("Step 1: take 17 and add 5, so 17 + 5 = 22.") instead of the bare
    equation."""

    min_operands: int = 3
    max_operands: int = 4
    max_operand: int = 20
    max_factor: int = 9
    max_value: int = 200
    worded_steps: bool = False

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"need 2 ≤ min_operands ≤ max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if self.max_operand < 1 or self.max_factor < 2:
            raise ValueError(f"need max_operand ≥ 1 and max_factor ≥ 2, got {self.max_operand}, {self.max_factor}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be ≥ max_operand ({self.max_operand})")


def apply(left: int, op: Operator, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operator {op!r}")


def _draw_step(rng: random.Random, value: int, task: ArithmeticTask) -> tuple[Operator, int]:
    """An operation on the running value that keeps it in [0, max_value]."""
    choices = []
    if value + 1 <= task.max_value:
        choices.append("+")
    if value >= 1:
        choices.append("-")
    if 2 * value <= task.max_value and value >= 1:
        choices.append("*")
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(1, min(task.max_operand, task.max_value - value))
    if op == "-":
        return op, rng.randint(1, min(task.max_operand, value))
    return op, rng.randint(2, min(task.max_factor, task.max_value // value))


STEP_WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}


def render_step(index: int, value: int, op: Operator, number: int, result: int, worded: bool) -> str:
    """One solution step (index counts from 1)."""
    equation = f"{value} {op} {number} = {result}"
    if not worded:
        return equation
    return f"Step {index}: take {value} and {STEP_WORDS[op]} {number}, so {equation}."


def render_expression(first: int, steps: list[tuple[Operator, int]]) -> str:
    """Left-to-right evaluation order in ordinary notation: the expression so far is put in
    parentheses before a "*" when it ends in a "+" or "-" (its top-level operator)."""
    text, top_level = str(first), None
    for op, number in steps:
        if op == "*" and top_level in ("+", "-"):
            text = f"({text})"
        text, top_level = f"{text} {op} {number}", op
    return text


def make_problem(rng: random.Random, task: ArithmeticTask) -> dict[str, str]:
    """One problem: {"problem", "answer", "solution"} (no id)."""
    num_operands = rng.randint(task.min_operands, task.max_operands)
    value = first = rng.randint(1, task.max_operand)
    steps, lines = [], []
    for index in range(1, num_operands):
        op, number = _draw_step(rng, value, task)
        result = apply(value, op, number)
        lines.append(render_step(index, value, op, number, result, task.worded_steps))
        steps.append((op, number))
        value = result
    lines.append(f"\\boxed{{{value}}}")
    return {
        "problem": f"Compute {render_expression(first, steps)}.",
        "answer": str(value),
        "solution": "\n\n".join(lines),
    }


def _distinct_problems(rng: random.Random, task: ArithmeticTask, count: int, seen: set[str]) -> list[dict]:
    """The next `count` problems of `rng`'s stream whose text is not in `seen` (which grows)."""
    distinct: list[dict] = []
    attempts, limit, excluded = 0, 20 * count + 1000, len(seen)
    while len(distinct) < count:
        attempts += 1
        if attempts > limit:
            raise ValueError(f"the task {task} has too few distinct problems for {count} rows "
                             f"besides {excluded} excluded ones")
        row = make_problem(rng, task)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            distinct.append(row)
    return distinct


def make_splits(
    task: ArithmeticTask, num_train: int, num_heldout: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows with no problem in common, from `random.Random(seed)`.

    Problems are drawn in one stream and deduplicated by text: the first `num_heldout` distinct
    problems are held out, the next `num_train` train. Ids: "arith-train-00000", "arith-heldout-000".
    """
    distinct = _distinct_problems(random.Random(seed), task, num_train + num_heldout, set())
    heldout = [{"id": f"arith-heldout-{i:03d}", **row} for i, row in enumerate(distinct[:num_heldout])]
    train = [{"id": f"arith-train-{i:05d}", **row} for i, row in enumerate(distinct[num_heldout:])]
    return train, heldout


def extra_heldout(task: ArithmeticTask, train: list[dict], heldout: list[dict], count: int,
                  seed: int = 0) -> list[dict]:
    """`count` more held-out rows for a larger evaluation set, leaving the splits as they are: drawn
    from a stream of their own (`random.Random(f"extra-heldout-{seed}")`), none with the problem of
    a train or held-out row or of another extra row; ids continue the held-out numbering
    ("arith-heldout-200", ... after 200 held-out rows)."""
    seen = {row["problem"] for row in train + heldout}
    rows = _distinct_problems(random.Random(f"extra-heldout-{seed}"), task, count, seen)
    return [{"id": f"arith-heldout-{len(heldout) + i:03d}", **row} for i, row in enumerate(rows)]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path

