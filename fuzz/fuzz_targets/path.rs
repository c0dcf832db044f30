//! Path normalisation: never a panic; a normalised resource path starts with `/`, has no
//! `.` or `..` segment and no encoded separator, and normalising it again changes nothing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(p) = scp_gateway::path::normalize(s) else { return };
    let r = p.resource();
    assert!(r.starts_with('/'), "{s:?} → {r:?}");
    assert!(!r.split('/').any(|seg| seg == ".." || seg == "."), "{s:?} → {r:?}");
    if let Some(stage) = p.stage() {
        let full = format!("/{stage}{r}");
        let again = scp_gateway::path::normalize(&full).expect("a normalised path normalises");
        assert_eq!(again.resource(), r, "{s:?}");
    }
});
