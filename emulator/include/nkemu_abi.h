// nkemu_abi.h: what a host-compiled kernel module and the emulator runtime (libnkemu.so)
// share: the device-side entry points the kernels call, and the table a module exports.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace nkemu {
struct U3 {
  unsigned x, y, z;
};
struct Site {
  const char* file;
  int line;
};

// The running CUDA thread's coordinates (set by the scheduler before every switch into it).
extern thread_local U3 tl_thread_idx, tl_block_idx, tl_block_dim, tl_grid_dim;
extern thread_local unsigned tl_lane;

// Device-side entry points (src/runtime.cpp). Each may switch to another fiber.
void sync_block(Site s);                  // __syncthreads
void sync_warp(Site s, unsigned mask);    // __syncwarp and the first half of every collective
// Lanes of `mask` publish `value`; returns lane `src`'s value (a shuffle).
unsigned long long warp_exchange(Site s, unsigned mask, unsigned long long value, int src);
unsigned ballot(Site s, unsigned mask, int pred);
// A warp-wide exchange of pointers for the tensor-core emulation: every lane of the warp
// publishes `mine`; returns the 32 lanes' pointers, valid until warp_release().
void* const* warp_gather(Site s, void* mine);
void warp_release(Site s);
void* dynamic_smem();  // this block's `extern __shared__` memory
[[noreturn]] void fail(Site s, const char* what);

// ---- the module table (nkcc generates one per kernels/*.cu) ----
using Thunk = void (*)(void* fn, void** params);  // runs fn(*(A0*)params[0], ...)
struct Kernel {
  const char* name;
  void* fn;
  Thunk thunk;
  int nparams;
  int max_threads;  // __launch_bounds__, or 1024
  std::size_t param_size[32];
};
struct Module {
  int abi;  // kAbi
  const char* source;
  int nkernels;
  const Kernel* kernels;
  void (*touch_shared)();  // allocates this host thread's copy of the module's static shared memory
};
constexpr int kAbi = 1;

template <typename... A, std::size_t... I> void call_with(void* fn, void** p, std::index_sequence<I...>) {
  ((void (*)(A...))fn)(*(typename std::remove_reference<A>::type*)p[I]...);
}
template <typename... A> void thunk_of(void* fn, void** p) { call_with<A...>(fn, p, std::index_sequence_for<A...>{}); }
template <typename... A> Kernel kernel_of(const char* name, void (*fn)(A...), int max_threads) {
  static_assert(sizeof...(A) <= 32, "a kernel with more than 32 parameters");
  Kernel k{name, (void*)fn, &thunk_of<A...>, (int)sizeof...(A), max_threads, {}};
  const std::size_t sizes[] = {sizeof(A)..., 0};
  for (int i = 0; i < (int)sizeof...(A); ++i) k.param_size[i] = sizes[i];
  return k;
}
}  // namespace nkemu
