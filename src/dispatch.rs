//! Every CPU kernel, compiled here once per element type.
//!
//! The public entry points are generic over the element type. Had they run the generic
//! kernels themselves, every crate calling them would instantiate and optimize those kernels
//! (each op × ISA × dtype it uses) on every build of its own code: a downstream crate spent
//! most of each rebuild on our code. They call these methods instead; the methods are
//! implemented for the four concrete types below, so their code is generated in this crate
//! and a user's crate only links to it.
//!
//! [`Kernels`] is a supertrait of [`Element`] in a private module: sealed, and not part of
//! the documented surface. Ridge's `cv` and `predict` (f32 and f64 only) dispatch the same
//! way through [`crate::ridge::RidgeReal`].

use crate::attention::{self, AttentionGrads, AttentionInputs, AttentionOut, AttentionParams};
use crate::attention::{AttentionShape, TopKeys};
use crate::cpu::Isa;
use crate::element::Element;
use crate::error::Result;
use crate::ridge::{self, BatchedShape, RidgeShape, Scores};
use crate::scan::gla::{self, GlaGradsMut, GlaInputs, GlaParams, GlaShape};
use crate::scan::selective::{
    self, SelectiveGradsMut, SelectiveInputs, SelectiveParams, SelectiveShape,
};
use crate::scan::{self, ScanParams, ScanShape, cpu as scan_cpu};
use crate::topk::{self, BackwardInputs, Csr, EncoderInputs, MatchingPursuit, Metric};
use crate::topk::{RowsParams, RowsShape, SaeGrads, SaeShape, TopK};

/// Declares [`Kernels`] from one list of entry points and implements it for the concrete
/// element types by calling the generic kernels, which are therefore instantiated (and
/// optimized) here.
macro_rules! kernels {
    (types [$($t:ty),*] $fns:tt) => {
        kernels!(@trait $fns);
        $(kernels!(@impl $t $fns);)*
    };
    (@trait { $(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $call:expr;)* }) => {
        /// The per-dtype CPU entry points; see the module doc. Each method is the validated
        /// kernel of the public function of the same family and name.
        #[allow(clippy::too_many_arguments)]
        pub trait Kernels: Sized {
            $(fn $name($($arg: $ty),*) -> $ret where Self: Element;)*
        }
    };
    (@impl $t:ty { $(fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => $call:expr;)* }) => {
        impl Kernels for $t {
            $(fn $name($($arg: $ty),*) -> $ret { $call })*
        }
    };
}

kernels! {
    types [f32, f64, half::f16, half::bf16]
    {
        fn scan_linear(
            isa: Isa, params: &ScanParams, shape: ScanShape, a: &[Self], b: &[Self],
            h0: Option<&[Self]>, h: &mut [Self]
        ) -> Result<()>
            => scan::forward_on::<Self, scan_cpu::Real>(isa, params, shape, a, b, h0, h);
        fn scan_linear_complex(
            isa: Isa, params: &ScanParams, shape: ScanShape, a: &[Self], b: &[Self],
            h0: Option<&[Self]>, h: &mut [Self]
        ) -> Result<()>
            => scan::forward_on::<Self, scan_cpu::Complex>(isa, params, shape, a, b, h0, h);
        fn scan_linear_backward(
            isa: Isa, params: &ScanParams, shape: ScanShape, a: &[Self], h: &[Self], dh: &[Self],
            h0: Option<&[Self]>, da: &mut [Self], db: &mut [Self], dh0: &mut [Self]
        ) -> Result<()>
            => scan::backward_on::<Self, scan_cpu::Real>(
                isa, params, shape, a, h, dh, h0, da, db, dh0
            );
        fn scan_linear_complex_backward(
            isa: Isa, params: &ScanParams, shape: ScanShape, a: &[Self], h: &[Self], dh: &[Self],
            h0: Option<&[Self]>, da: &mut [Self], db: &mut [Self], dh0: &mut [Self]
        ) -> Result<()>
            => scan::backward_on::<Self, scan_cpu::Complex>(
                isa, params, shape, a, h, dh, h0, da, db, dh0
            );
        fn scan_selective_into(
            isa: Isa, params: &SelectiveParams, shape: SelectiveShape,
            inputs: &SelectiveInputs<'_, Self>, y: &mut [Self],
            h_last: &mut [<Self as Element>::Acc]
        ) -> Result<()>
            => selective::selective_into_impl(isa, params, shape, inputs, y, h_last);
        fn scan_selective_backward_into(
            isa: Isa, params: &SelectiveParams, shape: SelectiveShape, inputs: &SelectiveInputs<'_, Self>,
            dy: &[Self], grads: SelectiveGradsMut<'_, Self>
        ) -> Result<()>
            => selective::selective_backward_into_impl(isa, params, shape, inputs, dy, grads);
        fn scan_gla_into(
            isa: Isa, params: &GlaParams, shape: GlaShape, inputs: &GlaInputs<'_, Self>,
            o: &mut [Self], h_last: &mut [<Self as Element>::Acc]
        ) -> Result<()>
            => gla::gla_into_impl(isa, params, shape, inputs, o, h_last);
        fn scan_gla_backward_into(
            isa: Isa, params: &GlaParams, shape: GlaShape, inputs: &GlaInputs<'_, Self>,
            d_o: &[Self], dh_last: Option<&[<Self as Element>::Acc]>, grads: GlaGradsMut<'_, Self>
        ) -> Result<()>
            => gla::gla_backward_into_impl(isa, params, shape, inputs, d_o, dh_last, grads);
        fn attention_forward(
            isa: Isa, params: &AttentionParams, shape: AttentionShape,
            inputs: &AttentionInputs<'_, Self>
        ) -> Result<AttentionOut<Self>>
            => attention::forward_impl(isa, params, shape, inputs);
        fn attention_backward(
            isa: Isa, params: &AttentionParams, shape: AttentionShape,
            inputs: &AttentionInputs<'_, Self>, o: &[Self], d_o: &[Self],
            lse: &[<Self as Element>::Acc]
        ) -> Result<AttentionGrads<Self>>
            => attention::backward_impl(isa, params, shape, inputs, o, d_o, lse);
        fn attention_top_keys(
            isa: Isa, params: &AttentionParams, shape: AttentionShape,
            inputs: &AttentionInputs<'_, Self>, top: usize
        ) -> Result<TopKeys<<Self as Element>::Acc>>
            => attention::top_keys_impl(isa, params, shape, inputs, top);
        fn topk_rows(
            isa: Isa, params: &RowsParams, shape: RowsShape, k: usize, x: &[Self]
        ) -> Result<TopK<Self>>
            => topk::rows_impl(isa, params, shape, k, x);
        fn topk_encode(
            isa: Isa, shape: SaeShape, k: usize, inputs: &EncoderInputs<'_, Self>
        ) -> Result<TopK<Self>>
            => topk::encode_impl(isa, shape, k, inputs);
        fn topk_encode_batch_topk(
            isa: Isa, shape: SaeShape, k: usize, inputs: &EncoderInputs<'_, Self>
        ) -> Result<Csr<Self>>
            => topk::encode_batch_topk_impl(isa, shape, k, inputs);
        fn topk_encode_jumprelu(
            isa: Isa, shape: SaeShape, inputs: &EncoderInputs<'_, Self>, threshold: &[Self]
        ) -> Result<Csr<Self>>
            => topk::encode_jumprelu_impl(isa, shape, inputs, threshold);
        fn topk_encode_mp(
            isa: Isa, shape: SaeShape, k: usize, x: &[Self], w_dec: &[Self], b_dec: Option<&[Self]>
        ) -> Result<MatchingPursuit<Self>>
            => topk::encode_mp_impl(isa, shape, k, x, w_dec, b_dec);
        fn topk_nearest(
            isa: Isa, metric: Metric, shape: SaeShape, k: usize, x: &[Self], codebook: &[Self]
        ) -> Result<TopK<Self>>
            => topk::nearest_impl(isa, metric, shape, k, x, codebook);
        fn topk_decode(
            isa: Isa, shape: SaeShape, k: usize, indices: &[i32], values: &[Self], w_dec: &[Self],
            b_dec: Option<&[Self]>
        ) -> Result<Vec<Self>>
            => topk::decode_impl(isa, shape, k, indices, values, w_dec, b_dec);
        fn topk_backward(
            isa: Isa, shape: SaeShape, k: usize, inputs: &BackwardInputs<'_, Self>
        ) -> Result<SaeGrads<Self>>
            => topk::backward_impl(isa, shape, k, inputs);
        fn ridge_solve_batched(
            shape: BatchedShape, x: &[Self], y: &[Self], alpha: &[Self]
        ) -> Result<Vec<Self>>
            => ridge::solve_batched_impl(shape, x, y, alpha);
        fn ridge_score(
            shape: RidgeShape, y_true: &[Self], y_pred: &[Self]
        ) -> Result<Scores<Self>>
            => ridge::score_impl(shape, y_true, y_pred);
    }
}
