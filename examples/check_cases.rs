//! Runs reference cases (CASES.md) and compares the crate's outputs with theirs.
//!
//!     cargo run --release --example check_cases -- [--device cpu|cuda] [--save DIR] PATH...
//!
//! PATHs are case files or folders of them. Prints one line per case and ends with
//! `N passed, M failed` (`, K skipped` where the device is absent); exits non-zero on any
//! failure. `--save DIR` writes each case's computed outputs to DIR/<case file name>.

use neurokernels::cases::{Outcome, Runner, check_file, collect_case_files};
use std::path::PathBuf;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: check_cases [--device cpu|cuda] [--save DIR] PATH...");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut device = "cpu".to_string();
    let mut save: Option<PathBuf> = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => match args.next() {
                Some(d) => device = d,
                None => return usage(),
            },
            "--save" => match args.next() {
                Some(d) => save = Some(PathBuf::from(d)),
                None => return usage(),
            },
            "-h" | "--help" => return usage(),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    if paths.is_empty() {
        return usage();
    }
    let files = match collect_case_files(&paths) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runner = match device.as_str() {
        "cpu" => Ok(Runner::cpu()),
        "cuda" => Runner::cuda(),
        _ => return usage(),
    };
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    match runner {
        Err(e) if std::env::var_os("NEUROKERNELS_REQUIRE_GPU").is_some() => {
            // scripts/cuda-emulator.sh sets it: no device there is a failure, not a skip
            eprintln!("check_cases: NEUROKERNELS_REQUIRE_GPU is set, but {device}: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            // no device: every case is skipped, and said so
            for f in &files {
                println!("SKIP {} {device} | {e}", f.display());
            }
            skipped = files.len();
        }
        Ok(runner) => {
            if let Some(name) = runner.device_name() {
                println!("device: {name}");
            }
            for f in &files {
                let report = check_file(&runner, f, save.as_deref());
                println!("{}", report.line());
                match report.outcome {
                    Outcome::Passed(_) => passed += 1,
                    Outcome::Failed(..) => failed += 1,
                    Outcome::Skipped(_) => skipped += 1,
                }
            }
        }
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
