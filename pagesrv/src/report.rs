//! What a session shows while it runs (a progress bar on a terminal, a line every 2 s
//! otherwise) and the line it leaves when it ends.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use crate::session::{EventSink, Outcome, Session};

/// Events for orchestrators on the control socket (`--control`), if there is one, and the
/// figures the metrics endpoint (`--metrics-listen`) shows, if it runs.
#[derive(Debug, Clone, Default)]
pub struct Events {
    /// The control socket.
    pub control: Option<std::sync::Arc<common::control::ControlServer>>,
    /// The metrics endpoint's figures.
    pub metrics: Option<std::sync::Arc<crate::metrics::Published>>,
}

impl EventSink for Events {
    /// Sends `event` to every control client.
    fn emit(&self, event: serde_json::Value) {
        if let Some(control) = &self.control {
            control.emit(&event);
        }
    }

    /// Sends an event that marks a state (converged, switched, completed, failed): clients
    /// that connect later get it too.
    fn emit_sticky(&self, event: serde_json::Value) {
        if let Some(control) = &self.control {
            control.emit_sticky(&event);
        }
    }
}

/// Shows progress until `done` is dropped: a bar on a terminal, a line every 2 s otherwise;
/// with the metrics endpoint, publishes the session's figures every 100 ms too.
pub fn report_progress(
    session: &Session<'_>,
    published: Option<&crate::metrics::Published>,
    done: mpsc::Receiver<()>,
) {
    let total = session.total_pages();
    let publish = || {
        if let Some(published) = published {
            published.session(session);
        }
    };
    publish();
    let tick = |period| done.recv_timeout(period) == Err(mpsc::RecvTimeoutError::Timeout);
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} pages ({percent}%) {msg}",
            )
            .expect("static template"),
        );
        while tick(Duration::from_millis(100)) {
            publish();
            bar.set_position(session.pages_settled());
            bar.set_message(format!(
                "{} MiB sent",
                session.stats.bytes_sent.load(Ordering::Relaxed) >> 20
            ));
        }
        bar.finish_and_clear();
    } else {
        // A line every 2 s; with metrics, fresh figures every 100 ms between them.
        let ticks_per_line = if published.is_some() { 20 } else { 1 };
        let period = Duration::from_secs(2) / ticks_per_line;
        let mut ticks = 0u32;
        while tick(period) {
            publish();
            ticks += 1;
            if ticks.is_multiple_of(ticks_per_line) {
                log_progress(session, total);
            }
        }
    }
}

fn log_progress(session: &Session<'_>, total: u64) {
    let settled = session.pages_settled();
    info!(
        pages = settled,
        total,
        percent = settled * 100 / total.max(1),
        sent_mib = session.stats.bytes_sent.load(Ordering::Relaxed) >> 20,
        "progress"
    );
}

/// Prints one line about a finished session on stderr.
pub fn print_summary(session: &Session<'_>, outcome: &Outcome) {
    let s = &session.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let secs = session.elapsed().as_secs_f64();
    let bytes = get(&s.bytes_sent);
    // One write, so the line does not interleave with other processes' output.
    let line = format!(
        "pagesrv: session {}: vm {}, id {:016x}, {:.3} s, {} pages requested (urgent: {} data, {} zero), pushed {} data + {} zero pages, {} in precopy rounds ({} dropped as written again, {} 4 KiB pieces patched), {} held, {} in the destination's base, {} free (hinted), {} skipped, {} pushed first from the working set, {} on extra bulk connections, {:.1} MiB sent ({:.0} MiB/s)\n",
        match outcome {
            Outcome::Completed if session.verified() => "completed".to_string(),
            Outcome::Completed => {
                "completed (NOT verified: the destination skipped the digest check)".to_string()
            }
            Outcome::Failed(why) => format!("FAILED ({why})"),
            Outcome::Aborted(why) => format!("aborted ({why})"),
        },
        session.vm,
        session.id,
        secs,
        get(&s.requested_pages),
        get(&s.urgent_data_pages),
        get(&s.urgent_zero_pages),
        get(&s.pushed_data_pages),
        get(&s.pushed_zero_pages),
        get(&s.precopy_pages),
        get(&s.discarded_pages),
        get(&s.patched_pieces),
        get(&s.held_pages),
        get(&s.base_pages),
        get(&s.free_pages),
        get(&s.skipped_pages),
        session.prefetched_pages(),
        get(&s.extra_stream_pages),
        bytes as f64 / f64::from(1 << 20),
        bytes as f64 / f64::from(1 << 20) / secs.max(1e-9),
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}
