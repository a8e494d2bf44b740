//! RabbitMQ nodes of a test's own: started detached from the machine's
//! RabbitMQ installation, each with its own directory, node name, Erlang
//! cookie, ports and config, so the machine's own node (5672, dist port
//! 25672) is never touched. The TLS test runs one; the cluster test three.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
pub const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// Longest a `rabbitmqctl` against a test's own node may take: more than
/// the 90 s [`RabbitNode::wait_booted`] gives a node to boot.
const CTL_WITHIN_S: u32 = 150;

/// A RabbitMQ node started detached: its name and the environment that
/// `rabbitmqctl` needs to reach it. Stopped when dropped.
pub struct RabbitNode {
    pub node: String,
    dir: PathBuf,
    env: Vec<(String, PathBuf)>,
    pid_file: PathBuf,
    stopped: bool,
}

impl RabbitNode {
    /// Start node `name@localhost` in `dir` (created) with `conf` as its
    /// `rabbitmq.conf` and `cookie` as its Erlang cookie (nodes of one
    /// cluster share it), without waiting for it to boot.
    pub fn launch(dir: &Path, name: &str, cookie: &str, conf: &str) -> RabbitNode {
        assert!(
            Path::new(RABBITMQ_SERVER).exists(),
            "{RABBITMQ_SERVER} not found: this test starts RabbitMQ nodes of its own; \
             install it with `apt-get install rabbitmq-server`"
        );
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("rabbitmq home");
        let cookie_file = home.join(".erlang.cookie");
        std::fs::write(&cookie_file, cookie).expect("erlang cookie");
        std::fs::set_permissions(&cookie_file, std::fs::Permissions::from_mode(0o400))
            .expect("cookie mode");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
        // Our own env file, so /etc/rabbitmq/rabbitmq-env.conf (which names
        // the machine's node) is not read; dist traffic stays on loopback.
        std::fs::write(
            dir.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .expect("rabbitmq-env.conf");
        std::fs::write(dir.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
        let node = format!("{name}@localhost");
        let pid_file = dir.join("rabbit.pid");
        let env: Vec<(String, PathBuf)> = vec![
            ("HOME".into(), home),
            ("RABBITMQ_NODENAME".into(), node.clone().into()),
            // The CLI takes ports from dist + 10000 on: stay below 55000.
            ("RABBITMQ_DIST_PORT".into(), dist_port().to_string().into()),
            (
                "RABBITMQ_CONF_ENV_FILE".into(),
                dir.join("rabbitmq-env.conf"),
            ),
            ("RABBITMQ_CONFIG_FILE".into(), dir.join("rabbitmq.conf")),
            (
                "RABBITMQ_ADVANCED_CONFIG_FILE".into(),
                dir.join("advanced.config"),
            ),
            ("RABBITMQ_MNESIA_BASE".into(), dir.join("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), dir.join("log")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                dir.join("enabled_plugins"),
            ),
            ("RABBITMQ_PID_FILE".into(), pid_file.clone()),
        ];
        let status = Command::new(RABBITMQ_SERVER)
            .arg("-detached")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        RabbitNode {
            node,
            dir: dir.to_owned(),
            env,
            pid_file,
            stopped: false,
        }
    }

    /// Wait (up to 90 s) until the node has booted; fail with where its
    /// logs are if it does not.
    pub fn wait_booted(&self) {
        // `wait` waits for the pid file, then for the node to boot.
        let out = self.ctl(&["wait", "--timeout", "90", &self.pid_file.to_string_lossy()]);
        assert!(
            out.status.success(),
            "RabbitMQ node {} did not start: {}{}\nlogs in {}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.dir.join("log").display()
        );
    }

    /// Run `rabbitmqctl -n <node> <args>`, stopped (exit status 124)
    /// if it has not finished within [`CTL_WITHIN_S`]: a node that never
    /// answers fails the test instead of hanging it.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["--kill-after=5", &CTL_WITHIN_S.to_string(), RABBITMQCTL])
            .args(["-n", &self.node])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("run rabbitmqctl")
    }

    /// Run `rabbitmqctl`; it must succeed.
    pub fn ctl_ok(&self, args: &[&str]) {
        let out = self.ctl(args);
        let timed_out = if out.status.code() == Some(124) {
            format!(" (did not finish within {CTL_WITHIN_S} s)")
        } else {
            String::new()
        };
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {}{timed_out}: {}{}",
            self.node,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stop the whole node (the Erlang VM too); returns once its process
    /// has exited, killing it if `rabbitmqctl stop` fails.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // `stop <pid file>` returns once the node's process has exited.
        let pid_file = self.pid_file.to_string_lossy().into_owned();
        if !self.ctl(&["stop", &pid_file]).status.success()
            && let Ok(pid) = std::fs::read_to_string(&self.pid_file)
        {
            eprintln!("rabbitmqctl stop failed; killing node pid {}", pid.trim());
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free port in 20000..22700 for Erlang distribution (its CLI tools use
/// the port + 10000 and up): both below the kernel's ephemeral range
/// (32768 and up here), so no outgoing connection takes them meanwhile.
pub fn dist_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 2_700;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port for Erlang distribution in 20000..22700");
}

/// A free port in 23000..25000 (below the ephemeral range; the machine's
/// RabbitMQ holds 25672) for a node's AMQP listener.
pub fn amqp_port() -> u16 {
    for _ in 0..200 {
        let port = 23_000 + rand::random::<u16>() % 2_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for AMQP in 23000..25000");
}
