// Launch geometry of kernels/ridge.cu, exported to Rust by build.rs.
#pragma once
// Threads per block of ridge_solve_batched (one problem per block).
#define NK_RIDGE_THREADS 256
// Largest factor order (p when n >= p, n otherwise) of ridge_solve_batched, when its
// dynamic shared memory (see NK_RIDGE_RHS_CHUNK and NK_RIDGE_ROW_TILE) fits the device.
#define NK_RIDGE_MAX_ORDER 256
// Right-hand sides solved per pass.
#define NK_RIDGE_RHS_CHUNK 16
// Rows of x staged in shared memory per pass of the Gram accumulation.
#define NK_RIDGE_ROW_TILE 8
// Dynamic shared memory of ridge_solve_batched, in factor elements, for order m:
//   m (m + 1) / 2 (packed lower triangle) + m * NK_RIDGE_RHS_CHUNK + m * NK_RIDGE_ROW_TILE.
// ridge.cv kernels: a block is NK_RIDGE_CV_COLS target columns by NK_RIDGE_CV_LANES row lanes.
#define NK_RIDGE_CV_COLS 32
#define NK_RIDGE_CV_LANES 8
// Threads per block of the elementwise ridge.cv kernels.
#define NK_RIDGE_CV_THREADS 256
