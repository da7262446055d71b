"""Teachers outside the trainer, without vLLM: turning vLLM prompt log-probs into the trainer's
teacher scores (hand values) and the settings that refuse to combine. vLLM's own engine and a real
`vllm serve` are tested in tests/test_vllm.py; an unreachable server's checkpoint-then-stop in
tests/test_resume.py."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from lit_opd.modules import GKD, SampledTokenOPD
from lit_opd.rollout.teacher_engines import (MalformedTeacherAnswer, ServerTeacher, TeacherServing, TeacherUnreachable,
                                             scores_from_prompt_logprobs)


def test_scores_from_prompt_logprobs_hand_values():
    """Row 0: prompt [7], response [5, 3] (the last 2 of its 3 positions); row 1: prompt [7, 8],
    response [4] and a padded column. Top-2 outside exclude {9}, by decreasing log-prob."""
    positions = [
        [None, {5: -0.5, 9: -0.1, 2: -2.0}, {3: -1.5, 1: -0.2, 9: -0.3, 6: -0.9}],
        [None, {8: -0.7}, {4: -3.0, 9: -0.05, 2: -0.4, 6: -1.0}],
    ]
    response_ids = torch.tensor([[5, 3], [4, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    scores = scores_from_prompt_logprobs(positions, response_ids, mask, top_k=2, exclude={9})
    torch.testing.assert_close(scores["logp"], torch.tensor([[-0.5, -1.5], [-3.0, 0.0]]))
    assert scores["topk_ids"].tolist() == [[[5, 2], [1, 6]], [[2, 6], [0, 0]]]
    torch.testing.assert_close(scores["topk_logp"], torch.tensor([[[-0.5, -2.0], [-0.2, -0.9]], [[-0.4, -1.0], [0.0, 0.0]]]))
    assert set(scores_from_prompt_logprobs(positions, response_ids, mask, top_k=0, exclude=set())) == {"logp"}


def test_gkd_refuses_a_teacher_outside_the_trainer(tiny_checkpoints):
    for where in ({"teacher_engine": "vllm"}, {"teacher_url": "http://localhost:8000"}):
        with pytest.raises(ValueError, match="GKD's full-vocabulary divergence needs the teacher's logits"):
            GKD(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"], **where)


def test_a_teacher_url_and_a_colocated_teacher_engine_are_one_too_many(tiny_checkpoints):
    with pytest.raises(ValueError, match="model.teacher_url and model.teacher_engine: vllm both place the teacher"):
        SampledTokenOPD(student=tiny_checkpoints["student"], teacher=tiny_checkpoints["teacher"],
                        teacher_engine="vllm", teacher_url="http://localhost:8000")


@pytest.mark.parametrize("field, value", [("rows_per_request", 0), ("max_concurrency", 0), ("timeout_s", 0.0),
                                          ("gpu_memory_utilization", 0.0), ("retries", -1), ("backoff_s", -1.0),
                                          ("max_model_len", 0), ("kv_cache_memory_bytes", 0)])
def test_teacher_serving_settings_out_of_range_name_their_field(field, value):
    with pytest.raises(ValueError, match=rf"model.(init_args.)?teacher_serving.{field} must be"):
        TeacherServing(**{field: value})


def scores_by_sorting(prompt_logprobs, response_ids, response_mask, top_k, exclude):
    """The conversion as it was (per position: a dict lookup, a Python sort, small tensors): the
    reference the one-pass conversion must equal."""
    N, T = response_ids.shape
    logp = torch.zeros(N, T)
    topk_logp, topk_ids = torch.zeros(N, T, max(top_k, 1)), torch.zeros(N, T, max(top_k, 1), dtype=torch.long)
    for i, (positions, length) in enumerate(zip(prompt_logprobs, response_mask.sum(1).tolist())):
        for t, entry in enumerate(positions[len(positions) - length:] if length else []):
            logp[i, t] = entry[int(response_ids[i, t])]
            if top_k:
                best = sorted(((lp, token) for token, lp in entry.items() if token not in exclude), reverse=True)[:top_k]
                topk_logp[i, t] = torch.tensor([lp for lp, _ in best])
                topk_ids[i, t] = torch.tensor([token for _, token in best])
    return {"logp": logp} | ({"topk_logp": topk_logp, "topk_ids": topk_ids} if top_k else {})


def random_prompt_logprobs(seed: int, rows: int = 5, T: int = 7, vocab: int = 50, width: int = 6):
    """Rows of random prompts and right-padded responses with vLLM-shaped prompt log-probs: per
    position the `width` best of a random distribution and the token itself (deduplicated)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (rows,), generator=g).tolist()
    response_ids = torch.randint(0, vocab, (rows, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    positions, flat = [], []
    for i, length in enumerate(lengths):
        prompt = torch.randint(0, vocab, (3,), generator=g).tolist()
        tokens = prompt + response_ids[i, :length].tolist()
        row, ns = [None], SimpleNamespace(start_indices=[0], end_indices=[0], token_ids=[], logprobs=[])
        for token in tokens[1:]:
            logp = torch.log_softmax(torch.randn(vocab, generator=g) * 3, 0)
            best = logp.topk(width).indices.tolist()
            row.append({token: logp[token].item()} | {b: logp[b].item() for b in best})
            ns.start_indices.append(len(ns.logprobs))
            ns.token_ids += [token, *best]
            ns.logprobs += [logp[token].item(), *logp[best].tolist()]
            ns.end_indices.append(len(ns.logprobs))
        positions.append(row)
        flat.append(ns)
    return positions, flat, response_ids, mask


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_k, exclude", [(4, {3, 7}), (6, set()), (0, set())])
def test_one_pass_conversion_equals_the_sorting_one(seed, top_k, exclude):
    """Dict positions (the server's, JSON-parsed or not) and vLLM's flat form (the token first)
    give the old per-position conversion's scores exactly."""
    positions, flat, response_ids, mask = random_prompt_logprobs(seed)
    ours = scores_by_sorting(positions, response_ids, mask, top_k, exclude)
    as_json = json.loads(json.dumps([[None if e is None else {str(t): {"logprob": lp, "rank": 1} for t, lp in e.items()}
                                      for e in row] for row in positions]))
    for form in (positions, flat, as_json):
        theirs = scores_from_prompt_logprobs(form, response_ids, mask, top_k, exclude)
        assert theirs.keys() == ours.keys()
        for key in ours:
            assert torch.equal(theirs[key], ours[key]), key


def test_equal_log_probs_are_ordered_as_the_sorting_conversion_did():
    """Ties (a random-weight teacher has them) go to the larger id first, across the K cut too."""
    positions = [[None, {4: -1.0, 9: -0.5, 2: -0.5, 7: -0.5, 1: -2.0}]]
    ids, mask = torch.tensor([[4]]), torch.tensor([[True]])
    for top_k in (2, 3, 4):
        theirs = scores_from_prompt_logprobs(positions, ids, mask, top_k, {7})
        assert torch.equal(theirs["topk_ids"], scores_by_sorting(positions, ids, mask, top_k, {7})["topk_ids"])


def good_rows():
    """Two rows: prompt [7] + response [5, 3], and prompt [8] + response [4] (then padding)."""
    return {"input_ids": torch.tensor([[7, 5, 3], [8, 4, 0]]),
            "attention_mask": torch.tensor([[True, True, True], [True, True, False]]),
            "response_ids": torch.tensor([[5, 3], [4, 0]]), "response_mask": torch.tensor([[True, True], [True, False]])}


def entry(token, width=3):
    """A server's prompt log-probs at one position: the token and `width` others, distinct values."""
    ids = [token] + [t for t in range(20, 20 + width)]
    return {str(t): {"logprob": -0.1 * (k + 1), "rank": k + 1, "decoded_token": "x"} for k, t in enumerate(ids)}


def good_choices(body):
    return [{"index": i, "text": "", "prompt_logprobs": [None] + [entry(t) for t in prompt[1:]]}
            for i, prompt in enumerate(body["prompt"])]


def mend(how):
    """A completions answer to `body`, made malformed by `how`."""
    def answer(body):
        choices = good_choices(body)
        how(choices)
        return 200, json.dumps({"choices": choices}).encode()
    return answer


BAD_ANSWERS = {
    "a row missing": lambda body: (200, json.dumps({"choices": good_choices(body)[:-1]}).encode()),
    "no choices": lambda body: (200, b'{"id": "x"}'),
    "prompt log-probs null": mend(lambda c: c[0].update(prompt_logprobs=None)),
    "a position missing": mend(lambda c: c[0]["prompt_logprobs"].pop()),
    "a position null": mend(lambda c: c[0]["prompt_logprobs"].__setitem__(2, None)),
    "top-K too narrow": mend(lambda c: c[0]["prompt_logprobs"].__setitem__(1, entry(5, width=1))),
    "the token missing": mend(lambda c: c[1]["prompt_logprobs"][1].pop("4")),
    "a token id not a number": mend(lambda c: c[1]["prompt_logprobs"][1].update({"x": {"logprob": -1.0}})),
    "a log-prob null": mend(lambda c: c[0]["prompt_logprobs"][1]["5"].update(logprob=None)),
    "a log-prob missing": mend(lambda c: c[0]["prompt_logprobs"][2]["20"].pop("logprob")),
    "a log-prob not finite": lambda body: (200, json.dumps({"choices": good_choices(body)}).replace("-0.1,", "-Infinity,", 1).encode()),
    "malformed JSON": lambda body: (200, b'{"choices": [{"index": 0, "prompt_logprobs": [null, {"5": '),
    "truncated": lambda body: (200, json.dumps({"choices": good_choices(body)}).encode(), 10**6),
    "HTTP 500": lambda body: (500, b"internal error"),
}


@pytest.fixture
def fake_server():
    """A completions server on 127.0.0.1 that answers each request with the next of `answers`
    (the last one repeats) and counts the requests."""
    state = SimpleNamespace(answers=[], requests=0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests += 1
            status, data, *length = state.answers[min(state.requests, len(state.answers)) - 1](body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(length[0] if length else len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def server_teacher(url, **settings):
    return ServerTeacher(url, "teacher", TeacherServing(retries=2, backoff_s=0.0, timeout_s=5.0, **settings))


def test_a_server_answer_becomes_scores_and_a_bad_one_is_retried(fake_server):
    fake_server.answers = [BAD_ANSWERS["a row missing"], lambda body: (200, json.dumps({"choices": good_choices(body)}).encode())]
    scores = server_teacher(fake_server.url).score(good_rows(), 2, {20})
    assert fake_server.requests == 2
    torch.testing.assert_close(scores["logp"], torch.tensor([[-0.1, -0.1], [-0.1, 0.0]]))
    assert scores["topk_ids"].tolist() == [[[5, 21], [3, 21]], [[4, 21], [0, 0]]]


@pytest.mark.parametrize("what", sorted(BAD_ANSWERS))
def test_a_malformed_answer_is_retried_then_the_teacher_is_unreachable(what, fake_server):
    """Never a silent zero or a traceback: every try fails the same way → `TeacherUnreachable`
    (the run's checkpoint-then-stop) with a one-line reason, after every retry."""
    fake_server.answers = [BAD_ANSWERS[what]]
    with pytest.raises(TeacherUnreachable, match="gave no usable answer in 3 tries") as error:
        server_teacher(fake_server.url, rows_per_request=2).score(good_rows(), 2, {20})
    assert "\n" not in str(error.value)
    assert fake_server.requests == 3


def test_a_refused_request_stops_at_once(fake_server):
    fake_server.answers = [lambda body: (400, b'{"message": "prompt_logprobs 40 > max_logprobs 16"}')]
    with pytest.raises(TeacherUnreachable, match=r"refused a request \(HTTP 400\).*max_logprobs 16") as error:
        server_teacher(fake_server.url).score(good_rows(), 2, set())
    assert "\n" not in str(error.value) and fake_server.requests == 1


@pytest.mark.parametrize("bad", ["rows", "position", "token", "width", "nan"])
def test_malformed_prompt_logprobs_of_a_colocated_engine(bad):
    """The same checks on vLLM's own (flat) answer: a missing row or position, a token not first,
    a narrower top-K, a non-finite log-prob."""
    _, flat, response_ids, mask = random_prompt_logprobs(1, rows=3, T=4)
    row = max(range(3), key=lambda i: int(mask[i].sum()))
    f = flat[row]
    if bad == "rows":
        flat = flat[:-1]
    elif bad == "position":
        flat[row] = SimpleNamespace(start_indices=f.start_indices[-1:], end_indices=f.end_indices[-1:], token_ids=f.token_ids,
                                    logprobs=f.logprobs) if int(mask[row].sum()) > 1 else None
    elif bad == "token":
        f.token_ids[f.start_indices[-1]] += 1
    elif bad == "width":
        f.token_ids[f.start_indices[-1] + 1 : f.end_indices[-1]] = [3] * (f.end_indices[-1] - f.start_indices[-1] - 1)
    elif bad == "nan":
        f.logprobs[f.start_indices[-1]] = math.nan
    with pytest.raises(MalformedTeacherAnswer):
        scores_from_prompt_logprobs(flat, response_ids, mask, 4, {3})


def test_the_teacher_server_command_has_what_scoring_needs():
    """`start_teacher_server`'s `vllm serve`: K + masked ids prompt log-probs, the teacher's dtype, the port."""
    from lit_opd.rollout.teacher_server import free_port, serve_command

    port = free_port()
    command = serve_command("path/teacher", 32 + 3, "bfloat16", port, max_model_len=4096, extra=["--seed", "1"])
    flags = dict(zip(command[3::2], command[4::2]))
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--max-logprobs"] == "35" and flags["--dtype"] == "bfloat16" and flags["--port"] == str(port)
    assert flags["--max-model-len"] == "4096" and command[-2:] == ["--seed", "1"]
    assert "--gpu-memory-utilization" not in command


def test_serve_teacher_reads_what_to_serve_from_the_run_config(monkeypatch, capsys):
    """`lit-opd serve-teacher --config topk_lsm_block64`: the config's teacher in its dtype
    (bfloat16 under bf16-mixed), top-K 32 plus the masked special tokens."""
    from lit_opd.cli import main
    from lit_opd.rollout import teacher_server

    started = {}

    class Started:
        url, process = "http://127.0.0.1:1", SimpleNamespace(wait=lambda: None)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def start(model, max_logprobs, dtype, **settings):
        started.update(model=model, max_logprobs=max_logprobs, dtype=dtype, extra=settings["extra"])
        return Started()

    monkeypatch.setattr(teacher_server, "start_teacher_server", start)
    main(["serve-teacher", "--config", "topk_lsm_block64", "--masked-tokens", "3", "--", "--seed", "1"])
    assert started == {"model": "Qwen/Qwen3-4B", "max_logprobs": 35, "dtype": "bfloat16", "extra": ["--seed", "1"]}
    assert "--model.init_args.teacher_url http://127.0.0.1:1" in capsys.readouterr().out
    assert teacher_server.run_settings(["sg_opd"])["top_k"] == 0


def test_the_default_retry_budget_ends_inside_the_default_collective_timeout():
    """6 tries × 240 s + 2·(1 + 2 + 4 + 8 + 16) s of backoff = 1502 s < 1800 s (Lightning's default)."""
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    assert TeacherServing().give_up_after_s() == 6 * 240 + 2 * 31 == 1502
    assert TeacherServing().give_up_after_s() < default_pg_timeout.total_seconds() == 1800
