//! Image references: parsing never panics, what parses prints back to itself, and errors stay
//! one short line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match cimage::reference::ImageRef::parse(s) {
        Ok(r) => {
            let again =
                cimage::reference::ImageRef::parse(&r.to_string()).expect("normal form parses");
            assert_eq!(again.to_string(), r.to_string());
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n') && m.len() < 1200, "{m}");
        }
    }
    let _ = cimage::reference::local_image_id(s);
});
