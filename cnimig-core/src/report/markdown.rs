//! The Markdown report of a run, for a change ticket.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::cilium::NodeConfigApi;
use crate::machine::Phase;
use crate::model::Time;
use crate::orchestrator::{NodeOutcome, RunReport};
use crate::plan::Plan;
use crate::preflight::Severity;

use super::text::{describe_instant, hms, md_cell};

/// Appends formatted text to a `String` (writing to a `String` cannot fail).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// Appends a formatted line.
macro_rules! line {
    ($out:expr) => {{
        $out.push('\n');
    }};
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// One named figure, e.g. `makespan` = `0:42:10`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Its value, as the reader should see it.
    pub value: String,
}

/// What the caller adds to a [`markdown`] report: a title, the `CiliumNodeConfig` API version it
/// discovered, and the figures only it knows (sequential makespan, evictions, violations, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figures {
    /// The report's heading (default: `cnimig migration report`).
    pub title: Option<String>,
    /// The API version to print the `CiliumNodeConfig` at (default `cilium.io/v2`).
    pub node_config_api: NodeConfigApi,
    /// Figures, in the order to list them, after the ones the report computes itself.
    pub figures: Vec<Figure>,
}

impl Default for Figures {
    fn default() -> Self {
        Figures {
            title: None,
            node_config_api: NodeConfigApi::V2,
            figures: Vec::new(),
        }
    }
}

impl Figures {
    /// No title, `cilium.io/v2`, no figures.
    #[must_use]
    pub fn new() -> Self {
        Figures::default()
    }
    /// With this heading.
    #[must_use]
    pub fn titled(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }
    /// With one more figure.
    #[must_use]
    pub fn with(mut self, name: impl Into<String>, value: impl ToString) -> Self {
        self.push(name, value);
        self
    }
    /// Adds a figure.
    pub fn push(&mut self, name: impl Into<String>, value: impl ToString) -> &mut Self {
        self.figures.push(Figure {
            name: name.into(),
            value: value.to_string(),
        });
        self
    }
}

/// A Markdown report of a run, fit to paste into a change ticket.
///
/// Sections, in order: a summary; `## Preflight` (a table of id, severity and message);
/// `## Plan` (node order, skipped nodes, the Helm values of both phases as fenced YAML, the
/// `CiliumNodeConfig` as fenced YAML and why its defaults were chosen); `## Per-node timings`
/// (node, started, finished, duration, outcome; times from the run's start); `## Rollbacks`
/// (each node that did not end Done, with its cause); `## Figures` (counts and makespan, then
/// `extra`'s figures). Table cells are escaped ([`md_cell`](super::md_cell)).
#[must_use]
pub fn markdown(plan: &Plan, run: &RunReport, extra: &Figures) -> String {
    let mut out = String::new();
    let title = extra.title.as_deref().unwrap_or("cnimig migration report");
    line!(out, "# {}", title.replace(['\n', '\r'], " "));
    line!(out);
    summary(&mut out, run);
    preflight(&mut out, plan);
    plan_section(&mut out, plan, extra.node_config_api);
    timings(&mut out, run);
    rollbacks(&mut out, run);
    figures(&mut out, run, extra);
    out
}

fn count(run: &RunReport, p: Phase) -> usize {
    run.count(p)
}

fn unfinished(run: &RunReport) -> usize {
    run.nodes.iter().filter(|n| !n.phase.is_terminal()).count()
}

fn summary(out: &mut String, run: &RunReport) {
    line!(out, "## Summary");
    line!(out);
    line!(
        out,
        "{} nodes: **{} migrated**, {} rolled back, {} failed, {} not finished; {} skipped by the plan.",
        run.nodes.len(),
        count(run, Phase::Done),
        count(run, Phase::RolledBack),
        count(run, Phase::Failed),
        unfinished(run),
        run.skipped.len()
    );
    line!(out);
    line!(
        out,
        "The run started at {} and took {}.",
        describe_instant(run.started),
        hms(duration_ms(run.makespan()))
    );
    if let Some(why) = &run.stopped {
        line!(out);
        line!(
            out,
            "**The run stopped early:** {}",
            why.replace(['\n', '\r'], " ")
        );
    }
    if run.interrupted {
        line!(out);
        line!(
            out,
            "**The run was interrupted** before it finished; run it again to resume from the node records."
        );
    }
    line!(out);
}

fn preflight(out: &mut String, plan: &Plan) {
    let checks = &plan.preflight.checks;
    let n = |s: Severity| checks.iter().filter(|c| c.severity == s).count();
    line!(out, "## Preflight");
    line!(out);
    line!(
        out,
        "{} checks: {} passed, {} warnings, {} failed.",
        checks.len(),
        n(Severity::Pass),
        n(Severity::Warn),
        n(Severity::Fail)
    );
    line!(out);
    if !checks.is_empty() {
        line!(out, "| id | severity | message |");
        line!(out, "|---|---|---|");
        for c in checks {
            let severity = match c.severity {
                Severity::Pass => c.severity.to_string(),
                Severity::Warn | Severity::Fail => format!("**{}**", c.severity),
            };
            line!(
                out,
                "| `{}` | {severity} | {} |",
                md_cell(c.id),
                md_cell(&c.message)
            );
        }
        line!(out);
    }
}

fn plan_section(out: &mut String, plan: &Plan, api: NodeConfigApi) {
    line!(out, "## Plan");
    line!(out);
    line!(out, "### Node order");
    line!(out);
    line!(out, "{}", order_summary(plan));
    line!(out);
    if !plan.order.is_empty() {
        line!(
            out,
            "<details><summary>All {} nodes in order</summary>",
            plan.order.len()
        );
        line!(out);
        let names: Vec<String> = plan.order.iter().map(|p| format!("`{}`", p.name)).collect();
        line!(out, "{}", names.join(" → "));
        line!(out);
        line!(out, "</details>");
        line!(out);
    }
    if !plan.skipped.is_empty() {
        line!(out, "Skipped nodes:");
        line!(out);
        line!(out, "| node | reason |");
        line!(out, "|---|---|");
        for s in &plan.skipped {
            line!(
                out,
                "| `{}` | {} |",
                md_cell(s.node.as_str()),
                md_cell(&s.reason)
            );
        }
        line!(out);
    }
    line!(out, "### Helm values: migration phase");
    line!(out);
    line!(
        out,
        "Cilium installed with these values runs passively beside Calico; the run checks the live `cilium-config` against them before it touches a node."
    );
    line!(out);
    fenced(out, "yaml", &yaml(&plan.migration_values));
    line!(out, "### Helm values: final phase");
    line!(out);
    line!(
        out,
        "Cilium as the cluster's CNI: upgrade with these values once every node is migrated."
    );
    line!(out);
    fenced(out, "yaml", &yaml(&plan.final_values));
    line!(out, "### CiliumNodeConfig");
    line!(out);
    line!(
        out,
        "Applied by the run before the first node; it makes Cilium the CNI of nodes labelled `{}=true`.",
        plan.node_config.label.replace('`', "'")
    );
    line!(out);
    fenced(out, "yaml", &plan.node_config.to_yaml(api));
    for r in &plan.node_config.reasons {
        line!(out, "- {}", r.replace(['\n', '\r'], " "));
    }
    if !plan.node_config.reasons.is_empty() {
        line!(out);
    }
}

/// "150 nodes: 147 workers round-robin across zones a (49), …, then 3 control-plane nodes last."
fn order_summary(plan: &Plan) -> String {
    let total = plan.order.len();
    if total == 0 {
        return "No node to migrate.".to_string();
    }
    let workers: Vec<_> = plan.order.iter().filter(|p| !p.control_plane).collect();
    let cp = total - workers.len();
    let mut zones: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &workers {
        *zones
            .entry(w.zone.as_deref().unwrap_or("(no zone)"))
            .or_default() += 1;
    }
    let zone_list: Vec<String> = zones.iter().map(|(z, n)| format!("{z} ({n})")).collect();
    let mut s = format!("{total} nodes. ");
    if !workers.is_empty() {
        put!(
            s,
            "{} worker{} interleaved across {} zone{}: {}",
            workers.len(),
            if workers.len() == 1 { "" } else { "s" },
            zones.len(),
            if zones.len() == 1 { "" } else { "s" },
            zone_list.join(", ")
        );
    }
    if cp > 0 {
        let cp_last = plan
            .order
            .iter()
            .skip(workers.len())
            .all(|p| p.control_plane);
        if workers.is_empty() {
            put!(
                s,
                "{cp} control-plane node{}",
                if cp == 1 { "" } else { "s" }
            );
        } else if cp_last {
            put!(
                s,
                "; then {cp} control-plane node{} last",
                if cp == 1 { "" } else { "s" }
            );
        } else {
            put!(
                s,
                "; {cp} control-plane node{} among them (control-plane-last is off)",
                if cp == 1 { "" } else { "s" }
            );
        }
    }
    s.push('.');
    let first: Vec<String> = plan
        .order
        .iter()
        .take(6)
        .map(|p| format!("`{}`", p.name))
        .collect();
    put!(
        s,
        " First: {}{}.",
        first.join(", "),
        if total > 6 { ", …" } else { "" }
    );
    s
}

fn timings(out: &mut String, run: &RunReport) {
    line!(out, "## Per-node timings");
    line!(out);
    line!(
        out,
        "Times are from the run's start ({}), in h:mm:ss.",
        describe_instant(run.started)
    );
    line!(out);
    let mut done: Vec<u64> = run
        .nodes
        .iter()
        .filter(|n| n.phase == Phase::Done)
        .filter_map(|n| Some(n.finished?.0.saturating_sub(n.started?.0)))
        .collect();
    done.sort_unstable();
    if let (Some(min), Some(max)) = (done.first(), done.last()) {
        let median = done.get(done.len() / 2).copied().unwrap_or(0);
        line!(
            out,
            "Migrated nodes took {} at least, {} at the median, {} at most.",
            hms(*min),
            hms(median),
            hms(*max)
        );
        line!(out);
    }
    if run.nodes.is_empty() {
        line!(out, "No node was in the run.");
        line!(out);
        return;
    }
    line!(out, "| node | started | finished | duration | outcome |");
    line!(out, "|---|---:|---:|---:|---|");
    let mut rows: Vec<&NodeOutcome> = run.nodes.iter().collect();
    // Start order reads like the run; nodes that never started keep plan order, at the end.
    rows.sort_by_key(|n| (n.started.is_none(), n.started));
    for n in rows {
        let rel = |t: Option<Time>| {
            t.map_or("—".to_string(), |t| {
                format!("+{}", hms(t.0.saturating_sub(run.started.0)))
            })
        };
        let duration = match (n.started, n.finished) {
            (Some(a), Some(b)) => hms(b.0.saturating_sub(a.0)),
            _ => "—".to_string(),
        };
        let outcome = if n.phase.is_terminal() {
            n.phase.to_string()
        } else if n.started.is_some() {
            format!("not finished (at {})", n.phase)
        } else {
            "not started".to_string()
        };
        line!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            md_cell(n.node.as_str()),
            rel(n.started),
            rel(n.finished),
            duration,
            outcome
        );
    }
    line!(out);
}

fn rollbacks(out: &mut String, run: &RunReport) {
    line!(out, "## Rollbacks");
    line!(out);
    let rolled: Vec<&NodeOutcome> = run
        .nodes
        .iter()
        .filter(|n| {
            matches!(
                n.phase,
                Phase::RolledBack | Phase::Failed | Phase::RollingBack
            )
        })
        .collect();
    if rolled.is_empty() {
        line!(out, "None: no node was rolled back.");
        line!(out);
        return;
    }
    line!(
        out,
        "{} node{} did not migrate. `RolledBack` nodes are back on Calico as they were; `Failed` nodes could not be rolled back and need a person.",
        rolled.len(),
        if rolled.len() == 1 { "" } else { "s" }
    );
    line!(out);
    line!(out, "| node | outcome | at | cause |");
    line!(out, "|---|---|---:|---|");
    for n in rolled {
        line!(
            out,
            "| `{}` | {} | {} | {} |",
            md_cell(n.node.as_str()),
            n.phase,
            n.finished.map_or("—".to_string(), |t| format!(
                "+{}",
                hms(t.0.saturating_sub(run.started.0))
            )),
            md_cell(n.cause.as_deref().unwrap_or("no cause recorded"))
        );
    }
    line!(out);
}

fn figures(out: &mut String, run: &RunReport, extra: &Figures) {
    line!(out, "## Figures");
    line!(out);
    line!(out, "| figure | value |");
    line!(out, "|---|---:|");
    let builtin = [
        ("nodes in the run", run.nodes.len().to_string()),
        ("migrated", count(run, Phase::Done).to_string()),
        ("rolled back", count(run, Phase::RolledBack).to_string()),
        ("failed", count(run, Phase::Failed).to_string()),
        ("not finished", unfinished(run).to_string()),
        ("skipped by the plan", run.skipped.len().to_string()),
        ("makespan", hms(duration_ms(run.makespan()))),
    ];
    for (name, value) in builtin {
        line!(out, "| {name} | {value} |");
    }
    for f in &extra.figures {
        line!(out, "| {} | {} |", md_cell(&f.name), md_cell(&f.value));
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_else(|e| format!("# could not render as YAML: {e}\n"))
}

/// A fenced code block whose fence is longer than any run of backticks in `body`.
fn fenced(out: &mut String, lang: &str, body: &str) {
    let mut longest = 0usize;
    let mut run = 0usize;
    for c in body.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat(longest.max(2) + 1);
    line!(out, "{fence}{lang}");
    out.push_str(body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
    line!(out, "{fence}");
    line!(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_outgrow_backticks_in_the_body() {
        let mut s = String::new();
        fenced(&mut s, "yaml", "a: ```x```\n");
        assert!(s.starts_with("````yaml\n"));
        assert!(s.ends_with("````\n\n"));
    }
}
