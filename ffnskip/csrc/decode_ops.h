// The small ops of a decode step that ATen runs slowly on CPU, as one fused loop each, in bf16 and
// fp32: RMSNorm, RoPE with the K/V cache writes, argmax over the vocabulary, and a single-query
// attention (used in fp32; bf16 keeps SDPA, whose roundings transformers' bf16 tokens depend on).
// Included by both kernel libraries (bf16_linear_avx2.cpp, bf16_linear_avx512.cpp), each
// registering them under its own suffix (FFNSKIP_OPS_SUFFIX), so both can load in one process;
// AVX2 + FMA only, which both kinds of CPU execute. Compiled with -ffp-contract=off: no multiply
// and add below may fuse into one rounding, where ATen rounds twice.
//
// Measured on AMD EPYC Zen 4, SmolLM2-135M shapes, bf16: ATen's rms_norm path (to fp32, F.rms_norm,
// round, weight multiply) 25-28 us per call, this one 3-5 us (batch 1-8; 61 calls per step); argmax
// over 49152 logits 178 us (batch 1) to 717 us (batch 8), this one 6-27 us. fp32 on a 2-core Intel
// Xeon (AMX): ATen's F.rms_norm is seven ops, ~50 us per call with its dispatches; SDPA ~48 us a
// call inside a step, the attention here ~14-22 us.
//
// Rounding points are the ones of the ATen code they replace (fp32 math, bf16 where ATen rounds):
// * rms_norm: transformers' LlamaRMSNorm: fp32 x * 1/sqrt(mean(x^2) + eps), in bf16 rounded,
//   times the weight, rounded;
// * rope_cache: transformers' apply_rotary_pos_emb (each multiply and the add rounded to the dtype);
// * argmax: the first index of the largest value (a NaN counts as the largest, as in torch).
// Only the order of fp32 additions (and the exp polynomial's last bits) differ.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace ffnskip_ops {
namespace {  // each kernel library its own copy (they are compiled for different CPUs)

inline float bf16_to_float(uint16_t v) {
  uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet (c10::BFloat16's rounding)
  if (std::isnan(f)) return 0x7FC0;
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

inline __m256 load8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// The two element types: bf16 (held as uint16_t) and fp32; rnd<T> is the rounding ATen applies
// after an elementwise op in T (none in fp32).
inline float to_f(uint16_t v) { return bf16_to_float(v); }
inline float to_f(float v) { return v; }
template <typename T> inline T from_f(float f);
template <> inline uint16_t from_f<uint16_t>(float f) { return float_to_bf16(f); }
template <> inline float from_f<float>(float f) { return f; }
template <typename T> inline float rnd(float f) { return to_f(from_f<T>(f)); }

inline bool decode_dtype(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
inline float dot(const T* a, const T* b, int64_t d) {
  int64_t i = 0;
  __m256 s = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8) s = _mm256_fmadd_ps(load8(a + i), load8(b + i), s);
  float t = hsum(s);
  for (; i < d; ++i) t += to_f(a[i]) * to_f(b[i]);
  return t;
}

template <typename T>
at::Tensor rms_norm_as(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t A = x.size(0), G = x.size(1), D = x.size(2);
  at::Tensor y = at::empty({A, G, D}, x.options());
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  const int64_t sa = x.stride(0), sg = x.stride(1);
  const bool per_group = weight.dim() == 2;
  const int64_t rows = A * G;
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t a = r / G, g = r % G;
      const T* xr = xp + a * sa + g * sg;
      const T* wr = wp + (per_group ? g * D : 0);
      T* yr = yp + r * D;
      const float mean = dot(xr, xr, D) / static_cast<float>(D);
      const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = from_f<T>(to_f(wr[i]) * rnd<T>(to_f(xr[i]) * inv));
    }
  };
  if (rows * D < 32768) body(0, rows);  // a decode step's rows: one thread is faster than waking the pool
  else at::parallel_for(0, rows, 1, body);
  return y;
}

// x [A, G, D] bf16 or fp32 (last dim contiguous), weight [D] or [G, D] in x's dtype -> [A, G, D].
inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && decode_dtype(x) && x.dim() == 3 && x.stride(2) == 1,
              "rms_norm: x must be [A, G, D] bf16 or fp32 on CPU with a contiguous last dimension");
  const int64_t G = x.size(1), D = x.size(2);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                  ((weight.dim() == 1 && weight.size(0) == D) || (weight.dim() == 2 && weight.size(0) == G && weight.size(1) == D)),
              "rms_norm: weight must be [D] or [G, D] in x's dtype");
  return x.scalar_type() == at::kFloat ? rms_norm_as<float>(x, weight, eps) : rms_norm_as<uint16_t>(x, weight, eps);
}

template <typename T>
void rope_cache_as(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                   const at::Tensor& kc, const at::Tensor& vc, int64_t col, int64_t H, at::Tensor& q) {
  const int64_t B = qk.size(0), G = qk.size(1), hd = qk.size(2), Hkv = G - H, cap = kc.size(2);
  const auto* x = reinterpret_cast<const T*>(qk.data_ptr());
  const auto* vp = reinterpret_cast<const T*>(v.data_ptr());
  const auto* cp = reinterpret_cast<const T*>(cos.data_ptr());
  const auto* sp = reinterpret_cast<const T*>(sin.data_ptr());
  auto* qp = reinterpret_cast<T*>(q.data_ptr());
  auto* kcp = reinterpret_cast<T*>(kc.data_ptr());
  auto* vcp = reinterpret_cast<T*>(vc.data_ptr());
  const int64_t half = hd / 2;
  for (int64_t b = 0; b < B; ++b) {
    const T* cb = cp + b * hd;
    const T* sb = sp + b * hd;
    for (int64_t g = 0; g < G; ++g) {
      const T* xr = x + b * qk.stride(0) + g * qk.stride(1);
      T* out = g < H ? qp + (b * H + g) * hd : kcp + ((b * Hkv + (g - H)) * cap + col) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        const float rot = i < half ? -to_f(xr[i + half]) : to_f(xr[i - half]);  // rotate_half
        const float a = rnd<T>(to_f(xr[i]) * to_f(cb[i]));
        const float r = rnd<T>(rot * to_f(sb[i]));
        out[i] = from_f<T>(a + r);  // two products and a sum, each rounded (no fused multiply-add)
      }
    }
    for (int64_t g = 0; g < Hkv; ++g)
      std::memcpy(vcp + ((b * Hkv + g) * cap + col) * hd, vp + b * v.stride(0) + g * v.stride(1), hd * sizeof(T));
  }
}

// RoPE on the step's q and k heads and the K/V cache writes, as transformers' apply_rotary_pos_emb:
// (x * cos) + (rotate_half(x) * sin), each multiply and the add rounded to the dtype (ATen's
// elementwise ops: fp32 math, one rounding each), so the same bits as those seven ops.
// qk [B, H + Hkv, hd] (last dim contiguous), v [B, Hkv, hd] (last dim contiguous), cos, sin [B, hd]
// contiguous, caches [B, Hkv, capacity, hd], all bf16 or all fp32: column ``col`` gets the rotated
// k and v; returns the rotated q [B, H, hd].
inline at::Tensor rope_cache(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& kc, const at::Tensor& vc, int64_t col, int64_t H) {
  TORCH_CHECK(qk.device().is_cpu() && decode_dtype(qk) && qk.dim() == 3 && qk.stride(2) == 1,
              "rope_cache: qk must be [B, H + Hkv, hd] bf16 or fp32 on CPU with a contiguous last dimension");
  const auto dt = qk.scalar_type();
  const int64_t B = qk.size(0), G = qk.size(1), hd = qk.size(2), Hkv = G - H;
  TORCH_CHECK(H > 0 && Hkv > 0 && hd % 2 == 0, "rope_cache: ", G, " heads of size ", hd, " do not split into ", H, " q heads and k heads");
  TORCH_CHECK(v.scalar_type() == dt && v.dim() == 3 && v.size(0) == B && v.size(1) == Hkv && v.size(2) == hd && v.stride(2) == 1,
              "rope_cache: v must be [B, Hkv, hd] in qk's dtype");
  TORCH_CHECK(cos.scalar_type() == dt && sin.scalar_type() == dt && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == B * hd && sin.numel() == B * hd,
              "rope_cache: cos and sin must be contiguous [B, hd] in qk's dtype");
  TORCH_CHECK(kc.scalar_type() == dt && vc.scalar_type() == dt && kc.is_contiguous() && vc.is_contiguous() &&
                  kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) == B && kc.size(1) == Hkv && kc.size(3) == hd,
              "rope_cache: the caches must be contiguous [B, Hkv, capacity, hd] in qk's dtype");
  const int64_t cap = kc.size(2);
  TORCH_CHECK(col >= 0 && col < cap, "rope_cache: column ", col, " of a ", cap, "-column cache");
  at::Tensor q = at::empty({B, H, hd}, qk.options());
  if (dt == at::kFloat) rope_cache_as<float>(qk, v, cos, sin, kc, vc, col, H, q);
  else rope_cache_as<uint16_t>(qk, v, cos, sin, kc, vc, col, H, q);
  return q;
}

// e^x for x <= 0 (8 lanes): Cephes' expf (x = n ln2 + r, a degree-5 polynomial in r, times 2^n),
// within 2 fp32 units; x below -87 gives ~1e-38, not 0 (callers zero masked lanes themselves).
inline __m256 exp_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

template <typename T>
void attend_as(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, int64_t n, const bool* mask, double scale,
               at::Tensor& o) {
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2), Hkv = kc.size(1), cap = kc.size(2), rep = H / Hkv;
  const auto* qp = reinterpret_cast<const T*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const T*>(kc.data_ptr());
  const auto* vp = reinterpret_cast<const T*>(vc.data_ptr());
  auto* op = reinterpret_cast<T*>(o.data_ptr());
  const float sc = static_cast<float>(scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  auto body = [&](int64_t t0, int64_t t1) {
    std::vector<float> p(n + 8);  // one head's scores, then weights; room for whole vectors
    std::vector<float> acc(hd);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, g = t % Hkv;
      const T* kb = kp + (b * Hkv + g) * cap * hd;  // [n, hd] of this K/V head
      const T* vb = vp + (b * Hkv + g) * cap * hd;
      const bool* mb = mask ? mask + b * n : nullptr;
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t h = g * rep + r;
        const T* qh = qp + (b * H + h) * hd;
        float m = ninf;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = (mb && !mb[j]) ? ninf : dot(qh, kb + j * hd, hd) * sc;
          m = std::max(m, p[j]);
        }
        std::fill(p.begin() + n, p.end(), ninf);  // the padding past n (the loop below wrote it last head)
        // softmax: e^(s - max), masked keys (and the padding past n, -inf) 0, and their sum
        __m256 vs = _mm256_setzero_ps();
        const __m256 vm = _mm256_set1_ps(m), vninf = _mm256_set1_ps(ninf);
        for (int64_t j = 0; j < n; j += 8) {
          const __m256 s = _mm256_loadu_ps(p.data() + j);
          const __m256 e = _mm256_and_ps(exp_neg(_mm256_sub_ps(s, vm)), _mm256_cmp_ps(s, vninf, _CMP_NEQ_OQ));
          _mm256_storeu_ps(p.data() + j, e);
          vs = _mm256_add_ps(vs, e);
        }
        const float inv = 1.0f / hsum(vs);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t jj = 0; jj < n; ++jj) {
          const float pj = rnd<T>(p[jj]);  // SDPA rounds the weights to bf16 for its P V product (the sum is unrounded)
          if (pj == 0.0f) continue;
          const __m256 w = _mm256_set1_ps(pj);
          const T* vr = vb + jj * hd;
          int64_t i = 0;
          for (; i + 8 <= hd; i += 8) _mm256_storeu_ps(acc.data() + i, _mm256_fmadd_ps(w, load8(vr + i), _mm256_loadu_ps(acc.data() + i)));
          for (; i < hd; ++i) acc[i] += pj * to_f(vr[i]);
        }
        T* oh = op + (b * H + h) * hd;
        for (int64_t i = 0; i < hd; ++i) oh[i] = from_f<T>(acc[i] * inv);
      }
    }
  };
  if (B * H * n * hd < (int64_t{1} << 18)) body(0, B * Hkv);  // a few heads and keys: one thread beats waking the pool
  else at::parallel_for(0, B * Hkv, 1, body);
}

// One query per row against the first n columns of the K/V cache, for every query head: softmax(q k^T *
// scale) v with the query heads grouped per K/V head (GQA), computed in fp32 (the output rounded
// once to the dtype). q [B, H, hd] contiguous, caches [B, Hkv, capacity, hd] contiguous in q's
// dtype, mask [B, n] bool (true: attend; a row needs one) or None -> [B, H, hd]. SDPA's math for one
// query (in bf16 with its rounding of the softmax weights to bf16 before they multiply v), in its
// own order of additions; replaces SDPA's ~50 us a call (its setup and thread
// wake-ups) at the step's few keys.
inline at::Tensor attend(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, int64_t n,
                         const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.device().is_cpu() && decode_dtype(q) && q.dim() == 3 && q.is_contiguous(),
              "attend: q must be a contiguous [B, H, hd] bf16 or fp32 CPU tensor");
  const int64_t B = q.size(0), H = q.size(1), hd = q.size(2);
  TORCH_CHECK(kc.scalar_type() == q.scalar_type() && vc.scalar_type() == q.scalar_type() && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) == B && kc.size(3) == hd &&
                  kc.size(1) > 0 && H % kc.size(1) == 0,
              "attend: the caches must be contiguous [B, Hkv, capacity, hd] in q's dtype, Hkv dividing H");
  TORCH_CHECK(n > 0 && n <= kc.size(2), "attend: ", n, " keys of a ", kc.size(2), "-column cache");
  const bool* mp = nullptr;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 && mask->size(0) == B &&
                    mask->size(1) == n,
                "attend: mask must be a contiguous [B, n] bool tensor");
    mp = mask->data_ptr<bool>();
  }
  at::Tensor o = at::empty({B, H, hd}, q.options());
  if (q.scalar_type() == at::kFloat) attend_as<float>(q, kc, vc, n, mp, scale, o);
  else attend_as<uint16_t>(q, kc, vc, n, mp, scale, o);
  return o;
}

template <typename T>
at::Tensor argmax_as(const at::Tensor& xc) {
  const int64_t B = xc.size(0), V = xc.size(1);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, V / 4096));  // segments per row
  const int64_t seg = (V + parts - 1) / parts;
  std::vector<float> best(B * parts);
  std::vector<int64_t> where(B * parts);
  const auto* xp = reinterpret_cast<const T*>(xc.data_ptr());
  at::parallel_for(0, B * parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / parts, lo = (t % parts) * seg, hi = std::min(V, lo + seg);
      const T* row = xp + b * V;
      float bv = -std::numeric_limits<float>::infinity();
      int64_t bi = lo;
      int64_t i = lo;
      // 8 lanes at a time: each lane's largest value and its first index; a block with a NaN ends the
      // vector part (the scalar loop below then finds the first NaN)
      __m256 vbest = _mm256_set1_ps(bv);
      __m256i vidx = _mm256_set1_epi32(0), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const bool wide = hi - lo < (int64_t{1} << 30);
      int64_t vec_end = lo;
      if (wide) {
        for (; i + 8 <= hi; i += 8) {
          const __m256 f = load8(row + i);
          if (_mm256_movemask_ps(_mm256_cmp_ps(f, f, _CMP_UNORD_Q))) break;
          const __m256 gt = _mm256_cmp_ps(f, vbest, _CMP_GT_OQ);
          vbest = _mm256_blendv_ps(vbest, f, gt);
          vidx = _mm256_blendv_epi8(vidx, _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(i - lo))), _mm256_castps_si256(gt));
        }
        vec_end = i;
        alignas(32) float lv[8];
        alignas(32) int32_t li[8];
        _mm256_store_ps(lv, vbest);
        _mm256_store_si256(reinterpret_cast<__m256i*>(li), vidx);
        for (int k = 0; k < 8; ++k)  // the largest lane; on a tie the lower index
          if (lv[k] > bv || (lv[k] == bv && lo + li[k] < bi && lv[k] != -std::numeric_limits<float>::infinity())) {
            bv = lv[k];
            bi = lo + li[k];
          }
      }
      for (i = vec_end; i < hi; ++i) {
        const float f = to_f(row[i]);
        if (std::isnan(f)) { bv = f; bi = i; break; }
        if (f > bv) { bv = f; bi = i; }
      }
      best[t] = bv;
      where[t] = bi;
    }
  });
  at::Tensor out = at::empty({B}, xc.options().dtype(at::kLong));
  auto* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t bi = where[b * parts];
    float bv = best[b * parts];
    for (int64_t p = 1; p < parts && !std::isnan(bv); ++p) {
      const float f = best[b * parts + p];
      if (std::isnan(f) || f > bv) { bv = f; bi = where[b * parts + p]; }
    }
    o[b] = bi;
  }
  return out;
}

// x [B, V] bf16 or fp32 -> [B] int64: the first index of each row's largest value (a NaN: the first NaN).
inline at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && decode_dtype(x) && x.dim() == 2 && x.size(1) > 0,
              "argmax: x must be [B, V] bf16 or fp32 on CPU with V > 0");
  const at::Tensor xc = x.contiguous();
  return xc.scalar_type() == at::kFloat ? argmax_as<float>(xc) : argmax_as<uint16_t>(xc);
}

}  // namespace
}  // namespace ffnskip_ops

#define FFNSKIP_OPS_CAT2(a, b) a##b
#define FFNSKIP_OPS_CAT(a, b) FFNSKIP_OPS_CAT2(a, b)
#define FFNSKIP_OPS_STR2(a) #a
#define FFNSKIP_OPS_STR(a) FFNSKIP_OPS_STR2(a)

// In a TORCH_LIBRARY_FRAGMENT(ffnskip, m) block / TORCH_LIBRARY_IMPL(ffnskip, CPU, m) block.
#define FFNSKIP_OPS_DEF(m)                                                                                              \
  m.def("rms_norm_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX) "(Tensor x, Tensor weight, float eps) -> Tensor");       \
  m.def("rope_cache_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX)                                                         \
        "(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int col, int H) -> Tensor"); \
  m.def("argmax_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX) "(Tensor x) -> Tensor");                                  \
  m.def("attend_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX) "(Tensor q, Tensor k_cache, Tensor v_cache, int n, Tensor? mask, float scale) -> Tensor")
#define FFNSKIP_OPS_IMPL(m)                                                                                             \
  m.impl("rms_norm_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX), &ffnskip_ops::rms_norm);                                \
  m.impl("rope_cache_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX), &ffnskip_ops::rope_cache);                            \
  m.impl("argmax_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX), &ffnskip_ops::argmax);                                   \
  m.impl("attend_" FFNSKIP_OPS_STR(FFNSKIP_OPS_SUFFIX), &ffnskip_ops::attend)
