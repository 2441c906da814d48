// MetaEmbed late-interaction scoring under a retrieval budget (paper §3.2, Eq. 3-4):
//
//   score[q, n] = sum_{i < r_q} max_{j < r_c} < Q[q, i, :], C[n, j, :] >
//
// Q is [nq, R_q, D] and C is [N, R_c, D] (bf16 / fp16 / fp32, any strides, in elements); only the
// first r_q / r_c vectors are read, through the strides, so a budget never copies the index.
// Scores are fp32 [nq, N] (row stride ldo), accumulation is fp32.
//
// One tiled kernel, two inner-product engines:
//   * tensor cores (WMMA bf16/fp16 -> fp32) for 16-bit inputs,
//   * SIMT fp32 FMAs for fp32 inputs (and on request for any dtype).
// The block tile is BM flattened query vectors x BN flattened candidate vectors, i.e. a tile of the
// GEMM [nq*r_q, D] x [D, N*r_c].  Rows are padded per query to pq = next_pow2(r_q) and columns per
// candidate to pc = next_pow2(r_c) so that a tile holds whole queries and whole candidates; the
// max over r_c and the sum over r_q are fused into the epilogue, so [nq, N, r_q, r_c] never exists.
//   * Few queries (nq * pq <= 16): BM = 16, a single row tile; every block streams its own tile of
//     candidates exactly once (16-byte cp.async loads, 2-stage pipeline) while the queries' k-slice
//     sits in shared memory: the memory-bound regime.
//   * Many queries: BM = 64, grouped rasterisation (a group of row tiles sweeps the candidates
//     together so each candidate tile is read from DRAM once per group and reused from L2): the
//     compute-bound regime.
//   * r_c > BN: the candidate's vectors are processed in chunks of BN with a running max.
//     r_q > BM: a query spans several row tiles whose partial sums are atomically added.
// Padding rows (i >= r_q) are zero and left out of the sum over r_q; padding columns (j >= r_c)
// duplicate vector r_c - 1, so they leave the max unchanged.  NaN propagates as in PyTorch.
//
// Host API (extern "C", loaded with ctypes; no torch headers needed): see the bottom of the file.
// Build: nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode arch=compute_90,code=sm_90 ...
// Emulation (tests without a GPU): g++ -x c++ -DMETAEMBED_EMULATE (see emulate.cuh).

#include <cstddef>
#include <cstdint>

#if defined(METAEMBED_EMULATE)
#include "emulate.cuh"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#define METAEMBED_ABI_VERSION 1

namespace me {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kRowBytes = 128;                        // bytes of one vector in one k-slice
constexpr int kSmemRowBytes = kRowBytes + 16;         // +16 B padding against bank conflicts
constexpr int kChunksPerRow = kRowBytes / 16;         // 16-byte loads per row per k-slice
constexpr int64_t kL2GroupBytes = 8ll << 20;          // query bytes a rasterisation group keeps in L2
constexpr int64_t kMaxBlocksPerLaunch = (1ll << 31) - 1;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Algo : int { kAuto = 0, kSimt = 1, kTensorCore = 2 };
enum Status : int {
  kOk = 0,
  kErrDType = -1,
  kErrShape = -2,
  kErrAlgo = -3,
  kErrTile = -4,
};

struct Params {
  const void* q;
  const void* c;
  float* out;
  int64_t nq, n, rq, rc, d;
  int64_t sq0, sq1, sq2;  // query strides (elements)
  int64_t sc0, sc1, sc2;  // candidate strides (elements)
  int64_t ldo;            // output row stride (elements)
  int pq, lpq, qpt, rtpq;  // rows per query slot (pow2) and its log2, query slots per row tile, row tiles per query
  int pc, lpc, cpt, jch;   // cols per candidate slot (pow2) and its log2, candidate slots per col tile, col chunks
  int64_t row_tiles, col_tiles, group_rows, pid_offset;
  int split;  // a query spans several row tiles: atomicAdd into a zeroed output
};

template <typename T> struct Word;  // raw storage word of an element type
template <> struct Word<float> { using type = uint32_t; };
template <> struct Word<__half> { using type = uint16_t; };
template <> struct Word<__nv_bfloat16> { using type = uint16_t; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
// max over r_c that propagates NaN like torch.amax (the PyTorch path): fmaxf would drop a NaN
// similarity and give a candidate with a corrupted vector a finite, plausible score
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// ---------------------------------------------------------------------------------------------
// async copies (sm_80+); emulated as copies that land at the wait retiring their group (emulate.cuh)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(METAEMBED_EMULATE)
  emu::cp_async16(smem, gmem, valid);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_size));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(METAEMBED_EMULATE)
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(METAEMBED_EMULATE)
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---------------------------------------------------------------------------------------------
// tile geometry: which query vector / candidate vector a tile row / column holds
// ---------------------------------------------------------------------------------------------

// Element offset of tile row r (query q, vector i), or -1 for a padding row (zero-filled).
__device__ __forceinline__ int64_t a_row_offset(const Params& p, int64_t q_base, int64_t i_base, int r) {
  const int64_t q = q_base + (r >> p.lpq);
  const int64_t i = i_base + (r & (p.pq - 1));
  return (q < p.nq && i < p.rq) ? q * p.sq0 + i * p.sq1 : -1;
}

// Element offset of tile column c (candidate n, vector j), or -1 past the last candidate.
// Columns j >= r_c re-read vector r_c - 1: a duplicate cannot change the max over j.
__device__ __forceinline__ int64_t b_row_offset(const Params& p, int64_t n_base, int64_t j_base, int c) {
  const int64_t n = n_base + (c >> p.lpc);
  int64_t j = j_base + (c & (p.pc - 1));
  j = j < p.rc ? j : p.rc - 1;
  return n < p.n ? n * p.sc0 + j * p.sc1 : -1;
}

// Loads the k-slice [k0, k0 + BK) of ROWS vectors into a shared-memory stage [ROWS][LDS].
template <typename T, bool VEC, int ROWS>
struct SliceLoader {
  using W = typename Word<T>::type;
  static constexpr int BK = kRowBytes / sizeof(T);
  static constexpr int LDS = kSmemRowBytes / sizeof(T);
  static constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int VEC_ITERS = (ROWS * kChunksPerRow + kThreads - 1) / kThreads;

  int64_t off[VEC ? VEC_ITERS : 1];  // per-thread row offsets (VEC path)

  template <class RowOffset>
  __device__ __forceinline__ void prepare(int tid, RowOffset row_offset) {
    if constexpr (VEC) {
#pragma unroll
      for (int it = 0; it < VEC_ITERS; ++it) {
        const int e = tid + it * kThreads;
        off[it] = e < ROWS * kChunksPerRow ? row_offset(e / kChunksPerRow) : -1;
      }
    }
  }

  template <class RowOffset>
  __device__ __forceinline__ void load(T* stage, const T* __restrict__ g, int64_t k0, int64_t d, int64_t s2,
                                       int tid, RowOffset row_offset) const {
    if constexpr (VEC) {
#pragma unroll
      for (int it = 0; it < VEC_ITERS; ++it) {
        const int e = tid + it * kThreads;
        if (e < ROWS * kChunksPerRow) {
          const int r = e / kChunksPerRow, ch = e % kChunksPerRow;
          const int64_t k = k0 + ch * EPC;
          const bool valid = off[it] >= 0 && k < d;  // d % EPC == 0: a chunk is all in or all out
          cp_async16(stage + r * LDS + ch * EPC, valid ? g + off[it] + k : g, valid);
        }
      }
    } else {
      W* dst = reinterpret_cast<W*>(stage);
      const W* src = reinterpret_cast<const W*>(g);
      for (int e = tid; e < ROWS * BK; e += kThreads) {
        const int r = e / BK, kk = e % BK;
        const int64_t k = k0 + kk;
        const int64_t o = row_offset(r);
        dst[r * LDS + kk] = (o >= 0 && k < d) ? src[o + k * s2] : W(0);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// inner-product engines: accumulate the BM x BN dot products of one column chunk
// ---------------------------------------------------------------------------------------------

// Tensor cores: 8 warps, warp tile WM x WN of 16x16x16 WMMA fragments, fp32 accumulators.
template <typename T, int BM, int BN>
struct WmmaEngine {
  static constexpr int BK = kRowBytes / sizeof(T);
  static constexpr int LDS = kSmemRowBytes / sizeof(T);
  static constexpr int WARPS_M = BM >= 32 ? BM / 32 : 1;
  static constexpr int WARPS_N = (kThreads / 32) / WARPS_M;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int FM = WM / 16, FN = WN / 16;
  static_assert(sizeof(T) == 2, "tensor-core engine takes fp16 / bf16");
  static_assert(FM >= 1 && FN >= 1 && WM % 16 == 0 && WN % 16 == 0, "bad warp tiling");

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN], best[FM][FN];
  int wm, wn;

  __device__ __forceinline__ explicit WmmaEngine(int tid) {
    const int warp = tid / 32;
    wm = warp / WARPS_N;
    wn = warp % WARPS_N;
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(a[i], As + (wm * WM + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * WN + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  // running max over column chunks (same fragment layout, so elementwise is exact)
  __device__ __forceinline__ void merge(bool first) {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int t = 0; t < best[i][j].num_elements; ++t)
          best[i][j].x[t] = first ? acc[i][j].x[t] : nan_max(best[i][j].x[t], acc[i][j].x[t]);
  }
  // the running max (MULTI) or the single column chunk's dot products
  template <bool MULTI>
  __device__ __forceinline__ void store(float* Cs, int ldc) const {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::store_matrix_sync(Cs + (wm * WM + i * 16) * ldc + wn * WN + j * 16, MULTI ? best[i][j] : acc[i][j],
                                ldc, wmma::mem_row_major);
  }
};

// CUDA cores: 16 x 16 threads, each owns TM x TN outputs (rows ty + 16 a, columns tx + 16 b).
template <typename T, int BM, int BN>
struct SimtEngine {
  static constexpr int BK = kRowBytes / sizeof(T);
  static constexpr int LDS = kSmemRowBytes / sizeof(T);
  static constexpr int TM = BM / 16, TN = BN / 16;
  static_assert(TM >= 1 && TN >= 1, "bad thread tiling");

  float acc[TM][TN], best[TM][TN];
  int ty, tx;

  __device__ __forceinline__ explicit SimtEngine(int tid) : ty(tid / 16), tx(tid % 16) {}
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) acc[a][b] = 0.0f;
  }
  __device__ __forceinline__ void step(const T* As, const T* Bs) {
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float av[TM], bv[TN];
#pragma unroll
      for (int a = 0; a < TM; ++a) av[a] = to_f32(As[(ty + 16 * a) * LDS + k]);
#pragma unroll
      for (int b = 0; b < TN; ++b) bv[b] = to_f32(Bs[(tx + 16 * b) * LDS + k]);
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) acc[a][b] = fmaf(av[a], bv[b], acc[a][b]);
    }
  }
  __device__ __forceinline__ void merge(bool first) {
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) best[a][b] = first ? acc[a][b] : nan_max(best[a][b], acc[a][b]);
  }
  template <bool MULTI>
  __device__ __forceinline__ void store(float* Cs, int ldc) const {
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) Cs[(ty + 16 * a) * ldc + tx + 16 * b] = MULTI ? best[a][b] : acc[a][b];
  }
};

template <typename T, int BM, int BN>
struct TileShape {
  static constexpr int LDC = BN + 4;  // fp32 epilogue tile row stride (multiple of 4 for WMMA)
  static constexpr int A_BYTES = BM * kSmemRowBytes;
  static constexpr int B_BYTES = BN * kSmemRowBytes;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int PIPE_BYTES = 2 * STAGE_BYTES;
  static constexpr int EPI_BYTES = BM * LDC * 4;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
};

#if !defined(METAEMBED_EMULATE)
extern __shared__ __align__(128) unsigned char me_dyn_smem[];
#define ME_SMEM me_dyn_smem
#define ME_LAUNCH(kfn, grid, block, smem, stream, ...) kfn<<<grid, block, smem, stream>>>(__VA_ARGS__)
#else
#define ME_SMEM (emu::dyn_smem())
#endif

// ---------------------------------------------------------------------------------------------
// the kernel: one block = one (row tile, column tile) of the flattened GEMM, fused epilogue
// ---------------------------------------------------------------------------------------------
// MULTI: r_c > BN, so the columns of a candidate span p.jch > 1 chunks and a running max is kept
// (a second set of accumulators, compiled out when MULTI is false: it costs registers).
template <class Engine, typename T, bool VEC, int BM, int BN, bool MULTI>
__global__ void __launch_bounds__(kThreads, 2) maxsim_kernel(Params p) {
  using Shape = TileShape<T, BM, BN>;
  constexpr int BK = kRowBytes / sizeof(T);
  constexpr int LDC = Shape::LDC;
  const int tid = threadIdx.x;

  const int64_t pid = p.pid_offset + static_cast<int64_t>(blockIdx.x);
  if (pid >= p.row_tiles * p.col_tiles) return;  // whole block

  // grouped rasterisation: group_rows consecutive row tiles walk the column tiles together
  const int64_t per_group = p.group_rows * p.col_tiles;
  const int64_t group = pid / per_group;
  const int64_t first_row = group * p.group_rows;
  const int64_t rows_in_group = min64(p.row_tiles - first_row, p.group_rows);
  const int64_t local = pid - group * per_group;
  const int64_t rt = first_row + local % rows_in_group;
  const int64_t ct = local / rows_in_group;

  const int64_t q_base = (rt / p.rtpq) * p.qpt;  // first query of the tile
  const int64_t i_base = (rt % p.rtpq) * BM;     // first query vector (split queries)
  const int64_t n_base = ct * p.cpt;             // first candidate of the tile

  unsigned char* smem = ME_SMEM;
  // stage s of the 2-stage pipeline: A tile then B tile (pointer arithmetic, not an array indexed at
  // run time, which would live in local memory)
  auto As = [smem](int s) { return reinterpret_cast<T*>(smem + s * Shape::STAGE_BYTES); };
  auto Bs = [smem](int s) { return reinterpret_cast<T*>(smem + s * Shape::STAGE_BYTES + Shape::A_BYTES); };
  float* Cs = reinterpret_cast<float*>(smem);  // epilogue tile, reuses the pipeline buffers

  const T* Q = static_cast<const T*>(p.q);
  const T* C = static_cast<const T*>(p.c);
  const int64_t ktiles = (p.d + BK - 1) / BK;

  auto a_off = [&](int r) { return a_row_offset(p, q_base, i_base, r); };
  SliceLoader<T, VEC, BM> a_loader;
  SliceLoader<T, VEC, BN> b_loader;
  a_loader.prepare(tid, a_off);

  Engine eng(tid);
  const int jch = MULTI ? p.jch : 1;
  for (int jc = 0; jc < jch; ++jc) {
    const int64_t j_base = static_cast<int64_t>(jc) * BN;
    auto b_off = [&](int c) { return b_row_offset(p, n_base, j_base, c); };
    b_loader.prepare(tid, b_off);
    eng.zero();

    a_loader.load(As(0), Q, 0, p.d, p.sq2, tid, a_off);
    b_loader.load(Bs(0), C, 0, p.d, p.sc2, tid, b_off);
    cp_async_commit();
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int cur = static_cast<int>(kt & 1);
      if (kt + 1 < ktiles) {  // prefetch the next k-slice into the other stage
        a_loader.load(As(cur ^ 1), Q, (kt + 1) * BK, p.d, p.sq2, tid, a_off);
        b_loader.load(Bs(cur ^ 1), C, (kt + 1) * BK, p.d, p.sc2, tid, b_off);
      }
      cp_async_commit();
      cp_async_wait<1>();  // everything but the newest group: stage `cur` has landed
      __syncthreads();
      eng.step(As(cur), Bs(cur));
      __syncthreads();  // stage `cur` is overwritten by the next prefetch
    }
    if (MULTI) eng.merge(jc == 0);
  }
  cp_async_wait<0>();
  __syncthreads();

  // epilogue 1: dot products -> shared memory, max over the pc columns of each candidate slot
  eng.template store<MULTI>(Cs, LDC);
  __syncthreads();
  const int pc = p.pc, pq = p.pq, cpt = p.cpt, qpt = p.qpt;
  for (int e = tid; e < BM * cpt; e += kThreads) {
    const int r = e % BM, cs = e / BM;
    float* row = Cs + r * LDC + cs * pc;
    float m = row[0];
    for (int c = 1; c < pc; ++c) m = nan_max(m, row[c]);
    row[0] = m;  // each thread owns its segment: in-place is safe
  }
  __syncthreads();
  // epilogue 2: sum over the rows i < r_q of each query slot -> score[q, n].  The zero padding rows
  // are skipped, not added: 0 * inf = NaN would turn a +-inf score into NaN
  const int rows = static_cast<int>(min64(pq, p.rq - i_base));
  for (int e = tid; e < qpt * cpt; e += kThreads) {
    const int qs = e / cpt, cs = e % cpt;
    const int64_t q = q_base + qs, n = n_base + cs;
    if (q >= p.nq || n >= p.n) continue;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += Cs[(qs * pq + r) * LDC + cs * pc];
    if (p.split)
      atomicAdd(p.out + q * p.ldo + n, s);
    else
      p.out[q * p.ldo + n] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// host side: planning and launch
// ---------------------------------------------------------------------------------------------
inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}
inline int ilog2(int x) {
  int l = 0;
  while ((1 << l) < x) ++l;
  return l;
}

struct Plan {
  int algo;  // kSimt / kTensorCore
  int bm, bn;
  int vec;
  Params p;
};

inline int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Fills the tiling of `p` for a BM x BN tile.
inline void plan_tiles(Params& p, int bm, int bn, int esize) {
  if (p.rq <= bm) {
    p.pq = next_pow2(p.rq);
    p.rtpq = 1;
  } else {
    p.pq = bm;
    p.rtpq = static_cast<int>((p.rq + bm - 1) / bm);
  }
  p.lpq = ilog2(p.pq);
  p.qpt = bm / p.pq;
  p.split = p.rtpq > 1;
  if (p.rc <= bn) {
    p.pc = next_pow2(p.rc);
    p.jch = 1;
  } else {
    p.pc = bn;
    p.jch = static_cast<int>((p.rc + bn - 1) / bn);
  }
  p.lpc = ilog2(p.pc);
  p.cpt = bn / p.pc;
  p.row_tiles = ((p.nq + p.qpt - 1) / p.qpt) * p.rtpq;
  p.col_tiles = (p.n + p.cpt - 1) / p.cpt;
  const int64_t rows_bytes = static_cast<int64_t>(bm) * p.d * esize;
  p.group_rows = max64(1, min64(p.row_tiles, kL2GroupBytes / max64(1, rows_bytes)));
  p.pid_offset = 0;
}

// Chooses engine and tile; returns a Status.
inline int make_plan(int dtype, const void* q, const void* c, float* out, int64_t nq, int64_t n, int64_t rq,
                     int64_t rc, int64_t d, int64_t sq0, int64_t sq1, int64_t sq2, int64_t sc0, int64_t sc1,
                     int64_t sc2, int64_t ldo, int algo, int tile_m, Plan& plan) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) return kErrDType;
  if (nq < 0 || n < 0 || rq < 1 || rc < 1 || d < 1 || ldo < n) return kErrShape;
  // offset -1 marks a padding row (a_row_offset / b_row_offset): a negative stride (a reversed view from
  // numpy or CuPy) would make real rows read as zeros
  if (sq0 < 0 || sq1 < 0 || sq2 < 0 || sc0 < 0 || sc1 < 0 || sc2 < 0) return kErrShape;
  if (algo == kAuto) algo = dtype == kF32 ? kSimt : kTensorCore;
  if (algo != kSimt && algo != kTensorCore) return kErrAlgo;
  if (algo == kTensorCore && dtype == kF32) return kErrAlgo;
  if (tile_m == 0) tile_m = (rq <= 16 && nq * next_pow2(rq) <= 16) ? 16 : 64;
  if (tile_m != 16 && tile_m != 64) return kErrTile;

  const int esize = elem_size(dtype);
  const int64_t epc = 16 / esize;
  auto ok = [epc](int64_t stride, int64_t extent) { return extent <= 1 || stride % epc == 0; };
  const bool vec = sq2 == 1 && sc2 == 1 && d % epc == 0 && ok(sq0, nq) && ok(sq1, rq) && ok(sc0, n) &&
                   ok(sc1, rc) && aligned16(q) && aligned16(c);

  Params& p = plan.p;
  p.q = q;
  p.c = c;
  p.out = out;
  p.nq = nq;
  p.n = n;
  p.rq = rq;
  p.rc = rc;
  p.d = d;
  p.sq0 = sq0;
  p.sq1 = sq1;
  p.sq2 = sq2;
  p.sc0 = sc0;
  p.sc1 = sc1;
  p.sc2 = sc2;
  p.ldo = ldo;
  plan.algo = algo;
  plan.bm = tile_m;
  plan.bn = 128;
  plan.vec = vec ? 1 : 0;
  plan_tiles(p, plan.bm, plan.bn, esize);
  return kOk;
}

template <class Engine, typename T, bool VEC, int BM, int BN>
int launch_tiles(Params p, cudaStream_t stream) {
  using Shape = TileShape<T, BM, BN>;
  void (*kfn)(Params) =
      p.jch > 1 ? maxsim_kernel<Engine, T, VEC, BM, BN, true> : maxsim_kernel<Engine, T, VEC, BM, BN, false>;
  const int smem = Shape::SMEM_BYTES;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kfn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t total = p.row_tiles * p.col_tiles;
  for (int64_t start = 0; start < total; start += kMaxBlocksPerLaunch) {
    p.pid_offset = start;
    const unsigned blocks = static_cast<unsigned>(min64(total - start, kMaxBlocksPerLaunch));
    ME_LAUNCH(kfn, dim3(blocks), dim3(kThreads), smem, stream, p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return kOk;
}

template <typename T, bool VEC>
int dispatch_engine(const Plan& plan, cudaStream_t stream) {
  if (plan.algo == kSimt) {
    if (plan.bm == 16) return launch_tiles<SimtEngine<T, 16, 128>, T, VEC, 16, 128>(plan.p, stream);
    return launch_tiles<SimtEngine<T, 64, 128>, T, VEC, 64, 128>(plan.p, stream);
  }
  if constexpr (sizeof(T) == 2) {
    if (plan.bm == 16) return launch_tiles<WmmaEngine<T, 16, 128>, T, VEC, 16, 128>(plan.p, stream);
    return launch_tiles<WmmaEngine<T, 64, 128>, T, VEC, 64, 128>(plan.p, stream);
  }
  return kErrAlgo;
}

template <typename T>
int dispatch_vec(const Plan& plan, cudaStream_t stream) {
  return plan.vec ? dispatch_engine<T, true>(plan, stream) : dispatch_engine<T, false>(plan, stream);
}

}  // namespace me

// =============================================================================================
// C ABI (ctypes).  Sizes and strides are in elements; pointers are device pointers
// (tensor.data_ptr()) on CUDA device `device` (-1: keep the current one); `stream` is a cudaStream_t
// on that device (torch.cuda.current_stream(device).cuda_stream, 0 for the legacy default stream).
// Return value: 0 on success, < 0 for an argument error (metaembed_error_string), > 0 a cudaError_t.
// =============================================================================================
extern "C" {

int metaembed_abi_version() { return METAEMBED_ABI_VERSION; }

const char* metaembed_error_string(int code) {
  switch (code) {
    case me::kOk: return "success";
    case me::kErrDType: return "unsupported dtype code (expected 0=float32, 1=float16, 2=bfloat16)";
    case me::kErrShape: return "invalid sizes (need nq >= 0, N >= 0, r_q >= 1, r_c >= 1, D >= 1, ldo >= N, strides >= 0)";
    case me::kErrAlgo: return "unsupported algorithm (tensor cores need float16 or bfloat16 inputs)";
    case me::kErrTile: return "unsupported tile_m (expected 0=auto, 16 or 64)";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

// Which kernel a call would use: info = [algo, tile_m, tile_n, vectorised, row_tiles, col_tiles,
// group_rows, split, pq, pc, jch].  Returns a status like metaembed_maxsim.
int metaembed_plan(int dtype, const void* q, const void* c, int64_t nq, int64_t n, int64_t rq, int64_t rc,
                   int64_t d, int64_t sq0, int64_t sq1, int64_t sq2, int64_t sc0, int64_t sc1, int64_t sc2,
                   int algo, int tile_m, int64_t* info) {
  me::Plan plan;
  const int st = me::make_plan(dtype, q, c, nullptr, nq, n, rq, rc, d, sq0, sq1, sq2, sc0, sc1, sc2, n, algo,
                               tile_m, plan);
  if (st != me::kOk) return st;
  const me::Params& p = plan.p;
  const int64_t vals[11] = {plan.algo, plan.bm,       plan.bn,       plan.vec, p.row_tiles, p.col_tiles,
                            p.group_rows, p.split, p.pq, p.pc, p.jch};
  for (int i = 0; i < 11; ++i) info[i] = vals[i];
  return me::kOk;
}

// score[q, n] (fp32, row stride ldo) = sum_{i < rq} max_{j < rc} <Q[q, i], C[n, j]>  (Eq. 4).
int metaembed_maxsim(int dtype, const void* q, const void* c, float* out, int64_t nq, int64_t n, int64_t rq,
                     int64_t rc, int64_t d, int64_t sq0, int64_t sq1, int64_t sq2, int64_t sc0, int64_t sc1,
                     int64_t sc2, int64_t ldo, int algo, int tile_m, int device, void* stream) {
  me::Plan plan;
  const int st = me::make_plan(dtype, q, c, out, nq, n, rq, rc, d, sq0, sq1, sq2, sc0, sc1, sc2, ldo, algo,
                               tile_m, plan);
  if (st != me::kOk) return st;
  if (nq == 0 || n == 0) return me::kOk;
  // This library's (static) runtime has its own current device, but making it current also binds
  // that device's context to the thread, which the caller's runtime (torch) sees: restore it after.
  int prev = -1;
  if (device >= 0) {
    cudaError_t err = cudaGetDevice(&prev);
    if (err == cudaSuccess && prev != device) err = cudaSetDevice(device);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int status = me::kOk;
  if (plan.p.split) {  // partial sums are atomically added: zero the [nq, n] block (row stride ldo) only,
    // not the ldo - n floats after each row (a column slice of a larger buffer, or past its end)
    status = static_cast<int>(cudaMemset2DAsync(out, static_cast<size_t>(ldo) * sizeof(float), 0,
                                                static_cast<size_t>(n) * sizeof(float), static_cast<size_t>(nq), s));
  }
  if (status == me::kOk) {
    switch (dtype) {
      case me::kF32: status = me::dispatch_vec<float>(plan, s); break;
      case me::kF16: status = me::dispatch_vec<__half>(plan, s); break;
      default: status = me::dispatch_vec<__nv_bfloat16>(plan, s);
    }
  }
  if (prev >= 0 && prev != device) cudaSetDevice(prev);
  return status;
}

// 0 when a CUDA device is usable and this library has a kernel image for it (checks the arch).
int metaembed_probe() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (count == 0) return static_cast<int>(cudaErrorNoDevice);
  cudaFuncAttributes attr;
  void (*kfn)(me::Params) =
      me::maxsim_kernel<me::WmmaEngine<__nv_bfloat16, 64, 128>, __nv_bfloat16, true, 64, 128, false>;
  err = cudaFuncGetAttributes(&attr, kfn);
  return static_cast<int>(err);
}

}  // extern "C"
