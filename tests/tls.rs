//! `amqps://` and `rediss://` for real: a private CA made here with
//! openssl, a TLS-only Redis and a TLS-only RabbitMQ node started by this
//! test on free ports (the machine's own servers on 5672 and 6379 are never
//! touched), jobs run through an in-process dispatcher and worker trusting
//! that CA, and connections without it refused.
//!
//! Needs `openssl`, `redis-server` built with TLS and RabbitMQ (3.10+)
//! installed; a missing one fails the test saying how to install it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::rabbit::{RABBITMQ_SERVER, RabbitNode};
use common::{Client, Deployment, test_config, unique_prefix};
use conveyor::config::Config;
use conveyor::model::{JobState, TaskState};
use serde_json::json;

const OPENSSL: &str = "/usr/bin/openssl";
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn jobs_run_over_amqps_and_rediss_trusting_a_private_ca() {
    let servers = Servers::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run_jobs(&servers));
    // The runtime (and every connection) goes before the servers do.
    drop(runtime);
    drop(servers);
}

async fn run_jobs(servers: &Servers) {
    let mut config = test_config(&unique_prefix("tls"));
    config.amqp_url = format!("amqps://guest:guest@localhost:{}/%2f", servers.amqp_port);
    config.redis_url = format!("rediss://localhost:{}/", servers.redis_port);
    config.tls_ca_file = Some(servers.dir.join("ca.pem"));

    refused_without_the_ca(&config).await;

    let mut d = Deployment::with_config(config.clone()).await;
    d.start_dispatcher().await;
    d.start_worker(4).await;

    let mut client = Client::connect_to(&config).await;
    client
        .submit(&json!({"id": "single", "requestor": "tls",
            "tasks": [{"name": "only", "handler": "noop", "params": {"answer": 42}}]}))
        .await;
    assert_eq!(
        client.reply().await,
        (
            "single".to_owned(),
            json!({"job_id": "single", "accepted": true})
        )
    );
    let status = d.wait_terminal("single", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    assert_eq!(status.tasks["only"].result, json!({"answer": 42}));
    client.close().await;

    // Every connection is cut: the broker and the store open new ones, and
    // those must trust the CA too.
    tokio::task::block_in_place(|| servers.close_amqp_connections());
    kill_redis_clients(&config).await;

    let client = Client::connect_to(&config).await;
    client
        .submit(&json!({"id": "dag", "requestor": "tls", "tasks": [
            {"name": "first", "handler": "noop", "params": {"v": 1}},
            {"name": "second", "handler": "noop", "after": ["first"], "params": {"v": 2}}
        ]}))
        .await;
    let status = d.wait_terminal("dag", WAIT).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:#?}");
    for (task, v) in [("first", 1), ("second", 2)] {
        assert_eq!(status.tasks[task].state, TaskState::Succeeded);
        assert_eq!(status.tasks[task].result, json!({ "v": v }));
    }
    client.close().await;
    d.shutdown().await;
    // The cleanup reached both servers through TLS with the CA too.
    let client = conveyor::store::redis::tool_client(&config)
        .await
        .expect("redis client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("rediss connection with the CA");
    let (_, left): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{}:*", config.prefix))
        .arg("COUNT")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .expect("SCAN");
    assert!(left.is_empty(), "keys left after cleanup: {left:?}");
    let amqp = conveyor::broker::amqp::tool_connection(&config)
        .await
        .expect("amqps connection with the CA");
    let channel = amqp.create_channel().await.expect("channel");
    let submit = conveyor::names::Names::new(&config.prefix).submit_queue();
    let gone = channel
        .queue_declare(
            submit.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "{submit} still exists after cleanup");
    let _ = amqp.close(200, "bye".into()).await;
}

/// Without `tls_ca_file` the servers' certificates are not trusted: TLS is
/// really verified, not merely switched on.
async fn refused_without_the_ca(config: &Config) {
    let mut no_ca = config.clone();
    no_ca.tls_ca_file = None;
    let err = match conveyor::runtime::redis_store(&no_ca, "no-ca", 1).await {
        Ok(_) => panic!("Redis connection without the CA succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(is_about_certificates(&err), "Redis without the CA: {err}");
    let err = match conveyor::runtime::amqp_broker(&no_ca).await {
        Ok(_) => panic!("RabbitMQ connection without the CA succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        is_about_certificates(&err),
        "RabbitMQ without the CA: {err}"
    );
}

fn is_about_certificates(err: &str) -> bool {
    let err = err.to_lowercase();
    err.contains("certificate") || err.contains("tls")
}

/// The CA, a Redis and a RabbitMQ node of this test, in one temporary
/// directory; dropping it stops both servers (also when the test panics)
/// and removes the directory.
struct Servers {
    dir: PathBuf,
    redis: Option<Child>,
    redis_port: u16,
    rabbit: Option<RabbitNode>,
    amqp_port: u16,
}

impl Servers {
    fn start() -> Servers {
        for (binary, package) in [
            (OPENSSL, "openssl"),
            ("redis-server", "redis-server (7.x, built with TLS)"),
            (RABBITMQ_SERVER, "rabbitmq-server"),
        ] {
            require(binary, package);
        }
        let dir = std::env::temp_dir().join(format!(
            "conveyor-tls-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let mut servers = Servers {
            dir,
            redis: None,
            redis_port: 0,
            rabbit: None,
            amqp_port: 0,
        };
        make_certificates(&servers.dir);
        servers.start_redis();
        servers.start_rabbit();
        servers
    }

    fn start_redis(&mut self) {
        let dir = &self.dir;
        self.redis_port = free_port();
        let log = std::fs::File::create(dir.join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port"])
            .arg(self.redis_port.to_string())
            .arg("--tls-cert-file")
            .arg(dir.join("server.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(dir.join("ca.pem"))
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--dir"])
            .arg(dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.redis = Some(child);
        let port = self.redis_port;
        wait_for(&format!("Redis (TLS) on port {port}"), || {
            if let Some(Some(exit)) = self.redis.as_mut().map(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "redis-server exited ({exit}); is it built with TLS? Log:\n{}",
                    read(&dir.join("redis.log"))
                );
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn start_rabbit(&mut self) {
        self.amqp_port = free_port();
        let ca = self.dir.join("ca.pem");
        let cert = self.dir.join("server.pem");
        let key = self.dir.join("server.key");
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            self.amqp_port,
            ca.display(),
            cert.display(),
            key.display()
        );
        let rabbit = RabbitNode::launch(
            &self.dir.join("rabbitmq"),
            &format!("conveyor-tls-{}", std::process::id()),
            &format!("CONVEYORTLS{:016x}", rand::random::<u64>()),
            &conf,
        );
        rabbit.wait_booted();
        self.rabbit = Some(rabbit);
        let port = self.amqp_port;
        wait_for(&format!("RabbitMQ (TLS) on port {port}"), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Close every client connection of the RabbitMQ node.
    fn close_amqp_connections(&self) {
        let rabbit = self.rabbit.as_ref().expect("rabbitmq running");
        let out = rabbit.ctl(&["close_all_connections", "tls test: reconnect"]);
        assert!(out.status.success(), "close_all_connections: {out:?}");
    }
}

/// Kill every other client connection of `config`'s Redis.
async fn kill_redis_clients(config: &Config) {
    let ca = config.tls_ca().expect("CA").expect("tls_ca_file set");
    let client = redis::Client::build_with_tls(
        config.redis_url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem().as_bytes().to_vec()),
        },
    )
    .expect("redis client with the CA");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis with the CA");
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut conn)
        .await
        .expect("CLIENT KILL");
    assert!(killed > 0, "no Redis connection to kill");
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Stopped (and waited for) when dropped.
        drop(self.rabbit.take());
        if let Some(mut redis) = self.redis.take() {
            let _ = redis.kill();
            let _ = redis.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, and a server certificate it signed for localhost and 127.0.0.1.
fn make_certificates(dir: &Path) {
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
         basicConstraints = CA:FALSE\n\
         keyUsage = digitalSignature, keyEncipherment\n\
         extendedKeyUsage = serverAuth\n",
    )
    .expect("write server.ext");
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Conveyor test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-extfile",
        &p("server.ext"),
        "-out",
        &p("server.pem"),
    ]);
    // Readable by the RabbitMQ node whatever user it runs as.
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
            .expect("certificate mode");
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new(OPENSSL)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fail, saying what to install, unless `binary` can be run.
fn require(binary: &str, package: &str) {
    let found = if binary.contains('/') {
        Path::new(binary).exists()
    } else {
        Command::new("sh")
            .args(["-c", &format!("command -v {binary}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        found,
        "{binary} not found: this test starts its own TLS servers; install it with \
         `apt-get install {package}`"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} not up within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
