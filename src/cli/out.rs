//! Writing a command's output. `println!` panics when stdout is a pipe
//! whose reader has gone (`conveyor list --json | head`): Rust ignores
//! SIGPIPE, so the write fails with `EPIPE`, and the command died with a
//! panic message and exit code 101. Written with [`out!`], that failure is
//! an [`OutputClosed`] error, and `main` ends the command quietly with 141, the code of a process SIGPIPE ended (what `head`'s
//! other writers show). Notes on stderr ([`note!`]) are dropped when
//! stderr is gone. SIGPIPE itself stays ignored: `run` and `dev` run
//! `shell` programs in this process and write their stdin, and a program
//! that never reads it must not end Conveyor.

/// `writeln!` to stdout: `Err` when it fails, [`OutputClosed`] when its
/// reader has gone (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::out::closed_or_other)
    }};
}

/// `writeln!` to stderr, ignoring a stderr that is gone.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub(crate) use {note, out};

/// The exit code of a command whose output pipe closed: 128 + SIGPIPE.
pub const CLOSED_PIPE_EXIT: u8 = 141;

/// The command's stdout is a pipe whose reader has gone.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
pub struct OutputClosed;

/// A failed write to stdout as the command's error: [`OutputClosed`] for
/// a closed pipe (and only for stdout's: a `BrokenPipe` from anywhere
/// else is an error like any other).
pub fn closed_or_other(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(OutputClosed)
    } else {
        anyhow::Error::new(e).context("cannot write the output")
    }
}

/// Whether `e` is (or was caused by) [`OutputClosed`].
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<OutputClosed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stdouts_closed_pipe_is_recognised_through_context() {
        let pipe = || std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e = closed_or_other(pipe()).context("printing the status");
        assert!(is_closed_pipe(&e));
        let other = closed_or_other(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(!is_closed_pipe(&other));
        // A closed pipe met elsewhere (a program's stdin) is no stdout's.
        assert!(!is_closed_pipe(&anyhow::Error::from(pipe())));
    }
}
