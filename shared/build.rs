//! Compiles the wire contract (`proto/fedtune/v1/*.proto`) into Rust at build time.
//!
//! The generated code lands in `OUT_DIR` and is included by exactly one module,
//! [`crate::pb`](../src/pb.rs), so no other module names generated types.
//! `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC` is set, so a fresh
//! machine needs nothing installed beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let protos =
        ["fedtune/v1/model.proto", "fedtune/v1/coordinator.proto", "fedtune/v1/secure_aggregation.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = tonic_prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // Payload chunks are large: decode them as `bytes::Bytes` so a chunk is sliced out of the
    // receive buffer instead of copied into a fresh Vec.
    config.bytes(["."]);
    let paths: Vec<_> = protos.iter().map(|p| root.join(p)).collect();
    tonic_prost_build::configure().compile_with_config(config, &paths, &[root])?;
    Ok(())
}
