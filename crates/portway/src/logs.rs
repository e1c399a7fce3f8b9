//! Logging on stderr: text (coloured only for a person at a terminal) or JSON lines.

use std::ffi::OsStr;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines; coloured on a terminal unless NO_COLOR is set.
    #[default]
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

/// Set while a command keeps a status line at the bottom of the terminal (`portway http`
/// on stdout): every log line first erases it, so the two never share a line, and the
/// command redraws it below on its next tick.
pub static STATUS_LINE: AtomicBool = AtomicBool::new(false);

fn stderr_below_status_line() -> std::io::Stderr {
    if STATUS_LINE.load(Ordering::Relaxed) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\r\x1b[2K");
        let _ = out.flush();
    }
    std::io::stderr()
}

/// Installs the process's subscriber: `RUST_LOG` filters (default `info`, hickory's
/// per-query logs and iroh-util's per-pooled-connection ones at `warn`), everything goes
/// to stderr.
pub fn init(format: Format) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn,iroh_util=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr_below_status_line);
    match format {
        Format::Text => builder
            .with_ansi(ansi(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
        Format::Json => builder.json().flatten_event(true).init(),
    }
}

/// Colours only on a terminal, and not when `NO_COLOR` is set to anything but the empty
/// string (<https://no-color.org>): escape codes in a file or a log collector are noise.
fn ansi(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(ansi(true, None));
        assert!(!ansi(false, None), "a pipe or a file gets no escape codes");
        assert!(!ansi(true, Some(OsStr::new("1"))));
        assert!(
            ansi(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset (no-color.org)"
        );
        assert!(!ansi(false, Some(OsStr::new(""))));
    }
}
