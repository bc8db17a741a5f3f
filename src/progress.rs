//! Progress display for a run: a live bar on a terminal, plain lines in logs.
//!
//! [`Progress`] is an [`EventSink`]: pass it to
//! [`Orchestrator::run`](crate::core::orchestrator::Orchestrator::run) and it shows
//!
//! - on a terminal ([`Mode::Bar`]), an `indicatif` bar of the nodes finished, with the run's
//!   clock and the counts in flight, pending and rolled back, and below it one line per node in
//!   flight: its step, the time it has spent in that step, and what it waits for (for a drain
//!   refused by a PodDisruptionBudget, the pod and the budget);
//! - elsewhere ([`Mode::Lines`]), one plain line per event, stamped with the run's clock (the
//!   simulated clock in a simulation), so two runs with the same seed print the same lines;
//! - nothing with [`Mode::Quiet`].
//!
//! [`Mode::detect`] picks the mode a command-line tool should use: lines when stdout or stderr
//! is not a terminal, with `--no-progress`, or when `RUST_LOG` is set (so the bar never fights
//! with log lines); nothing with `--quiet`. Both the bar and the lines go to stderr, so stdout
//! stays free for the tool's result.
//!
//! ```
//! use cnimig::core::events::{Event, EventSink};
//! use cnimig::core::model::{NodeName, Time};
//! use cnimig::progress::Progress;
//! use std::sync::{Arc, Mutex};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Lines into a buffer (a real tool uses `Progress::new(Mode::detect(no_progress, quiet))`).
//! let buf = Arc::new(Mutex::new(Vec::new()));
//! let progress = Progress::lines(cnimig::progress::SharedBuf(buf.clone()));
//! let node = NodeName::new("worker-1")?;
//! progress.emit(&Event::RunStarted { nodes: 1, resumed: 0, at: Time(0) });
//! progress.emit(&Event::NodeStarted { node: node.clone(), at: Time(1_000) });
//! progress.finish();
//! let text = String::from_utf8(buf.lock().map_err(|_| "poisoned")?.clone())?;
//! assert_eq!(text, "[0:00:00] run: 1 nodes (0 resumed)\n[0:00:01] worker-1: started\n");
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::core::events::{Event, EventSink};
use crate::core::machine::Phase;
use crate::core::model::{NodeName, Time};

/// How a [`Progress`] shows the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A live bar and one line per node in flight (needs a terminal).
    Bar,
    /// One plain, deterministic line per event.
    Lines,
    /// Nothing.
    Quiet,
}

impl Mode {
    /// The mode for a command-line tool, from its `--no-progress` and `--quiet` flags, the
    /// `RUST_LOG` variable and whether stdout and stderr are terminals.
    #[must_use]
    pub fn detect(no_progress: bool, quiet: bool) -> Mode {
        Mode::choose(
            no_progress,
            quiet,
            std::env::var_os("RUST_LOG").is_some(),
            io::stdout().is_terminal() && io::stderr().is_terminal(),
        )
    }

    /// The rule behind [`Mode::detect`], with its inputs as values: `--quiet` wins, then plain
    /// lines unless everything allows the bar.
    #[must_use]
    pub fn choose(no_progress: bool, quiet: bool, rust_log_set: bool, terminal: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if no_progress || rust_log_set || !terminal {
            Mode::Lines
        } else {
            Mode::Bar
        }
    }
}

/// A `Write` into a shared buffer, for tests and for tools that collect the lines.
#[derive(Debug, Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends `tracing` logs to stderr, filtered by `RUST_LOG` (`warn` when it is unset or
/// invalid), for the examples and other tools. `RUST_LOG=cnimig_kube=info` shows every write
/// to the cluster; `RUST_LOG=debug` much more. Does nothing if a subscriber is already set.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}

/// `h:mm:ss` of a run time.
#[must_use]
pub fn clock(at: Time) -> String {
    let s = at.0 / 1000;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// What one node in flight is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InFlight {
    step: Phase,
    since: Time,
    waiting: Option<String>,
    /// `(pod, budget)` of the last refused eviction, until the node moves on.
    blocked: Option<(String, String)>,
}

/// The run as the events tell it.
#[derive(Debug, Default)]
struct State {
    total: usize,
    done: usize,
    rolled_back: usize,
    in_flight: usize,
    pending: usize,
    now: Time,
    nodes: BTreeMap<NodeName, InFlight>,
    /// The run minute of the last `Progress` line (lines mode prints one per minute).
    last_minute: Option<u64>,
}

impl State {
    /// Updates the state; returns the plain line for the event, if it has one.
    fn apply(&mut self, e: &Event) -> Option<String> {
        let at = at_of(e);
        self.now = self.now.max(at);
        let t = clock(at);
        match e {
            Event::RunStarted { nodes, resumed, .. } => {
                self.total = *nodes;
                self.pending = *nodes;
                Some(format!("[{t}] run: {nodes} nodes ({resumed} resumed)"))
            }
            Event::NodeStarted { node, at } => {
                self.nodes.insert(
                    node.clone(),
                    InFlight {
                        step: Phase::Pending,
                        since: *at,
                        waiting: None,
                        blocked: None,
                    },
                );
                Some(format!("[{t}] {node}: started"))
            }
            Event::Phase { node, from, to, at } => {
                let took = self
                    .nodes
                    .get(node)
                    .map(|n| clock(Time(at.0.saturating_sub(n.since.0))));
                if !to.is_terminal() {
                    self.nodes.insert(
                        node.clone(),
                        InFlight {
                            step: *to,
                            since: *at,
                            waiting: None,
                            blocked: None,
                        },
                    );
                }
                Some(match took {
                    Some(took) => format!("[{t}] {node}: {from:?} -> {to:?} ({took} in {from:?})"),
                    None => format!("[{t}] {node}: {from:?} -> {to:?}"),
                })
            }
            Event::Waiting { node, reason, .. } => {
                let step = self.nodes.get_mut(node).map(|n| {
                    n.waiting = Some(reason.clone());
                    n.step
                });
                Some(match step {
                    Some(step) => format!("[{t}] {node}: {step:?}: {reason}"),
                    None => format!("[{t}] {node}: {reason}"),
                })
            }
            Event::EvictionBlocked { node, pod, pdb, .. } => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.blocked = Some((pod.clone(), pdb.clone()));
                }
                Some(format!(
                    "[{t}] {node}: drain blocked: evicting {pod} refused by PodDisruptionBudget {pdb}"
                ))
            }
            Event::NodeFinished {
                node,
                outcome,
                cause,
                ..
            } => {
                self.nodes.remove(node);
                Some(match cause {
                    Some(cause) => format!("[{t}] {node}: {outcome:?}: {cause}"),
                    None => format!("[{t}] {node}: {outcome:?}"),
                })
            }
            Event::NodeJoined {
                node, migrating, ..
            } => {
                if *migrating {
                    self.total += 1;
                }
                Some(format!(
                    "[{t}] {node}: joined the cluster ({})",
                    if *migrating {
                        "added to the run"
                    } else {
                        "not in this run"
                    }
                ))
            }
            Event::Retrying { what, .. } => Some(format!("[{t}] retrying: {what}")),
            Event::Stopping { reason, .. } => Some(format!("[{t}] stopping: {reason}")),
            Event::Progress {
                done,
                rolled_back,
                in_flight,
                pending,
                at,
            } => {
                self.done = *done;
                self.rolled_back = *rolled_back;
                self.in_flight = *in_flight;
                self.pending = *pending;
                let minute = at.0 / 60_000;
                let finished = in_flight + pending == 0;
                if self.last_minute == Some(minute) && !finished {
                    return None;
                }
                self.last_minute = Some(minute);
                Some(format!("[{t}] {}", self.counts()))
            }
        }
    }

    fn counts(&self) -> String {
        format!(
            "{}/{} done, {} in flight, {} pending, {} rolled back",
            self.done, self.total, self.in_flight, self.pending, self.rolled_back
        )
    }

    /// The line of one node in flight, as the bar shows it.
    fn node_line(&self, node: &NodeName, n: &InFlight) -> String {
        let mut line = format!(
            "{node}  {:?} for {}",
            n.step,
            clock(Time(self.now.0.saturating_sub(n.since.0)))
        );
        if let Some((pod, pdb)) = &n.blocked {
            line.push_str(&format!("  drain blocked: {pod} refused by PDB {pdb}"));
        } else if let Some(reason) = &n.waiting {
            line.push_str(&format!("  {reason}"));
        }
        line
    }
}

fn at_of(e: &Event) -> Time {
    match e {
        Event::RunStarted { at, .. }
        | Event::NodeStarted { at, .. }
        | Event::Phase { at, .. }
        | Event::Waiting { at, .. }
        | Event::EvictionBlocked { at, .. }
        | Event::NodeFinished { at, .. }
        | Event::NodeJoined { at, .. }
        | Event::Retrying { at, .. }
        | Event::Stopping { at, .. }
        | Event::Progress { at, .. } => *at,
    }
}

/// The bars of [`Mode::Bar`].
struct Bars {
    multi: MultiProgress,
    main: ProgressBar,
    nodes: BTreeMap<NodeName, ProgressBar>,
    node_style: ProgressStyle,
}

impl Bars {
    fn new(target: ProgressDrawTarget) -> Bars {
        let multi = MultiProgress::with_draw_target(target);
        // Both templates are constants; a bad one would fall back to the default style.
        let style =
            ProgressStyle::with_template("[{prefix}] [{bar:30}] {pos}/{len} nodes done  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let node_style = ProgressStyle::with_template("  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let main = multi.add(ProgressBar::new(0).with_style(style));
        Bars {
            multi,
            main,
            nodes: BTreeMap::new(),
            node_style,
        }
    }

    /// Brings the bars in line with the state.
    fn show(&mut self, s: &State) {
        self.main.set_prefix(clock(s.now));
        self.main.set_length(s.total as u64);
        self.main.set_message(format!(
            "{} in flight, {} pending, {} rolled back",
            s.in_flight, s.pending, s.rolled_back
        ));
        self.main.set_position((s.done + s.rolled_back) as u64);
        self.nodes.retain(|name, bar| {
            let keep = s.nodes.contains_key(name);
            if !keep {
                bar.finish_and_clear();
                self.multi.remove(bar);
            }
            keep
        });
        for (name, n) in &s.nodes {
            let line = s.node_line(name, n);
            let bar = self.nodes.entry(name.clone()).or_insert_with(|| {
                self.multi
                    .add(ProgressBar::new_spinner().with_style(self.node_style.clone()))
            });
            bar.set_message(line);
        }
    }

    fn finish(&mut self, s: &State) {
        for bar in self.nodes.values() {
            bar.finish_and_clear();
            self.multi.remove(bar);
        }
        self.nodes.clear();
        self.main.set_prefix(clock(s.now));
        self.main.set_message(format!(
            "{} in flight, {} pending, {} rolled back",
            s.in_flight, s.pending, s.rolled_back
        ));
        // `abandon` keeps the position (`finish` would fill the bar).
        self.main.abandon();
    }
}

enum Out {
    Quiet,
    Lines(Box<dyn Write + Send>),
    Bar(Bars),
}

struct Inner {
    state: State,
    out: Out,
}

/// Shows a run's progress; see the [module docs](self).
pub struct Progress {
    mode: Mode,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Progress {
    /// A display in `mode`, drawing on stderr.
    #[must_use]
    pub fn new(mode: Mode) -> Progress {
        match mode {
            Mode::Bar => Progress::bar(ProgressDrawTarget::stderr()),
            Mode::Lines => Progress::lines(io::stderr()),
            Mode::Quiet => Progress::with(Mode::Quiet, Out::Quiet),
        }
    }

    /// Plain lines into `out`.
    #[must_use]
    pub fn lines(out: impl Write + Send + 'static) -> Progress {
        Progress::with(Mode::Lines, Out::Lines(Box::new(out)))
    }

    /// The bar, drawn on `target` (`ProgressDrawTarget::stderr()` on a terminal; tests use
    /// `ProgressDrawTarget::term_like` or `hidden`).
    #[must_use]
    pub fn bar(target: ProgressDrawTarget) -> Progress {
        Progress::with(Mode::Bar, Out::Bar(Bars::new(target)))
    }

    fn with(mode: Mode, out: Out) -> Progress {
        Progress {
            mode,
            inner: Mutex::new(Inner {
                state: State::default(),
                out,
            }),
        }
    }

    /// The mode it shows the run in.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Prints a line of the tool's own (a preflight warning, a note) without breaking the bar:
    /// above the bar in [`Mode::Bar`], as a plain line in [`Mode::Lines`], not at all when quiet.
    pub fn println(&self, line: &str) {
        let mut inner = lock(&self.inner);
        match &mut inner.out {
            Out::Quiet => {}
            // A display that cannot write loses a line; the run goes on.
            Out::Lines(w) => {
                let _ = writeln!(w, "{line}");
            }
            Out::Bar(bars) => {
                let _ = bars.multi.println(line);
            }
        }
    }

    /// Ends the display: removes the node lines and leaves the bar's last state on screen.
    /// Call it when the run returns.
    pub fn finish(&self) {
        let mut inner = lock(&self.inner);
        let Inner { state, out } = &mut *inner;
        match out {
            Out::Quiet => {}
            Out::Lines(w) => {
                let _ = w.flush();
            }
            Out::Bar(bars) => bars.finish(state),
        }
    }
}

impl EventSink for Progress {
    fn emit(&self, event: &Event) {
        let mut inner = lock(&self.inner);
        let Inner { state, out } = &mut *inner;
        let line = state.apply(event);
        match out {
            Out::Quiet => {}
            Out::Lines(w) => {
                if let Some(line) = line {
                    let _ = writeln!(w, "{line}");
                }
            }
            Out::Bar(bars) => bars.show(state),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use indicatif::TermLike;

    fn node(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    /// A short run: two nodes, one drain refused by a budget, one rollback.
    fn events() -> Vec<Event> {
        let (a, b) = (node("worker-a"), node("worker-b"));
        vec![
            Event::RunStarted {
                nodes: 2,
                resumed: 0,
                at: Time(0),
            },
            Event::NodeStarted {
                node: a.clone(),
                at: Time(0),
            },
            Event::NodeStarted {
                node: b.clone(),
                at: Time(0),
            },
            Event::Progress {
                done: 0,
                rolled_back: 0,
                in_flight: 2,
                pending: 0,
                at: Time(0),
            },
            Event::Phase {
                node: a.clone(),
                from: Phase::Pending,
                to: Phase::Cordoned,
                at: Time(2_000),
            },
            Event::EvictionBlocked {
                node: a.clone(),
                pod: "shop/web-0".into(),
                pdb: "shop/web".into(),
                at: Time(5_000),
            },
            Event::Waiting {
                node: b.clone(),
                reason: "waiting for the Cilium agent to be Ready".into(),
                at: Time(61_000),
            },
            Event::NodeFinished {
                node: b.clone(),
                outcome: Phase::RolledBack,
                cause: Some("AgentReady: timed out after 300s".into()),
                at: Time(62_000),
            },
            Event::Progress {
                done: 0,
                rolled_back: 1,
                in_flight: 1,
                pending: 0,
                at: Time(62_000),
            },
            // The same minute: no second counts line.
            Event::Progress {
                done: 0,
                rolled_back: 1,
                in_flight: 1,
                pending: 0,
                at: Time(63_000),
            },
        ]
    }

    #[test]
    fn mode_rule() {
        assert_eq!(Mode::choose(false, false, false, true), Mode::Bar);
        assert_eq!(Mode::choose(true, false, false, true), Mode::Lines);
        assert_eq!(Mode::choose(false, false, true, true), Mode::Lines);
        assert_eq!(Mode::choose(false, false, false, false), Mode::Lines);
        assert_eq!(Mode::choose(true, true, true, false), Mode::Quiet);
        assert_eq!(Mode::choose(false, true, false, true), Mode::Quiet);
    }

    #[test]
    fn plain_lines_are_exact() {
        let buf = SharedBuf::default();
        let p = Progress::lines(buf.clone());
        for e in events() {
            p.emit(&e);
        }
        p.finish();
        let text = String::from_utf8(lock(&buf.0).clone()).unwrap();
        assert_eq!(
            text,
            "\
[0:00:00] run: 2 nodes (0 resumed)
[0:00:00] worker-a: started
[0:00:00] worker-b: started
[0:00:00] 0/2 done, 2 in flight, 0 pending, 0 rolled back
[0:00:02] worker-a: Pending -> Cordoned (0:00:02 in Pending)
[0:00:05] worker-a: drain blocked: evicting shop/web-0 refused by PodDisruptionBudget shop/web
[0:01:01] worker-b: Pending: waiting for the Cilium agent to be Ready
[0:01:02] worker-b: RolledBack: AgentReady: timed out after 300s
[0:01:02] 0/2 done, 1 in flight, 0 pending, 1 rolled back
"
        );
    }

    #[test]
    fn quiet_prints_nothing_and_keeps_no_bars() {
        let p = Progress::new(Mode::Quiet);
        for e in events() {
            p.emit(&e);
        }
        p.println("a note");
        p.finish();
        assert_eq!(p.mode(), Mode::Quiet);
    }

    #[test]
    fn node_lines_show_step_time_and_blocker() {
        let mut s = State::default();
        let evs = events();
        // Up to the blocked eviction and b's wait (before b rolls back).
        for e in &evs[..7] {
            s.apply(e);
        }
        let lines: Vec<String> = s.nodes.iter().map(|(n, f)| s.node_line(n, f)).collect();
        assert_eq!(
            lines,
            vec![
                "worker-a  Cordoned for 0:00:59  drain blocked: shop/web-0 refused by PDB shop/web",
                "worker-b  Pending for 0:01:01  waiting for the Cilium agent to be Ready",
            ]
        );
    }

    /// A terminal that records what indicatif writes to it.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<String>>);

    impl TermLike for Recorder {
        fn width(&self) -> u16 {
            160
        }
        fn move_cursor_up(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            let mut out = lock(&self.0);
            out.push_str(s);
            out.push('\n');
            Ok(())
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            lock(&self.0).push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bar_draws_counts_clock_and_nodes() {
        let term = Recorder::default();
        let p = Progress::bar(ProgressDrawTarget::term_like_with_hz(
            Box::new(term.clone()),
            100,
        ));
        assert_eq!(p.mode(), Mode::Bar);
        let evs = events();
        for e in &evs[..7] {
            p.emit(e);
            // Let the draw rate limit (100 per second, bursts of 20) refill between events.
            std::thread::sleep(std::time::Duration::from_millis(120));
        }
        let drawn = lock(&term.0).clone();
        assert!(
            drawn.contains("  worker-a  Cordoned for 0:00:59  drain blocked: shop/web-0 refused by PDB shop/web"),
            "{drawn}"
        );
        assert!(
            drawn.contains(
                "  worker-b  Pending for 0:01:01  waiting for the Cilium agent to be Ready"
            ),
            "{drawn}"
        );
        assert!(
            drawn.contains("[0:01:01] [")
                && drawn.contains("] 0/2 nodes done  2 in flight, 0 pending, 0 rolled back"),
            "{drawn}"
        );
        for e in &evs[7..] {
            p.emit(e);
            std::thread::sleep(std::time::Duration::from_millis(120));
        }
        p.finish();
        let drawn = lock(&term.0).clone();
        assert!(
            drawn.trim_end().ends_with(
                "[0:01:03] [===============>              ] 1/2 nodes done  1 in flight, 0 pending, 1 rolled back"
            ),
            "the finished bar shows half the nodes through, the node lines are gone: {drawn}"
        );
    }
}
