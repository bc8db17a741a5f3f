//! Drawing a [`Recorded`] timeline as SVG.

use std::fmt::Write as _;

use crate::machine::Phase;
use crate::model::Time;

use super::text::{describe_instant, hms, truncate, xml_escape};
use super::timeline::{AvailabilitySample, MarkKind, Recorded, Segment, Track};

/// Document width; the screenshot check renders at this width.
const WIDTH: f64 = 1400.0;
/// Left margin: node names and panel axis labels.
const LEFT: f64 = 190.0;
/// Right margin.
const RIGHT: f64 = 24.0;
/// Plot width.
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
/// Height of the nodes-in-flight plot.
const FLIGHT_H: f64 = 70.0;
/// Height of the availability plot.
const AVAIL_H: f64 = 90.0;
/// Gap between blocks.
const GAP: f64 = 18.0;
/// Waiting reasons listed in a segment's tooltip.
const REASONS_MAX: usize = 6;

const FONT: &str = "DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif";
const COLOR_ROLLING_BACK: &str = "#d62728";
const COLOR_FAILED: &str = "#111111";
const COLOR_BLOCKED: &str = "#7a0010";
const COLOR_READY: &str = "#1f77b4";
const COLOR_WORST: &str = "#ff7f0e";
const COLOR_BELOW: &str = "#d62728";

/// Appends formatted text to a `String` (writing to a `String` cannot fail).
macro_rules! put {
    ($out:expr, $($arg:tt)*) => {{
        let _ = write!($out, $($arg)*);
    }};
}

/// The colour and the legend text of a segment whose last completed step is `phase`.
fn style(phase: Phase) -> (&'static str, &'static str) {
    match phase {
        Phase::Pending => ("#b8b8b8", "Pending: cordoning"),
        Phase::Cordoned => ("#f2c84b", "Cordoned: draining"),
        Phase::Drained => ("#9c755f", "Drained: labelling"),
        Phase::Labelled => ("#b07aa1", "Labelled: restarting agent"),
        Phase::AgentRestarted => ("#4e79a7", "AgentRestarted: agent starting"),
        Phase::AgentReady => ("#76b7b2", "AgentReady: restarting pods"),
        Phase::PodsRestarted => ("#8cd17d", "PodsRestarted: verifying"),
        Phase::Verified => ("#59a14f", "Verified: uncordoning"),
        Phase::Uncordoned => ("#2f6b3a", "Uncordoned: finishing"),
        Phase::RollingBack => (COLOR_ROLLING_BACK, "RollingBack: undoing"),
        Phase::Done => ("#2f6b3a", "Done"),
        Phase::RolledBack => (COLOR_ROLLING_BACK, "RolledBack"),
        Phase::Failed => (COLOR_FAILED, "Failed"),
    }
}

/// Phases shown in the legend, in order.
const LEGEND_PHASES: [Phase; 10] = [
    Phase::Pending,
    Phase::Cordoned,
    Phase::Drained,
    Phase::Labelled,
    Phase::AgentRestarted,
    Phase::AgentReady,
    Phase::PodsRestarted,
    Phase::Verified,
    Phase::Uncordoned,
    Phase::RollingBack,
];

/// Maps times to x coordinates.
struct Scale {
    t0: u64,
    span: f64,
}

impl Scale {
    fn x(&self, t: Time) -> f64 {
        let dt = t.0.saturating_sub(self.t0) as f64;
        LEFT + (dt / self.span).clamp(0.0, 1.0) * PLOT_W
    }
    /// Tick times (elapsed ms from t0) at a round step, about ten over the span.
    fn ticks(&self) -> Vec<u64> {
        const STEPS_S: [u64; 20] = [
            1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200,
            86_400, 172_800, 604_800,
        ];
        let span_s = self.span / 1000.0;
        let step_s = STEPS_S
            .iter()
            .copied()
            .find(|s| span_s / (*s as f64) <= 10.0)
            .unwrap_or(604_800);
        let step = step_s * 1000;
        let mut out = Vec::new();
        let mut t = 0u64;
        while (t as f64) <= self.span {
            out.push(t);
            t = t.saturating_add(step);
        }
        out
    }
}

/// The row height and name font size for `n` rows: small rows for big clusters.
fn row_metrics(n: usize) -> (f64, f64) {
    match n {
        0..=40 => (16.0, 11.0),
        41..=100 => (11.0, 9.0),
        _ => (8.0, 7.0),
    }
}

impl Recorded {
    /// The timeline as a self-contained SVG document, 1400 pixels wide and as tall as the
    /// nodes need:
    ///
    /// - a title with the counts and the time origin;
    /// - a legend of the phases (a segment is coloured by the node's last completed step, so it
    ///   shows what the node was working on next), rollbacks and annotations;
    /// - nodes in flight over time;
    /// - availability of the PDB-covered pods over time (from the samples fed to the timeline);
    /// - one row per node, in the order nodes started (nodes that never started last), with a
    ///   tooltip per segment naming the phase, its times and what the node waited for; progress
    ///   a rollback undid is hatched, the rollback itself is red, and the row of a node that
    ///   rolled back is tinted and ends in a diamond;
    /// - an x axis in `h:mm:ss` from the run's start.
    ///
    /// All text is XML-escaped. The output depends only on what was recorded.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let origin = self.origin();
        let end = self.end();
        let scale = Scale {
            t0: origin.0,
            span: (end.0 - origin.0) as f64,
        };
        let tracks = self.ordered_tracks();
        let (row_h, name_font) = row_metrics(tracks.len());

        let mut body = String::new();
        let mut y = 0.0;
        self.title(&mut body, &tracks, origin, end, &mut y);
        legend(&mut body, &mut y);
        y += GAP;
        self.flight_panel(&mut body, &scale, &mut y);
        y += GAP;
        self.availability_panel(&mut body, &scale, &mut y);
        y += GAP;
        self.gantt(&mut body, &scale, &tracks, row_h, name_font, &mut y);
        y += 12.0;
        let height = y.ceil();

        let mut out = String::with_capacity(body.len() + 1024);
        put!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
             viewBox=\"0 0 {WIDTH} {height}\" font-family=\"{FONT}\">\n"
        );
        put!(
            out,
            "<defs><pattern id=\"undone\" width=\"5\" height=\"5\" patternUnits=\"userSpaceOnUse\" \
             patternTransform=\"rotate(45)\"><rect width=\"5\" height=\"5\" fill=\"#ffffff\" \
             fill-opacity=\"0.35\"/><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"5\" stroke=\"#000000\" \
             stroke-width=\"2\" stroke-opacity=\"0.5\"/></pattern></defs>\n"
        );
        put!(
            out,
            "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{height}\" fill=\"#ffffff\"/>\n"
        );
        out.push_str(&body);
        out.push_str("</svg>\n");
        out
    }

    /// Tracks in start order; nodes that never started last, each group in first-seen order.
    fn ordered_tracks(&self) -> Vec<&Track> {
        let mut v: Vec<(usize, &Track)> = self.tracks.iter().enumerate().collect();
        v.sort_by_key(|(i, t)| (t.started.is_none(), t.started, *i));
        v.into_iter().map(|(_, t)| t).collect()
    }

    fn title(&self, out: &mut String, tracks: &[&Track], origin: Time, end: Time, y: &mut f64) {
        let count = |p: Phase| tracks.iter().filter(|t| t.outcome == Some(p)).count();
        let unfinished = tracks.iter().filter(|t| t.outcome.is_none()).count();
        put!(
            out,
            "<text x=\"16\" y=\"28\" font-size=\"18\" font-weight=\"bold\">cnimig migration timeline</text>\n"
        );
        let sub = format!(
            "{} nodes: {} migrated, {} rolled back, {} failed, {} not finished. Span {} from t = 0 at {}.",
            tracks.len(),
            count(Phase::Done),
            count(Phase::RolledBack),
            count(Phase::Failed),
            unfinished,
            hms(end.0.saturating_sub(origin.0)),
            describe_instant(origin),
        );
        put!(
            out,
            "<text x=\"16\" y=\"48\" font-size=\"12\" fill=\"#333333\">{}</text>\n",
            xml_escape(&sub)
        );
        for (i, s) in self.stops.iter().enumerate() {
            let line = format!(
                "Stopped at +{}: {}",
                hms(s.at.0.saturating_sub(origin.0)),
                s.reason
            );
            put!(
                out,
                "<text x=\"16\" y=\"{}\" font-size=\"12\" fill=\"{COLOR_ROLLING_BACK}\">{}</text>\n",
                64.0 + 16.0 * i as f64,
                xml_escape(&truncate(&line, 200))
            );
        }
        *y = 60.0 + 16.0 * self.stops.len() as f64;
    }

    fn flight_panel(&self, out: &mut String, scale: &Scale, y: &mut f64) {
        let steps = self.in_flight();
        let peak = steps.iter().map(|(_, c)| *c).max().unwrap_or(0);
        put!(
            out,
            "<text x=\"16\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\">Nodes in flight</text>\
             <text x=\"150\" y=\"{:.1}\" font-size=\"11\" fill=\"#555555\">started and not finished (peak {peak})</text>\n",
            *y + 12.0,
            *y + 12.0
        );
        let top = *y + 20.0;
        let bottom = top + FLIGHT_H;
        frame(out, scale, top, bottom);
        let ymax = peak.max(1) as f64;
        let yv = |c: usize| bottom - (c as f64 / ymax) * FLIGHT_H;
        put!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{peak}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">0</text>\n",
            LEFT - 6.0,
            top + 9.0,
            LEFT - 6.0,
            bottom
        );
        let mut d = format!("M{:.1} {:.1}", scale.x(Time(scale.t0)), bottom);
        for (t, c) in &steps {
            put!(d, " H{:.1} V{:.1}", scale.x(*t), yv(*c));
        }
        put!(d, " H{:.1} V{:.1} Z", LEFT + PLOT_W, bottom);
        put!(
            out,
            "<path d=\"{d}\" fill=\"#4e79a7\" fill-opacity=\"0.35\" stroke=\"#4e79a7\" stroke-width=\"1.2\"/>\n"
        );
        axis_labels(out, scale, bottom + 13.0);
        *y = bottom + 15.0;
    }

    fn availability_panel(&self, out: &mut String, scale: &Scale, y: &mut f64) {
        put!(
            out,
            "<text x=\"16\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\">Availability of PDB-covered pods</text>\n",
            *y + 12.0
        );
        let key_y = *y + 28.0;
        let per_budget = self.samples.iter().any(|s| s.worst.is_some());
        let mut kx = 16.0;
        let mut key = |out: &mut String, color: &str, dash: &str, text: &str| {
            put!(
                out,
                "<line x1=\"{kx:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-width=\"2.5\"{dash}/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>\n",
                key_y - 4.0,
                kx + 22.0,
                key_y - 4.0,
                kx + 27.0,
                key_y,
                xml_escape(text)
            );
            kx += 34.0 + 6.2 * text.chars().count() as f64;
        };
        key(
            out,
            COLOR_READY,
            "",
            "covered pods ready / wanted, summed over budgets",
        );
        if per_budget {
            key(out, COLOR_WORST, "", "worst budget: healthy / wanted");
            key(
                out,
                COLOR_BELOW,
                "",
                "a budget below its floor (healthy < required)",
            );
        }
        let top = key_y + 10.0;
        let bottom = top + AVAIL_H;
        frame(out, scale, top, bottom);
        if self.samples.is_empty() {
            put!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#777777\" text-anchor=\"middle\">no availability samples were recorded</text>\n",
                LEFT + PLOT_W / 2.0,
                top + AVAIL_H / 2.0
            );
            axis_labels(out, scale, bottom + 13.0);
            *y = bottom + 15.0;
            return;
        }
        let mut samples: Vec<&AvailabilitySample> = self.samples.iter().collect();
        samples.sort_by_key(|s| s.at);
        let ready = |s: &AvailabilitySample| (s.total > 0).then(|| s.ready as f64 / s.total as f64);
        let worst = |s: &AvailabilitySample| {
            s.worst
                .as_ref()
                .filter(|w| w.expected > 0)
                .map(|w| f64::from(w.healthy.min(w.expected)) / f64::from(w.expected))
        };
        let lowest = samples
            .iter()
            .flat_map(|s| [ready(s), worst(s)])
            .flatten()
            .fold(1.0_f64, f64::min);
        // The y axis runs from a round ten percent below the lowest value up to 100 %.
        let lo = ((lowest * 10.0).floor() / 10.0).clamp(0.0, 0.9);
        let yv = |v: f64| bottom - ((v - lo) / (1.0 - lo)).clamp(0.0, 1.0) * AVAIL_H;
        // The top label hangs below the top edge, the bottom one sits on the bottom edge, clear of
        // the time labels under the plot.
        for (ly, label) in [
            (yv(1.0) + 9.0, "100%".to_string()),
            (yv(lo), format!("{:.0}%", lo * 100.0)),
        ] {
            put!(
                out,
                "<text x=\"{:.1}\" y=\"{ly:.1}\" font-size=\"10\" text-anchor=\"end\">{label}</text>\n",
                LEFT - 6.0
            );
        }
        let mid = (1.0 + lo) / 2.0;
        put!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#dddddd\" stroke-dasharray=\"3 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{:.0}%</text>\n",
            yv(mid),
            LEFT + PLOT_W,
            yv(mid),
            LEFT - 6.0,
            yv(mid) + 4.0,
            mid * 100.0
        );
        // Budgets below their floor: red bands along the bottom, one per sample interval.
        for (i, s) in samples.iter().enumerate() {
            if s.below_floor == 0 {
                continue;
            }
            let x0 = scale.x(s.at);
            let x1 = samples.get(i + 1).map_or(LEFT + PLOT_W, |n| scale.x(n.at));
            let what = s.worst.as_ref().map_or(String::new(), |w| {
                format!(
                    "; worst {} {}/{} (requires {})",
                    w.pdb, w.healthy, w.expected, w.desired
                )
            });
            put!(
                out,
                "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"6\" fill=\"{COLOR_BELOW}\"><title>{}</title></rect>\n",
                bottom - 6.0,
                (x1 - x0).max(1.0),
                xml_escape(&format!(
                    "+{}: {} budget(s) below their floor{what}",
                    hms(s.at.0.saturating_sub(scale.t0)),
                    s.below_floor
                ))
            );
        }
        let step_path = |f: &dyn Fn(&AvailabilitySample) -> Option<f64>| {
            let mut d = String::new();
            for s in &samples {
                let Some(v) = f(s) else { continue };
                if d.is_empty() {
                    put!(d, "M{:.1} {:.1}", scale.x(s.at), yv(v));
                } else {
                    put!(d, " H{:.1} V{:.1}", scale.x(s.at), yv(v));
                }
            }
            if !d.is_empty() {
                put!(d, " H{:.1}", LEFT + PLOT_W);
            }
            d
        };
        if per_budget {
            let d = step_path(&worst);
            put!(
                out,
                "<path d=\"{d}\" fill=\"none\" stroke=\"{COLOR_WORST}\" stroke-width=\"1.5\"/>\n"
            );
        }
        let d = step_path(&ready);
        put!(
            out,
            "<path d=\"{d}\" fill=\"none\" stroke=\"{COLOR_READY}\" stroke-width=\"1.8\"/>\n"
        );
        axis_labels(out, scale, bottom + 13.0);
        *y = bottom + 15.0;
    }

    fn gantt(
        &self,
        out: &mut String,
        scale: &Scale,
        tracks: &[&Track],
        row_h: f64,
        name_font: f64,
        y: &mut f64,
    ) {
        put!(
            out,
            "<text x=\"16\" y=\"{:.1}\" font-size=\"13\" font-weight=\"bold\">Nodes</text>\
             <text x=\"70\" y=\"{:.1}\" font-size=\"11\" fill=\"#555555\">one row per node, in the order they started; hover a segment for details</text>\n",
            *y + 12.0,
            *y + 12.0
        );
        axis_labels(out, scale, *y + 30.0);
        let top = *y + 36.0;
        let bottom = top + row_h * tracks.len() as f64;
        // Row backgrounds first, so that grid lines show through between segments.
        for (i, t) in tracks.iter().enumerate() {
            let ry = top + row_h * i as f64;
            let fill = if t.rolled_back() {
                "#fde3e3"
            } else if i % 2 == 1 {
                "#f4f4f4"
            } else {
                "#ffffff"
            };
            put!(
                out,
                "<rect x=\"0\" y=\"{ry:.1}\" width=\"{WIDTH}\" height=\"{row_h:.1}\" fill=\"{fill}\"/>\n"
            );
        }
        frame(out, scale, top, bottom.max(top + 1.0));
        for s in &self.stops {
            let x = scale.x(s.at);
            put!(
                out,
                "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"{COLOR_ROLLING_BACK}\" stroke-width=\"1.5\" stroke-dasharray=\"6 3\"><title>{}</title></line>\n",
                top - 6.0,
                xml_escape(&format!("stopping: {}", s.reason))
            );
        }
        let end = Time(scale.t0.saturating_add(scale.span as u64));
        let max_name = ((LEFT - 14.0) / (name_font * 0.58)).floor() as usize;
        for (i, t) in tracks.iter().enumerate() {
            let ry = top + row_h * i as f64;
            let bar_y = ry + 1.0;
            let bar_h = (row_h - 2.0).max(1.0);
            // The node's name, with a tooltip that says how it went.
            let color = if t.rolled_back() {
                COLOR_ROLLING_BACK
            } else {
                "#222222"
            };
            put!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"{name_font}\" text-anchor=\"end\" fill=\"{color}\"><title>{}</title>{}</text>\n",
                LEFT - 6.0,
                ry + row_h / 2.0 + name_font * 0.36,
                xml_escape(&node_summary(t, scale.t0)),
                xml_escape(&truncate(t.node.as_str(), max_name.max(8)))
            );
            for s in &t.segments {
                segment(out, scale, t, s, end, bar_y, bar_h);
            }
            for m in t
                .marks
                .iter()
                .filter(|m| m.kind == MarkKind::EvictionBlocked)
            {
                let x = scale.x(m.at);
                put!(
                    out,
                    "<rect x=\"{:.1}\" y=\"{bar_y:.1}\" width=\"1.2\" height=\"{bar_h:.1}\" fill=\"{COLOR_BLOCKED}\"><title>{}</title></rect>\n",
                    x - 0.6,
                    xml_escape(&format!(
                        "+{} {}",
                        hms(m.at.0.saturating_sub(scale.t0)),
                        m.text
                    ))
                );
            }
            if let (Some(f), Some(o @ (Phase::RolledBack | Phase::Failed))) =
                (t.finished, t.outcome)
            {
                let x = scale.x(f);
                let r = (row_h / 2.0 - 0.5).max(2.5);
                let cy = ry + row_h / 2.0;
                let fill = if o == Phase::Failed {
                    COLOR_FAILED
                } else {
                    COLOR_ROLLING_BACK
                };
                put!(
                    out,
                    "<path d=\"M{x:.1} {:.1} L{:.1} {cy:.1} L{x:.1} {:.1} L{:.1} {cy:.1} Z\" fill=\"{fill}\" stroke=\"#ffffff\" stroke-width=\"0.6\"><title>{}</title></path>\n",
                    cy - r,
                    x + r,
                    cy + r,
                    x - r,
                    xml_escape(&format!(
                        "{} {o} at +{}: {}",
                        t.node,
                        hms(f.0.saturating_sub(scale.t0)),
                        t.cause.as_deref().unwrap_or("no cause recorded")
                    ))
                );
            }
        }
        axis_labels(out, scale, bottom + 14.0);
        *y = bottom + 16.0;
    }
}

/// One segment of a node's row, with its tooltip.
fn segment(
    out: &mut String,
    scale: &Scale,
    t: &Track,
    s: &Segment,
    end: Time,
    bar_y: f64,
    bar_h: f64,
) {
    let to = s.to.unwrap_or(end);
    let x0 = scale.x(s.from);
    let w = (scale.x(to) - x0).max(0.8);
    let (fill, label) = style(s.phase);
    let mut tip = format!(
        "{}: {} +{} to +{} ({})",
        t.node,
        label,
        hms(s.from.0.saturating_sub(scale.t0)),
        hms(to.0.saturating_sub(scale.t0)),
        hms(to.0.saturating_sub(s.from.0))
    );
    if s.to.is_none() {
        tip.push_str(", still in this phase when the record ends");
    }
    if s.undone {
        tip.push_str(", undone by the rollback");
    }
    let mut reasons: Vec<&str> = Vec::new();
    let mut more = 0usize;
    for m in t
        .marks
        .iter()
        .filter(|m| m.at >= s.from && (m.at < to || (s.to.is_none() && m.at == to)))
    {
        if reasons.contains(&m.text.as_str()) {
            continue;
        }
        if reasons.len() < REASONS_MAX {
            reasons.push(&m.text);
        } else {
            more += 1;
        }
    }
    for r in &reasons {
        tip.push_str("\n- ");
        tip.push_str(r);
    }
    if more > 0 {
        put!(tip, "\n- and {more} more");
    }
    let opacity = if s.to.is_none() {
        " fill-opacity=\"0.55\""
    } else {
        ""
    };
    put!(
        out,
        "<g><title>{}</title><rect x=\"{x0:.1}\" y=\"{bar_y:.1}\" width=\"{w:.1}\" height=\"{bar_h:.1}\" fill=\"{fill}\"{opacity}/>",
        xml_escape(&tip)
    );
    if s.undone {
        put!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{bar_y:.1}\" width=\"{w:.1}\" height=\"{bar_h:.1}\" fill=\"url(#undone)\"/>"
        );
    }
    out.push_str("</g>\n");
}

/// A node's tooltip: outcome, times, cause.
fn node_summary(t: &Track, t0: u64) -> String {
    let rel = |x: Option<Time>| {
        x.map_or("-".to_string(), |x| {
            format!("+{}", hms(x.0.saturating_sub(t0)))
        })
    };
    let outcome = t
        .outcome
        .map_or_else(|| "not finished".to_string(), |o| o.to_string());
    let mut s = format!(
        "{}: {outcome}, started {}, finished {}",
        t.node,
        rel(t.started),
        rel(t.finished)
    );
    if let (Some(a), Some(b)) = (t.started, t.finished) {
        put!(s, " ({})", hms(b.0.saturating_sub(a.0)));
    }
    if let Some(c) = &t.cause {
        put!(s, "\ncause: {c}");
    }
    s
}

/// The legend: phase colours, rollback marks, annotations.
fn legend(out: &mut String, y: &mut f64) {
    let mut items: Vec<String> = Vec::new();
    for p in LEGEND_PHASES {
        let (fill, label) = style(p);
        items.push(format!(
            "<rect width=\"12\" height=\"12\" fill=\"{fill}\"/><text x=\"17\" y=\"10.5\" font-size=\"11\">{}</text>",
            xml_escape(label)
        ));
    }
    items.push(
        "<rect width=\"12\" height=\"12\" fill=\"#b8b8b8\"/><rect width=\"12\" height=\"12\" fill=\"url(#undone)\"/>\
         <text x=\"17\" y=\"10.5\" font-size=\"11\">progress undone by a rollback</text>"
            .to_string(),
    );
    items.push(format!(
        "<path d=\"M6 0 L12 6 L6 12 L0 6 Z\" fill=\"{COLOR_ROLLING_BACK}\"/><text x=\"17\" y=\"10.5\" font-size=\"11\">ended RolledBack (row tinted)</text>"
    ));
    items.push(format!(
        "<path d=\"M6 0 L12 6 L6 12 L0 6 Z\" fill=\"{COLOR_FAILED}\"/><text x=\"17\" y=\"10.5\" font-size=\"11\">ended Failed: a person must look</text>"
    ));
    items.push(format!(
        "<rect x=\"5\" width=\"2\" height=\"12\" fill=\"{COLOR_BLOCKED}\"/><text x=\"17\" y=\"10.5\" font-size=\"11\">eviction blocked by a PDB</text>"
    ));
    items.push(
        "<rect width=\"12\" height=\"12\" fill=\"#4e79a7\" fill-opacity=\"0.55\"/><text x=\"17\" y=\"10.5\" font-size=\"11\">faded: still in that phase at the end</text>"
            .to_string(),
    );
    let top = *y + 8.0;
    let col_w = 228.0;
    let per_row = ((WIDTH - 32.0) / col_w).floor().max(1.0) as usize;
    put!(
        out,
        "<text x=\"16\" y=\"{:.1}\" font-size=\"11\" fill=\"#555555\">Segment colour: the node's last completed step: what it was doing next.</text>\n",
        top + 10.0
    );
    for (i, item) in items.iter().enumerate() {
        let col = i % per_row;
        let row = i / per_row;
        put!(
            out,
            "<g transform=\"translate({:.1} {:.1})\">{item}</g>\n",
            16.0 + col_w * col as f64,
            top + 18.0 + 18.0 * row as f64
        );
    }
    let rows = items.len().div_ceil(per_row);
    *y = top + 18.0 + 18.0 * rows as f64;
}

/// A plot frame with vertical grid lines at the ticks.
fn frame(out: &mut String, scale: &Scale, top: f64, bottom: f64) {
    for t in scale.ticks() {
        let x = scale.x(Time(scale.t0.saturating_add(t)));
        put!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{top:.1}\" x2=\"{x:.1}\" y2=\"{bottom:.1}\" stroke=\"#d8d8d8\" stroke-width=\"0.8\"/>\n"
        );
    }
    put!(
        out,
        "<rect x=\"{LEFT}\" y=\"{top:.1}\" width=\"{PLOT_W}\" height=\"{:.1}\" fill=\"none\" stroke=\"#999999\" stroke-width=\"0.8\"/>\n",
        bottom - top
    );
}

/// Tick labels in `h:mm:ss` from the origin, with their baseline at `y`.
fn axis_labels(out: &mut String, scale: &Scale, y: f64) {
    for t in scale.ticks() {
        let x = scale.x(Time(scale.t0.saturating_add(t)));
        put!(
            out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#444444\">{}</text>\n",
            hms(t)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, EventSink};
    use crate::model::NodeName;
    use crate::report::Timeline;

    #[test]
    fn ticks_are_round_and_cover_the_span() {
        let s = Scale {
            t0: 0,
            span: 2_700_000.0,
        };
        let ticks = s.ticks();
        assert_eq!(ticks.first(), Some(&0));
        assert_eq!(ticks.get(1), Some(&300_000));
        assert!(ticks.len() <= 11);
    }

    #[test]
    fn names_and_reasons_are_escaped() {
        let t = Timeline::new();
        let node = NodeName::new("n1").unwrap();
        t.emit(&Event::NodeStarted {
            node: node.clone(),
            at: Time(0),
        });
        t.emit(&Event::Waiting {
            node: node.clone(),
            reason: "pods <web & \"db\">".into(),
            at: Time(500),
        });
        t.emit(&Event::Stopping {
            reason: "a <b>".into(),
            at: Time(900),
        });
        let svg = t.to_svg();
        assert!(svg.contains("pods &lt;web &amp; &quot;db&quot;&gt;"));
        assert!(!svg.contains("<b>"));
        assert_eq!(svg, t.to_svg(), "deterministic");
    }
}
