//! Shared test helpers: where pydicom's sample files are, and asking pydicom about them.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

const FALLBACK_PYTHON: &str = "/work/main/target/test-venv/bin/python";
const FIND_SAMPLES: &str =
    "import pydicom,os;print(os.path.join(os.path.dirname(pydicom.__file__),'data','test_files'))";

/// The Python that has pydicom: `$CLINFLOW_TEST_PYTHON`, else the workspace's test venv.
pub fn python() -> PathBuf {
    match std::env::var_os("CLINFLOW_TEST_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(FALLBACK_PYTHON),
    }
}

/// pydicom's test_files directory: `$CLINFLOW_DICOM_SAMPLES`, else asked of
/// [`python()`]. Panics (fails the test) when neither is available: these tests must
/// not pass by silently skipping.
pub fn samples_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CLINFLOW_DICOM_SAMPLES").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.is_dir(),
            "CLINFLOW_DICOM_SAMPLES={} is not a directory",
            dir.display()
        );
        return dir;
    }
    let python = python();
    let out = Command::new(&python)
        .args(["-c", FIND_SAMPLES])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "no DICOM samples: set CLINFLOW_DICOM_SAMPLES, or CLINFLOW_TEST_PYTHON to a Python \
                 with pydicom>=3 (tried {}: {e})",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "no DICOM samples: {} could not import pydicom: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        dir.is_dir(),
        "pydicom's test_files {} is not a directory",
        dir.display()
    );
    dir
}

/// The bytes of one sample file.
pub fn sample(name: &str) -> Vec<u8> {
    let path = samples_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `*.dcm` sample, sorted by name.
pub fn all_samples() -> Vec<(String, Vec<u8>)> {
    let dir = samples_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".dcm"))
        .collect();
    names.sort();
    assert!(names.len() > 20, "too few samples in {}", dir.display());
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// Runs `script` with the pydicom Python, `args` after it, and parses its stdout as JSON.
pub fn pydicom_json(script: &str, args: &[&Path]) -> serde_json::Value {
    let python = python();
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "pydicom script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("pydicom script printed JSON")
}
