//! Code generation from `proto/` only: Rust types and the tonic service for our
//! wire-compatible Envoy subset, compiled by protox (no system `protoc`), plus the
//! encoded descriptor set that the proto3 JSON reader and writer use at run time.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &["envoy/service/auth/v3/external_auth.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
