//! Intel AMX: bf16 tile products with f32 accumulation (Sapphire Rapids and later), for
//! kernels that only need an approximate product with a known error bound — the encoder's
//! screening pass (`topk::screen`), whose exact f32 rescoring keeps the results exact.
//!
//! AMX needs three things: the CPU bits (CPUID.7.0:EDX AMX-TILE and AMX-BF16), the kernel's
//! permission for this process to use the tile data state (Linux: `arch_prctl`
//! ARCH_REQ_XCOMP_PERM, asked once), and a tile configuration per thread (`ldtilecfg`, here
//! [`Tiles`], released on drop). [`available`] checks all of it once; `NEUROKERNELS_NO_AMX=1`
//! or [`set_amx_enabled`]`(false)` turns the AMX paths off (results are the same either way;
//! only the speed differs).
//!
//! The tile instructions are emitted with inline assembly (Rust has no stable AMX
//! intrinsics); the compiler never allocates tile registers itself, so the blocks name them
//! directly. Operands are pre-packed 1 KiB tiles (`cpu::bf16tiles`).

use super::Switch;
use super::bf16tiles::TILE_ROWS;
use std::arch::asm;
use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

static DISABLED: Switch = Switch::new("NEUROKERNELS_NO_AMX");

/// Process-wide switch for the AMX paths (on by default where the CPU and OS allow them).
/// Off, the kernels take their AVX-512 paths, with the same results.
pub fn set_amx_enabled(on: bool) {
    DISABLED.set(!on);
}

/// Whether AMX bf16 products can run here now: CPU support, the OS's permission, and not
/// switched off.
pub(crate) fn available() -> bool {
    !DISABLED.is_on() && permitted()
}

/// CPU support and the OS's permission (checked once), whatever the switch says.
pub(crate) fn permitted() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // avx512bw too: `pack_rows`/`pack_columns` enable it (every AVX512-BF16 CPU has it,
        // but the `#[target_feature]` contract needs it checked)
        cpu_has_amx()
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && os_grants_tiles()
    })
}

fn cpu_has_amx() -> bool {
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
    amx_bf16 && amx_tile && std::arch::is_x86_feature_detected!("avx512f")
}

/// Asks Linux for this process's permission to use the AMX tile data (XTILEDATA, state
/// component 18); other systems: no AMX here.
fn os_grants_tiles() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain arch_prctl system call; it only changes this process's permission
        // to use an extended register state, and clobbers rcx/r11 as every syscall does.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_full() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette
        for t in 0..8 {
            cfg[16 + 2 * t] = 64; // bytes per row (u16, little endian)
            cfg[48 + t] = TILE_ROWS as u8; // rows
        }
        TileConfig(cfg)
    }
}

/// The tiles configured on the current thread (not `Send`: the configuration is per thread);
/// released on drop.
pub(crate) struct Tiles {
    _per_thread: PhantomData<*const ()>,
}

impl Tiles {
    /// Configures the tiles on this thread, or `None` where the CPU or OS does not allow AMX
    /// (the on/off switch is the callers' business: a call that started with AMX finishes
    /// with it even if the switch flips meanwhile).
    pub fn configure() -> Option<Tiles> {
        if !permitted() {
            return None;
        }
        let cfg = TileConfig::all_full();
        // SAFETY: AMX is supported and permitted (checked above); the config is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Some(Tiles {
            _per_thread: PhantomData,
        })
    }

    /// Starts C = A·B for a 32×32 block, in tmm0–3, over `steps` depth steps of 32: `a[i]`
    /// is the first of `steps` consecutive packed A tiles of rows 16i..16i+16, `b[j]` likewise
    /// the B tiles of columns 16j..16j+16. The products run on while the caller goes on;
    /// [`Tiles::store_32x32`] takes the result (and must come before the next start).
    ///
    /// # Safety
    /// `steps >= 1`; each pointer is valid for `steps` tiles (`steps · 1 KiB`).
    #[inline(always)]
    pub unsafe fn start_32x32(&self, a: [*const u16; 2], b: [*const u16; 2], steps: usize) {
        debug_assert!(steps >= 1);
        // SAFETY: per the contract above; tmm0–3 accumulate, tmm4–5 hold A, tmm6–7 B.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {stride}*1]",
                "tileloadd tmm6, [{b0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b0}, 1024",
                "add {b1}, 1024",
                "dec {n}",
                "jnz 2b",
                a0 = inout(reg) a[0] => _,
                a1 = inout(reg) a[1] => _,
                b0 = inout(reg) b[0] => _,
                b1 = inout(reg) b[1] => _,
                n = inout(reg) steps => _,
                stride = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
    }

    /// Stores the block started last as four 16×16 f32 tiles 1 KiB apart at `c`: rows 0–15 ×
    /// columns 0–15, rows 0–15 × 16–31, rows 16–31 × 0–15, rows 16–31 × 16–31.
    ///
    /// # Safety
    /// A block was started; `c` is valid for 4 KiB.
    #[inline(always)]
    pub unsafe fn store_32x32(&self, c: *mut f32) {
        // SAFETY: per the contract above
        unsafe {
            asm!(
                "tilestored [{c} + {stride}*1], tmm0",
                "tilestored [{c} + {stride}*1 + 1024], tmm1",
                "tilestored [{c} + {stride}*1 + 2048], tmm2",
                "tilestored [{c} + {stride}*1 + 3072], tmm3",
                c = in(reg) c,
                stride = in(reg) 64usize,
                options(nostack)
            );
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured on this thread (Tiles is not Send).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed tile product equals the bf16-rounded product summed in f64 (to f32
    /// rounding), with rows, columns and depth not multiples of a tile.
    #[test]
    fn packed_tile_product_matches_the_bf16_product() {
        let Some(tiles) = Tiles::configure() else {
            eprintln!("no AMX here: tile product not run");
            return;
        };
        // SAFETY: AMX available implies AVX-512F/BW/BF16; the product gets the operands and
        // output `check_product` documents.
        unsafe {
            crate::cpu::bf16tiles::tests::check_product(|a, b, steps, c| {
                tiles.start_32x32(a, b, steps);
                tiles.store_32x32(c);
            })
        };
    }
}
