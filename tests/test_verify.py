"""Answer extraction and the time-bounded math-verify checks of lit_opd.verify."""

import multiprocessing
import os
import signal
import threading
import time

import pytest

from lit_opd.verify import Verifier, extract_answer, is_equivalent

TIMEOUT = 2.0
# A check that hangs would never return; a bounded one returns within its timeout plus the
# time to start a replacement worker. The margin is generous: this is a bound, not a benchmark.
MARGIN = 20.0


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=2, timeout=TIMEOUT) as v:
        yield v


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and finally \\fbox{4}", "4"),
        ("set \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("escaped brace \\boxed{\\{1, \\}}", "\\{1, \\}"),
        ("\\boxed{ 5 }", "5"),
        ("$\\boxed 5$", "5"),
        ("no box, the answer is 17.", "17"),
        ("we get 3, then 1,250 apples", "1250"),
        ("between 1,2,3", "3"),
        ("it is -2.5 degrees", "-2.5"),
        ("ratio 3/4", "3/4"),
        ("no number here", None),
        ("", None),
        ("\\boxed{}", None),
        ("unclosed \\boxed{\\frac{1}{2}", None),
        ("closed \\boxed{1} then unclosed \\boxed{2", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# (model's answer, reference) pairs of the MATH style that must be judged equal.
EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "3/4"),
    ("\\tfrac{3}{4}", "0.75"),
    ("\\frac34", "\\frac{3}{4}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-\\frac12"),
    ("\\frac{7}{2}", "3.5"),
    ("3", "3.0"),
    ("10\\%", "10"),
    ("10", "10\\%"),
    ("50\\%", "0.5"),
    ("[2, 5)", "[2,5)"),
    ("x \\in [2, 5)", "[2,5)"),
    ("(-\\infty,3]", "(-\\infty, 3]"),
    ("\\left[ -1, 2 \\right]", "[-1,2]"),
    ("(-\\infty,0)\\cup(1,\\infty)", "(-\\infty, 0) \\cup (1, \\infty)"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\left(3,-1\\right)", "(3, -1)"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\sqrt{50}", "5\\sqrt{2}"),
    ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("3^{1/2}", "\\sqrt{3}"),
    ("5", "5 \\text{ cm}"),
    ("4 \\text{ cm}^2", "4"),
    ("5\\text{ inches}", "5"),
    ("30", "30^\\circ"),
    ("90^{\\circ}", "90^\\circ"),
    ("3.14159265", "\\pi"),
    ("\\pi/3", "\\frac{\\pi}{3}"),
    ("r^2\\pi", "\\pi r^2"),
    ("1000", "1,000"),
    ("10000", "10,\\!000"),
    ("1\\,000\\,000", "1000000"),
    ("1500", "1.5\\times10^3"),
    ("0.01", "10^{-2}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("0.5x", "\\frac{x}{2}"),
    ("3", "x = 3"),
    ("2x+3", "y = 2x + 3"),
    ("\\{3,2,1\\}", "\\{1,2,3\\}"),
    ("2, -3", "-3, 2"),
    ("B", "\\text{(B)}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("18.90", "\\$18.90"),
    ("p-q", "p - q"),
    ("2i+3", "3+2i"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]

NOT_EQUIVALENT = [
    ("0.51", "\\frac{1}{2}"),
    ("2", "1"),
    ("\\frac{4}{3}", "\\frac{3}{4}"),
    ("1", "-1"),
    ("3.01", "3"),
    ("100", "10"),
    ("10000", "1000"),
    ("[2,5]", "[2,5)"),
    ("(1,2)", "[1,2]"),
    ("(-1,3)", "(3,-1)"),
    ("1.41", "\\sqrt{2}"),
    ("2\\sqrt3", "2\\sqrt2"),
    ("3.14", "\\pi"),
    ("\\pi", "2\\pi"),
    ("60", "30^\\circ"),
    ("x^3", "x^2"),
    ("(x-1)^2", "x^2-1"),
    ("2x+4", "2x+3"),
    ("C", "\\text{(B)}"),
    ("Evan", "\\text{Evelyn}"),
    ("\\{1,2,3\\}", "\\{1,2\\}"),
    ("-\\infty", "\\infty"),
    ("q-p", "p - q"),
]


def test_equivalent_pairs(verifier):
    verdicts = verifier.verify_batch([f"\\boxed{{{a}}}" for a, _ in EQUIVALENT], [r for _, r in EQUIVALENT])
    assert [pair for pair, ok in zip(EQUIVALENT, verdicts) if not ok] == []


def test_non_equivalent_pairs(verifier):
    verdicts = verifier.verify_batch([f"\\boxed{{{a}}}" for a, _ in NOT_EQUIVALENT], [r for _, r in NOT_EQUIVALENT])
    assert [pair for pair, ok in zip(NOT_EQUIVALENT, verdicts) if ok] == []


def test_answers_in_model_text(verifier):
    predictions = [
        "Adding up, 3 + 4 = 7, so the total is \\boxed{7}.",
        "We try \\boxed{5}, but that fails; the answer is \\boxed{\\dfrac{14}{3}}",
        "The probability is 0.25 after simplifying 2/8 = 0.25",
        "The area is 12 square units.",
        "I do not know.",
        "truncated mid-answer: \\boxed{\\frac{14}{3",
    ]
    references = ["7", "\\frac{14}{3}", "\\frac14", "12", "0", "\\frac{14}{3}"]
    assert verifier.verify_batch(predictions, references) == [True, True, True, True, False, False]


def test_is_equivalent_default_verifier():
    assert is_equivalent("so \\boxed{\\frac{1}{2}}", "0.5")
    assert not is_equivalent("so \\boxed{\\frac{1}{3}}", "0.5")
    assert not is_equivalent("no answer at all", "0.5")


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("\\boxed{9^{9^{9^{9^{9}}}}}", "1"),  # sympy evaluates the power tower forever
        ("\\boxed{1}", "9^{9^{9^{9^{9}}}}"),  # the same in the reference
        ("\\boxed{10^{10^{9}}}", "1"),  # a billion-digit number
        ("\\boxed{" + "\\frac{1}{" * 1000 + "2" + "}" * 1000 + "}", "1"),  # deeply nested fractions
        ("\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}", "1"),  # deeply nested parentheses
    ],
    ids=["power_tower", "power_tower_reference", "huge_number", "nested_fractions", "nested_parentheses"],
)
def test_pathological_check_is_cut_off(verifier, prediction, reference):
    timeouts = verifier.stats.timeouts
    started = time.monotonic()
    assert verifier.verify_batch([prediction], [reference]) == [False]
    assert time.monotonic() - started < TIMEOUT + MARGIN
    assert verifier.stats.timeouts == timeouts + 1
    assert verifier.verify_batch(["\\boxed{2}"], ["2"]) == [True]


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("\\boxed{" + "1" + "0" * 100_000 + "}", "1" + "0" * 100_000),  # a 100,001-digit number
        ("unclosed \\boxed{\\frac{1}{2", "\\frac{1}{2}"),  # no answer: never reaches a worker
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2"),  # unclosed brace in the reference
    ],
)
def test_large_or_malformed_inputs_return(verifier, prediction, reference):
    verifier.verify_batch([prediction], [reference])
    assert verifier.verify_batch(["\\boxed{2}"], ["2"]) == [True]


def test_pathological_answers_cost_only_their_own_check(verifier):
    """A batch with hanging checks among good ones: the good ones are still judged."""
    predictions = ["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{\\frac{1}{2}}", "\\boxed{7}", "\\boxed{8}"] * 2
    references = ["1", "0.5", "7", "9"] * 2
    assert verifier.verify_batch(predictions, references) == [False, True, True, False] * 2


def test_dead_worker_costs_one_check_and_is_replaced():
    with Verifier(num_workers=1, timeout=TIMEOUT) as v:
        assert v.verify_batch(["\\boxed{1}"], ["1"]) == [True]
        for worker in v._pool.workers:
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
        assert v.verify_batch(["\\boxed{1}"], ["1"]) == [False]
        assert v.stats.crashes == 1
        assert v.verify_batch(["\\boxed{1}"], ["1"]) == [True]


def test_batch_uses_all_workers_and_keeps_them():
    with Verifier(num_workers=2, timeout=TIMEOUT) as v:
        n = 200
        verdicts = v.verify_batch([f"\\boxed{{{i}/{2 * i}}}" for i in range(1, n + 1)], ["0.5"] * n)
        assert verdicts == [True] * n
        pids = sorted(w.process.pid for w in v._pool.workers)
        assert len(pids) == 2
        v.verify_batch(["\\boxed{1}"] * 4, ["1"] * 4)
        assert sorted(w.process.pid for w in v._pool.workers) == pids
        assert v.stats.checks == n + 4
    assert v._pool.workers == []


def test_usable_from_threads(verifier):
    """math-verify's own timeout would raise off the main thread; ours does not use signals."""
    results = {}

    def check(index):
        results[index] = verifier.verify_batch([f"\\boxed{{{index}}}", "\\boxed{0}"], [str(index), "1"])

    threads = [threading.Thread(target=check, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: [True, False] for i in range(4)}


def _check_in_child(pair):
    return is_equivalent(*pair)


def test_usable_in_forked_worker_processes():
    """Like DataLoader workers: forked (daemonic) children inherit the parent's default verifier;
    they start their own workers and leave the parent's alone."""
    assert is_equivalent("\\boxed{0.5}", "\\frac12")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        verdicts = pool.map(_check_in_child, [("\\boxed{0.5}", "\\frac12"), ("\\boxed{3}", "4")])
    assert verdicts == [True, False]
    assert is_equivalent("\\boxed{3}", "3")


def test_arguments_are_checked(verifier):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        verifier.verify_batch(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="timeout"):
        Verifier(timeout=0)
    with pytest.raises(ValueError, match="num_workers"):
        Verifier(num_workers=0)


def test_without_the_fallback_only_a_boxed_answer_counts():
    from lit_opd.verify import answer_from_fallback

    truncated = "3 + 4 = 7, then 7 + 5 = 12 and then we need"
    assert extract_answer(truncated) == "12"
    assert extract_answer(truncated, fallback=False) is None
    assert extract_answer("so \\boxed{12}", fallback=False) == "12"
    assert answer_from_fallback(truncated) and not answer_from_fallback("\\boxed{12}")
    assert not answer_from_fallback("no number here")
    with Verifier(num_workers=1) as verifier:
        assert verifier.verify_batch([truncated, "\\boxed{12}"], ["12", "12"], fallback=False) == [False, True]
        assert verifier.verify_batch([truncated], ["12"]) == [True]
