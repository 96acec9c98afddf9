//! One build holding neurokernels' CUDA API and a crate that links the CUDA libraries
//! (cudarc `dynamic-linking`): see Cargo.toml.

/// Whether neurokernels sees a CUDA device (false without a driver, never a panic).
pub fn neurokernels_cuda() -> bool {
    neurokernels::cuda::is_available()
}

/// Whether candle sees a CUDA device.
#[cfg(feature = "candle")]
pub fn candle_cuda() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Whether the driver initializes, through the linked cudarc (cuInit is resolved at link time).
#[cfg(feature = "linking")]
pub fn linked_driver_init() -> bool {
    cudarc::driver::result::init().is_ok()
}
