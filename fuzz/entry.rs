//! The entry functions of the fuzz targets, shared with the stable corpus replay
//! (`tests/fuzz_corpus.rs`), so that CI replays the committed corpus through exactly what the
//! fuzzer ran.
//!
//! Each takes arbitrary bytes and checks more than "does not panic": what a parser accepts must
//! be usable (a config that parses also validates; a scenario that parses expands, round-trips
//! through YAML and builds a simulated cluster), and what it rejects must come with a message
//! naming the field.

// Not every includer uses every function.
#![allow(dead_code)]

use std::time::Duration;

/// What an input did: accepted or rejected with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The parser accepted it (and every check on the result held).
    Accepted,
    /// The parser rejected it with a message naming the problem.
    Rejected,
    /// Not UTF-8: the callers read files as text and fail before parsing.
    NotText,
}

/// `MigrationConfig::from_yaml`: an accepted config validates again, renders Cilium's values and
/// has a tunnel port; a rejected one names a field, a problem and a fix for every error.
pub fn config(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::NotText;
    };
    match cnimig_core::config::MigrationConfig::from_yaml(text) {
        Ok(cfg) => {
            if let Err(e) = cfg.validate() {
                panic!("from_yaml accepted a config that validate() rejects: {e}\n{text:?}");
            }
            let _ = cfg.effective_tunnel_port();
            for phase in [
                cnimig_core::cilium::CiliumPhase::Migration,
                cnimig_core::cilium::CiliumPhase::Final,
            ] {
                let _ = cnimig_core::cilium::rendered_config(
                    &cfg,
                    cnimig_core::cilium::ValueInputs::default(),
                    phase,
                );
            }
            Outcome::Accepted
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without problems: {text:?}");
            for e in &errors.0 {
                assert!(
                    !e.field.is_empty() && !e.problem.is_empty() && !e.fix.is_empty(),
                    "an error without its field, problem or fix: {e:?} for {text:?}"
                );
            }
            assert!(!errors.to_string().is_empty());
            Outcome::Rejected
        }
    }
}

/// `Scenario::from_yaml`: an accepted scenario expands its nodes, reads its Calico facts,
/// prints as YAML that parses back to an equal scenario, and builds a `SimCluster`; a rejected
/// one names an object, a field, a problem and a fix for every problem.
pub fn scenario(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::NotText;
    };
    match cnimig_sim::Scenario::from_yaml(text) {
        Ok(s) => {
            if let Err(e) = s.expand_nodes() {
                panic!("an accepted scenario does not expand: {e}\n{text:?}");
            }
            if let Err(e) = s.calico.facts() {
                panic!("an accepted scenario has no Calico facts: {e}\n{text:?}");
            }
            let printed = s.to_yaml();
            match cnimig_sim::Scenario::from_yaml(&printed) {
                Ok(back) => assert!(
                    back == s,
                    "the scenario does not round-trip through YAML:\n{text:?}\nprinted as\n{printed}"
                ),
                Err(e) => panic!(
                    "an accepted scenario, printed, is rejected: {e}\n{text:?}\nprinted as\n{printed}"
                ),
            }
            if let Err(e) = cnimig_sim::SimCluster::new(
                s,
                cnimig_sim::SimParams::fixed(Duration::from_secs(1)),
                1,
            ) {
                panic!("an accepted scenario does not build a cluster: {e}\n{text:?}");
            }
            Outcome::Accepted
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error without problems: {text:?}");
            for p in &errors.0 {
                assert!(
                    !p.object.is_empty() && !p.field.is_empty() && !p.problem.is_empty(),
                    "a problem without its object, field or text: {p:?} for {text:?}"
                );
            }
            Outcome::Rejected
        }
    }
}

/// The small parsers, on the input split at newlines: node names, label keys, durations,
/// CIDRs and Calico autodetection methods. An accepted node name is
/// 1 to 253 characters and prints back as given; an accepted CIDR prints back and parses to
/// the same network.
pub fn names(data: &[u8]) -> Outcome {
    let Ok(text) = std::str::from_utf8(data) else {
        return Outcome::NotText;
    };
    let mut accepted = false;
    for line in text.split('\n') {
        match cnimig_core::model::NodeName::new(line) {
            Ok(n) => {
                assert!(
                    !n.as_str().is_empty() && n.as_str().len() <= 253 && n.to_string() == line,
                    "node name {line:?} accepted as {n:?}"
                );
                accepted = true;
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        accepted |= cnimig_core::config::validate_label_key(line).is_ok();
        accepted |= cnimig_core::config::parse_duration(line).is_ok();
        if let Ok(net) = line.trim().parse::<ipnet::Ipv4Net>() {
            let back: Result<ipnet::Ipv4Net, _> = net.to_string().parse();
            assert!(back == Ok(net), "CIDR {line:?} prints as {net}");
            accepted = true;
        }
        accepted |= cnimig_sim::scenario::parse_autodetection(line).is_ok();
    }
    if accepted {
        Outcome::Accepted
    } else {
        Outcome::Rejected
    }
}
