//! Durations and time limits: no panic, no overflow, limits within their bound.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = cimage::units::parse_duration(s) {
        let _ = cimage::units::format_duration(d);
    }
    if let Ok(Some(d)) = cimage::units::parse_time_limit(s) {
        assert!(!d.is_zero() && d <= cimage::units::MAX_TIME_LIMIT);
    }
    let _ = cimage::units::parse_size(s);
});
