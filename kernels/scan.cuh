// Launch geometry of kernels/scan.cu, exported to Rust by build.rs.
#pragma once
// Threads along x: one channel each (a warp covers 32 consecutive channels: coalesced).
#define NK_SCAN_LANES 32
// Warps per block along y: each takes a run of NK_SCAN_STEPS consecutive time steps of a tile.
#define NK_SCAN_WARPS 8
// Time steps one thread holds in registers per tile.
#define NK_SCAN_STEPS 8
