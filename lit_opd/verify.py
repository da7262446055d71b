"""Is a model's final answer right? Answer extraction and time-bounded math-verify checks.

`extract_answer` takes the final answer out of model text (the last \\boxed{...} or \\fbox{...},
else the last number). `Verifier` checks answers against references with math-verify in a pool
of worker processes: sympy can hang or exhaust memory on a pathological answer (a power tower,
a fraction nested a thousand deep), and math-verify's own timeout uses SIGALRM, which works only
in the main thread. So each check runs in a worker with a deadline; a worker past its deadline
is killed and replaced, and the check counts as wrong. Workers are fresh interpreters (started
with `subprocess`, never forked, so torch's threads and CUDA state are not inherited) that
import only math-verify; they are started on demand and kept for the next batch.
"""

import math
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_LIMIT_MB = 4096
STARTUP_TIMEOUT = 120.0
MAX_FAILED_STARTS = 3

_BOX_MARKERS = ("\\boxed", "\\fbox")
# Integers with optional thousands separators, decimals and simple fractions ("-1,234.5", "3/4").
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
# A LaTeX space between digit groups ("1\,000\,000"), which math-verify reads as two numbers.
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")


def extract_answer(text: str, fallback: bool = True) -> str | None:
    """The final answer in `text`: the content of the last \\boxed{...} / \\fbox{...} (braces
    balanced, escaped \\{ \\} ignored), else (with `fallback`) the last number (thousands
    commas removed).

    None when there is no answer: no box and no number (no box, without `fallback`), an empty
    box, or a last box left open (a truncated response has not given its answer, even if an
    earlier box did).
    """
    start = max(text.rfind(marker) for marker in _BOX_MARKERS)
    if start >= 0:
        marker = next(m for m in _BOX_MARKERS if text.startswith(m, start))
        content = _box_content(text, start + len(marker))
        return None if content is None else content.strip() or None
    numbers = _NUMBER.findall(text) if fallback else []
    return numbers[-1].replace(",", "") if numbers else None


def answer_from_fallback(text: str) -> bool:
    """Whether `extract_answer(text)` found no box and took the last number instead."""
    return extract_answer(text, fallback=False) is None and extract_answer(text) is not None


def _box_content(text: str, position: int) -> str | None:
    """Content of the box whose marker ends at `position`: a brace group "{...}", or for
    "\\boxed 5" the run of characters up to the next space or "$". None if the group never closes."""
    rest = text[position:]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if rest[:1] not in (" ", "\t"):
            return None
        return re.split(r"[\s$]", stripped, maxsplit=1)[0]
    begin = position + len(rest) - len(stripped)
    depth, index = 0, begin
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin + 1 : index]
        index += 1
    return None


def check_answer(answer: str, reference: str) -> bool:
    """math-verify equivalence of an extracted answer and a reference, both LaTeX (or plain
    "3/4"); each is parsed as the content of a \\boxed{} so the whole string is one expression.

    Unbounded in time: call it through a `Verifier`, which runs it in a worker with a deadline.
    """
    from math_verify import parse, verify

    reference, answer = (_DIGIT_GROUP_SPACE.sub("", text) for text in (reference, answer))
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold) and bool(target) and verify(gold, target, timeout_seconds=None)


@dataclass
class VerifierStats:
    """Cumulative counts since the Verifier was made. A timeout or crash counts as wrong.

    checks: answers sent to a worker; no_answer: predictions without an extractable answer
    (wrong, no worker involved); timeouts: checks killed at the deadline; crashes: checks whose
    worker died or raised (stack overflow, memory limit)."""

    checks: int = 0
    no_answer: int = 0
    timeouts: int = 0
    crashes: int = 0


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    deadline: float
    ready: bool = False
    task: int | None = None


@dataclass
class _Pool:
    """The workers of one Verifier, owned by the process that started them. Shared with the
    finalizer, which must not hold a reference to the Verifier itself."""

    owner_pid: int = field(default_factory=os.getpid)
    workers: list[_Worker] = field(default_factory=list)

    def stop(self, worker: _Worker) -> None:
        self.workers.remove(worker)
        worker.conn.close()
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()

    def shutdown(self) -> None:
        # A forked child inherits this object; killing its parent's workers would break the parent.
        if os.getpid() == self.owner_pid:
            for worker in list(self.workers):
                self.stop(worker)
        self.workers.clear()


class Verifier:
    """Checks many answers against references in parallel, each check bounded in time.

    Args:
        num_workers: the most worker processes (default: the CPUs this process may use). Workers
            start when a batch needs them (about a second each, in parallel) and stay for the next.
        timeout: seconds one check may take before its worker is killed and replaced.
        memory_limit_mb: address-space limit of each worker (None: unlimited), so an answer such
            as 9^{9^{9^9}} fails the check instead of exhausting the machine's memory.

    Thread-safe (batches from several threads run one after another) and usable off the main
    thread and in forked processes (a fork starts its own workers). Use as a context manager
    or call `close()`; workers are also stopped when the Verifier is garbage-collected or at exit.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
    ):
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.num_workers = num_workers or available_cpus()
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self.stats = VerifierStats()
        self._new_pool()

    def _new_pool(self) -> None:
        self._pool = _Pool()
        self._lock = threading.Lock()
        self._failed_starts = 0
        self._finalizer = weakref.finalize(self, self._pool.shutdown)

    def verify_batch(self, predictions: list[str], references: list[str], fallback: bool = True) -> list[bool]:
        """[is_equivalent(p, r) for p, r in zip(predictions, references)], on all workers; without
        `fallback` only a \\boxed{} answer counts (`extract_answer`)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        answers = [extract_answer(prediction, fallback) for prediction in predictions]
        return self.check_batch(answers, references)

    def check_batch(self, answers: list[str | None], references: list[str]) -> list[bool]:
        """`check_answer` of already-extracted answers (None: no answer, wrong), on all workers."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers but {len(references)} references")
        if os.getpid() != self._pool.owner_pid or not self._finalizer.alive:
            self._finalizer.detach()  # forked (the parent's workers are not ours) or closed
            self._new_pool()
        tasks = [(i, a, str(r)) for i, (a, r) in enumerate(zip(answers, references)) if a is not None]
        results = [False] * len(answers)
        with self._lock:
            self.stats.no_answer += len(answers) - len(tasks)
            self.stats.checks += len(tasks)
            self._run(deque(tasks), results)
        return results

    def is_equivalent(self, prediction: str, reference: str) -> bool:
        return self.verify_batch([prediction], [reference])[0]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self, queue: deque, results: list[bool]) -> None:
        """Hand tasks to idle workers, collect results, enforce deadlines, until all are done."""
        while queue or any(w.task is not None for w in self._pool.workers):
            self._start_workers(len(queue))
            for worker in list(self._pool.workers):
                if queue and worker.ready and worker.task is None:
                    self._send(worker, queue.popleft())
            self._collect(results)

    def _start_workers(self, pending: int) -> None:
        waiting = sum(1 for w in self._pool.workers if w.task is None)
        room = self.num_workers - len(self._pool.workers)
        for _ in range(min(pending - waiting, room)):
            self._pool.workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = Pipe()
        package_root = str(Path(__file__).resolve().parent.parent)
        code = "import sys; sys.path.insert(0, sys.argv[1]); from lit_opd.verify import _serve; _serve(*sys.argv[2:])"
        args = [str(child_conn.fileno()), str(math.ceil(self.timeout)), str(self.memory_limit_mb or 0)]
        process = subprocess.Popen(
            [sys.executable, "-c", code, package_root, *args],
            pass_fds=(child_conn.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        child_conn.close()
        return _Worker(process, parent_conn, deadline=time.monotonic() + STARTUP_TIMEOUT)

    def _send(self, worker: _Worker, task: tuple[int, str, str]) -> None:
        try:
            worker.conn.send(task)
        except OSError:
            self.stats.crashes += 1
            self._pool.stop(worker)
            return
        worker.task = task[0]
        worker.deadline = time.monotonic() + self.timeout

    def _collect(self, results: list[bool]) -> None:
        """Wait for the next message or deadline; record results, replace dead or late workers."""
        waiting = [w for w in self._pool.workers if w.task is not None or not w.ready]
        if not waiting:
            return
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        readable = set(wait([w.conn for w in waiting], timeout))
        for worker in waiting:
            if worker.conn in readable:
                self._receive(worker, results)
            elif time.monotonic() >= worker.deadline:
                if worker.ready:
                    self.stats.timeouts += 1
                else:
                    self._failed_start()
                self._pool.stop(worker)

    def _receive(self, worker: _Worker, results: list[bool]) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            if worker.ready:
                self.stats.crashes += 1
            else:
                self._failed_start()
            self._pool.stop(worker)
            return
        if message == "ready":
            worker.ready, self._failed_starts = True, 0
            return
        task, correct, raised = message
        results[task] = correct
        self.stats.crashes += raised
        worker.task = None

    def _failed_start(self) -> None:
        self._failed_starts += 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            self._pool.shutdown()
            raise RuntimeError(
                f"{MAX_FAILED_STARTS} verifier workers in a row failed to start ({sys.executable} -c "
                "'import math_verify'): see their error output above"
            )


def _serve(fd: str, cpu_seconds: str, memory_limit_mb: str) -> None:
    """Worker loop: receive (task, answer, reference), send (task, correct, raised).

    The parent enforces the deadline; the CPU-time limit set before each check is a backstop
    that ends a stuck worker even if its parent died without killing it (SIGXCPU)."""
    import logging
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if int(memory_limit_mb):
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (int(memory_limit_mb) * 2**20, hard))
    # math-verify warns that its signal timeouts are off; here the parent's deadline replaces them.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    conn = Connection(int(fd))
    check_answer("1", "1")  # imports and builds the parsers before the first timed check
    conn.send("ready")
    while True:
        try:
            task, answer, reference = conn.recv()
        except EOFError:
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_limit = math.ceil(usage.ru_utime + usage.ru_stime) + 2 * int(cpu_seconds) + 5
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        try:
            correct, raised = check_answer(answer, reference), False
        except Exception:  # RecursionError on deep nesting, MemoryError at the limit, sympy errors
            correct, raised = False, True
        conn.send((task, correct, raised))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_default_verifier: Verifier | None = None
_default_lock = threading.Lock()


def _forget_default_verifier() -> None:
    global _default_verifier, _default_lock
    _default_verifier, _default_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_default_verifier)


def default_verifier() -> Verifier:
    """The process-wide Verifier behind `is_equivalent` (DEFAULT_TIMEOUT, all CPUs, started lazily)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = Verifier()
        return _default_verifier


def is_equivalent(prediction: str, reference: str) -> bool:
    """Does the final answer in the model's text `prediction` (last \\boxed{...}, else the last
    number) equal `reference` (a LaTeX answer)? math-verify decides: fractions, decimals,
    percentages, intervals, tuples, units and LaTeX variants. At most DEFAULT_TIMEOUT seconds
    (plus a worker start on first use); False on timeout or crash. Many answers: use
    `Verifier.verify_batch`, which uses all cores."""
    return default_verifier().is_equivalent(prediction, reference)
