//! Fuzz target: [`entry::names`] on every input libFuzzer makes.
#![no_main]

#[path = "../entry.rs"]
mod entry;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    entry::names(data);
});
