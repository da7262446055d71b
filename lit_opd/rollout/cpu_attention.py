"""Decode attention on CPU: one query position per row, in a small C++ kernel built on first use.

A decode step's attention is B·Hkv tiny matrix products (G = H/Hkv queries against L cached keys); as
batched matmuls or PyTorch's CPU flash kernel each costs microseconds of set-up, several times the
arithmetic, and together they took a third of a rollout call. The kernel here loops over the (row,
KV head) pairs in parallel (OpenMP, as many threads as torch.get_num_threads()), reads each cached key
and value once for all G queries, and keeps scores, softmax and sums in float32.

The kernel is plain C++ with no torch headers: on first use it is compiled with the system C++
compiler (`$CXX`, default `c++`; a few seconds) into LIT_OPD_KERNEL_DIR (default
~/.cache/lit_opd/kernels), named by a hash of its source, flags and this CPU's model, and loaded with
ctypes; it links to the OpenMP runtime torch has already loaded. Where it cannot be built, `load()`
returns None with the reason logged once and the caller uses PyTorch's attention instead.
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

_SOURCE = r"""
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

struct bf16 { uint16_t bits; };

static inline float to_float(float x) { return x; }
static inline float to_float(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
static inline void store(float x, float* out) { *out = x; }
static inline void store(float x, bf16* out) {  // round to nearest even, as torch casts
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) { out->bits = 0x7fc0; return; }  // NaN (a bit test: -ffast-math)
  bits += 0x7fff + ((bits >> 16) & 1);
  out->bits = static_cast<uint16_t>(bits >> 16);
}

// One (row, KV head) pair: G queries q [G, D] (float, pre-scaled) against L keys and values (rows l * stride).
// Masked columns are never read: they score `lowest`, so exp() gives exactly 0 and no infinity is formed.
// HEAD_DIM > 0 fixes D at compile time (fully unrolled inner loops); 0 takes it from `head_dim`.
template <typename T, int64_t HEAD_DIM>
static void attend_pair(const float* __restrict q, const T* __restrict k, const T* __restrict v,
                        const bool* __restrict valid, T* __restrict out, int64_t G, int64_t L, int64_t head_dim,
                        int64_t k_l, int64_t v_l, float* __restrict scores, float* __restrict acc) {
  const int64_t D = HEAD_DIM > 0 ? HEAD_DIM : head_dim;
  for (int64_t l = 0; l < L; ++l) {
    const T* __restrict key = k + l * k_l;
    for (int64_t g = 0; g < G; ++g) {
      const float* __restrict qg = q + g * D;
      float dot = 0.f;
      if (valid[l]) {
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_float(key[d]);
      }
      scores[g * L + l] = valid[l] ? dot : std::numeric_limits<float>::lowest();
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict s = scores + g * L;
    float top = std::numeric_limits<float>::lowest();
    for (int64_t l = 0; l < L; ++l) top = std::max(top, s[l]);
    float total = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      s[l] = std::exp(s[l] - top);
      total += s[l];
    }
    const float inverse = 1.f / total;
    for (int64_t l = 0; l < L; ++l) s[l] *= inverse;
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t l = 0; l < L; ++l) {
    if (!valid[l]) continue;
    const T* __restrict value = v + l * v_l;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + l];
      float* __restrict a = acc + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(value[d]);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) store(acc[i], out + i);
}

// q, out: [B, H, G, D] contiguous; k, v: [B, H, L, D] with element strides (k_b, k_h, k_l, 1); valid: [B, L]
// with row stride valid_b.
template <typename T, int64_t HEAD_DIM>
static void decode_attention(const T* q, const T* k, const T* v, const bool* valid, T* out, int64_t B, int64_t H,
                             int64_t G, int64_t L, int64_t D, int64_t k_b, int64_t k_h, int64_t k_l, int64_t v_b,
                             int64_t v_h, int64_t v_l, int64_t valid_b, float scale, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> query(G * D), scores(G * L), acc(G * D);
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < B * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      for (int64_t i = 0; i < G * D; ++i) query[i] = to_float(q[pair * G * D + i]) * scale;
      attend_pair<T, HEAD_DIM>(query.data(), k + b * k_b + h * k_h, v + b * v_b + h * v_h, valid + b * valid_b,
                               out + pair * G * D, G, L, D, k_l, v_l, scores.data(), acc.data());
    }
  }
}

template <typename T>
static void dispatch_head_dim(const T* q, const T* k, const T* v, const bool* valid, T* out, int64_t B, int64_t H,
                              int64_t G, int64_t L, int64_t D, int64_t k_b, int64_t k_h, int64_t k_l, int64_t v_b,
                              int64_t v_h, int64_t v_l, int64_t valid_b, float scale, int threads) {
  switch (D) {
    case 64: return decode_attention<T, 64>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,
                                            valid_b, scale, threads);
    case 128: return decode_attention<T, 128>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,
                                              valid_b, scale, threads);
    default: return decode_attention<T, 0>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,
                                           valid_b, scale, threads);
  }
}

extern "C" {
void decode_attention_float32(const float* q, const float* k, const float* v, const bool* valid, float* out,
                              int64_t B, int64_t H, int64_t G, int64_t L, int64_t D, int64_t k_b, int64_t k_h,
                              int64_t k_l, int64_t v_b, int64_t v_h, int64_t v_l, int64_t valid_b, float scale,
                              int threads) {
  dispatch_head_dim(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l, valid_b, scale, threads);
}
void decode_attention_bfloat16(const bf16* q, const bf16* k, const bf16* v, const bool* valid, bf16* out,
                               int64_t B, int64_t H, int64_t G, int64_t L, int64_t D, int64_t k_b, int64_t k_h,
                               int64_t k_l, int64_t v_b, int64_t v_h, int64_t v_l, int64_t valid_b, float scale,
                               int threads) {
  dispatch_head_dim(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l, valid_b, scale, threads);
}
}
"""
# -ffast-math lets the compiler vectorise the dot products (reassociation) and exp (libmvec); the kernel
# forms no infinity (masked scores are the lowest finite float) and reads no masked column. It is for
# compiling only: linked with -ffast-math, a library sets flush-to-zero for the whole process on load.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_LINK_FLAGS = ["-shared", "-fopenmp"]
_INT64_ARGS = 12  # B, H, G, L, D and the seven strides
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load() -> dict[torch.dtype, Callable[..., None]] | None:
    """The compiled kernel's entry point per dtype of DTYPES, or None (reason logged once) where it cannot
    be built."""
    compiler = os.environ.get("CXX", "c++")
    # -march=native code must not run on another CPU: the library is named by this CPU's model and flags.
    key = hashlib.sha1(
        "\0".join([_SOURCE, compiler, *_COMPILE_FLAGS, *_LINK_FLAGS, platform.processor(), _cpu_flags()]).encode()
    )
    directory = Path(os.environ.get("LIT_OPD_KERNEL_DIR", Path.home() / ".cache" / "lit_opd" / "kernels"))
    library = directory / f"decode_attention_{key.hexdigest()[:16]}.so"
    try:
        if not library.exists():
            _build(compiler, directory, library)
        kernel = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:
        reason = getattr(error, "stderr", None) or error
        log.warning("the CPU decode-attention kernel could not be built (%s); using PyTorch's attention", reason)
        return None
    pointers, sizes = [ctypes.c_void_p] * 5, [ctypes.c_int64] * _INT64_ARGS
    functions = {}
    for dtype in DTYPES:
        function = getattr(kernel, f"decode_attention_{str(dtype).removeprefix('torch.')}")
        function.argtypes = [*pointers, *sizes, ctypes.c_float, ctypes.c_int]
        function.restype = None
        functions[dtype] = function
    return functions


def _build(compiler: str, directory: Path, library: Path) -> None:
    """Compile the kernel to `library`; a temporary name then a rename, so that processes building at
    once never load a half-written file."""
    log.info("building the CPU decode-attention kernel → %s", library)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source, built = Path(scratch) / "decode_attention.cpp", Path(scratch) / "decode_attention.so"
        source.write_text(_SOURCE)
        compiled = source.with_suffix(".o")
        for command in (
            [compiler, *_COMPILE_FLAGS, "-c", str(source), "-o", str(compiled)],
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
    kernels = load() if applies else None
    if kernels is None:
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
    kernels[q.dtype](
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), valid.data_ptr(), out.data_ptr(),
        B, H, G, L, D, *keys.stride()[:3], *values.stride()[:3], valid.stride(0),
        scale, torch.get_num_threads(),
    )
    return out
