// Launch geometry of kernels/selective.cu, exported to Rust by build.rs.
#pragma once
// Threads per block (one (batch, channel) each; the forward: one (batch, channel, time chunk)).
#define NK_SELECTIVE_THREADS 128
// The forward: steps whose Bm and Cm rows a block stages in shared memory at once, and the
// shortest time chunk the host cuts (shorter ones would spend more on the chunk summaries).
#define NK_SELECTIVE_STAGE 32
#define NK_SELECTIVE_MIN_CHUNK 64
// The largest state size N an instantiation holds in registers (instantiations: 4, 16, 64;
// f64: 4, 16, 32).
#define NK_SELECTIVE_MAX_STATE 64
#define NK_SELECTIVE_MAX_STATE_F64 32
// The backward (kernels/selective_backward.cu): steps between stored states, and the largest
// N it holds in registers (instantiations: 4, 16; five N-arrays per thread).
#define NK_SELECTIVE_BWD_CHUNK 64
#define NK_SELECTIVE_BWD_MAX_STATE 16
