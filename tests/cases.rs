//! Every committed reference case (tests/cases/, made by tests/reference/generate.py from
//! PyTorch in float64) on the CPU, and on CUDA when a device is present; plus the case
//! machinery itself: unknown params, unimplemented ops, saving outputs, the comparators.

mod common;

use neurokernels::cases::{
    self, Case, Outcome, Runner, Tensor, Tolerance, check_file, collect_case_files,
};

const TOL: Tolerance = Tolerance {
    rtol: 1e-4,
    atol: 1e-5,
};
const TOPK_TOL: Tolerance = Tolerance {
    rtol: 1e-6,
    atol: 0.0,
};
use std::path::{Path, PathBuf};

fn committed_cases() -> Vec<PathBuf> {
    // NEUROKERNELS_CASES_DIR: where the binary runs away from its build tree (the GPU machine)
    let dir = std::env::var_os("NEUROKERNELS_CASES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases"));
    let files = collect_case_files(&[dir]).unwrap();
    assert!(
        files.len() >= 20,
        "expected the committed cases, found {}",
        files.len()
    );
    files
}

#[test]
fn every_committed_case_passes_on_cpu() {
    let runner = Runner::cpu();
    let mut failures = Vec::new();
    for f in committed_cases() {
        let report = check_file(&runner, &f, None);
        if !report.passed() {
            failures.push(report.line());
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_implemented_ops_are_exactly_those_with_committed_cases() {
    let mut ops: Vec<String> = committed_cases()
        .iter()
        .map(|f| Case::load(f).unwrap().op)
        .collect();
    ops.sort();
    ops.dedup();
    let mut implemented: Vec<String> = cases::IMPLEMENTED_OPS
        .iter()
        .map(|s| s.to_string())
        .collect();
    implemented.sort();
    assert_eq!(ops, implemented);
}

#[test]
fn every_committed_case_passes_on_cuda_when_present() {
    let runner = match Runner::cuda() {
        Ok(r) => r,
        Err(e) => {
            common::say_skipped(&format!("committed cases on CUDA: {e}"));
            return;
        }
    };
    let mut failures = Vec::new();
    for f in committed_cases() {
        let case = Case::load(&f).unwrap();
        let op = case.op.as_str();
        if cases::CUDA_NO_F64_OPS.contains(&op) && case.dtype() == Some(neurokernels::DType::F64) {
            common::say_skipped(&format!("{} on CUDA: {op} has no f64 kernel", f.display()));
            continue;
        }
        let report = check_file(&runner, &f, None);
        if let neurokernels::cases::Outcome::Skipped(why) = &report.outcome {
            common::say_skipped(&format!("{} on CUDA: {why}", f.display()));
            continue;
        }
        if !report.passed() {
            failures.push(report.line());
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases on CUDA:\n{}",
        failures.join("\n")
    );
}

fn write_case(
    dir: &Path,
    name: &str,
    op: &str,
    params: &str,
    tensors: &[(&str, Tensor)],
) -> PathBuf {
    let mut meta = std::collections::HashMap::new();
    meta.insert("op".to_string(), op.to_string());
    if !params.is_empty() {
        meta.insert("params".to_string(), params.to_string());
    }
    let named: Vec<(String, &Tensor)> = tensors.iter().map(|(k, t)| (k.to_string(), t)).collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(named, Some(meta), &path).unwrap();
    path
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("neurokernels-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn small_scan_tensors() -> Vec<(&'static str, Tensor)> {
    vec![
        (
            "in.a",
            Tensor::new(vec![1, 2, 2], vec![0.5f32, 0.5, 0.5, 0.5]),
        ),
        (
            "in.b",
            Tensor::new(vec![1, 2, 2], vec![1.0f32, 2.0, 3.0, 4.0]),
        ),
        (
            "out.h",
            Tensor::new(vec![1, 2, 2], vec![1.0f32, 2.0, 3.5, 5.0]),
        ),
    ]
}

#[test]
fn a_hand_made_case_passes_and_its_outputs_can_be_saved() {
    let dir = temp_dir("save");
    let path = write_case(
        &dir,
        "tiny.safetensors",
        "scan.linear",
        r#"{"reverse": false}"#,
        &small_scan_tensors(),
    );
    let out = dir.join("saved");
    let report = check_file(&Runner::cpu(), &path, Some(&out));
    assert!(report.passed(), "{}", report.line());
    let saved = std::fs::read(out.join("tiny.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&saved).unwrap();
    let h = st.tensor("out.h").unwrap();
    assert_eq!(h.shape(), &[1, 2, 2]);
    let values: Vec<f32> = bytemuck::pod_collect_to_vec(h.data());
    assert_eq!(values, vec![1.0, 2.0, 3.5, 5.0]);
}

#[test]
fn a_wrong_expected_output_fails() {
    let dir = temp_dir("wrong");
    let mut tensors = small_scan_tensors();
    tensors[2] = (
        "out.h",
        Tensor::new(vec![1, 2, 2], vec![1.0f32, 2.0, 3.5, 5.1]),
    );
    let path = write_case(&dir, "wrong.safetensors", "scan.linear", "", &tensors);
    let report = check_file(&Runner::cpu(), &path, None);
    assert!(
        matches!(report.outcome, Outcome::Failed(..)),
        "{}",
        report.line()
    );
}

#[test]
fn unknown_params_and_inputs_are_errors() {
    let dir = temp_dir("unknown");
    let path = write_case(
        &dir,
        "p.safetensors",
        "scan.linear",
        r#"{"revers": true}"#,
        &small_scan_tensors(),
    );
    let report = check_file(&Runner::cpu(), &path, None);
    assert!(
        report.line().contains("unknown param `revers`"),
        "{}",
        report.line()
    );

    let mut tensors = small_scan_tensors();
    tensors.push(("in.c", Tensor::new(vec![1], vec![1.0f32])));
    let path = write_case(&dir, "i.safetensors", "scan.linear", "", &tensors);
    let report = check_file(&Runner::cpu(), &path, None);
    assert!(
        report.line().contains("unknown input `in.c`"),
        "{}",
        report.line()
    );
}

#[test]
fn an_unimplemented_op_fails_rather_than_skips() {
    let Some(op) = cases::CONTRACT_OPS
        .iter()
        .find(|op| !cases::IMPLEMENTED_OPS.contains(op))
    else {
        common::say_skipped("unimplemented op: every op of the contract is implemented");
        return;
    };
    let dir = temp_dir("unimpl");
    let path = write_case(
        &dir,
        "t.safetensors",
        op,
        "",
        &[("in.x", Tensor::new(vec![1, 1], vec![1.0f64]))],
    );
    let report = check_file(&Runner::cpu(), &path, None);
    assert!(matches!(report.outcome, Outcome::Failed(..)));
    assert!(
        report.line().contains(&format!("op not implemented: {op}")),
        "{}",
        report.line()
    );
}

#[test]
fn a_case_without_op_is_an_error() {
    let dir = temp_dir("noop");
    let named = [("in.a".to_string(), Tensor::new(vec![1], vec![1.0f32]))];
    let path = dir.join("x.safetensors");
    safetensors::serialize_to_file(named.iter().map(|(k, t)| (k.clone(), t)), None, &path).unwrap();
    assert!(
        Case::load(&path)
            .unwrap_err()
            .to_string()
            .contains("no `op`")
    );
}

#[test]
fn elementwise_comparator_handles_nan_inf_and_tolerance() {
    let want = Tensor::new(vec![4], vec![1.0f32, f32::NAN, f32::INFINITY, 100.0]);
    let ok = Tensor::new(vec![4], vec![1.00001f32, f32::NAN, f32::INFINITY, 100.009]);
    assert!(cases::compare_elementwise("x", &ok, &want, TOL).passed);
    let nan_vs_num = Tensor::new(vec![4], vec![1.0f32, 0.0, f32::INFINITY, 100.0]);
    assert!(!cases::compare_elementwise("x", &nan_vs_num, &want, TOL).passed);
    let inf_sign = Tensor::new(vec![4], vec![1.0f32, f32::NAN, f32::NEG_INFINITY, 100.0]);
    assert!(!cases::compare_elementwise("x", &inf_sign, &want, TOL).passed);
    let too_far = Tensor::new(vec![4], vec![1.0f32, f32::NAN, f32::INFINITY, 100.02]);
    assert!(!cases::compare_elementwise("x", &too_far, &want, TOL).passed);
}

#[test]
fn topk_comparator_accepts_ties_in_any_order_and_checks_indices() {
    // row: x = [5, 3, 5, 1]; top-2 values [5, 5] at indices {0, 2} in either order
    let x = [5.0, 3.0, 5.0, 1.0];
    let lookup = |_: usize, i: i32| x.get(i as usize).copied();
    let want = [5.0, 5.0];
    assert!(cases::compare_topk("v", &[5.0, 5.0], &[2, 0], &want, 2, TOPK_TOL, lookup).passed);
    assert!(cases::compare_topk("v", &[5.0, 5.0], &[0, 2], &want, 2, TOPK_TOL, lookup).passed);
    // an index that does not point at its value
    assert!(!cases::compare_topk("v", &[5.0, 5.0], &[0, 1], &want, 2, TOPK_TOL, lookup).passed);
    // out of range
    assert!(!cases::compare_topk("v", &[5.0, 5.0], &[0, 9], &want, 2, TOPK_TOL, lookup).passed);
    // wrong values
    assert!(!cases::compare_topk("v", &[5.0, 3.0], &[0, 1], &want, 2, TOPK_TOL, lookup).passed);
}
