// CPU emulation of the small CUDA subset used by maxsim.cu, for testing on machines without a GPU.
//
//   g++ -std=c++17 -O2 -shared -fPIC -x c++ -DMETAEMBED_EMULATE maxsim.cu -o libmaxsim_emu.so
//
// The same extern "C" entry points then take host pointers.  Each block runs its 256 threads as
// cooperative fibers (ucontext) on one OS thread: a thread runs until __syncthreads(), then the next
// thread runs, so the result is deterministic, and a missing barrier (a thread reading shared memory
// that a higher-numbered thread has not written yet, or overwriting data a higher-numbered thread has
// not read yet) changes the result instead of passing by luck.  The mirror races (the lower-numbered
// thread writes first) pass; maxsim.cu's tiles are written and read by all threads, so each of its
// barriers guards races both ways (tests/test_kernels.py deletes each one).  Diverging barrier counts abort.
// WMMA fragments: lane 0 of each warp holds and computes the whole 16x16 tile and alone stores it
// (elementwise fragment ops in other lanes act on unused data).  This checks tile
// indexing, padding, strides, pipelining order (cp.async groups land at their wait, see below) and the
// fused epilogue, not timing or the hardware fragment layout.  Not for production use.  The emulator's
// state (built-in variables, scheduler, shared memory) is thread_local, so host threads may call the
// library concurrently (ctypes drops the GIL), each running its own launches, as each has its own current
// device in CUDA.
// Like a GPU, it reports (through cudaGetLastError, as the CUDA error codes) a 16-byte cp.async or a WMMA
// load/store whose address is not aligned (misaligned address), a cp.async or WMMA tile outside the block's
// dynamic shared memory (illegal address), and a launch with more than 48 KB of dynamic shared memory
// without the cudaFuncAttributeMaxDynamicSharedMemorySize opt-in, or an opt-in above 99 KB, the smallest
// limit of the sm_80+ GPUs (sm_86 / sm_89 / sm_120; sm_80 allows 163 KB, sm_90 227 KB) (invalid argument).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3_ {
  unsigned x, y, z;
};

inline thread_local uint3_ threadIdx{0, 0, 0};
inline thread_local uint3_ blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorNoDevice = 100;
constexpr cudaError_t cudaErrorIllegalAddress = 700;
constexpr cudaError_t cudaErrorMisalignedAddress = 716;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
};

namespace emu {
constexpr size_t kDefaultDynSmem = 48 * 1024;  // without the opt-in attribute
constexpr size_t kMaxDynSmem = 99 * 1024;      // opt-in limit of sm_86 / sm_89 / sm_120 (the smallest of sm_80+)
// first error since the last cudaGetLastError (a GPU's errors are sticky; one launch at a time here)
inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}
inline void fail(cudaError_t e) {
  if (last_error() == cudaSuccess) last_error() = e;
}
// dynamic shared memory opted in per kernel (cudaFuncSetAttribute)
inline std::vector<std::pair<const void*, size_t>>& smem_optin() {
  static thread_local std::vector<std::pair<const void*, size_t>> v;
  return v;
}
inline size_t smem_limit(const void* kernel) {
  for (const auto& kv : smem_optin())
    if (kv.first == kernel) return kv.second > kDefaultDynSmem ? kv.second : kDefaultDynSmem;
  return kDefaultDynSmem;
}
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered (emulated)";
    case cudaErrorMisalignedAddress: return "misaligned address (emulated)";
    default: return "emulated CUDA error";
  }
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynSmem) return cudaErrorInvalidValue;
  const void* key = reinterpret_cast<const void*>(kernel);
  for (auto& kv : emu::smem_optin())
    if (kv.first == key) {
      kv.second = static_cast<size_t>(value);
      return cudaSuccess;
    }
  emu::smem_optin().emplace_back(key, static_cast<size_t>(value));
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline int& emulated_current_device() {
  static thread_local int dev = 0;
  return dev;
}
inline cudaError_t cudaSetDevice(int d) {
  emulated_current_device() = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = emulated_current_device();
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t bytes, cudaStream_t) {
  std::memset(p, v, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset2DAsync(void* p, size_t pitch, int v, size_t width, size_t height, cudaStream_t) {
  for (size_t r = 0; r < height; ++r) std::memset(static_cast<unsigned char*>(p) + r * pitch, v, width);
  return cudaSuccess;
}

// ---- 16-bit float types (storage only; conversions to fp32) ----
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __half2float(__half h) {
  const uint32_t sign = (h.bits >> 15) & 1u, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float v;
  if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31)
    v = man ? NAN : INFINITY;
  else
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

inline float atomicAdd(float* p, float v) {  // one OS thread: a plain add is atomic
  const float old = *p;
  *p = old + v;
  return old;
}

namespace emu {

inline std::vector<unsigned char>& smem_buffer() {
  static thread_local std::vector<unsigned char> buf;
  return buf;
}
inline size_t& smem_size() {  // dynamic shared memory bytes of the running launch
  static thread_local size_t n = 0;
  return n;
}
// 128-byte aligned, as `extern __shared__ __align__(128)` (a std::vector's data is only 16-byte aligned)
inline unsigned char* dyn_smem() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(smem_buffer().data());
  return reinterpret_cast<unsigned char*>((p + 127) & ~static_cast<uintptr_t>(127));
}
inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }
// [p, p + bytes) inside the dynamic shared memory of this launch
inline bool in_smem(const void* p, size_t bytes) {
  const unsigned char* b = dyn_smem();
  const unsigned char* c = static_cast<const unsigned char*>(p);
  return c >= b && c + bytes <= b + smem_size();
}

// ---- cp.async groups (sm_80+) ----
// A GPU's cp.async lands at any time between its issue and the cp.async.wait_group that retires its group.
// Here a copy writes poison (0xFF bytes: NaN in fp32, fp16 and bf16) into its destination when issued and
// its data only at that wait: reading a stage before its wait (a wait depth too shallow, a missing wait) and
// overwriting a stage other threads still read (a missing barrier before the next prefetch) both change the
// scores, where a GPU would race.
struct AsyncCopy {
  void* dst;
  const void* src;
  bool valid;  // false: zero-fill, nothing is read
};
struct AsyncGroups {
  std::vector<AsyncCopy> open;                  // issued since the last commit
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
};
inline void land(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (c.valid)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
}

// ---- fibers ----
enum State { kReady = 0, kAtBarrier = 1, kDone = 2 };
struct Block {
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<int> state;
  std::vector<AsyncGroups> async;  // per thread
  int current = 0;
};
inline Block*& block() {
  static thread_local Block* b = nullptr;
  return b;
}
inline AsyncGroups& async_groups() { return block()->async[block()->current]; }

inline void cp_async16(void* dst, const void* src, bool valid) {
  if (!in_smem(dst, 16)) {  // nothing is written outside the block's shared memory
    fail(cudaErrorIllegalAddress);
    return;
  }
  if (!aligned(dst, 16) || (valid && !aligned(src, 16))) fail(cudaErrorMisalignedAddress);
  std::memset(dst, 0xFF, 16);
  async_groups().open.push_back({dst, src, valid});
}
inline void cp_async_commit() {
  AsyncGroups& g = async_groups();
  g.committed.push_back(std::move(g.open));
  g.open.clear();
}
inline void cp_async_wait(size_t newest_pending) {  // retire every committed group but the newest ones
  AsyncGroups& g = async_groups();
  while (g.committed.size() > newest_pending) {
    land(g.committed.front());
    g.committed.erase(g.committed.begin());
  }
}

inline void syncthreads() {
  Block* b = block();
  b->state[b->current] = kAtBarrier;
  swapcontext(&b->ctx[b->current], &b->sched);
}

struct LaunchBase {
  virtual void run_thread() = 0;
  virtual ~LaunchBase() = default;
};
inline LaunchBase*& active_launch() {
  static thread_local LaunchBase* l = nullptr;
  return l;
}
inline void fiber_entry() {
  active_launch()->run_thread();
  cp_async_commit();  // copies never waited for still land (after the thread's last access)
  cp_async_wait(0);
  block()->state[block()->current] = kDone;  // uc_link returns to the scheduler
}

template <class... P>
struct Launch : LaunchBase {
  void (*kernel)(P...);
  std::tuple<P...> args;
  Launch(void (*k)(P...), P... a) : kernel(k), args(a...) {}
  void run_thread() override { std::apply(kernel, args); }
};

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 blk, size_t smem, A... args) {
  if (grid.y != 1 || grid.z != 1 || blk.y != 1 || blk.z != 1) {
    std::fprintf(stderr, "emulate.cuh: only 1-D grids and blocks are emulated\n");
    std::abort();
  }
  if (smem > smem_limit(reinterpret_cast<const void*>(kernel))) {  // > 48 KB needs the opt-in attribute
    fail(cudaErrorInvalidValue);
    return;
  }
  Launch<P...> launch_obj(kernel, static_cast<P>(args)...);
  active_launch() = &launch_obj;
  gridDim = grid;
  blockDim = blk;
  const int nt = static_cast<int>(blk.x);
  Block b;
  b.ctx.resize(nt);
  b.stacks.assign(nt, std::vector<char>(256 * 1024));
  b.state.assign(nt, kReady);
  b.async.assign(nt, AsyncGroups{});
  block() = &b;
  smem_buffer().assign(smem + 128, 0);  // + room to align dyn_smem() to 128 bytes
  smem_size() = smem;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    blockIdx = {bx, 0, 0};
    std::memset(smem_buffer().data(), 0xA5, smem_buffer().size());  // garbage, like real smem
    for (int t = 0; t < nt; ++t) {
      getcontext(&b.ctx[t]);
      b.ctx[t].uc_stack.ss_sp = b.stacks[t].data();
      b.ctx[t].uc_stack.ss_size = b.stacks[t].size();
      b.ctx[t].uc_link = &b.sched;
      makecontext(&b.ctx[t], fiber_entry, 0);
      b.state[t] = kReady;
    }
    for (;;) {
      for (int t = 0; t < nt; ++t) {
        if (b.state[t] != kReady) continue;
        b.current = t;
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        swapcontext(&b.sched, &b.ctx[t]);
      }
      int at_barrier = 0, done = 0;
      for (int t = 0; t < nt; ++t) {
        at_barrier += b.state[t] == kAtBarrier;
        done += b.state[t] == kDone;
      }
      if (done == nt) break;
      if (done != 0) {
        std::fprintf(stderr, "emulate.cuh: block %u: %d threads exited while %d wait at __syncthreads\n", bx,
                     done, at_barrier);
        std::abort();
      }
      for (int t = 0; t < nt; ++t) b.state[t] = kReady;  // everyone arrived: release the barrier
    }
  }
  block() = nullptr;
  active_launch() = nullptr;
  smem_size() = 0;
}

}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }

#define ME_LAUNCH(kfn, grid, block, smem, stream, ...) emu::launch(kfn, grid, block, smem, __VA_ARGS__)

// ---- WMMA: lane 0 of each warp keeps the whole 16x16 tile (and alone stores it); other lanes skip ----
inline bool emu_lane0() { return threadIdx.x % 32 == 0; }
// WMMA load/store: 256-bit aligned pointer, ldm a multiple of 16 bytes (8 16-bit / 4 fp32 elements); a tile
// that starts in shared memory must end there
template <class T>
inline void emu_check_tile(const T* p, unsigned ldm) {
  if (!emu::aligned(p, 32) || (ldm * sizeof(T)) % 16 != 0) emu::fail(cudaErrorMisalignedAddress);
  const unsigned char* b = emu::dyn_smem();
  const unsigned char* c = reinterpret_cast<const unsigned char*>(p);
  if (c >= b && c < b + emu::smem_size() && !emu::in_smem(p, (15 * ldm + 16) * sizeof(T)))
    emu::fail(cudaErrorIllegalAddress);
}
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int num_elements = 256;
  float x[256];  // element (r, c) at x[r * 16 + c] (r = row of A / of the accumulator, c = k or col)
};

template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  if (!emu_lane0()) return;
  for (int t = 0; t < 256; ++t) f.x[t] = v;
}
template <class T>
inline float elem(const T& v) {
  return __bfloat162float(v);
}
template <>
inline float elem<__half>(const __half& v) {
  return __half2float(v);
}
template <class T>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  emu_check_tile(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) f.x[r * 16 + k] = elem(p[r * ldm + k]);
}
template <class T>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  if (!emu_lane0()) return;
  emu_check_tile(p, ldm);
  for (int c = 0; c < 16; ++c)
    for (int k = 0; k < 16; ++k) f.x[c * 16 + k] = elem(p[c * ldm + k]);  // stored transposed: [col][k]
}
template <class T>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d,
                     const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                     const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
                     const fragment<accumulator, 16, 16, 16, float, void>& c) {
  if (!emu_lane0()) return;
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k) s += a.x[r * 16 + k] * b.x[n * 16 + k];
      out[r * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f, unsigned ldm,
                              layout_t) {
  if (!emu_lane0()) return;
  emu_check_tile(p, ldm);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda
