//! `shell`: runs an outside program, JSON in and JSON out.
//!
//! It exists so that a task can be written in any language without writing
//! a Rust handler: a script reads its input as JSON on stdin and prints its
//! result as JSON on stdout, and its exit status says whether it worked.
//!
//! # Params
//!
//! ```json
//! {"command": "python3", "args": ["-m", "mytask"], "env": {"MODE": "fast"},
//!  "cwd": "/srv/tasks", "stdin": {"anything": "here"}}
//! ```
//!
//! - `command` (required, non-empty, at most 4096 bytes): the program, found
//!   on `PATH` like `execvp` (an executable file without `#!` runs under
//!   `sh`). There is **no shell interpretation**: to use pipes or `$VARS`,
//!   run `"command": "sh", "args": ["-c", "..."]`.
//! - `args` (at most 1000 strings, each of at most 131,071 bytes): its
//!   arguments.
//! - `env`: variables added to the worker's own environment, which the
//!   program inherits — except Conveyor's own settings (every
//!   `CONVEYOR_*` variable: the broker and Redis URLs carry passwords),
//!   which it never sees. Names starting with `CONVEYOR_` are refused here:
//!   the four below are the run's own. Names must be shell identifiers
//!   (`[A-Za-z_][A-Za-z0-9_]*`): the program starts through `/bin/sh` (see
//!   *Process group*), and dash, Debian's `sh`, passes on no other name —
//!   `spring.profiles.active` or `my-flag` would be accepted and never
//!   arrive; nor `_`, which bash sets to the program's path. The same goes for such names in the worker's own environment:
//!   they do not reach the program. Each `NAME=value` is at most 131,071
//!   bytes.
//! - `cwd`: the directory to run in (at most 4095 bytes); the worker's own
//!   by default.
//! - `stdin`: any JSON, written to the program's stdin as JSON. Without it
//!   (or with `null`, the same as leaving it out) the program gets
//!   `{"params": <these params>, "deps": {<task>: <result>}, "job_id": ...,
//!   "task": ..., "attempt": ...}`. Stdin is closed after the write, so the
//!   program sees end of file.
//!
//! The sizes are Linux's: it refuses to start a program with an argument or
//! environment string of 128 KiB or more counting its terminating NUL
//! (`E2BIG`), or in a directory whose path is 4096 bytes or more with its
//! NUL (`ENAMETOOLONG`). Such a task could never run; it is refused when
//! submitted.
//!
//! The program also finds its execution in its environment:
//! `CONVEYOR_JOB_ID`, `CONVEYOR_TASK`, `CONVEYOR_ATTEMPT` and
//! `CONVEYOR_FENCE` (the claim's fencing number), so a one-line `sh -c`
//! task can log or fence its side effects without parsing JSON.
//!
//! Unknown keys are rejected, so a misspelled `"arg"` is an error, not a
//! silently ignored setting.
//!
//! # Outcome
//!
//! | the program                        | the task                                  |
//! |------------------------------------|-------------------------------------------|
//! | exits 0, stdout is JSON            | done; stdout is the result                |
//! | exits 0, stdout empty / whitespace | done; the result is `null`                |
//! | exits 0, stdout not JSON           | permanent error quoting stdout's start    |
//! | exits 75 (`EX_TEMPFAIL`)           | **transient** error: retried with backoff |
//! | exits with any other non-zero code | permanent error with the stderr tail      |
//! | is killed by a signal              | transient error naming the signal         |
//! | outlives `ctx.timeout`             | transient error; process group killed     |
//! | writes more stdout than its limit  | permanent error; process group killed     |
//! | cannot be started                  | permanent error naming command and cause; |
//! |                                    | transient when out of processes, memory   |
//! |                                    | or file descriptors, or the file is busy  |
//!
//! Stdout's limit is four times the largest result the worker accepts
//! (`limits.max_result_bytes`, 1 MiB by default: 4 MiB), room for JSON
//! printed with indentation, and never more than 16 MiB. Until the
//! thirty-second session it was 16 MiB whatever the result limit, all read
//! and parsed (a dense array parses to about ten times its text) before the
//! worker refused a result over 1 MiB.
//!
//! Exit code 75 is `EX_TEMPFAIL` from `sysexits.h` ("temporary failure;
//! user is invited to retry"), the conventional way for a program to say
//! "try me again later" — the only way a script can ask for a retry. Every
//! other non-zero exit is taken as a bug or bad input that a retry will not
//! fix. A death by signal (the OOM killer, an operator's `kill`) is treated
//! as transient. Errors quote the last 4 KiB of stderr, so the script's own
//! diagnostics reach the job's status: at most 4096 bytes once made text,
//! cut at a character, with each byte that is not UTF-8 shown as `�`.
//!
//! # Process group
//!
//! The program runs as the leader of its own process group, and on time-out
//! — or when the `run` future is dropped, e.g. because the worker gave up on
//! the task or is shutting down — the whole group gets `SIGKILL`, not just
//! the program: a script's background helpers (`sleep 30 &`, a spawned
//! server) die with it instead of lingering on the worker host; so do
//! those left by a program that *failed* (a non-zero exit, a signal),
//! whose attempt may run again. Processes
//! left in the background after a *successful* exit are not touched. One
//! that holds the program's stdout or stderr open (started without
//! redirecting them) does not hold the task: the outputs are read on for a
//! second after the program exits, then what is left in the pipes is read
//! without waiting — all the program wrote, since it has exited — and its
//! exit status decides, with that output (until the thirty-fourth session
//! the task waited for the helper's end or its time-out, and a program that
//! had succeeded was failed as timed out, to run again). The same holds
//! for a program that exits just before its time-out. Such a helper
//! writing after that finds the pipe closed (`SIGPIPE`); send its output
//! elsewhere. (One holding stdin does not hold the task either: once both
//! outputs are closed and the program has exited, input it did not read is
//! dropped.)
//!
//! A descendant that leaves the group (`setsid`, `setpgid`: daemons, GNU
//! `timeout`, Python's `start_new_session`) is out of reach of all of
//! this: it outlives a time-out, a failure and the worker. Run such
//! programs with their own supervision (`timeout --foreground` stays in
//! the group).
//!
//! The group also dies when the worker process itself dies, even by
//! `kill -9`: a small watchdog process started with the first `shell` run
//! kills every group whose run had not ended once the worker's end of its
//! pipe closes (see `group_watch.rs`), so a lapsed lease never leaves the
//! old attempt running beside the new one. The program is started through
//! a gate (`sh` waiting for a `go` line on stdin before it `exec`s the
//! program) and the worker opens it only once the group is registered, so
//! a worker dying in between leaves nothing running.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_handler::{Handler, HandlerError, Outcome, TaskContext, ValidationError, described};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};

use crate::group_watch;

/// The longest `command` accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// The most `args` accepted.
pub const MAX_ARGS: usize = 1000;
/// The longest argument, and the longest environment entry (`NAME=value`),
/// accepted, in bytes. Linux's `MAX_ARG_STRLEN` (128 KiB, 131,072 bytes)
/// counts the terminating NUL, and `execve` refuses a longer string with
/// `E2BIG`: a task with one would fail at every attempt, so it is refused
/// when submitted.
pub const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
/// The longest `cwd` accepted, in bytes. Linux's `PATH_MAX` (4096) counts
/// the terminating NUL, and `chdir` refuses a longer path with
/// `ENAMETOOLONG`: the program could never start there.
pub const MAX_CWD_BYTES: usize = 4096 - 1;
/// The most stdout read whatever the result limit; a program writing more
/// fails permanently.
pub const MAX_STDOUT_BYTES: usize = 16 * 1024 * 1024;
/// How many bytes of stdout are read per byte of the largest result the
/// worker accepts: the result may come indented.
pub const STDOUT_PER_RESULT_BYTE: usize = 4;

/// The most stdout read from a program whose result may be at most
/// `max_result_bytes` bytes of compact JSON.
pub fn stdout_limit(max_result_bytes: usize) -> usize {
    max_result_bytes
        .saturating_mul(STDOUT_PER_RESULT_BYTE)
        .min(MAX_STDOUT_BYTES)
}
/// How much of the end of stderr is kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// `EX_TEMPFAIL` from `sysexits.h`: the exit code that asks for a retry.
pub const EX_TEMPFAIL: i32 = 75;

/// How long to wait for a killed process to be reaped before leaving it to
/// tokio's background reaper.
const REAP_GRACE: Duration = Duration::from_secs(5);
/// How long the outputs of a program that exited are read on while
/// something it left in the background holds them open.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// The most stderr read without waiting once the program has exited while
/// its outputs are held open: all a program can leave in a pipe (1 MiB,
/// Linux's default `pipe-max-size`), and not for ever from a helper that
/// writes on.
const STDERR_DRAIN_BYTES: usize = 1024 * 1024;
/// How much of a non-JSON stdout an error message quotes.
const STDOUT_QUOTE_BYTES: usize = 200;

const KEYS: [&str; 5] = ["command", "args", "env", "cwd", "stdin"];

/// The `shell` handler. See the module documentation for its params and
/// exit-status conventions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shell;

#[derive(Debug)]
struct ShellParams {
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    /// What the program reads on stdin; `None` — `params.stdin` absent or
    /// `null` — for the envelope (params, deps and where it runs).
    stdin: Option<Value>,
}

fn parse(params: &Value) -> Result<ShellParams, ValidationError> {
    let Some(obj) = params.as_object() else {
        return Err(ValidationError::new(
            "params",
            "must be an object like {\"command\": \"prog\", \"args\": [\"arg\"]}",
        ));
    };
    crate::reject_unknown_fields(obj, &KEYS)?;
    let command = parse_command(obj)?;
    let args = parse_args(obj)?;
    let env = parse_env(obj)?;
    let cwd = match obj.get("cwd") {
        None => None,
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_CWD_BYTES && !s.contains('\0') =>
        {
            Some(s.clone())
        }
        Some(v) => {
            return Err(ValidationError::new(
                "params.cwd",
                format!(
                    "must be a non-empty string of at most {MAX_CWD_BYTES} bytes without NUL \
                     bytes (Linux's limit on a path: 4096 with its NUL), got {}",
                    described(v)
                ),
            ));
        }
    };
    Ok(ShellParams {
        command,
        args,
        env,
        cwd,
        // `null` is no input of its own, as when absent: the envelope.
        stdin: obj.get("stdin").filter(|v| !v.is_null()).cloned(),
    })
}

fn parse_command(obj: &Map<String, Value>) -> Result<String, ValidationError> {
    let limit = format!("a non-empty string of at most {MAX_COMMAND_BYTES} bytes");
    match obj.get("command") {
        None => Err(ValidationError::new(
            "params.command",
            format!("is required: {limit}"),
        )),
        Some(Value::String(s))
            if !s.is_empty() && s.len() <= MAX_COMMAND_BYTES && !s.contains('\0') =>
        {
            Ok(s.clone())
        }
        Some(Value::String(s)) => Err(ValidationError::new(
            "params.command",
            format!("must be {limit} without NUL bytes, got {} bytes", s.len()),
        )),
        Some(v) => Err(ValidationError::new(
            "params.command",
            format!("must be {limit}, got {}", described(v)),
        )),
    }
}

fn parse_args(obj: &Map<String, Value>) -> Result<Vec<String>, ValidationError> {
    let Some(args) = obj.get("args") else {
        return Ok(Vec::new());
    };
    let Some(args) = args.as_array() else {
        return Err(ValidationError::new(
            "params.args",
            format!(
                "must be an array of at most {MAX_ARGS} strings, got {}",
                described(args)
            ),
        ));
    };
    if args.len() > MAX_ARGS {
        return Err(ValidationError::new(
            "params.args",
            format!("must have at most {MAX_ARGS} items, got {}", args.len()),
        ));
    }
    args.iter()
        .enumerate()
        .map(|(i, a)| match a {
            Value::String(s) if s.len() > MAX_ARG_BYTES => Err(ValidationError::new(
                format!("params.args[{i}]"),
                format!(
                    "must be a string of at most {MAX_ARG_BYTES} bytes (Linux's limit on one \
                     argument: 128 KiB with its NUL), got {}",
                    described(a)
                ),
            )),
            Value::String(s) if !s.contains('\0') => Ok(s.clone()),
            _ => Err(ValidationError::new(
                format!("params.args[{i}]"),
                format!("must be a string without NUL bytes, got {}", described(a)),
            )),
        })
        .collect()
}

/// Whether `name` is a shell identifier, `[A-Za-z_][A-Za-z0-9_]*`: the only
/// names dash (Debian's `/bin/sh`, through which programs start) passes on
/// in the environment of what it runs.
fn is_shell_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b == b'_' || b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric())
}

/// The prefix of Conveyor's own environment variables: the worker's
/// settings are not passed on, and the run's own are set by the handler.
const CONVEYOR_ENV: &str = "CONVEYOR_";

fn parse_env(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, ValidationError> {
    let Some(env) = obj.get("env") else {
        return Ok(BTreeMap::new());
    };
    let Some(env) = env.as_object() else {
        return Err(ValidationError::new(
            "params.env",
            format!("must be an object of string values, got {}", described(env)),
        ));
    };
    env.iter()
        .map(|(k, v)| {
            if !is_shell_identifier(k) {
                return Err(ValidationError::new(
                    format!("params.env.{k}"),
                    "variable names must be shell identifiers ([A-Za-z_][A-Za-z0-9_]*): the \
                     program starts through /bin/sh, which passes on only names of that form",
                ));
            }
            if k == "_" {
                // bash, the `/bin/sh` of some systems, sets it to the
                // program's path in what it runs: the value would be lost.
                return Err(ValidationError::new(
                    "params.env._",
                    "`_` is the shell's own (bash sets it to the program's path); choose \
                     another name",
                ));
            }
            if k.starts_with(CONVEYOR_ENV) {
                return Err(ValidationError::new(
                    format!("params.env.{k}"),
                    "names starting with CONVEYOR_ are the run's own (its job, task, attempt \
                     and fencing number)",
                ));
            }
            match v {
                // `NAME=value`.
                Value::String(s) if k.len() + 1 + s.len() > MAX_ARG_BYTES => {
                    Err(ValidationError::new(
                        format!("params.env.{k}"),
                        format!(
                            "NAME=value must be at most {MAX_ARG_BYTES} bytes (Linux's limit on \
                             one environment entry: 128 KiB with its NUL), got {} bytes",
                            k.len() + 1 + s.len()
                        ),
                    ))
                }
                Value::String(s) if !s.contains('\0') => Ok((k.clone(), s.clone())),
                _ => Err(ValidationError::new(
                    format!("params.env.{k}"),
                    format!("must be a string without NUL bytes, got {}", described(v)),
                )),
            }
        })
        .collect()
}

/// Why reading the program's output stopped before it exited.
enum Stop {
    StdoutTooLarge,
    Io(&'static str, io::Error),
}

/// Kills the program's process group when dropped while armed, so that a
/// `run` future dropped mid-flight takes the program's helpers down too.
/// Disarmed once the leader is reaped: its pid (and so the group id) may be
/// reused after that.
/// While it lives, the group is also registered with the process-group
/// watchdog (see [`crate::group_watch`]), which kills it if the worker
/// process dies before the run ends.
struct GroupGuard {
    pgid: Option<Pid>,
    armed: bool,
    _watched: Option<group_watch::Watched>,
}

impl GroupGuard {
    /// `SIGKILL` the group; whether the group is (now) gone or dying.
    fn kill(&self) -> bool {
        let Some(pgid) = self.pgid else {
            return false;
        };
        match killpg(pgid, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => true,
            Err(e) => {
                tracing::warn!(pgid = pgid.as_raw(), error = %e, "shell: killpg failed");
                false
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

/// Kill the program's whole group and reap the leader.
async fn kill_and_reap(guard: &mut GroupGuard, child: &mut Child) {
    if !guard.kill() {
        // No group to kill (pid unknown, or killpg refused): at least the
        // program itself.
        if let Err(e) = child.start_kill() {
            tracing::warn!(error = %e, "shell: cannot kill the program");
        }
    }
    match tokio::time::timeout(REAP_GRACE, child.wait()).await {
        Ok(Ok(_)) => guard.armed = false,
        Ok(Err(e)) => tracing::warn!(error = %e, "shell: cannot reap the killed program"),
        Err(_) => tracing::warn!("shell: the killed program was not reaped in time"),
    }
}

async fn write_stdin(mut stdin: ChildStdin, input: Vec<u8>) -> Result<(), Stop> {
    // A program that exits or closes stdin without reading all of it is not
    // an error here: its exit status tells how it went.
    if let Err(e) = stdin.write_all(&input).await {
        tracing::debug!(error = %e, "shell: writing stdin stopped");
    }
    drop(stdin);
    Ok(())
}

/// Read `stdout` to its end into `buf`, at most `limit` bytes of it. Into
/// the caller's buffer, so what was read is there when the reading is cut
/// short.
async fn read_capped(
    stdout: impl AsyncRead + Unpin,
    limit: usize,
    buf: &mut Vec<u8>,
) -> Result<(), Stop> {
    stdout
        .take((limit as u64).saturating_add(1))
        .read_to_end(buf)
        .await
        .map_err(|e| Stop::Io("stdout", e))?;
    if buf.len() > limit {
        return Err(Stop::StdoutTooLarge);
    }
    Ok(())
}

/// Read `stderr` to its end, keeping about its last `keep` bytes in
/// `tail` (at most twice that until [`trim_tail`]) and whether anything
/// before them was dropped.
async fn read_tail(mut stderr: impl AsyncRead + Unpin, keep: usize, tail: &mut (Vec<u8>, bool)) {
    let mut chunk = vec![0u8; 8192];
    loop {
        match stderr.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                tail.0.extend_from_slice(chunk.get(..n).unwrap_or_default());
                if tail.0.len() > 2 * keep {
                    trim_tail(tail, keep);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "shell: reading stderr stopped");
                break;
            }
        }
    }
}

/// Keep only the last `keep` bytes of `tail`, noting a cut. The cut moves
/// on past the continuation bytes of a UTF-8 character it would split (at
/// most three): a tail starting inside one would quote its broken start as
/// `�`.
fn trim_tail(tail: &mut (Vec<u8>, bool), keep: usize) {
    if tail.0.len() > keep {
        let at = tail.0.len() - keep;
        let inside = tail
            .0
            .get(at..)
            .unwrap_or_default()
            .iter()
            .take(3)
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        tail.0.drain(..at + inside);
        tail.1 = true;
    }
}

/// Read what is in `pipe` now into `sink`, without waiting: until it is
/// empty or at its end, or `cap` bytes were read. Straight from its
/// descriptor (non-blocking, as tokio opened it), not through tokio, whose
/// news of the pipe's readiness may lag behind the last writes: once the
/// program has exited, everything it wrote is in the pipe.
fn drain_now(pipe: impl AsFd, cap: usize, mut sink: impl FnMut(&[u8])) -> io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut read = 0;
    while read < cap {
        match nix::unistd::read(&pipe, &mut chunk) {
            Ok(0) | Err(Errno::EAGAIN) => break,
            Ok(n) => {
                sink(chunk.get(..n).unwrap_or_default());
                read += n;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Read what an exited program left in its outputs (see [`drain_now`]):
/// stdout up to its limit, past which it is too large, as when read
/// before; stderr up to [`STDERR_DRAIN_BYTES`], keeping its tail.
fn drain_outputs(
    (stdout, limit, out): (&impl AsFd, usize, &mut Vec<u8>),
    (stderr, tail): (&impl AsFd, &mut (Vec<u8>, bool)),
) -> Result<(), Stop> {
    let room = limit.saturating_add(1).saturating_sub(out.len());
    drain_now(stdout, room, |b| out.extend_from_slice(b)).map_err(|e| Stop::Io("stdout", e))?;
    if out.len() > limit {
        return Err(Stop::StdoutTooLarge);
    }
    let drained = drain_now(stderr, STDERR_DRAIN_BYTES, |b| {
        tail.0.extend_from_slice(b);
        if tail.0.len() > 2 * STDERR_TAIL_BYTES {
            trim_tail(tail, STDERR_TAIL_BYTES);
        }
    });
    if let Err(e) = drained {
        tracing::debug!(error = %e, "shell: reading stderr stopped");
    }
    trim_tail(tail, STDERR_TAIL_BYTES);
    Ok(())
}

/// Sleep until `grace` after `from` (for ever without one).
async fn sleep_after(from: Option<tokio::time::Instant>, grace: Duration) {
    match from {
        Some(from) => tokio::time::sleep_until(from + grace).await,
        None => std::future::pending().await,
    }
}

/// The stderr tail as text, at most [`STDERR_TAIL_BYTES`] bytes of it
/// (its end) once converted: each byte that is not UTF-8 becomes `�`, three
/// bytes, which would make 4 KiB of binary stderr 12 KiB of error message.
fn describe_tail((tail, truncated): &(Vec<u8>, bool)) -> String {
    let text = String::from_utf8_lossy(tail);
    let mut text = text.trim();
    let mut truncated = *truncated;
    if text.len() > STDERR_TAIL_BYTES {
        let mut at = text.len() - STDERR_TAIL_BYTES;
        while !text.is_char_boundary(at) {
            at += 1;
        }
        text = text.get(at..).unwrap_or_default().trim_start();
        truncated = true;
    }
    match (text.is_empty(), truncated) {
        (true, _) => "(empty)".to_owned(),
        (false, true) => format!("...{text}"),
        (false, false) => text.to_owned(),
    }
}

/// Make this process's `/proc/<pid>/environ` (and its other private
/// `/proc` files) readable by root alone, once, before the first program
/// starts: a program runs as the worker's user, and could otherwise read
/// the worker's environment, whose broker and Redis URLs carry passwords,
/// from its parent's `/proc` entry. (Its own environment is scrubbed of
/// them: see `run`.) Core dumps of the worker are off as a consequence.
/// The command line (`--amqp-url` given as a flag) stays world-readable,
/// and a program can still read the config file and the environments of
/// other programs (the same user's): the README says to pass secrets as
/// `CONVEYOR_*` variables, and how to keep them from untrusted jobs.
fn keep_environment_private() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "cannot make the worker's /proc entry private; a shell program can read its environment");
        }
    });
}

/// The command that starts `p`'s program, and whether it goes through the
/// watchdog's gate (see `group_watch.rs`): `sh` waiting for `go` on stdin
/// before it `exec`s the program, so that no program runs before its group
/// is watched.
fn command(p: &ShellParams) -> (Command, bool) {
    keep_environment_private();
    if group_watch::gate_available() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", group_watch::GATE, group_watch::GATE_NAME])
            .arg(&p.command);
        (cmd, true)
    } else {
        (Command::new(&p.command), false)
    }
}

/// Why a program could not start that passes: out of processes, memory or
/// file descriptors, or the file is being written. A missing or
/// non-executable program does not pass.
const TRANSIENT_START_ERRNOS: [Errno; 5] = [
    Errno::EAGAIN,
    Errno::ENOMEM,
    Errno::EMFILE,
    Errno::ENFILE,
    Errno::ETXTBSY,
];

/// The C library's words for `errno` (what a shell prints; nix's own
/// `desc` words some differently: "Try again" for "Resource temporarily
/// unavailable").
fn strerror(errno: Errno) -> String {
    let text = io::Error::from_raw_os_error(errno as i32).to_string();
    match text.rsplit_once(" (os error ") {
        Some((words, _)) => words.to_owned(),
        None => text,
    }
}

/// Whether a start the gate reports failed for `why` (the shell's words)
/// passes, as the same failure of a direct spawn would.
fn passes(why: &str) -> bool {
    TRANSIENT_START_ERRNOS.iter().any(|&e| strerror(e) == why)
}

fn spawn_error(p: &ShellParams, e: &io::Error) -> HandlerError {
    let transient = e
        .raw_os_error()
        .map(Errno::from_raw)
        .is_some_and(|errno| TRANSIENT_START_ERRNOS.contains(&errno));
    start_failure(p, e, transient)
}

/// "cannot start `command` [in `cwd`]: why".
fn start_failure(p: &ShellParams, why: &dyn std::fmt::Display, transient: bool) -> HandlerError {
    let place = match &p.cwd {
        Some(cwd) => format!(" in `{cwd}`"),
        None => String::new(),
    };
    let msg = format!("shell: cannot start `{}`{place}: {why}", p.command);
    if transient {
        HandlerError::Transient(msg)
    } else {
        HandlerError::Permanent(msg)
    }
}

fn outcome(
    command: &str,
    status: ExitStatus,
    stdout: &[u8],
    stderr: &(Vec<u8>, bool),
) -> Result<Outcome, HandlerError> {
    if status.success() {
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Outcome::Done(Value::Null));
        }
        return serde_json::from_slice(stdout)
            .map(Outcome::Done)
            .map_err(|e| {
                let head = stdout.get(..STDOUT_QUOTE_BYTES).unwrap_or(stdout);
                HandlerError::Permanent(format!(
                    "shell: stdout is not JSON: {e}; first {STDOUT_QUOTE_BYTES} bytes: {}",
                    String::from_utf8_lossy(head)
                ))
            });
    }
    let tail = describe_tail(stderr);
    match (status.code(), status.signal()) {
        (Some(code), _) => {
            let msg = format!("shell: `{command}` exited with status {code}; stderr tail: {tail}");
            if code == EX_TEMPFAIL {
                Err(HandlerError::Transient(msg))
            } else {
                Err(HandlerError::Permanent(msg))
            }
        }
        (None, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {sig}"));
            Err(HandlerError::Transient(format!(
                "shell: `{command}` was killed by {name}; stderr tail: {tail}"
            )))
        }
        (None, None) => Err(HandlerError::Transient(format!(
            "shell: `{command}` ended with {status}; stderr tail: {tail}"
        ))),
    }
}

#[async_trait]
impl Handler for Shell {
    fn name(&self) -> &str {
        "shell"
    }

    fn validate(&self, params: &Value) -> Result<(), ValidationError> {
        parse(params).map(|_| ())
    }

    async fn run(&self, ctx: TaskContext, params: Value) -> Result<Outcome, HandlerError> {
        let p = parse(&params).map_err(|e| HandlerError::permanent(format!("shell: {e}")))?;
        let (mut cmd, gated) = command(&p);
        // A gated program's stdin starts with the line that opens its gate,
        // written once the group is registered (just after the spawn).
        let mut input = if gated {
            group_watch::GATE_OPEN.to_vec()
        } else {
            Vec::new()
        };
        match &p.stdin {
            Some(stdin) => serde_json::to_writer(&mut input, stdin),
            None => serde_json::to_writer(
                &mut input,
                &json!({
                    "params": params,
                    "deps": ctx.deps,
                    "job_id": ctx.job_id,
                    "task": ctx.task,
                    "attempt": ctx.attempt,
                }),
            ),
        }
        .map_err(|e| HandlerError::permanent(format!("shell: cannot encode stdin: {e}")))?;
        // The worker's own settings stay with the worker: its broker and
        // Redis URLs carry passwords, and a program's stderr ends up in the
        // job's status.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with(CONVEYOR_ENV)) {
                cmd.env_remove(name);
            }
        }
        cmd.args(&p.args)
            .env("CONVEYOR_JOB_ID", &ctx.job_id)
            .env("CONVEYOR_TASK", &ctx.task)
            .env("CONVEYOR_ATTEMPT", ctx.attempt.to_string())
            .env("CONVEYOR_FENCE", ctx.fence.to_string())
            .envs(&p.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &p.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|e| spawn_error(&p, &e))?;
        let pid = child.id();
        let pgid = pid.and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        let watched = pgid.map(group_watch::watch);
        let mut guard = GroupGuard {
            pgid,
            armed: true,
            _watched: None,
        };
        match watched {
            Some(Ok(watched)) => guard._watched = Some(watched),
            // The gate is still closed: nothing of the task has run. Run
            // unwatched, a worker killed now would leave it running while
            // the next attempt runs elsewhere.
            Some(Err(e)) if gated => {
                kill_and_reap(&mut guard, &mut child).await;
                return Err(HandlerError::Transient(format!(
                    "shell: `{}` not started: its process group could not be \
                     registered with the watchdog that kills it if the worker dies ({e})",
                    p.command
                )));
            }
            _ => {}
        }
        tracing::debug!(
            job_id = %ctx.job_id, task = %ctx.task, command = %p.command, pid,
            "shell: started"
        );

        let (Some(stdin), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            kill_and_reap(&mut guard, &mut child).await;
            return Err(HandlerError::permanent(format!(
                "shell: `{}` started without its stdio pipes",
                p.command
            )));
        };

        let stdout_limit = stdout_limit(ctx.max_result_bytes);
        let mut out = Vec::new();
        let mut err = (Vec::new(), false);
        // Outside the timed part: a program that exited just before its
        // time-out, its outputs still held, is judged by its exit.
        let mut exited = None;
        // Whether both outputs were read to their end.
        let mut read_all = false;
        let finished = tokio::time::timeout(ctx.timeout, async {
            let write = write_stdin(stdin, input);
            tokio::pin!(write);
            // Written while read: a program that writes before it reads
            // never waits on us.
            let mut written = false;
            {
                let read = async {
                    tokio::try_join!(read_capped(&mut stdout, stdout_limit, &mut out), async {
                        read_tail(&mut stderr, STDERR_TAIL_BYTES, &mut err).await;
                        Ok(())
                    })
                };
                tokio::pin!(read);
                let mut held_from: Option<tokio::time::Instant> = None;
                loop {
                    // Unbiased: a helper writing on without pause keeps
                    // the reading ready, and polled first it would use up
                    // the task's budget every time, so that the exit and
                    // the grace were never seen. What the grace leaves in
                    // the pipes is read after (`drain_outputs`).
                    tokio::select! {
                        r = &mut read => {
                            r?;
                            read_all = true;
                            break;
                        }
                        w = &mut write, if !written => {
                            w?;
                            written = true;
                        }
                        status = child.wait(), if exited.is_none() => {
                            exited = Some(status.map_err(|e| Stop::Io("wait", e))?);
                            held_from = Some(tokio::time::Instant::now());
                        }
                        // The program exited and something it left in the
                        // background holds its stdout or stderr: its exit
                        // status stands (waiting for the helper's end, a
                        // finished program was taken for one timed out).
                        () = sleep_after(held_from, OUTPUT_GRACE), if held_from.is_some() => {
                            tracing::debug!(
                                job_id = %ctx.job_id, task = %ctx.task,
                                "shell: the program exited; its outputs are held open by a \
                                 process it left; not read further"
                            );
                            break;
                        }
                    }
                }
            }
            trim_tail(&mut err, STDERR_TAIL_BYTES);
            if let Some(status) = exited {
                return Ok::<_, Stop>(status);
            }
            // Both outputs closed. A program may still read on (its output
            // sent elsewhere): the writing goes on until it exits. Once it
            // has, input left unwritten has no reader of its own (a
            // background process that inherited stdin and never reads it
            // would otherwise hold a finished run until its time-out).
            let status = if written {
                child.wait().await
            } else {
                tokio::select! {
                    status = child.wait() => status,
                    w = &mut write => {
                        w?;
                        child.wait().await
                    }
                }
            }
            .map_err(|e| Stop::Io("wait", e))?;
            Ok::<_, Stop>(status)
        })
        .await;
        let finished = match (finished, exited) {
            (Err(_elapsed), Some(status)) => Ok(Ok(status)),
            (finished, _) => finished,
        };
        // The program exited, and the reading stopped before the ends of
        // its outputs (held open by a process it left, or its time-out came
        // first): all it wrote is in the pipes by now, and is read before
        // its output is judged — a result cut short would fail a program
        // that succeeded (stdout is not JSON), or pass as `null`.
        let finished = match finished {
            Ok(Ok(status)) if !read_all => Ok(drain_outputs(
                (&stdout, stdout_limit, &mut out),
                (&stderr, &mut err),
            )
            .map(|()| status)),
            finished => finished,
        };

        match finished {
            Ok(Ok(status)) => {
                trim_tail(&mut err, STDERR_TAIL_BYTES);
                let (stdout, stderr) = (out, err);
                // A program that failed takes its background helpers with
                // it: its attempt may run again (or another task be retried
                // after it), and must not run beside what the failed one
                // left. (The group outlives its reaped leader only while a
                // member is left, so the number names no other group.)
                if !status.success() {
                    guard.kill();
                }
                guard.armed = false;
                if gated && let Some(why) = group_watch::exec_failure(status.code(), &stderr.0) {
                    // As from a direct spawn (the shell says strerror's
                    // words): a program being written, or a host out of
                    // processes, memory or file descriptors, passes.
                    let transient = passes(&why);
                    return Err(start_failure(&p, &why, transient));
                }
                tracing::debug!(
                    job_id = %ctx.job_id, task = %ctx.task, command = %p.command, %status,
                    "shell: finished"
                );
                outcome(&p.command, status, &stdout, &stderr)
            }
            Ok(Err(Stop::StdoutTooLarge)) => {
                kill_and_reap(&mut guard, &mut child).await;
                Err(HandlerError::Permanent(format!(
                    "shell: `{}` wrote more than {stdout_limit} bytes to stdout (the limit: \
                     {STDOUT_PER_RESULT_BYTE} × limits.max_result_bytes, at most \
                     {MAX_STDOUT_BYTES}); process group killed",
                    p.command,
                )))
            }
            Ok(Err(Stop::Io(what, e))) => {
                kill_and_reap(&mut guard, &mut child).await;
                Err(HandlerError::Transient(format!(
                    "shell: `{}`: {what} failed: {e}; process group killed",
                    p.command
                )))
            }
            Err(_elapsed) => {
                tracing::warn!(
                    job_id = %ctx.job_id, task = %ctx.task, command = %p.command, pid,
                    timeout = ?ctx.timeout, "shell: timed out; killing its process group"
                );
                kill_and_reap(&mut guard, &mut child).await;
                // What it said before it was stopped, often why it hung.
                trim_tail(&mut err, STDERR_TAIL_BYTES);
                let said = if err.0.is_empty() {
                    String::new()
                } else {
                    format!("; stderr tail: {}", describe_tail(&err))
                };
                Err(HandlerError::Transient(format!(
                    "shell: `{}` timed out after {}s; process group killed{said}",
                    p.command,
                    ctx.timeout.as_secs_f64()
                )))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{pid_gone, test_ctx};
    use std::path::PathBuf;
    use std::time::Instant;

    fn sh(script: &str) -> Value {
        json!({"command": "sh", "args": ["-c", script]})
    }

    async fn run(params: Value) -> Result<Outcome, HandlerError> {
        Shell.validate(&params).unwrap();
        Shell.run(test_ctx(1), params).await
    }

    fn temp_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "conveyor-shell-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    /// Reads the pid the script wrote, waiting for it to appear.
    async fn read_pid(path: &PathBuf) -> i32 {
        for _ in 0..100 {
            if let Ok(s) = std::fs::read_to_string(path)
                && let Ok(pid) = s.trim().parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no pid in {}", path.display());
    }

    async fn assert_gone_within_2s(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pid_gone(pid) {
            assert!(Instant::now() < deadline, "grandchild {pid} still alive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Once a program has started, the worker's `/proc` entry is private
    /// (not dumpable): a program running as the same user cannot read the
    /// worker's environment from its parent's `/proc/<pid>/environ`.
    #[tokio::test]
    async fn a_program_started_leaves_the_workers_environment_private() {
        let out = run(sh("echo '{}'")).await;
        assert_eq!(out, Ok(Outcome::Done(json!({}))));
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }

    #[tokio::test]
    async fn echoes_given_stdin_as_json() {
        let mut params = sh("cat");
        params["stdin"] = json!({"x": [1, 2, {"y": "z"}]});
        let out = run(params).await;
        assert_eq!(out, Ok(Outcome::Done(json!({"x": [1, 2, {"y": "z"}]}))));
    }

    /// A program that exits without reading its input, leaving a
    /// background process that inherited its stdin (and never reads it):
    /// once both outputs are closed and the program has exited, the run is
    /// over, with the program's result, not held until its time-out by an
    /// input larger than the pipe's buffer that nobody will read.
    #[tokio::test]
    async fn input_nobody_reads_does_not_hold_a_finished_run() {
        let mut params = sh("exec 3<&0; sleep 10 <&3 >/dev/null 2>&1 3<&- & echo '{}'");
        params["stdin"] = json!("x".repeat(300_000));
        Shell.validate(&params).unwrap();
        let mut ctx = test_ctx(1);
        ctx.timeout = Duration::from_secs(5);
        let out = Shell.run(ctx, params).await;
        assert_eq!(out, Ok(Outcome::Done(json!({}))));
    }

    #[tokio::test]
    async fn default_stdin_is_the_envelope() {
        let params = sh("cat");
        let mut ctx = test_ctx(2);
        ctx.deps.insert("prev".to_owned(), json!({"n": 1}));
        let out = Shell.run(ctx, params.clone()).await;
        assert_eq!(
            out,
            Ok(Outcome::Done(json!({
                "params": params,
                "deps": {"prev": {"n": 1}},
                "job_id": "job-test",
                "task": "task-test",
                "attempt": 2,
            })))
        );
    }

    /// `null` is no input of its own: the program reads the envelope, as
    /// with no `stdin` at all, not `null`.
    #[tokio::test]
    async fn a_null_stdin_is_the_envelope_as_when_absent() {
        let mut params = sh("cat");
        params["stdin"] = Value::Null;
        let out = run(params.clone()).await;
        assert_eq!(
            out,
            Ok(Outcome::Done(json!({
                "params": params,
                "deps": {},
                "job_id": "job-test",
                "task": "task-test",
                "attempt": 1,
            })))
        );
    }

    #[tokio::test]
    async fn env_and_cwd_are_applied() {
        let mut params = sh(r#"printf '{"v":"%s","d":"%s"}' "$FOO" "$(pwd)""#);
        params["env"] = json!({"FOO": "bar baz"});
        params["cwd"] = json!("/");
        let out = run(params).await;
        assert_eq!(out, Ok(Outcome::Done(json!({"v": "bar baz", "d": "/"}))));
    }

    #[tokio::test]
    async fn the_execution_is_in_the_environment() {
        let params = sh(
            r#"printf '["%s","%s","%s","%s"]' "$CONVEYOR_JOB_ID" "$CONVEYOR_TASK" "$CONVEYOR_ATTEMPT" "$CONVEYOR_FENCE""#,
        );
        let out = run(params).await;
        let Ok(Outcome::Done(Value::Array(v))) = out else {
            panic!("expected an array, got {out:?}");
        };
        assert_eq!(v[0], json!("job-test"));
        assert_eq!(v[1], json!("task-test"));
        assert!(v[2].as_str().is_some_and(|a| a.parse::<u32>().is_ok()));
        assert!(v[3].as_str().is_some_and(|f| f.parse::<u64>().is_ok()));
    }

    #[tokio::test]
    async fn empty_stdout_is_null() {
        assert_eq!(run(sh("echo '  '")).await, Ok(Outcome::Done(Value::Null)));
    }

    #[tokio::test]
    async fn non_json_stdout_is_permanent() {
        let out = run(sh("echo hello world")).await;
        let Err(HandlerError::Permanent(msg)) = out else {
            panic!("expected a permanent error, got {out:?}");
        };
        assert!(msg.starts_with("shell: stdout is not JSON: "), "{msg}");
        assert!(msg.contains("first 200 bytes: hello world"), "{msg}");
    }

    #[tokio::test]
    async fn exit_3_is_permanent_with_stderr_tail() {
        let out = run(sh("echo 'disk on fire' >&2; exit 3")).await;
        assert_eq!(
            out,
            Err(HandlerError::Permanent(
                "shell: `sh` exited with status 3; stderr tail: disk on fire".to_owned()
            ))
        );
    }

    #[tokio::test]
    async fn stderr_tail_keeps_only_the_end() {
        let out = run(sh(
            "head -c 10000 /dev/zero | tr '\\0' a >&2; echo END >&2; exit 3",
        ))
        .await;
        let Err(HandlerError::Permanent(msg)) = out else {
            panic!("expected a permanent error, got {out:?}");
        };
        assert!(msg.ends_with("aaaaEND"), "{msg}");
        assert!(msg.contains("stderr tail: ...aaa"), "{msg}");
        assert!(msg.len() < STDERR_TAIL_BYTES + 100, "{}", msg.len());
    }

    /// A tail cut inside a UTF-8 character starts at the next one, not
    /// with a `�` for the character's broken end.
    #[tokio::test]
    async fn a_stderr_tail_cut_inside_a_character_starts_at_the_next_one() {
        // 5,000 two-byte `é` and an `X`: the last 4096 bytes would start
        // in the middle of an `é`.
        let out = run(sh(
            "yes é | head -n 5000 | tr -d '\\n' >&2; printf X >&2; exit 3",
        ))
        .await;
        let Err(HandlerError::Permanent(msg)) = out else {
            panic!("expected a permanent error, got {out:?}");
        };
        let tail = msg.split_once("stderr tail: ...").unwrap().1;
        assert!(!tail.contains('\u{FFFD}'), "{tail}");
        assert!(tail.starts_with("éé") && tail.ends_with("éX"), "{tail}");
        assert!(tail.len() <= STDERR_TAIL_BYTES, "{}", tail.len());
    }

    /// Each byte of stderr that is not UTF-8 becomes a three-byte `�`:
    /// the tail is bounded once made text, not before (4 KiB of binary
    /// stderr made 12 KiB of error message).
    #[tokio::test]
    async fn a_binary_stderr_tail_stays_within_its_limit_once_made_text() {
        let out = run(sh("head -c 10000 /dev/zero | tr '\\0' '\\377' >&2; exit 3")).await;
        let Err(HandlerError::Permanent(msg)) = out else {
            panic!("expected a permanent error, got {out:?}");
        };
        let tail = msg.split_once("stderr tail: ...").unwrap().1;
        assert!(tail.chars().all(|c| c == '\u{FFFD}'), "{tail}");
        assert!(tail.len() <= STDERR_TAIL_BYTES, "{}", tail.len());
        assert!(tail.len() > STDERR_TAIL_BYTES - 3, "{}", tail.len());
    }

    #[tokio::test]
    async fn exit_75_is_transient() {
        let out = run(sh("echo 'try later' >&2; exit 75")).await;
        assert_eq!(
            out,
            Err(HandlerError::Transient(
                "shell: `sh` exited with status 75; stderr tail: try later".to_owned()
            ))
        );
    }

    #[tokio::test]
    async fn killed_by_signal_is_transient() {
        let out = run(sh("kill -TERM $$")).await;
        assert!(
            matches!(&out, Err(HandlerError::Transient(m)) if m.contains("killed by SIGTERM")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn missing_command_is_permanent() {
        let out = run(json!({"command": "conveyor-no-such-program-xyz"})).await;
        assert_eq!(
            out,
            Err(HandlerError::Permanent(
                "shell: cannot start `conveyor-no-such-program-xyz`: not found".to_owned()
            ))
        );
    }

    #[tokio::test]
    async fn a_missing_cwd_is_permanent_and_named() {
        let out = run(json!({"command": "true", "cwd": "/conveyor/no/such/dir"})).await;
        assert!(
            matches!(&out, Err(HandlerError::Permanent(m))
                if m.starts_with("shell: cannot start `true` in `/conveyor/no/such/dir`: ")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_executable_is_permanent() {
        let file = temp_path("noexec");
        std::fs::write(&file, "echo hi\n").unwrap();
        let out = run(json!({"command": file.to_str().unwrap()})).await;
        let _ = std::fs::remove_file(&file);
        assert_eq!(
            out,
            Err(HandlerError::Permanent(format!(
                "shell: cannot start `{}`: Permission denied",
                file.display()
            )))
        );
    }

    #[tokio::test]
    async fn a_program_exiting_127_itself_is_not_taken_for_a_missing_one() {
        let out = run(sh("echo 'conveyor: nothing to do' >&2; exit 127")).await;
        assert_eq!(
            out,
            Err(HandlerError::Permanent(
                "shell: `sh` exited with status 127; stderr tail: conveyor: nothing to do"
                    .to_owned()
            ))
        );
    }

    /// The gate holds the program back until the worker says `go`: a
    /// worker that dies first (its end of stdin closes) leaves nothing
    /// running, not even briefly, whether or not the group was watched.
    #[tokio::test]
    async fn a_program_does_not_start_before_the_worker_opens_its_gate() {
        let marker = temp_path("gate");
        let params = parse(&sh(&format!("touch '{}'", marker.display()))).unwrap();
        let (mut cmd, gated) = command(&params);
        assert!(gated, "/bin/sh is on every machine this runs on");
        cmd.args(&params.args)
            .stdin(Stdio::piped())
            .process_group(0);
        let mut closed = cmd.spawn().unwrap();
        drop(closed.stdin.take());
        let status = closed.wait().await.unwrap();
        assert_eq!(status.code(), Some(125));
        assert!(!marker.exists(), "the program ran without a go");

        // The same, opened: the program runs, in the gate's process.
        let (mut cmd, _) = command(&params);
        cmd.args(&params.args)
            .stdin(Stdio::piped())
            .process_group(0);
        let mut opened = cmd.spawn().unwrap();
        let mut stdin = opened.stdin.take().unwrap();
        stdin.write_all(group_watch::GATE_OPEN).await.unwrap();
        drop(stdin);
        assert!(opened.wait().await.unwrap().success());
        assert!(marker.exists(), "the program did not run after go");
        let _ = std::fs::remove_file(&marker);
    }

    #[tokio::test]
    async fn too_much_stdout_is_permanent() {
        let start = Instant::now();
        let out = run(json!({"command": "yes"})).await;
        assert!(
            matches!(&out, Err(HandlerError::Permanent(m))
                if m.contains("more than 4194304 bytes to stdout")),
            "{out:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    /// Stdout may be four times the result limit (an indented result),
    /// and no more: read past it, the output would be parsed whole only
    /// for the worker to refuse the result. (Until the thirty-second
    /// session the limit was 16 MiB whatever the result limit.)
    #[tokio::test]
    async fn stdout_may_be_four_times_the_result_limit_and_no_more() {
        let printing = |string_bytes: usize| {
            sh(&format!(
                "printf '\"'; head -c {string_bytes} /dev/zero | tr '\\0' a; printf '\"'"
            ))
        };
        let ctx = TaskContext {
            max_result_bytes: 1000,
            ..test_ctx(1)
        };
        // 4,000 bytes of JSON: a string of 3,998 `a`s in quotes.
        let at_limit = Shell.run(ctx.clone(), printing(3_998)).await;
        assert!(
            matches!(&at_limit, Ok(Outcome::Done(Value::String(a))) if a.len() == 3_998),
            "{at_limit:?}"
        );
        let over = Shell.run(ctx, printing(3_999)).await;
        assert!(
            matches!(&over, Err(HandlerError::Permanent(m))
                if m.contains("more than 4000 bytes to stdout")),
            "{over:?}"
        );
        assert_eq!(stdout_limit(usize::MAX), MAX_STDOUT_BYTES);
    }

    /// A result far larger than a pipe holds, written by a program that
    /// exits at once, is read and parsed whole — also when a helper it
    /// left holds its stdout open and its time-out comes before the
    /// output grace ends: what it wrote is read to the last byte before it
    /// is judged.
    #[tokio::test]
    async fn a_large_result_is_parsed_whole() {
        let printing = "printf '\"'; head -c 2000000 /dev/zero | tr '\\0' a; printf '\"'";
        let whole = |out: &Result<Outcome, HandlerError>| match out {
            Ok(Outcome::Done(Value::String(a))) => a.len() == 2_000_000,
            _ => false,
        };
        let short = |out: &Result<Outcome, HandlerError>| match out {
            Ok(Outcome::Done(Value::String(a))) => format!("a string of {} bytes", a.len()),
            other => format!("{other:?}"),
        };
        let out = run(sh(printing)).await;
        assert!(whole(&out), "{}", short(&out));

        let file = temp_path("large");
        let mut ctx = test_ctx(1);
        // It exits after about a second; the time-out comes within the
        // second of grace after that.
        ctx.timeout = Duration::from_millis(1_800);
        let params = sh(&format!(
            "sleep 30 & echo $! > '{}'; {printing}; sleep 1",
            file.display()
        ));
        let out = Shell.run(ctx, params).await;
        let helper = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        let _ = nix::sys::signal::kill(Pid::from_raw(helper), Signal::SIGKILL);
        assert!(whole(&out), "{}", short(&out));
    }

    /// Once the program has exited, all it wrote is in its pipes: read
    /// straight from them, whatever tokio has heard of, and without
    /// waiting for a helper holding them open. Stdout past its limit is
    /// too large, as when read before.
    #[tokio::test]
    async fn what_an_exited_program_left_in_its_pipes_is_read_without_waiting() {
        let spawn = |script: &str| {
            Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut child = spawn("sleep 30 & printf '{\"ok\": 1}'; printf oops >&2");
        let pgid = Pid::from_raw(child.id().unwrap() as i32);
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        assert!(child.wait().await.unwrap().success());
        let (mut out, mut err) = (Vec::new(), (Vec::new(), false));
        let start = Instant::now();
        let drained = drain_outputs((&stdout, 100, &mut out), (&stderr, &mut err));
        let _ = killpg(pgid, Signal::SIGKILL);
        assert!(matches!(drained, Ok(())));
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(out, br#"{"ok": 1}"#);
        assert_eq!(err, (b"oops".to_vec(), false));

        let mut child = spawn("printf 123456");
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        assert!(child.wait().await.unwrap().success());
        let mut out = Vec::new();
        let drained = drain_outputs((&stdout, 5, &mut out), (&stderr, &mut (Vec::new(), false)));
        assert!(matches!(drained, Err(Stop::StdoutTooLarge)));
    }

    /// A program that exits while a helper it left holds its stdout open
    /// is judged by its exit status and what it wrote, not held until its
    /// time-out (which failed a program that had succeeded as timed out).
    #[tokio::test]
    async fn a_program_whose_helper_holds_its_output_is_judged_when_it_exits() {
        let file = temp_path("held");
        let mut ctx = test_ctx(1);
        ctx.timeout = Duration::from_secs(30);
        let params = sh(&format!(
            "sleep 30 & echo $! > '{}'; echo '{{\"ok\": 1}}'",
            file.display()
        ));
        let out = Shell.run(ctx.clone(), params.clone()).await;
        let helper = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        // Left alone after a success, as documented: stopped here.
        let _ = nix::sys::signal::kill(Pid::from_raw(helper), Signal::SIGKILL);
        assert_eq!(out, Ok(Outcome::Done(json!({"ok": 1}))));

        // Exited just before its time-out, within the grace: its exit
        // still decides.
        let mut short = ctx.clone();
        short.timeout = Duration::from_millis(500);
        let out = Shell.run(short, params).await;
        let helper = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        let _ = nix::sys::signal::kill(Pid::from_raw(helper), Signal::SIGKILL);
        assert_eq!(out, Ok(Outcome::Done(json!({"ok": 1}))));

        let params = sh(&format!(
            "sleep 30 & echo $! > '{}'; echo broke >&2; exit 3",
            file.display()
        ));
        let out = Shell.run(ctx, params).await;
        let helper = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        match out {
            Err(HandlerError::Permanent(e)) => assert!(e.contains("broke"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_gone_within_2s(helper).await;
    }

    #[tokio::test]
    async fn a_time_out_quotes_what_the_program_said_before() {
        let mut ctx = test_ctx(1);
        ctx.timeout = Duration::from_millis(300);
        let out = Shell
            .run(ctx, sh("echo stuck-on-the-lock >&2; sleep 30"))
            .await;
        match out {
            Err(HandlerError::Transient(e)) => assert!(
                e.ends_with("process group killed; stderr tail: stuck-on-the-lock"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn time_out_kills_the_whole_group() {
        let file = temp_path("timeout");
        let params = sh(&format!("sleep 30 & echo $! > '{}'; wait", file.display()));
        let mut ctx = test_ctx(1);
        ctx.timeout = Duration::from_millis(300);
        let start = Instant::now();
        let out = Shell.run(ctx, params).await;
        let elapsed = start.elapsed();
        assert_eq!(
            out,
            Err(HandlerError::Transient(
                "shell: `sh` timed out after 0.3s; process group killed".to_owned()
            ))
        );
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        let pid = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        assert_gone_within_2s(pid).await;
    }

    #[tokio::test]
    async fn a_program_that_fails_takes_its_background_helpers_with_it() {
        for (name, exit) in [("fails-75", "exit 75"), ("fails-1", "exit 1")] {
            let file = temp_path(name);
            let params = sh(&format!(
                "sleep 30 >/dev/null 2>&1 </dev/null & echo $! > '{}'; {exit}",
                file.display()
            ));
            assert!(run(params).await.is_err());
            let pid = read_pid(&file).await;
            let _ = std::fs::remove_file(&file);
            assert_gone_within_2s(pid).await;
        }
    }

    /// A program whose group the watchdog cannot be told of is never
    /// started (a worker killed meanwhile would leave it running beside
    /// the next attempt): the attempt fails as transient, and its gate is
    /// gone.
    #[tokio::test]
    async fn a_program_the_watchdog_cannot_watch_is_not_started() {
        if !group_watch::gate_available() {
            panic!("this test needs /bin/sh");
        }
        let file = temp_path("unwatched");
        let params = sh(&format!("echo $$ > '{}'", file.display()));
        group_watch::WATCH_REFUSED.with(|refused| refused.set(true));
        let refused = run(params.clone()).await;
        group_watch::WATCH_REFUSED.with(|refused| refused.set(false));
        match refused {
            Err(HandlerError::Transient(e)) => {
                assert!(e.contains("not started") && e.contains("watchdog"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!file.exists(), "the program ran");
        // The same program, watched, runs.
        run(params).await.unwrap();
        assert!(file.exists());
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_start_failure_through_the_gate_passes_as_a_direct_spawns_would() {
        assert_eq!(strerror(Errno::EAGAIN), "Resource temporarily unavailable");
        assert_eq!(strerror(Errno::ENOMEM), "Cannot allocate memory");
        for (why, transient) in [
            ("Cannot allocate memory", true),
            ("Too many open files in system", true),
            ("Text file busy", true),
            ("Permission denied", false),
        ] {
            let gated = group_watch::exec_failure(
                Some(126),
                format!("conveyor-shell: 1: exec: x: {why}\n").as_bytes(),
            )
            .unwrap();
            assert_eq!(passes(&gated), transient, "{why}");
        }
    }

    /// dash, the `/bin/sh` programs start through, drops from the
    /// environment every name that is not a shell identifier: such a name
    /// would be accepted and never reach the program.
    #[test]
    fn an_env_name_that_is_not_a_shell_identifier_is_refused() {
        for name in [
            "spring.profiles.active",
            "my-flag",
            "1ST",
            "",
            "A=B",
            "É",
            "A B",
        ] {
            let e = Shell
                .validate(&json!({"command": "true", "env": {name: "x"}}))
                .unwrap_err();
            assert_eq!(e.field, format!("params.env.{name}"));
            assert_eq!(
                e.message,
                "variable names must be shell identifiers ([A-Za-z_][A-Za-z0-9_]*): the program \
                 starts through /bin/sh, which passes on only names of that form"
            );
        }
        let e = Shell
            .validate(&json!({"command": "true", "env": {"_": "x"}}))
            .unwrap_err();
        assert_eq!(e.field, "params.env._");
        for name in ["A1", "my_flag", "_x9", "__", "PATH"] {
            let params = json!({"command": "true", "env": {name: "x"}});
            assert!(Shell.validate(&params).is_ok(), "{name}");
        }
    }

    /// Linux refuses an argument or environment string of 128 KiB or more
    /// with its NUL (`E2BIG`), and a directory path of 4096 bytes or more
    /// with its NUL (`ENAMETOOLONG`): a task with one could never run.
    #[test]
    fn an_argument_env_entry_or_cwd_too_long_for_linux_is_refused() {
        let err = |v: Value| Shell.validate(&v).unwrap_err();
        let e = err(json!({"command": "x", "args": ["a", "b".repeat(MAX_ARG_BYTES + 1)]}));
        assert_eq!(e.field, "params.args[1]");
        assert_eq!(
            e.message,
            "must be a string of at most 131071 bytes (Linux's limit on one argument: 128 KiB \
             with its NUL), got a string of 131072 bytes"
        );
        // `A=` and the value: 131,072 bytes.
        let e = err(json!({"command": "x", "env": {"A": "v".repeat(MAX_ARG_BYTES - 1)}}));
        assert_eq!(e.field, "params.env.A");
        assert_eq!(
            e.message,
            "NAME=value must be at most 131071 bytes (Linux's limit on one environment entry: \
             128 KiB with its NUL), got 131072 bytes"
        );
        let e = err(json!({"command": "x", "cwd": format!("/{}", "a".repeat(MAX_CWD_BYTES))}));
        assert_eq!(e.field, "params.cwd");
        assert_eq!(
            e.message,
            "must be a non-empty string of at most 4095 bytes without NUL bytes (Linux's limit \
             on a path: 4096 with its NUL), got a string of 4096 bytes"
        );
    }

    /// The longest argument, environment entry and `cwd` accepted are
    /// ones Linux takes: the limits are Linux's own, not a byte short.
    #[tokio::test]
    async fn the_longest_argument_env_entry_and_cwd_accepted_reach_the_program() {
        let value = "v".repeat(MAX_ARG_BYTES - "LONG=".len());
        // `/` and `./` 2047 times: 4095 bytes naming `/`.
        let cwd = format!("/{}", "./".repeat((MAX_CWD_BYTES - 1) / 2));
        assert_eq!(cwd.len(), MAX_CWD_BYTES);
        let params = json!({
            "command": "sh",
            "args": [
                "-c", r#"printf '[%s, %s, "%s"]' "${#1}" "${#LONG}" "$(pwd)""#,
                "sh", "a".repeat(MAX_ARG_BYTES),
            ],
            "env": {"LONG": value},
            "cwd": cwd,
        });
        let out = run(params).await;
        assert_eq!(
            out,
            Ok(Outcome::Done(json!([
                MAX_ARG_BYTES,
                MAX_ARG_BYTES - 5,
                "/"
            ])))
        );
    }

    #[test]
    fn a_job_cannot_set_the_runs_own_variables() {
        let e = Shell
            .validate(&json!({"command": "true", "env": {"CONVEYOR_FENCE": "1"}}))
            .unwrap_err();
        assert_eq!(e.field, "params.env.CONVEYOR_FENCE");
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_whole_group() {
        let file = temp_path("drop");
        let params = sh(&format!("sleep 30 & echo $! > '{}'; wait", file.display()));
        let run = Shell.run(test_ctx(1), params);
        let cut = tokio::time::timeout(Duration::from_millis(300), run).await;
        assert!(cut.is_err(), "{cut:?}");
        let pid = read_pid(&file).await;
        let _ = std::fs::remove_file(&file);
        assert_gone_within_2s(pid).await;
    }

    #[test]
    fn validate_names_the_field_and_the_limit() {
        let err = |v: Value| Shell.validate(&v).unwrap_err();
        let e = err(json!({}));
        assert_eq!(e.field, "params.command");
        assert!(e.message.contains("4096"), "{e}");
        assert_eq!(err(json!({"command": ""})).field, "params.command");
        let e = err(json!({"command": "x".repeat(MAX_COMMAND_BYTES + 1)}));
        assert_eq!(e.field, "params.command");
        assert!(e.message.contains("4096"), "{e}");
        assert_eq!(err(json!({"command": 5})).field, "params.command");
        let e = err(json!({"command": "x", "args": vec!["a"; MAX_ARGS + 1]}));
        assert_eq!(e.field, "params.args");
        assert!(e.message.contains("1000"), "{e}");
        assert_eq!(
            err(json!({"command": "x", "args": "a b"})).field,
            "params.args"
        );
        assert_eq!(
            err(json!({"command": "x", "args": ["a", 2]})).field,
            "params.args[1]"
        );
        assert_eq!(
            err(json!({"command": "x", "env": {"A": 1}})).field,
            "params.env.A"
        );
        assert_eq!(err(json!({"command": "x", "env": []})).field, "params.env");
        assert_eq!(err(json!({"command": "x", "cwd": 1})).field, "params.cwd");
        assert_eq!(err(json!({"command": "x", "arg": []})).field, "params.arg");
        assert_eq!(err(json!("ls")).field, "params");
        // A rejected value is described, never quoted: it may be a secret.
        let e = err(json!({"command": "x", "env": {"DB_PASSWORD": "s3cr\u{0}et"}}));
        assert_eq!(e.field, "params.env.DB_PASSWORD");
        assert_eq!(
            e.message,
            "must be a string without NUL bytes, got a string of 7 bytes"
        );
        let e = err(json!({"command": "x", "args": {"token": "s3cret"}}));
        assert!(e.message.ends_with("got an object of 1 fields"), "{e}");
        assert!(
            Shell
                .validate(&json!({
                    "command": "x", "args": vec!["a"; MAX_ARGS], "env": {"A": "b"},
                    "cwd": "/tmp", "stdin": [1, null]
                }))
                .is_ok()
        );
    }
}
