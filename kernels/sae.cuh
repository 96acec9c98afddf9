// Launch geometry of kernels/sae.cu, exported to Rust by build.rs.
#pragma once
// Threads per block of every kernel in sae.cu.
#define NK_SAE_THREADS 256
// The fused encoder's tile: rows of x, latents (dictionary rows) and depth (model dims)
// per step. Its dynamic shared memory: candidate keys (top-k modes: NK_SAE_ROWS × cap,
// cap = the power of two >= k + NK_SAE_LATENTS), then per-row thresholds and counts, then
// the f32 operand tiles and the score tile (see sae_select_smem in sae.cu).
#define NK_SAE_ROWS 32
#define NK_SAE_LATENTS 64
#define NK_SAE_DEPTH 32
// The largest k of the fused top-k encoders (cap 512: 128 KiB of candidates per block).
#define NK_SAE_MAX_K 256
