"""The vllm rollout engine for real (vLLM's CPU backend, in-process): its sampled-token log-probs
against the trainer's scorer, weight sync after an optimiser step (tied and untied embeddings),
seeded repeats, and `lit-opd fit` end to end. Without vLLM these skip, and asking for the engine
is a one-line error naming the extra."""

import importlib.util

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lit_opd.logprobs import CausalLMScorer
from lit_opd.rollout.engine import HFGenerateEngine, SamplingConfig
from lit_opd.rollout.factory import build_engine

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install \"lit-opd[vllm]\")")


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_without_vllm_the_engine_is_a_one_line_error_naming_the_extra():
    from lit_opd.rollout.factory import build_teacher
    from lit_opd.rollout.scoring import ScoringSettings
    from lit_opd.rollout.settings import RolloutConfig
    from lit_opd.rollout.teacher_engines import TeacherServing

    for build in (lambda: build_engine("vllm", "some/student"),
                  lambda: build_teacher("some/teacher", "vllm", None, TeacherServing(), dtype="bfloat16",
                                        scoring=ScoringSettings(top_k=32), rollout=RolloutConfig(), tokenizer=None,
                                        chunk_size=1024)):
        with pytest.raises(ImportError, match=r'pip install "lit-opd\[vllm\]"') as error:
            build()
        assert "\n" not in str(error.value)


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_without_vllm_a_paper_config_stops_in_one_line_before_anything_loads(tiny_checkpoints, tmp_path, monkeypatch,
                                                                               capsys):
    """defaults.yaml's rollout.engine is vllm: `lit-opd fit --config opd_block64` without vLLM exits
    in the module's __init__ (the tokenizer never loads) with one line naming both ways out."""
    from lit_opd.cli import main
    from lit_opd.modules import assembly

    monkeypatch.setattr(assembly, "load_tokenizer", lambda *args: pytest.fail("the tokenizer loaded before the check"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1=?", "answer": "2"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "opd_block64", f"--model.init_args.student={tiny_checkpoints['student']}",
              f"--model.init_args.teacher={tiny_checkpoints['teacher']}", f"--data.tokenizer={tiny_checkpoints['student']}",
              f"--data.train_data={data}", "--trainer.accelerator=cpu"])
    message = str(stop.value.code)
    assert message.startswith("lit-opd: error: model.rollout.engine is vllm") and "\n" not in message
    assert 'pip install "lit-opd[vllm]"' in message and "--model.init_args.rollout.engine static" in message


def tiny_checkpoint(path, tokenizer, tied: bool, seed: int = 0) -> str:
    """A tiny float32 Qwen3 that vLLM's CPU attention accepts (head_dim 32)."""
    config = Qwen3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, char_tokenizer):
    root = tmp_path_factory.mktemp("vllm")
    return {tied: tiny_checkpoint(root / f"tied{tied}", char_tokenizer, tied) for tied in (False, True)}


def prompts(tokenizer, texts):
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    P = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (P - len(r)) + [True] * len(r) for r in rows])
    return ids, mask


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vllm_logprobs_and_weight_sync_match_the_trainer(tied, checkpoints, char_tokenizer):
    from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    model = Qwen3ForCausalLM.from_pretrained(checkpoints[tied], dtype=torch.float32)
    engine = VLLMEngine(checkpoints[tied], VLLMSettings(gpu_memory_utilization=0.05, max_model_len=128))
    ids, mask = prompts(char_tokenizer, ["12+7=", "what is 3*4?", "x"])
    eos, pad = [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id

    sampled = engine.generate(model, ids, mask, SamplingConfig(24, temperature=1.0), eos, pad, torch.Generator().manual_seed(0))
    scorer = CausalLMScorer(model)
    with torch.no_grad():
        trainer_logp = scorer(torch.cat([ids, sampled.response_ids], 1), torch.cat([mask, sampled.response_mask], 1),
                              sampled.response_ids.shape[1])["logp"]
    m = sampled.response_mask
    torch.testing.assert_close(sampled.logp[m], trainer_logp[m], atol=1e-4, rtol=0)
    again = engine.generate(model, ids, mask, SamplingConfig(24, temperature=1.0), eos, pad, torch.Generator().manual_seed(0))
    assert torch.equal(again.response_ids, sampled.response_ids), "a seeded generator must repeat the rollouts"

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    loss = -scorer(torch.cat([ids, sampled.response_ids], 1), torch.cat([mask, sampled.response_mask], 1),
                   sampled.response_ids.shape[1])["logp"][m].mean()
    loss.backward()
    optimizer.step()
    greedy = SamplingConfig(24, temperature=0)
    before = engine.synced
    ours = HFGenerateEngine().generate(model.eval(), ids, mask, greedy, eos, pad, torch.Generator())
    theirs = engine.generate(model, ids, mask, greedy, eos, pad, torch.Generator())
    assert engine.synced != before, "the changed weights were not pushed"
    engine.close()
    assert torch.equal(theirs.response_ids, ours.response_ids)
    assert torch.equal(theirs.response_mask, ours.response_mask)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_vllm_greedy_rollouts_of_a_lora_student_equal_peft(tied, checkpoints, char_tokenizer):
    """A LoRA student's merged weights pushed to vLLM: its greedy rollouts equal PEFT's greedy
    continuation (HF generate through the LoRA layers), before and after the adapters move."""
    from lit_opd.lora import LoraSettings, inject_lora, lora_layers
    from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    model = inject_lora(Qwen3ForCausalLM.from_pretrained(checkpoints[tied], dtype=torch.float32),
                        LoraSettings(r=4, lora_alpha=8), torch.float32).eval()
    engine = VLLMEngine(checkpoints[tied], VLLMSettings(gpu_memory_utilization=0.05, max_model_len=128))
    ids, mask = prompts(char_tokenizer, ["12+7=", "what is 3*4?", "x"])
    eos, pad = [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id
    greedy, g = SamplingConfig(24, temperature=0), torch.Generator().manual_seed(0)
    changed = []
    for step in range(2):
        with torch.no_grad():  # an in-place step on every adapter, as an optimiser's (lora_B starts at 0)
            for layer in lora_layers(model).values():
                b = layer.lora_B["default"].weight
                b.add_(0.05 * torch.randn(b.shape, generator=g))
        before = engine.synced
        theirs = engine.generate(model, ids, mask, greedy, eos, pad, torch.Generator())
        assert engine.synced != before, "the changed adapters were not pushed"
        ours = HFGenerateEngine().generate(model, ids, mask, greedy, eos, pad, torch.Generator())
        assert torch.equal(theirs.response_ids, ours.response_ids), f"step {step}"
        assert torch.equal(theirs.response_mask, ours.response_mask)
        changed.append(ours.response_ids)
    engine.close()
    plain = Qwen3ForCausalLM.from_pretrained(checkpoints[tied], dtype=torch.float32).eval()
    base = HFGenerateEngine().generate(plain, ids, mask, greedy, eos, pad, torch.Generator())
    assert not torch.equal(changed[-1], base.response_ids), "the adapters changed no rollout: the test shows nothing"


@needs_vllm
@pytest.mark.slow
def test_lora_fit_with_the_vllm_engine(checkpoints, tmp_path, monkeypatch, write_prompts):
    """`lit-opd fit --config opd_lora` with rollout.engine vllm: the adapters move (the merged student
    differs from its checkpoint), and vLLM's log-probs agree with the trainer's on every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers_cli import fit_and_check

    monkeypatch.chdir(tmp_path)
    models = {"student": checkpoints[True], "teacher": checkpoints[False]}
    fit_and_check("opd_lora", models, str(write_prompts()), tmp_path / "tb", "--model.init_args.rollout.engine=vllm",
                  "--model.init_args.lora.r=4", "--model.init_args.optim.lr=1e-2",
                  "--model.init_args.rollout.vllm.gpu_memory_utilization=0.05",
                  "--model.init_args.rollout.vllm.max_model_len=256", tags={"rollout/logp_mismatch"})
    events = EventAccumulator(str(tmp_path / "tb" / "run" / "version_0"))
    events.Reload()
    assert max(event.value for event in events.Scalars("rollout/logp_mismatch")) < 1e-4


@needs_vllm
@pytest.mark.slow
def test_fit_with_the_vllm_engine(checkpoints, tmp_path, monkeypatch, write_prompts):
    """`lit-opd fit --config opd` with rollout.engine vllm: the student moves, and vLLM's log-probs
    agree with the trainer's on every step's rollouts (rollout/logp_mismatch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers_cli import fit_and_check

    monkeypatch.chdir(tmp_path)
    data = write_prompts()
    models = {"student": checkpoints[True], "teacher": checkpoints[False]}
    fit_and_check("opd", models, str(data), tmp_path / "tb", "--model.init_args.rollout.engine=vllm",
                  "--model.init_args.rollout.vllm.gpu_memory_utilization=0.05",
                  "--model.init_args.rollout.vllm.max_model_len=256", tags={"rollout/logp_mismatch"})
    events = EventAccumulator(str(tmp_path / "tb" / "run" / "version_0"))
    events.Reload()
    mismatch = [event.value for event in events.Scalars("rollout/logp_mismatch")]
    assert len(mismatch) == 2 and max(mismatch) < 1e-4


def rollout_rows(model, tokenizer, texts, new_tokens: int = 12) -> dict:
    """Rows of the trainer's layout: prompts of `texts` and responses sampled from `model`."""
    ids, mask = prompts(tokenizer, texts)
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    sampled = HFGenerateEngine().generate(model.eval(), ids, mask, SamplingConfig(new_tokens, temperature=1.0), eos,
                                          pad, torch.Generator().manual_seed(0))
    return {"input_ids": torch.cat([ids, sampled.response_ids], 1),
            "attention_mask": torch.cat([mask, sampled.response_mask], 1),
            "response_ids": sampled.response_ids, "response_mask": sampled.response_mask}


def assert_teacher_scores_equal(theirs: dict, ours: dict, mask) -> None:
    """Log-probs within 1e-4; top-K log-probs (sorted) within 1e-4 and the same id sets."""
    torch.testing.assert_close(theirs["logp"][mask], ours["logp"][mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(theirs["topk_logp"][mask], ours["topk_logp"][mask], atol=1e-4, rtol=0)
    assert [set(row) for row in theirs["topk_ids"][mask].tolist()] == [set(row) for row in ours["topk_ids"][mask].tolist()]


@pytest.fixture(scope="module")
def teacher_server(checkpoints):
    """A real `vllm serve` of the untied tiny model on a free localhost port, with --max-logprobs 16."""
    from lit_opd.rollout.teacher_server import start_teacher_server

    try:
        server = start_teacher_server(checkpoints[False], 16, "float32", kv_cache_memory_bytes=2**27, max_model_len=256,
                                      enforce_eager=True, startup_timeout_s=300)
    except RuntimeError as error:
        pytest.fail(str(error))
    with server:
        yield server.url


@needs_vllm
@pytest.mark.slow
def test_colocated_teacher_engine_scores_and_samples_like_the_trainer(checkpoints, char_tokenizer):
    """teacher_engine: vllm: sampled-token log-probs and the top-K outside the excluded ids equal
    the trainer's scorer; its greedy teacher rollouts equal HF's."""
    from lit_opd.rollout.teacher_engines import TeacherServing, VLLMTeacher

    model = Qwen3ForCausalLM.from_pretrained(checkpoints[False], dtype=torch.float32)
    rows = rollout_rows(model, char_tokenizer, ["12+7=", "what is 3*4?", "x"])
    exclude = {char_tokenizer.convert_tokens_to_ids("<|im_start|>"), char_tokenizer.pad_token_id}
    with torch.no_grad():
        ours = CausalLMScorer(model)(rows["input_ids"], rows["attention_mask"], rows["response_ids"].shape[1], top_k=8,
                                     exclude=torch.tensor(sorted(exclude)))
    teacher = VLLMTeacher(checkpoints[False], TeacherServing(kv_cache_memory_bytes=2**27, max_model_len=128), 8 + 2,
                          "float32")
    try:
        assert_teacher_scores_equal(teacher.score(rows, 8, exclude), ours, rows["response_mask"])
        ids, mask = prompts(char_tokenizer, ["12+7=", "x"])
        greedy, eos, pad = SamplingConfig(16, temperature=0), [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id
        theirs = teacher.generate(ids, mask, greedy, eos, pad, torch.Generator())
        hf = HFGenerateEngine().generate(model, ids, mask, greedy, eos, pad, torch.Generator())
        assert torch.equal(theirs.response_ids, hf.response_ids) and torch.equal(theirs.response_mask, hf.response_mask)
    finally:
        teacher.close()


@needs_vllm
@pytest.mark.slow
def test_a_vllm_server_teacher_scores_and_samples_like_the_trainer(teacher_server, checkpoints, char_tokenizer):
    """teacher_url: a real `vllm serve` gives the trainer's teacher scores and greedy rollouts; a request
    over its --max-logprobs is a one-line error with the server's reason."""
    from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherServing, TeacherUnreachable

    model = Qwen3ForCausalLM.from_pretrained(checkpoints[False], dtype=torch.float32)
    rows = rollout_rows(model, char_tokenizer, ["12+7=", "what is 3*4?", "x", "7"])
    with torch.no_grad():
        ours = CausalLMScorer(model)(rows["input_ids"], rows["attention_mask"], rows["response_ids"].shape[1], top_k=8)
    teacher = ServerTeacher(teacher_server, checkpoints[False], TeacherServing(rows_per_request=3))
    assert_teacher_scores_equal(teacher.score(rows, 8, set()), ours, rows["response_mask"])
    ids, mask = prompts(char_tokenizer, ["12+7=", "x"])
    greedy, eos, pad = SamplingConfig(16, temperature=0), [char_tokenizer.eos_token_id], char_tokenizer.pad_token_id
    theirs = teacher.generate(ids, mask, greedy, eos, pad, torch.Generator())
    hf = HFGenerateEngine().generate(model.eval(), ids, mask, greedy, eos, pad, torch.Generator())
    assert torch.equal(theirs.response_ids, hf.response_ids) and torch.equal(theirs.response_mask, hf.response_mask)
    with pytest.raises(TeacherUnreachable, match=r"refused a request \(HTTP 400\)") as error:
        teacher.score(rows, 20, set())
    assert "\n" not in str(error.value)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("config, where", [("topk_lsm", "colocated"), ("sg_opd", "server")])
def test_fit_with_the_teacher_outside_the_trainer(config, where, teacher_server, checkpoints, tmp_path, monkeypatch,
                                                 write_prompts):
    """`lit-opd fit` with vLLM rollouts and the teacher on a colocated vLLM engine (Teacher-TopK/LSM)
    or a vLLM server (SG-OPD: its teacher rollouts come from the server too); the truncated
    importance weight on, its mean logged."""
    from helpers_cli import fit_and_check

    monkeypatch.chdir(tmp_path)
    data = write_prompts()
    models = {"student": checkpoints[True], "teacher": checkpoints[False]}
    teacher = (["--model.init_args.teacher_engine=vllm", f"--model.init_args.teacher_serving.kv_cache_memory_bytes={2**27}",
                "--model.init_args.teacher_serving.max_model_len=256"] if where == "colocated"
               else [f"--model.init_args.teacher_url={teacher_server}"])
    fit_and_check(config, models, str(data), tmp_path / "tb", "--model.init_args.rollout.engine=vllm",
                  f"--model.init_args.rollout.vllm.kv_cache_memory_bytes={2**27}",
                  "--model.init_args.rollout.vllm.max_model_len=256", "--model.init_args.rollout.vllm.importance_cap=2.0",
                  *teacher, tags={"rollout/logp_mismatch", "rollout/importance_weight_mean"})


@needs_vllm
@pytest.mark.slow
def test_sg_opd_with_vllm_rollouts_and_the_teacher_in_the_trainer(checkpoints, write_prompts, monkeypatch):
    """SG-OPD with rollout.engine vllm and the teacher in the trainer: phased teacher sampling's
    rollouts come from the teacher's own engine, so the student's vLLM engine only ever generates
    with the student's weights."""
    import lightning as L

    from lit_opd.data.prompts import PromptDataModule
    from lit_opd.gates import SignConsistencyGate
    from lit_opd.modules import RolloutConfig, SampledTokenOPD
    from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings

    models, generate = [], VLLMEngine.generate
    monkeypatch.setattr(VLLMEngine, "generate", lambda self, model, *args: models.append(model) or generate(self, model, *args))
    vllm = VLLMSettings(kv_cache_memory_bytes=2**27, max_model_len=256)
    module = SampledTokenOPD(student=checkpoints[True], teacher=checkpoints[False], dtype="float32",
                             gates=[SignConsistencyGate()],
                             rollout=RolloutConfig(num_samples=2, max_new_tokens=8, engine="vllm", vllm=vllm,
                                                   teacher_phases=[(0, 1.0)]))
    data = PromptDataModule(checkpoints[True], write_prompts(), prompts_per_rollout=2, reuse=1, num_minibatches=1)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, data)
    assert len(models) == 2 and all(model is module.student for model in models)
    assert module.buffer.stats["train/teacher_rollout_fraction"] == 1.0


@needs_vllm
@pytest.mark.slow
def test_fit_on_two_processes_each_with_its_own_engine(checkpoints, tmp_path, write_prompts):
    """`lit-opd fit` under FSDP2 on 2 gloo processes with rollout.engine vllm: each rank runs its own
    engine (vLLM's external_launcher backend), the sharded student's weights reach it one tensor at a
    time, and its log-probs agree with the trainer's on both rollout batches (rollout/logp_mismatch,
    rank 0)."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers_cli import OVERRIDES, ROOT, tiny_args

    data = write_prompts()
    models = {"student": checkpoints[True], "teacher": checkpoints[False]}
    command = [sys.executable, "-m", "lit_opd", "fit", "--config", "opd", "--config", OVERRIDES,
               *tiny_args(models, str(data), "--model.init_args.rollout.engine=vllm",
                          f"--model.init_args.rollout.vllm.kv_cache_memory_bytes={2**27}",
                          "--model.init_args.rollout.vllm.max_model_len=256", "--data.prompts_per_rollout=1",
                          "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
                          f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}", "--trainer.logger.init_args.name=run",
                          "--trainer.logger.init_args.version=0", "--trainer.log_every_n_steps=1"),
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=strategies/fsdp2_cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    events = EventAccumulator(str(tmp_path / "tb" / "run" / "version_0"))
    events.Reload()
    mismatch = [event.value for event in events.Scalars("rollout/logp_mismatch")]
    assert len(mismatch) == 2 and max(mismatch) < 1e-4


@needs_vllm
@pytest.mark.slow
def test_a_server_teacher_scores_each_part_while_the_rest_generate(teacher_server, checkpoints, char_tokenizer):
    """vLLM rollouts cut in generate_batch_size parts, each scored by a real `vllm serve` as soon as it
    is generated, the rows phased teacher sampling replaced scored after the mix: every mini-batch's
    teacher scores equal the server's scores of its rows asked for after collection."""
    from lit_opd.rollout.collection import RolloutCollector
    from lit_opd.rollout.scoring import ScoringSettings
    from lit_opd.rollout.settings import RolloutConfig
    from lit_opd.rollout.teacher_engines import ServerTeacher, TeacherServing
    from lit_opd.rollout.vllm_engine import VLLMEngine, VLLMSettings
    from lit_opd.verify import Verifier

    student = Qwen3ForCausalLM.from_pretrained(checkpoints[True], dtype=torch.float32)
    engine = VLLMEngine(checkpoints[True], VLLMSettings(kv_cache_memory_bytes=2**27, max_model_len=128))
    teacher = ServerTeacher(teacher_server, checkpoints[False], TeacherServing(rows_per_request=2))
    scored, score = [], teacher.score
    teacher.score = lambda rows, *args: scored.append(rows["input_ids"].shape[0]) or score(rows, *args)
    rollout = RolloutConfig(num_samples=2, max_new_tokens=12, engine="vllm", generate_batch_size=2,
                            teacher_phases=[(0, 0.5)])
    exclude = (char_tokenizer.pad_token_id,)
    collector = RolloutCollector(rollout, char_tokenizer, engine, teacher, ScoringSettings(top_k=8, exclude=exclude),
                                 Verifier(num_workers=1))
    collector.verify = lambda ids, mask, answers: torch.ones(len(answers), dtype=torch.bool)  # every row endorsed
    ids, mask = prompts(char_tokenizer, ["12+7=", "what is 3*4?", "x", "7"])
    batch = {"prompt_ids": ids, "prompt_mask": mask, "answers": ["19", "12", "x", "7"], "num_minibatches": 2}
    try:
        minibatches, stats = collector.collect(batch, 0, CausalLMScorer(student), torch.Generator().manual_seed(0))
        replaced = sum(int(mb["from_teacher"].sum()) for mb in minibatches)
        assert replaced == 4 and stats["train/teacher_mixed_fraction"] == 0.5
        assert scored == [2, 2, 2, 2, replaced]
        for mb in minibatches:
            again = score(mb, 8, set(exclude))
            ours = {"logp": mb["teacher_logp"], "topk_logp": mb["teacher_topk_logp"], "topk_ids": mb["teacher_topk_ids"]}
            assert_teacher_scores_equal(ours, again, mb["response_mask"])
            off = ~mb["response_mask"]
            assert not ours["logp"][off].any() and not ours["topk_ids"][off].any()
    finally:
        collector.close()


def test_asleep_between_calls_at_level_2_and_pushed_again(monkeypatch):
    """On CUDA (faked here) each call wakes the weights, pushes the student's, wakes the KV cache,
    generates and sleeps at level 2, which drops the weights: the next call pushes them again even
    though they did not change. The engine runs in bfloat16 there whatever the master dtype."""
    from lit_opd.rollout import vllm_engine
    from lit_opd.rollout.vllm_engine import VLLMEngine, engine_dtype

    calls = []

    class FakeLLM:
        def wake_up(self, tags=None):
            calls.append(("wake_up", tuple(tags)))

        def sleep(self, level):
            calls.append(("sleep", level))

        def collective_rpc(self, method, kwargs):
            calls.append((method, len(list(kwargs["weights_iterator"]))))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(vllm_engine, "sample", lambda *args: calls.append(("generate",)) or "generation")
    engine = VLLMEngine("student")
    monkeypatch.setattr(engine, "start", lambda dtype: (calls.append(("start", engine_dtype("auto", dtype))),
                                                         setattr(engine, "llm", FakeLLM())))
    model = torch.nn.Linear(2, 2)
    for _ in range(2):
        assert engine.generate(model, None, None, None, [0], 0, None) == "generation"
    assert calls == [("start", "bfloat16"), ("reload_weights", 2), ("generate",), ("sleep", 2),
                     ("wake_up", ("weights",)), ("reload_weights", 2), ("wake_up", ("kv_cache",)), ("generate",),
                     ("sleep", 2)]
    assert engine_dtype("auto", torch.float16) == "float16" and engine_dtype("float32", torch.float32) == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_dtype("auto", torch.float32) == "float32"  # the CPU test bed matches the trainer
