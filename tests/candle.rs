//! `neurokernels::candle` (feature `candle`): every op's forward and the gradients candle's
//! autograd gets from `backward()` against the same computation written with candle's own ops
//! in f64 (attention as softmax(QKᵀ)V with masks, scans as loops, SAE as matmul + top-k +
//! gather); lower precisions against the f64 reference; errors naming the tensor.

mod common;

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use common::Rng;
use neurokernels::candle::attention::{self, AttentionInputs, AttentionParams, CuSeqlens};
use neurokernels::candle::candle_core;
use neurokernels::candle::scan::{self, ScanParams};

type R = candle_core::Result<()>;

/// A random f64 tensor with entries in [lo, hi).
fn rand(rng: &mut Rng, dims: &[usize], lo: f64, hi: f64) -> Tensor {
    let n = dims.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.uniform(lo, hi)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// The largest |got − want| / (atol + rtol·|want|) over two tensors of the same shape.
#[track_caller]
fn close(name: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let w = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut worst = (0.0f64, 0usize);
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        let r = if g == w {
            0.0
        } else {
            (g - w).abs() / (atol + rtol * w.abs())
        };
        assert!(!r.is_nan(), "{name}[{i}]: got {g}, want {w}");
        if r > worst.0 {
            worst = (r, i);
        }
    }
    assert!(
        worst.0 <= 1.0,
        "{name}[{}]: got {}, want {} ({}x the tolerance)",
        worst.1,
        g[worst.1],
        w[worst.1],
        worst.0
    );
}

// ---------------------------------------------------------------- attention

/// One attention configuration.
#[derive(Clone)]
struct Cfg {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hk: usize,
    d: usize,
    dv: usize,
    params: AttentionParams,
    alibi: bool,
    /// (Bb, Hb) of a bias, if any.
    bias: Option<(usize, usize)>,
}

impl Cfg {
    fn new(b: usize, sq: usize, sk: usize, hq: usize, hk: usize, d: usize) -> Self {
        Cfg {
            b,
            sq,
            sk,
            hq,
            hk,
            d,
            dv: d,
            params: AttentionParams::new(),
            alibi: false,
            bias: None,
        }
    }
}

/// The additive score mask `[Sq, Sk]` (0 visible, −inf hidden) and ALiBi distances.
fn mask_and_distance(c: &Cfg) -> (Tensor, Tensor) {
    let p = &c.params;
    let off = c.sk as i64 - c.sq as i64;
    let (mut mask, mut dist) = (vec![], vec![]);
    for i in 0..c.sq as i64 {
        for j in 0..c.sk as i64 {
            let diag = i + off;
            let right = if p.causal { 0 } else { p.window_right };
            let mut visible = true;
            if right >= 0 && j > diag + right {
                visible = false;
            }
            if p.window_left >= 0 && j < diag - p.window_left {
                visible = false;
            }
            mask.push(if visible { 0.0 } else { f64::NEG_INFINITY });
            dist.push((diag - j).abs() as f64);
        }
    }
    let dev = Device::Cpu;
    (
        Tensor::from_vec(mask, (c.sq, c.sk), &dev).unwrap(),
        Tensor::from_vec(dist, (c.sq, c.sk), &dev).unwrap(),
    )
}

/// softmax(scale·QKᵀ (softcap, ALiBi, bias, masks))·V with candle's ops; q, k, v in the
/// crate's layouts, o `[B, Sq, Hq, Dv]`.
fn reference_attention(
    c: &Cfg,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    slopes: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let group = c.hq / c.hk;
    let heads: Vec<u32> = (0..c.hq).map(|h| (h / group) as u32).collect();
    let heads = Tensor::new(heads.as_slice(), &Device::Cpu)?;
    let q = q.transpose(1, 2)?.contiguous()?; // [B, Hq, Sq, D]
    let k = k.transpose(1, 2)?.contiguous()?.index_select(&heads, 1)?; // [B, Hq, Sk, D]
    let v = v.transpose(1, 2)?.contiguous()?.index_select(&heads, 1)?;
    let scale = c.params.scale.unwrap_or(1.0 / (c.d as f64).sqrt());
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if c.params.softcap > 0.0 {
        s = ((s / c.params.softcap)?.tanh()? * c.params.softcap)?;
    }
    let (mask, dist) = mask_and_distance(c);
    if let Some(slopes) = slopes {
        let alibi = slopes
            .reshape((1, c.hq, 1, 1))?
            .broadcast_mul(&dist.reshape((1, 1, c.sq, c.sk))?)?;
        s = s.broadcast_sub(&alibi)?;
    }
    if let Some(bias) = bias {
        s = s.broadcast_add(bias)?;
    }
    s = s.broadcast_add(&mask)?;
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// Our op and the reference in f64: o, and the gradients of Σ o·w for q, k, v.
fn check_attention(c: &Cfg, seed: u64) -> R {
    let mut rng = Rng::new(seed);
    let q = Var::from_tensor(&rand(&mut rng, &[c.b, c.sq, c.hq, c.d], -1.0, 1.0))?;
    let k = Var::from_tensor(&rand(&mut rng, &[c.b, c.sk, c.hk, c.d], -1.0, 1.0))?;
    let v = Var::from_tensor(&rand(&mut rng, &[c.b, c.sk, c.hk, c.dv], -1.0, 1.0))?;
    let w = rand(&mut rng, &[c.b, c.sq, c.hq, c.dv], -1.0, 1.0);
    let slopes = c
        .alibi
        .then(|| Var::from_tensor(&rand(&mut rng, &[c.hq], 0.05, 0.5)).unwrap());
    let bias = c.bias.map(|(bb, hb)| {
        Var::from_tensor(&rand(&mut rng, &[bb, hb, c.sq, c.sk], -1.0, 1.0)).unwrap()
    });
    let (slopes, bias) = (
        slopes.as_ref().map(Var::as_tensor),
        bias.as_ref().map(Var::as_tensor),
    );

    let inputs = AttentionInputs::new(&q, &k, &v)
        .alibi_slopes(slopes)
        .bias(bias);
    let (o, lse) = attention::forward_with_lse(&c.params, &inputs)?;
    let want = reference_attention(c, &q, &k, &v, slopes, bias)?;
    close("o", &o, &want, 1e-10, 1e-12);
    assert_eq!(lse.dims(), &[c.b, c.hq, c.sq]);

    let ours = (o * &w)?.sum_all()?.backward()?;
    let theirs = (want * &w)?.sum_all()?.backward()?;
    for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
        let got = ours.get(var).expect("a gradient for every input");
        let want = theirs.get(var).expect("a reference gradient");
        close(name, got, want, 1e-9, 1e-11);
    }
    // the bias and the ALiBi slopes, tracked as Vars, get theirs too
    for (name, t) in [("dbias", bias), ("dalibi_slopes", slopes)] {
        if let Some(t) = t {
            let got = ours.get(t).expect("a gradient for a tracked bias or slope");
            close(name, got, theirs.get(t).unwrap(), 1e-9, 1e-11);
        }
    }
    Ok(())
}

#[test]
fn attention_plain_and_gqa() -> R {
    check_attention(&Cfg::new(2, 9, 9, 4, 4, 8), 1)?;
    check_attention(&Cfg::new(1, 7, 13, 6, 2, 16), 2)?; // GQA, Sq < Sk
    check_attention(&Cfg::new(2, 5, 11, 4, 1, 8), 3) // MQA
}

#[test]
fn attention_masks_softcap_scale() -> R {
    let mut c = Cfg::new(2, 12, 12, 4, 2, 8);
    c.params = AttentionParams::new().causal(true);
    check_attention(&c, 4)?;
    c.params = AttentionParams::new().window_left(3).window_right(2);
    check_attention(&c, 5)?;
    let mut c = Cfg::new(1, 6, 10, 2, 2, 8);
    c.dv = 12;
    c.params = AttentionParams::new()
        .causal(true)
        .window_left(4)
        .softcap(2.5)
        .scale(Some(0.7));
    check_attention(&c, 6)
}

#[test]
fn attention_alibi_and_bias() -> R {
    let mut c = Cfg::new(2, 8, 10, 4, 2, 8);
    c.alibi = true;
    c.params = AttentionParams::new().causal(true);
    check_attention(&c, 7)?;
    c.alibi = false;
    c.bias = Some((1, 4));
    check_attention(&c, 8)?;
    c.bias = Some((2, 1));
    c.alibi = true;
    c.params = AttentionParams::new().softcap(3.0);
    check_attention(&c, 9)
}

/// f32, f16 and bf16 against the f64 reference; the gradients come back in the input dtype.
#[test]
fn attention_low_precision() -> R {
    let mut c = Cfg::new(1, 16, 16, 4, 2, 16);
    c.params = AttentionParams::new().causal(true);
    let mut rng = Rng::new(10);
    let q = rand(&mut rng, &[1, 16, 4, 16], -1.0, 1.0);
    let k = rand(&mut rng, &[1, 16, 2, 16], -1.0, 1.0);
    let v = rand(&mut rng, &[1, 16, 2, 16], -1.0, 1.0);
    let want = reference_attention(&c, &q, &k, &v, None, None)?;
    let (gq, gk, gv) = {
        let (q, k, v) = (
            Var::from_tensor(&q)?,
            Var::from_tensor(&k)?,
            Var::from_tensor(&v)?,
        );
        let o = reference_attention(&c, &q, &k, &v, None, None)?;
        let g = o.sum_all()?.backward()?;
        (
            g.get(&q).unwrap().clone(),
            g.get(&k).unwrap().clone(),
            g.get(&v).unwrap().clone(),
        )
    };
    for (dtype, rtol, atol) in [
        (DType::F32, 1e-4, 1e-5),
        (DType::F16, 1e-2, 4e-3),
        (DType::BF16, 4e-2, 3e-2),
    ] {
        let q = Var::from_tensor(&q.to_dtype(dtype)?)?;
        let k = Var::from_tensor(&k.to_dtype(dtype)?)?;
        let v = Var::from_tensor(&v.to_dtype(dtype)?)?;
        let o = attention::forward(&c.params, &AttentionInputs::new(&q, &k, &v))?;
        assert_eq!(o.dtype(), dtype);
        close(&format!("o {dtype:?}"), &o, &want, rtol, atol);
        let g = o.sum_all()?.backward()?;
        for (name, var, want) in [("dq", &q, &gq), ("dk", &k, &gk), ("dv", &v, &gv)] {
            let got = g.get(var).unwrap();
            assert_eq!(got.dtype(), dtype, "{name}");
            close(
                &format!("{name} {dtype:?}"),
                got,
                want,
                4.0 * rtol,
                4.0 * atol,
            );
        }
    }
    Ok(())
}

/// A model around the op: strided inputs (heads-second layout transposed in), a linear layer
/// before it, and the gradient reaching the layer's weight.
#[test]
fn attention_inside_a_model_with_strided_inputs() -> R {
    let mut rng = Rng::new(11);
    let (b, s, h, d) = (2, 6, 2, 4);
    let x = rand(&mut rng, &[b, s, h * d], -1.0, 1.0);
    let wq = Var::from_tensor(&rand(&mut rng, &[h * d, h * d], -0.5, 0.5))?;
    let project = |x: &Tensor| -> candle_core::Result<Tensor> {
        // [B, S, H·D] -> [B, H, S, D] (a model's usual layout) -> back to [B, S, H, D], strided
        x.broadcast_matmul(wq.as_tensor())?
            .reshape((b, s, h, d))?
            .transpose(1, 2)?
            .transpose(1, 2)
    };
    let q = project(&x)?;
    let kv = x.reshape((b, s, h, d))?.transpose(1, 2)?.transpose(1, 2)?;
    let c = Cfg::new(b, s, s, h, h, d);
    let o = attention::forward(&c.params, &AttentionInputs::new(&q, &kv, &kv))?;
    let want = reference_attention(&c, &q, &kv, &kv, None, None)?;
    close("o", &o, &want, 1e-10, 1e-12);
    let g1 = o.sqr()?.sum_all()?.backward()?;
    let g2 = want.sqr()?.sum_all()?.backward()?;
    close(
        "dwq",
        g1.get(&wq).unwrap(),
        g2.get(&wq).unwrap(),
        1e-9,
        1e-11,
    );
    Ok(())
}

/// Packed variable-length sequences equal each sequence run on its own.
#[test]
fn attention_varlen_matches_per_sequence() -> R {
    let mut rng = Rng::new(12);
    let lens = [3usize, 5, 4];
    let total: usize = lens.iter().sum();
    let (h, d) = (2, 8);
    let q = Var::from_tensor(&rand(&mut rng, &[1, total, h, d], -1.0, 1.0))?;
    let k = Var::from_tensor(&rand(&mut rng, &[1, total, h, d], -1.0, 1.0))?;
    let v = Var::from_tensor(&rand(&mut rng, &[1, total, h, d], -1.0, 1.0))?;
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let cu = Tensor::new(cu.as_slice(), &Device::Cpu)?;
    let params = AttentionParams::new().causal(true);
    let inputs = AttentionInputs::new(&q, &k, &v).cu_seqlens(Some(CuSeqlens { q: &cu, k: &cu }));
    let o = attention::forward(&params, &inputs)?;
    let ours = o.sum_all()?.backward()?;
    let mut start = 0;
    let mut parts = vec![];
    for l in lens {
        let (qs, ks, vs) = (
            q.narrow(1, start, l)?,
            k.narrow(1, start, l)?,
            v.narrow(1, start, l)?,
        );
        let mut c = Cfg::new(1, l, l, h, h, d);
        c.params = params;
        parts.push(reference_attention(&c, &qs, &ks, &vs, None, None)?);
        start += l;
    }
    let want = Tensor::cat(&parts, 1)?;
    close("o", &o, &want, 1e-10, 1e-12);
    let theirs = want.sum_all()?.backward()?;
    for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v)] {
        close(
            name,
            ours.get(var).unwrap(),
            theirs.get(var).unwrap(),
            1e-9,
            1e-11,
        );
    }
    Ok(())
}

#[test]
fn attention_top_keys_are_the_largest_probabilities() -> R {
    let mut rng = Rng::new(13);
    let mut c = Cfg::new(1, 5, 7, 2, 1, 8);
    c.params = AttentionParams::new().causal(true);
    let q = rand(&mut rng, &[1, 5, 2, 8], -2.0, 2.0);
    let k = rand(&mut rng, &[1, 7, 1, 8], -2.0, 2.0);
    let v = Tensor::zeros((1, 7, 1, 8), DType::F64, &Device::Cpu)?;
    let (w, idx) = attention::top_keys(&c.params, &AttentionInputs::new(&q, &k, &v), 3)?;
    assert_eq!(w.dims(), &[1, 2, 5, 3]);
    assert_eq!(idx.dtype(), DType::I64);
    // the reference probabilities: softmax with the causal mask, via the reference with V = I
    let group_heads = Tensor::eye(7, DType::F64, &Device::Cpu)?.reshape((1, 7, 1, 7))?;
    let mut ce = c.clone();
    ce.dv = 7;
    let p = reference_attention(&ce, &q, &k, &group_heads, None, None)?; // [1, Sq, Hq, Sk]
    let p = p
        .transpose(1, 2)?
        .contiguous()?
        .squeeze(0)?
        .to_vec3::<f64>()?; // [Hq, Sq, Sk]
    let (w, idx) = (
        w.squeeze(0)?.to_vec3::<f64>()?,
        idx.squeeze(0)?.to_vec3::<i64>()?,
    );
    for h in 0..2 {
        for i in 0..5 {
            let mut row: Vec<(f64, usize)> = p[h][i]
                .iter()
                .copied()
                .enumerate()
                .map(|(j, x)| (x, j))
                .collect();
            row.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for t in 0..3 {
                let (pw, pj) = row[t];
                if pw == 0.0 {
                    assert_eq!(idx[h][i][t], -1, "padding at h{h} i{i} t{t}");
                } else {
                    assert_eq!(idx[h][i][t], pj as i64, "h{h} i{i} t{t}");
                    assert!((w[h][i][t] - pw).abs() < 1e-12, "h{h} i{i} t{t}");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn attention_errors_name_the_tensor() -> R {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 4, 2, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((1, 4, 2, 8), DType::F64, &dev)?;
    let p = AttentionParams::new();
    let e = attention::forward(&p, &AttentionInputs::new(&q, &k, &q)).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    let k = Tensor::zeros((1, 4, 2, 7), DType::F32, &dev)?;
    let e = attention::forward(&p, &AttentionInputs::new(&q, &k, &k)).unwrap_err();
    assert!(e.to_string().contains('k'), "{e}");
    let i = Tensor::zeros((1, 4, 2, 8), DType::U32, &dev)?;
    let e = attention::forward(&p, &AttentionInputs::new(&i, &i, &i)).unwrap_err();
    assert!(e.to_string().contains("`q`"), "{e}");
    let bias = Tensor::zeros((1, 2, 4), DType::F32, &dev)?;
    let e =
        attention::forward(&p, &AttentionInputs::new(&q, &q, &q).bias(Some(&bias))).unwrap_err();
    assert!(e.to_string().contains("`bias`"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------- scans

/// h[t] = a[t]·h[t-1] + b[t] as a loop of candle ops (reverse: from T−1 down).
fn reference_scan(
    a: &Tensor,
    b: &Tensor,
    h0: &Tensor,
    reverse: bool,
) -> candle_core::Result<Tensor> {
    let t_len = a.dim(1)?;
    let mut h = h0.clone();
    let mut out = vec![None; t_len];
    let order: Vec<usize> = if reverse {
        (0..t_len).rev().collect()
    } else {
        (0..t_len).collect()
    };
    for t in order {
        h = ((a.i((.., t))? * &h)? + b.i((.., t))?)?;
        out[t] = Some(h.clone());
    }
    let out: Vec<Tensor> = out.into_iter().map(|x| x.unwrap()).collect();
    Tensor::stack(&out, 1)
}

/// The complex recurrence on [.., 2] tensors with real ops.
fn reference_complex_scan(a: &Tensor, b: &Tensor, h0: &Tensor) -> candle_core::Result<Tensor> {
    let t_len = a.dim(1)?;
    let (mut hr, mut hi) = (h0.i((.., .., 0))?, h0.i((.., .., 1))?);
    let mut out = vec![];
    for t in 0..t_len {
        let (ar, ai) = (a.i((.., t, .., 0))?, a.i((.., t, .., 1))?);
        let (br, bi) = (b.i((.., t, .., 0))?, b.i((.., t, .., 1))?);
        let nr = ((((&ar * &hr)? - (&ai * &hi)?)?) + br)?;
        let ni = ((((&ar * &hi)? + (&ai * &hr)?)?) + bi)?;
        (hr, hi) = (nr, ni);
        out.push(Tensor::stack(&[&hr, &hi], 2)?);
    }
    Tensor::stack(&out, 1)
}

#[test]
fn scan_linear_values_and_gradients() -> R {
    let mut rng = Rng::new(20);
    let (b, t, d) = (3, 17, 5);
    for reverse in [false, true] {
        let a = Var::from_tensor(&rand(&mut rng, &[b, t, d], -0.99, 0.99))?;
        let x = Var::from_tensor(&rand(&mut rng, &[b, t, d], -1.0, 1.0))?;
        let h0 = Var::from_tensor(&rand(&mut rng, &[b, d], -1.0, 1.0))?;
        let w = rand(&mut rng, &[b, t, d], -1.0, 1.0);
        let params = ScanParams::new().reverse(reverse);
        let h = scan::linear(&params, &a, &x, Some(h0.as_tensor()))?;
        let want = reference_scan(&a, &x, &h0, reverse)?;
        close("h", &h, &want, 1e-12, 1e-13);
        let ours = (h * &w)?.sum_all()?.backward()?;
        let theirs = (want * &w)?.sum_all()?.backward()?;
        for (name, var) in [("da", &a), ("db", &x), ("dh0", &h0)] {
            close(
                name,
                ours.get(var).unwrap(),
                theirs.get(var).unwrap(),
                1e-11,
                1e-12,
            );
        }
    }
    // without h0, and in f32 / bf16
    let a = rand(&mut rng, &[2, 9, 4], 0.0, 0.95);
    let x = rand(&mut rng, &[2, 9, 4], -1.0, 1.0);
    let want = reference_scan(
        &a,
        &x,
        &Tensor::zeros((2, 4), DType::F64, &Device::Cpu)?,
        false,
    )?;
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let h = scan::linear(
            &ScanParams::new(),
            &a.to_dtype(dtype)?,
            &x.to_dtype(dtype)?,
            None,
        )?;
        assert_eq!(h.dtype(), dtype);
        close(&format!("h {dtype:?}"), &h, &want, tol, tol);
    }
    Ok(())
}

#[test]
fn scan_linear_complex_values_and_gradients() -> R {
    let mut rng = Rng::new(21);
    let (b, t, d) = (2, 11, 3);
    let a = Var::from_tensor(&rand(&mut rng, &[b, t, d, 2], -0.7, 0.7))?;
    let x = Var::from_tensor(&rand(&mut rng, &[b, t, d, 2], -1.0, 1.0))?;
    let h0 = Var::from_tensor(&rand(&mut rng, &[b, d, 2], -1.0, 1.0))?;
    let w = rand(&mut rng, &[b, t, d, 2], -1.0, 1.0);
    let h = scan::linear_complex(&ScanParams::new(), &a, &x, Some(h0.as_tensor()))?;
    let want = reference_complex_scan(&a, &x, &h0)?;
    close("h", &h, &want, 1e-12, 1e-13);
    let ours = (h * &w)?.sum_all()?.backward()?;
    let theirs = (want * &w)?.sum_all()?.backward()?;
    for (name, var) in [("da", &a), ("db", &x), ("dh0", &h0)] {
        close(
            name,
            ours.get(var).unwrap(),
            theirs.get(var).unwrap(),
            1e-11,
            1e-12,
        );
    }
    let e = scan::linear_complex(&ScanParams::new(), &a.i((.., .., .., 0))?, &x, None).unwrap_err();
    assert!(e.to_string().contains("a"), "{e}");
    Ok(())
}

/// GLA as a loop of candle ops: S[t] = diag(exp(g[t]))·S[t−1] + k[t]ᵀv[t], o[t] = scale·q[t]·S[t].
fn reference_gla(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let t_len = q.dim(1)?;
    let mut s = h0.clone(); // [B, H, K, V]
    let mut out = vec![];
    for t in 0..t_len {
        let (qt, kt, vt, gt) = (q.i((.., t))?, k.i((.., t))?, v.i((.., t))?, g.i((.., t))?);
        let outer = kt.unsqueeze(3)?.broadcast_mul(&vt.unsqueeze(2)?)?;
        s = (gt.exp()?.unsqueeze(3)?.broadcast_mul(&s)? + outer)?;
        out.push((qt.contiguous()?.unsqueeze(2)?.matmul(&s)?.squeeze(2)? * scale)?);
    }
    Tensor::stack(&out, 1)
}

#[test]
fn scan_gla_values_and_gradients() -> R {
    let mut rng = Rng::new(22);
    let (b, t, h, kd, vd) = (2, 37, 2, 4, 3); // T over two 16-step chunks and a tail
    let q = Var::from_tensor(&rand(&mut rng, &[b, t, h, kd], -1.0, 1.0))?;
    let k = Var::from_tensor(&rand(&mut rng, &[b, t, h, kd], -1.0, 1.0))?;
    let v = Var::from_tensor(&rand(&mut rng, &[b, t, h, vd], -1.0, 1.0))?;
    let g = Var::from_tensor(&rand(&mut rng, &[b, t, h, kd], -0.5, 0.0))?;
    let h0 = Var::from_tensor(&rand(&mut rng, &[b, h, kd, vd], -1.0, 1.0))?;
    let w = rand(&mut rng, &[b, t, h, vd], -1.0, 1.0);
    let params = scan::GlaParams::new();
    let o = scan::gla(&params, &q, &k, &v, &g, Some(h0.as_tensor()))?;
    let want = reference_gla(&q, &k, &v, &g, &h0, 0.5)?;
    close("o", &o, &want, 1e-10, 1e-12);
    let ours = (o * &w)?.sum_all()?.backward()?;
    let theirs = (want * &w)?.sum_all()?.backward()?;
    for (name, var) in [("dq", &q), ("dk", &k), ("dv", &v), ("dg", &g), ("dh0", &h0)] {
        close(
            name,
            ours.get(var).unwrap(),
            theirs.get(var).unwrap(),
            1e-9,
            1e-11,
        );
    }
    // f32 without h0
    let zeros = Tensor::zeros((b, h, kd, vd), DType::F64, &Device::Cpu)?;
    let want = reference_gla(&q, &k, &v, &g, &zeros, 0.5)?;
    let f = |t: &Var| t.to_dtype(DType::F32).unwrap();
    let o = scan::gla(&params, &f(&q), &f(&k), &f(&v), &f(&g), None)?;
    close("o f32", &o, &want, 1e-4, 1e-5);
    let e = scan::gla(&params, &q, &k, &v, &f(&g), None).unwrap_err();
    assert!(e.to_string().contains("`g`"), "{e}");
    Ok(())
}

/// Mamba's selective scan as a loop of candle ops (CASES.md's math).
#[allow(clippy::too_many_arguments)]
fn reference_selective(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    bm: &Tensor,
    cm: &Tensor,
    dskip: &Tensor,
    z: &Tensor,
    delta_bias: &Tensor,
    h0: &Tensor,
) -> candle_core::Result<Tensor> {
    let dt = delta.broadcast_add(delta_bias)?;
    let dt = (dt.exp()? + 1.0)?.log()?; // softplus
    let mut h = h0.clone(); // [B, D, N]
    let mut out = vec![];
    for t in 0..u.dim(1)? {
        let (dtt, ut) = (dt.i((.., t))?.unsqueeze(2)?, u.i((.., t))?); // [B, D, 1], [B, D]
        let decay = dtt.broadcast_mul(&a.unsqueeze(0)?)?.exp()?;
        let input = dtt
            .broadcast_mul(&bm.i((.., t))?.unsqueeze(1)?)?
            .broadcast_mul(&ut.unsqueeze(2)?)?;
        h = ((decay * &h)? + input)?;
        let y = h.broadcast_mul(&cm.i((.., t))?.unsqueeze(1)?)?.sum(2)?;
        let y = (y + ut.broadcast_mul(&dskip.unsqueeze(0)?)?)?;
        let zt = z.i((.., t))?;
        let silu = (&zt / ((zt.neg()?.exp()? + 1.0)?))?;
        out.push((y * silu)?);
    }
    Tensor::stack(&out, 1)
}

#[test]
fn scan_selective_values_and_gradients() -> R {
    let mut rng = Rng::new(23);
    let (b, t, d, n) = (2, 13, 5, 4);
    let var = |rng: &mut Rng, dims: &[usize], lo: f64, hi: f64| {
        Var::from_tensor(&rand(rng, dims, lo, hi))
    };
    let u = var(&mut rng, &[b, t, d], -1.0, 1.0)?;
    let delta = var(&mut rng, &[b, t, d], -1.0, 1.0)?;
    let a = var(&mut rng, &[d, n], -1.5, -0.1)?;
    let bm = var(&mut rng, &[b, t, n], -1.0, 1.0)?;
    let cm = var(&mut rng, &[b, t, n], -1.0, 1.0)?;
    let dskip = var(&mut rng, &[d], -1.0, 1.0)?;
    let z = var(&mut rng, &[b, t, d], -1.0, 1.0)?;
    let delta_bias = var(&mut rng, &[d], -0.5, 0.5)?;
    let h0 = var(&mut rng, &[b, d, n], -1.0, 1.0)?;
    let w = rand(&mut rng, &[b, t, d], -1.0, 1.0);
    let mut args = scan::SelectiveArgs::new(&u, &delta, &a, &bm, &cm);
    args.dskip = Some(dskip.as_tensor());
    args.z = Some(z.as_tensor());
    args.delta_bias = Some(delta_bias.as_tensor());
    args.h0 = Some(h0.as_tensor());
    let params = scan::SelectiveParams::new().delta_softplus(true);
    let y = scan::selective(&params, &args)?;
    let want = reference_selective(&u, &delta, &a, &bm, &cm, &dskip, &z, &delta_bias, &h0)?;
    close("y", &y, &want, 1e-10, 1e-12);
    let ours = (y * &w)?.sum_all()?.backward()?;
    let theirs = (want * &w)?.sum_all()?.backward()?;
    for (name, v) in [
        ("du", &u),
        ("ddelta", &delta),
        ("da", &a),
        ("dbm", &bm),
        ("dcm", &cm),
        ("ddskip", &dskip),
        ("dz", &z),
        ("ddelta_bias", &delta_bias),
        ("dh0", &h0),
    ] {
        close(
            name,
            ours.get(v).unwrap(),
            theirs.get(v).unwrap(),
            1e-9,
            1e-11,
        );
    }
    // bf16 sequences with f32 parameters, only the required inputs
    let f = |t: &Var, dt: DType| t.to_dtype(dt).unwrap();
    let (ub, db, bb, cb) = (
        f(&u, DType::BF16),
        f(&delta, DType::BF16),
        f(&bm, DType::BF16),
        f(&cm, DType::BF16),
    );
    let af = f(&a, DType::F32);
    let y = scan::selective(&params, &scan::SelectiveArgs::new(&ub, &db, &af, &bb, &cb))?;
    assert_eq!(y.dtype(), DType::BF16);
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F64, &Device::Cpu).unwrap();
    let big = Tensor::full(30.0f64, (b, t, d), &Device::Cpu)?; // silu(30) = 30·(1 − 1e-13)
    let want = (reference_selective(
        &u,
        &delta,
        &a,
        &bm,
        &cm,
        &zeros(&[d]),
        &big,
        &zeros(&[d]),
        &zeros(&[b, d, n]),
    )? / 30.0)?;
    close("y bf16", &y, &want, 3e-2, 3e-2);
    // a parameter in the sequences' dtype instead of the accumulator's is named
    let e = scan::selective(
        &params,
        &scan::SelectiveArgs::new(&ub, &db, &f(&a, DType::BF16), &bb, &cb),
    )
    .unwrap_err();
    assert!(e.to_string().contains("`a`"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------- SAE

/// The top-k SAE with candle's ops: pre = relu((x)·W_encᵀ + b_enc); the k largest (candle's
/// arg_sort, ties to the lower latent as the crate's selection); values by gather; decode as
/// a dense matmul of the scattered code.
fn reference_sae(
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    w_dec: &Tensor,
    k: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let pre = x.matmul(&w_enc.t()?)?.broadcast_add(b_enc)?.relu()?;
    let order = pre
        .detach()
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let values = pre.gather(&order, 1)?;
    // dense code: values scattered to their latents (differentiable: a matmul with one-hots)
    let l = w_enc.dim(0)?;
    let eye = Tensor::eye(l, x.dtype(), x.device())?;
    let onehot = eye
        .index_select(&order.flatten_all()?, 0)?
        .reshape((x.dim(0)?, k, l))?;
    let code = values.unsqueeze(1)?.matmul(&onehot)?.squeeze(1)?; // [B, L]
    let x_hat = code.matmul(w_dec)?;
    Ok((values, order, x_hat))
}

#[test]
fn sae_encode_decode_values_and_gradients() -> R {
    let mut rng = Rng::new(24);
    let (b, dm, l, k) = (6, 10, 24, 5);
    let x = Var::from_tensor(&rand(&mut rng, &[b, dm], -1.0, 1.0))?;
    let w_enc = Var::from_tensor(&rand(&mut rng, &[l, dm], -0.5, 0.5))?;
    let b_enc = Var::from_tensor(&rand(&mut rng, &[l], -0.3, 0.1))?;
    let w_dec = Var::from_tensor(&rand(&mut rng, &[l, dm], -0.5, 0.5))?;
    let b_dec = Var::from_tensor(&rand(&mut rng, &[dm], -0.2, 0.2))?;
    let target = rand(&mut rng, &[b, dm], -1.0, 1.0);

    let xc = x.broadcast_sub(&b_dec)?;
    let (values, indices) = neurokernels::candle::topk::encode(&xc, &w_enc, &b_enc, k)?;
    let x_hat =
        neurokernels::candle::topk::decode(&values, &indices, &w_dec)?.broadcast_add(&b_dec)?;
    let (want_v, want_i, want_xhat) = reference_sae(&xc, &w_enc, &b_enc, &w_dec, k)?;
    let want_xhat = want_xhat.broadcast_add(&b_dec)?;
    close("values", &values, &want_v, 1e-12, 1e-13);
    // indices agree where the value is positive (zeros may sit at any non-positive latent)
    let (vi, wi, vv) = (
        indices.to_vec2::<u32>()?,
        want_i.to_vec2::<u32>()?,
        values.to_vec2::<f64>()?,
    );
    let mut positive = 0;
    for r in 0..b {
        for j in 0..k {
            if vv[r][j] > 0.0 {
                assert_eq!(vi[r][j], wi[r][j], "row {r} slot {j}");
                positive += 1;
            }
        }
    }
    assert!(
        positive > b * k / 2,
        "the test should select mostly positive latents ({positive})"
    );
    close("x_hat", &x_hat, &want_xhat, 1e-12, 1e-13);

    let ours = (x_hat - &target)?.sqr()?.sum_all()?.backward()?;
    let theirs = (want_xhat - &target)?.sqr()?.sum_all()?.backward()?;
    for (name, v) in [
        ("dx", &x),
        ("dw_enc", &w_enc),
        ("db_enc", &b_enc),
        ("dw_dec", &w_dec),
        ("db_dec", &b_dec),
    ] {
        close(
            name,
            ours.get(v).unwrap(),
            theirs.get(v).unwrap(),
            1e-10,
            1e-12,
        );
    }

    // f32 and bf16 forward against f64
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
        let (v, _) = neurokernels::candle::topk::encode(
            &xc.to_dtype(dtype)?,
            &w_enc.to_dtype(dtype)?,
            &b_enc.to_dtype(dtype)?,
            k,
        )?;
        assert_eq!(v.dtype(), dtype);
        close(&format!("values {dtype:?}"), &v, &want_v, tol, tol);
    }
    let e = neurokernels::candle::topk::encode(&xc, &w_enc.t()?, &b_enc, k).unwrap_err();
    assert!(e.to_string().contains("w_enc"), "{e}");
    let bad = Tensor::new(&[[0u32, 1, 2, 3, 99]], &Device::Cpu)?;
    let e = neurokernels::candle::topk::decode(&values.narrow(0, 0, 1)?, &bad, &w_dec).unwrap_err();
    assert!(e.to_string().contains("`indices`"), "{e}");
    Ok(())
}

// ---------------------------------------------------------------- ridge

#[test]
fn ridge_on_tensors() -> R {
    use neurokernels::candle::ridge;
    let mut rng = Rng::new(25);
    let dev = Device::Cpu;
    // solve_batched: the normal equations Xᵀ(Xw − y) + αw = 0 hold, with candle's matmul
    let (g, n, p, t) = (3, 12, 4, 2);
    let x = rand(&mut rng, &[g, n, p], -1.0, 1.0);
    let y = rand(&mut rng, &[g, n, t], -1.0, 1.0);
    let alpha = Tensor::new(&[0.1f64, 1.0, 10.0], &dev)?;
    let w = ridge::solve_batched(&x, &y, &alpha)?;
    assert_eq!(w.dims(), &[g, p, t]);
    let resid = (x.matmul(&w)? - &y)?;
    let normal =
        (x.transpose(1, 2)?.matmul(&resid)? + w.broadcast_mul(&alpha.reshape((g, 1, 1))?)?)?;
    let zero = normal.zeros_like()?;
    close("normal equations", &normal, &zero, 0.0, 1e-12);
    let w32 = ridge::solve_batched(
        &x.to_dtype(DType::F32)?,
        &y.to_dtype(DType::F32)?,
        &alpha.to_dtype(DType::F32)?,
    )?;
    close("w f32", &w32, &w, 1e-4, 1e-5);

    // cv: bit-identical to the slice API
    let (n, p, t) = (30, 3, 4);
    let x = rand(&mut rng, &[n, p], -1.0, 1.0);
    let y = (x.matmul(&rand(&mut rng, &[p, t], -1.0, 1.0))? + rand(&mut rng, &[n, t], -0.3, 0.3))?;
    let alphas = Tensor::new(&[0.01f64, 1.0, 100.0], &dev)?;
    let folds: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let folds_t = Tensor::new(folds.as_slice(), &dev)?;
    let params = ridge::CvParams::new();
    let fit = ridge::cv(&params, &x, &y, &alphas, &folds_t)?;
    let flat_x = x.flatten_all()?.to_vec1::<f64>()?;
    let flat_y = y.flatten_all()?.to_vec1::<f64>()?;
    let folds32: Vec<i32> = folds.iter().map(|&f| f as i32).collect();
    let want = neurokernels::ridge::cv(
        &params,
        neurokernels::ridge::RidgeShape::new(n, p, t),
        &neurokernels::ridge::CvInputs {
            x: &flat_x,
            y: &flat_y,
            alphas: &[0.01, 1.0, 100.0],
            folds: &folds32,
        },
        None,
    )
    .unwrap();
    assert_eq!(fit.w.dims(), &[p, t]);
    assert_eq!(fit.w.flatten_all()?.to_vec1::<f64>()?, want.w);
    assert_eq!(fit.best_alpha.to_vec1::<f64>()?, want.best_alpha);
    assert_eq!(fit.cv_scores.dims(), &[3, t]);

    // predict and score against candle's formulas
    let y_hat = ridge::predict(&x, &fit.w, Some(&fit.intercept))?;
    close(
        "predict",
        &y_hat,
        &x.matmul(&fit.w)?.broadcast_add(&fit.intercept)?,
        1e-12,
        1e-12,
    );
    let (r2, pearson) = ridge::score(&y, &y_hat)?;
    let yc = y.broadcast_sub(&y.mean_keepdim(0)?)?;
    let pc = y_hat.broadcast_sub(&y_hat.mean_keepdim(0)?)?;
    let want_r2 = (1.0 - ((&y - &y_hat)?.sqr()?.sum(0)? / yc.sqr()?.sum(0)?)?)?;
    let want_p = ((&yc * &pc)?.sum(0)? / (yc.sqr()?.sum(0)? * pc.sqr()?.sum(0)?)?.sqrt()?)?;
    close("r2", &r2, &want_r2, 1e-12, 1e-12);
    close("pearson", &pearson, &want_p, 1e-12, 1e-12);
    let e = ridge::score(&y, &y_hat.to_dtype(DType::F32)?).unwrap_err();
    assert!(e.to_string().contains("`y_pred`"), "{e}");
    Ok(())
}

#[test]
fn banded_ridge_on_tensors() -> R {
    use neurokernels::candle::ridge;
    let mut rng = Rng::new(26);
    let dev = Device::Cpu;
    let (n, p, t, spaces) = (36, 6, 3, 2);
    let x = rand(&mut rng, &[n, p], -1.0, 1.0);
    let y = rand(&mut rng, &[n, t], -1.0, 1.0);
    let groups: Vec<i64> = vec![0, 1, 0, 1, 1, 0];
    let gammas_v = [0.5f64, 0.5, 0.9, 0.1, 0.2, 0.8];
    let gammas = Tensor::from_vec(gammas_v.to_vec(), (3, spaces), &dev)?;
    let alphas = Tensor::new(&[0.1f64, 1.0, 10.0], &dev)?;
    let folds: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    let (groups_t, folds_t) = (
        Tensor::new(groups.as_slice(), &dev)?,
        Tensor::new(folds.as_slice(), &dev)?,
    );
    let params = ridge::CvParams::new();
    let fit = ridge::banded_cv(&params, &x, &groups_t, &y, &alphas, &gammas, &folds_t)?;
    // bit-identical to the slice API
    let (fx, fy) = (
        x.flatten_all()?.to_vec1::<f64>()?,
        y.flatten_all()?.to_vec1::<f64>()?,
    );
    let groups32: Vec<i32> = groups.iter().map(|&g| g as i32).collect();
    let folds32: Vec<i32> = folds.iter().map(|&f| f as i32).collect();
    let shape = neurokernels::ridge::BandedShape::new(n, p, t, spaces);
    let want = neurokernels::ridge::banded_cv(
        &params,
        shape,
        &neurokernels::ridge::BandedInputs {
            x: &fx,
            groups: &groups32,
            y: &fy,
            alphas: &[0.1, 1.0, 10.0],
            gammas: &gammas_v,
            folds: &folds32,
        },
        None,
    )
    .unwrap();
    assert_eq!(fit.cv_scores.dims(), &[3, t]);
    assert_eq!(
        fit.cv_scores.flatten_all()?.to_vec1::<f64>()?,
        want.cv_scores
    );
    assert_eq!(fit.deltas.flatten_all()?.to_vec1::<f64>()?, want.deltas);
    assert_eq!(fit.w.flatten_all()?.to_vec1::<f64>()?, want.w);
    assert_eq!(fit.intercept.to_vec1::<f64>()?, want.intercept);
    let best: Vec<usize> = fit
        .best_candidate
        .to_vec1::<u32>()?
        .iter()
        .map(|b| *b as usize)
        .collect();
    assert_eq!(best, want.best_candidate);

    let (r2, pearson) = ridge::split_scores(&x, &groups_t, spaces, &fit.w, &y)?;
    let want_s = neurokernels::ridge::split_scores(shape, &fx, &groups32, &want.w, &fy).unwrap();
    assert_eq!(r2.dims(), &[spaces, t]);
    assert_eq!(r2.flatten_all()?.to_vec1::<f64>()?, want_s.r2);
    assert_eq!(pearson.flatten_all()?.to_vec1::<f64>()?, want_s.pearson);
    // the shares add up to the score of the whole prediction (himalaya's definition), here
    // checked with candle's own ops: Σ_s r2[s] = R² of x·w shifted to y's mean
    let pred = x.matmul(&fit.w)?;
    let yc = y.broadcast_sub(&y.mean_keepdim(0)?)?;
    let pc = pred.broadcast_sub(&pred.mean_keepdim(0)?)?;
    let want_r2 = (1.0 - ((&yc - &pc)?.sqr()?.sum(0)? / yc.sqr()?.sum(0)?)?)?;
    close("Σ split r2", &r2.sum(0)?, &want_r2, 1e-12, 1e-12);

    let e = ridge::banded_cv(
        &params,
        &x,
        &groups_t,
        &y,
        &alphas,
        &gammas.to_dtype(DType::F32)?,
        &folds_t,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`gammas`"), "{e}");
    let e = ridge::split_scores(&x, &gammas, spaces, &fit.w, &y).unwrap_err();
    assert!(e.to_string().contains("`groups`"), "{e}");
    Ok(())
}

#[test]
fn topk_forward_only_ops_on_tensors() -> R {
    use neurokernels::candle::topk;
    use neurokernels::topk::{self as flat, Metric, RowsParams, SaeShape};
    let mut rng = Rng::new(27);
    let (b, dm, l, k) = (5, 8, 24, 3);
    let x = rand(&mut rng, &[b, dm], -1.0, 1.0);
    let w = rand(&mut rng, &[l, dm], -0.5, 0.5);
    let bias = rand(&mut rng, &[l], -0.1, 0.1);
    let fx = x.flatten_all()?.to_vec1::<f64>()?;
    let fw = w.flatten_all()?.to_vec1::<f64>()?;
    let fb = bias.to_vec1::<f64>()?;
    let shape = SaeShape::new(b, dm, l);

    // topk.rows and codebook.nearest (dot): the values are the k largest, found at the indices
    let scores = x.matmul(&w.t()?)?; // [B, L]
    let sorted = scores.sort_last_dim(false)?.0.narrow(1, 0, k)?;
    let (v, i) = topk::rows(&RowsParams::new(), &scores, k)?;
    close("rows values", &v, &sorted, 0.0, 0.0);
    close(
        "rows at indices",
        &scores.gather(&i.contiguous()?, 1)?,
        &v,
        0.0,
        0.0,
    );
    let (v, i) = topk::nearest(Metric::Dot, &x, &w, k)?;
    close("nearest values", &v, &sorted, 1e-12, 1e-12);
    close(
        "nearest at indices",
        &scores.gather(&i.contiguous()?, 1)?,
        &v,
        1e-12,
        1e-12,
    );

    // the other encoders: bit-identical to the slice API
    let inputs = flat::EncoderInputs {
        x: &fx,
        w_enc: &fw,
        b_enc: &fb,
        b_dec: None,
    };
    let csr = topk::encode_batch_topk(&x, &w, &bias, None, k)?;
    let want = flat::encode_batch_topk(shape, k, &inputs).unwrap();
    let u32s = |v: &[i32]| v.iter().map(|i| *i as u32).collect::<Vec<_>>();
    assert_eq!(csr.indptr.to_vec1::<u32>()?, u32s(&want.indptr));
    assert_eq!(csr.indices.to_vec1::<u32>()?, u32s(&want.indices));
    assert_eq!(csr.values.to_vec1::<f64>()?, want.values);
    let threshold = Tensor::from_vec(vec![0.05f64; l], l, &Device::Cpu)?;
    let csr = topk::encode_jumprelu(&x, &w, &bias, None, &threshold)?;
    let want = flat::encode_jumprelu(shape, &inputs, &[0.05; 24]).unwrap();
    assert_eq!(csr.indices.to_vec1::<u32>()?, u32s(&want.indices));
    assert_eq!(csr.values.to_vec1::<f64>()?, want.values);
    assert!(want.values.iter().all(|v| *v > 0.05));
    let mp = topk::encode_mp(&x, &w, None, k)?;
    let want = flat::encode_mp(shape, k, &fx, &fw, None).unwrap();
    assert_eq!(
        mp.indices.flatten_all()?.to_vec1::<u32>()?,
        u32s(&want.indices)
    );
    assert_eq!(mp.values.flatten_all()?.to_vec1::<f64>()?, want.values);
    assert_eq!(mp.residual.dims(), &[b, dm]);

    let e = topk::nearest(Metric::L2, &x, &w.to_dtype(DType::F32)?, k).unwrap_err();
    assert!(e.to_string().contains("`codebook`"), "{e}");
    let e = topk::encode_jumprelu(&x, &w, &bias, None, &threshold.narrow(0, 0, 3)?).unwrap_err();
    assert!(e.to_string().contains("threshold"), "{e}");
    Ok(())
}

/// A sequence run in two segments, the first's final state as the second's h0, equals the
/// sequence run at once (gla and selective, f64).
#[test]
fn scans_carry_their_state_across_segments() -> R {
    let mut rng = Rng::new(28);
    // gla: T = 37 cut at 21 (chunk boundaries anywhere)
    let (b, t, h, kd, vd, cut) = (2, 37, 2, 4, 3, 21);
    let q = rand(&mut rng, &[b, t, h, kd], -1.0, 1.0);
    let k = rand(&mut rng, &[b, t, h, kd], -1.0, 1.0);
    let v = rand(&mut rng, &[b, t, h, vd], -1.0, 1.0);
    let g = rand(&mut rng, &[b, t, h, kd], -0.5, 0.0);
    let params = scan::GlaParams::new();
    let (whole, h_end) = scan::gla_with_state(&params, &q, &k, &v, &g, None)?;
    assert_eq!(h_end.dims(), &[b, h, kd, vd]);
    let part = |x: &Tensor, from: usize, len: usize| x.narrow(1, from, len).unwrap();
    let (o1, h_mid) = scan::gla_with_state(
        &params,
        &part(&q, 0, cut),
        &part(&k, 0, cut),
        &part(&v, 0, cut),
        &part(&g, 0, cut),
        None,
    )?;
    let rest = t - cut;
    let (o2, h_last) = scan::gla_with_state(
        &params,
        &part(&q, cut, rest),
        &part(&k, cut, rest),
        &part(&v, cut, rest),
        &part(&g, cut, rest),
        Some(&h_mid),
    )?;
    close(
        "gla o in two segments",
        &Tensor::cat(&[&o1, &o2], 1)?,
        &whole,
        1e-12,
        1e-12,
    );
    close("gla h_last in two segments", &h_last, &h_end, 1e-12, 1e-12);

    // selective: T = 13 cut at 6, with every optional input
    let (b, t, d, n, cut) = (2, 13, 5, 4, 6);
    let u = rand(&mut rng, &[b, t, d], -1.0, 1.0);
    let delta = rand(&mut rng, &[b, t, d], -1.0, 1.0);
    let a = rand(&mut rng, &[d, n], -1.5, -0.1);
    let bm = rand(&mut rng, &[b, t, n], -1.0, 1.0);
    let cm = rand(&mut rng, &[b, t, n], -1.0, 1.0);
    let z = rand(&mut rng, &[b, t, d], -1.0, 1.0);
    let dskip = rand(&mut rng, &[d], -1.0, 1.0);
    let params = scan::SelectiveParams::new().delta_softplus(true);
    let run = |from: usize, len: usize, h0: Option<&Tensor>| {
        let (u, delta, bm, cm, z) = (
            part(&u, from, len),
            part(&delta, from, len),
            part(&bm, from, len),
            part(&cm, from, len),
            part(&z, from, len),
        );
        let mut args = scan::SelectiveArgs::new(&u, &delta, &a, &bm, &cm);
        args.z = Some(&z);
        args.dskip = Some(&dskip);
        args.h0 = h0;
        scan::selective_with_state(&params, &args)
    };
    let (whole, h_end) = run(0, t, None)?;
    assert_eq!(h_end.dims(), &[b, d, n]);
    let (y1, h_mid) = run(0, cut, None)?;
    let (y2, h_last) = run(cut, t - cut, Some(&h_mid))?;
    close(
        "selective y in two segments",
        &Tensor::cat(&[&y1, &y2], 1)?,
        &whole,
        1e-12,
        1e-12,
    );
    close(
        "selective h_last in two segments",
        &h_last,
        &h_end,
        1e-12,
        1e-12,
    );
    Ok(())
}

/// Generation on a KV cache: a 5-token causal prefill then one token at a time gives the
/// rows of one causal forward over the whole sequence (GQA, f64); a mismatched step is an
/// error naming the tensor and leaves the cache as it was.
#[test]
fn attention_decode_on_a_kv_cache_matches_the_full_forward() -> R {
    let mut rng = Rng::new(29);
    let (b, s, hq, hk, d) = (2, 11, 4, 2, 8);
    let q = rand(&mut rng, &[b, s, hq, d], -1.0, 1.0);
    let k = rand(&mut rng, &[b, s, hk, d], -1.0, 1.0);
    let v = rand(&mut rng, &[b, s, hk, d], -1.0, 1.0);
    let params = AttentionParams::new().causal(true);
    let whole = attention::forward(&params, &AttentionInputs::new(&q, &k, &v))?;
    let mut cache = attention::KvCache::new();
    assert!(cache.is_empty());
    let rows = |t: &Tensor, from: usize, len: usize| t.narrow(1, from, len).unwrap();
    let mut outs = vec![attention::decode(
        &params,
        &rows(&q, 0, 5),
        &rows(&k, 0, 5),
        &rows(&v, 0, 5),
        &mut cache,
    )?];
    for i in 5..s {
        outs.push(attention::decode(
            &params,
            &rows(&q, i, 1),
            &rows(&k, i, 1),
            &rows(&v, i, 1),
            &mut cache,
        )?);
    }
    assert_eq!(cache.len(), s);
    let outs: Vec<&Tensor> = outs.iter().collect();
    close(
        "decoded rows",
        &Tensor::cat(&outs, 1)?,
        &whole,
        1e-12,
        1e-12,
    );

    let e = attention::decode(
        &params,
        &rows(&q, 0, 1),
        &rows(&k, 0, 1).to_dtype(DType::F32)?,
        &rows(&v, 0, 1),
        &mut cache,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`k_new`"), "{e}");
    let wrong_heads = rand(&mut rng, &[b, 1, hq, d], -1.0, 1.0);
    let e = cache.append(&wrong_heads, &wrong_heads).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    assert_eq!(cache.len(), s);
    cache.reset();
    assert!(cache.is_empty() && cache.k().is_none());
    Ok(())
}
