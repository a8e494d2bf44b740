//! The process-group watchdog: a `shell` task's processes die with the
//! worker that started them, even when the worker dies by `kill -9`.
//!
//! # Why
//!
//! A `shell` program runs as the leader of its own process group, and the
//! handler kills that group on time-out or when its run is dropped. None of
//! that runs when the worker itself is killed outright (`kill -9`, the OOM
//! killer, a crash): the program would go on running, reparented to init,
//! while the task's lease lapses and another worker runs the next attempt —
//! the same task running twice at once, which Conveyor promises never
//! happens. Nothing inside a dead process can act, so something outside it
//! must.
//!
//! # How
//!
//! The first `shell` run of a worker process starts one small `sh` process,
//! in a process group of its own and deaf to `SIGHUP`/`SIGINT`/`SIGTERM`,
//! whose stdin is a pipe held only by the worker. The worker writes
//! `+ <pgid>` when a program starts and `- <pgid>` when its run ends. When
//! the worker dies, however it dies, the kernel closes its end of the pipe;
//! the watchdog reads end of file and sends `SIGKILL` to every group still
//! registered, then exits. A worker that exits normally closes the pipe the
//! same way, with no group left registered (every run's guard has already
//! killed or released its group).
//!
//! The pipe is close-on-exec, so the programs themselves never hold it open.
//! A plain `sh` needs nothing installed and costs one line written per
//! program started or ended; it is not in the program's group, so killing
//! a group never kills the watchdog.
//!
//! # The gate
//!
//! A program's process group is known only once the program is started,
//! so a worker killed between starting it and registering its group would
//! leave it running, unwatched. So the program is not started directly:
//! `/bin/sh` runs [`GATE`] in the new group, which waits for a `go` line
//! on stdin and only then `exec`s the program in its place (same process,
//! same group, the rest of stdin left for the program). The worker writes
//! `go` after the group is registered — a registration written to the
//! watchdog's pipe is read by it even if the worker dies the next instant.
//! A worker that dies before that closes the gate's stdin, and the gate
//! exits without running anything. The cost is one `sh` started per
//! program (about a millisecond).
//!
//! # Limits
//!
//! A program that ended successfully is unregistered, so helpers it left
//! in the background on purpose are not touched (as during the worker's
//! life). Without `/bin/sh` there is neither gate nor watchdog: `shell`
//! tasks still run, without this protection, and the worker says so once
//! in its log. With one, a program whose group cannot be registered (the
//! watchdog cannot be started: out of processes, memory or descriptors) is
//! not started at all: its gate is killed closed and the attempt fails as
//! transient, to be retried (thirty-fourth session; it used to run
//! unwatched). If the watchdog is
//! killed, the next `shell` run finds it gone and starts a new one before
//! its program runs; groups registered with the old one are then
//! unprotected until they end.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::unistd::Pid;

/// The watchdog's program: the registered process groups kept in a
/// string, and `SIGKILL` for each of them once stdin ends. A `-` removes
/// one registration of its group, not all: a run's late `-` for a group
/// number the kernel has since given another run (pids wrap) leaves that
/// run's `+` in place.
pub(crate) const SCRIPT: &str = r#"trap '' HUP INT TERM QUIT PIPE
groups=
while read -r op pgid; do
  case $op in
    +) groups="$groups $pgid" ;;
    -) kept= removed=
       for g in $groups; do
         if [ -z "$removed" ] && [ "$g" = "$pgid" ]; then removed=1; else kept="$kept $g"; fi
       done
       groups=$kept ;;
  esac
done
for g in $groups; do kill -s KILL -- "-$g" 2>/dev/null; done
"#;

/// The gate's program (see the module documentation): `"$@"` is the
/// task's command and arguments, never interpreted by the shell.
pub(crate) const GATE: &str = r#"IFS= read -r gate && [ "$gate" = go ] || exit 125
exec "$@""#;

/// The gate's `$0`, which its shell puts first in its own error messages.
pub(crate) const GATE_NAME: &str = "conveyor-shell";

/// What the worker writes to a gate once the program's group is watched.
pub(crate) const GATE_OPEN: &[u8] = b"go\n";

/// Whether programs can be started through the gate (there is a `/bin/sh`;
/// without one there is no watchdog either, and programs start directly).
pub(crate) fn gate_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| std::path::Path::new("/bin/sh").exists())
}

/// Why the gate could not `exec` the program, if that is how a gated
/// program ended: the shell's exit status 126 (found but not executable)
/// or 127 (not found), with its message naming itself on stderr. The
/// reason is the message without the shell's prefix.
pub(crate) fn exec_failure(code: Option<i32>, stderr: &[u8]) -> Option<String> {
    if !matches!(code, Some(126 | 127)) {
        return None;
    }
    let text = String::from_utf8_lossy(stderr);
    let line = text.trim().strip_prefix(GATE_NAME)?.strip_prefix(':')?;
    // dash: "conveyor-shell: 1: exec: prog: not found";
    // bash: "conveyor-shell: line 1: exec: prog: not found".
    let reason = line.split_once("exec: ").map_or(line, |(_, rest)| rest);
    let reason = reason.rsplit_once(": ").map_or(reason, |(_, why)| why);
    Some(reason.trim().to_owned())
}

/// The running watchdog: its process and the write end of its stdin.
pub(crate) struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

impl Watchdog {
    /// Start a watchdog process.
    pub(crate) fn spawn() -> io::Result<Watchdog> {
        // No environment: the watchdog needs none (its script uses only
        // the shell's builtins), and the worker's carries the broker's
        // and Redis's URLs, passwords included, which a task's program
        // could read from the watchdog's `/proc/<pid>/environ`.
        let mut child = Command::new("/bin/sh")
            .args(["-c", SCRIPT, "conveyor-group-watch"])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        match child.stdin.take() {
            Some(stdin) => Ok(Watchdog { child, stdin }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other("the watchdog started without its stdin"))
            }
        }
    }

    /// The watchdog's process id.
    #[cfg(test)]
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Tell the watchdog that `pgid` started (`'+'`) or ended (`'-'`).
    pub(crate) fn tell(&mut self, op: char, pgid: Pid) -> io::Result<()> {
        // One short line: a pipe takes it whole and at once unless the
        // watchdog stopped reading, so this does not block in practice.
        self.stdin
            .write_all(format!("{op} {}\n", pgid.as_raw()).as_bytes())
    }

    /// Close the pipe as a dying worker would, and wait for the watchdog to
    /// act and exit.
    #[cfg(test)]
    pub(crate) fn close_and_wait(self) -> io::Result<std::process::ExitStatus> {
        let Watchdog { mut child, stdin } = self;
        drop(stdin);
        child.wait()
    }
}

/// This process's watchdog, started by the first `shell` run.
static WATCHDOG: Mutex<Option<Watchdog>> = Mutex::new(None);
/// Whether "cannot start the watchdog" was logged already.
static SPAWN_FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// A process group registered with the watchdog; unregistered on drop.
pub(crate) struct Watched {
    pgid: Pid,
    slot: &'static Mutex<Option<Watchdog>>,
}

/// Register `pgid` with this process's watchdog (starting it if needed), so
/// that the group is killed if this process dies before the returned value
/// is dropped. An error when no watchdog could be started or told (the
/// failure to start is logged once).
pub(crate) fn watch(pgid: Pid) -> io::Result<Watched> {
    #[cfg(test)]
    if WATCH_REFUSED.with(std::cell::Cell::get) {
        return Err(io::Error::from_raw_os_error(nix::libc::EAGAIN));
    }
    watch_with(&WATCHDOG, pgid)
}

#[cfg(test)]
thread_local! {
    /// Set by a test: [`watch`] fails on this thread as if no watchdog could
    /// be started (out of processes).
    pub(crate) static WATCH_REFUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`watch`] with the watchdog kept in `slot`.
fn watch_with(slot: &'static Mutex<Option<Watchdog>>, pgid: Pid) -> io::Result<Watched> {
    let mut watchdog = slot.lock().unwrap_or_else(PoisonError::into_inner);
    // A watchdog found gone (killed since the last run) is replaced at
    // once, so the run that finds it gone is watched too.
    let mut last = io::Error::other("the watchdog could not be told");
    for _ in 0..2 {
        let running = match watchdog.as_mut() {
            Some(running) => running,
            None => match Watchdog::spawn() {
                Ok(started) => watchdog.insert(started),
                Err(e) => {
                    if !SPAWN_FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            "shell: cannot start the process-group watchdog (/bin/sh); gated \
                             programs are not started (their tasks are retried) until it can be"
                        );
                    }
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot start the watchdog: {e}"),
                    ));
                }
            },
        };
        match running.tell('+', pgid) {
            Ok(()) => return Ok(Watched { pgid, slot }),
            Err(e) => {
                tracing::warn!(
                    error = %e, pid = running.child.id(),
                    "shell: the process-group watchdog is gone; starting another"
                );
                retire(&mut watchdog);
                last = e;
            }
        }
    }
    Err(last)
}

/// Forget a watchdog that no longer reads its pipe (reaped if it has
/// exited), so that the next `shell` run starts another.
fn retire(slot: &mut Option<Watchdog>) {
    if let Some(mut dead) = slot.take() {
        let _ = dead.child.try_wait();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(watchdog) = slot.as_mut()
            && let Err(e) = watchdog.tell('-', self.pgid)
        {
            tracing::debug!(error = %e, "shell: the process-group watchdog is gone");
            retire(&mut slot);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::pid_gone;
    use std::time::{Duration, Instant};

    /// A program with a background helper, in a process group of its own:
    /// what a `shell` task looks like. Returns (leader, helper) pids.
    fn task_group() -> (Child, i32) {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 600 & echo $!; wait"])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        io::BufRead::read_line(
            &mut io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        (child, line.trim().parse().unwrap())
    }

    fn wait_gone(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if pid_gone(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn pgid_of(child: &Child) -> Pid {
        Pid::from_raw(i32::try_from(child.id()).unwrap())
    }

    #[test]
    fn an_exec_failure_is_told_from_a_program_exiting_126_or_127() {
        let dash = b"conveyor-shell: 1: exec: prog: not found\n";
        let bash = b"conveyor-shell: line 1: exec: /opt/x: Permission denied\n";
        assert_eq!(exec_failure(Some(127), dash).as_deref(), Some("not found"));
        assert_eq!(
            exec_failure(Some(126), bash).as_deref(),
            Some("Permission denied")
        );
        assert_eq!(exec_failure(Some(1), dash), None);
        assert_eq!(exec_failure(None, dash), None);
        assert_eq!(exec_failure(Some(127), b"prog: not found\n"), None);
        assert_eq!(exec_failure(Some(127), b""), None);
    }

    /// The watchdog starts with no environment: none of the worker's
    /// (its broker and Redis URLs) is there for a task's program to read
    /// from `/proc/<pid>/environ`.
    #[test]
    fn the_watchdog_carries_none_of_the_workers_environment() {
        let watchdog = Watchdog::spawn().unwrap();
        let environ = std::fs::read(format!("/proc/{}/environ", watchdog.pid())).unwrap();
        let status = watchdog.close_and_wait().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(
            std::env::vars_os().next().is_some(),
            "this test needs an environment to leave out"
        );
        let text = String::from_utf8_lossy(&environ);
        assert!(
            !text.contains("PATH="),
            "the watchdog's environment: {text}"
        );
    }

    #[test]
    fn when_the_pipe_closes_every_registered_group_is_killed_helpers_included() {
        let mut watchdog = Watchdog::spawn().unwrap();
        let (mut first, first_helper) = task_group();
        let (mut second, second_helper) = task_group();
        watchdog.tell('+', pgid_of(&first)).unwrap();
        watchdog.tell('+', pgid_of(&second)).unwrap();

        assert!(watchdog.close_and_wait().unwrap().success());

        assert!(first.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(
            second.wait().unwrap().code().is_none(),
            "killed by a signal"
        );
        assert!(wait_gone(first_helper), "helper {first_helper} survived");
        assert!(wait_gone(second_helper), "helper {second_helper} survived");
    }

    #[test]
    fn a_run_that_finds_the_watchdog_killed_starts_another_that_watches_it() {
        static SLOT: Mutex<Option<Watchdog>> = Mutex::new(None);
        let (mut earlier, _) = task_group();
        drop(watch_with(&SLOT, pgid_of(&earlier)).expect("watched"));
        let killed = {
            let mut slot = SLOT.lock().unwrap();
            let watchdog = slot.as_mut().expect("started by the first run");
            watchdog.child.kill().unwrap();
            watchdog.child.wait().unwrap();
            watchdog.pid()
        };
        let (mut group, helper) = task_group();
        let watched = watch_with(&SLOT, pgid_of(&group)).expect("watched by a new watchdog");
        let watchdog = SLOT.lock().unwrap().take().expect("a new watchdog");
        assert_ne!(watchdog.pid(), killed);
        // The worker dies: the new watchdog kills the group it registered.
        assert!(watchdog.close_and_wait().unwrap().success());
        assert!(group.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(wait_gone(helper), "helper {helper} survived");
        drop(watched);
        nix::sys::signal::killpg(pgid_of(&earlier), nix::sys::signal::Signal::SIGKILL).unwrap();
        earlier.wait().unwrap();
    }

    #[test]
    fn a_group_that_ended_its_run_is_left_alone() {
        let mut watchdog = Watchdog::spawn().unwrap();
        let (mut released, released_helper) = task_group();
        let (mut watched, watched_helper) = task_group();
        watchdog.tell('+', pgid_of(&released)).unwrap();
        watchdog.tell('+', pgid_of(&watched)).unwrap();
        watchdog.tell('-', pgid_of(&released)).unwrap();

        assert!(watchdog.close_and_wait().unwrap().success());

        assert!(watched.wait().unwrap().code().is_none());
        assert!(wait_gone(watched_helper));
        assert!(
            !pid_gone(released_helper),
            "the released group was killed too"
        );
        assert!(released.try_wait().unwrap().is_none(), "still running");
        nix::sys::signal::killpg(pgid_of(&released), nix::sys::signal::Signal::SIGKILL).unwrap();
        released.wait().unwrap();
    }

    /// A group number registered twice (an old run's, its pid since
    /// reused by a new run's group) stays watched after one `-`: the old
    /// run's late unregistration does not take the new run's away.
    #[test]
    fn one_end_unregisters_one_start_of_a_group_number() {
        let mut watchdog = Watchdog::spawn().unwrap();
        let (mut task, helper) = task_group();
        watchdog.tell('+', pgid_of(&task)).unwrap();
        watchdog.tell('+', pgid_of(&task)).unwrap();
        watchdog.tell('-', pgid_of(&task)).unwrap();

        assert!(watchdog.close_and_wait().unwrap().success());

        let gone = wait_gone(helper);
        if !gone {
            // Not left running (nor waited for) when the test fails.
            let _ = nix::sys::signal::killpg(pgid_of(&task), nix::sys::signal::Signal::SIGKILL);
        }
        assert!(gone, "helper {helper} survived: the group was unregistered");
        assert!(task.wait().unwrap().code().is_none(), "killed by a signal");
    }

    #[test]
    fn the_watchdog_ignores_the_signals_a_terminal_sends_its_worker() {
        let mut watchdog = Watchdog::spawn().unwrap();
        let (mut task, helper) = task_group();
        watchdog.tell('+', pgid_of(&task)).unwrap();
        let pid = Pid::from_raw(i32::try_from(watchdog.pid()).unwrap());
        // Give sh the moment it needs to run its first line, the `trap`.
        std::thread::sleep(Duration::from_millis(200));
        for signal in [
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::Signal::SIGHUP,
        ] {
            nix::sys::signal::kill(pid, signal).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pid_gone(pid.as_raw()), "the watchdog died of a signal");

        assert!(watchdog.close_and_wait().unwrap().success());
        assert!(task.wait().unwrap().code().is_none());
        assert!(wait_gone(helper));
    }
}
