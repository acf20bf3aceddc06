// bf16 weights x bf16 rows -> bf16, for the decode step's small row counts, on x86-64 CPUs with
// AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later).
//
// The weight [N, K] is repacked once (ffnskip/kernels.py, pack_avx512) as [N/16, P, 16, 2] with
// P = ceil(K / 2) input pairs (an odd K is padded with a zero input): for each block of 16 output
// columns, pair p holds (w[n, 2p], w[n, 2p + 1]) for its 16 columns n, so one 64-byte load feeds
// one VDPBF16PS, which adds the two products of a pair into 16 fp32 sums. bf16 x bf16 products are
// exact in fp32; the sums are fp32 (the instruction flushes denormal inputs and sums to zero, values
// below 1.2e-38 that a linear's output never depends on in practice). The bias is added in fp32 and
// each output rounded once to bf16 (round to nearest even, NaN kept quiet), F.linear's rounding
// points; only the order of the fp32 additions differs from F.linear's.
//
// Threads: at::parallel_for (torch's own OpenMP pool), one contiguous range of column blocks per
// thread. Rows are taken up to 16 at a time (one zmm sum per row); with few rows, U independent sums
// per row over consecutive pairs hide the instruction's latency.
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#define FFNSKIP_OPS_SUFFIX avx512bf16
#include "decode_ops.h"  // the step's small ops, registered with this library
#include <immintrin.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 16;  // output columns per packed block
constexpr int kMaxRows = 16;    // rows per pass over the weight

inline __m512 load_bf16x16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (exact)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store_bf16x16(uint16_t* out, __m512 v) {  // fp32 -> bf16, round to nearest even, NaN kept quiet
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}

struct Args {
  const uint32_t* x;  // [M, P]: the bf16 rows as input pairs
  int64_t P;
  const uint32_t* w;  // [N/16, P, 16] pairs
  const uint16_t* bias;  // [N] or nullptr
  uint16_t* y;  // [M, N]
  int64_t N;
};

template <int M, int U>
void rows(const Args& a, int64_t nb0, int64_t nb1) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint32_t* wb = a.w + nb * a.P * kBlock;
    __m512 s[U][M];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < M; ++m) s[u][m] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + U <= a.P; p += U) {
      for (int u = 0; u < U; ++u) {
        const __m512bh w = (__m512bh)_mm512_loadu_si512(wb + (p + u) * kBlock);
        for (int m = 0; m < M; ++m)
          s[u][m] = _mm512_dpbf16_ps(s[u][m], w, (__m512bh)_mm512_set1_epi32(static_cast<int>(a.x[m * a.P + p + u])));
      }
    }
    for (; p < a.P; ++p) {
      const __m512bh w = (__m512bh)_mm512_loadu_si512(wb + p * kBlock);
      for (int m = 0; m < M; ++m)
        s[0][m] = _mm512_dpbf16_ps(s[0][m], w, (__m512bh)_mm512_set1_epi32(static_cast<int>(a.x[m * a.P + p])));
    }
    const int64_t n0 = nb * kBlock;
    const __m512 b = a.bias ? load_bf16x16(a.bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) {
      __m512 t = s[0][m];
      for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, s[u][m]);
      store_bf16x16(a.y + m * a.N + n0, _mm512_add_ps(t, b));
    }
  }
}

using Kernel = void (*)(const Args&, int64_t, int64_t);
constexpr Kernel kKernels[kMaxRows] = {
    rows<1, 4>,  rows<2, 4>,  rows<3, 2>,  rows<4, 2>,  rows<5, 1>,  rows<6, 1>,  rows<7, 1>,  rows<8, 1>,
    rows<9, 1>,  rows<10, 1>, rows<11, 1>, rows<12, 1>, rows<13, 1>, rows<14, 1>, rows<15, 1>, rows<16, 1>};

}  // namespace

// x [M, K] bf16, w packed [N/16, ceil(K/2), 16, 2] bf16, bias [N] bf16 or None -> y [M, N] bf16.
// Any M: groups of up to 16 rows, each group streams the weight once.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_linear_avx512 runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be [M, K] bf16");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kBlock && w.size(3) == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "w must be packed [N/16, ceil(K/2), 16, 2] bf16 (ffnskip.kernels.pack_avx512)");
  const int64_t M = x.size(0), K = x.size(1), nblocks = w.size(0), P = w.size(1), N = nblocks * kBlock;
  TORCH_CHECK((K + 1) / 2 == P, "x has ", K, " inputs, the weight ", 2 * P, " (or ", 2 * P - 1, ")");
  const uint16_t* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kBFloat16, "bias must be [N] bf16");
    b = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  at::Tensor xp = x.contiguous();  // [M, K]
  if (K % 2) xp = at::constant_pad_nd(xp, {0, 1});  // [M, 2P]: the pad input meets the packed zero
  const auto* xw = reinterpret_cast<const uint32_t*>(xp.data_ptr());  // [M, P] pairs
  const auto* ww = reinterpret_cast<const uint32_t*>(w.data_ptr());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (nblocks + threads - 1) / threads);
  auto* yw = reinterpret_cast<uint16_t*>(y.data_ptr());
  // Row groups inside the block loop: a block's weight (P * 64 bytes) is read from memory once and
  // from L1/L2 by the block's other row groups.
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
        const int64_t rows_here = std::min<int64_t>(kMaxRows, M - r0);
        const Args a{xw + r0 * P, P, ww, b, yw + r0 * N, N};
        kKernels[rows_here - 1](a, nb, nb + 1);
      }
  });
  return y;
}

// torch.ops.ffnskip.bf16_linear_avx512 (ffnskip/kernels.py loads the library); a fragment, so the
// AVX2 kernel's library can add its op to the same namespace in the same process.
TORCH_LIBRARY_FRAGMENT(ffnskip, m) {
  m.def("bf16_linear_avx512(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  FFNSKIP_OPS_DEF(m);
}

TORCH_LIBRARY_IMPL(ffnskip, CPU, m) {
  m.impl("bf16_linear_avx512", &linear);
  FFNSKIP_OPS_IMPL(m);
}
