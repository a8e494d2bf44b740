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

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::task::JoinHandle;

use crate::health::{Health, Readiness};

/// The probe listener of one process; stops serving when dropped.
pub struct ProbeServer {
    health: Arc<OnceLock<Health>>,
    addr: SocketAddr,
    task: JoinHandle<()>,
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
        let health: Arc<OnceLock<Health>> = Arc::default();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(health.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "HTTP listener stopped");
            }
        });
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

async fn readyz(State(health): State<Arc<OnceLock<Health>>>) -> (StatusCode, Json<Readiness>) {
    let readiness = match health.get() {
        Some(h) => h.readiness().await,
        None => Readiness::connecting(),
    };
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}
