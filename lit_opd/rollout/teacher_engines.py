"""Teachers outside the trainer's memory: a colocated vLLM engine (`teacher_engine: vllm`) or a
vLLM OpenAI-compatible server (`teacher_url`). Both score rollouts from vLLM's `prompt_logprobs`
(the log-prob of every response token and the top-K support of every response position) and
sample teacher rollouts (phased teacher sampling); the full-vocabulary loss (GKD) needs the
teacher's logits and so a teacher in the trainer.

Scoring asks for K + |exclude| prompt log-probs per position (`max_logprobs` must allow it) and
never reads vLLM's prefix cache: vLLM skips it for requests with `prompt_logprobs`
(`skip_reading_prefix_cache`), since cached positions get no prompt log-probs and an open vLLM
bug makes them depend on request order; the colocated engine also turns prefix caching off.
"""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_opd.rollout.engine import Generation, SamplingConfig, right_pad
from lit_opd.rollout.vllm_engine import attended_tokens, row_seeds, sample, start_llm, token_prompts


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
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    served_model: str | None = None
    rows_per_request: int = 4
    max_concurrency: int = 16
    timeout_s: float = 600.0
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


class TeacherUnreachable(RuntimeError):
    """The teacher server did not answer within its retries."""


def scores_from_prompt_logprobs(
    prompt_logprobs: list[list[dict[int, float] | None]], response_ids: Tensor, response_mask: Tensor, top_k: int,
    exclude: set[int],
) -> dict[str, Tensor]:
    """What `CausalLMScorer` returns, from vLLM prompt log-probs of each row's attended tokens.

    prompt_logprobs[i][j]: {token id: log-prob} at position j of row i's tokens (prompt then
    response; the top K + |exclude| and the token itself). response_ids, response_mask: [N, T].
    Returns {"logp": [N, T]} and, for top_k > 0, {"topk_logp", "topk_ids": [N, T, top_k]}, sorted
    by decreasing log-prob, never a token of `exclude`; 0 off the mask.
    """
    N, T = response_ids.shape
    logp = torch.zeros(N, T)
    topk_logp, topk_ids = torch.zeros(N, T, max(top_k, 1)), torch.zeros(N, T, max(top_k, 1), dtype=torch.long)
    lengths = response_mask.sum(1).tolist()
    for i, (positions, length) in enumerate(zip(prompt_logprobs, lengths)):
        for t, entry in enumerate(positions[len(positions) - length:] if length else []):
            logp[i, t] = entry[int(response_ids[i, t])]
            if top_k:
                best = sorted(((lp, token) for token, lp in entry.items() if token not in exclude), reverse=True)[:top_k]
                topk_logp[i, t] = torch.tensor([lp for lp, _ in best])
                topk_ids[i, t] = torch.tensor([token for _, token in best])
    out = {"logp": logp}
    if top_k:
        out |= {"topk_logp": topk_logp, "topk_ids": topk_ids}
    return {key: value.to(response_ids.device) for key, value in out.items()}


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
                                detokenize=False, skip_reading_prefix_cache=True)
        outputs = self.engine().generate(token_prompts(rows["input_ids"], rows["attention_mask"]), params,
                                         use_tqdm=False)
        positions = [[{token: lp.logprob for token, lp in entry.items()} if entry else None
                      for entry in output.prompt_logprobs] for output in outputs]
        return scores_from_prompt_logprobs(positions, rows["response_ids"], rows["response_mask"], top_k, exclude)

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id, generator):
        return sample(self.engine(), prompt_ids, prompt_mask, sampling, eos_token_ids, pad_token_id, generator)

    def close(self) -> None:
        self.llm = None


class ServerTeacher(TeacherEngine):
    """The teacher on a vLLM OpenAI-compatible server (`vllm serve <teacher> --max-logprobs 64`):
    `/v1/completions` with token-id prompts, retried with exponential backoff; a server that stays
    unreachable raises `TeacherUnreachable`, one that refuses a request a ValueError with its reason."""

    scores_while_generating = True  # its work is the server's; this process only waits on HTTP

    def __init__(self, url: str, model: str, settings: TeacherServing):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/completions"
        self.model, self.settings = settings.served_model or model, settings

    def post(self, body: dict) -> dict:
        """One completions request; retried on connection errors, timeouts and 5xx/429 answers."""
        data = json.dumps({"model": self.model, **body}).encode()
        s = self.settings
        for attempt in range(s.retries + 1):
            request = urllib.request.Request(self.url, data, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                if error.code != 429 and error.code < 500:
                    detail = error.read().decode(errors="replace")[:300]
                    raise ValueError(f"model.teacher_url: the teacher server {self.url} refused a request "
                                     f"(HTTP {error.code}): {detail}") from None
                failure = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                failure = str(getattr(error, "reason", error))
            if attempt < s.retries:
                time.sleep(s.backoff_s * 2**attempt)
        raise TeacherUnreachable(f"the teacher server {self.url} did not answer in {s.retries + 1} tries ({failure})")

    def map_requests(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max(1, min(self.settings.max_concurrency, len(bodies)))) as pool:
            return list(pool.map(self.post, bodies))

    def score(self, rows: dict[str, Tensor], top_k: int, exclude: set[int]) -> dict[str, Tensor]:
        """Teacher log-probs (and top-K) of `rows`' responses, rows_per_request rows a request."""
        prompts = attended_tokens(rows["input_ids"], rows["attention_mask"])
        size = self.settings.rows_per_request
        answers = self.map_requests([
            {"prompt": prompts[i : i + size], "max_tokens": 1,
             "prompt_logprobs": self.logprobs_per_position(top_k, exclude)}
            for i in range(0, len(prompts), size)
        ])
        positions = []
        for answer in answers:
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                positions.append([{int(token): lp["logprob"] for token, lp in entry.items()} if entry else None
                                  for entry in choice["prompt_logprobs"]])
        return scores_from_prompt_logprobs(positions, rows["response_ids"], rows["response_mask"], top_k, exclude)

    def generate(self, prompt_ids, prompt_mask, sampling: SamplingConfig, eos_token_ids, pad_token_id, generator):
        """One teacher response per row, each its own request with a seed drawn from `generator`."""
        seeds = row_seeds(prompt_ids.shape[0], generator)
        prompts = attended_tokens(prompt_ids, prompt_mask)
        answers = self.map_requests([
            {"prompt": [prompt], "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
             "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": seed, "stop_token_ids": list(eos_token_ids),
             "return_token_ids": True}
            for prompt, seed in zip(prompts, seeds)
        ])
        ids, mask = right_pad([answer["choices"][0]["token_ids"] for answer in answers], pad_token_id)
        return Generation(ids.to(prompt_ids.device), mask.to(prompt_ids.device))

