// bf16 weights x bf16 rows -> bf16, for the decode step's small row counts, on AVX2 + FMA CPUs
// (x86-64 without AVX512_BF16/AMX, where oneDNN and F.linear have no native bf16 kernel and run
// bf16 matmuls several times slower than fp32 ones).
//
// The weight [N, K] is repacked once (ffnskip/kernels.py) as [N/16, K, 16]: for each block of
// 16 output columns, its K input rows one after the other, so one thread streams one contiguous
// run of memory. bf16 -> fp32 is a 16-bit shift; products are summed in fp32 with FMA, the bias
// added in fp32 and the sum rounded once to bf16 (round to nearest even), the rounding points of
// F.linear's bf16 kernels; only the order of the fp32 additions differs from theirs.
//
// Threads: at::parallel_for (torch's own OpenMP pool, no second pool), one contiguous range of
// column blocks per thread. Rows are taken 4 at a time with 16 columns (8 ymm sums), or 5..8 at a
// time 8 columns by 8 (the block's second half then comes from L1/L2: it is K * 32 bytes).
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#define FFNSKIP_OPS_SUFFIX avx2
#include "decode_ops.h"  // the step's small ops, registered with this library
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // output columns per packed block

inline __m256 load_bf16x8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

inline __m256i round_bf16_bits(__m256 v) {  // fp32 -> bf16 bits in the low 16 of each lane, round to nearest even, NaN kept quiet
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

inline void store_bf16x16(uint16_t* out, __m256 lo, __m256 hi) {
  const __m256i p = _mm256_packus_epi32(round_bf16_bits(lo), round_bf16_bits(hi));  // lanes [lo0-3 hi0-3 | lo4-7 hi4-7]
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(p, 0xD8));
}

inline void store_bf16x8(uint16_t* out, __m256 v) {
  const __m256i r = round_bf16_bits(v);
  const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), p);
}

struct Args {
  const float* x;  // [M, K] fp32 (the bf16 rows, widened once)
  int64_t K;
  const uint16_t* w;  // [N/16, K, 16]
  const uint16_t* bias;  // [N] or nullptr
  uint16_t* y;  // [M, N]
  int64_t N;
};

// Up to 4 rows, 16 columns per block; U independent sums per column vector hide the FMA latency
// when there are few rows (U * M * 2 ymm sums).
template <int M, int U>
void rows_16(const Args& a, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wb = a.w + nb * a.K * kBlock;
    __m256 s0[U][M], s1[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) { s0[u][m] = _mm256_setzero_ps(); s1[u][m] = _mm256_setzero_ps(); }
    int64_t k = 0;
    for (; k + U <= a.K; k += U) {
      for (int u = 0; u < U; ++u) {
        const __m256 w0 = load_bf16x8(wb + (k + u) * kBlock), w1 = load_bf16x8(wb + (k + u) * kBlock + 8);
        for (int m = 0; m < M; ++m) {
          const __m256 xb = _mm256_broadcast_ss(a.x + m * a.K + k + u);
          s0[u][m] = _mm256_fmadd_ps(w0, xb, s0[u][m]);
          s1[u][m] = _mm256_fmadd_ps(w1, xb, s1[u][m]);
        }
      }
    }
    for (; k < a.K; ++k) {
      const __m256 w0 = load_bf16x8(wb + k * kBlock), w1 = load_bf16x8(wb + k * kBlock + 8);
      for (int m = 0; m < M; ++m) {
        const __m256 xb = _mm256_broadcast_ss(a.x + m * a.K + k);
        s0[0][m] = _mm256_fmadd_ps(w0, xb, s0[0][m]);
        s1[0][m] = _mm256_fmadd_ps(w1, xb, s1[0][m]);
      }
    }
    const int64_t n0 = nb * kBlock;
    const __m256 b0 = a.bias ? load_bf16x8(a.bias + n0) : _mm256_setzero_ps();
    const __m256 b1 = a.bias ? load_bf16x8(a.bias + n0 + 8) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m256 t0 = s0[0][m], t1 = s1[0][m];
      for (int u = 1; u < U; ++u) { t0 = _mm256_add_ps(t0, s0[u][m]); t1 = _mm256_add_ps(t1, s1[u][m]); }
      store_bf16x16(a.y + m * a.N + n0, _mm256_add_ps(t0, b0), _mm256_add_ps(t1, b1));
    }
  }
}

// 5..8 rows: each block in two halves of 8 columns (M ymm sums each).
template <int M>
void rows_8(const Args& a, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* wb = a.w + nb * a.K * kBlock;
    for (int h = 0; h < 2; ++h) {
      __m256 s[M];
      for (int m = 0; m < M; ++m) s[m] = _mm256_setzero_ps();
      for (int64_t k = 0; k < a.K; ++k) {
        const __m256 w = load_bf16x8(wb + k * kBlock + 8 * h);
        for (int m = 0; m < M; ++m) s[m] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(a.x + m * a.K + k), s[m]);
      }
      const int64_t n0 = nb * kBlock + 8 * h;
      const __m256 b = a.bias ? load_bf16x8(a.bias + n0) : _mm256_setzero_ps();
      for (int m = 0; m < M; ++m) store_bf16x8(a.y + m * a.N + n0, _mm256_add_ps(s[m], b));
    }
  }
}

using Kernel = void (*)(const Args&, int64_t, int64_t);
constexpr Kernel kKernels[8] = {rows_16<1, 4>, rows_16<2, 2>, rows_16<3, 1>, rows_16<4, 1>,
                                rows_8<5>,     rows_8<6>,     rows_8<7>,     rows_8<8>};

}  // namespace

// x [M, K] bf16 (rows contiguous), w packed [N/16, K, 16] bf16, bias [N] bf16 or None -> y [M, N] bf16.
// Any M: groups of up to 8 rows, each group streams the weight once.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_gemm runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be [M, K] bf16");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kBlock && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "w must be packed [N/16, K, 16] bf16 (ffnskip.kernels.pack)");
  const int64_t M = x.size(0), K = x.size(1), nblocks = w.size(0), N = nblocks * kBlock;
  TORCH_CHECK(K == w.size(1), "x has ", K, " inputs, the weight ", w.size(1));
  const uint16_t* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kBFloat16, "bias must be [N] bf16");
    b = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // [M, K] fp32: exact widening
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (nblocks + threads - 1) / threads);
  for (int64_t r0 = 0; r0 < M; r0 += 8) {
    const int64_t rows = std::min<int64_t>(8, M - r0);
    const Args a{xf.data_ptr<float>() + r0 * K, K, reinterpret_cast<const uint16_t*>(w.data_ptr()), b,
                 reinterpret_cast<uint16_t*>(y.data_ptr()) + r0 * N, N};
    const Kernel kern = kKernels[rows - 1];
    at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) { kern(a, b0, b1); });
  }
  return y;
}

// Registered as torch.ops.ffnskip.bf16_linear_avx2 (ffnskip/kernels.py loads the library); a
// fragment, so the AVX512_BF16 kernel's library can add its op to the same namespace.
TORCH_LIBRARY_FRAGMENT(ffnskip, m) {
  m.def("bf16_linear_avx2(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  FFNSKIP_OPS_DEF(m);
}

TORCH_LIBRARY_IMPL(ffnskip, CPU, m) {
  m.impl("bf16_linear_avx2", &linear);
  FFNSKIP_OPS_IMPL(m);
}
