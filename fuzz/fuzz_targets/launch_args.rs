//! The launch arguments users type: mounts (SRC:DST[:ro]), users (USER[:GID]), and the mount
//! path checks; none may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cimage::launcher::spec::{MountRequest, UserRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = s.parse::<MountRequest>() {
        let _ = cimage::launcher::mounts::locate(&m.source, &["/scratch".into()]);
    }
    let _ = s.parse::<UserRequest>();
    let _ = cimage::names::check("job id", s);
});
