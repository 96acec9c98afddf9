// Kernels for the emulator's self-test (selftest.cpp): each either has one of the bugs the
// emulator must catch, or checks one piece of the device model against a direct computation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

// ---- bugs ----

// Thread 5 writes a shared slot that thread 0 reads in the same barrier interval: what thread 0
// sees depends on which of the two runs first.
extern "C" __global__ void race_on_shared(int* out) {
  __shared__ int slot;
  if (threadIdx.x == 0) slot = -1;
  __syncthreads();
  if (threadIdx.x == 5) slot = 5;  // the race: no barrier between this write and the read below
  if (threadIdx.x == 0) out[0] = slot;
}

// A neighbour exchange that forgot the barrier between the writes and the reads.
extern "C" __global__ void missing_barrier(const float* in, float* out) {
  __shared__ float tile[64];
  tile[threadIdx.x] = in[threadIdx.x];
  // __syncthreads() belongs here
  out[threadIdx.x] = tile[(threadIdx.x + 1) % 64];
}

// Reads shared memory nobody wrote.
extern "C" __global__ void read_before_write(float* out) {
  __shared__ float tile[32];
  if (threadIdx.x > 0) tile[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];  // tile[0] is poison
}

// Reads dynamic shared memory nobody wrote.
extern "C" __global__ void read_dynamic_before_write(float* out) {
  extern __shared__ float dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}

// Stores one element past the end of `out` (n elements).
extern "C" __global__ void store_out_of_bounds(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;  // `<` intended
}

// Half the block waits at a barrier the other half never reaches.
extern "C" __global__ void partial_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Threads that return early while the others wait at a barrier.
extern "C" __global__ void barrier_after_exit(int* out, int n) {
  if ((int)threadIdx.x >= n) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// A full-mask shuffle reached by half the warp.
extern "C" __global__ void partial_shuffle(int* out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lanes 0-15 wait at a shuffle for lanes 16-31, which wait at a block barrier for lanes 0-15.
extern "C" __global__ void deadlock(int* out) {
  int v = (int)threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncthreads();
  out[threadIdx.x] = v;
}

// Launched with more threads than its bound.
extern "C" __global__ void __launch_bounds__(64) bounded_to_64(int* out) { out[threadIdx.x] = 1; }

// ---- the device model, checked ----

// n barriers: the cost of a context switch (selftest prints it).
extern "C" __global__ void barrier_loop(int* out, int n) {
  for (int i = 0; i < n; ++i) __syncthreads();
  out[threadIdx.x] = n;
}

// A warp reduction by xor shuffles, a ballot and __popc.
extern "C" __global__ void warp_collectives(const int* in, int* sum, unsigned* ballot) {
  int v = in[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const unsigned b = __ballot_sync(0xffffffffu, in[threadIdx.x] & 1);
  const int down = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);
  const int up = __shfl_up_sync(0xffffffffu, in[threadIdx.x], 1);
  const int from3 = __shfl_sync(0xffffffffu, in[threadIdx.x], 3);
  if (threadIdx.x == 0) {
    sum[0] = v;
    ballot[0] = b;
    sum[1] = __popc(b);
  }
  if (threadIdx.x == 5) sum[2] = down + 1000 * up + 1000000 * from3;
}

// D [16x8] = A [16x16] B [16x8] with one mma.sync.m16n8k16 (A row-major, B column-major in
// registers), loaded per the PTX ISA's fragment layout: groupID g = lane/4, t = lane%4.
extern "C" __global__ void mma_m16n8k16_f16(const __half* a, const __half* b, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pack = [](__half lo, __half hi) {
    unsigned short l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return (unsigned)l | ((unsigned)h << 16);
  };
  const unsigned ra[4] = {pack(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pack(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pack(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pack(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  // b row-major [16 x 8]: b0 holds (k = 2t, 2t+1; n = g), b1 (k = 2t+8, 2t+9; n = g)
  const unsigned rb[2] = {pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  float acc[4] = {0, 0, 0, 0};
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "r"(rb[0]), "r"(rb[1]));
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// C [16x16] = A [16x16] B [16x16] through nvcuda::wmma (bf16 in, f32 out).
extern "C" __global__ void wmma_16x16x16_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);  // column-major: b[n * 16 + k]
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
