use neurokernels::ridge;
fn main() {
    let (n, p, t) = (3000, 1000, 10000);
    let mut s = 1u64;
    let mut r = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let x: Vec<f32> = (0..n * p).map(|_| r()).collect();
    let y: Vec<f32> = (0..n * t).map(|_| r()).collect();
    let alphas: Vec<f32> = (0..20)
        .map(|i| 10f32.powf(-2.0 + 8.0 * i as f32 / 19.0))
        .collect();
    let folds: Vec<i32> = (0..n).map(|i| (i * 3 / n) as i32).collect();
    let inputs = ridge::CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let start = std::time::Instant::now();
    let report =
        |pr: ridge::CvProgress| eprintln!("{:?} {:.1}s", pr, start.elapsed().as_secs_f64());
    let fit = ridge::cv(&ridge::CvParams::new(), n, p, t, &inputs, Some(&report)).unwrap();
    println!(
        "{:.2} s {}",
        start.elapsed().as_secs_f64(),
        fit.best_alpha[0]
    );
}
