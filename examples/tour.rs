//! The tour: runs every implemented kernel family on built-in data, on the CPU and on CUDA
//! when a device is present, checks each result against a naive float64 reference, and
//! prints a table of throughput and error.
//!
//!     cargo run --release --example tour            (add --features cuda for the GPU rows)

use half::bf16;
use neurokernels::cpu::Isa;
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::{Element, Result};
use std::time::Instant;

struct Row {
    op: &'static str,
    device: String,
    dtype: &'static str,
    shape: String,
    ms: f64,
    gbps: f64,
    max_err: f64,
}

/// Deterministic data in [lo, hi).
fn data<E: Element>(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            E::from_f64(lo + (hi - lo) * u)
        })
        .collect()
}

/// Median wall time of `runs` calls, in milliseconds (after one warm-up call).
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

/// max |got - want| / max(1, |want|): relative for large values, absolute near zero.
fn max_error<E: Element>(got: &[E], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn reference_forward(shape: ScanShape, a: &[f64], b: &[f64]) -> Vec<f64> {
    let (t_len, d) = (shape.len, shape.channels);
    let mut h = vec![0.0; a.len()];
    for bi in 0..shape.batch {
        let mut state = vec![0.0; d];
        for t in 0..t_len {
            let row = (bi * t_len + t) * d;
            for c in 0..d {
                state[c] = a[row + c] * state[c] + b[row + c];
                h[row + c] = state[c];
            }
        }
    }
    h
}

/// db of the backward (the gradient wrt b): g[t] = dh[t] + a[t+1] g[t+1].
fn reference_db(shape: ScanShape, a: &[f64], dh: &[f64]) -> Vec<f64> {
    let (t_len, d) = (shape.len, shape.channels);
    let mut db = vec![0.0; a.len()];
    for bi in 0..shape.batch {
        let mut gated = vec![0.0; d];
        for t in (0..t_len).rev() {
            let row = (bi * t_len + t) * d;
            for c in 0..d {
                let g = dh[row + c] + gated[c];
                db[row + c] = g;
                gated[c] = a[row + c] * g;
            }
        }
    }
    db
}

/// The complex scan: gates of modulus < 1 with random phases, checked against a float64 loop.
fn complex_rows(rows: &mut Vec<Row>, shape: ScanShape) -> Result<()> {
    let n = 2 * shape.numel("a")?;
    let mut a: Vec<f32> = data(n, 7, -1.0, 1.0);
    for pair in a.chunks_mut(2) {
        let norm = (pair[0] * pair[0] + pair[1] * pair[1]).sqrt().max(1e-3);
        let modulus = 0.5 + 0.5 * (pair[0].abs() % 1.0);
        pair[0] *= modulus / norm;
        pair[1] *= modulus / norm;
    }
    let b: Vec<f32> = data(n, 8, -1.0, 1.0);
    let (af, bf) = (to_f64(&a), to_f64(&b));
    let (t_len, d) = (shape.len, shape.channels);
    let mut want = vec![0.0; n];
    for bi in 0..shape.batch {
        for c in 0..d {
            let (mut re, mut im) = (0.0, 0.0);
            for t in 0..t_len {
                let k = 2 * ((bi * t_len + t) * d + c);
                (re, im) = (
                    af[k] * re - af[k + 1] * im + bf[k],
                    af[k] * im + af[k + 1] * re + bf[k + 1],
                );
                (want[k], want[k + 1]) = (re, im);
            }
        }
    }
    let mut h = vec![0f32; n];
    let ms = median_ms(5, || {
        scan::linear_complex(&ScanParams::new(), shape, &a, &b, None, &mut h)
    })?;
    rows.push(Row {
        op: "scan.linear_complex",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("{shape} x2"),
        ms,
        gbps: 3.0 * (n * 4) as f64 / ms / 1e6,
        max_err: max_error(&h, &want),
    });
    Ok(())
}

fn to_f64<E: Element>(x: &[E]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn scan_rows<E: Element + MaybeCuda>(
    rows: &mut Vec<Row>,
    shape: ScanShape,
    cuda: &CudaHandle,
) -> Result<()> {
    let n = shape.numel("a")?;
    let (a, b, dh): (Vec<E>, Vec<E>, Vec<E>) = (
        data(n, 1, 0.5, 1.0),
        data(n, 2, -1.0, 1.0),
        data(n, 3, -1.0, 1.0),
    );
    let (af, bf, dhf) = (to_f64(&a), to_f64(&b), to_f64(&dh));
    let want_h = reference_forward(shape, &af, &bf);
    let want_db = reference_db(shape, &af, &dhf);
    let p = ScanParams::new();
    let bytes = (n * std::mem::size_of::<E>()) as f64;
    let dtype = E::DTYPE.name();

    let mut h = vec![E::default(); n];
    let ms = median_ms(5, || scan::linear(&p, shape, &a, &b, None, &mut h))?;
    let device = format!("cpu ({})", Isa::active().name());
    rows.push(Row {
        op: "scan.linear",
        device: device.clone(),
        dtype,
        shape: shape.to_string(),
        ms,
        gbps: 3.0 * bytes / ms / 1e6,
        max_err: max_error(&h, &want_h),
    });
    let (mut da, mut db, mut dh0) = (
        vec![E::default(); n],
        vec![E::default(); n],
        vec![E::default(); shape.state_numel("dh0")?],
    );
    let ms = median_ms(5, || {
        scan::linear_backward(&p, shape, &a, &h, &dh, None, &mut da, &mut db, &mut dh0)
    })?;
    rows.push(Row {
        op: "scan.linear_backward",
        device,
        dtype,
        shape: shape.to_string(),
        ms,
        gbps: 5.0 * bytes / ms / 1e6,
        max_err: max_error(&db, &want_db),
    });
    E::cuda_rows(rows, cuda, shape, &a, &b, &dh, &want_h, &want_db)
}

#[cfg(feature = "cuda")]
type CudaHandle = Option<neurokernels::cuda::Device>;
#[cfg(not(feature = "cuda"))]
type CudaHandle = Option<()>;

/// The GPU rows, where the build and the machine have CUDA.
trait MaybeCuda: Element {
    #[allow(clippy::too_many_arguments)]
    fn cuda_rows(
        rows: &mut Vec<Row>,
        cuda: &CudaHandle,
        shape: ScanShape,
        a: &[Self],
        b: &[Self],
        dh: &[Self],
        want_h: &[f64],
        want_db: &[f64],
    ) -> Result<()>;
}

#[cfg(feature = "cuda")]
impl<E: neurokernels::cuda::CudaElement> MaybeCuda for E {
    fn cuda_rows(
        rows: &mut Vec<Row>,
        cuda: &CudaHandle,
        shape: ScanShape,
        a: &[E],
        b: &[E],
        dh: &[E],
        want_h: &[f64],
        want_db: &[f64],
    ) -> Result<()> {
        let Some(device) = cuda else { return Ok(()) };
        let stream = device.stream().clone();
        let n = a.len();
        let (a_d, b_d, dh_d) = (
            stream.clone_htod(a)?,
            stream.clone_htod(b)?,
            stream.clone_htod(dh)?,
        );
        let mut h_d = stream.alloc_zeros::<E>(n)?;
        let (mut da_d, mut db_d) = (stream.alloc_zeros::<E>(n)?, stream.alloc_zeros::<E>(n)?);
        let mut dh0_d = stream.alloc_zeros::<E>(shape.state_numel("dh0")?)?;
        let p = ScanParams::new();
        let bytes = std::mem::size_of_val(a) as f64;
        let name = format!("cuda ({})", device.name()?);
        let ms = median_ms(20, || {
            scan::cuda::linear(device, &stream, &p, shape, &a_d, &b_d, None, &mut h_d)?;
            Ok(stream.synchronize()?)
        })?;
        let h = stream.clone_dtoh(&h_d)?;
        rows.push(Row {
            op: "scan.linear",
            device: name.clone(),
            dtype: E::DTYPE.name(),
            shape: shape.to_string(),
            ms,
            gbps: 3.0 * bytes / ms / 1e6,
            max_err: max_error(&h, want_h),
        });
        let ms = median_ms(20, || {
            scan::cuda::linear_backward(
                device, &stream, &p, shape, &a_d, &h_d, &dh_d, None, &mut da_d, &mut db_d,
                &mut dh0_d,
            )?;
            Ok(stream.synchronize()?)
        })?;
        let db = stream.clone_dtoh(&db_d)?;
        rows.push(Row {
            op: "scan.linear_backward",
            device: name,
            dtype: E::DTYPE.name(),
            shape: shape.to_string(),
            ms,
            gbps: 5.0 * bytes / ms / 1e6,
            max_err: max_error(&db, want_db),
        });
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
impl<E: Element> MaybeCuda for E {
    fn cuda_rows(
        _: &mut Vec<Row>,
        _: &CudaHandle,
        _: ScanShape,
        _: &[E],
        _: &[E],
        _: &[E],
        _: &[f64],
        _: &[f64],
    ) -> Result<()> {
        Ok(())
    }
}

fn open_cuda() -> (CudaHandle, String) {
    #[cfg(feature = "cuda")]
    {
        match neurokernels::cuda::Device::open(0) {
            Ok(d) => (Some(d), String::new()),
            Err(e) => (None, format!("CUDA rows skipped: {e}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        (
            None,
            "CUDA rows skipped: built without `--features cuda`".to_string(),
        )
    }
}

fn main() -> Result<()> {
    let (cuda, cuda_note) = open_cuda();
    let mut rows = Vec::new();
    // a channel-parallel shape and a long sequence on few channels (time-parallel on CPU)
    for shape in [ScanShape::new(4, 2048, 512), ScanShape::new(1, 131_072, 16)] {
        scan_rows::<f32>(&mut rows, shape, &cuda)?;
        scan_rows::<bf16>(&mut rows, shape, &cuda)?;
    }
    complex_rows(&mut rows, ScanShape::new(4, 2048, 256))?;
    println!("neurokernels tour: each result checked against a naive float64 reference");
    println!(
        "(max error = max |got - ref| / max(1, |ref|); throughput counts each tensor read or written once)\n"
    );
    println!(
        "{:<22} {:<22} {:<5} {:<20} {:>9} {:>9} {:>10}",
        "op", "device", "dtype", "shape [B,T,D]", "ms", "GB/s", "max error"
    );
    for r in &rows {
        println!(
            "{:<22} {:<22} {:<5} {:<20} {:>9.3} {:>9.2} {:>10.2e}",
            r.op, r.device, r.dtype, r.shape, r.ms, r.gbps, r.max_err
        );
    }
    if !cuda_note.is_empty() {
        println!("\n{cuda_note}");
    }
    println!("\nfamilies not yet in this build: attention, topk/sae, ridge (see the issues)");
    Ok(())
}
