//! The run's pictures and reports: the SVG timeline and the Markdown report of a real simulated
//! migration (the reference cluster of 30 nodes, as `examples/simulate.rs` runs it, with two nodes
//! whose Cilium agent never becomes Ready so that the run has rollbacks to show).
//!
//! - The SVG is well-formed XML (a small hand-rolled checker: balanced tags, quoted attributes,
//!   valid entities), has a row per node, marks the rollbacks, and is the same for the same run.
//! - The Markdown has every section, a row per node, the rollback causes, escaped table cells.
//! - Headless Chromium renders the SVG to PNG; the test fails on a malformed or blank image (its
//!   size is compared with a blank render of the same size). Without Chromium it says it skipped,
//!   unless `CNIMIG_REQUIRE_CHROMIUM=1` (what `scripts/render-check.sh` sets), when it fails.
//!   The PNG and the Markdown are left in `target/tmp/timeline/` for a person to look at.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers: a failed setup stops the test with its message"
)]

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cnimig::core::cilium::{CiliumPhase, rendered_config};
use cnimig::core::config::{FailurePolicy, MigrationConfig};
use cnimig::core::events::{Event, EventSink};
use cnimig::core::machine::Phase;
use cnimig::core::model::{NodeName, Time};
use cnimig::core::orchestrator::{Orchestrator, Ports, RunOptions, RunReport};
use cnimig::core::plan::Plan;
use cnimig::core::report::{BudgetHealth, Figures, Timeline, event_time, markdown};
use cnimig::sim::{Scenario, SimCluster, SimFaults, SimParams};

/// Which workers (by position among the workers, sorted by name) get an agent that never
/// becomes Ready: they roll back.
const BROKEN: [usize; 2] = [3, 16];

/// What a migration left for the reports.
struct Run {
    plan: Plan,
    report: RunReport,
    timeline: Timeline,
    /// The nodes that were made to fail.
    broken: Vec<NodeName>,
}

/// Forwards events to the timeline and samples the budgets at each, as the example does.
struct Sampled<'a> {
    timeline: &'a Timeline,
    sim: SimCluster,
}

impl EventSink for Sampled<'_> {
    fn emit(&self, e: &Event) {
        self.timeline.emit(e);
        let budgets: Vec<BudgetHealth> = self
            .sim
            .pdb_health()
            .into_iter()
            .map(BudgetHealth::from)
            .collect();
        self.timeline.record_budgets(event_time(e), &budgets);
    }
}

/// Migrates the 30-node reference cluster with two broken agents; returns what the reports need.
fn migrate() -> Run {
    let scenario = Scenario::reference(30);
    let mut cfg = MigrationConfig::new("10.245.0.0/16".parse().expect("static CIDR"));
    cfg.max_in_flight = 6;
    cfg.on_node_failure = FailurePolicy::RollbackAndContinue;
    cfg.poll_interval = Duration::from_secs(2);
    cfg.validate().expect("valid config");
    let sim = SimCluster::new(scenario, SimParams::default(), 3).expect("reference scenario");
    let mut workers: Vec<NodeName> = sim
        .node_list()
        .into_iter()
        .filter(|n| n.as_str().starts_with("worker"))
        .collect();
    workers.sort();
    let broken: Vec<NodeName> = BROKEN.iter().map(|i| workers[*i].clone()).collect();
    let faults = SimFaults {
        agent_never_ready: broken.iter().cloned().collect(),
        ..SimFaults::default()
    };
    sim.set_faults(faults).expect("faults on known nodes");
    let orch = Orchestrator::new(
        Ports::from_one(sim.clone()),
        cfg.clone(),
        RunOptions::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (_, plan) = orch.plan().await.expect("plan");
        assert!(plan.preflight.ok(), "preflight:\n{}", plan.preflight);
        sim.set_scope(plan.order.iter().map(|p| p.name.clone()).collect())
            .expect("scope");
        sim.set_control_plane_last(cfg.control_plane_last);
        sim.install_cilium(rendered_config(&cfg, plan.inputs, CiliumPhase::Migration))
            .expect("install cilium");
        let timeline = Timeline::new();
        timeline.add_nodes(plan.order.iter().map(|p| &p.name));
        let sink = Sampled {
            timeline: &timeline,
            sim: sim.clone(),
        };
        let report = orch.run(&plan, &sink).await.expect("run");
        Run {
            plan,
            report,
            timeline,
            broken,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// A small XML well-formedness check (no dependency): one root element, balanced and properly
// nested tags, quoted attributes without `<`, only the predefined and numeric entities.

fn check_entity(s: &str, at: usize) -> Result<usize, String> {
    let rest = &s[at..];
    let end = rest
        .find(';')
        .filter(|e| *e <= 12)
        .ok_or_else(|| format!("bare '&' at byte {at}: {:?}", &rest[..rest.len().min(20)]))?;
    let name = &rest[1..end];
    let ok = matches!(name, "amp" | "lt" | "gt" | "quot" | "apos")
        || name
            .strip_prefix("#x")
            .is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        || name
            .strip_prefix('#')
            .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
    if ok {
        Ok(at + end + 1)
    } else {
        Err(format!("unknown entity &{name}; at byte {at}"))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.')
}

/// Returns the root element's name and the number of elements.
fn check_xml(s: &str) -> Result<(String, usize), String> {
    let b = s.as_bytes();
    let mut stack: Vec<&str> = Vec::new();
    let mut root: Option<String> = None;
    let mut elements = 0usize;
    let mut i = 0usize;
    let skip_to = |from: usize, pat: &str| -> Result<usize, String> {
        s[from..]
            .find(pat)
            .map(|p| from + p + pat.len())
            .ok_or_else(|| format!("unterminated construct at byte {from}"))
    };
    while i < b.len() {
        match b[i] {
            b'<' if s[i..].starts_with("<?") => i = skip_to(i, "?>")?,
            b'<' if s[i..].starts_with("<!--") => i = skip_to(i, "-->")?,
            b'<' if s[i..].starts_with("<!") => i = skip_to(i, ">")?,
            b'<' if s[i..].starts_with("</") => {
                let end = skip_to(i, ">")?;
                let name = s[i + 2..end - 1].trim_end();
                match stack.pop() {
                    Some(open) if open == name => {}
                    Some(open) => {
                        return Err(format!("</{name}> closes <{open}> at byte {i}"));
                    }
                    None => return Err(format!("</{name}> without an open tag at byte {i}")),
                }
                i = end;
            }
            b'<' => {
                if stack.is_empty() && root.is_some() {
                    return Err(format!("a second root element at byte {i}"));
                }
                let mut j = i + 1;
                while j < b.len() && is_name_char(b[j] as char) {
                    j += 1;
                }
                let name = &s[i + 1..j];
                if name.is_empty() || !(b[i + 1] as char).is_ascii_alphabetic() {
                    return Err(format!("bad tag name at byte {i}"));
                }
                elements += 1;
                if root.is_none() {
                    root = Some(name.to_string());
                }
                let mut seen = BTreeSet::new();
                loop {
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if j >= b.len() {
                        return Err(format!("unterminated <{name}> at byte {i}"));
                    }
                    if s[j..].starts_with("/>") {
                        j += 2;
                        break;
                    }
                    if b[j] == b'>' {
                        stack.push(name);
                        j += 1;
                        break;
                    }
                    let a0 = j;
                    while j < b.len() && is_name_char(b[j] as char) {
                        j += 1;
                    }
                    let attr = &s[a0..j];
                    if attr.is_empty() || !seen.insert(attr) {
                        return Err(format!(
                            "bad or repeated attribute in <{name}> at byte {a0}"
                        ));
                    }
                    if b.get(j) != Some(&b'=') {
                        return Err(format!("attribute {attr} without a value at byte {j}"));
                    }
                    let q = *b
                        .get(j + 1)
                        .ok_or_else(|| "attribute value missing".to_string())?;
                    if q != b'"' && q != b'\'' {
                        return Err(format!("unquoted value of {attr} at byte {j}"));
                    }
                    let v0 = j + 2;
                    let v1 = s[v0..]
                        .find(q as char)
                        .map(|p| v0 + p)
                        .ok_or_else(|| format!("unterminated value of {attr}"))?;
                    let mut k = v0;
                    while k < v1 {
                        match b[k] {
                            b'<' => return Err(format!("'<' in the value of {attr} at byte {k}")),
                            b'&' => k = check_entity(s, k)?,
                            _ => k += 1,
                        }
                    }
                    j = v1 + 1;
                }
                i = j;
            }
            b'&' => i = check_entity(s, i)?,
            b'>' if stack.is_empty() => return Err(format!("stray '>' at byte {i}")),
            c if stack.is_empty() && !c.is_ascii_whitespace() => {
                return Err(format!("text outside the root element at byte {i}"));
            }
            _ => i += 1,
        }
    }
    if let Some(open) = stack.last() {
        return Err(format!("<{open}> is never closed"));
    }
    root.map(|r| (r, elements))
        .ok_or_else(|| "no element".to_string())
}

#[test]
fn the_xml_checker_rejects_what_it_should() {
    assert!(check_xml("<a x=\"1\"><b/>t &amp; u</a>").is_ok());
    for bad in [
        "<a><b></a></b>",
        "<a>",
        "<a x=1/>",
        "<a>x & y</a>",
        "<a x=\"<\"/>",
        "<a/><b/>",
        "<a y=\"1\" y=\"2\"/>",
        "<a>&bogus;</a>",
    ] {
        assert!(check_xml(bad).is_err(), "{bad} passed");
    }
}

#[test]
fn the_svg_is_well_formed_has_a_row_per_node_and_marks_rollbacks() {
    let Run {
        plan,
        report,
        timeline,
        broken,
    } = migrate();
    let svg = timeline.to_svg();
    let (root, elements) = check_xml(&svg)
        .unwrap_or_else(|e| panic!("malformed SVG: {e}\n{}", &svg[..svg.len().min(2000)]));
    assert_eq!(root, "svg");
    assert!(elements > 100, "only {elements} elements");
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));

    assert_eq!(report.nodes.len(), 30);
    let recorded = timeline.snapshot();
    assert_eq!(recorded.tracks.len(), plan.order.len());
    for n in &report.nodes {
        // Each row's label ends with the node's name (short names are never truncated).
        assert!(
            svg.contains(&format!("</title>{}</text>", n.node)),
            "no row for {}",
            n.node
        );
    }
    let mut rolled: Vec<NodeName> = report
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::RolledBack)
        .map(|n| n.node.clone())
        .collect();
    rolled.sort();
    assert_eq!(
        rolled, broken,
        "the broken nodes roll back, the others migrate"
    );
    assert_eq!(report.count(Phase::Done), 28);
    assert!(
        svg.contains("fill=\"url(#undone)\""),
        "undone progress is hatched"
    );
    assert!(
        svg.contains("RollingBack: undoing"),
        "rollback segments and legend"
    );
    for n in &broken {
        assert!(
            svg.contains(&format!("{n} RolledBack at +")),
            "{n}'s row ends in a rollback mark"
        );
    }
    for panel in [
        "Nodes in flight",
        "Availability of PDB-covered pods",
        "peak 6",
    ] {
        assert!(svg.contains(panel), "missing {panel:?}");
    }
    assert!(!recorded.samples.is_empty(), "budgets were sampled");

    let again = migrate().timeline;
    assert!(again.to_svg() == svg, "the same run draws the same SVG");
}

#[test]
fn an_svg_of_hostile_text_is_still_well_formed() {
    let t = Timeline::new();
    let node = NodeName::new("n-1").expect("name");
    t.emit(&Event::NodeStarted {
        node: node.clone(),
        at: Time(0),
    });
    t.emit(&Event::EvictionBlocked {
        node: node.clone(),
        pod: "ns/<script>&".into(),
        pdb: "ns/\"quoted\" 'pdb'".into(),
        at: Time(1_000),
    });
    t.emit(&Event::Phase {
        node: node.clone(),
        from: Phase::Pending,
        to: Phase::RollingBack,
        at: Time(2_000),
    });
    t.emit(&Event::NodeFinished {
        node,
        outcome: Phase::Failed,
        cause: Some("restore \u{1} failed: <none> & \"x\"".into()),
        at: Time(3_000),
    });
    t.emit(&Event::Stopping {
        reason: "]]> <!-- -->".into(),
        at: Time(3_000),
    });
    let svg = t.to_svg();
    check_xml(&svg).unwrap_or_else(|e| panic!("malformed SVG: {e}"));
    assert!(svg.contains("no availability samples were recorded"));
    // An empty timeline draws too.
    check_xml(&Timeline::new().to_svg()).unwrap_or_else(|e| panic!("malformed empty SVG: {e}"));
}

#[test]
fn the_markdown_report_has_every_section() {
    let Run { plan, report, .. } = migrate();
    let figures = Figures::new()
        .titled("Change CHG-1: Calico to Cilium")
        .with("PDB violations", 0)
        .with("weird | figure", "a|b");
    let md = markdown(&plan, &report, &figures);
    let sections = [
        "# Change CHG-1: Calico to Cilium\n",
        "## Summary\n",
        "## Preflight\n",
        "| id | severity | message |\n",
        "## Plan\n",
        "### Node order\n",
        "### Helm values: migration phase\n",
        "### Helm values: final phase\n",
        "### CiliumNodeConfig\n",
        "## Per-node timings\n",
        "| node | started | finished | duration | outcome |\n",
        "## Rollbacks\n",
        "## Figures\n",
    ];
    let mut last = 0;
    for s in sections {
        let at = md[last..]
            .find(s)
            .unwrap_or_else(|| panic!("missing or out of order: {s:?}\n{md}"));
        last += at;
    }
    assert!(md.contains("```yaml\n"), "fenced YAML");
    assert!(md.contains("kind: CiliumNodeConfig"));
    assert!(md.contains("28 migrated"));
    for c in &plan.preflight.checks {
        assert!(
            md.contains(&format!("| `{}` |", c.id)),
            "preflight {}",
            c.id
        );
    }
    for n in &report.nodes {
        assert!(
            md.contains(&format!("| `{}` |", n.node)),
            "timing row for {}",
            n.node
        );
    }
    for n in report.nodes.iter().filter(|n| n.phase == Phase::RolledBack) {
        let cause = n.cause.as_deref().expect("a rollback has a cause");
        assert!(
            md.contains(&cnimig::core::report::md_cell(cause)),
            "cause of {}",
            n.node
        );
    }
    assert!(
        md.contains("| weird \\| figure | a\\|b |"),
        "cells escape '|'"
    );
    // Every table row has as many unescaped '|' as its header.
    let mut columns = None;
    for line in md.lines() {
        if !line.starts_with('|') {
            columns = None;
            continue;
        }
        let pipes = line.replace("\\|", "").matches('|').count();
        match columns {
            None => columns = Some(pipes),
            Some(c) => assert_eq!(pipes, c, "row with a stray '|': {line}"),
        }
    }
    assert_eq!(md, markdown(&plan, &report, &figures), "deterministic");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("timeline");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join("report.md"), &md).expect("write the report for people to read");
}

// ---------------------------------------------------------------------------------------------
// Rendering with headless Chromium.

const WINDOW: (u32, u32) = (1400, 2000);

fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CNIMIG_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `svg` with `args` and a fresh profile named `tag`; returns its
/// standard output. Fails when it exits non-zero or takes more than two minutes.
#[allow(
    clippy::disallowed_methods,
    reason = "a real deadline for a real browser process, not the migration's clock"
)]
fn run_chromium(
    chromium: &Path,
    svg: &Path,
    args: &[String],
    scratch: &Path,
    tag: &str,
) -> Result<String, String> {
    let profile = scratch.join(format!("profile-{tag}"));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).map_err(|e| e.to_string())?;
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", svg.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", chromium.display()))?;
    // Drain both pipes on threads so a large DOM dump cannot fill a pipe and stall the browser.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("chromium took more than two minutes".into());
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    if status.success() {
        Ok(out)
    } else {
        Err(format!("chromium exited with {status}; stderr:\n{err}"))
    }
}

/// Screenshots `svg` into `png` at the window size.
fn screenshot(chromium: &Path, svg: &Path, png: &Path, scratch: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(png);
    let tag = png.file_stem().and_then(|s| s.to_str()).unwrap_or("png");
    let args = [
        format!("--screenshot={}", png.display()),
        format!("--window-size={},{}", WINDOW.0, WINDOW.1),
    ];
    run_chromium(chromium, svg, &args, scratch, tag)?;
    if png.is_file() {
        Ok(())
    } else {
        Err(format!("chromium wrote no {}", png.display()))
    }
}

/// Checks the PNG signature and the IHDR chunk; returns width and height.
fn png_size(bytes: &[u8]) -> Result<(u32, u32), String> {
    const SIG: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
    if bytes.len() < 33 || bytes[..8] != SIG {
        return Err("not a PNG (bad signature)".into());
    }
    if &bytes[12..16] != b"IHDR" || bytes[8..12] != [0, 0, 0, 13] {
        return Err("the first chunk is not a 13-byte IHDR".into());
    }
    let be = |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let (w, h) = (be(16), be(20));
    if w == 0 || h == 0 {
        return Err(format!("empty image {w}x{h}"));
    }
    if !bytes.windows(4).any(|c| c == b"IEND") {
        return Err("no IEND chunk: truncated PNG".into());
    }
    Ok((w, h))
}

#[test]
fn chromium_renders_the_timeline() {
    let required = std::env::var("CNIMIG_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
    let Some(chromium) = find_chromium() else {
        assert!(
            !required,
            "CNIMIG_REQUIRE_CHROMIUM=1 but neither chromium nor chromium-browser is on PATH"
        );
        println!("skipped: install chromium (scripts/render-check.sh does)");
        return;
    };
    let svg = migrate().timeline.to_svg();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("timeline");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let svg_path = dir.join("timeline.svg");
    std::fs::write(&svg_path, &svg).expect("write svg");
    // A blank page of the same size: what a render that drew nothing would look like.
    let height = svg
        .split("height=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("svg height");
    let blank_path = dir.join("blank.svg");
    std::fs::write(
        &blank_path,
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1400\" height=\"{height}\"><rect width=\"1400\" height=\"{height}\" fill=\"#ffffff\"/></svg>\n"
        ),
    )
    .expect("write blank svg");

    // Chromium's own XML parser must accept the document: on an error it renders the part before
    // the error under an error banner, which no size check would notice.
    let dom = run_chromium(
        &chromium,
        &svg_path,
        &["--dump-dom".to_string()],
        &dir,
        "dom",
    )
    .expect("dump the DOM");
    assert!(
        dom.contains("<svg") && !dom.contains("parsererror") && !dom.contains("following errors"),
        "Chromium did not parse the SVG cleanly:\n{}",
        &dom[..dom.len().min(3000)]
    );
    assert!(
        dom.contains("Nodes in flight"),
        "Chromium's DOM lacks the timeline's text"
    );

    let png_path = dir.join("timeline.png");
    let blank_png = dir.join("blank.png");
    screenshot(&chromium, &svg_path, &png_path, &dir).expect("render the timeline");
    screenshot(&chromium, &blank_path, &blank_png, &dir).expect("render a blank page");
    let real = std::fs::read(&png_path).expect("read png");
    let blank = std::fs::read(&blank_png).expect("read blank png");
    let (w, h) = png_size(&real).unwrap_or_else(|e| panic!("{}: {e}", png_path.display()));
    let (bw, bh) = png_size(&blank).unwrap_or_else(|e| panic!("{}: {e}", blank_png.display()));
    assert_eq!((w, h), (bw, bh), "both renders have the window's size");
    println!(
        "rendered {} ({w}x{h}, {} bytes; a blank page of the same size is {} bytes)",
        png_path.display(),
        real.len(),
        blank.len()
    );
    // A timeline has text, bars and lines all over: it compresses far worse than a blank page.
    assert!(
        real.len() > blank.len() * 4 && real.len() > 40_000,
        "the render looks blank: {} bytes against {} for a blank page ({})",
        real.len(),
        blank.len(),
        png_path.display()
    );
}
