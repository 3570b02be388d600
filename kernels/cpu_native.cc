// Native CPU kernels for the adder similarity and its backward rules, as XLA FFI custom calls.
//
// The three "pseudo-matmuls" of kernels/adder_pallas.py (the rules of addervit_jax/adder/rules.py),
// float32 in and out (the Python wrapper casts bfloat16), with u = x * e, the input after the
// stretch E, formed while the kernel packs x:
//
//   AddervitForward          y[l, d]  = -sum_i |u[l, i] - w[i, d]|
//   AddervitXGrad            du[l, i] =  sum_d g[l, d] * s(w[i, d] - u[l, i])
//   AddervitWGradExact       dw[i, d] =  sum_l g[l, d] * sign(u[l, i] - w[i, d])
//
// with s = sign (rule 0, "exact") or hardtanh(c * .) (rule 1: c = 1 "addernet", c = clip_scale
// "clipped"). sign is 0 at 0, like jnp.sign.
//
// Each is computed like a GEMM: out[p, q] = sum_k term(A[p, k], B[k, q], S[p, q]). B holds q in
// the SIMD lanes and is packed once into contiguous panels W = C * kLanes wide; A is packed per
// job and block (R values of a column contiguous, x * e formed here) and broadcast one scalar at
// a time; S is per-output state kept in registers (u for dL/du, w for dL/dw). A register tile of
// R rows x C vectors of the output accumulates a block of KC reduction steps while that block of
// the B panel stays in L1. Every term is three vector instructions (forward: sub, and with the
// abs mask, sub; gradients: sub, sign or clip, fma) where a matmul needs one fma: measured on
// Sapphire Rapids, 0.49-0.52 ns per 16 terms against 0.18 ns for an fma, so about 2.7-2.9x a
// matmul at equal efficiency. (sum |u - w| = 2 sum max(u, w) - sum u - sum w would take two
// instructions, but cancels catastrophically when u and w share a large offset: not used.)
//
// Jobs (a chunk of rows x a group of panels) are spread over XLA's intra-op thread pool, one
// thread per core (or $ADDERVIT_CPU_THREADS); each output element is summed in the same order by
// whichever thread owns it, so results do not depend on the thread count.
//
// Built by kernels/cpu_native.py with -O3 -march=native on the user's machine. The AVX-512 path
// uses vfixupimmps for sign and vrangeps for hardtanh (one instruction each); other targets use
// GCC vector extensions that the compiler maps to their SIMD registers.

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifndef ADDERVIT_ONEDNN
#define ADDERVIT_ONEDNN 0
#endif
#if ADDERVIT_ONEDNN
#include <map>
#include <tuple>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define ADDERVIT_AVX512 1
#else
#define ADDERVIT_AVX512 0
#endif

namespace ffi = xla::ffi;

namespace {

#define ADDERVIT_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// SIMD vocabulary
// ---------------------------------------------------------------------------------------------

#if ADDERVIT_AVX512
constexpr int kLanes = 16;
using vf = __m512;
ADDERVIT_INLINE vf vbroadcast(float a) { return _mm512_set1_ps(a); }
ADDERVIT_INLINE vf vzero() { return _mm512_setzero_ps(); }
ADDERVIT_INLINE vf vload(const float* p) { return _mm512_loadu_ps(p); }
ADDERVIT_INLINE void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
ADDERVIT_INLINE vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
ADDERVIT_INLINE vf vabs(vf z) { return _mm512_abs_ps(z); }
ADDERVIT_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// sign(z) by class: QNaN/SNaN -> QNaN(z), zero -> +0, +1 -> +1, -inf -> -1, +inf -> +1,
// negative -> -1, positive -> +1 (one nibble per class, tokens of the Intel SDM's VFIXUPIMMPS).
ADDERVIT_INLINE vf vsign(vf z) {
  return _mm512_fixupimm_ps(z, z, _mm512_set1_epi32(0xA9A9A822), 0);
}
ADDERVIT_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
// hardtanh(z) = clip(z, -1, 1) for finite or infinite z: of z and 1 the one with the smaller
// magnitude, with z's sign (VRANGEPS imm 0b0010: absolute minimum, sign of the first operand).
// It returns 1 for a NaN z, so it is used only where z cannot be NaN.
ADDERVIT_INLINE vf vclip1(vf z) { return _mm512_range_ps(z, _mm512_set1_ps(1.0f), 0x2); }
// clip(z, -1, 1) that keeps NaN, like jnp.clip: VMAXPS/VMINPS return their second operand when
// either is NaN.
ADDERVIT_INLINE vf vclip1_nan(vf z) {
  return _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), z));
}
#else
constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(float))));
typedef float vf_unaligned __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));
ADDERVIT_INLINE vf vbroadcast(float a) { return vf{} + a; }
ADDERVIT_INLINE vf vzero() { return vf{}; }
ADDERVIT_INLINE vf vload(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
ADDERVIT_INLINE void vstore(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
ADDERVIT_INLINE vf vsub(vf a, vf b) { return a - b; }
ADDERVIT_INLINE vf vabs(vf z) { return (vf)((vi)z & 0x7fffffff); }
ADDERVIT_INLINE vf vfma(vf a, vf b, vf c) { return a * b + c; }
ADDERVIT_INLINE vf vmul(vf a, vf b) { return a * b; }
ADDERVIT_INLINE vf vsign(vf z) {
  const vf one = vbroadcast(1.0f), minus_one = vbroadcast(-1.0f);
  return z > 0 ? one : (z < 0 ? minus_one : z);  // z itself at +-0 and NaN
}
ADDERVIT_INLINE vf vclip1(vf z) {
  const vf one = vbroadcast(1.0f), minus_one = vbroadcast(-1.0f);
  return z > one ? one : (z < minus_one ? minus_one : z);  // NaN stays NaN
}
ADDERVIT_INLINE vf vclip1_nan(vf z) { return vclip1(z); }
#endif

// ---------------------------------------------------------------------------------------------
// Terms: acc += term(a, b, s) for a broadcast A value, a B vector and the state vector. NaN and
// infinities give what the jnp formulas give (sign and |.| keep NaN; see XGradClipTerm).
// ---------------------------------------------------------------------------------------------

struct ForwardTerm {  // a = u[l, i], b = w[i, d]: y -= |w - u|
  static constexpr bool kState = false;
  ADDERVIT_INLINE vf step(vf acc, vf a, vf b, vf) const { return vsub(acc, vabs(vsub(b, a))); }
};

struct XGradSignTerm {  // a = g[l, d], b = w[i, d], s = u[l, i]: du += g * sign(w - u)
  static constexpr bool kState = true;
  ADDERVIT_INLINE vf step(vf acc, vf a, vf b, vf s) const {
    return vfma(a, vsign(vsub(b, s)), acc);
  }
};

// a = g[l, d], b = c * w[i, d], s = c * u[l, i]: du += g * clip(b - s). Used when every b and s
// is finite, so b - s is never NaN (and equals c * (w - u) up to rounding, exactly for a
// power-of-two c): three instructions a term.
struct XGradClipTerm {
  static constexpr bool kState = true;
  ADDERVIT_INLINE vf step(vf acc, vf a, vf b, vf s) const {
    return vfma(a, vclip1(vsub(b, s)), acc);
  }
};

// a = g[l, d], b = w[i, d], s = u[l, i]: du += g * clip(c * (b - s)), the formula as written,
// NaN kept: for inputs with a NaN or an infinity (five instructions a term).
struct XGradClipFormulaTerm {
  static constexpr bool kState = true;
  vf c;
  ADDERVIT_INLINE vf step(vf acc, vf a, vf b, vf s) const {
    return vfma(a, vclip1_nan(vmul(c, vsub(b, s))), acc);
  }
};

struct WGradSignTerm {  // a = u[l, i], b = g[l, d], s = w[i, d]: dw += g * sign(u - w)
  static constexpr bool kState = true;
  ADDERVIT_INLINE vf step(vf acc, vf a, vf b, vf s) const {
    return vfma(b, vsign(vsub(a, s)), acc);
  }
};

// Register tiles (R rows x C vectors) and reduction blocks (KC steps, PC rows per job):
// ADDERVIT_TILES = forward R, C, KC, PC, then the gradients' R, C, KC, PC (-D to tune). The
// AVX-512 path has 32 registers: R*C accumulators, R*C state vectors (gradients), C B vectors
// and temporaries, with no spills (checked in the disassembly). A KC x W block of a B panel stays
// in the 48 KB L1 with the packed A rows beside it. Measured A/B in one process on Sapphire
// Rapids: gradient tiles 4x3, 3x4 and 6x2 and KC from 64 to 256 are within 3% of each other;
// packing A and grouping panels (below) were worth 10-25%.
#if ADDERVIT_AVX512
#define ADDERVIT_DEFAULT_TILES 6, 4, 96, 96, 4, 3, 128, 96
#else
#define ADDERVIT_DEFAULT_TILES 4, 2, 128, 96, 3, 2, 128, 96
#endif
#ifndef ADDERVIT_TILES
#define ADDERVIT_TILES ADDERVIT_DEFAULT_TILES
#endif
constexpr int kTiles[] = {ADDERVIT_TILES};
#ifndef ADDERVIT_L2_BUDGET
#define ADDERVIT_L2_BUDGET (1 << 19)
#endif

template <class Term>
struct Tiling {  // the gradient kernels
  static constexpr int R = kTiles[4], C = kTiles[5], KC = kTiles[6], PC = kTiles[7];
};
template <>
struct Tiling<ForwardTerm> {
  static constexpr int R = kTiles[0], C = kTiles[1], KC = kTiles[2], PC = kTiles[3];
};

// One register tile: T[r, :] (+)= sum over kc steps of term(A[k, r], B[k, :], S[r, :]), with A
// and B packed ([k][R] and [k][W]) so that both stream through contiguous memory.
template <class Term, int R, int C>
__attribute__((noinline)) void micro_tile(const Term term, long kc, const float* __restrict A,
                                          const float* __restrict B,
                                          const float* __restrict S, long ls,
                                          float* __restrict T, bool first) {
  constexpr int W = C * kLanes;
  vf acc[R][C];
  vf st[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = first ? vzero() : vload(T + r * W + c * kLanes);
      if constexpr (Term::kState) st[r][c] = vload(S + r * ls + c * kLanes);
    }
  }
  for (long k = 0; k < kc; ++k) {
    vf b[C];
    for (int c = 0; c < C; ++c) b[c] = vload(B + k * W + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const vf a = vbroadcast(A[k * R + r]);
      for (int c = 0; c < C; ++c) acc[r][c] = term.step(acc[r][c], a, b[c], st[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) vstore(T + r * W + c * kLanes, acc[r][c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Threads: jobs handed out one at a time to the caller and to tasks on XLA's thread pool
// ---------------------------------------------------------------------------------------------

int max_threads_from_env() {
  static const int value = [] {
    const char* env = std::getenv("ADDERVIT_CPU_THREADS");
    int n = env ? std::atoi(env) : 0;
    return n > 0 ? n : 0;
  }();
  return value;
}

struct Jobs {
  std::atomic<long> next{0};
  std::atomic<long> done{0};
  long count = 0;
  std::function<void(long)> body;
  std::mutex mu;
  std::condition_variable finished;

  void work() {
    for (long i; (i = next.fetch_add(1)) < count;) {
      body(i);
      if (done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(mu);
        finished.notify_all();
      }
    }
  }
};

// Runs body(0..count-1). The caller works too and only waits for jobs that another thread has
// claimed (and is running), so a pool that runs tasks late, or never, cannot stall it; a task
// that starts after the end finds no job left and returns (it owns a reference to `jobs`).
// Set on a thread that runs one problem of a batch (BatchedForwardImpl): the batch is what the
// threads share, so each problem's own jobs run inline.
thread_local bool tl_serial = false;

void parallel_for(ffi::ThreadPool& pool, long count, std::function<void(long)> body) {
  if (count <= 0) return;
  if (tl_serial) {
    for (long i = 0; i < count; ++i) body(i);
    return;
  }
  long threads = pool.num_threads();
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  if (int cap = max_threads_from_env()) threads = std::min<long>(threads, cap);
  threads = std::min(threads, count);
  if (threads <= 1) {
    for (long i = 0; i < count; ++i) body(i);
    return;
  }
  auto jobs = std::make_shared<Jobs>();
  jobs->count = count;
  jobs->body = std::move(body);
  for (long t = 1; t < threads; ++t) pool.Schedule([jobs] { jobs->work(); });
  jobs->work();
  std::unique_lock<std::mutex> lock(jobs->mu);
  jobs->finished.wait(lock, [&] { return jobs->done.load() == count; });
}

// 64-byte aligned scratch (operands packed for the kernels).
struct Scratch {
  float* data = nullptr;
  explicit Scratch(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    data = static_cast<float*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  }
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Per-thread scratch that outlives a call (the tasks run on XLA's long-lived pool threads).
float* thread_buffer(int which, size_t n) {
  thread_local std::vector<float> buffers[2];
  if (buffers[which].size() < n) buffers[which].resize(n);
  return buffers[which].data();
}

long ceil_div(long a, long b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// The pseudo-matmul driver
// ---------------------------------------------------------------------------------------------

// A[p, k] = src[p * sp + k * sk] * scale_p[p] * scale_k[k] (a null scale is 1): x * e for the
// forward (scale_k = e) and for dL/dw (transposed, scale_p = e), g for dL/du.
struct Operand {
  const float* src;
  long sp, sk;
  const float* scale_p;
  const float* scale_k;
};

struct Problem {
  long P, Q, K;    // out is P x Q, summed over K
  Operand A;       // read through pack_a
  const float* B;  // panels: B[j][k][W], zero-padded past Q
  const float* S;  // S[p, q] = S[p * ls + q]: rows padded to whole tiles, ls to whole panels
  long ls;
  float* out;      // out[p, q] = out[p * Q + q]
};

// Packs A[p0 : p0 + rows, k0 : k0 + kc] as tiles of R rows, [tile][k][r], zero rows past P.
template <int R>
void pack_a(const Operand& A, long P, long p0, long rows, long k0, long kc, float* dst) {
  for (long t = 0; t < rows; t += R) {
    float* d = dst + t * kc;
    for (int r = 0; r < R; ++r) {
      const long p = p0 + t + r;
      if (p >= P) {
        for (long k = 0; k < kc; ++k) d[k * R + r] = 0.0f;
        continue;
      }
      const float sp = A.scale_p ? A.scale_p[p] : 1.0f;
      const float* src = A.src + p * A.sp + k0 * A.sk;
      const float* sk = A.scale_k ? A.scale_k + k0 : nullptr;
      if (A.scale_p) {
        for (long k = 0; k < kc; ++k) d[k * R + r] = src[k * A.sk] * sp;
      } else if (sk) {
        for (long k = 0; k < kc; ++k) d[k * R + r] = src[k * A.sk] * sk[k];
      } else {
        for (long k = 0; k < kc; ++k) d[k * R + r] = src[k * A.sk];
      }
    }
  }
}

// Jobs: a chunk of PC output rows x a group of panels. In a job, each block of KC steps of A
// (packed, PC x KC) meets every panel of the group in turn, and each KC x W block of a panel
// (L1) meets every register tile of the chunk; the accumulators of the job (PC x W per panel)
// stay in L2 between blocks. Panels are split into groups only as far as needed for enough jobs
// to keep every thread busy.
template <class Term>
void pseudo_matmul(ffi::ThreadPool& pool, const Problem& pr, const Term term = Term()) {
  using Tile = Tiling<Term>;
  constexpr int R = Tile::R, C = Tile::C;
  constexpr long W = C * kLanes, KC = Tile::KC, PC = Tile::PC, kMinJobs = 16;
  static_assert(PC % R == 0, "a chunk is whole register tiles");
  const long panels = ceil_div(pr.Q, W), chunks = ceil_div(pr.P, PC);
  // A group's accumulators (and states) take at most a quarter of a 2 MB L2 (measured best).
  const long group_bytes = PC * W * sizeof(float) * (Term::kState ? 2 : 1);
  const long max_per_group = std::max<long>(1, ADDERVIT_L2_BUDGET / group_bytes);
  const long per_group = std::min(
      max_per_group, ceil_div(panels, std::min(panels, ceil_div(kMinJobs, chunks))));
  const long groups = ceil_div(panels, per_group);
  parallel_for(pool, chunks * groups, [&](long job) {
    const long p0 = (job / groups) * PC, p1 = std::min(pr.P, p0 + PC);
    const long rows = ceil_div(p1 - p0, R) * R;
    const long j0 = (job % groups) * per_group, j1 = std::min(panels, j0 + per_group);
    float* T = thread_buffer(0, PC * W * per_group);  // [j - j0][p - p0][W]
    float* A = thread_buffer(1, PC * KC);
    for (long k0 = 0; k0 < pr.K; k0 += KC) {
      const long kc = std::min(KC, pr.K - k0);
      pack_a<R>(pr.A, pr.P, p0, rows, k0, kc, A);
      for (long j = j0; j < j1; ++j) {
        const float* B = pr.B + (j * pr.K + k0) * W;
        float* Tj = T + (j - j0) * PC * W;
        for (long t = 0; t < rows; t += R) {
          const float* S = Term::kState ? pr.S + (p0 + t) * pr.ls + j * W : nullptr;
          micro_tile<Term, R, C>(term, kc, A + t * kc, B, S, pr.ls, Tj + t * W, k0 == 0);
        }
      }
    }
    for (long j = j0; j < j1; ++j) {
      const long q0 = j * W, width = std::min(W, pr.Q - q0);
      const float* Tj = T + (j - j0) * PC * W;
      for (long p = p0; p < p1; ++p) {
        std::memcpy(pr.out + p * pr.Q + q0, Tj + (p - p0) * W, width * sizeof(float));
      }
    }
  });
}

// Packs src (K x Q, row stride ld, times `scale`) into W-wide panels B[j][k][W], zero-padded.
void pack_panels(ffi::ThreadPool& pool, const float* src, long K, long Q, long ld, float scale,
                 long W, float* B) {
  const long panels = ceil_div(Q, W), kblock = 256, kblocks = ceil_div(K, kblock);
  parallel_for(pool, panels * kblocks, [&](long job) {
    const long j = job / kblocks, k0 = (job % kblocks) * kblock, k1 = std::min(K, k0 + kblock);
    const long q0 = j * W, width = std::min(W, Q - q0);
    for (long k = k0; k < k1; ++k) {
      float* dst = B + (j * K + k) * W;
      const float* row = src + k * ld + q0;
      for (long q = 0; q < width; ++q) dst[q] = row[q] * scale;
      for (long q = width; q < W; ++q) dst[q] = 0.0f;
    }
  });
}

// Packs the transpose of src (Q x K, row stride ld, times `scale`) into panels B[j][k][W]:
// B[j][k][q] = scale * src[j * W + q, k].
void pack_panels_transposed(ffi::ThreadPool& pool, const float* src, long K, long Q, long ld,
                            float scale, long W, float* B) {
  const long panels = ceil_div(Q, W);
  parallel_for(pool, panels, [&](long j) {
    float* dst = B + j * K * W;
    const long q0 = j * W, width = std::min(W, Q - q0);
    if (width < W) std::memset(dst, 0, K * W * sizeof(float));
    for (long q = 0; q < width; ++q) {
      const float* row = src + (q0 + q) * ld;
      for (long k = 0; k < K; ++k) dst[k * W + q] = row[k] * scale;
    }
  });
}

// The state S: S[p, q] = src[p, q] * e[q] * scale (e null: 1) for p < rows, q < cols, zero up
// to padded_rows x ld. The product x * e is rounded to float32 before the scale, as jnp computes
// (x * e) * c.
void pack_state(ffi::ThreadPool& pool, const float* src, const float* e, long rows, long cols,
                float scale, long padded_rows, long ld, float* S) {
  const long block = 64;
  parallel_for(pool, ceil_div(padded_rows, block), [&](long job) {
    const long p1 = std::min(padded_rows, (job + 1) * block);
    for (long p = job * block; p < p1; ++p) {
      float* dst = S + p * ld;
      const float* row = src + p * cols;
      long q = 0;
      if (p < rows && e) {
        for (; q < cols; ++q) dst[q] = (row[q] * e[q]) * scale;
      } else if (p < rows) {
        for (; q < cols; ++q) dst[q] = row[q] * scale;
      }
      for (; q < ld; ++q) dst[q] = 0.0f;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// FFI handlers
// ---------------------------------------------------------------------------------------------

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error out_of_memory(const char* op) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string(op) + ": out of memory for the packed operands");
}

std::string shape_of(const F32& b) {
  std::string s = "(";
  auto dims = b.dimensions();
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

// Checks x (L, Din), w (Din, Dout), e (Din,), optionally g (L, Dout); returns L, Din, Dout.
ffi::Error check_operands(const char* op, const F32& x, const F32& w, const F32& e, const F32* g,
                          long& L, long& Din, long& Dout) {
  auto fail = [&](const char* what) {
    std::string msg = std::string(op) + ": " + what + " (x " + shape_of(x) + ", w " +
                      shape_of(w) + ", e " + shape_of(e);
    if (g) msg += ", g " + shape_of(*g);
    return ffi::Error::InvalidArgument(msg + ")");
  };
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2 || e.dimensions().size() != 1) {
    return fail("expected x (L, D_in), w (D_in, D_out), e (D_in,)");
  }
  L = x.dimensions()[0];
  Din = x.dimensions()[1];
  Dout = w.dimensions()[1];
  if (w.dimensions()[0] != Din || e.dimensions()[0] != Din) return fail("D_in mismatch");
  if (g && (g->dimensions().size() != 2 || g->dimensions()[0] != L ||
            g->dimensions()[1] != Dout)) {
    return fail("g must be (L, D_out)");
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, F32 x, F32 w, F32 e, ffi::ResultBuffer<ffi::F32> y) {
  long L = 0, Din = 0, Dout = 0;
  if (auto err = check_operands("adder forward", x, w, e, nullptr, L, Din, Dout); !err.success()) {
    return err;
  }
  float* out = y->typed_data();
  if (L * Dout == 0) return ffi::Error::Success();
  if (Din == 0) {
    std::fill(out, out + L * Dout, 0.0f);
    return ffi::Error::Success();
  }
  constexpr long W = Tiling<ForwardTerm>::C * kLanes;
  Scratch B(ceil_div(Dout, W) * W * Din);
  if (!B.data) return out_of_memory("adder forward");
  pack_panels(pool, w.typed_data(), Din, Dout, Dout, 1.0f, W, B.data);
  // A[l, i] = x[l, i] * e[i]
  Problem pr{L, Dout, Din, {x.typed_data(), Din, 1, nullptr, e.typed_data()}, B.data, nullptr, 0,
             out};
  pseudo_matmul<ForwardTerm>(pool, pr);
  return ffi::Error::Success();
}

// A batch of forwards, y[b] = -sum_i |x[b, l, i] * e[b, i] - w[b, i, d]|, each problem on one
// thread and the batch spread over the pool: for many small problems (the L1 attention scores of
// every example and head) one call instead of one per problem, whose own jobs would be too small
// to share.
ffi::Error BatchedForwardImpl(ffi::ThreadPool pool, F32 x, F32 w, F32 e,
                              ffi::ResultBuffer<ffi::F32> y) {
  auto dx = x.dimensions(), dw = w.dimensions(), de = e.dimensions();
  if (dx.size() != 3 || dw.size() != 3 || de.size() != 2 || dw[0] != dx[0] || de[0] != dx[0] ||
      dw[1] != dx[2] || de[1] != dx[2]) {
    return ffi::Error::InvalidArgument(
        "adder batched forward: expected x (B, L, D_in), w (B, D_in, D_out), e (B, D_in), got x " +
        shape_of(x) + ", w " + shape_of(w) + ", e " + shape_of(e));
  }
  const long batch = dx[0], L = dx[1], Din = dx[2], Dout = dw[2];
  float* out = y->typed_data();
  if (batch * L * Dout == 0) return ffi::Error::Success();
  if (Din == 0) {
    std::fill(out, out + batch * L * Dout, 0.0f);
    return ffi::Error::Success();
  }
  constexpr long W = Tiling<ForwardTerm>::C * kLanes;
  std::atomic<bool> failed{false};
  parallel_for(pool, batch, [&](long b) {
    tl_serial = true;
    Scratch B(ceil_div(Dout, W) * W * Din);
    if (!B.data) {
      failed = true;
    } else {
      const float* xb = x.typed_data() + b * L * Din;
      const float* eb = e.typed_data() + b * Din;
      pack_panels(pool, w.typed_data() + b * Din * Dout, Din, Dout, Dout, 1.0f, W, B.data);
      Problem pr{L, Dout, Din, {xb, Din, 1, nullptr, eb}, B.data, nullptr, 0, out + b * L * Dout};
      pseudo_matmul<ForwardTerm>(pool, pr);
    }
    tl_serial = false;
  });
  return failed ? out_of_memory("adder batched forward") : ffi::Error::Success();
}

// Whether every value of p[0 : n] is finite.
bool all_finite(ffi::ThreadPool& pool, const float* p, long n) {
  const long block = 1 << 16;
  std::atomic<bool> finite{true};
  parallel_for(pool, ceil_div(n, block), [&](long job) {
    uint32_t worst = 0;  // the largest exponent field: 0xff for an infinity or NaN
    for (long i = job * block, end = std::min(n, i + block); i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, p + i, sizeof(bits));
      worst = std::max(worst, bits & 0x7f800000u);
    }
    if (worst == 0x7f800000u) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// rule 0 (sign), or rule 1 (hardtanh(c * .)) with its fast term when the scaled operands are all
// finite and the formula term otherwise.
ffi::Error x_grad(ffi::ThreadPool& pool, const F32& x, const F32& w, const F32& g, const F32& e,
                  long L, long Din, long Dout, int rule, float c, float* out) {
  using Tile = Tiling<XGradSignTerm>;  // the same tiles for every gradient term
  static_assert(Tiling<XGradClipTerm>::C == Tile::C && Tiling<XGradClipTerm>::R == Tile::R);
  constexpr long W = Tile::C * kLanes, R = Tile::R;
  const long ld = ceil_div(Din, W) * W, padded = ceil_div(L, R) * R;
  Scratch u(padded * ld), B(ld * Dout);
  if (!u.data || !B.data) return out_of_memory("adder x_grad");
  // S = u[l, i] = x * e, B = w^T: scaled by c for the fast clip term
  const float scale = rule == 1 ? c : 1.0f;
  auto pack = [&](float scale) {
    pack_state(pool, x.typed_data(), e.typed_data(), L, Din, scale, padded, ld, u.data);
    pack_panels_transposed(pool, w.typed_data(), Dout, Din, Dout, scale, W, B.data);
  };
  pack(scale);
  Problem pr{L, Din, Dout, {g.typed_data(), Dout, 1, nullptr, nullptr}, B.data, u.data, ld, out};
  if (rule == 0) {
    pseudo_matmul<XGradSignTerm>(pool, pr);
  } else if (all_finite(pool, u.data, padded * ld) && all_finite(pool, B.data, ld * Dout)) {
    pseudo_matmul<XGradClipTerm>(pool, pr);
  } else {
    if (scale != 1.0f) pack(1.0f);
    pseudo_matmul<XGradClipFormulaTerm>(pool, pr, XGradClipFormulaTerm{vbroadcast(c)});
  }
  return ffi::Error::Success();
}

ffi::Error XGradImpl(ffi::ThreadPool pool, F32 x, F32 w, F32 g, F32 e,
                     ffi::ResultBuffer<ffi::F32> du, int32_t rule, float clip_scale) {
  long L = 0, Din = 0, Dout = 0;
  if (auto err = check_operands("adder x_grad", x, w, e, &g, L, Din, Dout); !err.success()) {
    return err;
  }
  if (rule != 0 && rule != 1) {
    return ffi::Error::InvalidArgument("adder x_grad: rule must be 0 (sign) or 1 (clip)");
  }
  float* out = du->typed_data();
  if (L * Din == 0) return ffi::Error::Success();
  if (Dout == 0) {
    std::fill(out, out + L * Din, 0.0f);
    return ffi::Error::Success();
  }
  return x_grad(pool, x, w, g, e, L, Din, Dout, rule, clip_scale, out);
}

ffi::Error WGradExactImpl(ffi::ThreadPool pool, F32 x, F32 w, F32 g, F32 e,
                          ffi::ResultBuffer<ffi::F32> dw) {
  long L = 0, Din = 0, Dout = 0;
  if (auto err = check_operands("adder w_grad_exact", x, w, e, &g, L, Din, Dout); !err.success()) {
    return err;
  }
  float* out = dw->typed_data();
  if (Din * Dout == 0) return ffi::Error::Success();
  if (L == 0) {
    std::fill(out, out + Din * Dout, 0.0f);
    return ffi::Error::Success();
  }
  constexpr long W = Tiling<WGradSignTerm>::C * kLanes, R = Tiling<WGradSignTerm>::R;
  const long ld = ceil_div(Dout, W) * W, padded = ceil_div(Din, R) * R;
  // g in panels: read in place, its rows (Dout apart) map to few L1 sets: 15% slower (measured)
  Scratch wp(padded * ld), B(ld * L);
  if (!wp.data || !B.data) return out_of_memory("adder w_grad_exact");
  pack_panels(pool, g.typed_data(), L, Dout, Dout, 1.0f, W, B.data);
  pack_state(pool, w.typed_data(), nullptr, Din, Dout, 1.0f, padded, ld, wp.data);
  // A[i, l] = x[l, i] * e[i]
  Problem pr{Din, Dout, L, {x.typed_data(), 1, Din, e.typed_data(), nullptr}, B.data, wp.data, ld,
             out};
  pseudo_matmul<WGradSignTerm>(pool, pr);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// The 8-bit sum of absolute differences: out[l, n] = sum_k |a[l, k] - b[k, n]| for uint8 a, b
// ---------------------------------------------------------------------------------------------
//
// The int8 adder layer (addervit_jax/adder/quantized.py) codes u = E * x and W with one scale
// and one offset per layer, so |u - w| is a difference of codes and the whole sum is integer.
// x86's PSADBW sums |a - b| over the 8 byte pairs of each 64-bit lane: with 8 consecutive k of
// one row of a broadcast to every lane and, in lane c, the same 8 k of column c of b, one
// VPSADBW on a zmm register adds 64 terms (8 columns x 8 k) and one VPADDQ accumulates them:
// two instructions per 64 terms on two different ports, where float32 needs four FMAs. The
// packing that puts 8 k of a column into one lane is done once per call (b, K x N bytes).
//
// kGroup columns share a vector (8 with AVX-512BW, 4 with AVX2's ymm PSADBW; the portable path
// uses the AVX-512 layout with scalar code). A register tile is R rows x C vectors; lanes hold
// 64-bit sums (at most 8 * 255 per instruction) that are narrowed to int32 when a block of
// k-steps ends. K is padded to whole 8-byte steps with zeros in both a and b (|0 - 0| = 0).

#if defined(__AVX512BW__) && defined(__AVX512F__)
constexpr int kGroup = 8;
using vq = __m512i;
ADDERVIT_INLINE vq q_zero() { return _mm512_setzero_si512(); }
ADDERVIT_INLINE vq q_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
ADDERVIT_INLINE vq q_broadcast(const uint64_t* p) { return _mm512_set1_epi64(*p); }
ADDERVIT_INLINE vq q_sad_add(vq acc, vq a, vq b) {
  return _mm512_add_epi64(acc, _mm512_sad_epu8(a, b));
}
// A pair of vectors holds 2 kGroup columns, even ones in the first and odd ones in the second, so
// that their 32-bit sums interleave into consecutive int32 with a shift and an or (port 0),
// sparing port 5 (where PSADBW runs) the narrowing VPMOVQD of each vector.
ADDERVIT_INLINE void q_load_pair(const int32_t* p, vq& even, vq& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_and_si512(v, _mm512_set1_epi64(0xffffffff));
  odd = _mm512_srli_epi64(v, 32);
}
ADDERVIT_INLINE void q_store_pair(int32_t* p, vq even, vq odd, bool negate) {
  const __m512i v = _mm512_or_si512(even, _mm512_slli_epi64(odd, 32));
  _mm512_storeu_si512(p, negate ? _mm512_sub_epi32(_mm512_setzero_si512(), v) : v);
}
#define ADDERVIT_SAD_PATH "avx512bw"
#define ADDERVIT_SAD_TILES 6, 4
#elif defined(__AVX2__)
constexpr int kGroup = 4;
using vq = __m256i;
ADDERVIT_INLINE vq q_zero() { return _mm256_setzero_si256(); }
ADDERVIT_INLINE vq q_load(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
ADDERVIT_INLINE vq q_broadcast(const uint64_t* p) {
  return _mm256_set1_epi64x(static_cast<long long>(*p));
}
ADDERVIT_INLINE vq q_sad_add(vq acc, vq a, vq b) {
  return _mm256_add_epi64(acc, _mm256_sad_epu8(a, b));
}
ADDERVIT_INLINE void q_load_pair(const int32_t* p, vq& even, vq& odd) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_and_si256(v, _mm256_set1_epi64x(0xffffffff));
  odd = _mm256_srli_epi64(v, 32);
}
ADDERVIT_INLINE void q_store_pair(int32_t* p, vq even, vq odd, bool negate) {
  const __m256i v = _mm256_or_si256(even, _mm256_slli_epi64(odd, 32));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      negate ? _mm256_sub_epi32(_mm256_setzero_si256(), v) : v);
}
#define ADDERVIT_SAD_PATH "avx2"
#define ADDERVIT_SAD_TILES 6, 2
#else
constexpr int kGroup = 8;
struct vq {
  uint64_t lane[kGroup];
};
ADDERVIT_INLINE vq q_zero() { return vq{}; }
ADDERVIT_INLINE vq q_load(const uint8_t* p) {
  vq v;
  std::memcpy(v.lane, p, sizeof(v.lane));
  return v;
}
ADDERVIT_INLINE vq q_broadcast(const uint64_t* p) {
  vq v;
  for (int c = 0; c < kGroup; ++c) v.lane[c] = *p;
  return v;
}
ADDERVIT_INLINE vq q_sad_add(vq acc, vq a, vq b) {
  for (int c = 0; c < kGroup; ++c) {
    uint8_t x[8], y[8];
    std::memcpy(x, &a.lane[c], 8);
    std::memcpy(y, &b.lane[c], 8);
    for (int s = 0; s < 8; ++s) acc.lane[c] += x[s] > y[s] ? x[s] - y[s] : y[s] - x[s];
  }
  return acc;
}
ADDERVIT_INLINE void q_load_pair(const int32_t* p, vq& even, vq& odd) {
  for (int g = 0; g < kGroup; ++g) {
    even.lane[g] = static_cast<uint32_t>(p[2 * g]);
    odd.lane[g] = static_cast<uint32_t>(p[2 * g + 1]);
  }
}
ADDERVIT_INLINE void q_store_pair(int32_t* p, vq even, vq odd, bool negate) {
  const int32_t sign = negate ? -1 : 1;
  for (int g = 0; g < kGroup; ++g) {
    p[2 * g] = sign * static_cast<int32_t>(even.lane[g]);
    p[2 * g + 1] = sign * static_cast<int32_t>(odd.lane[g]);
  }
}
#define ADDERVIT_SAD_PATH "portable"
#define ADDERVIT_SAD_TILES 2, 2
#endif

// R rows x C vectors of output; KS 8-byte k-steps per block (a KS x C * 64-byte block of the B
// panel, 32 KB at the AVX-512 defaults, stays in L1); PC rows per job.
constexpr int kSadTiles[] = {ADDERVIT_SAD_TILES};
constexpr int kSadR = kSadTiles[0], kSadC = kSadTiles[1], kSadKS = 128, kSadPC = 96;
static_assert(kSadPC % kSadR == 0, "a chunk is whole register tiles");
static_assert(kSadC % 2 == 0, "vectors come in pairs (even and odd columns)");

// T[r * ldt + :W] (+)= sum over ks steps of SAD(A[k][r], B[k][:]): A packed [k][R] (8 bytes of
// a row per entry), B packed [k][C][kGroup][8 bytes] with the columns of a pair of vectors
// interleaved (q_store_pair).
__attribute__((noinline)) void sad_tile(long ks, const uint64_t* __restrict A,
                                        const uint8_t* __restrict B, int32_t* __restrict T,
                                        long ldt, bool first, bool negate = false) {
  constexpr int R = kSadR, C = kSadC, step = C * kGroup * 8;
  vq acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; c += 2) {
      if (first) {
        acc[r][c] = acc[r][c + 1] = q_zero();
      } else {
        q_load_pair(T + r * ldt + c * kGroup, acc[r][c], acc[r][c + 1]);
      }
    }
  }
  for (long k = 0; k < ks; ++k) {
    vq b[C];
    for (int c = 0; c < C; ++c) b[c] = q_load(B + k * step + c * kGroup * 8);
    for (int r = 0; r < R; ++r) {
      const vq a = q_broadcast(A + k * R + r);
      for (int c = 0; c < C; ++c) acc[r][c] = q_sad_add(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; c += 2) {
      q_store_pair(T + r * ldt + c * kGroup, acc[r][c], acc[r][c + 1], negate);
    }
  }
}

// 8 bytes of a from column 8 * step on, zero past K.
ADDERVIT_INLINE uint64_t sad_row_step(const uint8_t* row, long K, long step) {
  const long k0 = step * 8;
  uint64_t v = 0;
  if (k0 + 8 <= K) {
    std::memcpy(&v, row + k0, 8);
  } else if (k0 < K) {
    std::memcpy(&v, row + k0, K - k0);
  }
  return v;
}

// Where the rows of a come from. Codes: uint8 a (L, K) as given. Quantised: the int8 adder
// layer's input, coded here (one pass, no (L, K) code array): code = clamp(rint((x * e - low) /
// scale), 0, 255), in float32 as ops.int8_codes writes it (rint: half to even, like jnp.round);
// NaN gives code 0.
struct CodeRows {
  const uint8_t* a;
  long K;
  void operator()(long p, uint8_t* dst) const { std::memcpy(dst, a + p * K, K); }
};

struct QuantizedRows {
  const float *x, *e;
  float low, scale;
  long K;
  ADDERVIT_INLINE static uint8_t code(float v, float low, float scale) {
    float q = std::nearbyint((v - low) / scale);
    q = q >= 0.0f ? q : 0.0f;  // also NaN -> 0
    return static_cast<uint8_t>(std::min(q, 255.0f));
  }
  void operator()(long p, uint8_t* dst) const {
    const float* row = x + p * K;
    long k = 0;
#if ADDERVIT_AVX512
    // the same float32 operations, 16 at a time (VRNDSCALEPS: to nearest even, no exception)
    const __m512 vlow = _mm512_set1_ps(low), vscale = _mm512_set1_ps(scale);
    const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(255.0f);
    for (; k + kLanes <= K; k += kLanes) {
      const __m512 u = _mm512_mul_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(e + k));
      __m512 q = _mm512_div_ps(_mm512_sub_ps(u, vlow), vscale);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(q, zero), top);  // VMAXPS(NaN, 0) = 0
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
    }
#endif
    for (; k < K; ++k) dst[k] = code(row[k] * e[k], low, scale);
  }
};

// Where finished rows of sums go. Sums: int32 out[l, n]. Layer: the int8 adder layer's output
// mask * N(-scale * sums) + bias in float32, N a LayerNorm over the row without affine
// parameters (mean and variance in double) or the identity, as models.int8.Int8AdderDense computes it
// in XLA; each call gets whole rows.
struct SumsOut {
  static constexpr bool kDirect = true;  // whole tiles may be stored into out by sad_tile
  int32_t* out;
  long N;
  bool negate;  // -sums: the adder's sign, without a pass of XLA over the result
  void operator()(long p, long n0, long width, const int32_t* sums) const {
    int32_t* dst = out + p * N + n0;
    if (negate) {
      for (long n = 0; n < width; ++n) dst[n] = -sums[n];
    } else {
      std::memcpy(dst, sums, width * sizeof(int32_t));
    }
  }
};

struct LayerOut {
  static constexpr bool kDirect = false;
  float* out;
  long N;
  float scale;
  const float *mask, *bias;
  bool norm;
  float epsilon;
  void operator()(long p, long, long, const int32_t* sums) const {  // whole rows
    // y = -scale * s: its mean and variance from the exact integer moments of s
    float shift = 0.0f, factor = 1.0f;
    if (norm) {
      int64_t s1 = 0, s2 = 0;
      for (long n = 0; n < N; ++n) {
        s1 += sums[n];
        s2 += static_cast<int64_t>(sums[n]) * sums[n];
      }
      const double mean = static_cast<double>(s1) / N;
      const double variance = std::max(0.0, static_cast<double>(s2) / N - mean * mean);
      factor = static_cast<float>(1.0 / std::sqrt(double(scale) * scale * variance + epsilon));
      shift = static_cast<float>(-double(scale) * mean);
    }
    float* y = out + p * N;
    for (long n = 0; n < N; ++n) {
      y[n] = (-scale * static_cast<float>(sums[n]) - shift) * factor * mask[n] + bias[n];
    }
  }
};

// out rows = epilogue(sum_k |a[l, k] - b[k, n]|) with the rows of a from `rows`. Jobs are
// chunks of PC rows x groups of panels; `whole_rows` puts every panel in one group, so the
// epilogue sees whole rows (a LayerNorm needs them).
template <class Rows, class Epilogue>
ffi::Error sad_driver(ffi::ThreadPool& pool, const Rows& rows_of_a, const uint8_t* b, long L,
                      long K, long N, const Epilogue& epilogue, bool whole_rows) {
  constexpr long R = kSadR, W = kSadC * kGroup, KS = kSadKS, PC = kSadPC, kMinJobs = 16;
  const long steps = ceil_div(K, 8), panels = ceil_div(N, W), chunks = ceil_div(L, PC);
  // B[j][k][c][g][s] = b[8 k + s, j * W + n], n = 2 kGroup (c / 2) + 2 g + c % 2, zero past K, N
  std::unique_ptr<uint8_t, decltype(&std::free)> packed(
      static_cast<uint8_t*>(std::aligned_alloc(64, ((panels * steps * W * 8 + 63) / 64) * 64)),
      &std::free);
  if (!packed) return out_of_memory("adder int8");
  uint8_t* B = packed.get();
  auto pack_panel = [&](long j) {
    uint8_t* dst = B + j * steps * W * 8;
    std::memset(dst, 0, steps * W * 8);
    const long n0 = j * W, width = std::min(W, N - n0);
    for (long k = 0; k < K; ++k) {
      const uint8_t* row = b + k * N + n0;
      uint8_t* d = dst + (k / 8) * W * 8 + (k % 8);
      for (long n = 0; n < width; ++n) {
        // column n of the panel: pair n / (2 kGroup), even or odd vector, lane (n / 2) % kGroup
        const long pair = n / (2 * kGroup), r = n % (2 * kGroup);
        d[((2 * pair + r % 2) * kGroup + r / 2) * 8] = row[n];
      }
    }
  };
  // A small weight is packed inside the jobs' loop by the first thread to start a job (the
  // others wait for it), so that waking the pool's threads overlaps the packing.
  const bool small = K * N <= (1 << 18);
  std::atomic<int> packing{0};  // 0: not started, 1: under way, 2: done
  if (!small) parallel_for(pool, panels, pack_panel);
  const long per_group =
      whole_rows ? panels : std::max<long>(1, ceil_div(panels, ceil_div(kMinJobs, chunks)));
  const long groups = ceil_div(panels, per_group);
  parallel_for(pool, chunks * groups, [&](long job) {
    if (small && packing.load(std::memory_order_acquire) != 2) {
      int expected = 0;
      if (packing.compare_exchange_strong(expected, 1)) {
        for (long j = 0; j < panels; ++j) pack_panel(j);
        packing.store(2, std::memory_order_release);
      } else {
        while (packing.load(std::memory_order_acquire) != 2) std::this_thread::yield();
      }
    }
    const long p0 = (job / groups) * PC, p1 = std::min(L, p0 + PC);
    const long rows = ceil_div(p1 - p0, R) * R;
    const long j0 = (job % groups) * per_group, j1 = std::min(panels, j0 + per_group);
    thread_local std::vector<int32_t> sums;  // [p - p0][(j - j0) * W + column]: whole rows
    thread_local std::vector<uint64_t> apack;
    thread_local std::vector<uint8_t> codes;
    const long ldt = W * per_group;
    sums.resize(PC * ldt);
    apack.resize(PC * KS);
    codes.assign(rows * steps * 8, 0);  // rows past L and k past K stay 0 (|0 - 0| = 0)
    // Sums of one block of k-steps, in tiles of whole rows and panels, go straight to out
    // (a pass over the result saved); the rest through `sums` and the epilogue.
    const bool direct = Epilogue::kDirect && steps <= KS;
    const long full_rows = ((p1 - p0) / R) * R;
    for (long p = p0; p < p1; ++p) rows_of_a(p, codes.data() + (p - p0) * steps * 8);
    for (long k0 = 0; k0 < steps; k0 += KS) {
      const long ks = std::min(KS, steps - k0);
      // A[t][k][r]: the chunk's rows as register tiles, 8 codes per entry
      for (long t = 0; t < rows; t += R) {
        uint64_t* d = apack.data() + t * ks;
        for (long r = 0; r < R; ++r) {
          const uint8_t* src = codes.data() + ((t + r) * steps + k0) * 8;
          for (long k = 0; k < ks; ++k) std::memcpy(d + k * R + r, src + k * 8, 8);
        }
      }
      for (long j = j0; j < j1; ++j) {
        const uint8_t* Bj = B + (j * steps + k0) * W * 8;
        int32_t* Tj = sums.data() + (j - j0) * W;
        for (long t = 0; t < rows; t += R) {
          if constexpr (Epilogue::kDirect) {
            if (direct && t < full_rows && (j + 1) * W <= N) {
              int32_t* o = epilogue.out + (p0 + t) * N + j * W;
              sad_tile(ks, apack.data() + t * ks, Bj, o, N, true, epilogue.negate);
              continue;
            }
          }
          sad_tile(ks, apack.data() + t * ks, Bj, Tj + t * ldt, ldt, k0 == 0);
        }
      }
    }
    const long n0 = j0 * W, width = std::min(N, j1 * W) - n0;
    for (long p = p0; p < p1; ++p) {
      const int32_t* row = sums.data() + (p - p0) * ldt;
      if (!direct || p - p0 >= full_rows) {
        epilogue(p, n0, width, row);
      } else if (j1 * W > N) {  // the group's last panel is cut short: not stored directly
        const long last = (j1 - 1) * W;
        epilogue(p, last, N - last, row + (last - n0));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error SadU8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> a, ffi::Buffer<ffi::U8> b,
                     ffi::ResultBuffer<ffi::S32> out, int32_t negate) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2 || da[1] != db[0]) {
    auto shape = [](auto dims) {
      std::string s = "(";
      for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
      return s + ")";
    };
    return ffi::Error::InvalidArgument("adder sad_u8: expected a (L, K) and b (K, N), got a " +
                                       shape(da) + ", b " + shape(db));
  }
  const long L = da[0], K = da[1], N = db[1];
  int32_t* o = out->typed_data();
  if (L * N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(o, o + L * N, 0);
    return ffi::Error::Success();
  }
  return sad_driver(pool, CodeRows{a.typed_data(), K}, b.typed_data(), L, K, N,
                    SumsOut{o, N, negate != 0}, false);
}

// The int8 adder layer: y = mask * N(-scale * sum_k |code(x * e)[l, k] - w[k, n]|) + bias, with
// grid = (low, scale) and norm 1 (LayerNorm) or 0 (none).
ffi::Error AdderInt8LayerImpl(ffi::ThreadPool pool, F32 x, F32 e, ffi::Buffer<ffi::U8> w, F32 grid,
                              F32 mask, F32 bias, ffi::ResultBuffer<ffi::F32> y, int32_t norm,
                              float epsilon) {
  auto dx = x.dimensions(), dw = w.dimensions();
  const bool ok = dx.size() == 2 && dw.size() == 2 && dx[1] == dw[0] &&
                  e.dimensions().size() == 1 && e.dimensions()[0] == dx[1] &&
                  grid.dimensions().size() == 1 && grid.dimensions()[0] == 2 &&
                  mask.dimensions().size() == 1 && mask.dimensions()[0] == dw[1] &&
                  bias.dimensions().size() == 1 && bias.dimensions()[0] == dw[1];
  if (!ok || (norm != 0 && norm != 1)) {
    return ffi::Error::InvalidArgument(
        "adder int8 layer: expected x (L, K), e (K,), w (K, N), grid (2,), mask (N,), bias (N,) "
        "and norm 0 or 1, got x " + shape_of(x) + ", e " + shape_of(e) + ", grid " +
        shape_of(grid) + ", mask " + shape_of(mask) + ", bias " + shape_of(bias));
  }
  const long L = dx[0], K = dx[1], N = dw[1];
  float* out = y->typed_data();
  if (L * N == 0) return ffi::Error::Success();
  const float low = grid.typed_data()[0], scale = grid.typed_data()[1];
  const QuantizedRows rows{x.typed_data(), e.typed_data(), low, scale, K};
  const LayerOut epilogue{out, N, scale, mask.typed_data(), bias.typed_data(), norm == 1, epsilon};
  return sad_driver(pool, rows, w.typed_data(), L, K, N, epilogue, true);
}

// ---------------------------------------------------------------------------------------------
// Int8 products (the int8 multi and ternary sites): out[l, n] = sum_k q[l, k] * w[k, n] in int32,
// with q the per-row absmax codes of x formed here, q = clip(rint(x * s), -128, 127) and
// s = 127 / max(max_k |x[l, k]|, 1e-5) (quantizers.absmax_int8, round half to even), and w int8.
// The products run in oneDNN's int8 matmul (s8 x s8 -> s32: VNNI's vpdpbusd on AVX-512 VNNI and
// AVX-VNNI, AMX tiles on Sapphire Rapids, its AVX2 path elsewhere), a well-kept library instead of
// a hand-written micro-kernel; this file forms the codes (one pass over x, spread over XLA's pool)
// and keeps one primitive per shape. Built only where the oneDNN wheels are installed
// (ADDERVIT_ONEDNN, set by kernels/cpu_native.py); elsewhere the handler reports that and the
// Python side uses XLA's int8 dot_general.
// ---------------------------------------------------------------------------------------------

constexpr float kActivationLevels = 127.0f;
constexpr float kScaleFloor = 1e-5f;

// The codes of one row of K values and their scale, the formula of quantizers.absmax_int8 as
// XLA computes it in float32: s = 127 / max(peak, 1e-5), q = clip(rint(x * s), -128, 127) with
// rint rounding half to even. Both loops vectorise: the peak is the largest bit pattern without
// the sign (which orders finite magnitudes like the floats, and puts infinity and NaN above them),
// an integer reduction; and since |x * s| <= 127 (plus rounding), adding and subtracting 1.5 * 2^23
// rounds it half to even exactly. No contraction into an FMA: x * s must round first, as in XLA.
// A row with a NaN gets a NaN scale and zero codes, one with an infinity (and no NaN) scale 0 and
// zero codes, as XLA's formula gives (127 / inf = 0, and x * 0 rounds to 0); its outputs are NaN.
#if defined(__clang__)
#define ADDERVIT_NO_CONTRACT
#else
#define ADDERVIT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif
ADDERVIT_NO_CONTRACT void absmax_codes(const float* x, long K, int8_t* q, float* scale) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  uint32_t peak_bits = 0;
  for (long k = 0; k < K; ++k) {
    uint32_t bits;
    std::memcpy(&bits, x + k, sizeof bits);
    bits &= 0x7fffffffu;
    peak_bits = bits > peak_bits ? bits : peak_bits;
  }
  if (peak_bits >= 0x7f800000u) {
    *scale = peak_bits == 0x7f800000u ? 0.0f : NAN;
    std::fill(q, q + K, int8_t{0});
    return;
  }
  float peak;
  std::memcpy(&peak, &peak_bits, sizeof peak);
  const float s = kActivationLevels / std::max(peak, kScaleFloor);
  *scale = s;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  for (long k = 0; k < K; ++k) {
    float v = (x[k] * s + kRound) - kRound;
    v = std::min(127.0f, std::max(-128.0f, v));
    q[k] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
}

#if ADDERVIT_ONEDNN
// oneDNN runs each job's block on the thread that owns the job, with one OpenMP thread: the jobs
// are spread over XLA's pool like every kernel here, and no OpenMP team spins beside XLA's threads
// (measured: with its own team of 2, a 16384 x 128 x 128 product took 1.5-2x as long between XLA
// ops as alone).
struct MatmulKey {
  long M, K, N, ld, dst_ld;
  bool operator<(const MatmulKey& o) const {
    return std::tie(M, K, N, ld, dst_ld) < std::tie(o.M, o.K, o.N, o.ld, o.dst_ld);
  }
};

struct Int8Matmul {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul primitive;
};

dnnl::engine& onednn_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One primitive per block shape (M rows, K, N columns of weights whose rows are ld apart, and of
// outputs whose rows are dst_ld apart), made on first use: at most four per layer (whole and last
// blocks of rows and columns).
const Int8Matmul& int8_matmul_primitive(long M, long K, long N, long ld, long dst_ld) {
  static std::mutex lock;
  static std::map<MatmulKey, Int8Matmul> cache;
  std::lock_guard<std::mutex> guard(lock);
  auto found = cache.find({M, K, N, ld, dst_ld});
  if (found != cache.end()) return found->second;
  using dt = dnnl::memory::data_type;
  dnnl::memory::desc a({M, K}, dt::s8, dnnl::memory::format_tag::ab),
      b({K, N}, dt::s8, dnnl::memory::dims{ld, 1}),
      c({M, N}, dt::s32, dnnl::memory::dims{dst_ld, 1});
  // Each job passes its own scratchpad: by default oneDNN shares one between primitives, and
  // jobs running the same primitive on two threads at once clobbered each other's (seen: wrong
  // sums under load).
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(onednn_engine(), a, b, c, attr);
  return cache.emplace(MatmulKey{M, K, N, ld, dst_ld}, Int8Matmul{pd, dnnl::matmul(pd)})
      .first->second;
}
#endif

// The rescale an int8 site applies to its sums, fused into the product's jobs so that the int32
// sums never leave the cache: y[l, n] = sums[l, n] * col[n] * (1 / s[l]) + bias[n], float32,
// rounded in that order with no FMA contraction, as XLA computes ops.int8_dense's formula.
struct Rescale {
  const float* col;   // (N,)
  const float* bias;  // (N,)
  float* y;           // (L, N)
};

ADDERVIT_NO_CONTRACT void rescale_row(const int32_t* sums, long n, const float* col,
                                      const float* bias, float row_scale, float* y) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const float inverse = 1.0f / row_scale;
  for (long j = 0; j < n; ++j) y[j] = static_cast<float>(sums[j]) * col[j] * inverse + bias[j];
}

// The products of x (L, K) float32 and w (K, N) int8 into o (L, N) int32 and s (L,): the
// formula above; with a rescale, into its y instead of o (o unused). Returns an empty string,
// or what failed.
std::string int8_matmul(ffi::ThreadPool& pool, const float* xs, const int8_t* ws, long L, long K,
                        long N, int32_t* o, float* s, const Rescale* rescale = nullptr) {
#if ADDERVIT_ONEDNN
  if (L == 0) return "";
  if (N == 0 || K == 0) {  // no terms: the sums are 0, the scales still those of the rows
    std::vector<int8_t> unused(K);
    for (long l = 0; l < L; ++l) absmax_codes(xs + l * K, K, unused.data(), s + l);
    if (rescale == nullptr) {
      std::fill(o, o + L * N, 0);
    } else {
      std::vector<int32_t> zeros(N, 0);
      for (long l = 0; l < L; ++l)
        rescale_row(zeros.data(), N, rescale->col, rescale->bias, s[l], rescale->y + l * N);
    }
    return "";
  }
  // Jobs: blocks of kRows rows, each coded by its job right before its product (the codes stay
  // in cache); where the rows make fewer jobs than 2 per thread (small batches), the columns are
  // split too, in multiples of 16, each column job coding its rows again (L * K is small then),
  // unless the whole product is small.
#ifndef ADDERVIT_INT8_ROWS
#define ADDERVIT_INT8_ROWS 256
#endif
  constexpr long kRows = ADDERVIT_INT8_ROWS;  // ADDERVIT_CXXFLAGS=-DADDERVIT_INT8_ROWS=N to try others
  long threads = pool.num_threads();
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  if (int cap = max_threads_from_env()) threads = std::min<long>(threads, cap);
  const long row_blocks = ceil_div(L, kRows);
  // a small product (batch-1 inference: 64 x 128 x 128) runs as one job on the calling thread:
  // handing jobs to the pool and waiting for them costs more than the work
  const bool small = L * K * N <= (1L << 21);
  const long col_blocks = small ? 1
                                : std::max<long>(1, std::min(ceil_div(N, 64),
                                                             ceil_div(2 * threads, row_blocks)));
  const long cols = ceil_div(ceil_div(N, col_blocks), 16) * 16, col_jobs = ceil_div(N, cols);
  std::string failure;
  std::mutex failure_lock;
  parallel_for(pool, row_blocks * col_jobs, [&](long job) {
    const long r0 = (job / col_jobs) * kRows, m = std::min(kRows, L - r0);
    const long c0 = (job % col_jobs) * cols, n = std::min(cols, N - c0);
    // one OpenMP thread for this job's oneDNN call, the thread's own setting restored after it
    // (the calling thread runs jobs too, and may be the user's)
    const int omp_threads = omp_get_max_threads();
    omp_set_num_threads(1);
    try {
      thread_local std::vector<int8_t> codes;
      thread_local std::vector<float> unused_scale;
      codes.resize(m * K);
      unused_scale.resize(m);
      float* row_scale = c0 == 0 ? s + r0 : unused_scale.data();
      for (long l = 0; l < m; ++l) {
        absmax_codes(xs + (r0 + l) * K, K, codes.data() + l * K, row_scale + l);
      }
      // with a rescale, the sums of the block go to a buffer of the thread (rows n apart)
      thread_local std::vector<int32_t> block;
      if (rescale != nullptr) block.resize(m * n);
      int32_t* sums = rescale != nullptr ? block.data() : o + r0 * N + c0;
      const long ld = rescale != nullptr ? n : N;
      const Int8Matmul& matmul = int8_matmul_primitive(m, K, n, N, ld);
      dnnl::engine& engine = onednn_engine();
      dnnl::memory a(matmul.pd.src_desc(), engine, codes.data());
      dnnl::memory b(matmul.pd.weights_desc(), engine, const_cast<int8_t*>(ws + c0));
      dnnl::memory c(matmul.pd.dst_desc(), engine, sums);
      thread_local std::vector<uint8_t> scratch;  // 64-byte aligned within it
      scratch.resize(matmul.pd.scratchpad_desc().get_size() + 64);
      void* aligned = scratch.data() + (-reinterpret_cast<uintptr_t>(scratch.data()) & 63);
      dnnl::memory pad(matmul.pd.scratchpad_desc(), engine, aligned);
      thread_local dnnl::stream stream(engine);  // one per thread, not one per job
      matmul.primitive.execute(stream, {{DNNL_ARG_SRC, a},
                                        {DNNL_ARG_WEIGHTS, b},
                                        {DNNL_ARG_DST, c},
                                        {DNNL_ARG_SCRATCHPAD, pad}});
      stream.wait();
      if (rescale != nullptr) {
        for (long l = 0; l < m; ++l) {  // row_scale: this job's own coding of its rows
          rescale_row(sums + l * n, n, rescale->col + c0, rescale->bias + c0, row_scale[l],
                      rescale->y + (r0 + l) * N + c0);
        }
      }
    } catch (const dnnl::error& err) {
      std::lock_guard<std::mutex> guard(failure_lock);
      failure = std::string("oneDNN failed: ") + err.what();
    } catch (const std::exception& err) {  // e.g. out of memory for the codes: never escapes
      std::lock_guard<std::mutex> guard(failure_lock);
      failure = err.what();
    }
    omp_set_num_threads(omp_threads);
  });
  return failure;
#else
  (void)pool, (void)xs, (void)ws, (void)L, (void)K, (void)N, (void)o, (void)s, (void)rescale;
  return "this build of cpu_native has no oneDNN (install onednn-cpu-gomp and "
         "onednn-devel-cpu-gomp)";
#endif
}

std::string dims_of(ffi::Span<const int64_t> dims) {
  std::string text = "(";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + (dims.size() == 1 ? ",)" : ")");
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::S8> w,
                          ffi::ResultBuffer<ffi::S32> out, ffi::ResultBuffer<ffi::F32> scale) {
  auto dx = x.dimensions(), dw = w.dimensions();
  if (dx.size() != 2 || dw.size() != 2 || dx[1] != dw[0]) {
    return ffi::Error::InvalidArgument("int8 matmul: expected x (L, K) and w (K, N), got x " +
                                       shape_of(x) + ", w " + dims_of(dw));
  }
  std::string failure = int8_matmul(pool, x.typed_data(), w.typed_data(), dx[0], dx[1], dw[1],
                                    out->typed_data(), scale->typed_data());
  if (!failure.empty()) return ffi::Error::Internal("int8 matmul: " + failure);
  return ffi::Error::Success();
}

// The int8 codes of ternary weights stored in 2 bits (quantizers.pack_ternary: the code of column
// 4 j + i plus 1 in bits 2 i of byte j), unpacked to (K, n) int8 into storage (a table lookup
// per byte, spread over the pool). Returns the codes, or nullptr when out of memory.
const int8_t* unpack_ternary(ffi::ThreadPool& pool, const uint8_t* bytes, long K, long P, long n,
                             std::vector<int8_t>& storage) {
  static const auto table = [] {  // byte -> its four int8 codes, in column order
    std::array<std::array<int8_t, 4>, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 4; ++i) t[b][i] = static_cast<int8_t>(((b >> (2 * i)) & 3) - 1);
    return t;
  }();
  std::vector<int8_t> w, dense;
  try {
    w.resize(K * P * 4);
    if (4 * P != n) dense.resize(K * n);
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  const long block = std::max<long>(1, (1 << 16) / std::max<long>(P, 1));
  parallel_for(pool, ceil_div(K, block), [&](long job) {
    for (long k = job * block; k < std::min(K, (job + 1) * block); ++k)
      for (long j = 0; j < P; ++j) std::memcpy(&w[(k * P + j) * 4], table[bytes[k * P + j]].data(), 4);
  });
  // w holds 4 P >= n columns per row: where n is not a multiple of 4, its first n columns are
  // copied into a dense (K, n) matrix
  if (4 * P != n) {
    for (long k = 0; k < K; ++k) std::memcpy(&dense[k * n], &w[k * 4 * P], n);
    w.swap(dense);
  }
  storage.swap(w);
  return storage.data();
}

std::string ternary_shapes(F32& x, ffi::Buffer<ffi::U8>& packed, int64_t n) {
  auto dx = x.dimensions(), dp = packed.dimensions();
  if (dx.size() != 2 || dp.size() != 2 || dx[1] != dp[0] || n < 0 || dp[1] != (n + 3) / 4) {
    return "expected x (L, K) and packed (K, ceil(n / 4)) with n = " + std::to_string(n) +
           ", got x " + shape_of(x) + ", packed " + dims_of(dp);
  }
  return "";
}

// The same product with ternary weights stored in 2 bits: unpacked once per call, then
// int8_matmul.
ffi::Error TernaryMatmulImpl(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::U8> packed,
                             ffi::ResultBuffer<ffi::S32> out, ffi::ResultBuffer<ffi::F32> scale,
                             int64_t n) {
  std::string bad = ternary_shapes(x, packed, n);
  if (!bad.empty()) return ffi::Error::InvalidArgument("ternary matmul: " + bad);
  const long L = x.dimensions()[0], K = x.dimensions()[1], P = packed.dimensions()[1];
  std::vector<int8_t> storage;
  const int8_t* weights = unpack_ternary(pool, packed.typed_data(), K, P, n, storage);
  if (weights == nullptr)
    return ffi::Error::Internal("ternary matmul: out of memory for the unpacked weights");
  std::string failure =
      int8_matmul(pool, x.typed_data(), weights, L, K, n, out->typed_data(), scale->typed_data());
  if (!failure.empty()) return ffi::Error::Internal("ternary matmul: " + failure);
  return ffi::Error::Success();
}

// The sites' whole int8 step: the product and its rescale, y = sums * col * (1 / s) + bias
// (Rescale).
ffi::Error Int8DenseImpl(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::S8> w, F32 col, F32 bias,
                         ffi::ResultBuffer<ffi::F32> y) {
  auto dx = x.dimensions(), dw = w.dimensions();
  if (dx.size() != 2 || dw.size() != 2 || dx[1] != dw[0] || col.element_count() != dw[1] ||
      bias.element_count() != dw[1]) {
    return ffi::Error::InvalidArgument(
        "int8 dense: expected x (L, K), w (K, N), col (N,) and bias (N,), got x " + shape_of(x) +
        ", w " + dims_of(dw) + ", col " + shape_of(col) + ", bias " + shape_of(bias));
  }
  std::vector<float> scales(dx[0]);
  Rescale rescale{col.typed_data(), bias.typed_data(), y->typed_data()};
  std::string failure = int8_matmul(pool, x.typed_data(), w.typed_data(), dx[0], dx[1], dw[1],
                                    nullptr, scales.data(), &rescale);
  if (!failure.empty()) return ffi::Error::Internal("int8 dense: " + failure);
  return ffi::Error::Success();
}

ffi::Error TernaryDenseImpl(ffi::ThreadPool pool, F32 x, ffi::Buffer<ffi::U8> packed, F32 col,
                            F32 bias, ffi::ResultBuffer<ffi::F32> y, int64_t n) {
  std::string bad = ternary_shapes(x, packed, n);
  if (bad.empty() && (col.element_count() != n || bias.element_count() != n))
    bad = "expected col (n,) and bias (n,) with n = " + std::to_string(n) + ", got col " +
          shape_of(col) + ", bias " + shape_of(bias);
  if (!bad.empty()) return ffi::Error::InvalidArgument("ternary dense: " + bad);
  const long L = x.dimensions()[0], K = x.dimensions()[1], P = packed.dimensions()[1];
  std::vector<int8_t> storage;
  const int8_t* weights = unpack_ternary(pool, packed.typed_data(), K, P, n, storage);
  if (weights == nullptr)
    return ffi::Error::Internal("ternary dense: out of memory for the unpacked weights");
  std::vector<float> scales(L);
  Rescale rescale{col.typed_data(), bias.typed_data(), y->typed_data()};
  std::string failure =
      int8_matmul(pool, x.typed_data(), weights, L, K, n, nullptr, scales.data(), &rescale);
  if (!failure.empty()) return ffi::Error::Internal("ternary dense: " + failure);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // x (L, D_in)
                                  .Arg<F32>()  // w (D_in, D_out)
                                  .Arg<F32>()  // e (D_in,)
                                  .Ret<F32>()  // y (L, D_out)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitBatchedForward, BatchedForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // x (B, L, D_in)
                                  .Arg<F32>()  // w (B, D_in, D_out)
                                  .Arg<F32>()  // e (B, D_in)
                                  .Ret<F32>()  // y (B, L, D_out)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitXGrad, XGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // x (L, D_in)
                                  .Arg<F32>()  // w (D_in, D_out)
                                  .Arg<F32>()  // g (L, D_out)
                                  .Arg<F32>()  // e (D_in,)
                                  .Ret<F32>()  // du (L, D_in)
                                  .Attr<int32_t>("rule")
                                  .Attr<float>("clip_scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitWGradExact, WGradExactImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()  // x (L, D_in)
                                  .Arg<F32>()  // w (D_in, D_out)
                                  .Arg<F32>()  // g (L, D_out)
                                  .Arg<F32>()  // e (D_in,)
                                  .Ret<F32>()  // dw (D_in, D_out)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitSadU8, SadU8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()  // a (L, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()  // b (K, N)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // out (L, N)
                                  .Attr<int32_t>("negate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitAdderInt8Layer, AdderInt8LayerImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                    // x (L, K)
                                  .Arg<F32>()                    // e (K,)
                                  .Arg<ffi::Buffer<ffi::U8>>()  // w codes (K, N)
                                  .Arg<F32>()                    // grid (low, scale)
                                  .Arg<F32>()                    // mask (N,)
                                  .Arg<F32>()                    // bias (N,)
                                  .Ret<F32>()                    // y (L, N)
                                  .Attr<int32_t>("norm")
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitTernaryMatmul, TernaryMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                     // x (L, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed (K, ceil(n / 4))
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sums (L, n)
                                  .Ret<F32>()                     // scale (L,)
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitInt8Dense, Int8DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                    // x (L, K)
                                  .Arg<ffi::Buffer<ffi::S8>>()  // w (K, N)
                                  .Arg<F32>()                    // col (N,)
                                  .Arg<F32>()                    // bias (N,)
                                  .Ret<F32>()                    // y (L, N)
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitTernaryDense, TernaryDenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                    // x (L, K)
                                  .Arg<ffi::Buffer<ffi::U8>>()  // packed (K, ceil(n / 4))
                                  .Arg<F32>()                    // col (n,)
                                  .Arg<F32>()                    // bias (n,)
                                  .Ret<F32>()                    // y (L, n)
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AddervitInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()                     // x (L, K)
                                  .Arg<ffi::Buffer<ffi::S8>>()   // w (K, N)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // sums (L, N)
                                  .Ret<F32>()                     // scale (L,)
);

// The int8 matmul's library in this build: "onednn" or "" (none: XLA's dot_general serves).
extern "C" const char* AddervitInt8MatmulPath() { return ADDERVIT_ONEDNN ? "onednn" : ""; }

// Which SAD path this library was built with ("avx512bw", "avx2" or "portable").
extern "C" const char* AddervitSadPath() { return ADDERVIT_SAD_PATH; }
