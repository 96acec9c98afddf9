// Launch geometry of kernels/topk.cu, exported to Rust by build.rs.
#pragma once
// Threads per block of every top-k kernel.
#define NK_TOPK_THREADS 256
// topk.rows and topk_keys: candidate keys per block in shared memory (a power of two for
// the bitonic sort); k + NK_TOPK_THREADS must fit, so k <= NK_TOPK_MAX_K.
#define NK_TOPK_CAPACITY 1024
#define NK_TOPK_MAX_K 512
