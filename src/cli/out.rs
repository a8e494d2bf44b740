//! Writing a command's output. `println!` panics when stdout is a pipe
//! whose reader has gone (`conveyor list --json | head`): Rust ignores
//! SIGPIPE, so the write fails with `EPIPE`, and the command died with a
//! panic message and exit code 101. Written with [`out!`], that failure is
//! an error [`is_closed_pipe`] recognises, and `main` ends the command
//! quietly with 141, the code of a process SIGPIPE ended (what `head`'s
//! other writers show). Notes on stderr ([`note!`]) are dropped when
//! stderr is gone. SIGPIPE itself stays ignored: `run` and `dev` run
//! `shell` programs in this process and write their stdin, and a program
//! that never reads it must not end Conveyor.

/// `writeln!` to stdout: `Err` when it is closed (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
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

/// Whether `e` is (or was caused by) writing to a pipe with no reader.
pub fn is_closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let e = anyhow::Error::from(pipe).context("printing the status");
        assert!(is_closed_pipe(&e));
        let other = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(!is_closed_pipe(&other));
    }
}
