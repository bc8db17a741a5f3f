//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and the inputs that once
//! crashed a target (`fuzz/regressions/<target>/`, if any) through the fuzz targets' own entry
//! functions (`fuzz/entry.rs`), on stable: CI checks that no committed input panics, without
//! nightly or libFuzzer. Run the fuzzer itself with `cargo +nightly fuzz run TARGET` in `fuzz/`
//! (README, "Reliability").

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../fuzz/entry.rs"]
mod entry;

use std::path::Path;

use entry::Outcome;

/// Every file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>` through `f`; the
/// number of inputs by outcome.
fn replay(target: &str, f: fn(&[u8]) -> Outcome) -> (usize, usize, usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let (mut accepted, mut rejected, mut not_text) = (0, 0, 0);
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| f(&data))
                .unwrap_or_else(|_| panic!("{} panics the {target} target", file.display()));
            match outcome {
                Outcome::Accepted => accepted += 1,
                Outcome::Rejected => rejected += 1,
                Outcome::NotText => not_text += 1,
            }
        }
    }
    eprintln!("{target}: {accepted} accepted, {rejected} rejected, {not_text} not UTF-8");
    (accepted, rejected, not_text)
}

#[test]
fn config_corpus_never_panics() {
    let (accepted, rejected, _) = replay("config", entry::config);
    // The seeds hold both valid configs (deploy/job.yaml's, the unit tests') and broken ones.
    assert!(accepted >= 3, "too few accepted config seeds: {accepted}");
    assert!(rejected >= 2, "too few rejected config seeds: {rejected}");
}

#[test]
fn scenario_corpus_never_panics() {
    let (accepted, rejected, _) = replay("scenario", entry::scenario);
    assert!(accepted >= 2, "too few accepted scenario seeds: {accepted}");
    assert!(rejected >= 1, "too few rejected scenario seeds: {rejected}");
}

#[test]
fn names_corpus_never_panics() {
    let (accepted, _, _) = replay("names", entry::names);
    assert!(accepted >= 3, "too few names seeds: {accepted}");
}

/// The entry functions' checks can fail: a config the parser rejects is reported as rejected,
/// and a valid one as accepted (the replay above would otherwise count nothing).
#[test]
fn the_entry_functions_tell_accepted_from_rejected() {
    assert_eq!(
        entry::config(b"podCIDR: 10.245.0.0/16\n"),
        Outcome::Accepted
    );
    assert_eq!(
        entry::config(b"podCIDR: 10.245.0.0/33\n"),
        Outcome::Rejected
    );
    assert_eq!(entry::config(b"\xff\xfe"), Outcome::NotText);
    assert_eq!(entry::scenario(b"nodes: 3\n"), Outcome::Rejected);
    assert_eq!(entry::names(b"worker-1"), Outcome::Accepted);
    assert_eq!(entry::names(b"Worker_1 ~"), Outcome::Rejected);
}
