//! Where the Redis primary is: among the nodes listed in `redis_url`
//! (asked with `ROLE`), or as Redis Sentinel names it (asked, then
//! followed through `+switch-master` announcements and polling).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisError, TlsCertificates,
};
use deadpool_redis::{Manager, Pool, Runtime};
use futures::StreamExt;
use redis::io::tcp::TcpSettings;

use super::protocol;
use crate::config::{Config, TlsCa, split_urls};
use crate::store::StoreError;
use crate::store::sentinel::SentinelUrl;

/// A client for the primary among the nodes of `config.redis_url`,
/// trusting `tls_ca_file` (only it, as the store does): for tools that need
/// raw Redis (the bench, cleanup).
pub async fn tool_client(config: &Config) -> Result<redis::Client, StoreError> {
    let tls_ca = config.tls_ca().map_err(|e| protocol(e.to_string()))?;
    if let Some(url) = SentinelUrl::parse(&config.redis_url) {
        let url = url.map_err(protocol)?;
        let (host, port) = primary_address(&url, tls_ca.as_ref()).await?;
        let info = with_tls_ca(&url.node_url(&host, port), tls_ca.as_ref())?;
        return redis::Client::open(info).map_err(|e| protocol(format!("redis url: {e}")));
    }
    let urls = split_urls(&config.redis_url);
    let mut refused = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let info = with_tls_ca(url, tls_ca.as_ref())?;
        let client = redis::Client::open(info).map_err(|e| protocol(format!("redis url: {e}")))?;
        if urls.len() == 1 {
            return Ok(client);
        }
        let answer = match client.get_multiplexed_async_connection().await {
            Ok(mut conn) => is_primary(&mut conn).await,
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        };
        match answer {
            Ok(true) => return Ok(client),
            Ok(false) => refused.push(format!("node {}: a replica", i + 1)),
            Err(StoreError::NotAllowed(e)) => {
                return Err(StoreError::NotAllowed(format!("node {}: {e}", i + 1)));
            }
            Err(e) => refused.push(format!("node {}: {}", i + 1, e.detail())),
        }
    }
    Err(no_primary(&refused))
}

/// Where a store's Redis nodes are.
#[derive(Clone)]
pub(super) enum Nodes {
    /// One pool per node of `redis_url`, in the order given, and the node
    /// that last answered as the primary (tried first).
    Listed(Arc<[Pool]>, Arc<AtomicUsize>),
    /// Nodes the sentinels of a `redis+sentinel://` URL name.
    Sentinel(Arc<SentinelNodes>),
}

impl Nodes {
    /// The nodes of `url` (a node list, or sentinels), with a pool of
    /// `size` connections per node, trusting only `tls_ca` for TLS.
    pub(super) fn new(url: &str, tls_ca: Option<&TlsCa>, size: usize) -> Result<Nodes, StoreError> {
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)));
        Ok(match SentinelUrl::parse(url) {
            Some(sentinel) => Nodes::Sentinel(Arc::new(SentinelNodes {
                url: sentinel.map_err(protocol)?,
                tls_ca: tls_ca.cloned(),
                conn_config,
                pool_size: size,
                pools: std::sync::Mutex::default(),
                primary: std::sync::Mutex::default(),
            })),
            None => {
                let urls = split_urls(url);
                if urls.is_empty() {
                    return Err(protocol("redis url: none given"));
                }
                let pools = urls
                    .into_iter()
                    .map(|url| node_pool(with_tls_ca(url, tls_ca)?, &conn_config, size))
                    .collect::<Result<Vec<_>, _>>()?;
                Nodes::Listed(pools.into(), Arc::default())
            }
        })
    }
}

/// The nodes behind Sentinel: a pool per address the sentinels have named
/// as the primary (a handful over a deployment's life).
pub(super) struct SentinelNodes {
    url: SentinelUrl,
    tls_ca: Option<TlsCa>,
    conn_config: AsyncConnectionConfig,
    pool_size: usize,
    pools: std::sync::Mutex<Vec<(String, Pool)>>,
    /// The address the shared connection was last made to: the sentinel
    /// watcher drops that connection when they name another.
    primary: std::sync::Mutex<Option<String>>,
}

/// What a new connection to the primary is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// The store's shared connection, whose node the sentinel watcher
    /// follows.
    Shared,
    /// A connection of its own (the replica wait's). Made to the node the
    /// sentinels name now, it does not move what the watcher compares
    /// with: noting its node, a round made just after the sentinels named
    /// a new primary, and before the watcher looked, had the watcher leave
    /// the shared connection on the old one.
    Own,
}

impl SentinelNodes {
    /// A connection to the primary the sentinels name, checked with `ROLE`.
    pub(super) async fn connect_primary(
        &self,
        for_use: Use,
    ) -> Result<MultiplexedConnection, StoreError> {
        let (address, pool) = self.primary_pool().await?;
        let mut conn = match pool.get().await {
            Ok(pooled) => deadpool_redis::Connection::take(pooled),
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "no connection to the Redis primary {address} the sentinels named: {e}"
                )));
            }
        };
        match is_primary(&mut conn).await {
            // A user not allowed `ROLE` takes the sentinels' word for it.
            Ok(true) | Err(StoreError::NotAllowed(_)) => {}
            Ok(false) => {
                return Err(StoreError::Unavailable(format!(
                    "the sentinels named {address} the primary of `{}`, but it is a replica \
                     (a failover under way?)",
                    self.url.service
                )));
            }
            Err(e) => return Err(e),
        }
        if for_use == Use::Own {
            return Ok(conn);
        }
        let mut last = self.primary.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(address.as_str()) {
            tracing::info!(
                primary = %address, service = %self.url.service,
                "Redis primary found through Sentinel"
            );
            *last = Some(address);
        }
        Ok(conn)
    }

    /// The address of the primary the sentinels name, and its pool.
    pub(super) async fn primary_pool(&self) -> Result<(String, Pool), StoreError> {
        let (host, port) = primary_address(&self.url, self.tls_ca.as_ref()).await?;
        let address = format!("{host}:{port}");
        let pool = self.pool(&address, &self.url.node_url(&host, port))?;
        Ok((address, pool))
    }

    /// The pool of the node at `address` (`url`), made on first use.
    pub(super) fn pool(&self, address: &str, url: &str) -> Result<Pool, StoreError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, pool)) = pools.iter().find(|(a, _)| a == address) {
            return Ok(pool.clone());
        }
        let pool = node_pool(
            with_tls_ca(url, self.tls_ca.as_ref())?,
            &self.conn_config,
            self.pool_size,
        )?;
        pools.push((address.to_owned(), pool.clone()));
        Ok(pool)
    }
}

/// How often a store behind Sentinel asks whether the primary moved.
const SENTINEL_CHECK: Duration = Duration::from_secs(2);

/// How long a subscription to a sentinel's `+switch-master` is kept before
/// it is made again: a sentinel that vanished without closing the
/// connection (a partition) is subscribed to afresh this often.
const SENTINEL_SUBSCRIPTION: Duration = Duration::from_secs(30);

/// While the store lives, ask its sentinels where the primary is every
/// [`SENTINEL_CHECK`], and at once whenever one of them announces a
/// failover of the service (`+switch-master`, subscribed to on each
/// sentinel); if they name another node than the one the store's
/// connection goes to, drop that connection, so the next call connects to
/// (and checks) the one they name. This covers a primary the sentinels
/// replaced without its knowing (cut off from them, still reachable from
/// here, still taking writes): the store would otherwise write to it until
/// it is demoted, and lose those writes then. The announcement makes that
/// window the time the message takes; the polling is there for a sentinel
/// whose announcement did not arrive.
pub(super) async fn watch_sentinels(
    nodes: std::sync::Weak<SentinelNodes>,
    shared: std::sync::Weak<std::sync::Mutex<Option<MultiplexedConnection>>>,
) {
    let announced = Arc::new(tokio::sync::Notify::new());
    // Dropped (and so aborted) with this task, when the store is gone.
    let mut subscriptions = tokio::task::JoinSet::new();
    if let Some(nodes) = nodes.upgrade() {
        for sentinel in &nodes.url.sentinels {
            let announced = announced.clone();
            subscriptions.spawn(follow_announcements(
                nodes.url.clone(),
                sentinel.clone(),
                nodes.tls_ca.clone(),
                move || announced.notify_one(),
            ));
        }
    }
    let mut tick = tokio::time::interval(SENTINEL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = announced.notified() => tick.reset(),
        }
        let Some(nodes) = nodes.upgrade() else {
            return;
        };
        // Sentinels out of reach have nothing to say; the store's own
        // calls tell whether the primary is.
        let Ok((host, port)) = primary_address(&nodes.url, nodes.tls_ca.as_ref()).await else {
            continue;
        };
        let named = format!("{host}:{port}");
        let current = nodes
            .primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.as_ref().is_some_and(|c| *c != named) {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            tracing::info!(was = current.as_deref().unwrap_or("?"), now = %named,
                service = %nodes.url.service, "the sentinels name another Redis primary; reconnecting");
            *shared.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// Subscribe to `sentinel`'s `+switch-master` announcements and call
/// `announced` on each one for `url`'s service; subscribe again when the
/// connection ends, fails, or is [`SENTINEL_SUBSCRIPTION`] old.
async fn follow_announcements(
    url: SentinelUrl,
    sentinel: String,
    tls_ca: Option<TlsCa>,
    announced: impl Fn(),
) {
    let mut failures = 0u32;
    loop {
        match subscribe_announcements(&url, &sentinel, tls_ca.as_ref()).await {
            Ok(pubsub) => {
                failures = 0;
                let mut messages = pubsub.into_on_message();
                let until = tokio::time::Instant::now() + SENTINEL_SUBSCRIPTION;
                while let Ok(Some(message)) = tokio::time::timeout_at(until, messages.next()).await
                {
                    // "<service> <old ip> <old port> <new ip> <new port>"
                    let payload: String = message.get_payload().unwrap_or_default();
                    if payload.split(' ').next() == Some(url.service.as_str()) {
                        tracing::debug!(%sentinel, %payload, "a sentinel announced a failover");
                        announced();
                    }
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::debug!(%sentinel, error = %e, "cannot subscribe to the sentinel's failovers");
                // The polling covers the time this is down.
                let pause = SENTINEL_CHECK.saturating_mul(failures.min(15));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn subscribe_announcements(
    url: &SentinelUrl,
    sentinel: &str,
    tls_ca: Option<&TlsCa>,
) -> Result<redis::aio::PubSub, String> {
    let info = with_tls_ca(&url.sentinel_url(sentinel), tls_ca).map_err(|e| e.to_string())?;
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let subscribe = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe("+switch-master").await?;
        Ok::<_, RedisError>(pubsub)
    };
    match tokio::time::timeout(Duration::from_secs(2), subscribe).await {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_owned()),
    }
}

/// Ask the sentinels of `url`, all at once, where the primary of its
/// service is, and follow the newest view among the first majority of
/// answers (or all answers, when fewer come): see [`newest_primary`].
async fn primary_address(
    url: &SentinelUrl,
    tls_ca: Option<&TlsCa>,
) -> Result<(String, u16), StoreError> {
    let mut asks: futures::stream::FuturesUnordered<_> = url
        .sentinels
        .iter()
        .enumerate()
        .map(|(i, sentinel)| async move { (i, ask_sentinel(url, sentinel, tls_ca).await) })
        .collect();
    let majority = url.sentinels.len() / 2 + 1;
    let mut views = Vec::new();
    let mut refused = Vec::new();
    while let Some((i, answer)) = asks.next().await {
        match answer {
            Ok(view) => {
                views.push((i, view));
                if views.len() >= majority {
                    break;
                }
            }
            Err(e) => refused.push(format!("sentinel {}: {e}", url.sentinels[i])),
        }
    }
    newest_primary(views).ok_or_else(|| {
        StoreError::Unavailable(format!(
            "no sentinel named the Redis primary of `{}` ({})",
            url.service,
            refused.join("; ")
        ))
    })
}

/// What one sentinel says of a service's primary: its address, and the
/// configuration epoch of that view, which every failover raises.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PrimaryView {
    host: String,
    port: u16,
    epoch: u64,
}

/// The primary of the newest view among `views` (each with the place of
/// its sentinel in the URL). Not simply the first answer: a sentinel cut
/// off with the old primary cannot take part in the failover and goes on
/// naming the old primary, which may still take writes that the failover
/// throws away once the cut heals; the sentinels that promoted a replica
/// name it under a higher epoch. Among views of the newest epoch, the
/// address most sentinels name, then the first sentinel's.
fn newest_primary(mut views: Vec<(usize, PrimaryView)>) -> Option<(String, u16)> {
    let newest = views.iter().map(|(_, v)| v.epoch).max()?;
    views.retain(|(_, v)| v.epoch == newest);
    views.sort_by_key(|(i, _)| *i);
    let named_by = |v: &PrimaryView| {
        views
            .iter()
            .filter(|(_, w)| (&w.host, w.port) == (&v.host, v.port))
            .count()
    };
    let mut best: Option<(&PrimaryView, usize)> = None;
    for (_, v) in &views {
        let n = named_by(v);
        if best.is_none_or(|(_, most)| n > most) {
            best = Some((v, n));
        }
    }
    best.map(|(v, _)| (v.host.clone(), v.port))
}

async fn ask_sentinel(
    url: &SentinelUrl,
    sentinel: &str,
    tls_ca: Option<&TlsCa>,
) -> Result<PrimaryView, String> {
    let info = with_tls_ca(&url.sentinel_url(sentinel), tls_ca).map_err(|e| e.to_string())?;
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    // The address as the guidelines for Sentinel clients ask for it (once
    // a failover has promoted a replica, its address, before the failover
    // is over), and the sentinel's view of the primary, for its epoch.
    let mut pipe = redis::pipe();
    pipe.cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&url.service);
    pipe.cmd("SENTINEL").arg("MASTER").arg(&url.service);
    let does_not_monitor = || {
        format!(
            "does not monitor `{}` (check the service name after the sentinels in redis_url)",
            url.service
        )
    };
    type Answer = (
        Option<(String, String)>,
        std::collections::HashMap<String, String>,
    );
    let (address, fields): Answer = pipe.query_async(&mut conn).await.map_err(|e| {
        if e.to_string().contains("No such master") {
            does_not_monitor()
        } else {
            e.to_string()
        }
    })?;
    let (host, port) = address.ok_or_else(does_not_monitor)?;
    let port = port
        .parse()
        .map_err(|_| format!("answered port `{port}`, not a number"))?;
    let epoch = fields
        .get("config-epoch")
        .ok_or("answered SENTINEL MASTER without `config-epoch`")?;
    let epoch = epoch
        .parse()
        .map_err(|_| format!("answered config-epoch `{epoch}`, not a number"))?;
    Ok(PrimaryView { host, port, epoch })
}

/// A pool of `size` multiplexed connections to the node of `info`.
pub(super) fn node_pool(
    info: redis::ConnectionInfo,
    conn_config: &AsyncConnectionConfig,
    size: usize,
) -> Result<Pool, StoreError> {
    // The pool's client keeps the parsed roots for every new connection.
    let manager = Manager::new_with_config(info, conn_config.clone())
        .map_err(|e| protocol(format!("redis url: {e}")))?;
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| protocol(format!("redis pool: {e}")))
}

/// Whether the node behind `conn` is a primary (`ROLE`). A user not
/// allowed `ROLE` (`+@all -@dangerous` denies it) cannot tell, and is
/// told so ([`StoreError::NotAllowed`]): taken for a primary, a replica
/// listed first answered every write `READONLY`, and the next connection
/// started at it again, for good.
pub(super) async fn is_primary(conn: &mut MultiplexedConnection) -> Result<bool, StoreError> {
    match redis::cmd("ROLE")
        .query_async::<Vec<redis::Value>>(conn)
        .await
    {
        Ok(role) => Ok(match role.first() {
            Some(redis::Value::BulkString(b)) => b.as_slice() == b"master",
            Some(redis::Value::SimpleString(s)) => s == "master",
            _ => false,
        }),
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
            Err(StoreError::NotAllowed(format!(
                "the Redis user may not run ROLE, which redis_url's list of nodes needs to \
                 find the primary (allow it with `+role`, or name one node): {e}"
            )))
        }
        Err(e) => Err(StoreError::Unavailable(e.to_string())),
    }
}

/// No node of the list could be used, with why for each.
pub(super) fn no_primary(refused: &[String]) -> StoreError {
    StoreError::Unavailable(format!(
        "no Redis node answered as the primary ({})",
        refused.join("; ")
    ))
}

/// The connection info of `url`, carrying `tls_ca` as its only root for
/// `rediss://`, with `TCP_NODELAY` set: redis-rs leaves Nagle's algorithm
/// on by default, which holds a request written behind another unanswered
/// one on the multiplexed connection until the first reply's ACK.
pub(super) fn with_tls_ca(
    url: &str,
    tls_ca: Option<&TlsCa>,
) -> Result<redis::ConnectionInfo, StoreError> {
    let info = url
        .into_connection_info()
        .map_err(|e| protocol(format!("redis url: {e}")))?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    match tls_ca {
        Some(ca) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
            let certificates = TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.pem().as_bytes().to_vec()),
            };
            Ok(redis::Client::build_with_tls(info, certificates)
                .map_err(|e| protocol(format!("tls_ca_file {}: {e}", ca.path().display())))?
                .get_connection_info()
                .clone())
        }
        _ => Ok(info),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A plain Redis stands in for the sentinel (a sentinel takes no
    /// `PUBLISH`): the subscription is the same.
    #[tokio::test]
    async fn a_failover_announced_for_the_service_is_followed_and_others_are_not() {
        let service = format!("svc-{}", std::process::id());
        let url = SentinelUrl::parse(&format!("redis+sentinel://127.0.0.1:6379/{service}"))
            .and_then(Result::ok)
            .expect("a sentinel url");
        let heard = Arc::new(AtomicUsize::new(0));
        let counter = heard.clone();
        let follower = tokio::spawn(follow_announcements(
            url,
            "127.0.0.1:6379".to_owned(),
            None,
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
        ));
        let client = redis::Client::open("redis://127.0.0.1:6379/").expect("a redis url");
        let conn = match client.get_multiplexed_async_connection().await {
            Ok(conn) => conn,
            Err(e) => panic!(
                "cannot reach Redis at 127.0.0.1:6379: {e}; {}",
                crate::runtime::START_HINT
            ),
        };
        let publish = |payload: String| {
            let mut conn = conn.clone();
            async move {
                let receivers: u32 = redis::cmd("PUBLISH")
                    .arg("+switch-master")
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
                    .expect("PUBLISH");
                receivers
            }
        };
        // Subscribed once a published announcement has a receiver.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while publish(format!("{service}-not 127.0.0.1 1 127.0.0.1 2")).await == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for payload in [
            format!("{service} 127.0.0.1 1 127.0.0.1 2"),
            format!("other-{service} 127.0.0.1 1 127.0.0.1 2"),
            format!("{service} 127.0.0.1 2 127.0.0.1 1"),
        ] {
            publish(payload).await;
        }
        // Delivered in order on one connection: once the last is heard,
        // so was everything before it.
        while heard.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "announcements lost");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(heard.load(Ordering::SeqCst), 2, "another service's counted");
        follower.abort();
    }

    fn view(sentinel: usize, port: u16, epoch: u64) -> (usize, PrimaryView) {
        let host = "10.0.0.1".to_owned();
        (sentinel, PrimaryView { host, port, epoch })
    }

    #[test]
    fn the_primary_of_the_newest_epoch_wins_over_a_sentinel_cut_off_with_the_old_one() {
        // The first sentinel, on the old primary's side of a cut, answers
        // first and names it under the epoch before the failover.
        let views = vec![view(0, 6001, 3), view(2, 6002, 4), view(1, 6002, 4)];
        assert_eq!(newest_primary(views), Some(("10.0.0.1".to_owned(), 6002)));
    }

    #[test]
    fn within_one_epoch_the_address_most_sentinels_name_wins_then_the_first_listed() {
        let views = vec![view(2, 6001, 4), view(0, 6002, 4), view(1, 6001, 4)];
        assert_eq!(newest_primary(views), Some(("10.0.0.1".to_owned(), 6001)));
        let views = vec![view(1, 6001, 4), view(0, 6002, 4)];
        assert_eq!(newest_primary(views), Some(("10.0.0.1".to_owned(), 6002)));
        assert_eq!(newest_primary(Vec::new()), None);
    }
}
