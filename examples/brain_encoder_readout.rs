//! A transformer brain-encoder readout, as in "Transformer brain encoders explain human
//! high-level visual responses" (Adeli et al.): a frozen vision backbone turns each image into
//! patch tokens; one learned query per brain region cross-attends to those tokens, and the
//! region's predicted response is a linear readout of what its query gathered. The attention
//! map of each region's query says which image patches drive that region.
//!
//! Built-in synthetic data with a known answer: 7×7 patch tokens per image, each the sum of a
//! positional embedding (fixed random unit vectors) and image content; every region's query is
//! tuned to two patches (a preferred one and a weaker second), so its two most attended
//! patches must be exactly those, in that order, in every image. The example prints each
//! region's most attended patches (`attention.top_keys`) and its predicted response
//! (`attention.forward` + readout), and checks both against float64.
//!
//!     cargo run --release --example brain_encoder_readout

use neurokernels::Result;
use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};

const GRID: usize = 7; // patches per side
const DIM: usize = 64; // token dim
const IMAGES: usize = 4;
const TOP: usize = 3;

/// A patch by (row, column) in the grid.
type Patch = (usize, usize);

/// Regions and the patches each is tuned to: preferred, second.
const REGIONS: &[(&str, Patch, Patch)] = &[
    ("V1 fovea", (3, 3), (3, 4)),
    ("V4 upper-left", (1, 1), (2, 1)),
    ("FFA (faces, center)", (2, 3), (3, 3)),
    ("PPA (places, lower field)", (6, 2), (6, 4)),
    ("EBA (bodies, right)", (3, 6), (4, 6)),
];

struct Rng(u64);
impl Rng {
    fn normal(&mut self) -> f64 {
        // Box-Muller from two xorshift uniforms
        let mut u = || {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (a, b) = (u(), u());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }
}

fn main() -> Result<()> {
    let patches = GRID * GRID;
    let regions = REGIONS.len();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // positional embeddings: random unit vectors (nearly orthogonal in 64 dims)
    let pos: Vec<Vec<f64>> = (0..patches)
        .map(|_| {
            let v: Vec<f64> = (0..DIM).map(|_| rng.normal()).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        })
        .collect();
    // tokens k = v = pos + content (content: small random features per image and patch)
    let mut tokens = vec![0f32; IMAGES * patches * DIM];
    for img in 0..IMAGES {
        for (p, e) in pos.iter().enumerate() {
            for c in 0..DIM {
                tokens[(img * patches + p) * DIM + c] = (e[c] + 0.05 * rng.normal()) as f32;
            }
        }
    }
    // learned queries: sharp tuning to the preferred patch, weaker to the second
    let gain = 12.0 * (DIM as f64).sqrt(); // cancels the 1/sqrt(D) score scale
    let patch = |(r, c): Patch| r * GRID + c;
    let mut queries = vec![0f32; IMAGES * regions * DIM];
    for img in 0..IMAGES {
        for (ri, &(_, first, second)) in REGIONS.iter().enumerate() {
            for c in 0..DIM {
                let x = gain * (pos[patch(first)][c] + 0.8 * pos[patch(second)][c]);
                queries[(img * regions + ri) * DIM + c] = x as f32;
            }
        }
    }
    // q [images, regions, 1 head, D] cross-attends to k = v [images, patches, 1 head, D]
    let shape = AttentionShape::new(IMAGES, regions, patches, 1, 1, DIM, DIM);
    let inputs = AttentionInputs::new(&queries, &tokens, &tokens);
    let params = AttentionParams::new();
    let gathered = attention::forward(&params, shape, &inputs)?.o;
    let keys = attention::top_keys(&params, shape, &inputs, TOP)?;
    let (weights, indices) = (keys.weights, keys.indices);

    // readout: each region's response is a fixed linear map of what its query gathered
    let readout: Vec<f64> = (0..DIM)
        .map(|_| rng.normal() / (DIM as f64).sqrt())
        .collect();
    let scale = 1.0 / (DIM as f64).sqrt();
    println!(
        "brain-encoder readout: {regions} region queries × {patches} patch tokens, {IMAGES} images\n"
    );
    let mut worst = 0.0f64;
    for img in 0..IMAGES {
        println!("image {img}");
        for (ri, &(name, first, second)) in REGIONS.iter().enumerate() {
            let row = (img * regions + ri) * TOP;
            let top: Vec<(usize, f32)> = (0..TOP)
                .map(|t| (indices[row + t] as usize, weights[row + t]))
                .collect();
            // float64 reference: the full softmax of this query over the image's patches
            let q = &queries[(img * regions + ri) * DIM..][..DIM];
            let s: Vec<f64> = (0..patches)
                .map(|p| {
                    let k = &tokens[(img * patches + p) * DIM..][..DIM];
                    scale
                        * q.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
            let mut response_ref = 0.0;
            let mut response = 0.0;
            for c in 0..DIM {
                let o_ref: f64 = (0..patches)
                    .map(|j| p[j] * tokens[(img * patches + j) * DIM + c] as f64)
                    .sum();
                response_ref += readout[c] * o_ref;
                response += readout[c] * gathered[(img * regions + ri) * DIM + c] as f64;
            }
            worst = worst.max((response - response_ref).abs());
            for &(j, w) in &top {
                worst = worst.max((w as f64 - p[j]).abs());
            }
            let shown: Vec<String> = top
                .iter()
                .map(|(j, w)| format!("({},{}) {:.3}", j / GRID, j % GRID, w))
                .collect();
            println!(
                "  {name:<27} response {response:+.4}  most attended patches: {}",
                shown.join(", ")
            );
            assert_eq!(
                (top[0].0, top[1].0),
                (patch(first), patch(second)),
                "{name} in image {img}: the tuned patches must come first"
            );
        }
    }
    println!("\nmax |error| of weights and responses against float64: {worst:.2e}");
    assert!(worst < 1e-4, "error {worst} too large");
    println!("every region's two most attended patches are the ones it is tuned to");
    Ok(())
}
