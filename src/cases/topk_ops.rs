//! The sparse top-k family in the case runner: running its eight ops, and comparing their
//! selections by meaning (CASES.md "Comparison": sorted values must match and every
//! returned index must point at its value, here a score recomputed in f64 from the inputs).

use super::{
    Case, CaseElement, Data, DeviceKind, OutputCheck, Params, Runner, Tensor, Tolerance, case_err,
    compare_elementwise, compare_topk, expect_shape, optional, same_shape, typed,
};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::topk::{
    self, BackwardInputs, Csr, EncoderInputs, MatchingPursuit, Metric, SaeGrads, SaeShape,
};
use half::{bf16, f16};
use std::collections::BTreeMap;

type Outputs = BTreeMap<String, Tensor>;

/// The family's CUDA entry points as the runner calls them (host in, host out); without
/// the `cuda` feature every call is `NoDevice` (the defaults).
trait TopkDevice: CaseElement {
    fn cuda_rows(
        _: &Runner,
        _: topk::RowsShape,
        _: usize,
        _: &[Self],
        _: topk::RowsParams,
    ) -> Result<(Vec<Self>, Vec<i32>)> {
        Err(no_cuda())
    }
    fn cuda_encode(
        _: &Runner,
        _: SaeShape,
        _: EncoderInputs<'_, Self>,
        _: usize,
    ) -> Result<(Vec<Self>, Vec<i32>)> {
        Err(no_cuda())
    }
    fn cuda_batch_topk(
        _: &Runner,
        _: SaeShape,
        _: EncoderInputs<'_, Self>,
        _: usize,
    ) -> Result<Csr<Self>> {
        Err(no_cuda())
    }
    fn cuda_jumprelu(
        _: &Runner,
        _: SaeShape,
        _: EncoderInputs<'_, Self>,
        _: &[Self],
    ) -> Result<Csr<Self>> {
        Err(no_cuda())
    }
    #[allow(clippy::too_many_arguments)]
    fn cuda_decode(
        _: &Runner,
        _: SaeShape,
        _: usize,
        _: &[i32],
        _: &[Self],
        _: &[Self],
        _: Option<&[Self]>,
    ) -> Result<Vec<Self>> {
        Err(no_cuda())
    }
    fn cuda_backward(
        _: &Runner,
        _: SaeShape,
        _: usize,
        _: BackwardInputs<'_, Self>,
    ) -> Result<SaeGrads<Self>> {
        Err(no_cuda())
    }
    fn cuda_mp(
        _: &Runner,
        _: SaeShape,
        _: &[Self],
        _: &[Self],
        _: Option<&[Self]>,
        _: usize,
    ) -> Result<MatchingPursuit<Self>> {
        Err(no_cuda())
    }
    fn cuda_nearest(
        _: &Runner,
        _: SaeShape,
        _: &[Self],
        _: &[Self],
        _: usize,
        _: Metric,
    ) -> Result<(Vec<Self>, Vec<i32>)> {
        Err(no_cuda())
    }
}

fn no_cuda() -> Error {
    Error::NoDevice("this build has no `cuda` feature".into())
}

#[cfg(feature = "cuda")]
impl<E: CaseElement + crate::cuda::CudaElement> TopkDevice for E {
    fn cuda_rows(
        runner: &Runner,
        shape: topk::RowsShape,
        k: usize,
        x: &[E],
        p: topk::RowsParams,
    ) -> Result<(Vec<E>, Vec<i32>)> {
        topk::cuda::rows_host(runner.device()?, &p, shape, k, x).map(|t| (t.values, t.indices))
    }
    fn cuda_encode(
        runner: &Runner,
        shape: SaeShape,
        inputs: EncoderInputs<'_, E>,
        k: usize,
    ) -> Result<(Vec<E>, Vec<i32>)> {
        topk::cuda::encode_host(runner.device()?, shape, k, &inputs).map(|t| (t.values, t.indices))
    }
    fn cuda_batch_topk(
        runner: &Runner,
        shape: SaeShape,
        inputs: EncoderInputs<'_, E>,
        k: usize,
    ) -> Result<Csr<E>> {
        topk::cuda::encode_batch_topk_host(runner.device()?, shape, k, &inputs)
    }
    fn cuda_jumprelu(
        runner: &Runner,
        shape: SaeShape,
        inputs: EncoderInputs<'_, E>,
        threshold: &[E],
    ) -> Result<Csr<E>> {
        topk::cuda::encode_jumprelu_host(runner.device()?, shape, &inputs, threshold)
    }
    fn cuda_decode(
        runner: &Runner,
        shape: SaeShape,
        k: usize,
        indices: &[i32],
        values: &[E],
        w_dec: &[E],
        b_dec: Option<&[E]>,
    ) -> Result<Vec<E>> {
        topk::cuda::decode_host(runner.device()?, shape, k, indices, values, w_dec, b_dec)
    }
    fn cuda_backward(
        runner: &Runner,
        shape: SaeShape,
        k: usize,
        inputs: BackwardInputs<'_, E>,
    ) -> Result<SaeGrads<E>> {
        topk::cuda::backward_host(runner.device()?, shape, k, &inputs)
    }
    fn cuda_mp(
        runner: &Runner,
        shape: SaeShape,
        x: &[E],
        w_dec: &[E],
        b_dec: Option<&[E]>,
        k: usize,
    ) -> Result<MatchingPursuit<E>> {
        topk::cuda::encode_mp_host(runner.device()?, shape, k, x, w_dec, b_dec)
    }
    fn cuda_nearest(
        runner: &Runner,
        shape: SaeShape,
        x: &[E],
        codebook: &[E],
        k: usize,
        metric: Metric,
    ) -> Result<(Vec<E>, Vec<i32>)> {
        topk::cuda::nearest_host(runner.device()?, metric, shape, k, x, codebook)
            .map(|t| (t.values, t.indices))
    }
}

#[cfg(not(feature = "cuda"))]
impl<E: CaseElement> TopkDevice for E {}

fn put(out: &mut Outputs, name: &str, shape: Vec<usize>, data: Data) {
    out.insert(name.to_string(), Tensor { shape, data });
}

fn indices_of<'c>(case: &'c Case, name: &str) -> Result<&'c [i32]> {
    match &case.input(name)?.data {
        Data::I32(v) => Ok(v),
        _ => Err(case_err(&case.name, format!("`in.{name}` must be I32"))),
    }
}

fn dims2(case: &Case, name: &str) -> Result<(usize, usize)> {
    let shape = &case.input(name)?.shape;
    match shape[..] {
        [a, b] => Ok((a, b)),
        _ => Err(Error::shape(name, "rank 2", format!("{shape:?}"))),
    }
}

impl Params<'_> {
    /// A non-negative integer, required.
    fn count(&mut self, key: &'static str) -> Result<usize> {
        self.known.push(key);
        match self.map.get(key).and_then(|v| v.as_u64()) {
            Some(n) => usize::try_from(n)
                .map_err(|_| case_err(self.case, format!("param `{key}` is too large"))),
            None => Err(case_err(
                self.case,
                format!("param `{key}` must be a non-negative integer"),
            )),
        }
    }
}

/// Runs `$f::<E>(args)` with E the float type of input `$input`.
macro_rules! by_dtype {
    ($case:expr, $input:expr, $f:ident ( $($arg:expr),* )) => {
        match $case.input($input)?.dtype() {
            Some(DType::F32) => $f::<f32>($($arg),*),
            Some(DType::F64) => $f::<f64>($($arg),*),
            Some(DType::F16) => $f::<f16>($($arg),*),
            Some(DType::BF16) => $f::<bf16>($($arg),*),
            None => Err(case_err(&$case.name, format!("`in.{}` must be a float tensor", $input))),
        }
    };
}

fn csr_out<E: CaseElement>(out: &mut Outputs, c: Csr<E>) {
    let (rows, nnz) = (c.indptr.len(), c.indices.len());
    put(out, "indptr", vec![rows], Data::I32(c.indptr));
    put(out, "indices", vec![nnz], Data::I32(c.indices));
    put(out, "values", vec![nnz], E::wrap(c.values));
}

impl Runner {
    pub(super) fn topk_rows(&self, case: &Case) -> Result<Outputs> {
        case.only_inputs(&["x"])?;
        let mut p = Params::new(case);
        let k = p.count("k")?;
        let largest = p.bool("largest", true)?;
        p.finish()?;
        let (r, n) = dims2(case, "x")?;
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            r: usize,
            n: usize,
            k: usize,
            largest: bool,
        ) -> Result<Outputs> {
            let params = topk::RowsParams::new().largest(largest);
            let shape = topk::RowsShape::new(r, n);
            let x = typed::<E>(case, "x")?;
            let (v, i) = match runner.kind {
                DeviceKind::Cpu => {
                    topk::rows(&params, shape, k, x).map(|t| (t.values, t.indices))?
                }
                DeviceKind::Cuda => E::cuda_rows(runner, shape, k, x, params)?,
            };
            let mut out = Outputs::new();
            put(&mut out, "values", vec![r, k], E::wrap(v));
            put(&mut out, "indices", vec![r, k], Data::I32(i));
            Ok(out)
        }
        by_dtype!(case, "x", run(self, case, r, n, k, largest))
    }

    /// `sae.encode`, `sae.encode_batch_topk` and `sae.encode_jumprelu`.
    pub(super) fn sae_encode(&self, case: &Case) -> Result<Outputs> {
        let jumprelu = case.op == "sae.encode_jumprelu";
        let mut inputs = vec!["x", "w_enc", "b_enc", "b_dec"];
        if jumprelu {
            inputs.push("threshold");
        }
        case.only_inputs(&inputs)?;
        let mut p = Params::new(case);
        let k = if jumprelu { 0 } else { p.count("k")? };
        p.finish()?;
        let shape = sae_shape(case, "x", "w_enc")?;
        same_shape(case, "b_enc", &[shape.latents])?;
        if case.inputs.contains_key("b_dec") {
            same_shape(case, "b_dec", &[shape.dm])?;
        }
        if jumprelu {
            same_shape(case, "threshold", &[shape.latents])?;
        }
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            shape: SaeShape,
            k: usize,
        ) -> Result<Outputs> {
            let inputs = EncoderInputs {
                x: typed::<E>(case, "x")?,
                w_enc: typed::<E>(case, "w_enc")?,
                b_enc: typed::<E>(case, "b_enc")?,
                b_dec: optional::<E>(case, "b_dec")?,
            };
            let mut out = Outputs::new();
            match case.op.as_str() {
                "sae.encode" => {
                    let (v, i) = match runner.kind {
                        DeviceKind::Cpu => {
                            topk::encode(shape, k, &inputs).map(|t| (t.values, t.indices))?
                        }
                        DeviceKind::Cuda => E::cuda_encode(runner, shape, inputs, k)?,
                    };
                    put(&mut out, "values", vec![shape.batch, k], E::wrap(v));
                    put(&mut out, "indices", vec![shape.batch, k], Data::I32(i));
                }
                "sae.encode_batch_topk" => {
                    let csr = match runner.kind {
                        DeviceKind::Cpu => topk::encode_batch_topk(shape, k, &inputs)?,
                        DeviceKind::Cuda => E::cuda_batch_topk(runner, shape, inputs, k)?,
                    };
                    csr_out(&mut out, csr)
                }
                _ => {
                    let threshold = typed::<E>(case, "threshold")?;
                    let csr = match runner.kind {
                        DeviceKind::Cpu => topk::encode_jumprelu(shape, &inputs, threshold)?,
                        DeviceKind::Cuda => E::cuda_jumprelu(runner, shape, inputs, threshold)?,
                    };
                    csr_out(&mut out, csr)
                }
            }
            Ok(out)
        }
        by_dtype!(case, "x", run(self, case, shape, k))
    }

    pub(super) fn sae_decode(&self, case: &Case) -> Result<Outputs> {
        case.only_inputs(&["indices", "values", "w_dec", "b_dec"])?;
        Params::new(case).finish()?;
        let (b, k) = dims2(case, "indices")?;
        let (l, dm) = dims2(case, "w_dec")?;
        same_shape(case, "values", &[b, k])?;
        if case.inputs.contains_key("b_dec") {
            same_shape(case, "b_dec", &[dm])?;
        }
        let shape = SaeShape::new(b, dm, l);
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            shape: SaeShape,
            k: usize,
        ) -> Result<Outputs> {
            let (indices, values, w_dec, b_dec) = (
                indices_of(case, "indices")?,
                typed::<E>(case, "values")?,
                typed::<E>(case, "w_dec")?,
                optional::<E>(case, "b_dec")?,
            );
            let x_hat = match runner.kind {
                DeviceKind::Cpu => topk::decode(shape, k, indices, values, w_dec, b_dec)?,
                DeviceKind::Cuda => {
                    E::cuda_decode(runner, shape, k, indices, values, w_dec, b_dec)?
                }
            };
            let mut out = Outputs::new();
            put(
                &mut out,
                "x_hat",
                vec![shape.batch, shape.dm],
                E::wrap(x_hat),
            );
            Ok(out)
        }
        by_dtype!(case, "values", run(self, case, shape, k))
    }

    pub(super) fn sae_backward(&self, case: &Case) -> Result<Outputs> {
        case.only_inputs(&[
            "x", "w_enc", "b_enc", "b_dec", "w_dec", "indices", "values", "d_xhat",
        ])?;
        Params::new(case).finish()?;
        let shape = sae_shape(case, "x", "w_enc")?;
        let (b, k) = dims2(case, "indices")?;
        expect_shape("indices", &[b, k], &[shape.batch, k])?;
        same_shape(case, "values", &[b, k])?;
        same_shape(case, "w_dec", &[shape.latents, shape.dm])?;
        same_shape(case, "b_enc", &[shape.latents])?;
        same_shape(case, "d_xhat", &[shape.batch, shape.dm])?;
        if case.inputs.contains_key("b_dec") {
            same_shape(case, "b_dec", &[shape.dm])?;
        }
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            shape: SaeShape,
            k: usize,
        ) -> Result<Outputs> {
            let inputs = BackwardInputs {
                x: typed::<E>(case, "x")?,
                w_enc: typed::<E>(case, "w_enc")?,
                b_enc: typed::<E>(case, "b_enc")?,
                b_dec: optional::<E>(case, "b_dec")?,
                w_dec: typed::<E>(case, "w_dec")?,
                indices: indices_of(case, "indices")?,
                values: typed::<E>(case, "values")?,
                d_xhat: typed::<E>(case, "d_xhat")?,
            };
            let g = match runner.kind {
                DeviceKind::Cpu => topk::backward(shape, k, &inputs)?,
                DeviceKind::Cuda => E::cuda_backward(runner, shape, k, inputs)?,
            };
            let (b, dm, l) = (shape.batch, shape.dm, shape.latents);
            let mut out = Outputs::new();
            put(&mut out, "dw_dec", vec![l, dm], E::wrap(g.dw_dec));
            put(&mut out, "db_dec", vec![dm], E::wrap(g.db_dec));
            put(&mut out, "dw_enc", vec![l, dm], E::wrap(g.dw_enc));
            put(&mut out, "db_enc", vec![l], E::wrap(g.db_enc));
            put(&mut out, "dx", vec![b, dm], E::wrap(g.dx));
            Ok(out)
        }
        by_dtype!(case, "x", run(self, case, shape, k))
    }

    pub(super) fn sae_encode_mp(&self, case: &Case) -> Result<Outputs> {
        case.only_inputs(&["x", "w_dec", "b_dec"])?;
        let mut p = Params::new(case);
        let k = p.count("k")?;
        p.finish()?;
        let shape = sae_shape(case, "x", "w_dec")?;
        if case.inputs.contains_key("b_dec") {
            same_shape(case, "b_dec", &[shape.dm])?;
        }
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            shape: SaeShape,
            k: usize,
        ) -> Result<Outputs>
        where
            E::Acc: crate::Element<Acc = E::Acc>,
        {
            let (x, w_dec, b_dec) = (
                typed::<E>(case, "x")?,
                typed::<E>(case, "w_dec")?,
                optional::<E>(case, "b_dec")?,
            );
            let mp = match runner.kind {
                DeviceKind::Cpu => topk::encode_mp(shape, k, x, w_dec, b_dec)?,
                DeviceKind::Cuda => E::cuda_mp(runner, shape, x, w_dec, b_dec, k)?,
            };
            let mut out = Outputs::new();
            put(&mut out, "values", vec![shape.batch, k], E::wrap(mp.values));
            put(
                &mut out,
                "indices",
                vec![shape.batch, k],
                Data::I32(mp.indices),
            );
            put(
                &mut out,
                "residual",
                vec![shape.batch, shape.dm],
                E::wrap(mp.residual),
            );
            Ok(out)
        }
        by_dtype!(case, "x", run(self, case, shape, k))
    }

    pub(super) fn codebook_nearest(&self, case: &Case) -> Result<Outputs> {
        case.only_inputs(&["x", "codebook"])?;
        let mut p = Params::new(case);
        let k = p.count("k")?;
        let metric = Metric::parse(p.choice("metric", &["dot", "cosine", "l2"])?)?;
        p.finish()?;
        let shape = sae_shape(case, "x", "codebook")?;
        fn run<E: TopkDevice>(
            runner: &Runner,
            case: &Case,
            shape: SaeShape,
            k: usize,
            metric: Metric,
        ) -> Result<Outputs> {
            let (x, codebook) = (typed::<E>(case, "x")?, typed::<E>(case, "codebook")?);
            let (s, i) = match runner.kind {
                DeviceKind::Cpu => {
                    topk::nearest(metric, shape, k, x, codebook).map(|t| (t.values, t.indices))?
                }
                DeviceKind::Cuda => E::cuda_nearest(runner, shape, x, codebook, k, metric)?,
            };
            let mut out = Outputs::new();
            put(&mut out, "scores", vec![shape.batch, k], E::wrap(s));
            put(&mut out, "indices", vec![shape.batch, k], Data::I32(i));
            Ok(out)
        }
        by_dtype!(case, "x", run(self, case, shape, k, metric))
    }
}

/// B, Dm from `x [B, Dm]` and L from `w [L, Dm]`.
fn sae_shape(case: &Case, x: &str, w: &str) -> Result<SaeShape> {
    let (b, dm) = dims2(case, x)?;
    let (l, wd) = dims2(case, w)?;
    expect_shape(w, &[l, wd], &[l, dm])?;
    Ok(SaeShape::new(b, dm, l))
}

// ---------------------------------------------------------------------------------------
// Comparison by meaning.

fn f64_input(case: &Case, name: &str) -> Option<Vec<f64>> {
    case.inputs.get(name).map(Tensor::to_f64)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The f64 score of (row, column) the op selects by, or `None` for an op without one.
/// A score per (row, column), recomputed in f64.
type Scores<'c> = Box<dyn Fn(usize, usize) -> f64 + 'c>;

fn score_table(case: &Case) -> Option<(usize, Scores<'_>)> {
    match case.op.as_str() {
        "topk.rows" => {
            let x = f64_input(case, "x")?;
            let n = *case.inputs.get("x")?.shape.get(1)?;
            Some((n, Box::new(move |r, c| x[r * n + c])))
        }
        "sae.encode" | "sae.encode_batch_topk" | "sae.encode_jumprelu" => {
            let x = f64_input(case, "x")?;
            let w = f64_input(case, "w_enc")?;
            let b_enc = f64_input(case, "b_enc")?;
            let shape = &case.inputs.get("w_enc")?.shape;
            let (l, dm) = (*shape.first()?, *shape.get(1)?);
            let b_dec = f64_input(case, "b_dec").unwrap_or_else(|| vec![0.0; dm]);
            let relu = case.op != "sae.encode_jumprelu";
            Some((
                l,
                Box::new(move |r, c| {
                    let centered: Vec<f64> = (0..dm).map(|d| x[r * dm + d] - b_dec[d]).collect();
                    let pre = dot(&centered, &w[c * dm..(c + 1) * dm]) + b_enc[c];
                    if relu { pre.max(0.0) } else { pre }
                }),
            ))
        }
        "codebook.nearest" => {
            let x = f64_input(case, "x")?;
            let cb = f64_input(case, "codebook")?;
            let shape = &case.inputs.get("codebook")?.shape;
            let (l, dm) = (*shape.first()?, *shape.get(1)?);
            let metric = case.params.get("metric")?.as_str()?.to_string();
            Some((
                l,
                Box::new(move |r, c| {
                    let (xr, cr) = (&x[r * dm..(r + 1) * dm], &cb[c * dm..(c + 1) * dm]);
                    match metric.as_str() {
                        "cosine" => dot(xr, cr) / (dot(xr, xr).sqrt() * dot(cr, cr).sqrt()),
                        "l2" => xr.iter().zip(cr).map(|(a, b)| (a - b) * (a - b)).sum(),
                        _ => dot(xr, cr),
                    }
                }),
            ))
        }
        _ => None,
    }
}

/// The checks of a top-k family case whose outputs are compared by meaning, or `None` to
/// compare elementwise.
pub(super) fn compare(
    case: &Case,
    got: &BTreeMap<String, Tensor>,
    tol: Tolerance,
) -> Option<Vec<OutputCheck>> {
    let (columns, score) = score_table(case)?;
    let values_name = if case.op == "codebook.nearest" {
        "scores"
    } else {
        "values"
    };
    let missing = |name: &str| OutputCheck {
        name: name.to_string(),
        max_abs: f64::NAN,
        max_rel: f64::NAN,
        passed: false,
        problem: Some("the op produced no such output".into()),
    };
    let got_i32 = |name: &str| match got.get(name).map(|t| &t.data) {
        Some(Data::I32(v)) => Some(v.clone()),
        _ => None,
    };
    let (Some(gv), Some(gi), Some(wv)) = (
        got.get(values_name),
        got_i32("indices"),
        case.outputs.get(values_name),
    ) else {
        return Some(vec![missing(values_name)]);
    };
    let lookup = |row: usize, idx: i32| -> Option<f64> {
        usize::try_from(idx)
            .ok()
            .filter(|&c| c < columns)
            .map(|c| score(row, c))
    };
    let mut checks = Vec::new();
    if case.outputs.contains_key("indptr") {
        // CSR: indptr exactly, values in (sorted) order, indices by meaning
        let Some(gp) = got.get("indptr") else {
            return Some(vec![missing("indptr")]);
        };
        checks.push(compare_elementwise(
            "indptr",
            gp,
            &case.outputs["indptr"],
            Tolerance {
                rtol: 0.0,
                atol: 0.0,
            },
        ));
        checks.push(compare_elementwise(values_name, gv, wv, tol));
        let ptr: Vec<usize> = gp.to_f64().iter().map(|v| *v as usize).collect();
        let got_values = gv.to_f64();
        let mut check = OutputCheck {
            name: "indices".into(),
            max_abs: 0.0,
            max_rel: 0.0,
            passed: true,
            problem: None,
        };
        for row in 0..ptr.len().saturating_sub(1) {
            for j in ptr[row]..ptr[row + 1].min(gi.len()).min(got_values.len()) {
                let ok = lookup(row, gi[j]).is_some_and(|s| tol.accepts(got_values[j], s));
                if !ok && check.passed {
                    check.passed = false;
                    check.problem = Some(format!(
                        "row {row}: index {} does not hold value {}",
                        gi[j], got_values[j]
                    ));
                }
            }
        }
        checks.push(check);
    } else {
        let k = *wv.shape.last().unwrap_or(&1);
        let mut check = compare_topk(values_name, &gv.to_f64(), &gi, &wv.to_f64(), k, tol, lookup);
        if gv.shape != wv.shape && check.passed {
            check.passed = false;
            check.problem = Some(format!("shape {:?}, expected {:?}", gv.shape, wv.shape));
        }
        checks.push(check);
    }
    // other outputs (the residual of matching pursuit has none here) elementwise
    for (name, want) in &case.outputs {
        if name != values_name && name != "indices" && name != "indptr" {
            checks.push(match got.get(name) {
                Some(g) => compare_elementwise(name, g, want, tol),
                None => missing(name),
            });
        }
    }
    Some(checks)
}
