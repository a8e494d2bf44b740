//! The HTTP surface of a Conveyor process. Today it serves the two probes an
//! orchestrator asks: `/healthz` (the process is alive: its event loop
//! answers) and `/readyz` (it can take work now, see
//! [`Health::readiness`]; 200 when ready, 503 when not, a JSON body saying
//! which part is missing either way). The job API and status page of later
//! issues mount on the same router.
//!
//! The listener is bound before the process connects to RabbitMQ and Redis,
//! so a process that is still connecting answers `/readyz` with 503 rather
//! than refusing the connection, and a port already taken fails the start
//! at once with the address named.
//!
//! The port may be reachable by more than the orchestrator (the compose
//! file publishes it), and every connection costs the process a task and
//! a file descriptor, which its broker and store connections and `shell`
//! tasks need too. So connections are few ([`MAX_CONNECTIONS`]; more wait
//! in the kernel's backlog), each has [`HEADER_READ_TIMEOUT`] to send its
//! request and [`CONNECTION_LIFETIME`] in all, and serves one request (a
//! probe opens a connection per request). `/readyz` answers from a
//! readiness at most [`READINESS_FRESH`] old, and computes one at a time:
//! a flood of probes costs at most a store ping and a broker check a
//! second, not one each.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::health::{Health, Readiness};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection has to send its request's head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection lives at most, its answer included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// How old a readiness `/readyz` answers with may be.
pub const READINESS_FRESH: Duration = Duration::from_secs(1);

/// The probe listener of one process; stops serving when dropped.
pub struct ProbeServer {
    health: Arc<OnceLock<Health>>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// What `/readyz` reads: the process's health, once attached, and the
/// readiness it last computed.
#[derive(Clone, Default)]
struct Probes {
    health: Arc<OnceLock<Health>>,
    last: Arc<Mutex<Option<(Instant, Readiness)>>>,
}

/// The listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on http_addr {addr} (CONVEYOR_HTTP_ADDR)")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

impl ProbeServer {
    /// Bind `addr` and serve the probes; not ready until [`attach`](Self::attach).
    pub async fn start(addr: SocketAddr) -> Result<ProbeServer, BindError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        let probes = Probes::default();
        let health = probes.health.clone();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(probes);
        let task = tokio::spawn(serve(listener, app));
        tracing::info!(addr = %bound, "serving /healthz and /readyz");
        Ok(ProbeServer {
            health,
            addr: bound,
            task,
        })
    }

    /// Start one if an address is given (`http_addr` is optional).
    pub async fn start_if(addr: Option<SocketAddr>) -> Result<Option<ProbeServer>, BindError> {
        match addr {
            Some(addr) => ProbeServer::start(addr).await.map(Some),
            None => Ok(None),
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Report this health from now on (the first call wins).
    pub fn attach(&self, health: Health) {
        let _ = self.health.set(health);
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accept connections and serve each (see the module docs for the bounds).
/// The connections are the task's own: aborted with it.
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: a pause, not a
                // loop that spins on the error.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection ended with an error"),
                Err(_) => tracing::debug!("HTTP connection closed: it outlived its time"),
            }
            drop(permit);
        });
    }
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, Json<Readiness>) {
    let readiness = match probes.health.get() {
        Some(h) => {
            // One at a time: the others wait here, and take its answer.
            let mut last = probes.last.lock().await;
            match &*last {
                Some((at, readiness)) if at.elapsed() < READINESS_FRESH => readiness.clone(),
                _ => {
                    let readiness = h.readiness().await;
                    *last = Some((Instant::now(), readiness.clone()));
                    readiness
                }
            }
        }
        None => Readiness::connecting(),
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// The whole answer to `GET path` on a connection of its own.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_that_send_nothing_are_closed_and_keep_no_probe_out() {
        let server = ProbeServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr();
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Every slot is held by a connection that says nothing: a probe is
        // answered once the header time-out frees them.
        let answer = tokio::time::timeout(HEADER_READ_TIMEOUT * 4, get(addr, "/healthz"))
            .await
            .expect("the probe was kept out");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        for mut connection in silent {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 4, connection.read(&mut byte))
                .await
                .expect("a silent connection was kept open");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
    }

    #[tokio::test]
    async fn a_process_not_attached_yet_is_not_ready() {
        let server = ProbeServer::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let answer = get(server.local_addr(), "/readyz").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    }
}
