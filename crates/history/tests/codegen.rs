//! The generated gRPC code in `src/pb/` is what the `.proto` file says.
//!
//! The code is committed so that building clinflow needs no protobuf
//! compiler; this test compiles the `.proto` with protox (pure Rust) and
//! tonic-prost-build and fails when the committed file differs. Run it with
//! `CLINFLOW_REGENERATE=1` to rewrite the file after changing the `.proto`.

use std::path::Path;

#[test]
fn generated_code_matches_the_proto() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["clinflow/history/v1/history.proto"], [root.join("proto")])
        .expect("the .proto compiles");
    let out = tempfile::tempdir().expect("a temporary directory");
    tonic_prost_build::configure()
        .build_transport(false)
        .out_dir(out.path())
        .compile_fds(fds)
        .expect("code generation");
    let generated = std::fs::read_to_string(out.path().join("clinflow.history.v1.rs"))
        .expect("the generated file");
    let committed_path = root.join("src/pb/clinflow.history.v1.rs");
    if std::env::var_os("CLINFLOW_REGENERATE").is_some() {
        std::fs::write(&committed_path, &generated).expect("writing the generated file");
        return;
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == generated,
        "src/pb/clinflow.history.v1.rs is out of date with the .proto: run \
         CLINFLOW_REGENERATE=1 cargo test -p clinflow-history --test codegen"
    );
}
