// The MNIST stack (bnrepro/models/mlp.py) trained and evaluated in one native call per chunk of steps, and
// Alg. 2's population statistics (the BN statistics of the training mini-batches an evaluation averages) in one
// native call per evaluation.
//
// Why: the network is tiny (784-100-100-100-10, 60 examples), so a step from Python costs ~60 tensor
// operations of dispatch, ~30 us each on a small CPU, against ~0.1 ms of arithmetic. Here a whole chunk
// of steps is one call: each thread takes whole members (models share no parameters) and runs every step
// of the chunk for one member before the next, so the member's weights stay in cache.
//
// The arithmetic is the one the torch engine does, in fp32: the binary input layer as sums of weight rows
// (exactly x @ W), BN with batch mean and biased variance (Alg. 1) and its closed-form gradient, sigmoid
// (or ReLU), softmax cross-entropy, plain SGD. Only rounding differs (summation order, FMA, a polynomial
// exp accurate to ~1 ulp), and on x86 subnormal floats (|x| < 1.18e-38) count as 0 (see FlushDenormals);
// tests/test_native.py and tests/test_native_denormals.py check both engines agree.
//
// Layout conventions: row-major matrices; activations are (batch, units). Parameters live in torch's flat
// tensor; Python passes one pointer per member and tensor (see bnrepro/models/mlp_native.py).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE__)
#include <xmmintrin.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef BNREPRO_PART_TIMES
#include <chrono>
#include <utility>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif
#endif

namespace {

// While a kernel runs, each thread doing its arithmetic flushes subnormal floats to zero: results that would be
// subnormal (0 < |x| < 1.17549435e-38) become 0 (MXCSR's FTZ, bit 15), and subnormal inputs read as 0 (DAZ,
// bit 6). On return the calling thread's previous MXCSR is back, so nothing leaks into torch or Python.
//
// Why: on x86 an operation with a subnormal operand or result takes a microcode assist, many times the
// operation's own cost, and a saturated network makes such values by the million. Counted before the flush with
// an instrumented copy of this kernel (issue 23: the sweep's corner of learning rates 30-100 and initial stds
// 5-10, 8 models x 2,000 steps): 1.3% of the values training's phases write were subnormal, 0.9-3.6 thousand per
// model-step: weight gradients (up to 3.9% of them), (1 - y) y times the gradient and BN's backward pass (up to
// 3.3%), softmax terms and their gradients (1.7-1.9%), sigmoid outputs (0.2-0.3%: inputs in [-88.7, -87.3]). The
// denormal-operand flag rose in 73-100% of the model-steps of the gemms forward and backward, the sigmoid and its
// gradient, BN's backward pass and the SGD updates (a third for the output layer's gradient). In the sigmoid the
// subnormal is vexp's own: its saturation value for inputs in [-104, -87.34] is 1.1754907e-38, just below the
// smallest normal float, so every unit whose input exceeds +87.34 makes one. At the grid's ordinary point
// (learning rate 0.3, std 0.1, the same 8 x 2,000) no value was subnormal and neither the denormal-operand nor
// the underflow flag rose in any phase, training or evaluation: there the flush changes no bit.
//
// What changes in the arithmetic: such values are 0 where the torch engine keeps them (sigmoid outputs and softmax
// probabilities below 1.18e-38, their products in the backward pass). What one would add to a sum lies far below
// that sum's float32 rounding, unless a factor near 1e38 multiplies it (tests/test_native_denormals.py builds
// that case). In the corner above too, the flush changed no bit: losses, weights, BN averages, test logits and
// the sweep's metrics came out the same with and without it (a chaotic run could still carry a last-bit
// difference on, as it would any rounding difference).
//
// Elsewhere (ARM and others) the arithmetic keeps IEEE subnormals: no flush is set, and none was measured there.
// BNREPRO_KEEP_DENORMALS compiles the flush out so that its effect can be measured (tests/test_native_denormals.py,
// benchmarks/bench_sweep_corner.py); the package never defines it.
class FlushDenormals {
 public:
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE__) && !defined(BNREPRO_KEEP_DENORMALS)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 1u << 15, kDenormalsAreZero = 1u << 6;
  unsigned saved_;
#else
  FlushDenormals() {}  // user-provided: a const guard needs one
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// Where a kernel's time goes, for measurement only: benchmarks/bench_kernel_parts.py builds a variant with
// BNREPRO_PART_TIMES, and each thread then adds up the time stamp counter's ticks per part of the work. PART(p) ends
// the part running and starts p; PART_SCOPE(p) starts p and, at the end of its scope, goes back to the part before
// it (the outermost one adds its thread's counts to the totals bnrepro_mlp_part_times reads). Meant for one thread:
// with more, the calling thread also counts its wait for the others as setup. The package never defines
// BNREPRO_PART_TIMES: then both macros are empty and the markers compile to nothing.
#ifdef BNREPRO_PART_TIMES
// In the order of PARTS in bench_kernel_parts.py, which says what each covers.
enum Part { kProducts, kSparse, kFirstLayerUpdate, kBn, kElementwise, kUpdates, kSetup, kParts, kNoPart = -1 };
std::atomic<uint64_t> part_totals[kParts];

inline uint64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

struct PartClock {
  uint64_t ticks_in[kParts] = {}, since = 0;
  int part = kNoPart;
  void to(int next) {
    const uint64_t now = ticks();
    if (part != kNoPart) ticks_in[part] += now - since;
    since = now, part = next;
    if (next == kNoPart)
      for (int p = 0; p < kParts; ++p) part_totals[p] += std::exchange(ticks_in[p], 0);
  }
};
thread_local PartClock part_clock;

struct PartScope {
  const int outer;
  explicit PartScope(int p) : outer(part_clock.part) { part_clock.to(p); }
  ~PartScope() { part_clock.to(outer); }
};
#define PART(p) part_clock.to(p)
#define PART_SCOPE(p) const PartScope part_scope(p)
#else
#define PART(p)
#define PART_SCOPE(p)
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned access
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 splat(float s) { return v8{s, s, s, s, s, s, s, s}; }  // (v8{} + s would cost an addition: -0 + 0)

// Elementwise work (exp, sigmoid, their gradients) runs on the widest vectors the CPU has: with AVX-512
// one instruction does sixteen lanes, ~1.5x faster here for sigmoids, and every lane computes exactly what
// it would in an eight-lane vector.
#ifdef __AVX512F__
typedef float vw __attribute__((vector_size(64)));
typedef float vwu __attribute__((vector_size(64), aligned(4)));
typedef int32_t iw __attribute__((vector_size(64)));
typedef uint32_t uw __attribute__((vector_size(64)));
#else
typedef v8 vw;
typedef v8u vwu;
typedef i8 iw;
typedef u8 uw;
#endif
constexpr int kLanes = sizeof(vw) / sizeof(float);

inline vw wide(float s) {
  vw v;
  for (int lane = 0; lane < kLanes; ++lane) v[lane] = s;  // a broadcast
  return v;
}

// exp(x), Cephes' single-precision polynomial (<1 ulp on [-87.3, 88.0], measured); NaN stays NaN. Beyond
// that range the result saturates at the edge values, then becomes inf (x > 88.72) or 0 (x < -103.97):
// only sigmoids deep in saturation and softmax terms below 1e-38 see the difference. The low edge value,
// 1.1754907e-38, is subnormal: under the kernels' flush (FlushDenormals) it is 0, as is exp below -87.34.
inline vw vexp(vw x) {
  vw c = x > 88.0296919311f ? wide(88.0296919311f) : x;  // keeps 2^n a normal float
  c = c < -87.3365447505f ? wide(-87.3365447505f) : c;
  vw fx = c * 1.44269504088896341f + 0.5f;
  vw fn = __builtin_convertvector(__builtin_convertvector(fx, iw), vw);
  fn = fn > fx ? fn - 1.0f : fn;  // floor
  vw r = c - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vw y = wide(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  uw bits = __builtin_convertvector(__builtin_convertvector(fn, iw) + 127, uw) << 23;
  vw e = y * (vw)bits;  // times 2^n: n is written straight into the exponent bits
  e = x > 88.7228390520f ? wide(INFINITY) : e;
  return x < -103.972077083f ? wide(0.0f) : e;
}

// f over n floats, a wide vector at a time; the tail goes through a zero-padded vector.
template <class F>
inline void map(int64_t n, const float* in, float* out, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    *reinterpret_cast<vwu*>(out + i) = f(*reinterpret_cast<const vwu*>(in + i));
  if (i < n) {
    vw pad = {};
    std::memcpy(&pad, in + i, (n - i) * sizeof(float));
    const vw res = f(pad);
    std::memcpy(out + i, &res, (n - i) * sizeof(float));
  }
}

// f over pairs of n floats from a and b.
template <class F>
inline void map2(int64_t n, const float* a, const float* b, float* out, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    *reinterpret_cast<vwu*>(out + i) = f(*reinterpret_cast<const vwu*>(a + i), *reinterpret_cast<const vwu*>(b + i));
  if (i < n) {
    vw pa = {}, pb = {};
    std::memcpy(&pa, a + i, (n - i) * sizeof(float));
    std::memcpy(&pb, b + i, (n - i) * sizeof(float));
    const vw res = f(pa, pb);
    std::memcpy(out + i, &res, (n - i) * sizeof(float));
  }
}

inline vw sigmoid(vw x) { return 1.0f / (1.0f + vexp(-x)); }
inline vw relu(vw x) { return x > 0.0f ? x : (x != x ? x : wide(0.0f)); }  // NaN passes, as torch.relu

// C (rows x cols) = A (rows x depth) @ B (depth x cols). A's element (m, k) is A[m * ars + k * acs], so
// a transposed A costs nothing; B's and C's rows are contiguous (strides ldb, ldc). Register tiles of R
// rows x V vectors; the last column block overlaps the one before it (C is overwritten, so recomputing a
// few columns is harmless). Needs cols >= 8.
template <int R, int V>
inline void tile(int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                 int64_t ldc) {
  v8 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = splat(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    v8 b[V];
    for (int v = 0; v < V; ++v) b[v] = load(B + k * ldb + 8 * v);
    for (int r = 0; r < R; ++r) {
      v8 a = splat(A[r * ars + k * acs]);
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(C + r * ldc + 8 * v, acc[r][v]);
}

constexpr int kWidest = 2;  // 6 x 16 tiles fit 16 vector registers (CPUs with AVX-512 take gemm512 below)

template <int V>
void gemm_cols(int64_t rows, int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
               float* C, int64_t ldc) {
  constexpr int R = V == 1 ? 12 : 6;  // enough independent accumulators to hide the FMA latency
  int64_t m = 0;
  for (; m + R <= rows; m += R) tile<R, V>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
  for (; m + 4 <= rows; m += 4) tile<4, V>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
  for (; m < rows; ++m) tile<1, V>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc);
}

#ifdef __AVX512F__
// The same products in 16-lane vectors, for CPUs with AVX-512. Why (issue 23): on an Intel Xeon (Sapphire Rapids,
// two 512-bit FMA ports) the 8-lane tiles ran the MNIST network's products at ~98 GFLOP/s, about their peak there
// (76 us per model-step), these at ~155 (49 us; torch's 1-thread 1024^3 mm: 186): -36%. The rest of a step got ~8
// us slower with them (likely the lower clock of heavy 512-bit work), the step 160 -> 144 us. An earlier session
// on an AMD EPYC (Zen: 512-bit operations split in two 256-bit halves) found 512-bit tiles no faster there.
// Tiles of R rows x V vectors, the last of which, with Masked, covers only the lanes in mask (its loads read
// nothing and its stores write nothing beyond them, so no column block overlaps another). The lanes cut off
// compute zeros nobody stores; every C element is the same chain of FMAs in k's order as in the 8-lane tiles:
// the same bits. The unroll pragmas keep the accumulators in registers (without them GCC 12 left them in memory,
// stored every k: 1.8x slower); splat16, not wide's loop, which in a tile was no broadcast.
inline vw splat16(float s) { return vw{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

inline void store_masked(float* p, __mmask16 mask, vw x) {
  __m512 m;
  std::memcpy(&m, &x, sizeof m);
  _mm512_mask_storeu_ps(p, mask, m);
}

template <int R, int V, bool Masked>
inline void tile512(int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C,
                    int64_t ldc, __mmask16 mask) {
  vw acc[R][V];
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 32
    for (int v = 0; v < V; ++v) acc[r][v] = splat16(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    vw b[V];
    #pragma GCC unroll 32
    for (int v = 0; v < V - 1; ++v) b[v] = *reinterpret_cast<const vwu*>(B + k * ldb + 16 * v);
    if constexpr (Masked) b[V - 1] = (vw)_mm512_maskz_loadu_ps(mask, B + k * ldb + 16 * (V - 1));
    else b[V - 1] = *reinterpret_cast<const vwu*>(B + k * ldb + 16 * (V - 1));
    #pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const vw a = splat16(A[r * ars + k * acs]);
      #pragma GCC unroll 32
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 32
    for (int v = 0; v < V - 1; ++v) *reinterpret_cast<vwu*>(C + r * ldc + 16 * v) = acc[r][v];
    if constexpr (Masked) store_masked(C + r * ldc + 16 * (V - 1), mask, acc[r][V - 1]);
    else *reinterpret_cast<vwu*>(C + r * ldc + 16 * (V - 1)) = acc[r][V - 1];
  }
}

template <int V, bool Masked>
void cols512(int64_t rows, int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb,
             float* C, int64_t ldc, __mmask16 mask) {
  constexpr int R = V <= 2 ? 12 : 24 / V;  // up to 24 accumulators: with V loads and a broadcast, within 32 registers
  int64_t m = 0;
  for (; m + R <= rows; m += R) tile512<R, V, Masked>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc, mask);
  for (; m + 4 <= rows; m += 4) tile512<4, V, Masked>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc, mask);
  for (; m < rows; ++m) tile512<1, V, Masked>(depth, A + m * ars, ars, acs, B, ldb, C + m * ldc, ldc, mask);
}

template <int V>
void cols512(bool masked, int64_t rows, int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B,
             int64_t ldb, float* C, int64_t ldc, __mmask16 mask) {
  if (masked) cols512<V, true>(rows, depth, A, ars, acs, B, ldb, C, ldc, mask);
  else cols512<V, false>(rows, depth, A, ars, acs, B, ldb, C, ldc, mask);
}

// Column blocks of 3 vectors (48 columns), the last of 1 to 4 with its last vector masked where cols is no
// multiple of 16: 100 columns are 48 + 52 (3 + 3 1/4 vectors), 10 columns one masked vector.
void gemm512(int64_t rows, int64_t cols, int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B,
             int64_t ldb, float* C, int64_t ldc) {
  int64_t vectors = (cols + 15) / 16, j = 0;
  for (; vectors > 4; vectors -= 3, j += 48) cols512<3, false>(rows, depth, A, ars, acs, B + j, ldb, C + j, ldc, 0);
  const bool masked = cols % 16 != 0;
  const __mmask16 mask = static_cast<__mmask16>((1u << (cols % 16)) - 1);
  const float* b = B + j;
  float* c = C + j;
  if (vectors == 4) cols512<4>(masked, rows, depth, A, ars, acs, b, ldb, c, ldc, mask);
  else if (vectors == 3) cols512<3>(masked, rows, depth, A, ars, acs, b, ldb, c, ldc, mask);
  else if (vectors == 2) cols512<2>(masked, rows, depth, A, ars, acs, b, ldb, c, ldc, mask);
  else cols512<1>(masked, rows, depth, A, ars, acs, b, ldb, c, ldc, mask);
}
#endif

void gemm(int64_t rows, int64_t cols, int64_t depth, const float* A, int64_t ars, int64_t acs, const float* B,
          int64_t ldb, float* C, int64_t ldc) {
  if (cols < 8) {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t j = 0; j < cols; ++j) {
        float s = 0.0f;
        for (int64_t k = 0; k < depth; ++k) s += A[m * ars + k * acs] * B[k * ldb + j];
        C[m * ldc + j] = s;
      }
    return;
  }
#ifdef __AVX512F__
  gemm512(rows, cols, depth, A, ars, acs, B, ldb, C, ldc);
#else
  // Column blocks of 8 V, as wide as the rest allows; the last one overlaps the one before where it must.
  for (int64_t j = 0; j < cols;) {
    int64_t vectors = std::min<int64_t>(kWidest, (cols - j + 7) / 8);
    while (8 * vectors > cols) --vectors;
    const int64_t start = std::min(j, cols - 8 * vectors);
    const float* b = B + start;
    float* c = C + start;
    if (vectors == 2) gemm_cols<2>(rows, depth, A, ars, acs, b, ldb, c, ldc);
    else gemm_cols<1>(rows, depth, A, ars, acs, b, ldb, c, ldc);
    j = start + 8 * vectors;
  }
#endif
}

// Sums of the rows base[r * stride] for r in rows[0, count), over a block of columns: V whole vectors
// from the block's start, and with Tail one more vector at tail_at (which may overlap them). One pass over
// each row, with V + 1 independent accumulators.
template <int V, bool Tail>
inline void row_sums(const int32_t* rows, int64_t count, const float* base, int64_t stride, int64_t tail_at,
                     v8 (&acc)[V + 1]) {
  for (int v = 0; v <= V; ++v) acc[v] = v8{};
  for (int64_t q = 0; q < count; ++q) {
    const float* row = base + rows[q] * stride;
    for (int v = 0; v < V; ++v) acc[v] += load(row + 8 * v);
    if (Tail) acc[V] += load(row + tail_at);
  }
}

// f(V, Tail, start, tail_at) for each block of a row of cols >= 8 columns: blocks of 12 vectors, the last
// with the whole vectors left and, where cols is no multiple of 8, a tail vector ending at the row's end.
template <class F>
inline void column_blocks(int64_t cols, F f) {
  constexpr int64_t kBlock = 12;
  int64_t start = 0;
  for (; cols - start >= 8 * kBlock + 8; start += 8 * kBlock)  // what is left must fit 12 vectors and a tail
    f(std::integral_constant<int, kBlock>{}, std::false_type{}, start, 0);
  const int64_t whole = (cols - start) / 8, tail_at = cols - 8 - start;
  auto last = [&](auto V) {
    if (8 * whole == cols - start) f(V, std::false_type{}, start, 0);
    else f(V, std::true_type{}, start, tail_at);
  };
  switch (whole) {
    case 12: last(std::integral_constant<int, 12>{}); break;
    case 11: last(std::integral_constant<int, 11>{}); break;
    case 10: last(std::integral_constant<int, 10>{}); break;
    case 9: last(std::integral_constant<int, 9>{}); break;
    case 8: last(std::integral_constant<int, 8>{}); break;
    case 7: last(std::integral_constant<int, 7>{}); break;
    case 6: last(std::integral_constant<int, 6>{}); break;
    case 5: last(std::integral_constant<int, 5>{}); break;
    case 4: last(std::integral_constant<int, 4>{}); break;
    case 3: last(std::integral_constant<int, 3>{}); break;
    case 2: last(std::integral_constant<int, 2>{}); break;
    case 1: last(std::integral_constant<int, 1>{}); break;
    default: last(std::integral_constant<int, 0>{});
  }
}

// out[0, cols) = the sum of the rows base[r * stride, + cols) for r in rows[0, count).
void sum_rows(const int32_t* rows, int64_t count, const float* base, int64_t stride, int64_t cols, float* out) {
  column_blocks(cols, [&](auto vectors, auto tail, int64_t start, int64_t tail_at) {
    constexpr int V = decltype(vectors)::value;
    v8 acc[V + 1];
    row_sums<V, decltype(tail)::value>(rows, count, base + start, stride, tail_at, acc);
    for (int v = 0; v < V; ++v) store(out + start + 8 * v, acc[v]);
    if (decltype(tail)::value) store(out + start + tail_at, acc[V]);  // overlaps: the same sums again
  });
}

// target[0, cols) -= lr * (the sum of the rows base[r * stride, + cols) for r in rows[0, count)): the SGD
// update of one weight row from its gradient, in one pass.
void subtract_row_sums(const int32_t* rows, int64_t count, const float* base, int64_t stride, int64_t cols, float lr,
                       float* target) {
  column_blocks(cols, [&](auto vectors, auto tail, int64_t start, int64_t tail_at) {
    constexpr int V = decltype(vectors)::value;
    v8 acc[V + 1];
    row_sums<V, decltype(tail)::value>(rows, count, base + start, stride, tail_at, acc);
    float* t = target + start;
    for (int v = 0; v < V; ++v) store(t + 8 * v, load(t + 8 * v) - lr * acc[v]);
    if (decltype(tail)::value) {
      const i8 column = i8{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<int32_t>(tail_at);
      const v8 rest = column < 8 * V ? v8{} : acc[V];  // lanes the whole vectors updated already: w - lr * 0 = w
      store(t + tail_at, load(t + tail_at) - lr * rest);
    }
  });
}

// The examples' feature lists lie scattered in a large array: ask for all of them at once, so the fetches
// overlap rather than each waiting for the last.
void prefetch_lists(int64_t batch, const int64_t* examples, const int64_t* ex_offsets, const int32_t* features) {
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t q = ex_offsets[examples[i]]; q < ex_offsets[examples[i] + 1]; q += 16)
      __builtin_prefetch(features + q);
}

// The examples of a mini-batch by input feature: the rows where feature p is on are
// rows[offsets[p] .. offsets[p + 1]), in increasing order. One bit per (feature, row) is set in a pass over the
// examples' lists (which never repeat a feature), then read out feature by feature: 10 us a step here, against 15
// for counting, placing and bookkeeping each entry.
void by_feature(int64_t batch, const int64_t* examples, const int64_t* ex_offsets, const int32_t* features,
                int64_t inputs, int64_t* offsets, std::vector<int32_t>& rows) {
  prefetch_lists(batch, examples, ex_offsets, features);
  const int64_t words = (batch + 63) / 64;
  thread_local std::vector<uint64_t> bits;
  bits.assign(inputs * words, 0);
  int64_t entries = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t first = ex_offsets[examples[i]], last = ex_offsets[examples[i] + 1];
    entries += last - first;
    for (int64_t q = first; q < last; ++q) bits[features[q] * words + i / 64] |= uint64_t{1} << (i % 64);
  }
  rows.resize(entries);
  int64_t next = 0;
  for (int64_t p = 0; p < inputs; ++p) {
    offsets[p] = next;
    for (int64_t w = 0; w < words; ++w)
      for (uint64_t b = bits[p * words + w]; b; b &= b - 1) rows[next++] = static_cast<int32_t>(64 * w + __builtin_ctzll(b));
  }
  offsets[inputs] = next;
}

// Z (batch x cols) = x @ W for binary x: row i of Z is the sum of the rows of W where example i is on
// (exact, and ~7x fewer operations than the dense product on MNIST). features[ex_offsets[e] ..
// ex_offsets[e + 1]) are the active features of example e, and row i is example examples[i].
void binary_matmul(int64_t batch, const int64_t* examples, const int64_t* ex_offsets, const int32_t* features,
                   const float* W, int64_t ldw, int64_t cols, float* Z) {
  prefetch_lists(batch, examples, ex_offsets, features);
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t first = ex_offsets[examples[i]];
    sum_rows(features + first, ex_offsets[examples[i] + 1] - first, W, ldw, cols, Z + i * cols);
  }
}

// The product by feature below holds this many vectors of a weight row in registers (with AVX-512, 128 floats in 8
// of its 32 registers, the rest left for the rows of Z it adds them to).
constexpr int kHold = 8;

// Columns [0, cols) of a block of W, cols <= V vectors, added into Z as binary_matmul_by_feature says.
template <int V>
inline void add_rows_by_feature(int64_t inputs, const int64_t* offsets, const int32_t* rows, const float* W,
                                int64_t ldw, int64_t cols, float* Z, int64_t ldz) {
  for (int64_t p = 0; p < inputs; ++p) {
    const int64_t first = offsets[p], end = offsets[p + 1];
    if (first == end) continue;
    const float* w = W + p * ldw;
    vw r[V];  // the row, in registers; lanes past cols are 0
    #pragma GCC unroll 16
    for (int v = 0; v < V - 1; ++v) r[v] = *reinterpret_cast<const vwu*>(w + v * kLanes);
    r[V - 1] = vw{};
    std::memcpy(&r[V - 1], w + (V - 1) * kLanes, (cols - (V - 1) * kLanes) * sizeof(float));
    for (int64_t q = first; q < end; ++q) {
      vw* z = reinterpret_cast<vw*>(Z + rows[q] * ldz);
      #pragma GCC unroll 16
      for (int v = 0; v < V; ++v) z[v] += r[v];
    }
  }
}

// f(std::integral_constant<int, V>{}) with V = vectors, 1 <= vectors <= kHold: a row's width in vectors made a
// compile-time constant, so that the vectors of a row live in registers.
template <int V = 1, class F>
inline void with_vectors(int vectors, F f) {
  if constexpr (V < kHold)
    if (vectors > V) return with_vectors<V + 1>(vectors, f);
  f(std::integral_constant<int, V>{});
}

// binary_matmul's product from the mini-batch laid out by feature (by_feature: the rows where feature p is on
// are rows[offsets[p] .. offsets[p + 1]), in increasing order): each weight row is read once, held in
// registers, and added to the rows of Z of the examples that have its feature on. Every row of Z gets the same
// additions in the same order as in binary_matmul (its example's features in increasing order, from 0): the
// same bits. Why (issue 23): a mini-batch of 60 MNIST digits has ~6,200 active pixels but only ~450 distinct
// ones, so ~6,200 reads of weight rows from L2 become ~450, and the additions go to Z, which stays in L1. The
// sums go to a padded copy of Z whose rows start on a vector boundary (unaligned rows of 100 floats made every
// other store straddle two cache lines: slower than binary_matmul), then are copied out. Measured on the Intel
// Xeon, one mini-batch of 784 -> 100 (best of 15 over 1,000 batches): 25.0 us by example, 18.0 by feature with
// 16-lane vectors, but 27-31 with 8 (the row no longer fits the 16 registers beside the work): the kernel uses it
// only with AVX-512 (kByFeature, below). Each use needs the batch by feature, which training builds anyway for
// the first layer's update, and the evaluations build once per batch for all members.
void binary_matmul_by_feature(int64_t batch, int64_t inputs, const int64_t* offsets, const int32_t* rows,
                              const float* W, int64_t ldw, int64_t cols, float* Z) {
  const int64_t ldz = (cols + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<vw> padded;  // vw-aligned rows of ldz floats
  padded.assign(batch * ldz / kLanes, vw{});
  float* P = reinterpret_cast<float*>(padded.data());
  for (int64_t start = 0; start < cols; start += kHold * kLanes) {
    const int64_t width = std::min<int64_t>(kHold * kLanes, cols - start);
    with_vectors(static_cast<int>((width + kLanes - 1) / kLanes), [&](auto V) {
      add_rows_by_feature<decltype(V)::value>(inputs, offsets, rows, W + start, ldw, width, P + start, ldz);
    });
  }
  for (int64_t i = 0; i < batch; ++i) std::memcpy(Z + i * cols, P + i * ldz, cols * sizeof(float));
}

// target[0, cols) -= lr * (the sum of the rows base[r * ldb, + cols) for r in rows[0, count)), cols <= V vectors,
// base's rows vector-aligned: subtract_row_sums for such rows, in whole vectors (the last one's lanes past cols are
// read from base's padding and neither read nor written in target). The same sums in the same order per column,
// and the same update: the same bits.
template <int V>
inline void subtract_aligned_row_sums(const int32_t* rows, int64_t count, const float* base, int64_t ldb,
                                      int64_t cols, float lr, float* target) {
  vw acc[V] = {};
  for (int64_t q = 0; q < count; ++q) {
    const vw* row = reinterpret_cast<const vw*>(base + rows[q] * ldb);
    #pragma GCC unroll 16
    for (int v = 0; v < V; ++v) acc[v] += row[v];
  }
  #pragma GCC unroll 16
  for (int v = 0; v < V - 1; ++v)
    *reinterpret_cast<vwu*>(target + v * kLanes) = *reinterpret_cast<const vwu*>(target + v * kLanes) - lr * acc[v];
  const int64_t rest = cols - (V - 1) * kLanes;
  vw last = {};
  std::memcpy(&last, target + (V - 1) * kLanes, rest * sizeof(float));
  last = last - lr * acc[V - 1];
  std::memcpy(target + (V - 1) * kLanes, &last, rest * sizeof(float));
}

// The first layer's SGD update from d(loss)/d(z) (grad, batch x cols), by feature as training does it
// (subtract_row_sums for each pixel the batch has on), over a copy of grad in vector-aligned rows, in whole
// vectors. The same bits. Why (issue 23): grad's rows of 100 floats start every 400 bytes, so many of the loads
// of its rows straddle two cache lines; aligned 16-lane loads halve the loads and split none. Measured on the
// Intel Xeon, one mini-batch's update (best of 15 over 1,000 batches): 17.8 us, 12.5 aligned with 16 lanes,
// 16.6 aligned with 8.
void update_first_layer_aligned(int64_t batch, int64_t inputs, const int64_t* offsets, const int32_t* rows,
                                const float* grad, int64_t cols, float lr, float* W, int64_t ldw) {
  const int64_t ldg = (cols + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<vw> padded;  // vw-aligned rows of ldg floats, zeros past cols
  padded.assign(batch * ldg / kLanes, vw{});
  float* G = reinterpret_cast<float*>(padded.data());
  for (int64_t i = 0; i < batch; ++i) std::memcpy(G + i * ldg, grad + i * cols, cols * sizeof(float));
  for (int64_t start = 0; start < cols; start += kHold * kLanes) {
    const int64_t width = std::min<int64_t>(kHold * kLanes, cols - start);
    with_vectors(static_cast<int>((width + kLanes - 1) / kLanes), [&](auto V) {
      for (int64_t p = 0; p < inputs; ++p) {
        const int64_t first = offsets[p], count = offsets[p + 1] - first;
        if (count == 0) continue;  // gradient 0: SGD leaves the row as it is
        subtract_aligned_row_sums<decltype(V)::value>(rows + first, count, G + start, ldg, width, lr,
                                                      W + p * ldw + start);
      }
    });
  }
}

// How the first layer goes. With AVX-512: its product by feature (training, Alg. 2's population pass, inference)
// and training's update over aligned rows (update_first_layer_aligned); otherwise by example and subtract_row_sums.
// BNREPRO_BY_FEATURE=1 (or 0) forces one way, so that tests/test_native.py can hold the two to the same bits on any
// CPU; the package never defines it.
#ifdef BNREPRO_BY_FEATURE
constexpr bool kByFeature = BNREPRO_BY_FEATURE;
#else
constexpr bool kByFeature = kLanes == 16;
#endif

#if defined(__clang__) || __GNUC__ >= 12
#define ZIP(a, b, lo) __builtin_shufflevector(a, b, lo, lo + 8, lo + 1, lo + 9, lo + 2, lo + 10, lo + 3, lo + 11)
#else
#define ZIP(a, b, lo) __builtin_shuffle(a, b, i8{lo, lo + 8, lo + 1, lo + 9, lo + 2, lo + 10, lo + 3, lo + 11})
#endif

// An 8 x 8 block transposed in registers: three rounds of interleaving row k with row k + 4.
inline void transpose8(v8 r[8]) {
  for (int round = 0; round < 3; ++round) {
    v8 t[8];
    for (int k = 0; k < 4; ++k) t[2 * k] = ZIP(r[k], r[k + 4], 0), t[2 * k + 1] = ZIP(r[k], r[k + 4], 4);
    for (int k = 0; k < 8; ++k) r[k] = t[k];
  }
}

// out (cols x rows) = in (rows x cols)^T: 8 x 8 blocks in registers, the ragged edges one by one.
void transpose(int64_t rows, int64_t cols, const float* in, float* out) {
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t a = 0; a < rows8; a += 8)
    for (int64_t b = 0; b < cols8; b += 8) {
      v8 r[8];
      for (int k = 0; k < 8; ++k) r[k] = load(in + (a + k) * cols + b);
      transpose8(r);
      for (int k = 0; k < 8; ++k) store(out + (b + k) * rows + a, r[k]);
    }
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = a < rows8 ? cols8 : 0; b < cols; ++b) out[b * rows + a] = in[a * cols + b];
}

enum Activation { kSigmoid = 0, kRelu = 1 };

struct Shape {
  int64_t hidden_layers;    // H
  const int64_t* widths;    // H + 2 widths: inputs, hidden..., classes
  int64_t w0_stride;        // row stride of the first weight (members * width, a slice per member)
  int64_t activation;
  float bn_eps, bn_momentum;
  int64_t units_before(int64_t hidden) const {  // hidden units in the layers before this one (scratch offsets)
    int64_t units = 0;
    for (int64_t l = 1; l <= hidden; ++l) units += widths[l];
    return units;
  }
  int64_t min_cols() const {
    int64_t m = widths[1];
    for (int64_t l = 1; l <= hidden_layers + 1; ++l) m = std::min(m, widths[l]);
    return m;
  }
};

// One member's tensors: weights[0..H], then per hidden layer (gamma, beta, mean_avg, var_avg) for a BN
// member or (bias, -, -, -) for a plain one, then the output bias. In evaluation the per-layer entries are
// (scale, shift, -, -): the inference affine map (Alg. 2) Python worked out.
struct Member {
  float** p;
  int64_t H;
  float* weight(int64_t l) const { return p[l]; }
  float* layer(int64_t l, int64_t k) const { return p[H + 1 + 4 * l + k]; }
  float* bias_out() const { return p[5 * H + 1]; }
};

// A member's parameters copied into one private block for a chunk of steps and written back at its end:
// the flat tensor interleaves the members' first-layer weights row by row, so threads updating their own
// members in place would keep stealing cache lines from each other. Pieces start on 64-byte boundaries.
class PrivateCopy {
 public:
  PrivateCopy(const Shape& s, const Member& shared)
      : shared_(shared), shared_stride_(s.w0_stride), shape_(s), table_(5 * s.hidden_layers + 2) {
    const int64_t H = s.hidden_layers;
    for (int64_t l = 0; l <= H; ++l) sizes_.push_back(s.widths[l] * s.widths[l + 1]);
    for (int64_t l = 0; l < H; ++l)
      for (int k = 0; k < 4; ++k) sizes_.push_back(shared.layer(l, k) ? s.widths[l + 1] : 0);
    sizes_.push_back(s.widths[H + 1]);
    int64_t total = 0;
    for (int64_t size : sizes_) total += (size + 15) / 16 * 16;
    data_.resize(total + 16);
    float* next = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(data_.data()) + 63) & ~uintptr_t(63));
    for (size_t e = 0; e < sizes_.size(); ++e) {
      table_[e] = shared.p[e] ? next : nullptr;
      next += (sizes_[e] + 15) / 16 * 16;
    }
    copy(true);
    shape_.w0_stride = s.widths[1];
  }
  ~PrivateCopy() { copy(false); }
  Member member() { return Member{table_.data(), shape_.hidden_layers}; }
  const Shape& shape() const { return shape_; }

 private:
  void copy(bool in) {
    const int64_t n = shape_.widths[1];
    for (int64_t p = 0; p < shape_.widths[0]; ++p) {  // the first weight: rows of a wider matrix
      float* mine = table_[0] + p * n;
      float* theirs = shared_.p[0] + p * shared_stride_;
      std::memcpy(in ? mine : theirs, in ? theirs : mine, n * sizeof(float));
    }
    for (size_t e = 1; e < sizes_.size(); ++e)
      if (table_[e])
        std::memcpy(in ? table_[e] : shared_.p[e], in ? shared_.p[e] : table_[e], sizes_[e] * sizeof(float));
  }
  Member shared_;
  int64_t shared_stride_;
  Shape shape_;  // with the private first weight's row stride
  std::vector<float*> table_;
  std::vector<int64_t> sizes_;
  std::vector<float> data_;
};

inline vw activate(vw x, int64_t activation) { return activation == kSigmoid ? sigmoid(x) : relu(x); }

// d(loss)/d(pre-activation) from d(loss)/d(output) and the output y: sigmoid' = (1 - y) y, relu' = [y > 0].
inline vw activation_grad(vw g, vw y, int64_t activation) {
  return activation == kSigmoid ? g * (1.0f - y) * y : (y <= 0.0f ? wide(0.0f) : g);  // NaN y passes g, as torch
}

// torch's lerp_: start + w (end - start), or end - (end - start)(1 - w) for w >= 0.5.
inline float lerp(float start, float end, float w) {
  return w < 0.5f ? start + w * (end - start) : end - (end - start) * (1.0f - w);
}

// Alg. 1's statistics of z (batch x n), as the torch engine computes them: the batch mean, the biased variance
// about it (not E[z^2] - E[z]^2), inv_std = 1 / sqrt(var + eps); and, where h is given, the normalized output
// h = beta + gamma (z - mean) inv_std. Alg. 2's population pass needs no more (h only where a next layer reads it);
// training's bn_forward adds xhat, which its backward pass reads. Loops over units innermost: they vectorize.
void bn_statistics(int64_t batch, int64_t n, const float* z, const float* gamma, const float* beta, float eps,
                   float* mean, float* var, float* inv_std, float* h) {
  std::fill(mean, mean + n, 0.0f);
  std::fill(var, var + n, 0.0f);
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t j = 0; j < n; ++j) mean[j] += z[i * n + j];
  for (int64_t j = 0; j < n; ++j) mean[j] /= batch;
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float c = z[i * n + j] - mean[j];
      var[j] += c * c;
    }
  for (int64_t j = 0; j < n; ++j) {
    var[j] /= batch;
    inv_std[j] = 1.0f / std::sqrt(var[j] + eps);
  }
  if (h == nullptr) return;
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t j = 0; j < n; ++j) h[i * n + j] = beta[j] + gamma[j] * ((z[i * n + j] - mean[j]) * inv_std[j]);
}

// Alg. 1 for training: bn_statistics, and xhat = (z - mean) inv_std and h = beta + gamma xhat, both kept for the
// backward pass. The population pass (bn_statistics alone) thus sees exactly the inputs training saw. Why (issue
// 23): the population pass was 19% BN, a third of it writing and reading xhat, which it never needs.
void bn_forward(int64_t batch, int64_t n, const float* z, const float* gamma, const float* beta, float eps,
                float* mean, float* var, float* inv_std, float* xhat, float* h) {
  bn_statistics(batch, n, z, gamma, beta, eps, mean, var, inv_std, nullptr);
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t j = 0; j < n; ++j) {
      xhat[i * n + j] = (z[i * n + j] - mean[j]) * inv_std[j];
      h[i * n + j] = beta[j] + gamma[j] * xhat[i * n + j];
    }
}

struct Scratch {
  std::vector<float> z, h, xhat, inv_std, grad, grad_h, weight_t, grad_w, logits, col_a, col_b;
};

// One training step of one member on the mini-batch examples[0, batch); returns its mean cross-entropy.
// offsets/pixels: every example's active pixels; pixel_offsets/pixel_rows: the same mini-batch by pixel
// (see by_feature); labels[examples[i]] is the class of row i.
float train_step(const Shape& s, const Member& mb, bool bn, int64_t batch, const int64_t* examples,
                 const int64_t* offsets, const int32_t* pixels, const int64_t* pixel_offsets,
                 const int32_t* pixel_rows, const int64_t* labels, float lr, Scratch& w) {
  const int64_t H = s.hidden_layers, classes = s.widths[H + 1];
  // Forward: z = h_prev @ W (a sum of rows for the binary input), then BN or bias, then the nonlinearity.
  for (int64_t l = 0; l < H; ++l) {
    const int64_t n = s.widths[l + 1], k = s.widths[l];
    float* z = w.z.data();  // this layer's x @ W, needed only until BN or the bias has used it
    float* h = w.h.data() + batch * s.units_before(l);
    PART(l == 0 ? kSparse : kProducts);
    if (l == 0 && kByFeature)  // the same bits either way
      binary_matmul_by_feature(batch, k, pixel_offsets, pixel_rows, mb.weight(0), s.w0_stride, n, z);
    else if (l == 0) binary_matmul(batch, examples, offsets, pixels, mb.weight(0), s.w0_stride, n, z);
    else gemm(batch, n, k, w.h.data() + batch * s.units_before(l - 1), k, 1, mb.weight(l), n, z, n);
    PART(bn ? kBn : kElementwise);
    if (bn) {
      float *gamma = mb.layer(l, 0), *beta = mb.layer(l, 1), *mean_avg = mb.layer(l, 2), *var_avg = mb.layer(l, 3);
      float* xhat = w.xhat.data() + batch * s.units_before(l);
      float* inv_std = w.inv_std.data() + s.units_before(l);
      float *mean = w.col_a.data(), *var = w.col_b.data();
      bn_forward(batch, n, z, gamma, beta, s.bn_eps, mean, var, inv_std, xhat, h);
      for (int64_t j = 0; j < n; ++j) {
        mean_avg[j] = lerp(mean_avg[j], mean[j], s.bn_momentum);
        var_avg[j] = lerp(var_avg[j], var[j], s.bn_momentum);
      }
    } else {
      const float* bias = mb.layer(l, 0);
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t j = 0; j < n; ++j) h[i * n + j] = z[i * n + j] + bias[j];
    }
    PART(kElementwise);
    map(batch * n, h, h, [&](vw x) { return activate(x, s.activation); });
  }
  // Output layer, softmax cross-entropy, and d(mean loss)/d(logits) = (softmax - onehot) / batch.
  const int64_t last = s.widths[H];
  const float* h_last = w.h.data() + batch * s.units_before(H - 1);
  float* logits = w.logits.data();
  PART(kProducts);
  gemm(batch, classes, last, h_last, last, 1, mb.weight(H), classes, logits, classes);
  PART(kElementwise);
  const float* bias_out = mb.bias_out();
  float loss = 0.0f;
  for (int64_t i = 0; i < batch; ++i) {
    float* row = logits + i * classes;
    float top = -INFINITY;
    for (int64_t c = 0; c < classes; ++c) {
      row[c] += bias_out[c];
      top = std::max(top, row[c]);
    }
    if (!std::isfinite(top)) top = 0.0f;  // NaN/inf logits: keep them, the loss reports the divergence
    for (int64_t c = 0; c < classes; ++c) row[c] -= top;
  }
  map(batch * classes, logits, w.grad.data(), [](vw x) { return vexp(x); });
  float* grad = w.grad.data();  // (batch, classes): d(loss)/d(logits)
  const float inv_batch = 1.0f / batch;
  for (int64_t i = 0; i < batch; ++i) {
    float sum = 0.0f;
    for (int64_t c = 0; c < classes; ++c) sum += grad[i * classes + c];
    const float log_sum = std::log(sum);
    loss -= logits[i * classes + labels[examples[i]]] - log_sum;
    for (int64_t c = 0; c < classes; ++c) {
      const float p = grad[i * classes + c] / sum;
      grad[i * classes + c] = (p - (c == labels[examples[i]] ? 1.0f : 0.0f)) * inv_batch;
    }
  }
  loss /= batch;
  // Backward, top layer first: each weight is used for the gradient below it, then updated (SGD).
  for (int64_t l = H; l >= 1; --l) {
    const int64_t n = s.widths[l + 1], k = s.widths[l];
    const float* h = w.h.data() + batch * s.units_before(l - 1);
    float* W = mb.weight(l);
    float* wt = w.weight_t.data();  // W^T, so that grad @ W^T is a row-major product
    PART(kElementwise);
    transpose(k, n, W, wt);
    float* grad_h = w.grad_h.data();
    PART(kProducts);
    gemm(batch, k, n, grad, n, 1, wt, k, grad_h, k);          // d/dh = grad @ W^T
    gemm(k, n, batch, h, 1, k, grad, n, w.grad_w.data(), n);  // d/dW = h^T @ grad
    PART(kUpdates);
    for (int64_t a = 0; a < k * n; ++a) W[a] -= lr * w.grad_w[a];
    if (l == H) {
      float* b = mb.bias_out();
      for (int64_t c = 0; c < n; ++c) {
        float g = 0.0f;
        for (int64_t i = 0; i < batch; ++i) g += grad[i * n + c];
        b[c] -= lr * g;
      }
    }
    // Through the nonlinearity and BN (or the bias) of hidden layer l - 1: grad becomes d/dz there.
    const int64_t hl = l - 1;
    PART(kElementwise);
    map2(batch * k, grad_h, h, grad_h, [&](vw g, vw y) { return activation_grad(g, y, s.activation); });
    float* g_next = w.grad.data();  // becomes d(loss)/d(z) of layer hl, (batch, k)
    PART(bn ? kBn : kElementwise);
    if (bn) {
      float *gamma = mb.layer(hl, 0), *beta = mb.layer(hl, 1);
      const float* xhat = w.xhat.data() + batch * s.units_before(hl);
      const float* inv_std = w.inv_std.data() + s.units_before(hl);
      float *g_beta = w.col_a.data(), *g_gamma = w.col_b.data();  // Sec. 3.1 in closed form
      std::fill(g_beta, g_beta + k, 0.0f);
      std::fill(g_gamma, g_gamma + k, 0.0f);
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t j = 0; j < k; ++j) {
          g_beta[j] += grad_h[i * k + j];
          g_gamma[j] += grad_h[i * k + j] * xhat[i * k + j];
        }
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t j = 0; j < k; ++j)
          g_next[i * k + j] =
              (grad_h[i * k + j] - (g_beta[j] + xhat[i * k + j] * g_gamma[j]) / batch) * (gamma[j] * inv_std[j]);
      for (int64_t j = 0; j < k; ++j) {
        gamma[j] -= lr * g_gamma[j];
        beta[j] -= lr * g_beta[j];
      }
    } else {
      float* bias = mb.layer(hl, 0);
      float* g_bias = w.col_a.data();
      std::fill(g_bias, g_bias + k, 0.0f);
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t j = 0; j < k; ++j) g_bias[j] += grad_h[i * k + j];
      for (int64_t j = 0; j < k; ++j) bias[j] -= lr * g_bias[j];
      std::memcpy(g_next, grad_h, batch * k * sizeof(float));
    }
    grad = g_next;
  }
  // First layer: d/dW0 = x^T @ grad, nonzero only in the rows of pixels some example has on.
  const int64_t n = s.widths[1], inputs = s.widths[0];
  float* W0 = mb.weight(0);
  PART(kFirstLayerUpdate);
  if (kByFeature) {
    update_first_layer_aligned(batch, inputs, pixel_offsets, pixel_rows, grad, n, lr, W0, s.w0_stride);
  } else {
    for (int64_t p = 0; p < inputs; ++p) {
      const int64_t first = pixel_offsets[p], count = pixel_offsets[p + 1] - first;
      if (count == 0) continue;  // gradient 0: SGD leaves the row as it is
      subtract_row_sums(pixel_rows + first, count, grad, n, n, lr, W0 + p * s.w0_stride);
    }
  }
  return loss;
}

template <class F>
void parallel(int64_t threads, int64_t items, F f) {
  threads = std::max<int64_t>(1, std::min(threads, items));
  if (threads == 1) {
    for (int64_t i = 0; i < items; ++i) f(i);
    return;
  }
  std::atomic<bool> failed{false};
  auto share = [&](int64_t t) {  // items t, t + threads, ...; an exception must not leave a thread
    const FlushDenormals flush;  // every thread sets its own: whether a new one inherits MXCSR is the OS's choice
    try {
      for (int64_t i = t; i < items; i += threads) f(i);
    } catch (...) {
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(share, t);
    } catch (...) {  // no thread to be had: this one does that share too
      share(t);
    }
  }
  share(0);
  for (auto& thread : pool) thread.join();
  if (failed) throw std::runtime_error("a worker failed");
}

// Mini-batches laid out by input feature (by_feature), built once, in parallel, and shared by every member:
// batch b is examples[b * stride, + min(stride, total - b * stride)). count 0 builds nothing (evaluations where the
// first layer goes by example need no layout).
struct FeatureLayouts {
  FeatureLayouts(int64_t threads, int64_t count, int64_t stride, int64_t total, const int64_t* examples,
                 const int64_t* ex_offsets, const int32_t* features, int64_t inputs)
      : inputs_(inputs), offsets_(count * (inputs + 1)), rows_(count) {
    parallel(threads, count, [&](int64_t b) {
      PART_SCOPE(kSetup);
      by_feature(std::min(stride, total - b * stride), examples + b * stride, ex_offsets, features, inputs,
                 offsets_.data() + b * (inputs + 1), rows_[b]);
    });
  }
  const int64_t* offsets(int64_t b) const { return offsets_.data() + b * (inputs_ + 1); }
  const int32_t* rows(int64_t b) const { return rows_[b].data(); }

 private:
  int64_t inputs_;
  std::vector<int64_t> offsets_;
  std::vector<std::vector<int32_t>> rows_;
};

void size_scratch(const Shape& s, int64_t batch, Scratch& w) {
  int64_t total = 0, widest = 0;
  for (int64_t l = 1; l <= s.hidden_layers; ++l) total += s.widths[l];
  for (int64_t l = 1; l <= s.hidden_layers + 1; ++l) widest = std::max(widest, s.widths[l]);
  w.z.assign(batch * widest, 0.0f);
  w.h.assign(batch * total, 0.0f);
  w.xhat.assign(batch * total, 0.0f);
  w.inv_std.assign(total, 0.0f);
  w.grad.assign(batch * widest, 0.0f);
  w.grad_h.assign(batch * widest, 0.0f);
  w.weight_t.assign(widest * widest, 0.0f);
  w.grad_w.assign(widest * widest, 0.0f);
  w.logits.assign(batch * s.widths[s.hidden_layers + 1], 0.0f);
  w.col_a.assign(widest, 0.0f);
  w.col_b.assign(widest, 0.0f);
}

// Alg. 2's population pass splits the mini-batches into runs of this many, each run one work item per member with
// its own partial sums, added in run order at the end: a fixed split, so the result is the same bit for bit on any
// number of threads, and enough items to keep every thread busy even for one member (1,000 batches: 32 runs).
constexpr int64_t kPopulationRun = 32;

}  // namespace

extern "C" {

// Steps [0, steps) of a chunk for every member. examples: (steps, batch) training-example indices;
// offsets/pixels: CSR of every training example's active pixels; params: members x (5H + 2) pointers;
// bn: per member; lrs: (steps, members), each member's rate at each step; losses: (steps, members) out. Returns 0; 1 for a shape it cannot run, 2 when
// it ran out of memory or threads.
int bnrepro_mlp_train(int64_t hidden_layers, const int64_t* widths, int64_t w0_stride, int64_t activation,
                      float bn_eps, float bn_momentum, int64_t members, float** params, const uint8_t* bn,
                      int64_t steps, int64_t batch, const int64_t* examples, const int64_t* offsets,
                      const int32_t* pixels, const int64_t* labels, const float* lrs, float* losses,
                      int64_t threads) {
  const FlushDenormals flush;  // the calling thread's MXCSR is restored on return
  const Shape s{hidden_layers, widths, w0_stride, activation, bn_eps, bn_momentum};
  if (hidden_layers < 1 || s.min_cols() < 8) return 1;
  PART_SCOPE(kSetup);  // the chunk's bookkeeping: mini-batches by pixel, private copies of the parameters
  try {
    const FeatureLayouts layouts(threads, steps, batch, steps * batch, examples, offsets, pixels, widths[0]);
    parallel(threads, members, [&](int64_t m) {  // a member's steps one after the other: its weights stay in cache
      PART_SCOPE(kSetup);
      Scratch w;
      size_scratch(s, batch, w);
      PrivateCopy copy(s, Member{params + m * (5 * hidden_layers + 2), hidden_layers});
      const Member mb = copy.member();
      for (int64_t t = 0; t < steps; ++t)
        losses[t * members + m] = train_step(copy.shape(), mb, bn[m] != 0, batch, examples + t * batch, offsets,
                                             pixels, layouts.offsets(t), layouts.rows(t),
                                             labels, lrs[t * members + m], w);
    });
  } catch (...) {  // out of memory, or no threads: Python raises
    return 2;
  }
  return 0;
}

// Inference (Alg. 2) of every member on examples [0, count): logits (count, members, classes) and the
// pre-activation of unit `probe` of the last hidden layer (count, members). params as in training, with
// (scale, shift) per hidden layer.
int bnrepro_mlp_predict(int64_t hidden_layers, const int64_t* widths, int64_t w0_stride, int64_t activation,
                        int64_t members, float** params, int64_t count, const int64_t* offsets,
                        const int32_t* pixels, int64_t probe, float* logits, float* probes, int64_t threads) {
  const FlushDenormals flush;  // the calling thread's MXCSR is restored on return
  const Shape s{hidden_layers, widths, w0_stride, activation, 0.0f, 0.0f};
  if (hidden_layers < 1 || s.min_cols() < 8) return 1;
  try {
    const int64_t block = 128, blocks = (count + block - 1) / block, classes = widths[hidden_layers + 1];
    int64_t widest = 0;
    for (int64_t l = 1; l <= hidden_layers + 1; ++l) widest = std::max(widest, widths[l]);
    // Each block by input feature, shared by all members, where the first layer goes by feature (as training)
    std::vector<int64_t> everyone(kByFeature ? count : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(everyone.size()); ++i) everyone[i] = i;
    const FeatureLayouts layouts(threads, kByFeature ? blocks : 0, block, count, everyone.data(), offsets, pixels,
                                 widths[0]);
    // Each work item is one member over a run of blocks (the whole set when there are enough members): its
    // first weight is copied out contiguously first, as its rows lie a page apart in the flat tensor.
    const int64_t parts = std::max<int64_t>(1, (threads + members - 1) / members), n1 = widths[1];
    parallel(threads, members * parts, [&](int64_t item) {
      PART_SCOPE(kSetup);
      const int64_t m = item / parts, part = item % parts;
      const Member mb{params + m * (5 * hidden_layers + 2), hidden_layers};
      thread_local std::vector<float> w0, x, y;
      thread_local std::vector<int64_t> examples;
      w0.resize(widths[0] * n1), x.resize(block * widest), y.resize(block * widest), examples.resize(block);
      for (int64_t p = 0; p < widths[0]; ++p)
        std::memcpy(&w0[p * n1], mb.weight(0) + p * w0_stride, n1 * sizeof(float));
      for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
        const int64_t first = b * block, rows = std::min(block, count - first);
        for (int64_t i = 0; i < rows; ++i) examples[i] = first + i;
        for (int64_t l = 0; l < hidden_layers; ++l) {
          const int64_t n = widths[l + 1], k = widths[l];
          PART(l == 0 ? kSparse : kProducts);
          if (l == 0 && kByFeature)
            binary_matmul_by_feature(rows, k, layouts.offsets(b), layouts.rows(b), w0.data(), n1, n, y.data());
          else if (l == 0) binary_matmul(rows, examples.data(), offsets, pixels, w0.data(), n1, n, y.data());
          else gemm(rows, n, k, x.data(), k, 1, mb.weight(l), n, y.data(), n);
          PART(kElementwise);
          const float *scale = mb.layer(l, 0), *shift = mb.layer(l, 1);
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < n; ++j) y[i * n + j] = shift[j] + y[i * n + j] * scale[j];
          if (l == hidden_layers - 1)
            for (int64_t i = 0; i < rows; ++i) probes[(first + i) * members + m] = y[i * n + probe];
          map(rows * n, y.data(), x.data(), [&](vw v) { return activate(v, s.activation); });
        }
        const int64_t last = widths[hidden_layers];
        PART(kProducts);
        gemm(rows, classes, last, x.data(), last, 1, mb.weight(hidden_layers), classes, y.data(), classes);
        PART(kElementwise);
        const float* bias_out = mb.bias_out();
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < classes; ++c)
            logits[((first + i) * members + m) * classes + c] = y[i * classes + c] + bias_out[c];
      }
    });
  } catch (...) {  // out of memory, or no threads: Python raises
    return 2;
  }
  return 0;
}

// Alg. 2, steps 8-10, for members [0, members), all with BN (the stack's BN members come first): the
// training-mode forward pass of each mini-batch examples[b * batch, + batch), b < batches, each BN normalizing
// with that batch's own mean and biased variance (Alg. 1; nothing is updated), and per member and hidden layer
// the sums over the batches of the batch means and of the unbiased batch variances m/(m-1) sigma2_B:
// mean_sums, var_sums (members, hidden units of every layer, layer after layer), written here.
//
// Why these forms: the torch engine (MLPStack.estimate_population, PopulationSums) computes each batch's
// statistics in float32, then widens them to double, multiplies each variance by m/(m-1) and sums in double;
// the same here, so the estimates differ only by the float32 rounding of the forward pass. A float32 sum of
// 1,000 batches would add rounding of its own beyond that (tens of ulp: ~sqrt(1000) roundings of 1/2 ulp). The
// output layer is not computed: Alg. 2 needs only the BN inputs. params as in training (gamma, beta, -, - per
// hidden layer).
// Returns 0; 1 for a shape it cannot run (or batches of fewer than two examples, which have no variance);
// 2 when it ran out of memory or threads.
int bnrepro_mlp_population(int64_t hidden_layers, const int64_t* widths, int64_t w0_stride, int64_t activation,
                           float bn_eps, int64_t members, float** params, int64_t batches, int64_t batch,
                           const int64_t* examples, const int64_t* offsets, const int32_t* pixels, double* mean_sums,
                           double* var_sums, int64_t threads) {
  const FlushDenormals flush;  // the calling thread's MXCSR is restored on return
  const Shape s{hidden_layers, widths, w0_stride, activation, bn_eps, 0.0f};
  if (hidden_layers < 1 || s.min_cols() < 8 || batch < 2) return 1;
  try {
    const int64_t units = s.units_before(hidden_layers), n1 = widths[1];
    const int64_t runs = (batches + kPopulationRun - 1) / kPopulationRun;
    int64_t widest = 0;
    for (int64_t l = 1; l <= hidden_layers; ++l) widest = std::max(widest, widths[l]);
    const double unbias = static_cast<double>(batch) / static_cast<double>(batch - 1);  // as Python's m / (m - 1)
    // per work item (run r, member m) at r * members + m: its sums of means, then of variances
    std::vector<double> partial(2 * runs * members * units, 0.0);
    // Each mini-batch by input feature, shared by all members, where the first layer goes by feature (as training)
    const FeatureLayouts layouts(threads, kByFeature ? batches : 0, batch, batches * batch, examples, offsets, pixels,
                                 widths[0]);
    parallel(threads, runs * members, [&](int64_t item) {
      PART_SCOPE(kSetup);
      const int64_t m = item % members, run = item / members;
      const Member mb{params + m * (5 * hidden_layers + 2), hidden_layers};
      thread_local std::vector<float> w0, x, z, stats;
      w0.resize(widths[0] * n1), x.resize(batch * widest), z.resize(batch * widest), stats.resize(3 * widest);
      // the member's first weight copied out contiguously first, as in inference: its rows lie a page apart
      for (int64_t p = 0; p < widths[0]; ++p)
        std::memcpy(&w0[p * n1], mb.weight(0) + p * w0_stride, n1 * sizeof(float));
      double* mean_acc = partial.data() + 2 * item * units;
      double* var_acc = mean_acc + units;
      float *mean = stats.data(), *var = mean + widest, *inv_std = var + widest;
      for (int64_t b = run * kPopulationRun; b < std::min(batches, (run + 1) * kPopulationRun); ++b) {
        for (int64_t l = 0; l < hidden_layers; ++l) {
          const int64_t n = widths[l + 1], k = widths[l], at = s.units_before(l);
          PART(l == 0 ? kSparse : kProducts);
          if (l == 0 && kByFeature)
            binary_matmul_by_feature(batch, k, layouts.offsets(b), layouts.rows(b), w0.data(), n1, n, z.data());
          else if (l == 0) binary_matmul(batch, examples + b * batch, offsets, pixels, w0.data(), n1, n, z.data());
          else gemm(batch, n, k, x.data(), k, 1, mb.weight(l), n, z.data(), n);
          PART(kBn);
          bn_statistics(batch, n, z.data(), mb.layer(l, 0), mb.layer(l, 1), bn_eps, mean, var, inv_std,
                        l + 1 < hidden_layers ? x.data() : nullptr);  // the last layer's output: not needed
          for (int64_t j = 0; j < n; ++j) {
            mean_acc[at + j] += static_cast<double>(mean[j]);
            var_acc[at + j] += static_cast<double>(var[j]) * unbias;
          }
          PART(kElementwise);
          if (l + 1 < hidden_layers) map(batch * n, x.data(), x.data(), [&](vw v) { return activate(v, activation); });
        }
      }
    });
    for (int64_t m = 0; m < members; ++m)  // the runs' sums in run order, whichever thread made them
      for (int64_t u = 0; u < units; ++u) {
        double mean_total = 0.0, var_total = 0.0;
        for (int64_t run = 0; run < runs; ++run) {
          const double* sums = partial.data() + 2 * (run * members + m) * units;
          mean_total += sums[u];
          var_total += sums[units + u];
        }
        mean_sums[m * units + u] = mean_total;
        var_sums[m * units + u] = var_total;
      }
  } catch (...) {  // out of memory, or no threads: Python raises
    return 2;
  }
  return 0;
}

#ifdef BNREPRO_PART_TIMES
// The ticks of the time stamp counter each part took (in the order of enum Part) since the last call, in
// out[0, min(n, parts)), then set to 0; returns the number of parts. Only in the measuring copy of the kernel.
int64_t bnrepro_mlp_part_times(double* out, int64_t n) {
  for (int p = 0; p < kParts; ++p) {
    const uint64_t total = part_totals[p].exchange(0);
    if (p < n) out[p] = static_cast<double>(total);
  }
  return kParts;
}

// The time stamp counter now, to convert ticks into seconds.
uint64_t bnrepro_mlp_ticks() { return ticks(); }
#endif

}  // extern "C"
