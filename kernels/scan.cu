// scan.linear and its backward: h[t] = a[t] * h[t-1] + b[t] over [B, T, D] (D contiguous).
//
// Plan. Everything runs in *processing order* i = 0..T-1, the order the recurrence
// consumes steps: forward logical time for the forward pass, reversed for the backward
// pass, each possibly flipped again by `reverse`. In that order both passes are the
// first-order scan  state = a * state + beta  with beta = b (forward) or a * dh (backward,
// where state is q[s] = a[s] * g[s] and g = dL/dh including the future).
//
// A block owns 32 channels (x: lanes, one channel each, coalesced across the warp) of one
// batch row and one time chunk; its NK_SCAN_WARPS warps split each tile of
// WARPS * STEPS steps, a run of STEPS consecutive steps per warp. Per tile:
//   1. each thread loads its STEPS gate and beta values into registers (all loads issued
//      before first use) and reduces them to a pair (prod of gates, end state from zero);
//   2. pairs go to shared memory; one barrier; each thread folds the pairs of the warps
//      before it onto the block's running carry -> its own carry-in, and all warps fold the
//      whole tile -> the next tile's carry (redundantly, no second exchange); a second
//      barrier guards the shared pairs before the next tile rewrites them;
//   3. each thread re-runs its STEPS steps from its carry-in and writes the outputs.
// DRAM traffic: each input read once, each output written once. Bound: bytes.
//
// When B * ceil(D/32) blocks cannot fill the GPU, time is cut into chunks (grid.y): a
// summary kernel reduces every chunk to (prod, end) pairs, a carry kernel chains them per
// channel, and the main kernel starts each chunk from its carry. That costs one extra read
// of the inputs.
#include "common.cuh"
#include "scan.cuh"

namespace {

constexpr int kLanes = NK_SCAN_LANES;
constexpr int kWarps = NK_SCAN_WARPS;
constexpr int kSteps = NK_SCAN_STEPS;
constexpr int kTile = kWarps * kSteps;

struct Geometry {
  long long T, D;
  int groups;         // channel groups of 32 per batch row
  long long chunk;    // steps per time chunk (processing order)
  bool flip;          // processing index i -> time t = T-1-i

  __device__ __forceinline__ long long time_of(long long i) const { return flip ? T - 1 - i : i; }
};

// A block's coordinates: batch, channel, first and one-past-last processing step.
struct BlockPlace {
  long long batch, channel, i0, i1;
  bool active;  // channel < D
};

__device__ __forceinline__ BlockPlace place(const Geometry& g) {
  BlockPlace p;
  p.batch = blockIdx.x / g.groups;
  p.channel = (long long)(blockIdx.x % g.groups) * kLanes + threadIdx.x;
  p.i0 = (long long)blockIdx.y * g.chunk;
  p.i1 = min(p.i0 + g.chunk, g.T);
  p.active = p.channel < g.D;
  return p;
}

// Folds (prod, end) pairs of warps [0, upto) onto carry.
template <typename A>
__device__ __forceinline__ A fold(const A (*prod)[kLanes], const A (*end)[kLanes], int upto, A carry) {
  for (int w = 0; w < upto; ++w) carry = prod[w][threadIdx.x] * carry + end[w][threadIdx.x];
  return carry;
}

// Runs the tiles of [i0, i1) for one block. `load` fills a step's registers (gate, beta and
// an auxiliary value the apply step may need); `apply` advances the state by one step and
// writes that step's outputs. Returns the state after i1.
template <typename A, typename Loader, typename Apply>
__device__ __forceinline__ A run_tiles(const BlockPlace& p, A carry, Loader load, Apply apply) {
  __shared__ A prod_s[kWarps][kLanes];
  __shared__ A end_s[kWarps][kLanes];
  const int warp = threadIdx.y;
  for (long long tile = p.i0; tile < p.i1; tile += kTile) {
    const long long first = tile + (long long)warp * kSteps;
    A gate[kSteps], beta[kSteps], aux[kSteps];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) load(first + k, p.active && first + k < p.i1, gate[k], beta[k], aux[k]);
    A prod = A(1), end = A(0);
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      end = gate[k] * end + beta[k];
      prod = gate[k] * prod;
    }
    prod_s[warp][threadIdx.x] = prod;
    end_s[warp][threadIdx.x] = end;
    __syncthreads();
    A state = fold<A>(prod_s, end_s, warp, carry);
    carry = fold<A>(prod_s + warp, end_s + warp, kWarps - warp, state);
    __syncthreads();  // shared pairs are rewritten by the next tile
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if (p.active && first + k < p.i1) state = apply(first + k, gate[k], beta[k], aux[k], state);
    }
  }
  return carry;
}

// Masked-out steps load the identity pair (gate 1, beta 0).
template <typename T, typename A>
struct ForwardLoad {
  const T* a;
  const T* b;
  Geometry g;
  long long row0;  // offset of (batch, t = 0, channel)
  __device__ __forceinline__ void operator()(long long i, bool ok, A& gate, A& beta, A&) const {
    const long long off = row0 + g.time_of(i) * g.D;
    gate = ok ? to_acc(a[off]) : A(1);
    beta = ok ? to_acc(b[off]) : A(0);
  }
};

template <typename T, typename A>
struct ForwardApply {
  T* h;
  Geometry g;
  long long row0;
  __device__ __forceinline__ A operator()(long long i, A gate, A beta, A, A state) const {
    state = gate * state + beta;
    h[row0 + g.time_of(i) * g.D] = from_acc<T>(state);
    return state;
  }
};

// Backward: beta = a * dh; dh itself is kept (aux) for g = dh + q.
template <typename T, typename A>
struct BackwardLoad {
  const T* a;
  const T* dh;
  Geometry g;
  long long row0;
  __device__ __forceinline__ void operator()(long long i, bool ok, A& gate, A& beta, A& dh_i) const {
    const long long off = row0 + g.time_of(i) * g.D;
    dh_i = ok ? to_acc(dh[off]) : A(0);
    gate = ok ? to_acc(a[off]) : A(1);
    beta = gate * dh_i;
  }
};

template <typename T, typename A>
struct BackwardApply {
  const T* h;
  const T* h0;  // this batch row's h0 at `channel`, or null
  T* da;
  T* db;
  Geometry g;
  long long row0;
  long long h0_off;
  __device__ __forceinline__ A operator()(long long i, A gate, A, A dh_i, A state) const {
    const long long off = row0 + g.time_of(i) * g.D;
    const A grad = dh_i + state;
    // h at the step the recurrence ran just before this one: processing i + 1
    const bool first_step = i + 1 == g.T;  // logical step 0: its h[-1] is h0
    const T* prev_src = first_step ? h0 : h + row0 + g.time_of(i + 1) * g.D;
    const long long prev_off = first_step ? h0_off : 0;
    const A prev = prev_src ? to_acc(prev_src[prev_off]) : A(0);
    db[off] = from_acc<T>(grad);
    da[off] = from_acc<T>(grad * prev);
    return gate * grad;
  }
};

template <typename T>
__device__ __forceinline__ Geometry geometry(long long T_, long long D, long long chunk, bool flip) {
  Geometry g;
  g.T = T_;
  g.D = D;
  g.groups = (int)((D + kLanes - 1) / kLanes);
  g.chunk = chunk;
  g.flip = flip;
  return g;
}

// The carry entering this block's chunk: from the carry buffer [B, chunks, D] when the
// sequence was cut into chunks, else the initial state.
template <typename T, typename A>
__device__ __forceinline__ A carry_in(const BlockPlace& p, const Geometry& g, const A* carries, const T* init) {
  if (!p.active) return A(0);
  if (carries) return carries[(p.batch * gridDim.y + blockIdx.y) * g.D + p.channel];
  return init ? to_acc(init[p.batch * g.D + p.channel]) : A(0);
}

template <typename T>
__device__ void forward(const T* a, const T* b, const T* h0, const typename Acc<T>::type* carries, T* h,
                        long long T_, long long D, long long chunk, int reverse) {
  using A = typename Acc<T>::type;
  const Geometry g = geometry<T>(T_, D, chunk, reverse != 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  const A init = carry_in<T, A>(p, g, carries, h0);
  run_tiles<A>(p, init, ForwardLoad<T, A>{a, b, g, row0}, ForwardApply<T, A>{h, g, row0});
}

template <typename T>
__device__ void backward(const T* a, const T* h, const T* dh, const T* h0, const typename Acc<T>::type* carries,
                         T* da, T* db, T* dh0, long long T_, long long D, long long chunk, int reverse) {
  using A = typename Acc<T>::type;
  // backward runs logical time backwards: flipped unless the forward was reversed
  const Geometry g = geometry<T>(T_, D, chunk, reverse == 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  const A init = carry_in<T, A>(p, g, carries, (const T*)nullptr);
  const A q = run_tiles<A>(p, init, BackwardLoad<T, A>{a, dh, g, row0},
                           BackwardApply<T, A>{h, h0, da, db, g, row0, p.batch * D + p.channel});
  // the chunk holding the last processing step holds q at logical step 0: dh0
  if (p.active && threadIdx.y == 0 && p.i1 == g.T) dh0[p.batch * D + p.channel] = from_acc<T>(q);
}

// Chunk summaries: (prod, end) of each chunk from a zero state, in [B, chunks, D].
template <typename T, bool Backward>
__device__ void summary(const T* a, const T* beta_src, typename Acc<T>::type* prods, typename Acc<T>::type* ends,
                        long long T_, long long D, long long chunk, int reverse) {
  using A = typename Acc<T>::type;
  const Geometry g = geometry<T>(T_, D, chunk, Backward ? reverse == 0 : reverse != 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  A prod = A(1), end = A(0);
  // per-thread strided walk: thread y takes every kWarps-th step run; warp pairs are then
  // combined in order through shared memory
  __shared__ A prod_s[kWarps][kLanes];
  __shared__ A end_s[kWarps][kLanes];
  const long long span = p.i1 - p.i0;
  const long long per_warp = (span + kWarps - 1) / kWarps;
  const long long w0 = p.i0 + threadIdx.y * per_warp;
  const long long w1 = min(w0 + per_warp, p.i1);
  if (p.active) {
    for (long long i = w0; i < w1; i += kSteps) {
      A gate[kSteps], beta[kSteps];
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const bool ok = i + k < w1;
        const long long off = row0 + g.time_of(i + k) * g.D;
        gate[k] = ok ? to_acc(a[off]) : A(1);
        const A src = ok ? to_acc(beta_src[off]) : A(0);
        beta[k] = Backward ? gate[k] * src : src;
      }
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        end = gate[k] * end + beta[k];
        prod = gate[k] * prod;
      }
    }
  }
  prod_s[threadIdx.y][threadIdx.x] = prod;
  end_s[threadIdx.y][threadIdx.x] = end;
  __syncthreads();
  if (threadIdx.y == 0 && p.active) {
    A P = A(1), E = A(0);
    for (int w = 0; w < kWarps; ++w) {
      E = prod_s[w][threadIdx.x] * E + end_s[w][threadIdx.x];
      P = prod_s[w][threadIdx.x] * P;
    }
    const long long out = (p.batch * gridDim.y + blockIdx.y) * g.D + p.channel;
    prods[out] = P;
    ends[out] = E;
  }
}

// Chains chunk summaries per (batch, channel): carries[c] = state entering chunk c.
template <typename T>
__device__ void carry(const typename Acc<T>::type* prods, const typename Acc<T>::type* ends, const T* init,
                      typename Acc<T>::type* carries, long long B, long long D, long long chunks) {
  using A = typename Acc<T>::type;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * D) return;
  const long long batch = idx / D, channel = idx % D;
  A state = init ? to_acc(init[idx]) : A(0);
  for (long long c = 0; c < chunks; ++c) {
    const long long at = (batch * chunks + c) * D + channel;
    carries[at] = state;
    state = prods[at] * state + ends[at];
  }
}

}  // namespace

#define NK_SCAN_ENTRY_POINTS(T, NAME)                                                                           \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      scan_linear_fwd_##NAME(const T* a, const T* b, const T* h0, const Acc<T>::type* carries, T* h,           \
                             long long T_, long long D, long long chunk, int reverse) {                         \
    forward<T>(a, b, h0, carries, h, T_, D, chunk, reverse);                                                    \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      scan_linear_bwd_##NAME(const T* a, const T* h, const T* dh, const T* h0, const Acc<T>::type* carries,    \
                             T* da, T* db, T* dh0, long long T_, long long D, long long chunk, int reverse) {   \
    backward<T>(a, h, dh, h0, carries, da, db, dh0, T_, D, chunk, reverse);                                     \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      scan_linear_fwd_summary_##NAME(const T* a, const T* b, Acc<T>::type* prods, Acc<T>::type* ends,          \
                                     long long T_, long long D, long long chunk, int reverse) {                 \
    summary<T, false>(a, b, prods, ends, T_, D, chunk, reverse);                                                \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      scan_linear_bwd_summary_##NAME(const T* a, const T* dh, Acc<T>::type* prods, Acc<T>::type* ends,         \
                                     long long T_, long long D, long long chunk, int reverse) {                 \
    summary<T, true>(a, dh, prods, ends, T_, D, chunk, reverse);                                                \
  }                                                                                                             \
  extern "C" __global__ void scan_linear_carry_##NAME(const Acc<T>::type* prods, const Acc<T>::type* ends,      \
                                                      const T* init, Acc<T>::type* carries, long long B,        \
                                                      long long D, long long chunks) {                          \
    carry<T>(prods, ends, init, carries, B, D, chunks);                                                         \
  }

NK_SCAN_ENTRY_POINTS(float, f32)
NK_SCAN_ENTRY_POINTS(double, f64)
NK_SCAN_ENTRY_POINTS(__half, f16)
NK_SCAN_ENTRY_POINTS(__nv_bfloat16, bf16)
