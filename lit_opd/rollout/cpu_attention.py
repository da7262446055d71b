"""Decode attention on CPU: one query position per row, a C++ kernel built on first use.

A decode step's attention is B·Hkv tiny matrix products (G = H/Hkv queries against L cached keys); as
batched matmuls or PyTorch's CPU flash kernel each costs a few microseconds of set-up, several times
the arithmetic, and together they took a third of a rollout call. The kernel here loops over the
(row, KV head) pairs in parallel (ATen's thread pool, so torch.set_num_threads applies), reads each
cached key and value once for all G queries, and keeps scores, softmax and sums in float32.

The extension is compiled with torch.utils.cpp_extension on first use (a C++ compiler and ninja are
needed; the build takes about a minute on 2 cores and is cached, under TORCH_EXTENSIONS_DIR, per CPU
model and torch version). Where it cannot be built, `load()` returns None with the reason logged once
and the caller uses PyTorch's attention instead.
"""

import functools
import hashlib
import logging
import platform

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * static_cast<float>(key[d]);
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
      for (int64_t d = 0; d < D; ++d) a[d] += p * static_cast<float>(value[d]);
    }
  }
  for (int64_t i = 0; i < G * D; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T, int64_t HEAD_DIM>
static void decode_attention_kernel(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                    const at::Tensor& valid, at::Tensor& out, float scale) {
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), L = keys.size(2);
  const T* q_data = q.data_ptr<T>();
  const T* k_data = keys.data_ptr<T>();
  const T* v_data = values.data_ptr<T>();
  const bool* valid_data = valid.data_ptr<bool>();
  T* out_data = out.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(G * D), scores(G * L), acc(G * D);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      for (int64_t i = 0; i < G * D; ++i) query[i] = static_cast<float>(q_data[pair * G * D + i]) * scale;
      attend_pair<T, HEAD_DIM>(query.data(), k_data + b * keys.stride(0) + h * keys.stride(1),
                               v_data + b * values.stride(0) + h * values.stride(1), valid_data + b * valid.stride(0),
                               out_data + pair * G * D, G, L, D, keys.stride(2), values.stride(2), scores.data(),
                               acc.data());
    }
  });
}

template <typename T>
static void dispatch_head_dim(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                              const at::Tensor& valid, at::Tensor& out, float scale) {
  switch (q.size(3)) {
    case 32: return decode_attention_kernel<T, 32>(q, keys, values, valid, out, scale);
    case 64: return decode_attention_kernel<T, 64>(q, keys, values, valid, out, scale);
    case 128: return decode_attention_kernel<T, 128>(q, keys, values, valid, out, scale);
    case 256: return decode_attention_kernel<T, 256>(q, keys, values, valid, out, scale);
    default: return decode_attention_kernel<T, 0>(q, keys, values, valid, out, scale);
  }
}

at::Tensor decode_attention(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor valid,
                               double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "q, keys, values must be 4-D");
  TORCH_CHECK(keys.stride(3) == 1 && values.stride(3) == 1, "keys and values need a contiguous last dimension");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.stride(1) == 1, "valid must be bool, rows contiguous");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(), "one dtype");
  TORCH_CHECK(keys.size(0) == q.size(0) && keys.size(1) == q.size(1) && keys.size(3) == q.size(3) &&
              values.sizes() == keys.sizes() && valid.size(0) == q.size(0) && valid.size(1) == keys.size(2),
              "shapes: q [B, Hkv, G, D], keys and values [B, Hkv, L, D], valid [B, L]");
  q = q.contiguous();
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    dispatch_head_dim<scalar_t>(q, keys, values, valid, out, static_cast<float>(scale));
  });
  return out;
}

TORCH_LIBRARY(lit_opd, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor valid, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lit_opd, CPU, m) { m.impl("decode_attention", &decode_attention); }
"""


@functools.cache
def load():
    """The kernel as the operator torch.ops.lit_opd.decode_attention (CPU only, visible to the profiler),
    or None (reason logged once) where it cannot be built."""
    # -march=native code must not run on another CPU, nor a build against other torch headers: the
    # build is named by this CPU's model and flags and the torch version.
    key = hashlib.sha1(f"{platform.processor()}{_cpu_flags()}{torch.__version__}".encode()).hexdigest()[:10]
    try:
        from torch.utils.cpp_extension import load_inline

        log.info("loading the CPU decode-attention kernel (built once per machine, about a minute)")
        load_inline(
            name=f"lit_opd_decode_attention_{key}",
            cpp_sources=[_SOURCE],
            is_python_module=False,
            # -ffast-math lets the compiler vectorise the dot products (reassociation) and exp (libmvec);
            # the kernel forms no infinity (masked scores are the lowest finite float).
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
        return torch.ops.lit_opd.decode_attention
    except Exception as error:  # no compiler, no ninja, a failed build: PyTorch's attention still works
        log.warning("the CPU decode-attention kernel could not be built (%s); using PyTorch's attention", error)
        return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float) -> Tensor | None:
    """softmax(q kᵀ · scale, masked where not valid) v, or None where the kernel does not apply (not CPU,
    mixed dtypes, a strided last dimension) or could not be built.

    q: [B, Hkv, G, D] (the G query heads that share a KV head); keys, values: [B, Hkv, L, D] with a
    contiguous last dimension (a prefix of a larger cache is fine); valid: [B, L] bool with contiguous
    rows and at least one True per row. Returns [B, Hkv, G, D] in q's dtype; sums are float32.
    """
    applies = (
        q.device.type == "cpu"
        and keys.dtype == values.dtype == q.dtype
        and keys.stride(-1) == values.stride(-1) == valid.stride(-1) == 1
    )
    kernel = load() if applies else None
    if kernel is None:
        return None
    return kernel(q, keys, values, valid, scale)
