// scan.linear, scan.linear_complex and their backward passes: h[t] = a[t] * h[t-1] + b[t]
// over [B, T, D] (D contiguous; complex: [B, T, D, 2], re/im interleaved).
//
// Plan. Everything runs in *processing order* i = 0..T-1, the order the recurrence
// consumes steps: forward logical time for the forward pass, reversed for the backward
// pass, each possibly flipped again by `reverse`. In that order both passes are the
// first-order scan  state = gate * state + beta: forward gate = a, beta = b; backward
// gate = conj(a), beta = conj(a) * dh, where state is q[s] = conj(a[s]) * g[s] and g is
// dL/dh including the future (conj is the identity for real numbers).
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

// The numbers a scan runs over, as traits: `V` is one channel's value in the accumulator
// type A. Loads and stores take the channel index; a complex channel is two interleaved
// values (re, im). For the scratch buffers (T = A) the same loads apply.
template <typename A>
struct RealNum {
  using V = A;
  static __device__ __forceinline__ V zero() { return A(0); }
  static __device__ __forceinline__ V one() { return A(1); }
  static __device__ __forceinline__ V add(V a, V b) { return a + b; }
  static __device__ __forceinline__ V mul(V a, V x) { return a * x; }
  static __device__ __forceinline__ V conj(V a) { return a; }
  template <typename T>
  static __device__ __forceinline__ V load(const T* p, long long i) { return to_acc(p[i]); }
  template <typename T>
  static __device__ __forceinline__ void store(T* p, long long i, V v) { p[i] = from_acc<T>(v); }
};

template <typename A>
struct Cplx {
  A re, im;
};

template <typename A>
struct ComplexNum {
  using V = Cplx<A>;
  static __device__ __forceinline__ V zero() { return {A(0), A(0)}; }
  static __device__ __forceinline__ V one() { return {A(1), A(0)}; }
  static __device__ __forceinline__ V add(V a, V b) { return {a.re + b.re, a.im + b.im}; }
  static __device__ __forceinline__ V mul(V a, V x) {
    return {a.re * x.re - a.im * x.im, a.re * x.im + a.im * x.re};
  }
  static __device__ __forceinline__ V conj(V a) { return {a.re, -a.im}; }
  template <typename T>
  static __device__ __forceinline__ V load(const T* p, long long i) { return {to_acc(p[2 * i]), to_acc(p[2 * i + 1])}; }
  template <typename T>
  static __device__ __forceinline__ void store(T* p, long long i, V v) {
    p[2 * i] = from_acc<T>(v.re);
    p[2 * i + 1] = from_acc<T>(v.im);
  }
};

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
template <typename N>
__device__ __forceinline__ typename N::V fold(const typename N::V (*prod)[kLanes], const typename N::V (*end)[kLanes],
                                              int upto, typename N::V carry) {
  for (int w = 0; w < upto; ++w) carry = N::add(N::mul(prod[w][threadIdx.x], carry), end[w][threadIdx.x]);
  return carry;
}

// Runs the tiles of [i0, i1) for one block. `load` fills a step's registers (gate, beta and
// an auxiliary value the apply step may need); `apply` advances the state by one step and
// writes that step's outputs. Returns the state after i1.
template <typename N, typename Loader, typename Apply>
__device__ __forceinline__ typename N::V run_tiles(const BlockPlace& p, typename N::V carry, Loader load, Apply apply) {
  using V = typename N::V;
  __shared__ V prod_s[kWarps][kLanes];
  __shared__ V end_s[kWarps][kLanes];
  const int warp = threadIdx.y;
  for (long long tile = p.i0; tile < p.i1; tile += kTile) {
    const long long first = tile + (long long)warp * kSteps;
    V gate[kSteps], beta[kSteps], aux[kSteps];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) load(first + k, p.active && first + k < p.i1, gate[k], beta[k], aux[k]);
    V prod = N::one(), end = N::zero();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      end = N::add(N::mul(gate[k], end), beta[k]);
      prod = N::mul(gate[k], prod);
    }
    prod_s[warp][threadIdx.x] = prod;
    end_s[warp][threadIdx.x] = end;
    __syncthreads();
    V state = fold<N>(prod_s, end_s, warp, carry);
    carry = fold<N>(prod_s + warp, end_s + warp, kWarps - warp, state);
    __syncthreads();  // shared pairs are rewritten by the next tile
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      if (p.active && first + k < p.i1) state = apply(first + k, gate[k], beta[k], aux[k], state);
    }
  }
  return carry;
}

// Masked-out steps load the identity pair (gate 1, beta 0).
template <typename T, typename N>
struct ForwardLoad {
  using V = typename N::V;
  const T* a;
  const T* b;
  Geometry g;
  long long row0;  // channel index of (batch, t = 0, channel)
  __device__ __forceinline__ void operator()(long long i, bool ok, V& gate, V& beta, V&) const {
    const long long off = row0 + g.time_of(i) * g.D;
    gate = ok ? N::load(a, off) : N::one();
    beta = ok ? N::load(b, off) : N::zero();
  }
};

template <typename T, typename N>
struct ForwardApply {
  using V = typename N::V;
  T* h;
  Geometry g;
  long long row0;
  __device__ __forceinline__ V operator()(long long i, V gate, V beta, V, V state) const {
    state = N::add(N::mul(gate, state), beta);
    N::store(h, row0 + g.time_of(i) * g.D, state);
    return state;
  }
};

// Backward runs q = conj(a)·(dh + q): the gate is conj(a), beta = conj(a)·dh, and dh itself
// is kept (aux) for g = dh + q.
template <typename T, typename N>
struct BackwardLoad {
  using V = typename N::V;
  const T* a;
  const T* dh;
  Geometry g;
  long long row0;
  __device__ __forceinline__ void operator()(long long i, bool ok, V& gate, V& beta, V& dh_i) const {
    const long long off = row0 + g.time_of(i) * g.D;
    dh_i = ok ? N::load(dh, off) : N::zero();
    gate = ok ? N::conj(N::load(a, off)) : N::one();
    beta = N::mul(gate, dh_i);
  }
};

template <typename T, typename N>
struct BackwardApply {
  using V = typename N::V;
  const T* h;
  const T* h0;  // null for a zero initial state
  T* da;
  T* db;
  Geometry g;
  long long row0;
  long long h0_off;
  __device__ __forceinline__ V operator()(long long i, V gate, V, V dh_i, V state) const {
    const long long off = row0 + g.time_of(i) * g.D;
    const V grad = N::add(dh_i, state);
    // h at the step the recurrence ran just before this one (processing i + 1); h0 there
    const bool first_step = i + 1 == g.T;
    const T* prev_src = first_step ? h0 : h;
    const long long prev_off = first_step ? h0_off : row0 + g.time_of(i + 1) * g.D;
    const V prev = prev_src ? N::load(prev_src, prev_off) : N::zero();
    N::store(db, off, grad);
    N::store(da, off, N::mul(N::conj(prev), grad));
    return N::mul(gate, grad);
  }
};

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
template <typename T, typename N, typename A>
__device__ __forceinline__ typename N::V carry_in(const BlockPlace& p, const Geometry& g, const A* carries,
                                                  const T* init) {
  if (!p.active) return N::zero();
  if (carries) return N::load(carries, (p.batch * gridDim.y + blockIdx.y) * g.D + p.channel);
  return init ? N::load(init, p.batch * g.D + p.channel) : N::zero();
}

template <typename T, typename N>
__device__ void forward(const T* a, const T* b, const T* h0, const typename Acc<T>::type* carries, T* h,
                        long long T_, long long D, long long chunk, int reverse) {
  const Geometry g = geometry(T_, D, chunk, reverse != 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  const typename N::V init = carry_in<T, N>(p, g, carries, h0);
  run_tiles<N>(p, init, ForwardLoad<T, N>{a, b, g, row0}, ForwardApply<T, N>{h, g, row0});
}

template <typename T, typename N>
__device__ void backward(const T* a, const T* h, const T* dh, const T* h0, const typename Acc<T>::type* carries,
                         T* da, T* db, T* dh0, long long T_, long long D, long long chunk, int reverse) {
  // backward runs logical time backwards: flipped unless the forward was reversed
  const Geometry g = geometry(T_, D, chunk, reverse == 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  const typename N::V init = carry_in<T, N>(p, g, carries, (const T*)nullptr);
  const typename N::V q = run_tiles<N>(p, init, BackwardLoad<T, N>{a, dh, g, row0},
                                       BackwardApply<T, N>{h, h0, da, db, g, row0, p.batch * D + p.channel});
  // the chunk holding the last processing step holds q at logical step 0: dh0
  if (p.active && threadIdx.y == 0 && p.i1 == g.T) N::store(dh0, p.batch * D + p.channel, q);
}

// Chunk summaries: (prod, end) of each chunk from a zero state, in [B, chunks, D].
template <typename T, typename N, bool Backward>
__device__ void summary(const T* a, const T* beta_src, typename Acc<T>::type* prods, typename Acc<T>::type* ends,
                        long long T_, long long D, long long chunk, int reverse) {
  using V = typename N::V;
  const Geometry g = geometry(T_, D, chunk, Backward ? reverse == 0 : reverse != 0);
  const BlockPlace p = place(g);
  const long long row0 = p.batch * T_ * D + p.channel;
  V prod = N::one(), end = N::zero();
  // warp y takes a contiguous run of the chunk; runs are then combined in order
  __shared__ V prod_s[kWarps][kLanes];
  __shared__ V end_s[kWarps][kLanes];
  const long long span = p.i1 - p.i0;
  const long long per_warp = (span + kWarps - 1) / kWarps;
  const long long w0 = p.i0 + threadIdx.y * per_warp;
  const long long w1 = min(w0 + per_warp, p.i1);
  if (p.active) {
    for (long long i = w0; i < w1; i += kSteps) {
      V gate[kSteps], beta[kSteps];
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const bool ok = i + k < w1;
        const long long off = row0 + g.time_of(i + k) * g.D;
        const V a_k = ok ? N::load(a, off) : N::one();
        gate[k] = Backward ? N::conj(a_k) : a_k;
        const V src = ok ? N::load(beta_src, off) : N::zero();
        beta[k] = Backward ? N::mul(gate[k], src) : src;
      }
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        end = N::add(N::mul(gate[k], end), beta[k]);
        prod = N::mul(gate[k], prod);
      }
    }
  }
  prod_s[threadIdx.y][threadIdx.x] = prod;
  end_s[threadIdx.y][threadIdx.x] = end;
  __syncthreads();
  if (threadIdx.y == 0 && p.active) {
    V P = N::one(), E = N::zero();
    for (int w = 0; w < kWarps; ++w) {
      E = N::add(N::mul(prod_s[w][threadIdx.x], E), end_s[w][threadIdx.x]);
      P = N::mul(prod_s[w][threadIdx.x], P);
    }
    const long long out = (p.batch * gridDim.y + blockIdx.y) * g.D + p.channel;
    N::store(prods, out, P);
    N::store(ends, out, E);
  }
}

// Chains chunk summaries per (batch, channel): carries[c] = state entering chunk c.
template <typename T, typename N>
__device__ void carry(const typename Acc<T>::type* prods, const typename Acc<T>::type* ends, const T* init,
                      typename Acc<T>::type* carries, long long B, long long D, long long chunks) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * D) return;
  const long long batch = idx / D, channel = idx % D;
  typename N::V state = init ? N::load(init, idx) : N::zero();
  for (long long c = 0; c < chunks; ++c) {
    const long long at = (batch * chunks + c) * D + channel;
    N::store(carries, at, state);
    state = N::add(N::mul(N::load(prods, at), state), N::load(ends, at));
  }
}

}  // namespace

// Entry points `<prefix>_<pass>_<dtype>`: prefix scan_linear (real) or scan_linear_complex.
#define NK_SCAN_ENTRY_POINTS(T, NAME, NUM, PREFIX)                                                              \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      PREFIX##_fwd_##NAME(const T* a, const T* b, const T* h0, const Acc<T>::type* carries, T* h, long long T_, \
                          long long D, long long chunk, int reverse) {                                          \
    forward<T, NUM<Acc<T>::type>>(a, b, h0, carries, h, T_, D, chunk, reverse);                                 \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      PREFIX##_bwd_##NAME(const T* a, const T* h, const T* dh, const T* h0, const Acc<T>::type* carries,       \
                          T* da, T* db, T* dh0, long long T_, long long D, long long chunk, int reverse) {      \
    backward<T, NUM<Acc<T>::type>>(a, h, dh, h0, carries, da, db, dh0, T_, D, chunk, reverse);                  \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      PREFIX##_fwd_summary_##NAME(const T* a, const T* b, Acc<T>::type* prods, Acc<T>::type* ends,             \
                                  long long T_, long long D, long long chunk, int reverse) {                    \
    summary<T, NUM<Acc<T>::type>, false>(a, b, prods, ends, T_, D, chunk, reverse);                             \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(kLanes* kWarps)                                                  \
      PREFIX##_bwd_summary_##NAME(const T* a, const T* dh, Acc<T>::type* prods, Acc<T>::type* ends,            \
                                  long long T_, long long D, long long chunk, int reverse) {                    \
    summary<T, NUM<Acc<T>::type>, true>(a, dh, prods, ends, T_, D, chunk, reverse);                             \
  }                                                                                                             \
  extern "C" __global__ void PREFIX##_carry_##NAME(const Acc<T>::type* prods, const Acc<T>::type* ends,         \
                                                   const T* init, Acc<T>::type* carries, long long B,           \
                                                   long long D, long long chunks) {                             \
    carry<T, NUM<Acc<T>::type>>(prods, ends, init, carries, B, D, chunks);                                      \
  }

NK_SCAN_ENTRY_POINTS(float, f32, RealNum, scan_linear)
NK_SCAN_ENTRY_POINTS(double, f64, RealNum, scan_linear)
NK_SCAN_ENTRY_POINTS(__half, f16, RealNum, scan_linear)
NK_SCAN_ENTRY_POINTS(__nv_bfloat16, bf16, RealNum, scan_linear)
NK_SCAN_ENTRY_POINTS(float, f32, ComplexNum, scan_linear_complex)
NK_SCAN_ENTRY_POINTS(double, f64, ComplexNum, scan_linear_complex)
NK_SCAN_ENTRY_POINTS(__half, f16, ComplexNum, scan_linear_complex)
NK_SCAN_ENTRY_POINTS(__nv_bfloat16, bf16, ComplexNum, scan_linear_complex)
