//! Snapshot parsing, validation and compilation on arbitrary bytes: an error or a compiled
//! API, never a panic, and compiling twice gives the same routes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(api) = scp_gateway::snapshot::build(data) {
        let again = scp_gateway::snapshot::build(data).expect("valid once, valid twice");
        assert_eq!(api.id, again.id);
        assert_eq!(api.stages.len(), again.stages.len());
    }
});
