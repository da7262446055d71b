// The fast engine's CPU decode step: attention, RMSNorm, SiLU gating, float32 projections and sampling for
// one new token per row, each one OpenMP region over rows, (row, KV head) pairs or weight tiles. Plain C++
// with no torch headers, built and loaded by cpu_kernels.py. Compiled with -ffast-math: no code here forms
// an infinity or compares a NaN where the result could index memory (masked scores are the lowest finite
// float; token order is an integer key).
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

// Asks for the `D` elements at `row` to be brought into the L2 cache (prefetcht1), one request per 64-byte line.
template <typename T>
static inline void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < D * static_cast<int64_t>(sizeof(T)); offset += 64)
    __builtin_prefetch(bytes + offset, 0, 2);
}

// One (row, KV head) pair: G queries q [G, D] (float, pre-scaled) against L keys and values (rows l * stride).
// Masked columns are never read: they score `lowest`, so exp() gives exactly 0 and no infinity is formed.
// HEAD_DIM > 0 fixes D at compile time (fully unrolled inner loops); 0 takes it from `head_dim`.
// next_k, next_v: the keys and values of the pair computed next (same strides), prefetched row by row as this
// pair's are read: the cache streams from memory, and the hardware prefetcher alone leaves the loads waiting
// on it (benchmarks/rollout_profile.py, float32, one thread: 0.40 s of attention per call without, 0.18 s with).
template <typename T, int64_t HEAD_DIM>
static void attend_pair(const float* __restrict q, const T* __restrict k, const T* __restrict v,
                        const bool* __restrict valid, T* __restrict out, int64_t G, int64_t L, int64_t head_dim,
                        int64_t k_l, int64_t v_l, float* __restrict scores, float* __restrict acc, const T* next_k,
                        const T* next_v) {
  const int64_t D = HEAD_DIM > 0 ? HEAD_DIM : head_dim;
  for (int64_t l = 0; l < L; ++l) {
    prefetch_row(next_k + l * k_l, D);
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
    prefetch_row(next_v + l * v_l, D);
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
      const int64_t b = pair / H, h = pair % H, next = std::min(pair + 1, B * H - 1);
      const int64_t nb = next / H, nh = next % H;
      for (int64_t i = 0; i < G * D; ++i) query[i] = to_float(q[pair * G * D + i]) * scale;
      attend_pair<T, HEAD_DIM>(query.data(), k + b * k_b + h * k_h, v + b * v_b + h * v_h, valid + b * valid_b,
                               out + pair * G * D, G, L, D, k_l, v_l, scores.data(), acc.data(),
                               k + nb * k_b + nh * k_h, v + nb * v_b + nh * v_h);
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
      const int64_t b = pair / H;
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
      const int64_t next = std::min(pair + 1, B * H - 1) * cache_len * D;
      attend_pair<T, HEAD_DIM>(query.data(), keys, values, valid + b * cache_len, out + pair * G * D, G, L, D, D, D,
                               scores.data(), acc.data(), cache_k + next, cache_v + next);
    }
  }
}

// One row: x [n] ← round(x + delta) (if delta is given), then row [n] ← RMSNorm(x) · w.
template <typename T>
static void add_rms_norm_row(T* __restrict x, const T* __restrict delta, const T* __restrict w, int64_t n, float eps,
                             float* __restrict row) {
  for (int64_t i = 0; i < n; ++i) {
    row[i] = delta ? rounded<T>(to_float(x[i]) + to_float(delta[i])) : to_float(x[i]);
    if (delta) store(row[i], x + i);
  }
  rms_norm(row, w, n, eps);
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
      add_rms_norm_row(x + r * n, delta ? delta + r * n : nullptr, w, n, eps, row.data());
      for (int64_t i = 0; i < n; ++i) store(row[i], out + r * n + i);
    }
  }
}

// HF's SiLU, x · sigmoid(x), with exp's argument capped so that it never overflows.
static inline float silu(float x) { return x / (1.f + std::exp(std::min(-x, 80.f))); }

// gate [n] ← round(round(silu(gate)) · up): HF's act_fn(gate_proj(x)) * up_proj(x).
template <typename T>
static void silu_mul(T* gate, const T* up, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    store(rounded<T>(silu(to_float(gate[i]))) * to_float(up[i]), gate + i);
  }
}

// Decode-step projections, float32. A decode step multiplies each weight by only B rows, so it is read
// once, where it is (nn.Linear's [N, K]: it changes with every optimiser step, so nothing packs it); the B
// rows are packed instead, transposed to xt [K, BP] with BP = B rounded up to 16. A tile of kTileRows
// weight rows × a chunk of up to kChunk packed rows keeps kTileRows · chunk / 16 vector sums in registers
// (one broadcast weight per chunk / 16 FMAs) and stores them as rows of yt [N, BP]; a last pass transposes
// yt to y [B, N] and adds the bias. Sums run over k in order, one float32 FMA chain per output.
constexpr int64_t kTileRows = 6;
#if defined(__AVX512F__)
constexpr int64_t kChunk = 64;
#else
constexpr int64_t kChunk = 16;
#endif

template <int NR, int MB>
static void weight_tile(const float* __restrict xt, int64_t BP, const float* __restrict w, int64_t K,
                        float* __restrict yt, int64_t n0, int64_t m0) {
  float acc[NR][MB] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict xk = xt + k * BP + m0;
    for (int i = 0; i < NR; ++i) {
      const float wk = w[(n0 + i) * K + k];
#pragma omp simd
      for (int j = 0; j < MB; ++j) acc[i][j] += wk * xk[j];
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < MB; ++j) yt[(n0 + i) * BP + m0 + j] = acc[i][j];
}

using WeightTile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t);

template <int NR>
static WeightTile weight_tile_for_chunk(int64_t chunk) {
  switch (chunk) {
#if defined(__AVX512F__)
    case 64: return weight_tile<NR, 64>;
    case 48: return weight_tile<NR, 48>;
    case 32: return weight_tile<NR, 32>;
#endif
    default: return weight_tile<NR, 16>;
  }
}

static WeightTile weight_tile_for(int64_t rows, int64_t chunk) {
  switch (rows) {
    case 1: return weight_tile_for_chunk<1>(chunk);
    case 2: return weight_tile_for_chunk<2>(chunk);
    case 3: return weight_tile_for_chunk<3>(chunk);
    case 4: return weight_tile_for_chunk<4>(chunk);
    case 5: return weight_tile_for_chunk<5>(chunk);
    default: return weight_tile_for_chunk<6>(chunk);
  }
}

// Call from inside a parallel region. xt [K, BP] ← x [M, K] transposed, rows M..BP−1 zero.
static void pack_rows(const float* __restrict x, int64_t M, int64_t K, int64_t BP, float* __restrict xt) {
#pragma omp for schedule(static)
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, K - k0);
    for (int64_t m = 0; m < BP; ++m)
      for (int64_t k = 0; k < kn; ++k) xt[(k0 + k) * BP + m] = m < M ? x[m * K + k0 + k] : 0.f;
  }
}

// Call from inside a parallel region. x [M, K] ← x + delta (if delta is given), then xt [K, BP] ← RMSNorm(x) ·
// norm transposed, rows M..BP−1 zero: add_rms_norm's arithmetic, its result written packed.
static void pack_normed_rows(float* __restrict x, const float* __restrict delta, const float* __restrict norm,
                             float eps, int64_t M, int64_t K, int64_t BP, float* __restrict xt) {
  std::vector<float> row(K);
#pragma omp for schedule(static)
  for (int64_t m = 0; m < BP; ++m) {
    if (m < M) add_rms_norm_row(x + m * K, delta ? delta + m * K : nullptr, norm, K, eps, row.data());
    for (int64_t k = 0; k < K; ++k) xt[k * BP + m] = m < M ? row[k] : 0.f;
  }
}

// Call from inside a parallel region: pack_normed_rows with a norm, else pack_rows.
static void pack_input(float* x, const float* delta, const float* norm, float eps, int64_t M, int64_t K, int64_t BP,
                       float* xt) {
  if (norm) pack_normed_rows(x, delta, norm, eps, M, K, BP, xt);
  else pack_rows(x, M, K, BP, xt);
}

// Call from inside a parallel region. yts[c] [Ns[c], BP] ← ws[c] [Ns[c], K] · xt [K, BP] for c < count,
// the tiles of all weights shared out in one loop.
static void weight_tiles(const float* xt, int64_t M, int64_t K, int64_t BP, int64_t count, const float* const* ws,
                         const int64_t* Ns, float* const* yts) {
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const auto tiles = [&](int64_t c) { return (Ns[c] + kTileRows - 1) / kTileRows * chunks; };
  int64_t total = 0;
  for (int64_t c = 0; c < count; ++c) total += tiles(c);
#pragma omp for schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    int64_t c = 0, tile = t;
    while (tile >= tiles(c)) tile -= tiles(c++);
    const int64_t n0 = tile / chunks * kTileRows, m0 = tile % chunks * kChunk;
    const int64_t rows = std::min(kTileRows, Ns[c] - n0), chunk = std::min(kChunk, (M - m0 + 15) / 16 * 16);
    weight_tile_for(rows, chunk)(xt, BP, ws[c], K, yts[c], n0, m0);
  }
}

// Call from inside a parallel region. y [M, N] ← yt [N, BP] transposed, plus bias [N] if given.
static void unpack_rows(const float* __restrict yt, const float* __restrict bias, int64_t M, int64_t N, int64_t BP,
                        float* __restrict y) {
#pragma omp for schedule(static)
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const int64_t nn = std::min<int64_t>(16, N - n0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < nn; ++n) y[m * N + n0 + n] = yt[(n0 + n) * BP + m] + (bias ? bias[n0 + n] : 0.f);
  }
}

// Scratch for one call, reused by the calling thread's later calls (it keeps the largest call's size).
static float* scratch_floats(int64_t count) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
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

// ys[c] [M, Ns[c]] ← h · ws[c]ᵀ + biases[c] (null: none) for c < count: projections of one input, h = x [M, K],
// or with a norm [K]: x ← x + delta (if given) in place and h = RMSNorm(x) · norm.
void linear_float32(float* x, const float* delta, const float* norm, float eps, int64_t M, int64_t K, int64_t count,
                    const float* const* ws, const float* const* biases, float* const* ys, const int64_t* Ns,
                    int threads) {
  const int64_t BP = (M + 15) / 16 * 16;
  int64_t outputs = 0;
  for (int64_t c = 0; c < count; ++c) outputs += Ns[c];
  float* xt = scratch_floats((K + outputs) * BP);
  std::vector<float*> yts(count);
  for (int64_t c = 0, row = K; c < count; row += Ns[c++]) yts[c] = xt + row * BP;
#pragma omp parallel num_threads(threads)
  {
    pack_input(x, delta, norm, eps, M, K, BP, xt);
    weight_tiles(xt, M, K, BP, count, ws, Ns, yts.data());
    for (int64_t c = 0; c < count; ++c) unpack_rows(yts[c], biases[c], M, Ns[c], BP, ys[c]);
  }
}

// out [M, H] ← down(silu(gate(h)) · up(h)) with h as in linear_float32 (x [M, H], norm [H]); gate, up: [I, H];
// down: [H, I]; biases [I], [I], [H] or null: HF's SiLU MLP, the gated activations never leaving packed form.
void gated_mlp_float32(float* x, const float* delta, const float* norm, float eps, int64_t M, int64_t H, int64_t I,
                       const float* gate, const float* up, const float* down, const float* gate_bias,
                       const float* up_bias, const float* down_bias, float* out, int threads) {
  const int64_t BP = (M + 15) / 16 * 16;
  float* xt = scratch_floats((2 * H + 2 * I) * BP);  // xt [H, BP], gated and up_t [I, BP], yt [H, BP]
  float* gated = xt + H * BP;
  float* up_t = gated + I * BP;
  float* yt = up_t + I * BP;
  const float* const ws[2] = {gate, up};
  float* const yts[2] = {gated, up_t};
  const int64_t Ns[2] = {I, I};
#pragma omp parallel num_threads(threads)
  {
    pack_input(x, delta, norm, eps, M, H, BP, xt);
    weight_tiles(xt, M, H, BP, 2, ws, Ns, yts);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t m = 0; m < BP; ++m) {
        const float g = gated[i * BP + m] + (gate_bias ? gate_bias[i] : 0.f);
        gated[i * BP + m] = silu(g) * (up_t[i * BP + m] + (up_bias ? up_bias[i] : 0.f));
      }
    }
    weight_tiles(gated, M, I, BP, 1, &down, &H, &yt);
    unpack_rows(yt, down_bias, M, H, BP, out);
  }
}

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
