"""Teachers outside the trainer's memory: a colocated vLLM engine (`teacher_engine: vllm`) or a
vLLM OpenAI-compatible server (`teacher_url`). Both score rollouts from vLLM's `prompt_logprobs`
(the log-prob of every response token and the top-K support of every response position) and
sample teacher rollouts (phased teacher sampling); the full-vocabulary loss (GKD) needs the
teacher's logits and so a teacher in the trainer.

Scoring asks for K + |exclude| prompt log-probs per position (`max_logprobs` must allow it) and
never reads vLLM's prefix cache: vLLM skips it for requests with `prompt_logprobs`
(`skip_reading_prefix_cache`), since cached positions get no prompt log-probs and an open vLLM
bug makes them depend on request order; the colocated engine also turns prefix caching off.

Prompt log-probs become score tensors in one pass over vLLM's lists (its flat form in process,
orjson-parsed JSON from a server) and then tensor ops. Every answer is checked on the way: a missing
row or position, a top-K narrower than asked, the scored token absent, a log-prob missing or not
finite, cut-short JSON are a `MalformedTeacherAnswer` (a server's is retried), never a silent 0.
"""

import http.client
import time
import urllib.error
import urllib.request
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson
import torch
from torch import Tensor

from lit_opd.rollout.engine import Generation, SamplingConfig, right_pad
from lit_opd.rollout.vllm_engine import attended_tokens, row_seeds, sample, start_llm, token_prompts
from lit_opd.setting_checks import check_range


@dataclass
class TeacherServing:
    """How a teacher outside the trainer runs (`model.init_args.teacher_serving`): the first five
    settings are the colocated engine's (teacher_engine: vllm; it runs without sleep mode: vLLM
    allows one sleep-mode engine per process, and the student's rollout engine has it), the rest
    the server client's (teacher_url).

    Args:
        gpu_memory_utilization: the colocated engine's share of device memory (on CPU: of host memory
            less all the process holds).
        kv_cache_memory_bytes: the colocated engine's KV cache size instead (None: from the share; on
            CPU, beside the student's rollout engine, it is needed).
        max_model_len: prompt + response tokens per row of the colocated engine (None: the model's).
        enforce_eager: the colocated engine without CUDA graphs.
        dtype: the colocated engine's weights ("auto": model.teacher_dtype; vLLM's own "auto" would run
            a float32 checkpoint in 16 bits).
        served_model: the model name the server serves (None: model.teacher).
        rows_per_request: rows scored per request (prompt log-probs come back as JSON, ~60 bytes per
            (position, token)).
        max_concurrency: requests in flight at once.
        timeout_s: seconds one request may take.
        retries: tries after the first, the i-th after backoff_s·2^i seconds.
        backoff_s: the first retry's wait in seconds, doubled at each retry.

    The defaults give up after 6 × 240 s + 62 s ≈ 25 min (`give_up_after_s`), inside the 30-minute
    collective timeout of Lightning's strategies, so that with several processes every rank is still
    there to write the checkpoint before the run stops; `lit-opd fit` refuses a budget beyond the
    strategy's timeout (raise `trainer.strategy.init_args.timeout` with it, e.g. for long teacher
    rollouts).
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    served_model: str | None = None
    rows_per_request: int = 4
    max_concurrency: int = 16
    timeout_s: float = 240.0
    retries: int = 5
    backoff_s: float = 2.0

    def __post_init__(self):
        positive = {"gpu_memory_utilization": self.gpu_memory_utilization, "rows_per_request": self.rows_per_request,
                    "max_concurrency": self.max_concurrency, "timeout_s": self.timeout_s}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"model.teacher_serving.{name} must be > 0, got {value}")
        for name, value in {"retries": self.retries, "backoff_s": self.backoff_s}.items():
            if value < 0:
                raise ValueError(f"model.teacher_serving.{name} must be ≥ 0, got {value}")
        for name in ("kv_cache_memory_bytes", "max_model_len"):
            check_range(f"model.init_args.teacher_serving.{name}", getattr(self, name), 1, optional=True)


    def give_up_after_s(self) -> float:
        """The longest a request can take before `TeacherUnreachable`: every try times out."""
        return (self.retries + 1) * self.timeout_s + self.backoff_s * (2**self.retries - 1)


class TeacherUnreachable(RuntimeError):
    """The teacher did not give usable scores: a server that did not answer within its retries,
    refused a request, or kept answering something malformed. The run writes a checkpoint and stops."""


class MalformedTeacherAnswer(TeacherUnreachable):
    """A teacher answer that cannot become scores: rows or positions missing, a top-K narrower than
    asked, the scored token absent, a log-prob missing or not finite, JSON cut short."""


def flat_entries(positions, length: int) -> tuple[list[int], list[float], list[int]]:
    """The last `length` positions of one row's prompt log-probs, flattened in one pass: (token
    ids, log-probs, entries per position). `positions` is vLLM's `FlatLogprobs` (read as its
    lists), a list of {token id: Logprob | float} or a server's JSON list of {"id": {"logprob": x}}."""
    if length == 0:
        return [], [], []
    if hasattr(positions, "start_indices"):  # vllm.logprobs.FlatLogprobs
        starts, ends = positions.start_indices[-length:], positions.end_indices[-length:]
        if len(starts) < length or len(ends) < length:
            raise MalformedTeacherAnswer(f"prompt log-probs of {length} response positions expected, got {len(starts)}")
        first, last = starts[0], ends[-1]
        return (positions.token_ids[first:last], positions.logprobs[first:last],
                [end - start for start, end in zip(starts, ends)])
    if not isinstance(positions, list) or len(positions) < length:
        got = len(positions) if isinstance(positions, list) else type(positions).__name__
        raise MalformedTeacherAnswer(f"prompt log-probs of {length} response positions expected, got {got}")
    ids, logps, widths = [], [], []
    try:
        for entry in positions[len(positions) - length:]:
            ids.extend(entry)
            logps.extend(entry.values())
            widths.append(len(entry))
    except (AttributeError, TypeError) as error:
        raise MalformedTeacherAnswer(f"a response position's prompt log-probs are not a mapping ({error})") from None
    if ids and isinstance(ids[0], str):  # JSON object keys
        try:
            ids = list(map(int, ids))
        except ValueError as error:
            raise MalformedTeacherAnswer(f"a token id of the teacher's answer is not an integer ({error})") from None
    if logps and not isinstance(logps[0], (int, float)):
        try:  # {id: Logprob} from vLLM or {"id": {"logprob": x, ...}} from a server's JSON
            logps = [lp.logprob for lp in logps] if hasattr(logps[0], "logprob") else [lp["logprob"] for lp in logps]
        except (AttributeError, KeyError, TypeError) as error:
            raise MalformedTeacherAnswer(f"a prompt log-prob entry has no log-prob ({error!r})") from None
    return ids, logps, widths


def as_tensor(values: array, dtype: torch.dtype) -> Tensor:
    """A 1-D tensor over `values`' buffer (no copy)."""
    return torch.frombuffer(values, dtype=dtype) if len(values) else torch.zeros(0, dtype=dtype)


def scores_from_entries(
    ids: list, logps: list, widths: list[int], response_ids: Tensor, response_mask: Tensor, top_k: int,
    exclude: set[int], token_first: bool = False,
) -> dict[str, Tensor]:
    """Teacher scores from the prompt log-probs of every response position (row-major, masked-in
    positions only), flattened: position j has `widths[j]` entries (token id, log-prob) in `ids`,
    `logps`. `token_first`: each position's first entry is the scored token's own (vLLM's flat
    form), read as such; otherwise the token is looked up among the entries. Then tensor ops only:
    the entries as [M, W] (padded where widths differ), the token's log-prob matched, the top-K sorted.
    Returns what `scores_from_prompt_logprobs` returns; `MalformedTeacherAnswer` where an entry
    is missing, not a number, or not finite."""
    N, T = response_ids.shape
    mask = response_mask.cpu().bool()
    targets = response_ids.cpu()[mask]
    M = targets.numel()
    if len(widths) != M:
        raise MalformedTeacherAnswer(f"prompt log-probs of {M} response positions expected, got {len(widths)}")
    try:  # through array.array: a list of Python numbers into a tensor at a fraction of torch.tensor's cost
        ids, logps = as_tensor(array("q", ids), torch.long), as_tensor(array("f", logps), torch.float32)
    except (TypeError, ValueError, OverflowError) as error:
        raise MalformedTeacherAnswer(f"a token id or log-prob of the teacher's answer is not a number ({error})") from None
    widths = torch.tensor(widths, dtype=torch.long)
    if ids.numel() != logps.numel() or ids.numel() != int(widths.sum()) or (ids.numel() and int(ids.min()) < 0):
        raise MalformedTeacherAnswer("the teacher's answer has token ids and log-probs that do not pair up")
    W = int(widths.max()) if M else 1
    if M and int(widths.min()) == W:  # vLLM's flat form: every position has the same entries
        id_grid, logp_grid = ids.view(M, W), logps.view(M, W)
    else:  # dicts: one entry fewer where the token is among the top ones; -1 / -inf pad the rest
        rows = torch.repeat_interleave(torch.arange(M), widths)
        cols = torch.arange(ids.numel()) - torch.repeat_interleave(torch.cumsum(widths, 0) - widths, widths)
        id_grid = torch.full((M, W), -1, dtype=torch.long).index_put_((rows, cols), ids)
        logp_grid = torch.full((M, W), float("-inf")).index_put_((rows, cols), logps)
    if token_first:
        found, logp = id_grid[:, 0] == targets, logp_grid[:, 0]
        id_grid, logp_grid = id_grid[:, 1:], logp_grid[:, 1:]
    else:
        match = id_grid == targets[:, None]
        found, logp = match.any(1), torch.where(match, logp_grid, float("-inf")).amax(1) if W else torch.zeros(M)
    if not bool(found.all()):
        raise MalformedTeacherAnswer(f"the scored token is missing from the teacher's log-probs at "
                                     f"{int((~found).sum())} response positions")
    if not bool(torch.isfinite(logp).all()):
        raise MalformedTeacherAnswer("a log-prob of a scored token in the teacher's answer is not finite")
    out = {"logp": torch.zeros(N, T).masked_scatter_(mask, logp)}
    if top_k:
        candidate = (id_grid >= 0) & ~torch.isin(id_grid, torch.tensor(sorted(exclude), dtype=torch.long))
        if bool((candidate.sum(1) < top_k).any()):
            raise MalformedTeacherAnswer(f"the teacher's answer has fewer than top_k = {top_k} log-probs outside the "
                                         f"excluded ids at some response position")
        # by decreasing log-prob, equal ones by decreasing id: ids sorted first, then a stable sort
        by_id = id_grid.argsort(1, descending=True)
        values, order = torch.where(candidate, logp_grid, float("-inf")).gather(1, by_id).sort(dim=1, descending=True,
                                                                                               stable=True)
        values, top_ids = values[:, :top_k], id_grid.gather(1, by_id.gather(1, order[:, :top_k]))
        if not bool(torch.isfinite(values).all()):
            raise MalformedTeacherAnswer("a top-K log-prob in the teacher's answer is not finite")
        out["topk_logp"] = torch.zeros(N, T, top_k).masked_scatter_(mask[..., None], values)
        out["topk_ids"] = torch.zeros(N, T, top_k, dtype=torch.long).masked_scatter_(mask[..., None], top_ids)
    return {key: value.to(response_ids.device) for key, value in out.items()}


def scores_from_prompt_logprobs(
    prompt_logprobs: list, response_ids: Tensor, response_mask: Tensor, top_k: int, exclude: set[int],
) -> dict[str, Tensor]:
    """What `CausalLMScorer` returns, from vLLM prompt log-probs of each row's attended tokens.

    prompt_logprobs[i]: row i's prompt log-probs, one per token (prompt then response), in any form
    `flat_entries` reads (at position j the top K + |exclude| and the token itself).
    response_ids, response_mask: [N, T], each row's response first and padding after it. Returns
    {"logp": [N, T]} and, for top_k > 0, {"topk_logp", "topk_ids": [N, T, top_k]}, sorted by
    decreasing log-prob, never a token of `exclude`; 0 off the mask. A missing row or position,
    a narrower top-K, an absent token or a bad log-prob: `MalformedTeacherAnswer`.
    """
    lengths = response_mask.sum(1).tolist()
    if len(prompt_logprobs) != len(lengths):
        raise MalformedTeacherAnswer(f"the teacher answered for {len(prompt_logprobs)} rows of {len(lengths)}")
    ids, logps, widths, token_first = [], [], [], True
    for positions, length in zip(prompt_logprobs, lengths):
        token_first &= hasattr(positions, "start_indices")
        row_ids, row_logps, row_widths = flat_entries(positions, length)
        ids += row_ids
        logps += row_logps
        widths += row_widths
    return scores_from_entries(ids, logps, widths, response_ids, response_mask, top_k, exclude, token_first)


def parse_json(data: bytes):
    """A server's JSON answer (orjson: prompt log-probs are ~60 bytes per (position, token));
    malformed or cut-short JSON is a `MalformedTeacherAnswer`."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise MalformedTeacherAnswer(f"the answer is not JSON ({error})") from None


def generated_tokens(answer) -> list[int]:
    """The token ids of a completions answer's one choice, checked."""
    try:
        tokens = answer["choices"][0]["token_ids"]
    except (KeyError, IndexError, TypeError) as error:
        raise MalformedTeacherAnswer(f"the answer has no generated token ids ({error!r})") from None
    if not isinstance(tokens, list) or not all(type(token) is int for token in tokens):
        raise MalformedTeacherAnswer("the answer's generated token ids are not a list of integers")
    return tokens


def choices_prompt_logprobs(answer, prompt_lengths: list[int]) -> list:
    """Each prompt's `prompt_logprobs` from a completions answer of one choice per prompt (by
    "index"), checked: one choice per prompt, one entry per prompt token."""
    try:
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        positions = [choice["prompt_logprobs"] for choice in choices]
    except (KeyError, TypeError) as error:
        raise MalformedTeacherAnswer(f"the answer has no choices with prompt log-probs ({error!r})") from None
    if [choice["index"] for choice in choices] != list(range(len(prompt_lengths))):
        raise MalformedTeacherAnswer(f"the answer has {len(choices)} choices for {len(prompt_lengths)} prompts")
    for row, (entries, length) in enumerate(zip(positions, prompt_lengths)):
        if not isinstance(entries, list) or len(entries) != length:
            raise MalformedTeacherAnswer(f"choice {row}'s prompt log-probs are not {length} positions")
    return positions


class TeacherEngine:
    """The teacher, wherever it runs: `score` (the `CausalLMScorer` teacher scores of rows),
    `generate` (teacher rollouts, as a `RolloutEngine` without a model), `distribute` and `close`.
    In the trainer: `trainer_teacher.TrainerTeacher`; outside it: `VLLMTeacher`, `ServerTeacher`;
    `factory.build_teacher` makes the one the settings ask for.

    `scores_while_generating`: `score` may run in a thread while the student's engine generates
    (rollout collection then scores each generated part at once); only a server teacher does.
    """

    scores_while_generating = False

    @staticmethod
    def logprobs_per_position(top_k: int, exclude: set[int]) -> int:
        """Prompt log-probs to ask for at each position: the top K once the excluded ids are dropped."""
        return top_k + len(exclude) if top_k else 0

    def score(self, rows: dict[str, Tensor], top_k: int, exclude: set[int]) -> dict[str, Tensor]:
        raise NotImplementedError

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id,
                 generator) -> Generation:
        raise NotImplementedError

    def distribute(self, place) -> None:
        """Lay out the weights the teacher holds in the trainer with `place` (a module → the module
        sharded or moved for the strategy); a teacher outside the trainer holds none."""

    def close(self) -> None:
        """Release what the engine holds (none by default)."""


class VLLMTeacher(TeacherEngine):
    """The teacher as an in-process vLLM engine beside the trainer (started on first use). It does
    not score while the student generates: vLLM keeps the running forward's context in a
    process-wide global (`vllm.forward_context._forward_context`), so two engines of one process
    cannot run forwards in two threads at once."""

    def __init__(self, model_path: str, settings: TeacherServing, max_logprobs: int, dtype: str = "auto"):
        self.model_path, self.settings, self.max_logprobs = model_path, settings, max_logprobs
        self.dtype = settings.dtype if settings.dtype != "auto" else dtype
        self.llm = None

    def engine(self):
        if self.llm is None:
            s = self.settings
            self.llm = start_llm(self.model_path, self.dtype, s.gpu_memory_utilization, s.max_model_len, s.enforce_eager,
                                 max_logprobs=max(self.max_logprobs, 1), enable_prefix_caching=False,
                                 kv_cache_memory_bytes=s.kv_cache_memory_bytes)
        return self.llm

    def score(self, rows: dict[str, Tensor], top_k: int, exclude: set[int]) -> dict[str, Tensor]:
        """Teacher log-probs (and top-K) of `rows`' responses, as `scores_from_prompt_logprobs`."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=self.logprobs_per_position(top_k, exclude),
                                detokenize=False, skip_reading_prefix_cache=True, flat_logprobs=True)
        outputs = self.engine().generate(token_prompts(rows["input_ids"], rows["attention_mask"]), params,
                                         use_tqdm=False)
        return scores_from_prompt_logprobs([output.prompt_logprobs for output in outputs], rows["response_ids"],
                                           rows["response_mask"], top_k, exclude)

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id, generator):
        return sample(self.engine(), prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator)

    def close(self) -> None:
        self.llm = None


class ServerTeacher(TeacherEngine):
    """The teacher on a vLLM OpenAI-compatible server (`lit-opd serve-teacher`, or `vllm serve
    <teacher> --max-logprobs 64`): `/v1/completions` with token-id prompts. Connection errors,
    timeouts, 5xx/429 answers and malformed answers (`MalformedTeacherAnswer`) are retried with
    exponential backoff; what stays so, or a refused request (HTTP 4xx), raises `TeacherUnreachable`."""

    scores_while_generating = True  # its work is the server's; this process only waits on HTTP

    def __init__(self, url: str, model: str, settings: TeacherServing):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/completions"
        self.model, self.settings = settings.served_model or model, settings

    def post(self, body: dict, read=lambda answer: answer):
        """One completions request, its JSON answer passed through `read`; retried on connection
        errors, timeouts, 5xx/429 answers and answers that `read` finds malformed."""
        data = orjson.dumps({"model": self.model, **body})
        s = self.settings
        for attempt in range(s.retries + 1):
            request = urllib.request.Request(self.url, data, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as response:
                    return read(parse_json(response.read()))
            except urllib.error.HTTPError as error:
                if error.code != 429 and error.code < 500:
                    detail = error.read().decode(errors="replace")[:300].replace("\n", " ")
                    raise TeacherUnreachable(f"model.teacher_url: the teacher server {self.url} refused a request "
                                             f"(HTTP {error.code}): {detail}") from None
                failure = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
                failure = str(getattr(error, "reason", error)) or type(error).__name__
            except MalformedTeacherAnswer as error:
                failure = f"a malformed answer: {error}"
            if attempt < s.retries:
                time.sleep(s.backoff_s * 2**attempt)
        raise TeacherUnreachable(f"the teacher server {self.url} gave no usable answer in {s.retries + 1} tries ({failure})")

    def map_requests(self, bodies: list[dict], reads=None) -> list:
        reads = reads or [lambda answer: answer] * len(bodies)
        with ThreadPoolExecutor(max(1, min(self.settings.max_concurrency, len(bodies)))) as pool:
            return list(pool.map(self.post, bodies, reads))

    def score(self, rows: dict[str, Tensor], top_k: int, exclude: set[int]) -> dict[str, Tensor]:
        """Teacher log-probs (and top-K) of `rows`' responses, rows_per_request rows a request, each
        answer checked and turned into scores as it arrives."""
        prompts = attended_tokens(rows["input_ids"], rows["attention_mask"])
        size = self.settings.rows_per_request
        parts = [slice(i, i + size) for i in range(0, len(prompts), size)]

        def reader(part: slice):
            def read(answer) -> dict[str, Tensor]:
                positions = choices_prompt_logprobs(answer, [len(prompt) for prompt in prompts[part]])
                return scores_from_prompt_logprobs(positions, rows["response_ids"][part], rows["response_mask"][part],
                                                   top_k, exclude)
            return read

        scores = self.map_requests([{"prompt": prompts[part], "max_tokens": 1,
                                     "prompt_logprobs": self.logprobs_per_position(top_k, exclude)} for part in parts],
                                   [reader(part) for part in parts])
        return {key: torch.cat([part[key] for part in scores]) for key in scores[0]}

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id, generator):
        """One teacher response per row, each its own request with a seed drawn from `generator`."""
        seeds = row_seeds(prompt_ids.shape[0], generator)
        prompts = attended_tokens(prompt_ids, prompt_mask)
        bodies = [{"prompt": [prompt], "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                   "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": seed, "stop_token_ids": list(eos_token_ids),
                   "return_token_ids": True} for prompt, seed in zip(prompts, seeds)]
        ids, mask = right_pad(self.map_requests(bodies, [generated_tokens] * len(bodies)), pad_token_id)
        return Generation(ids.to(prompt_ids.device), mask.to(prompt_ids.device))

