// Launch geometry of kernels/ridge.cu, exported to Rust by build.rs.
#pragma once
// Threads per block (one problem per block).
#define NK_RIDGE_THREADS 256
// Largest factor order (p when n >= p, n otherwise) held in shared memory: f32 and f64.
#define NK_RIDGE_MAX_ORDER 64
// Right-hand sides solved per pass.
#define NK_RIDGE_RHS_CHUNK 16
// Rows of x staged in shared memory per pass of the Gram accumulation.
#define NK_RIDGE_ROW_TILE 8
