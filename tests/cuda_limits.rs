//! The CUDA entry points refuse shapes past their kernels' 32-bit indices and grid limits
//! (`neurokernels::cuda::MAX_I32_EXTENT`, grid y/z ≤ 65535) with an `Err` naming the tensor,
//! before they upload, allocate or launch anything. Every shape here has empty (or tiny)
//! inputs, so a missing check shows as a wrong `Ok`, a launch error or an out-of-bounds
//! access, never as a huge allocation. Without a GPU each test prints SKIPPED and returns.
#![cfg(feature = "cuda")]

mod common;

use neurokernels::Error;
use neurokernels::attention::cuda as attn_gpu;
use neurokernels::attention::{AttentionInputs, AttentionParams, AttentionShape};
use neurokernels::cuda::{MAX_GRID_YZ, MAX_I32_EXTENT};
use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
use neurokernels::topk::{self, RowsParams, RowsShape, SaeShape};

/// Past the kernels' `int` range, and past i32 itself.
const TOO_LONG: [usize; 2] = [MAX_I32_EXTENT + 1, 1 << 31];

/// `Err(Overflow)` naming `tensor`, or a panic saying what came instead.
fn assert_overflow<T: std::fmt::Debug>(what: &str, r: Result<T, Error>, tensor: &str) {
    match r {
        Err(Error::Overflow { tensor: t, detail }) => {
            assert_eq!(t, tensor, "{what}: overflow names `{t}` ({detail})");
        }
        other => panic!("{what}: expected Err(Overflow) naming `{tensor}`, got {other:?}"),
    }
}

fn gla_inputs<'a>(empty: &'a [f32]) -> GlaInputs<'a, f32> {
    GlaInputs {
        q: empty,
        k: empty,
        v: empty,
        g: empty,
        h0: None,
    }
}

/// Issue 28, item 9: V past i32 wrapped `c0 = blockIdx.x * VT` and `(int)V` in the GLA
/// kernels. With T = 0 and K = 0 every tensor is empty.
#[test]
fn cuda_gla_value_dim_past_the_int_range_is_refused() {
    let Some(dev) = common::device_or_skip("cuda_gla_value_dim_past_the_int_range_is_refused")
    else {
        return;
    };
    let empty: &[f32] = &[];
    let p = GlaParams::new();
    for v in TOO_LONG {
        let s = GlaShape::new(1, 0, 1, 0, v);
        let what = format!("scan.gla V = {v}");
        assert_overflow(
            &what,
            gla::cuda::gla_host(&dev, &p, s, &gla_inputs(empty)),
            "v",
        );
        let r = gla::cuda::gla_backward_host(&dev, &p, s, &gla_inputs(empty), empty, None);
        assert_overflow(&format!("{what} backward"), r, "v");
        // the device-level entry points, on empty views
        let stream = dev.stream();
        let buf = stream.alloc_zeros::<f32>(1).unwrap();
        let view = || buf.slice(0..0);
        let inputs = gla::cuda::DeviceInputs {
            q: view(),
            k: view(),
            v: view(),
            g: view(),
            h0: None,
        };
        let (mut o, mut h_last) = (
            stream.alloc_zeros::<f32>(1).unwrap(),
            stream.alloc_zeros::<f32>(1).unwrap(),
        );
        let r = gla::cuda::gla(
            &dev,
            stream,
            &p,
            s,
            &inputs,
            &mut o.slice_mut(0..0),
            &mut h_last.slice_mut(0..0),
        );
        assert_overflow(&format!("{what} on device views"), r, "v");
        let r = gla::cuda::gla_backward(&dev, stream, &p, s, &inputs, &view(), None);
        assert_overflow(
            &format!("{what} backward on device views"),
            r.map(|_| ()),
            "v",
        );
    }
    // at the limit it runs: nothing to compute, empty outputs
    let s = GlaShape::new(1, 0, 1, 0, MAX_I32_EXTENT);
    let out = gla::cuda::gla_host(&dev, &p, s, &gla_inputs(empty)).unwrap();
    assert!(out.o.is_empty() && out.h_last.is_empty());
}

/// B and H are grid z and y of the GLA kernels: at most 65535 each.
#[test]
fn cuda_gla_batch_and_heads_past_the_grid_are_refused() {
    let Some(dev) = common::device_or_skip("cuda_gla_batch_and_heads_past_the_grid_are_refused")
    else {
        return;
    };
    let empty: &[f32] = &[];
    let p = GlaParams::new();
    for s in [
        GlaShape::new(MAX_GRID_YZ + 1, 0, 1, 0, 1),
        GlaShape::new(1, 0, MAX_GRID_YZ + 1, 0, 1),
    ] {
        let what = format!("scan.gla {s:?}");
        assert_overflow(
            &what,
            gla::cuda::gla_host(&dev, &p, s, &gla_inputs(empty)),
            "q",
        );
        let r = gla::cuda::gla_backward_host(&dev, &p, s, &gla_inputs(empty), empty, None);
        assert_overflow(&format!("{what} backward"), r, "q");
    }
}

fn attention_shape(batch: usize, len_q: usize, len_k: usize) -> AttentionShape {
    AttentionShape {
        batch,
        len_q,
        len_k,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 32,
        value_dim: 32,
    }
}

/// Sq and Sk are `int` row and key counters in the attention kernels, stepped a tile past the
/// end; B indexes grid z. With B = 0 (or Sq = Sk = 0) every tensor is empty.
#[test]
fn cuda_attention_lengths_past_the_int_range_are_refused() {
    let Some(dev) = common::device_or_skip("cuda_attention_lengths_past_the_int_range_are_refused")
    else {
        return;
    };
    let empty: &[f32] = &[];
    let inputs = AttentionInputs::new(empty, empty, empty);
    let p = AttentionParams::default();
    let mut cases = Vec::new();
    for n in TOO_LONG {
        cases.push((attention_shape(0, n, 1), "q"));
        cases.push((attention_shape(0, 1, n), "k"));
    }
    cases.push((attention_shape(MAX_GRID_YZ + 1, 0, 0), "q"));
    for (s, tensor) in cases {
        let what = format!("attention {s:?}");
        let r = attn_gpu::forward_host(&dev, &p, s, &inputs);
        assert_overflow(&format!("{what} forward"), r, tensor);
        let r = attn_gpu::backward_host(&dev, &p, s, &inputs, empty, empty, empty);
        assert_overflow(&format!("{what} backward"), r, tensor);
        let r = attn_gpu::top_keys_host(&dev, &p, s, &inputs, 1);
        assert_overflow(&format!("{what} top_keys"), r, tensor);
    }
}

/// topk.rows: N is the kernel's `int` row length; and a huge [rows, k] output of an empty x
/// is refused before it is allocated.
#[test]
fn cuda_topk_rows_past_the_limits_are_refused_before_allocating() {
    let Some(dev) =
        common::device_or_skip("cuda_topk_rows_past_the_limits_are_refused_before_allocating")
    else {
        return;
    };
    let empty: &[f32] = &[];
    let p = RowsParams::default();
    for n in TOO_LONG {
        let r = topk::cuda::rows_host(&dev, &p, RowsShape::new(0, n), 1, empty);
        assert_overflow(&format!("topk.rows N = {n}"), r, "x");
    }
    // k = 1 > N = 0: refused before 2^40 outputs are allocated
    let r = topk::cuda::rows_host(&dev, &p, RowsShape::new(1 << 40, 0), 1, empty);
    assert!(
        matches!(&r, Err(Error::InvalidArgument { name, .. }) if name == "k"),
        "topk.rows [2^40, 0], k = 1: {r:?}"
    );
}

/// sae.decode: Dm is the kernel's `int` model dim (its loop over Dm steps a block past it).
#[test]
fn cuda_sae_model_dim_past_the_int_range_is_refused() {
    let Some(dev) = common::device_or_skip("cuda_sae_model_dim_past_the_int_range_is_refused")
    else {
        return;
    };
    let empty: &[f32] = &[];
    for dm in TOO_LONG {
        let s = SaeShape::new(0, dm, 0);
        let r = topk::cuda::decode_host(&dev, s, 0, &[], empty, empty, None);
        assert_overflow(&format!("sae.decode Dm = {dm}"), r, "w_dec");
    }
}
