//! docker config.json / auth.json parsing: no panic, and no error ever quotes a secret.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("auth.json");
    if let Err(e) = cimage::credentials::parse_auth_file(s, path, "registry.example.com") {
        let _ = e.to_string();
    }
    let _ = cimage::credentials::base64_decode(s);
});
