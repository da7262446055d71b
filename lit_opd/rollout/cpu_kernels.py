"""The fast engine's decode step on CPU: attention, RMSNorm, SiLU gating, float32 projections and sampling
in small C++ kernels built on first use (`cpu_kernels.cpp` beside this file).

With one new token per row a decode step's arithmetic outside the weight matmuls is tiny, and done as
PyTorch ops it is ~250 dispatches of a few microseconds each, single-threaded at these sizes: on the
benchmark's CPU shape that was a third of a rollout call. The weight matmuls themselves multiply each
weight by only B rows: a library GEMM packs (copies) the weight for every call, while `linear` reads it
once where it lies and packs the B rows instead. Each kernel here does one such group in one OpenMP
region over rows, (row, KV head) pairs or weight tiles with torch.get_num_threads() threads:
  decode_layer_attention  q/k RMSNorm, RoPE, the KV-cache write and attention of one layer;
  add_rms_norm            the residual add and the next RMSNorm;
  silu_mul                silu(gate) · up;
  linear                  float32 projections of one input (q, k and v in one call), the weights read in
                          place, the rows packed, optionally after the residual add and RMSNorm;
  gated_mlp               a float32 SiLU MLP: gate and up projections, gating and the down projection,
                          optionally after the residual add and RMSNorm;
  sample_tokens           temperature, top-k, top-p, the draw, both log-probs, EOS and the output writes;
  decode_attention        attention alone (the engine's path under autocast).
Each rounds where HF's PyTorch ops round (bfloat16 results are rounded to nearest even at the same
points); sums are float32 (in another order than PyTorch's matmuls: results agree to float32 rounding,
not bit for bit).

The kernels are plain C++ with no torch headers: on first use they are compiled with the system C++
compiler (`$CXX`, default `c++`; a few seconds) into LIT_OPD_KERNEL_DIR (default
~/.cache/lit_opd/kernels), named by a hash of the source, flags and this CPU's model, and loaded with
ctypes; they link to the OpenMP runtime torch has already loaded. Where they cannot be built, `load()`
returns None with the reason logged once and the engine uses PyTorch's ops instead.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# -ffast-math lets the compiler vectorise the dot products (reassociation) and exp (libmvec); the kernel
# forms no infinity (masked scores are the lowest finite float) and reads no masked column. It is for
# compiling only: linked with -ffast-math, a library sets flush-to-zero for the whole process on load.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_LINK_FLAGS = ["-shared", "-fopenmp"]
DTYPES = (torch.float32, torch.bfloat16)
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_POINTER, _INT, _FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# Argument types of each entry point (the per-dtype ones end in _float32 / _bfloat16); the last is threads.
_SIGNATURES = {
    "decode_attention": [_POINTER] * 5 + [_INT] * 12 + [_FLOAT],
    "decode_layer_attention": [_POINTER] * 12 + [_INT] * 7 + [_FLOAT] * 2,
    "add_rms_norm": [_POINTER] * 4 + [_INT] * 2 + [_FLOAT],
    "silu_mul": [_POINTER] * 2 + [_INT],
}
# float32 only:
_FLOAT32_SIGNATURES = {
    "linear_float32": [_POINTER] * 3 + [_FLOAT] + [_INT] * 3 + [_POINTER] * 4,
    "gated_mlp_float32": [_POINTER] * 3 + [_FLOAT] + [_INT] * 3 + [_POINTER] * 7,
}
_SAMPLE_SIGNATURE = [_POINTER, _POINTER, _INT, _INT, _FLOAT, _INT, _FLOAT, _POINTER, _POINTER] + [_INT] * 4 + [_POINTER] * 5


@functools.cache
def load() -> dict[str, Callable[..., None]] | None:
    """The compiled kernels' entry points by name ("add_rms_norm_float32", ..., "sample_tokens"), or None
    (reason logged once) where they cannot be built."""
    compiler = os.environ.get("CXX", "c++")
    source = _SOURCE.read_text()
    # -march=native code must not run on another CPU: the library is named by this CPU's model and flags.
    key = hashlib.sha1(
        "\0".join([source, compiler, *_COMPILE_FLAGS, *_LINK_FLAGS, platform.processor(), _cpu_flags()]).encode()
    )
    directory = Path(os.environ.get("LIT_OPD_KERNEL_DIR", Path.home() / ".cache" / "lit_opd" / "kernels"))
    library = directory / f"cpu_kernels_{key.hexdigest()[:16]}.so"
    try:
        if not library.exists():
            _build(compiler, source, directory, library)
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        reason = getattr(error, "stderr", None) or error
        log.warning("the CPU decode kernels could not be built (%s); using PyTorch's ops", reason)
        return None
    signatures = {"sample_tokens": _SAMPLE_SIGNATURE} | _FLOAT32_SIGNATURES | {
        f"{name}_{_NAMES[dtype]}": arguments for name, arguments in _SIGNATURES.items() for dtype in DTYPES
    }
    functions = {}
    for name, arguments in signatures.items():
        function = getattr(kernels, name)
        function.argtypes = [*arguments, ctypes.c_int]
        function.restype = None
        functions[name] = function
    return functions


def _build(compiler: str, source: str, directory: Path, library: Path) -> None:
    """Compile `source` to `library`; a temporary name then a rename, so that processes building at
    once never load a half-written file."""
    log.info("building the CPU decode kernels → %s", library)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        copy, compiled, built = (Path(scratch) / f"cpu_kernels.{suffix}" for suffix in ("cpp", "o", "so"))
        copy.write_text(source)  # the text the library's name hashes, even if the file changes meanwhile
        for command in (
            [compiler, *_COMPILE_FLAGS, "-c", str(copy), "-o", str(compiled)],
            [compiler, *_LINK_FLAGS, str(compiled), "-o", str(built)],
        ):
            subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(built, library)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _shapes_match(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> bool:
    """q [B, Hkv, G, D], keys and values [B, Hkv, L, D], valid [B, L]."""
    if q.dim() != 4 or keys.dim() != 4:
        return False
    B, H, _, D = q.shape
    L = keys.shape[2]
    return keys.shape == (B, H, L, D) and values.shape == keys.shape and valid.shape == (B, L)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> Tensor | None:
    """softmax(q kᵀ · scale, masked where not valid) v, or None where the kernel does not apply (not CPU,
    not float32 / bfloat16, mixed dtypes, a strided last dimension) or could not be built.

    q: [B, Hkv, G, D] (the G query heads that share a KV head); keys, values: [B, Hkv, L, D] with a
    contiguous last dimension (a prefix of a larger cache is fine); valid: [B, L] bool with contiguous
    rows and at least one True per row. Returns [B, Hkv, G, D] in q's dtype; sums are float32.
    """
    applies = (
        q.device.type == keys.device.type == values.device.type == valid.device.type == "cpu"
        and q.dtype in DTYPES
        and keys.dtype == values.dtype == q.dtype
        and valid.dtype == torch.bool
        and keys.stride(-1) == values.stride(-1) == valid.stride(-1) == 1
    )
    if not applies or load() is None:
        return None
    if not _shapes_match(q, keys, values, valid):
        raise ValueError(
            "decode_attention expects q [B, Hkv, G, D], keys and values [B, Hkv, L, D], valid [B, L]; got "
            f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}, valid {tuple(valid.shape)}"
        )
    B, H, G, D = q.shape
    L = keys.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    _entry("decode_attention", q.dtype)(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), valid.data_ptr(), out.data_ptr(),
        B, H, G, L, D, *keys.stride()[:3], *values.stride()[:3], valid.stride(0),
        scale, torch.get_num_threads(),
    )
    return out


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _entry(kernel: str, dtype: torch.dtype) -> Callable[..., None]:
    """The built entry point of `kernel` for `dtype`; a ValueError where the kernels do not implement it."""
    if dtype not in DTYPES:
        raise ValueError(f"{kernel}: implemented for {DTYPES}, got {dtype}")
    return load()[f"{kernel}_{_NAMES[dtype]}"]


def _check(kernel: str, arguments: dict[str, tuple[Tensor | None, tuple[int, ...], torch.dtype]]) -> None:
    """Raise a ValueError naming the argument unless each given tensor (None is skipped) is a contiguous
    CPU tensor of the expected shape and dtype: the kernels index raw memory and check nothing."""
    for name, (tensor, shape, dtype) in arguments.items():
        if tensor is None:
            continue
        if tensor.shape != shape or tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"{kernel}: {name} must be a contiguous CPU {dtype} tensor of shape {tuple(shape)}; got "
                f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
                f"{'' if tensor.is_contiguous() else ', not contiguous'}"
            )


# The fused decode step: each kernel takes contiguous CPU tensors of one dtype of DTYPES (float32 for
# sampling) and needs a built library (load() is not None).


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> Tensor:
    """x ← x + delta in place (skipped when delta is None), then returns weight · x / sqrt(mean(x²) + eps),
    normalised in float32 and cast back before the scale, as HF's RMSNorm. x, delta: [rows, n]; weight: [n]."""
    _check("add_rms_norm", {"x": (x, x.shape, x.dtype), "delta": (delta, x.shape, x.dtype),
                            "weight": (weight, x.shape[1:], x.dtype)})
    out = torch.empty_like(x)
    _entry("add_rms_norm", x.dtype)(
        x.data_ptr(), _pointer(delta), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """gate ← silu(gate) · up in place (silu rounded to the dtype first, as HF's MLP), returned."""
    _check("silu_mul", {"gate": (gate, gate.shape, gate.dtype), "up": (up, gate.shape, gate.dtype)})
    _entry("silu_mul", gate.dtype)(gate.data_ptr(), up.data_ptr(), gate.numel(), torch.get_num_threads())
    return gate


def linear(
    x: Tensor, projections: list[tuple[Tensor, Tensor | None]], norm: Tensor | None = None,
    delta: Tensor | None = None, eps: float = 0.0,
) -> list[Tensor]:
    """[h · weightᵀ + bias for each (weight, bias) of `projections`] in one call: the decode step's
    projections of one input, float32. Without `norm`, h = x; with it, x ← x + delta in place (skipped
    when delta is None) and h = add_rms_norm's result, never stored. x, delta: [M, K]; norm: [K]; weight:
    [N, K] (each its own N); bias: [N] or None. Returns [M, N] tensors. Each weight is read where it lies;
    sums are float32 FMA chains in k order."""
    M, K = _check_input("linear", x, norm, delta)
    for index, (weight, bias) in enumerate(projections):
        _check("linear", {f"weight {index}": (weight, (weight.shape[0], K), torch.float32),
                          f"bias {index}": (bias, weight.shape[:1], torch.float32)})
    outs = [torch.empty(M, weight.shape[0], dtype=torch.float32) for weight, _ in projections]
    count = len(projections)
    pointers = ctypes.c_void_p * count
    load()["linear_float32"](
        x.data_ptr(), _pointer(delta), _pointer(norm), eps, M, K, count,
        pointers(*(w.data_ptr() for w, _ in projections)), pointers(*(_pointer(b) for _, b in projections)),
        pointers(*(out.data_ptr() for out in outs)),
        (ctypes.c_int64 * count)(*(out.shape[1] for out in outs)), torch.get_num_threads(),
    )
    return outs


def gated_mlp(
    x: Tensor, gate: tuple[Tensor, Tensor | None], up: tuple[Tensor, Tensor | None],
    down: tuple[Tensor, Tensor | None], norm: Tensor | None = None, delta: Tensor | None = None, eps: float = 0.0,
) -> Tensor:
    """down(silu(gate(h)) · up(h)), HF's SiLU MLP, float32, in one call; each projection a (weight, bias);
    h as in `linear` (x, or with `norm` the residual add and RMSNorm). x, delta: [M, H]; norm: [H]; gate and
    up weights [I, H], biases [I]; down weight [H, I], bias [H]. Returns [M, H]."""
    M, H = _check_input("gated_mlp", x, norm, delta)
    I = gate[0].shape[0]
    _check("gated_mlp", {
        "gate weight": (gate[0], (I, H), torch.float32), "gate bias": (gate[1], (I,), torch.float32),
        "up weight": (up[0], (I, H), torch.float32), "up bias": (up[1], (I,), torch.float32),
        "down weight": (down[0], (H, I), torch.float32), "down bias": (down[1], (H,), torch.float32),
    })
    out = torch.empty_like(x)
    load()["gated_mlp_float32"](
        x.data_ptr(), _pointer(delta), _pointer(norm), eps, M, H, I, gate[0].data_ptr(), up[0].data_ptr(),
        down[0].data_ptr(), _pointer(gate[1]), _pointer(up[1]), _pointer(down[1]), out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _check_input(kernel: str, x: Tensor, norm: Tensor | None, delta: Tensor | None) -> tuple[int, int]:
    """x's [M, K] after checking x, norm and delta for a float32 projection kernel."""
    if delta is not None and norm is None:
        raise ValueError(f"{kernel}: delta is added only before a norm; got a delta without one")
    _check(kernel, {"x": (x, x.shape, torch.float32)})
    if x.dim() != 2:
        raise ValueError(f"{kernel}: x must be [M, K]; got {tuple(x.shape)}")
    _check(kernel, {"norm": (norm, x.shape[1:], torch.float32), "delta": (delta, x.shape, torch.float32)})
    return x.shape


def decode_layer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_norm: Tensor | None,
    k_norm: Tensor | None,
    cos: Tensor,
    sin_signed: Tensor,
    positions: Tensor,
    cache_keys: Tensor,
    cache_values: Tensor,
    valid: Tensor,
    slot: int,
    kv_len: int,
    scale: float,
    eps: float,
) -> Tensor:
    """One layer's attention for one new token per row. The new keys are RMS-normed by k_norm (if given),
    rotated to `positions` and written with the values to cache column `slot`; the queries are normed by
    q_norm and rotated alike; then softmax(q kᵀ · scale) v over cache columns 0..kv_len−1 where valid.

    q: [B, H·D]; k, v: [B, Hkv·D] (heads h·G..h·G+G−1 of q share KV head h); q_norm, k_norm: [D];
    cos, sin_signed: [P, D] (sin_signed = (−sin₁, sin₂)) for positions 0..P−1; positions: [B, 1] long, each
    < P; cache_keys, cache_values: [B, Hkv, cache_len, D]; valid: [B, cache_len] bool; slot < kv_len ≤
    cache_len. Returns [B, H·D].
    """
    B, Hkv, cache_len, D = cache_keys.shape
    T, G = cache_keys.dtype, q.shape[1] // (Hkv * D)
    _check("decode_layer_attention", {
        "q": (q, (B, Hkv * G * D), T), "k": (k, (B, Hkv * D), T), "v": (v, (B, Hkv * D), T),
        "q_norm": (q_norm, (D,), T), "k_norm": (k_norm, (D,), T), "cos": (cos, (cos.shape[0], D), T),
        "sin_signed": (sin_signed, cos.shape, T), "positions": (positions, (B, 1), torch.long),
        "cache_keys": (cache_keys, cache_keys.shape, T), "cache_values": (cache_values, cache_keys.shape, T),
        "valid": (valid, (B, cache_len), torch.bool),
    })
    if not 0 <= slot < kv_len <= cache_len:
        raise ValueError(f"decode_layer_attention: needs 0 ≤ slot < kv_len ≤ cache_len, got {slot}, {kv_len}, {cache_len}")
    out = torch.empty_like(q)
    _entry("decode_layer_attention", T)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(q_norm), _pointer(k_norm), cos.data_ptr(),
        sin_signed.data_ptr(), positions.data_ptr(), cache_keys.data_ptr(), cache_values.data_ptr(),
        valid.data_ptr(), out.data_ptr(), B, Hkv, G, cache_len, kv_len, D, slot, scale,
        eps, torch.get_num_threads(),
    )
    return out


def sample_tokens(
    logits: Tensor,
    uniform: Tensor | None,
    temperature: float,
    top_k: int,
    top_p: float,
    done: Tensor,
    eos: Tensor,
    pad: int,
    step: int,
    out_ids: Tensor,
    out_mask: Tensor,
    out_logp: Tensor,
    out_sample_logp: Tensor,
    tokens: Tensor,
) -> None:
    """fast.sample_tokens and the engine's bookkeeping for response token `step`, in one pass per row:
    rows not done get a token drawn from their logits [B, V] float32 with the uniforms [B, V] (None when
    greedy), its untempered and sampling log-probs, mask True, and become done if it is in `eos` [E] long;
    rows already done get `pad`, log-probs 0 and mask False. Writes column `step` of out_ids, out_mask,
    out_logp, out_sample_logp [B, N], the tokens [B, 1] and done [B]."""
    B, V = logits.shape
    N = out_ids.shape[1]
    _check("sample_tokens", {
        "logits": (logits, (B, V), torch.float32), "uniform": (uniform, (B, V), torch.float32),
        "done": (done, (B,), torch.bool), "eos": (eos, eos.shape[:1], torch.long),
        "out_ids": (out_ids, (B, N), torch.long), "out_mask": (out_mask, (B, N), torch.bool),
        "out_logp": (out_logp, (B, N), torch.float32), "out_sample_logp": (out_sample_logp, (B, N), torch.float32),
        "tokens": (tokens, (B, 1), torch.long),
    })
    if (uniform is None) != (temperature == 0) or not 0 <= step < N:
        raise ValueError(f"sample_tokens: uniform is needed exactly when temperature > 0, and step in [0, {N})")
    load()["sample_tokens"](
        logits.data_ptr(), _pointer(uniform), B, V, temperature, top_k, top_p, done.data_ptr(), eos.data_ptr(),
        eos.numel(), pad, step, N, out_ids.data_ptr(), out_mask.data_ptr(), out_logp.data_ptr(),
        out_sample_logp.data_ptr(), tokens.data_ptr(), torch.get_num_threads(),
    )
