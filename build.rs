//! Compiles the cimage API (proto/cimage/v1/cimage.proto) into Rust with tonic-prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cimage/v1/cimage.proto");
    tonic_prost_build::configure()
        // Credentials get a hand-written Debug that hides the password (src/api/mod.rs).
        .skip_debug(["cimage.v1.Credentials"])
        .compile_protos(&["proto/cimage/v1/cimage.proto"], &["proto"])?;
    Ok(())
}
