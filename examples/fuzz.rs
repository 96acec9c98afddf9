//! The fuzz harness (issue 28): seeded random calls of every public CPU op, checked to
//! return `Ok` or `Err`, never to panic, abort or hang, and, for valid finite inputs with
//! ordinary parameters, to return finite outputs.
//!
//!     cargo run --release --example fuzz -- --seed 7 --seconds 600
//!     cargo run --release --example fuzz -- --replay 7:12:345     (one call, in process)
//!
//! Options: `--seed S` (default 1), `--seconds N` (default 60), `--calls N` per batch
//! (default 2000), `--timeout N` seconds per batch (default 60), `--ops a,b` (substrings of
//! the op names; default all), `--no-limit` (no address-space limit: for AddressSanitizer
//! builds, whose shadow memory needs terabytes of it). Each batch runs in a child process
//! (this binary with `--child`) under a 4 GiB address-space limit: an abort or a hang is reported with the
//! call that was running, and the run goes on with the next batch. Every call is named by
//! `seed:batch:call`, which `--replay` runs alone. Exits 1 on any panic, abort, hang or
//! non-finite output.
//!
//! The calls: dims drawn from 0, 1, small, medium and huge (2^20 .. usize::MAX) values;
//! input lengths mostly right, else off by one or empty; values in small ranges, sometimes
//! with NaN, ±inf, subnormals or 1e30 injected; parameters from ordinary values and
//! extremes (non-finite scales, counts of 0 or past the axis, windows of -2, subnormal
//! alphas, fold ids that no sample fills).

use neurokernels::attention::{
    self, AttentionInputs, AttentionParams, AttentionShape, Bias, CuSeqlens, SplitKv,
};
use neurokernels::element::Accum;
use neurokernels::ridge::{
    self, BandedInputs, BandedShape, BatchedShape, CvInputs, CvParams, CvScore, RidgeReal,
    RidgeShape,
};
use neurokernels::scan::gla::{self, GlaForm, GlaInputs, GlaParams, GlaShape};
use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::topk::{
    self, BackwardInputs, EncoderInputs, Metric, RowsParams, RowsShape, SaeShape,
};
use neurokernels::{Element, Result, bf16, f16};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Every op the harness calls: every op the crate implements (so a new op that the harness
/// does not know fails the run until it is fuzzed), and `ridge.predict`, outside the contract.
fn all_ops() -> Vec<&'static str> {
    let mut ops = neurokernels::cases::IMPLEMENTED_OPS.to_vec();
    ops.push("ridge.predict");
    ops
}

/// Tensors longer than this are never generated: a shape past it gets a wrong length.
const CAP: usize = 1 << 16;

/// splitmix64: small, seedable, good enough for choosing test cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut r = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// One call being generated: its random source, whether it is still valid (every length
/// right), finite (no value injected) and ordinary (no extreme parameter), and its
/// description.
struct Gen {
    rng: Rng,
    valid: bool,
    finite: bool,
    ordinary: bool,
    desc: String,
}

const HUGE: &[usize] = &[1 << 20, 1 << 31, 1 << 32, 1 << 40, 1 << 62, usize::MAX];

fn prod(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d))
}

impl Gen {
    fn new(seed: u64, batch: u64, call: u64) -> Self {
        let mix = seed
            .wrapping_mul(0x1000_0000_01b3)
            .wrapping_add(batch.wrapping_mul(0x9e37_79b9))
            .wrapping_add(call);
        Gen {
            rng: Rng::new(mix),
            valid: true,
            finite: true,
            ordinary: true,
            desc: String::new(),
        }
    }

    fn note(&mut self, s: impl AsRef<str>) {
        self.desc.push(' ');
        self.desc.push_str(s.as_ref());
        if VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
            eprint!(" {}", s.as_ref()); // a replay shows the call even if it aborts
        }
    }

    /// A dim: 0, 1, small, medium, or (rarely) huge.
    fn dim(&mut self) -> usize {
        let r = self.rng.unit();
        if r < 0.07 {
            0
        } else if r < 0.22 {
            1
        } else if r < 0.70 {
            2 + self.rng.below(7)
        } else if r < 0.93 {
            9 + self.rng.below(40)
        } else {
            self.rng.pick(HUGE)
        }
    }

    fn bool(&mut self) -> bool {
        self.rng.chance(0.5)
    }

    /// A count (k, top) for an axis of `n`: mostly in 1..=n, sometimes 0, n + 1 or huge.
    fn count(&mut self, name: &str, n: usize) -> usize {
        let r = self.rng.unit();
        let k = if r < 0.80 && n > 0 {
            1 + self.rng.below(n.min(64))
        } else if r < 0.87 {
            0
        } else if r < 0.94 {
            n.saturating_add(1)
        } else {
            self.rng.pick(HUGE)
        };
        self.note(format!("{name}={k}"));
        k
    }

    /// The length given for a tensor of `expected` elements (None: past CAP or overflowing).
    fn len(&mut self, expected: Option<usize>) -> usize {
        match expected.filter(|n| *n <= CAP) {
            Some(n) if self.rng.chance(0.9) => n,
            Some(n) => {
                self.valid = false;
                self.rng.pick(&[0, 1, n.saturating_sub(1), n + 1])
            }
            None => {
                self.valid = false;
                self.rng.pick(&[0, 1, 7])
            }
        }
    }

    /// Values in [lo, hi], sometimes with NaN, ±inf, subnormals or 1e30 injected.
    fn values<T>(&mut self, n: usize, lo: f64, hi: f64, conv: impl Fn(f64) -> T) -> Vec<T> {
        let inject = n > 0 && self.rng.chance(0.04);
        let mut v: Vec<T> = (0..n)
            .map(|_| conv(lo + (hi - lo) * self.rng.unit()))
            .collect();
        if inject {
            self.finite = false;
            let x = self.rng.pick(&[
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                5e-324,
                1e30,
                -1e30,
            ]);
            let at = self.rng.below(n);
            v[at] = conv(x);
        }
        v
    }

    /// A tensor of `dims` in the element type, values in [lo, hi].
    fn data<E: Element>(&mut self, name: &str, dims: &[usize], lo: f64, hi: f64) -> Vec<E> {
        let n = self.len(prod(dims));
        self.note(format!("{name}:{n}"));
        self.values(n, lo, hi, E::from_f64)
    }

    /// A tensor in the accumulator type `A`.
    fn acc<A: Accum>(&mut self, name: &str, dims: &[usize], lo: f64, hi: f64) -> Vec<A> {
        let n = self.len(prod(dims));
        self.note(format!("{name}:{n}"));
        self.values(n, lo, hi, A::from_f64)
    }

    fn maybe<T>(&mut self, f: impl FnOnce(&mut Self) -> Vec<T>) -> Option<Vec<T>> {
        if self.rng.chance(0.4) {
            Some(f(self))
        } else {
            None
        }
    }

    /// A float parameter: an ordinary value, or (sometimes) an extreme one.
    fn param(&mut self, name: &str, ordinary: &[f64], extreme: &[f64]) -> f64 {
        let x = if !extreme.is_empty() && self.rng.chance(0.12) {
            self.ordinary = false;
            self.rng.pick(extreme)
        } else {
            self.rng.pick(ordinary)
        };
        self.note(format!("{name}={x:e}"));
        x
    }

    /// i32 indices into an axis of `n`: mostly in range.
    fn indices(&mut self, name: &str, dims: &[usize], n: usize) -> Vec<i32> {
        let len = self.len(prod(dims));
        self.note(format!("{name}:{len}"));
        let mut v: Vec<i32> = (0..len)
            .map(|_| self.rng.below(n.min(i32::MAX as usize)) as i32)
            .collect();
        if len > 0 && (n == 0 || self.rng.chance(0.05)) {
            self.valid = false;
            let at = self.rng.below(len);
            v[at] = self
                .rng
                .pick(&[-1, i32::MIN, n.min(i32::MAX as usize) as i32, i32::MAX]);
        }
        v
    }
}

/// Every value finite.
fn fin<E: Element>(v: &[E]) -> bool {
    v.iter().all(|x| x.to_f64().is_finite())
}

fn fin_acc<A: Accum>(v: &[A]) -> bool {
    v.iter().all(|x| x.to_f64().is_finite())
}

/// No NaN and no +inf (lse is −inf for a query that sees no key).
fn lse_ok<A: Accum>(v: &[A]) -> bool {
    v.iter().all(|x| {
        let x = x.to_f64();
        !x.is_nan() && x != f64::INFINITY
    })
}

/// Runs op `name` with element type E; `Ok(finite)` says whether every output is finite.
fn run<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    match name {
        "scan.linear"
        | "scan.linear_complex"
        | "scan.linear_backward"
        | "scan.linear_complex_backward" => scan_linear::<E>(g, name),
        "scan.selective" | "scan.selective_backward" => scan_selective::<E>(g, name),
        "scan.gla" | "scan.gla_backward" => scan_gla::<E>(g, name),
        "attention.forward" | "attention.backward" | "attention.top_keys" => {
            attention_op::<E>(g, name)
        }
        "topk.rows" => topk_rows::<E>(g),
        "sae.encode" | "sae.encode_batch_topk" | "sae.encode_jumprelu" => sae_encode::<E>(g, name),
        "sae.encode_mp" | "codebook.nearest" => sae_dictionary::<E>(g, name),
        "sae.decode" | "sae.backward" => sae_sparse::<E>(g, name),
        "ridge.score" => ridge_score::<E>(g),
        "ridge.solve_batched" => ridge_solve::<E>(g),
        other => panic!("the fuzz harness has no generator for {other}: add one"),
    }
}

/// Ridge's cv and predict take f32 and f64 only.
fn run_ridge<E: RidgeReal>(g: &mut Gen, name: &str) -> Result<bool> {
    match name {
        "ridge.cv" => ridge_cv::<E>(g),
        "ridge.banded_cv" => ridge_banded_cv::<E>(g),
        "ridge.split_scores" => ridge_split_scores::<E>(g),
        "ridge.predict" => ridge_predict::<E>(g),
        other => run::<E>(g, other),
    }
}

fn scan_linear<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = ScanShape::new(g.dim(), g.dim(), g.dim());
    let complex = name.contains("complex");
    let w = if complex { 2 } else { 1 };
    let params = ScanParams::new().reverse(g.bool());
    g.note(format!("{shape:?} {params:?}"));
    let (b, t, d) = (shape.batch, shape.len, shape.channels);
    let a = g.data::<E>("a", &[b, t, d, w], -1.0, 1.0);
    let h0 = g.maybe(|g| g.data::<E>("h0", &[b, d, w], -1.0, 1.0));
    if !name.ends_with("backward") {
        let x = g.data::<E>("b", &[b, t, d, w], -1.0, 1.0);
        let h = if complex {
            scan::linear_complex(&params, shape, &a, &x, h0.as_deref())?
        } else {
            scan::linear(&params, shape, &a, &x, h0.as_deref())?
        };
        return Ok(fin(&h));
    }
    let h = g.data::<E>("h", &[b, t, d, w], -1.0, 1.0);
    let dh = g.data::<E>("dh", &[b, t, d, w], -1.0, 1.0);
    let gr = if complex {
        scan::linear_complex_backward(&params, shape, &a, &h, &dh, h0.as_deref())?
    } else {
        scan::linear_backward(&params, shape, &a, &h, &dh, h0.as_deref())?
    };
    Ok(fin(&gr.da) && fin(&gr.db) && fin(&gr.dh0))
}

fn scan_selective<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = SelectiveShape::new(g.dim(), g.dim(), g.dim(), g.dim());
    let params = SelectiveParams::new().delta_softplus(g.bool());
    g.note(format!("{shape:?} {params:?}"));
    let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
    let u = g.data::<E>("u", &[b, t, d], -1.0, 1.0);
    let delta = g.data::<E>("delta", &[b, t, d], 0.0, 1.0);
    let a = g.acc::<E::Acc>("A", &[d, n], -1.0, 0.0);
    let bm = g.data::<E>("Bm", &[b, t, n], -1.0, 1.0);
    let cm = g.data::<E>("Cm", &[b, t, n], -1.0, 1.0);
    let dskip = g.maybe(|g| g.acc::<E::Acc>("Dskip", &[d], -1.0, 1.0));
    let z = g.maybe(|g| g.data::<E>("z", &[b, t, d], -1.0, 1.0));
    let bias = g.maybe(|g| g.acc::<E::Acc>("delta_bias", &[d], 0.0, 0.5));
    let h0 = g.maybe(|g| g.acc::<E::Acc>("h0", &[b, d, n], -1.0, 1.0));
    let inputs = SelectiveInputs::new(&u, &delta, &a, &bm, &cm)
        .dskip(dskip.as_deref())
        .z(z.as_deref())
        .delta_bias(bias.as_deref())
        .h0(h0.as_deref());
    if name == "scan.selective" {
        let out = selective::selective(&params, shape, &inputs)?;
        return Ok(fin(&out.y) && fin_acc(&out.h_last));
    }
    let dy = g.data::<E>("dy", &[b, t, d], -1.0, 1.0);
    let gr = selective::selective_backward(&params, shape, &inputs, &dy)?;
    Ok(fin(&gr.du)
        && fin(&gr.ddelta)
        && fin_acc(&gr.da)
        && fin(&gr.dbm)
        && fin(&gr.dcm)
        && gr.ddskip.as_deref().is_none_or(fin_acc)
        && gr.dz.as_deref().is_none_or(fin)
        && gr.ddelta_bias.as_deref().is_none_or(fin_acc))
}

fn scan_gla<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = GlaShape::new(g.dim(), g.dim(), g.dim(), g.dim(), g.dim());
    let scale = match g.rng.below(3) {
        0 => None,
        _ => Some(g.param(
            "scale",
            &[0.125, 0.5, 1.0],
            &[f64::NAN, f64::INFINITY, 1e30, -1e30, 0.0],
        )),
    };
    let form = if g.bool() {
        GlaForm::Chunked
    } else {
        GlaForm::Recurrent
    };
    let params = GlaParams::new().scale(scale).form(form);
    g.note(format!("{shape:?} {params:?}"));
    let (b, t, h, k, v) = (
        shape.batch,
        shape.len,
        shape.heads,
        shape.key_dim,
        shape.value_dim,
    );
    let q = g.data::<E>("q", &[b, t, h, k], -1.0, 1.0);
    let kk = g.data::<E>("k", &[b, t, h, k], -1.0, 1.0);
    let vv = g.data::<E>("v", &[b, t, h, v], -1.0, 1.0);
    let gate = g.data::<E>("g", &[b, t, h, k], -1.0, 0.0);
    let h0 = g.maybe(|g| g.acc::<E::Acc>("h0", &[b, h, k, v], -1.0, 1.0));
    let inputs = GlaInputs {
        q: &q,
        k: &kk,
        v: &vv,
        g: &gate,
        h0: h0.as_deref(),
    };
    if name == "scan.gla" {
        let out = gla::gla(&params, shape, &inputs)?;
        return Ok(fin(&out.o) && fin_acc(&out.h_last));
    }
    let d_o = g.data::<E>("do", &[b, t, h, v], -1.0, 1.0);
    let dh_last = g.maybe(|g| g.acc::<E::Acc>("dh_last", &[b, h, k, v], -1.0, 1.0));
    let gr = gla::gla_backward(&params, shape, &inputs, &d_o, dh_last.as_deref())?;
    Ok(fin(&gr.dq)
        && fin(&gr.dk)
        && fin(&gr.dv)
        && fin(&gr.dg)
        && gr.dh0.as_deref().is_none_or(fin_acc))
}

/// Cumulative lengths splitting `total` into `n` pieces (sometimes broken).
fn cu_seqlens(g: &mut Gen, n: usize, total: usize) -> Vec<i32> {
    let mut cuts: Vec<usize> = (0..n.saturating_sub(1))
        .map(|_| g.rng.below(total + 1))
        .collect();
    cuts.sort();
    let mut cu = vec![0i32];
    cu.extend(cuts.iter().map(|c| *c as i32));
    cu.push(total.min(i32::MAX as usize) as i32);
    if g.rng.chance(0.1) {
        g.valid = false;
        let at = g.rng.below(cu.len());
        cu[at] = g.rng.pick(&[-1, i32::MAX, total as i32 + 1]);
    }
    cu
}

fn attention_op<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let varlen = g.rng.chance(0.2);
    let hk = g.dim();
    let group = if g.rng.chance(0.9) {
        1 + g.rng.below(4)
    } else {
        g.dim()
    };
    let mut hq = hk.saturating_mul(group);
    if g.rng.chance(0.05) {
        hq = hq.saturating_add(1); // not a multiple of Hk
    }
    let d = g.dim();
    let dv = if g.rng.chance(0.7) { d } else { g.dim() };
    let batch = if varlen { 1 } else { g.dim() };
    let shape = AttentionShape::new(batch, g.dim(), g.dim(), hq, hk, d, dv);
    let window = [-1i64, -1, 0, 1, 3, 8];
    let params = AttentionParams::new()
        .causal(g.bool())
        .window_left(if g.rng.chance(0.05) {
            g.rng.pick(&[-2, i64::MAX, i64::MIN])
        } else {
            g.rng.pick(&window)
        })
        .window_right(g.rng.pick(&window))
        .softcap(g.param(
            "softcap",
            &[0.0, 0.0, 5.0, 30.0],
            &[-1.0, f64::NAN, f64::INFINITY, 1e-300],
        ))
        .scale(match g.rng.below(3) {
            0 => None,
            _ => Some(g.param(
                "scale",
                &[0.125, 0.5, 1.0],
                &[f64::NAN, f64::INFINITY, 1e30, -1e30, 0.0],
            )),
        })
        .split_kv(
            g.rng
                .pick(&[SplitKv::Auto, SplitKv::Never, SplitKv::Always]),
        );
    g.note(format!("{shape:?} {params:?}"));
    let (b, sq, sk) = (shape.batch, shape.len_q, shape.len_k);
    let q = g.data::<E>("q", &[b, sq, hq, d], -1.0, 1.0);
    let k = g.data::<E>("k", &[b, sk, hk, d], -1.0, 1.0);
    let v = if name == "attention.top_keys" {
        Vec::new()
    } else {
        g.data::<E>("v", &[b, sk, hk, dv], -1.0, 1.0)
    };
    let slopes = g.maybe(|g| g.acc::<E::Acc>("alibi_slopes", &[hq], 0.0, 0.5));
    let (bb, hb) = (if g.bool() { 1 } else { b }, if g.bool() { 1 } else { hq });
    let bias = g.maybe(|g| g.acc::<E::Acc>("bias", &[bb, hb, sq, sk], -1.0, 1.0));
    let pieces = 1 + g.rng.below(4);
    let cu = varlen.then(|| (cu_seqlens(g, pieces, sq), cu_seqlens(g, pieces, sk)));
    let inputs = AttentionInputs::new(&q, &k, &v)
        .alibi_slopes(slopes.as_deref())
        .bias(bias.as_deref().map(|data| Bias {
            data,
            batch: bb,
            heads: hb,
        }))
        .cu_seqlens(cu.as_ref().map(|(q, k)| CuSeqlens { q, k }));
    match name {
        "attention.forward" => {
            let out = attention::forward(&params, shape, &inputs)?;
            Ok(fin(&out.o) && lse_ok(&out.lse))
        }
        "attention.backward" => {
            // the forward's own o and lse where it accepts the call, random ones otherwise
            let (o, lse) = match attention::forward(&params, shape, &inputs) {
                Ok(out) if g.rng.chance(0.9) => (out.o, out.lse),
                _ => (
                    g.data::<E>("o", &[b, sq, hq, dv], -1.0, 1.0),
                    g.acc::<E::Acc>("lse", &[b, hq, sq], -1.0, 1.0),
                ),
            };
            let d_o = g.data::<E>("do", &[b, sq, hq, dv], -1.0, 1.0);
            let gr = attention::backward(&params, shape, &inputs, &o, &d_o, &lse)?;
            Ok(fin(&gr.dq) && fin(&gr.dk) && fin(&gr.dv))
        }
        _ => {
            let top = g.count("top", sk);
            let out = attention::top_keys(&params, shape, &inputs, top)?;
            Ok(fin_acc(&out.weights))
        }
    }
}

fn topk_rows<E: Element>(g: &mut Gen) -> Result<bool> {
    let shape = RowsShape::new(g.dim(), g.dim());
    let params = RowsParams::new().largest(g.bool());
    g.note(format!("{shape:?} {params:?}"));
    let k = g.count("k", shape.cols);
    let x = g.data::<E>("x", &[shape.rows, shape.cols], -1.0, 1.0);
    let out = topk::rows(&params, shape, k, &x)?;
    Ok(fin(&out.values))
}

fn sae_encode<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = SaeShape::new(g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (b, dm, l) = (shape.batch, shape.dm, shape.latents);
    let x = g.data::<E>("x", &[b, dm], -1.0, 1.0);
    let w_enc = g.data::<E>("w_enc", &[l, dm], -1.0, 1.0);
    let b_enc = g.data::<E>("b_enc", &[l], -0.5, 0.5);
    let b_dec = g.maybe(|g| g.data::<E>("b_dec", &[dm], -0.5, 0.5));
    let inputs = EncoderInputs {
        x: &x,
        w_enc: &w_enc,
        b_enc: &b_enc,
        b_dec: b_dec.as_deref(),
    };
    match name {
        "sae.encode" => {
            let k = g.count("k", l);
            let out = topk::encode(shape, k, &inputs)?;
            Ok(fin(&out.values))
        }
        "sae.encode_batch_topk" => {
            let k = g.count("k", l);
            let out = topk::encode_batch_topk(shape, k, &inputs)?;
            Ok(fin(&out.values))
        }
        _ => {
            let threshold = g.data::<E>("threshold", &[l], -0.5, 0.5);
            let out = topk::encode_jumprelu(shape, &inputs, &threshold)?;
            Ok(fin(&out.values))
        }
    }
}

fn sae_dictionary<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = SaeShape::new(g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (b, dm, l) = (shape.batch, shape.dm, shape.latents);
    let x = g.data::<E>("x", &[b, dm], -1.0, 1.0);
    let w = g.data::<E>("w", &[l, dm], -1.0, 1.0);
    if name == "sae.encode_mp" {
        // matching pursuit assumes unit-norm atoms (larger ones may grow the residual)
        let mut w = w;
        if dm > 0 {
            for row in w.chunks_mut(dm) {
                let norm = row
                    .iter()
                    .map(|v| v.to_f64() * v.to_f64())
                    .sum::<f64>()
                    .sqrt();
                if norm.is_finite() && norm > 0.0 {
                    row.iter_mut()
                        .for_each(|v| *v = E::from_f64(v.to_f64() / norm));
                }
            }
        }
        let k = g.count("k", l);
        let b_dec = g.maybe(|g| g.data::<E>("b_dec", &[dm], -0.5, 0.5));
        let out = topk::encode_mp(shape, k, &x, &w, b_dec.as_deref())?;
        return Ok(fin(&out.values) && fin(&out.residual));
    }
    let metric = g.rng.pick(&[Metric::Dot, Metric::Cosine, Metric::L2]);
    g.note(format!("{metric:?}"));
    let k = g.count("k", l);
    let out = topk::nearest(metric, shape, k, &x, &w)?;
    Ok(fin(&out.values))
}

fn sae_sparse<E: Element>(g: &mut Gen, name: &str) -> Result<bool> {
    let shape = SaeShape::new(g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (b, dm, l) = (shape.batch, shape.dm, shape.latents);
    let k = g.count("k", l);
    let indices = g.indices("indices", &[b, k], l);
    let values = g.data::<E>("values", &[b, k], 0.0, 1.0);
    let w_dec = g.data::<E>("w_dec", &[l, dm], -1.0, 1.0);
    let b_dec = g.maybe(|g| g.data::<E>("b_dec", &[dm], -0.5, 0.5));
    if name == "sae.decode" {
        let x_hat = topk::decode(shape, k, &indices, &values, &w_dec, b_dec.as_deref())?;
        return Ok(fin(&x_hat));
    }
    let x = g.data::<E>("x", &[b, dm], -1.0, 1.0);
    let w_enc = g.data::<E>("w_enc", &[l, dm], -1.0, 1.0);
    let b_enc = g.data::<E>("b_enc", &[l], -0.5, 0.5);
    let d_xhat = g.data::<E>("d_xhat", &[b, dm], -1.0, 1.0);
    let inputs = BackwardInputs {
        x: &x,
        w_enc: &w_enc,
        b_enc: &b_enc,
        b_dec: b_dec.as_deref(),
        w_dec: &w_dec,
        indices: &indices,
        values: &values,
        d_xhat: &d_xhat,
    };
    let gr = topk::backward(shape, k, &inputs)?;
    Ok(fin(&gr.dw_dec) && fin(&gr.db_dec) && fin(&gr.dw_enc) && fin(&gr.db_enc) && fin(&gr.dx))
}

const ALPHAS: &[f64] = &[1e-3, 0.1, 1.0, 10.0, 1e3];
const BAD_ALPHAS: &[f64] = &[
    0.0,
    -1.0,
    f64::NAN,
    f64::INFINITY,
    5e-324,
    1e-310,
    1e-300,
    1e300,
];

fn ridge_cv<E: RidgeReal>(g: &mut Gen) -> Result<bool> {
    let shape = RidgeShape::new(g.dim(), g.dim(), g.dim());
    let params = CvParams::new()
        .score(if g.bool() {
            CvScore::R2
        } else {
            CvScore::Pearson
        })
        .center(g.bool())
        .target_batch(if g.rng.chance(0.05) {
            0
        } else {
            1 + g.rng.below(64)
        });
    g.note(format!("{shape:?} {params:?}"));
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let x = g.data::<E>("x", &[n, p], -1.0, 1.0);
    let y = g.data::<E>("y", &[n, t], -1.0, 1.0);
    let alphas: Vec<E> = (0..1 + g.rng.below(4))
        .map(|_| E::from_f64(g.param("alpha", ALPHAS, BAD_ALPHAS)))
        .collect();
    let len = g.len(Some(n));
    let folds_n = 2 + g.rng.below(4);
    let mut folds: Vec<i32> = (0..len).map(|i| (i % folds_n) as i32).collect();
    if len > 0 && g.rng.chance(0.1) {
        g.valid = false;
        let at = g.rng.below(len);
        folds[at] = g.rng.pick(&[-1, i32::MAX, len as i32]);
    }
    g.note(format!("folds:{len}"));
    let inputs = CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let fit = ridge::cv(&params, shape, &inputs, None)?;
    Ok(fin(&fit.best_alpha) && fin(&fit.w) && fin(&fit.intercept) && fin(&fit.cv_scores))
}

/// `groups [p]` for S spaces: column j in space j % S, sometimes an id out of range.
fn space_ids(g: &mut Gen, p: usize, spaces: usize) -> Vec<i32> {
    let len = g.len(Some(p));
    g.note(format!("groups:{len}"));
    let s = spaces.clamp(1, i32::MAX as usize);
    let mut v: Vec<i32> = (0..len).map(|j| (j % s) as i32).collect();
    if len > 0 && g.rng.chance(0.05) {
        g.valid = false;
        let at = g.rng.below(len);
        v[at] = g.rng.pick(&[-1, i32::MIN, s as i32, i32::MAX]);
    }
    v
}

fn ridge_banded_cv<E: RidgeReal>(g: &mut Gen) -> Result<bool> {
    let spaces = if g.rng.chance(0.05) {
        g.dim()
    } else {
        1 + g.rng.below(3)
    };
    let shape = BandedShape::new(g.dim(), g.dim(), g.dim(), spaces);
    let params = CvParams::new()
        .score(if g.bool() {
            CvScore::R2
        } else {
            CvScore::Pearson
        })
        .center(g.bool())
        .target_batch(1 + g.rng.below(64));
    g.note(format!("{shape:?} {params:?}"));
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let x = g.data::<E>("x", &[n, p], -1.0, 1.0);
    let y = g.data::<E>("y", &[n, t], -1.0, 1.0);
    let groups = space_ids(g, p, spaces);
    let alphas: Vec<E> = (0..1 + g.rng.below(4))
        .map(|_| E::from_f64(g.param("alpha", ALPHAS, BAD_ALPHAS)))
        .collect();
    // candidates: positive weights normalized to the simplex, sometimes a bad row
    let candidates = 1 + g.rng.below(3);
    let width = spaces.min(64);
    let mut gammas: Vec<E> = Vec::new();
    for _ in 0..candidates {
        let raw: Vec<f64> = (0..width).map(|_| 0.05 + g.rng.unit()).collect();
        let sum: f64 = raw.iter().sum();
        gammas.extend(raw.iter().map(|v| E::from_f64(v / sum)));
    }
    if !gammas.is_empty() && g.rng.chance(0.1) {
        g.valid = false;
        let at = g.rng.below(gammas.len());
        gammas[at] = E::from_f64(g.rng.pick(&[-0.1, f64::NAN, 2.0, f64::INFINITY]));
    }
    g.note(format!("gammas:{}", gammas.len()));
    let len = g.len(Some(n));
    let folds_n = 2 + g.rng.below(3);
    let folds: Vec<i32> = (0..len).map(|i| (i % folds_n) as i32).collect();
    g.note(format!("folds:{len}"));
    let inputs = BandedInputs {
        x: &x,
        groups: &groups,
        y: &y,
        alphas: &alphas,
        gammas: &gammas,
        folds: &folds,
    };
    let fit = ridge::banded_cv(&params, shape, &inputs, None)?;
    Ok(fin(&fit.deltas) && fin(&fit.w) && fin(&fit.intercept) && fin(&fit.cv_scores))
}

fn ridge_split_scores<E: RidgeReal>(g: &mut Gen) -> Result<bool> {
    let spaces = if g.rng.chance(0.05) {
        g.dim()
    } else {
        1 + g.rng.below(3)
    };
    let shape = BandedShape::new(g.dim(), g.dim(), g.dim(), spaces);
    g.note(format!("{shape:?}"));
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let x = g.data::<E>("x", &[n, p], -1.0, 1.0);
    let groups = space_ids(g, p, spaces);
    let w = g.data::<E>("w", &[p, t], -1.0, 1.0);
    let y = g.data::<E>("y", &[n, t], -1.0, 1.0);
    let s = ridge::split_scores(shape, &x, &groups, &w, &y)?;
    Ok(fin(&s.r2) && fin(&s.pearson))
}

fn ridge_predict<E: RidgeReal>(g: &mut Gen) -> Result<bool> {
    let shape = RidgeShape::new(g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let x = g.data::<E>("x", &[n, p], -1.0, 1.0);
    let w = g.data::<E>("w", &[p, t], -1.0, 1.0);
    let intercept = g.maybe(|g| g.data::<E>("intercept", &[t], -1.0, 1.0));
    let y = ridge::predict(shape, &x, &w, intercept.as_deref())?;
    Ok(fin(&y))
}

fn ridge_score<E: Element>(g: &mut Gen) -> Result<bool> {
    let shape = RidgeShape::new(g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (n, t) = (shape.samples, shape.targets);
    let y_true = g.data::<E>("y_true", &[n, t], -1.0, 1.0);
    let y_pred = g.data::<E>("y_pred", &[n, t], -1.0, 1.0);
    let s = ridge::score(shape, &y_true, &y_pred)?;
    Ok(fin(&s.r2) && fin(&s.pearson))
}

fn ridge_solve<E: Element>(g: &mut Gen) -> Result<bool> {
    let shape = BatchedShape::new(g.dim(), g.dim(), g.dim(), g.dim());
    g.note(format!("{shape:?}"));
    let (gp, n, p, t) = (shape.problems, shape.samples, shape.features, shape.targets);
    let x = g.data::<E>("x", &[gp, n, p], -1.0, 1.0);
    let y = g.data::<E>("y", &[gp, n, t], -1.0, 1.0);
    let len = g.len(Some(gp));
    let alpha: Vec<E> = (0..len)
        .map(|_| E::from_f64(g.param("alpha", ALPHAS, BAD_ALPHAS)))
        .collect();
    g.note(format!("alpha:{len}"));
    let w = ridge::solve_batched(shape, &x, &y, &alpha)?;
    Ok(fin(&w))
}

/// What one call did.
enum Outcome {
    Ok,
    Err,
    /// Ok, but a non-finite output from valid finite inputs and ordinary parameters.
    NonFinite,
    Panic(String),
}

static PANIC_MSG: Mutex<String> = Mutex::new(String::new());

/// Set by `--replay`: each part of the call's description is printed as it is drawn.
static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Generates and runs call `call` of `batch`; returns the op, its description and outcome.
fn one_call(
    seed: u64,
    batch: u64,
    call: u64,
    ops: &[&'static str],
) -> (&'static str, String, Outcome) {
    let mut g = Gen::new(seed, batch, call);
    let name = ops[g.rng.below(ops.len())];
    let ridge_only = matches!(
        name,
        "ridge.cv" | "ridge.banded_cv" | "ridge.split_scores" | "ridge.predict"
    );
    let dtype = if ridge_only {
        g.rng.below(2)
    } else {
        g.rng.below(5)
    };
    g.note(["f32", "f64", "f32", "f16", "bf16"][dtype]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match dtype {
        1 => run_ridge::<f64>(&mut g, name),
        0 | 2 => run_ridge::<f32>(&mut g, name),
        3 => run::<f16>(&mut g, name),
        _ => run::<bf16>(&mut g, name),
    }));
    let outcome = match result {
        Ok(Err(_)) => Outcome::Err,
        Ok(Ok(false)) if g.valid && g.finite && g.ordinary => Outcome::NonFinite,
        Ok(Ok(_)) => Outcome::Ok,
        Err(_) => Outcome::Panic(PANIC_MSG.lock().map(|m| m.clone()).unwrap_or_default()),
    };
    (name, g.desc, outcome)
}

fn selected_ops(filter: &Option<String>) -> Vec<&'static str> {
    match filter {
        None => all_ops(),
        Some(f) => all_ops()
            .into_iter()
            .filter(|op| f.split(',').any(|s| op.contains(s)))
            .collect(),
    }
}

/// The child: runs `calls` calls of one batch, printing `CALL` before each (so the parent
/// can name the one that aborted or hung), then per-op counts and every failure.
fn child(seed: u64, batch: u64, calls: u64, ops: &[&'static str]) {
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut m) = PANIC_MSG.lock() {
            *m = info.to_string();
        }
    }));
    let out = std::io::stdout();
    let mut counts: BTreeMap<&str, [u64; 2]> = BTreeMap::new();
    for call in 0..calls {
        {
            let mut o = out.lock();
            let _ = writeln!(o, "CALL {seed}:{batch}:{call}");
            let _ = o.flush();
        }
        let (op, desc, outcome) = one_call(seed, batch, call, ops);
        let c = counts.entry(op).or_default();
        let mut o = out.lock();
        match outcome {
            Outcome::Ok => c[0] += 1,
            Outcome::Err => c[1] += 1,
            Outcome::NonFinite => {
                c[0] += 1;
                let _ = writeln!(o, "FAIL nonfinite {op} {seed}:{batch}:{call} {desc}");
            }
            Outcome::Panic(msg) => {
                let msg = msg.replace('\n', " | ");
                let _ = writeln!(o, "FAIL panic {op} {seed}:{batch}:{call} {desc} {msg}");
            }
        }
    }
    let mut o = out.lock();
    for (op, [ok, err]) in counts {
        let _ = writeln!(o, "COUNT {op} {ok} {err}");
    }
    let _ = writeln!(o, "END");
}

struct Args {
    seed: u64,
    seconds: u64,
    calls: u64,
    timeout: u64,
    ops: Option<String>,
    child_batch: Option<u64>,
    replay: Option<(u64, u64, u64)>,
    no_limit: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        seed: 1,
        seconds: 60,
        calls: 2000,
        timeout: 60,
        ops: None,
        child_batch: None,
        replay: None,
        no_limit: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |s: &str| -> u64 {
        s.parse()
            .unwrap_or_else(|_| usage(&format!("not a number: {s}")))
    };
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--seed" => a.seed = num(&value),
            "--seconds" => a.seconds = num(&value),
            "--calls" => a.calls = num(&value).max(1),
            "--timeout" => a.timeout = num(&value).max(1),
            "--ops" => a.ops = Some(value),
            "--child" => a.child_batch = Some(num(&value)),
            "--replay" => {
                let p: Vec<u64> = value.split(':').map(num).collect();
                if p.len() != 3 {
                    usage("--replay takes seed:batch:call");
                }
                a.replay = Some((p[0], p[1], p[2]));
            }
            "--no-limit" => a.no_limit = true,
            "--bench" => {} // cargo may pass it to examples run as benches
            other => usage(&format!("unknown argument {other}")),
        }
        i += if argv[i] == "--bench" || argv[i] == "--no-limit" {
            1
        } else {
            2
        };
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!(
        "fuzz: {why}\nusage: fuzz [--seed S] [--seconds N] [--calls N] [--timeout N] [--ops a,b] | --replay S:B:C"
    );
    std::process::exit(2)
}

fn main() {
    let args = parse_args();
    let ops = selected_ops(&args.ops);
    if ops.is_empty() {
        usage("--ops matches no op");
    }
    if let Some((seed, batch, call)) = args.replay {
        // without the quiet hook: a panic prints its message and backtrace as usual
        VERBOSE.store(true, std::sync::atomic::Ordering::Relaxed);
        eprint!("{seed}:{batch}:{call}");
        let (op, desc, outcome) = one_call(seed, batch, call, &ops);
        let what = match outcome {
            Outcome::Ok => "Ok".to_string(),
            Outcome::Err => "Err".to_string(),
            Outcome::NonFinite => "NON-FINITE output".to_string(),
            Outcome::Panic(m) => format!("PANIC {m}"),
        };
        eprintln!();
        println!("{seed}:{batch}:{call} {op}{desc}: {what}");
        return;
    }
    if let Some(batch) = args.child_batch {
        child(args.seed, batch, args.calls, &ops);
        return;
    }
    parent(&args);
}

/// Runs batches in child processes until the time is up; prints per-op counts and every
/// failure; exits 1 on any.
fn parent(args: &Args) {
    let exe = std::env::current_exe().expect("the harness's own path");
    let dir = std::env::temp_dir().join(format!("nk-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let start = Instant::now();
    let mut counts: BTreeMap<String, [u64; 2]> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut batches = 0u64;
    println!(
        "fuzz: seed {} for {} s, {} calls per batch, {} ops",
        args.seed,
        args.seconds,
        args.calls,
        selected_ops(&args.ops).len()
    );
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let batch = batches;
        batches += 1;
        let log = dir.join(format!("batch-{batch}.txt"));
        let file = std::fs::File::create(&log).expect("a log file");
        let mut cmd = Command::new("sh");
        // a 4 GiB address-space limit: an allocation past it aborts the child, not the
        // machine (ulimit may be refused; the run goes on without it)
        let limit = if args.no_limit {
            ""
        } else {
            "ulimit -v 4194304 2>/dev/null; "
        };
        cmd.arg("-c")
            .arg(format!("{limit}exec \"$0\" \"$@\""))
            .arg(&exe)
            .args(["--seed", &args.seed.to_string()])
            .args(["--calls", &args.calls.to_string()])
            .args(["--child", &batch.to_string()]);
        if let Some(ops) = &args.ops {
            cmd.args(["--ops", ops]);
        }
        let mut child = cmd
            .stdout(Stdio::from(file))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning a batch");
        let deadline = Instant::now() + Duration::from_secs(args.timeout);
        let status = loop {
            match child.try_wait().expect("waiting for a batch") {
                Some(status) => break Some(status),
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut last_call = "none";
        let mut ended = false;
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("CALL ") {
                last_call = c;
            } else if let Some(rest) = line.strip_prefix("COUNT ") {
                let f: Vec<&str> = rest.split(' ').collect();
                if let [op, ok, err] = f[..] {
                    let c = counts.entry(op.to_string()).or_default();
                    c[0] += ok.parse::<u64>().unwrap_or(0);
                    c[1] += err.parse::<u64>().unwrap_or(0);
                }
            } else if let Some(fail) = line.strip_prefix("FAIL ") {
                failures.push(fail.to_string());
            } else if line == "END" {
                ended = true;
            }
        }
        match status {
            None => failures.push(format!(
                "hang (> {} s batch) at call {last_call}",
                args.timeout
            )),
            Some(s) if !ended || !s.success() => {
                failures.push(format!("abort ({s}) at call {last_call}"))
            }
            Some(_) => {}
        }
        let _ = std::fs::remove_file(&log);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (mut ok, mut err) = (0, 0);
    println!("{:<32} {:>9} {:>9}", "op", "Ok", "Err");
    for (op, [o, e]) in &counts {
        println!("{op:<32} {o:>9} {e:>9}");
        ok += o;
        err += e;
    }
    println!(
        "fuzz: {} calls ({ok} Ok, {err} Err) in {batches} batches, {:.0} s; {} failures",
        ok + err,
        start.elapsed().as_secs_f64(),
        failures.len()
    );
    for f in &failures {
        println!("FAIL {f}");
    }
    if !failures.is_empty() {
        println!("replay one with: cargo run --release --example fuzz -- --replay SEED:BATCH:CALL");
        std::process::exit(1);
    }
}
