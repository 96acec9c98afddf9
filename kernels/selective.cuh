// Launch geometry of kernels/selective.cu, exported to Rust by build.rs.
#pragma once
// Threads per block (one (batch, channel) each).
#define NK_SELECTIVE_THREADS 128
// The largest state size N an instantiation holds in registers (instantiations: 4, 16, 64;
// f64: 4, 16, 32).
#define NK_SELECTIVE_MAX_STATE 64
#define NK_SELECTIVE_MAX_STATE_F64 32
