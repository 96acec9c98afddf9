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
