// Launch geometry of kernels/topk.cu, exported to Rust by build.rs.
#pragma once
// Threads per block of every top-k kernel.
#define NK_TOPK_THREADS 256
// topk.rows: candidate keys per block in shared memory (a power of two for the bitonic
// sort); k + NK_TOPK_THREADS must fit, so k <= NK_TOPK_MAX_K.
#define NK_TOPK_CAPACITY 1024
#define NK_TOPK_MAX_K 512
// sae.encode: rows per block, candidate keys per row, and the largest k and Dm it takes.
#define NK_TOPK_ENCODE_ROWS 4
#define NK_TOPK_ENCODE_CAPACITY 512
#define NK_TOPK_ENCODE_MAX_K 256
#define NK_TOPK_ENCODE_MAX_DM 1024
