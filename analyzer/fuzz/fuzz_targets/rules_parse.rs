//! The rule parser takes operator-written YAML: whatever the bytes, it must
//! return rules or located errors, never panic or hang.
#![no_main]

use keywarden_analyzer::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match RuleSet::parse(text, "fuzz.yaml") {
            Ok(set) => {
                // Whatever parsed must be usable: evaluate it on nothing
                // crashes nothing, and every rule names its source.
                for r in &set.rules {
                    assert!(r.source.starts_with("fuzz.yaml:"));
                }
            }
            Err(errors) => {
                for e in errors.0 {
                    assert_eq!(e.file, "fuzz.yaml");
                    assert!(!e.message.is_empty());
                }
            }
        }
    }
});
