// The fast engine's CPU decode step: attention, RMSNorm, SiLU gating and sampling for one new token per
// row, each one OpenMP loop over rows (or (row, KV head) pairs). Plain C++ with no torch headers, built
// and loaded by cpu_kernels.py. Compiled with -ffast-math: no code here forms an infinity or compares a
// NaN where the result could index memory (masked scores are the lowest finite float; token order is an
// integer key).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
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
// x rounded to T, as a float: what an op of torch's in dtype T would have stored.
template <typename T>
static inline float rounded(float x) {
  T out;
  store(x, &out);
  return to_float(out);
}

// x [n] ← w · round(x / sqrt(mean(x²) + eps)), each product rounded to T: HF's RMSNorm, which normalises in
// float32 and casts back before the scale. x holds values of T.
template <typename T>
static void rms_norm(float* __restrict x, const T* __restrict w, int64_t n, float eps) {
  float squares = 0.f;
  for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
  const float inverse = 1.f / std::sqrt(squares / n + eps);
  for (int64_t i = 0; i < n; ++i) x[i] = rounded<T>(to_float(w[i]) * rounded<T>(x[i] * inverse));
}

// x [D] ← round(round(x · cos) + rotate_half(x) · sin): HF's RoPE with the roundings of fast.apply_rope
// (torch.addcmul), with sin_signed = (−sin₁, sin₂).
template <typename T>
static void rope(float* __restrict x, const T* __restrict cos, const T* __restrict sin_signed, int64_t D,
                 float* __restrict scratch) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) scratch[d] = x[d < half ? d + half : d - half];
  for (int64_t d = 0; d < D; ++d)
    x[d] = rounded<T>(rounded<T>(x[d] * to_float(cos[d])) + scratch[d] * to_float(sin_signed[d]));
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

// A decode step's whole attention block for one layer, per (row b, KV head h) pair: the new key
// k[b, h] [D] is RMS-normed (k_norm, if given) and rotated to positions[b], then stored with v[b, h] in
// cache column `slot`; each of the G query heads h·G + g is normed (q_norm) and rotated alike, then
// attends over cache columns 0..L−1 where valid[b]. q, out: [B, Hkv·G·D]; k, v: [B, Hkv·D]; cos,
// sin_signed: [positions, D]; cache_k, cache_v: [B, Hkv, cache_len, D]; valid: [B, cache_len]. All
// contiguous.
template <typename T, int64_t HEAD_DIM>
static void decode_layer_attention(const T* q, const T* k, const T* v, const T* q_norm, const T* k_norm,
                                   const T* cos, const T* sin_signed, const int64_t* positions, T* cache_k,
                                   T* cache_v, const bool* valid, T* out, int64_t B, int64_t H, int64_t G,
                                   int64_t cache_len, int64_t L, int64_t D, int64_t slot, float scale, float eps,
                                   int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> head(D), scratch(D), query(G * D), scores(G * L), acc(G * D);
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < B * H; ++pair) {
      const int64_t b = pair / H, h = pair % H;
      const T* c = cos + positions[b] * D;
      const T* s = sin_signed + positions[b] * D;
      T* keys = cache_k + pair * cache_len * D;
      T* values = cache_v + pair * cache_len * D;
      for (int64_t d = 0; d < D; ++d) head[d] = to_float(k[pair * D + d]);
      if (k_norm) rms_norm(head.data(), k_norm, D, eps);
      rope(head.data(), c, s, D, scratch.data());
      for (int64_t d = 0; d < D; ++d) {
        store(head[d], keys + slot * D + d);
        values[slot * D + d] = v[pair * D + d];
      }
      for (int64_t g = 0; g < G; ++g) {
        float* qg = query.data() + g * D;
        for (int64_t d = 0; d < D; ++d) qg[d] = to_float(q[(pair * G + g) * D + d]);
        if (q_norm) rms_norm(qg, q_norm, D, eps);
        rope(qg, c, s, D, scratch.data());
        for (int64_t d = 0; d < D; ++d) qg[d] *= scale;
      }
      attend_pair<T, HEAD_DIM>(query.data(), keys, values, valid + b * cache_len, out + pair * G * D, G, L, D, D, D,
                               scores.data(), acc.data());
    }
  }
}

// x [rows, n] ← round(x + delta) (if delta is given), then out [rows, n] ← RMSNorm(x) · w: the residual add
// and the next norm of a decoder layer.
template <typename T>
static void add_rms_norm(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t n, float eps, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> row(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* xr = x + r * n;
      for (int64_t i = 0; i < n; ++i) {
        row[i] = delta ? rounded<T>(to_float(xr[i]) + to_float(delta[r * n + i])) : to_float(xr[i]);
        if (delta) store(row[i], xr + i);
      }
      rms_norm(row.data(), w, n, eps);
      for (int64_t i = 0; i < n; ++i) store(row[i], out + r * n + i);
    }
  }
}

// gate [n] ← round(round(silu(gate)) · up): HF's act_fn(gate_proj(x)) * up_proj(x).
template <typename T>
static void silu_mul(T* gate, const T* up, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(gate[i]);
    const float silu = rounded<T>(g / (1.f + std::exp(std::min(-g, 80.f))));
    store(silu * to_float(up[i]), gate + i);
  }
}

// A float's bits as an unsigned key in the float's order (NaN above +inf): sorts without float compares.
static inline uint32_t order_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Row r of a decode step's sampling; see sample_tokens in fast.py for the distribution. Candidates are the
// tokens the top-k and top-p filters keep (all V when both are off, in vocabulary order); the draw is the
// exponential race argmax_v q_v / E_v over them, E_v = −log max(u_v, FLT_MIN).
static int64_t sample_row(const float* z, const float* u, int64_t V, float temperature, int64_t top_k, float top_p,
                          std::vector<float>& scaled, std::vector<uint64_t>& order, float* logp, float* sample_logp) {
  float top = z[0];
  int64_t best = 0;
  for (int64_t v = 1; v < V; ++v) {
    if (z[v] > top) { top = z[v]; best = v; }
  }
  float total = 0.f;
  for (int64_t v = 0; v < V; ++v) total += std::exp(z[v] - top);
  const float log_total = std::log(total);
  if (temperature == 0.f) {
    *logp = z[best] - top - log_total;
    *sample_logp = 0.f;
    return best;
  }
  for (int64_t v = 0; v < V; ++v) scaled[v] = temperature == 1.f ? z[v] : z[v] / temperature;
  const bool top_k_on = top_k > 0 && top_k < V;
  int64_t kept = V;
  if (top_k_on || top_p < 1.f) {
    // Key: the value's order in the high 32 bits, the complemented index below (ties: lower index first).
    for (int64_t v = 0; v < V; ++v)
      order[v] = static_cast<uint64_t>(order_key(scaled[v])) << 32 | (0xffffffffu - static_cast<uint32_t>(v));
    kept = top_k_on ? top_k : V;
    std::partial_sort(order.begin(), order.begin() + kept, order.begin() + V, std::greater<uint64_t>());
    for (int64_t i = 0; i < kept; ++i) order[i] = 0xffffffffu - (order[i] & 0xffffffffu);
    if (top_p < 1.f) {
      const float first = scaled[order[0]];
      float mass = 0.f;
      for (int64_t i = 0; i < kept; ++i) mass += std::exp(scaled[order[i]] - first);
      float before = 0.f;
      int64_t i = 0;
      while (i < kept && before < top_p) before += std::exp(scaled[order[i++]] - first) / mass;
      kept = i;
    }
  } else {
    for (int64_t v = 0; v < V; ++v) order[v] = v;
  }
  float kept_top = scaled[order[0]];
  for (int64_t i = 1; i < kept; ++i) kept_top = std::max(kept_top, scaled[order[i]]);
  float kept_total = 0.f;
  for (int64_t i = 0; i < kept; ++i) kept_total += std::exp(scaled[order[i]] - kept_top);
  const float log_kept_total = std::log(kept_total);
  int64_t token = order[0];
  float race = -1.f;
  for (int64_t i = 0; i < kept; ++i) {
    const int64_t v = order[i];
    const float exponential = -std::log(std::max(u[v], std::numeric_limits<float>::min()));
    const float score = std::exp(scaled[v] - kept_top - log_kept_total) / exponential;
    if (score > race) { race = score; token = v; }
  }
  *logp = z[token] - top - log_total;
  *sample_logp = scaled[token] - kept_top - log_kept_total;
  return token;
}

extern "C" {
#define LIT_OPD_KERNELS(T, NAME)                                                                                    \
  void decode_attention_##NAME(const T* q, const T* k, const T* v, const bool* valid, T* out, int64_t B, int64_t H, \
                               int64_t G, int64_t L, int64_t D, int64_t k_b, int64_t k_h, int64_t k_l, int64_t v_b, \
                               int64_t v_h, int64_t v_l, int64_t valid_b, float scale, int threads) {               \
    switch (D) {                                                                                                    \
      case 64: return decode_attention<T, 64>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,     \
                                              valid_b, scale, threads);                                             \
      case 128: return decode_attention<T, 128>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,   \
                                                valid_b, scale, threads);                                           \
      default: return decode_attention<T, 0>(q, k, v, valid, out, B, H, G, L, D, k_b, k_h, k_l, v_b, v_h, v_l,      \
                                             valid_b, scale, threads);                                              \
    }                                                                                                               \
  }                                                                                                                 \
  void decode_layer_attention_##NAME(const T* q, const T* k, const T* v, const T* q_norm, const T* k_norm,          \
                                     const T* cos, const T* sin_signed, const int64_t* positions, T* cache_k,       \
                                     T* cache_v, const bool* valid, T* out, int64_t B, int64_t H, int64_t G,         \
                                     int64_t cache_len, int64_t L, int64_t D, int64_t slot, float scale, float eps, \
                                     int threads) {                                                                 \
    switch (D) {                                                                                                    \
      case 64: return decode_layer_attention<T, 64>(q, k, v, q_norm, k_norm, cos, sin_signed, positions, cache_k,   \
                                                    cache_v, valid, out, B, H, G, cache_len, L, D, slot, scale,     \
                                                    eps, threads);                                                  \
      case 128: return decode_layer_attention<T, 128>(q, k, v, q_norm, k_norm, cos, sin_signed, positions, cache_k, \
                                                      cache_v, valid, out, B, H, G, cache_len, L, D, slot, scale,   \
                                                      eps, threads);                                                \
      default: return decode_layer_attention<T, 0>(q, k, v, q_norm, k_norm, cos, sin_signed, positions, cache_k,    \
                                                   cache_v, valid, out, B, H, G, cache_len, L, D, slot, scale, eps, \
                                                   threads);                                                        \
    }                                                                                                               \
  }                                                                                                                 \
  void add_rms_norm_##NAME(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t n, float eps,            \
                           int threads) {                                                                           \
    add_rms_norm(x, delta, w, out, rows, n, eps, threads);                                                          \
  }                                                                                                                 \
  void silu_mul_##NAME(T* gate, const T* up, int64_t n, int threads) { silu_mul(gate, up, n, threads); }

LIT_OPD_KERNELS(float, float32)
LIT_OPD_KERNELS(bf16, bfloat16)

// One decode step's sampling and bookkeeping. logits, uniform: [B, V] float32 (uniform null when greedy);
// done: [B], updated; out_*: [B, N], column `step` written; tokens: [B], the next step's input. A row that
// is done gets pad, log-probs 0 and a false mask; a row whose token is one of the E eos ids is done after.
void sample_tokens(const float* logits, const float* uniform, int64_t B, int64_t V, float temperature, int64_t top_k,
                   float top_p, bool* done, const int64_t* eos, int64_t E, int64_t pad, int64_t step, int64_t N,
                   int64_t* out_ids, bool* out_mask, float* out_logp, float* out_sample_logp, int64_t* tokens,
                   int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scaled(V);
    std::vector<uint64_t> order(V);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B; ++r) {
      float logp = 0.f, sample_logp = 0.f;
      int64_t token = pad;
      const bool was_done = done[r];
      if (!was_done) {
        token = sample_row(logits + r * V, uniform ? uniform + r * V : nullptr, V, temperature, top_k, top_p, scaled,
                           order, &logp, &sample_logp);
        for (int64_t e = 0; e < E; ++e) done[r] = done[r] || token == eos[e];
      }
      out_ids[r * N + step] = token;
      out_mask[r * N + step] = !was_done;
      out_logp[r * N + step] = logp;
      out_sample_logp[r * N + step] = sample_logp;
      tokens[r] = token;
    }
  }
}
}
