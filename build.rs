//! Compiles the cimage API (proto/cimage/v1/cimage.proto) into Rust with tonic-prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cimage/v1/cimage.proto");
    tonic_prost_build::configure().compile_protos(&["proto/cimage/v1/cimage.proto"], &["proto"])?;
    Ok(())
}
