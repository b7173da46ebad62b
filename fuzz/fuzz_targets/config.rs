//! The config loader: any text gives settings or a located error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = cimage::config::parse(s, std::path::Path::new("fuzz.yaml"));
});
