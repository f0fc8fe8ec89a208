// bfloat16 convolution for XLA:CPU on processors with AVX512-BF16: an implicit GEMM (patches are
// read in place, never written out) with float32 accumulation and a fused epilogue (bias,
// residual, ReLU), rounded once to bfloat16.
//
// out[b, ho, wo, n] = act(bias[n] + sum_{i, j, c} x[b, ho*sh + i - pt, wo*sw + j - pl, c] *
// w[i, j, c, n] + residual[b, ho, wo, n]) (x zero outside the image; act: ReLU or identity).
// Output pixels m = (b, ho, wo) are taken kMr at a time; for each block of 16*NV output channels
// the kMr x 16*NV accumulators stay in registers over the whole reduction (kernel rows i, then
// the pairs of each row's kw*c contiguous values): one 32-bit broadcast of two input values per
// pixel and NV loads of the packed kernel feed kMr*NV vdpbf16ps. The kernel is repacked per call
// as [K/2][N][2] (pairs of reduction rows interleaved), the layout vdpbf16ps multiplies against a
// broadcast pair; the packing and the pixels are shared out on XLA's intra-op thread pool.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMr = 6;          // output pixels per register block
constexpr int64_t kChunk = 48;  // output pixels per task (a multiple of kMr)
constexpr int64_t kPackPairs = 64;  // kernel row pairs packed per task

struct Geometry {
  int64_t b, h, w, c, kh, kw, n, ho, wo, sh, sw, pt, pl;
  const float* bias;        // [n], added to the sums
  const uint16_t* residual;  // [b, ho, wo, n] bfloat16 added after the bias, or null
  bool relu;                // max(0, .) last
  // One kernel row: kw pixels of c channels, contiguous in x, read as pairs; an odd count gets
  // one more value (the next pixel's, or a zero at the image's edge), multiplied by a zero row
  // of the kernel: exact for finite activations.
  int64_t values() const { return kw * c; }
  int64_t span() const { return values() + values() % 2; }
};

// Rows [m, m + MR) x channels [n0, n0 + 16 NV): accumulate over every kernel row i and the
// span of kw*c values it covers (row[i * kMr + r] points at row r's span).
template <int MR, int NV>
inline void Block(const Geometry& g, const uint16_t* const* row, const uint16_t* wp, int64_t m,
                  int64_t n0, uint16_t* out) {
  __m512 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 bias = _mm512_loadu_ps(g.bias + n0 + 16 * v);
    for (int r = 0; r < MR; ++r) acc[r][v] = bias;
  }
  const int64_t ldw = g.n * 2, span = g.span();  // packed kernel: a row pair holds n pairs
  for (int64_t i = 0; i < g.kh; ++i) {
    const uint16_t* wt = wp + (i * span / 2) * ldw + n0 * 2;
    const uint16_t* const* ri = row + i * kMr;
    for (int64_t kk = 0; kk < span; kk += 2) {
      const uint16_t* wc = wt + (kk / 2) * ldw;
      __m512bh bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(wc + 32 * v);
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, ri[r] + kk, 4);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bv[v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t at = (m + r) * g.n + n0 + 16 * v;
      __m512 y = acc[r][v];
      if (g.residual != nullptr) {
        const __m256i res = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.residual + at));
        y = _mm512_add_ps(y, _mm512_cvtpbh_ps((__m256bh)res));
      }
      if (g.relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

// Points row[i * kMr + r] at kernel row i's span for output pixel m + r (r < mr). A span is read
// in place when it lies inside the image; at the borders it is copied to `edge` with zeros
// where it leaves the image.
inline void Spans(const Geometry& g, const uint16_t* x, const uint16_t* zeros, int64_t m, int mr,
                  const uint16_t** row, uint16_t* edge) {
  const int64_t span = g.span();
  for (int r = 0; r < mr; ++r) {
    const int64_t mm = m + r, wo = mm % g.wo, t = mm / g.wo, ho = t % g.ho, b = t / g.ho;
    const int64_t w0 = wo * g.sw - g.pl;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t hi = ho * g.sh - g.pt + i;
      const uint16_t*& p = row[i * kMr + r];
      if (hi < 0 || hi >= g.h) {
        p = zeros;
        continue;
      }
      const uint16_t* line = x + (b * g.h + hi) * g.w * g.c;
      // in place when the window row lies in the image (with the value after it, if odd)
      if (w0 >= 0 && w0 + g.kw + (span - g.values()) <= g.w) {
        p = line + w0 * g.c;
        continue;
      }
      uint16_t* e = edge + (i * kMr + r) * span;
      e[span - 1] = 0;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t wi = w0 + j;
        if (wi >= 0 && wi < g.w) {
          std::memcpy(e + j * g.c, line + wi * g.c, g.c * 2);
        } else {
          std::memset(e + j * g.c, 0, g.c * 2);
        }
      }
      p = e;
    }
  }
}

template <int NV>
inline void Blocks(const Geometry& g, int mr, const uint16_t* const* row, const uint16_t* wp,
                   int64_t m, int64_t n0, uint16_t* out) {
  switch (mr) {
    case 6: Block<6, NV>(g, row, wp, m, n0, out); break;
    case 5: Block<5, NV>(g, row, wp, m, n0, out); break;
    case 4: Block<4, NV>(g, row, wp, m, n0, out); break;
    case 3: Block<3, NV>(g, row, wp, m, n0, out); break;
    case 2: Block<2, NV>(g, row, wp, m, n0, out); break;
    default: Block<1, NV>(g, row, wp, m, n0, out); break;
  }
}

// Kernel rows 2p and 2p+1 of w [K, N], for p in [first, last), interleaved into wp [K/2][N][2].
inline void Pack(const uint16_t* w, int64_t n, int64_t first, int64_t last, uint16_t* wp) {
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  for (int64_t p = first; p < last; ++p) {
    const uint16_t *even = w + 2 * p * n, *odd = even + n;
    uint16_t* dst = wp + 2 * p * n;
    for (int64_t c = 0; c < n; c += 16) {
      const __m512i both = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + c)), 1);
      _mm512_storeu_si512(dst + 2 * c, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// Everything the workers share, on the heap: a task XLA's pool starts after the call returned
// (all work was taken by then) still finds it alive.
struct Job {
  Geometry g;
  const uint16_t* x;
  const uint16_t* w;
  uint16_t* out;
  std::vector<uint16_t> wp, zeros;
  int64_t rows, chunks, pairs, pack_tasks;
  std::atomic<int64_t> next_pack{0}, packed{0}, next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  // Packs kernel rows, then (once every worker's packing is done) takes chunks of output
  // pixels until none is left.
  void Work() {
    for (int64_t t; (t = next_pack.fetch_add(1)) < pack_tasks;) {
      Pack(w, g.n, t * kPackPairs, std::min(pairs, (t + 1) * kPackPairs), wp.data());
      packed.fetch_add(1);
    }
    while (packed.load() < pack_tasks) _mm_pause();
    // A chunk's spans are found once; then each block of output channels sweeps the chunk, so
    // its packed kernel columns stay in the cache while kChunk pixels use them.
    const int64_t blocks_per_chunk = kChunk / kMr, per_block = g.kh * kMr;
    std::vector<const uint16_t*> row(blocks_per_chunk * per_block);
    std::vector<uint16_t> edge(blocks_per_chunk * per_block * g.span());
    for (int64_t ch; (ch = next.fetch_add(1)) < chunks;) {
      const int64_t first = ch * kChunk, last = std::min(rows, first + kChunk);
      for (int64_t m = first, bl = 0; m < last; m += kMr, ++bl) {
        Spans(g, x, zeros.data(), m, std::min<int64_t>(kMr, last - m), row.data() + bl * per_block,
              edge.data() + bl * per_block * g.span());
      }
      int64_t n0 = 0;
      for (; n0 + 64 <= g.n; n0 += 64) {
        for (int64_t m = first, bl = 0; m < last; m += kMr, ++bl) {
          const int mr = std::min<int64_t>(kMr, last - m);
          Blocks<4>(g, mr, row.data() + bl * per_block, wp.data(), m, n0, out);
        }
      }
      for (; n0 + 16 <= g.n; n0 += 16) {
        for (int64_t m = first, bl = 0; m < last; m += kMr, ++bl) {
          const int mr = std::min<int64_t>(kMr, last - m);
          Blocks<1>(g, mr, row.data() + bl * per_block, wp.data(), m, n0, out);
        }
      }
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

ffi::Error ConvBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::BF16> residual,
                        ffi::ResultBuffer<ffi::BF16> out, int64_t kw, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pl, int64_t relu, int64_t threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  const int64_t span = xd.size() == 4 ? kw * xd[3] + (kw * xd[3]) % 2 : -1;
  if (xd.size() != 4 || wd.size() != 3 || od.size() != 4 || wd[1] != span || od[0] != xd[0] ||
      od[3] != wd[2] || wd[2] % 16 || kw < 1 || sh < 1 || sw < 1 || pt < 0 || pl < 0 ||
      bias.element_count() != wd[2] ||
      (residual.element_count() != 0 && residual.element_count() != out->element_count())) {
    return ffi::Error::InvalidArgument(
        "conv_bf16: expected x [B, H, W, C], w [kh, kw * C (+1 if odd), N] (N a multiple of "
        "16), bias [N], residual [B, Ho, Wo, N] or empty, out [B, Ho, Wo, N], strides >= 1, "
        "pads >= 0");
  }
  auto job = std::make_shared<Job>();
  const uint16_t* res = residual.element_count() == 0
                            ? nullptr
                            : reinterpret_cast<const uint16_t*>(residual.typed_data());
  job->g = Geometry{xd[0], xd[1], xd[2], xd[3], wd[0], kw, wd[2], od[1], od[2],
                    sh,    sw,    pt,    pl,    bias.typed_data(), res, relu != 0};
  const Geometry& g = job->g;
  job->x = reinterpret_cast<const uint16_t*>(x.typed_data());
  job->out = reinterpret_cast<uint16_t*>(out->typed_data());
  job->w = reinterpret_cast<const uint16_t*>(w.typed_data());
  job->wp.resize(g.kh * g.span() * g.n);
  job->pairs = g.kh * g.span() / 2;
  job->pack_tasks = (job->pairs + kPackPairs - 1) / kPackPairs;
  job->zeros.assign(g.span(), 0);
  job->rows = g.b * g.ho * g.wo;
  job->chunks = (job->rows + kChunk - 1) / kChunk;
  // Helpers run on XLA's own intra-op pool (threads of a second pool would fight its spinning
  // workers for the cores); the caller works too, so the call finishes even if none starts.
  const int64_t helpers = std::min<int64_t>({threads, pool.num_threads() + 1, job->chunks}) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->all_done.wait(lock, [&] { return job->done.load() == job->chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBf16, ConvBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));
