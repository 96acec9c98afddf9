// Launch geometry of kernels/gla.cu, exported to Rust by build.rs.
#pragma once
// Threads per block: 8 warps; a block owns one (batch, head) and 32 value columns.
#define NK_GLA_THREADS 256
// Steps per chunk.
#define NK_GLA_CHUNK 8
// Value columns per block.
#define NK_GLA_VALUE_TILE 32
// Largest key dim K (f64: NK_GLA_MAX_KEY_F64); larger K is refused on CUDA.
#define NK_GLA_MAX_KEY 128
#define NK_GLA_MAX_KEY_F64 64
// The backward (kernels/gla_backward.cu): steps per chunk (the steps whose inputs sit in shared
// memory at once; each step's incoming state is recomputed from the chunk's start), and the
// key-dim instantiations (rows per thread = KMAX / 8): 32, 64, 128 (f64: 32, 64).
#define NK_GLA_BWD_CHUNK 8
// The tensor-core forward for f16/bf16 (kernels/gla_tc.cu): steps per chunk, value columns per
// block, and the padding (in floats) of every shared-memory row (keeps rows 16-byte multiples
// for wmma and spreads the banks).
#define NK_GLA_TC_CHUNK 16
#define NK_GLA_TC_VALUE_TILE 64
#define NK_GLA_TC_PAD 4
