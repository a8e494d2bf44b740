//! The AMQP broker: RabbitMQ through lapin.
//!
//! Broker facts this code is shaped by (RabbitMQ 3.10 and later):
//! - Every work message is persistent and published with the `mandatory`
//!   flag on a channel in confirm mode. An unroutable message is *acked* by
//!   the broker after being returned, so a returned message is a failure
//!   ([`BrokerError::Unroutable`]; a nack is [`BrokerError::Refused`]).
//!   Nothing here declares the queue again: the caller does (the outbox
//!   forgets it declared the queue).
//! - lapin hands a returned message to whichever confirm of its channel it
//!   settles next, not to the returned message's own: to the confirm of
//!   another message settled by the same multiple ack (in no set order), or
//!   of another caller's batch. So the batches that go out together (a
//!   group, see `publish_group`) have a confirm channel to themselves
//!   from their first publish to their last confirm (`Publishers`), and
//!   every message of the group addressed to a queue a return names counts
//!   as returned, whichever confirm carried the return (a message that was
//!   in fact routed is then published twice, which is harmless). Trusting
//!   lapin's pairing on one shared channel reported about one publish in 25
//!   to a missing queue as confirmed under concurrent publishing (`core.rs`
//!   tests it).
//! - Confirms are pipelined: a batch is published in full, then all its
//!   confirms are awaited together.
//! - Queues are durable; quorum queues by default, with `x-delivery-limit`
//!   set explicitly (3.10 has no default) and dead-lettering to
//!   `<prefix>.dead` through the default exchange.
//! - A quorum queue that refused (nacked) a channel's message, at its
//!   length limit with `overflow: reject-publish`, goes on refusing that
//!   channel's messages even once it has room again (3.10): publishes go
//!   through a new channel after a refusal.
//! - Heartbeats are 15 s unless the URL says otherwise.
//! - Recovery is not left to lapin: a lost connection ends every
//!   subscription and fails the publishes under way; the next call opens a
//!   new connection and re-declares the topology, and consumers subscribe
//!   again with their prefetch set from scratch (lapin's own recovery
//!   re-declares consumers but not the prefetch).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::{AsyncTcpStream, OwnedTLSConfig};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    PublisherConfirm,
};

use super::{
    Acker, Broker, BrokerError, Delivery, HeaderValue, Outgoing, PartlyPublished, Properties,
    QueueStats, Subscription,
};
use crate::config::{Config, QueueType, TlsCa, redact_url, split_urls, url_query_value};
use crate::names::Names;

/// Queue arguments and names for one deployment.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Names under the deployment's prefix.
    pub names: Names,
    /// Quorum or classic.
    pub queue_type: QueueType,
    /// `x-delivery-limit` of submit and task queues (quorum only).
    pub delivery_limit: u32,
}

/// RabbitMQ through two connections at a time: one for publishing (its
/// confirm-mode channels) and the broker calls (declare, queue stats), and
/// one for subscriptions, a channel each. Apart because RabbitMQ, under a
/// memory or disk alarm, stops reading from every connection that
/// publishes: acks sent on it would wait with it, so queues could not
/// drain and free what the alarm waits for; the consuming connection
/// never publishes and is never blocked. When the publishing connection
/// is lost, the next call opens a new one and declares again every queue
/// declared so far; when the consuming one is, its subscriptions end, and
/// their owners subscribe again on a new one. Given several node URLs, a
/// new connection tries the node that answered last first, then the
/// others in turn.
pub struct AmqpBroker {
    urls: Vec<String>,
    /// Index in `urls` of the node that answered last.
    preferred: std::sync::atomic::AtomicUsize,
    /// Extra trusted roots for `amqps://`, used by every (re)connection.
    tls: OwnedTLSConfig,
    topology: Topology,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The connection subscriptions are made on.
    consuming: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The last failed connect, and when it ended: callers that waited
    /// for it share its outcome (see [`FAILED_CONNECT_SHARED`]).
    failed_connect: std::sync::Mutex<Option<(std::time::Instant, BrokerError)>>,
    /// Whether a session is up, for [`Broker::is_connected`] while the
    /// session lock is held (a reconnect holds it for as long as the
    /// handshake takes: up to [`CONNECT_TIMEOUT`] a node).
    live: std::sync::atomic::AtomicBool,
    /// The task queues declared so far, once [`Broker::declare`] succeeded
    /// (with none, the base queues alone were): a new connection declares
    /// them again.
    declared: std::sync::Mutex<Option<Vec<String>>>,
}

/// One connection and its publishing channels.
struct Session {
    connection: Connection,
    publishers: Publishers,
}

impl Groups {
    /// The waiting batches that go out together next (the first whatever
    /// its size, then others up to [`MAX_GROUP_MESSAGES`] in all), if a
    /// group may go out.
    fn next_group(&mut self) -> Option<Vec<Request>> {
        if self.waiting.is_empty() || self.out >= MAX_GROUPS_OUT {
            return None;
        }
        let mut messages = 0;
        let mut take = 0;
        for request in &self.waiting {
            if take > 0 && messages + request.batch.len() > MAX_GROUP_MESSAGES {
                break;
            }
            messages += request.batch.len();
            take += 1;
        }
        self.out += 1;
        let rest = self.waiting.split_off(take);
        Some(std::mem::replace(&mut self.waiting, rest))
    }
}

/// Publish `group` on a channel of its own and answer each of its
/// requests; then start the next group if batches wait (in a task of its
/// own, so this caller returns).
async fn publish_group(session: Arc<Session>, group: Vec<Request>) {
    /// Counts the group in until it is dropped, done or cut short.
    struct Out(Arc<Session>);
    impl Drop for Out {
        fn drop(&mut self) {
            if let Some(next) = self.0.publishers.group_done()
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                runtime.spawn(publish_group_boxed(self.0.clone(), next));
            }
        }
    }
    let _out = Out(session.clone());
    let mut sizes = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut messages = Vec::new();
    for Request { batch, reply } in group {
        sizes.push(batch.len());
        replies.push(reply);
        if messages.is_empty() {
            messages = batch;
        } else {
            messages.extend(batch);
        }
    }
    let verdicts = tokio::time::timeout(PUBLISH_TIMEOUT, async {
        let publisher = session
            .publishers
            .take(&session.connection)
            .await
            .map_err(|e| vec![Some(e); messages.len()])?;
        publish_on(publisher, &messages).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(vec![
            Some(BrokerError::Unavailable(format!(
                "RabbitMQ did not take and confirm a batch of {} messages within {} s",
                messages.len(),
                PUBLISH_TIMEOUT.as_secs()
            )));
            messages.len()
        ])
    });
    match verdicts {
        Ok(()) => {
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
        }
        Err(mut unconfirmed) => {
            for (reply, size) in replies.into_iter().zip(sizes) {
                let rest = unconfirmed.split_off(size);
                let mine = std::mem::replace(&mut unconfirmed, rest);
                let _ = reply.send(match PartlyPublished::from_verdicts(mine) {
                    None => Ok(()),
                    Some(partly) => Err(partly),
                });
            }
        }
    }
}

/// [`publish_group`] as a task may run it.
fn publish_group_boxed(
    session: Arc<Session>,
    group: Vec<Request>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(publish_group(session, group))
}

/// The confirm-mode channels of one connection: each group of batches
/// takes one to itself and gives it back once every confirm of the group
/// has settled, so every returned message a group's confirms carry is one
/// of its own. At most [`MAX_GROUPS_OUT`] are in use at once.
struct Publishers {
    idle: std::sync::Mutex<Vec<Channel>>,
    groups: std::sync::Mutex<Groups>,
}

/// Batches waiting to be published, and how many groups are out.
#[derive(Default)]
struct Groups {
    waiting: Vec<Request>,
    out: usize,
}

/// One caller's batch and where its answer goes.
struct Request {
    batch: Vec<Outgoing>,
    reply: tokio::sync::oneshot::Sender<Result<(), PartlyPublished>>,
}

/// Groups of batches published at once, each on a channel of its own: the
/// batches that arrive while this many are out wait, and go together in
/// the next group, so many small concurrent publishes share their
/// confirms as they did on one shared channel (a batch per channel cost
/// the single-task bench about 9% of its throughput).
const MAX_GROUPS_OUT: usize = 4;

/// Most messages in one group, unless its first batch alone has more.
const MAX_GROUP_MESSAGES: usize = 4096;

impl Publishers {
    fn new(first: Channel) -> Publishers {
        Publishers {
            idle: std::sync::Mutex::new(vec![first]),
            groups: std::sync::Mutex::new(Groups::default()),
        }
    }

    /// Queue `request`; the group the caller is to publish now, if fewer
    /// than [`MAX_GROUPS_OUT`] are out (its own batch among them).
    fn enqueue(&self, request: Request) -> Option<Vec<Request>> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.waiting.push(request);
        groups.next_group()
    }

    /// A group is done (or cut short): the next one, if batches wait.
    fn group_done(&self) -> Option<Vec<Request>> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.out = groups.out.saturating_sub(1);
        groups.next_group()
    }

    /// A channel no other group is publishing on: an idle one, or a new
    /// one of `connection`.
    async fn take<'a>(
        &'a self,
        connection: &Connection,
    ) -> Result<PublishChannel<'a>, BrokerError> {
        let idle = loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(channel) if channel.status().connected() => break Some(channel),
                // Closed by the broker since (a channel error): let it go.
                Some(_) => continue,
                None => break None,
            }
        };
        let channel = match idle {
            Some(channel) => channel,
            None => open_confirm_channel(connection).await?,
        };
        Ok(PublishChannel {
            channel,
            given_back: false,
            pool: self,
        })
    }
}

/// A confirm channel one group has to itself. [`PublishChannel::give_back`]
/// returns it for the next group once every confirm of this one settled;
/// dropped otherwise (a batch timed out, refused, or cut short), it is
/// closed, so a late return or confirm of its group can never be taken for
/// another's.
struct PublishChannel<'a> {
    channel: Channel,
    given_back: bool,
    pool: &'a Publishers,
}

impl PublishChannel<'_> {
    /// Every confirm of the group settled: the next group may use it.
    fn give_back(mut self) {
        self.given_back = true;
        self.pool
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.channel.clone());
    }
}

impl Drop for PublishChannel<'_> {
    fn drop(&mut self) {
        // Also after a refusal: a quorum queue that refused a message (at
        // its length limit, `overflow: reject-publish`) goes on refusing
        // every message that channel sends it, even once it has room again
        // or its limit is gone (RabbitMQ 3.10); a new channel is served
        // normally.
        if !self.given_back
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let channel = self.channel.clone();
            runtime.spawn(async move { close_channel(&channel, "publish cut short").await });
        }
    }
}

/// An outage at once if RabbitMQ blocks `connection` (a memory or disk
/// alarm): it reads nothing from it, not even a channel's opening, which
/// would wait out [`CALL_TIMEOUT`] and stay in the connection's table half
/// open, one more per call for as long as the alarm lasts (past the
/// channel limit the connection refuses every channel for good). The
/// publishing session is kept through an alarm, so this matters there.
fn unless_blocked(connection: &Connection) -> Result<(), BrokerError> {
    if connection.status().blocked() {
        return Err(BrokerError::Unavailable(
            "RabbitMQ blocks the publishing connection (a memory or disk alarm)".into(),
        ));
    }
    Ok(())
}

/// A new channel of `connection` in confirm mode.
async fn open_confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    unless_blocked(connection)?;
    let channel = within(CALL_TIMEOUT, "opening a channel", async {
        connection.create_channel().await.map_err(unavailable)
    })
    .await?;
    within(CALL_TIMEOUT, "confirm.select", async {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)
    })
    .await?;
    Ok(channel)
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("prefix", &self.topology.names.prefix())
            .finish()
    }
}

/// Longest wait for RabbitMQ to open a connection (TCP, TLS and the AMQP
/// handshake): lapin has no bound of its own, and a node that accepts a
/// socket but never answers (one starting or stopping its application)
/// would hold the session, and every call waiting for it, for good.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for RabbitMQ to answer one channel method (open, qos,
/// consume, cancel, declare, close, ack). Heartbeats catch a dead peer only
/// on a connection that finished its handshake, and a method sent on a
/// channel the broker is closing may never be answered.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for one batch to be published and confirmed: far more than
/// any batch a healthy broker takes (10,000 messages take well under a
/// second here); past it the publish is an outage (a broker blocking
/// publishers for a memory alarm, or a connection gone quiet) and the
/// caller retries it, which repeats at most messages that are harmless
/// twice.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// `call` (named by `what`, for the error), or [`BrokerError::Unavailable`]
/// once `limit` has passed without an answer.
async fn within<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(BrokerError::Unavailable(format!(
            "RabbitMQ did not answer {what} within {} s",
            limit.as_secs()
        )))
    })
}

/// Whether RabbitMQ refused a call for good, as it refuses a declare: the
/// queue exists with other arguments (406 PRECONDITION_FAILED), the user
/// may not (403 ACCESS_REFUSED), or another connection holds the queue
/// exclusively (405 RESOURCE_LOCKED). Anything else (the connection lost
/// mid-call, a node shutting down: 320 CONNECTION_FORCED) may pass later.
fn refused_for_good(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 405 | 406))
}

/// Whether RabbitMQ answered 404 NOT_FOUND: the queue named is missing.
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

fn unavailable(e: lapin::Error) -> BrokerError {
    if e.can_be_recovered() {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Fatal(e.to_string())
    }
}

/// Task queues declared again at once by a new session (each on a
/// channel of its own): a process that declared many does not wait a
/// round trip per queue, one after the other, while every caller waits
/// for the session.
const DECLARE_AGAIN_AT_ONCE: usize = 16;

/// Heartbeat (seconds) asked for unless the URL names one: RabbitMQ's
/// 60 s default notices a dead peer late.
const HEARTBEAT_S: u32 = 15;

/// Largest frame asked for unless the URL names one. lapin keeps a read and
/// a write ring of 32 frames per connection, so RabbitMQ's 128 KiB default
/// costs 8 MiB of memory per process; at 32 KiB they cost 2 MiB, and a
/// message larger than a frame (a big submission) is simply split into
/// more body frames.
const FRAME_MAX: u32 = 32 * 1024;

/// `url` with [`HEARTBEAT_S`] and [`FRAME_MAX`] unless it names its own.
fn with_connection_defaults(url: &str) -> String {
    let mut url = url.to_owned();
    for (key, value) in [("heartbeat", HEARTBEAT_S), ("frame_max", FRAME_MAX)] {
        if url_query_value(&url, key).is_none() {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{key}={value}");
        }
    }
    url
}

/// A plain lapin connection to the first node of `config.amqp_url` that
/// accepts one, trusting `tls_ca_file`, with the services' heartbeat and
/// frame size unless the URL names its own: for tools that need raw AMQP
/// (the bench's load and bare loop, cleanup), not for the service loops.
pub async fn tool_connection(config: &Config) -> Result<Connection, BrokerError> {
    let tls_ca = config
        .tls_ca()
        .map_err(|e| BrokerError::Fatal(e.to_string()))?;
    let urls: Vec<String> = split_urls(&config.amqp_url)
        .into_iter()
        .map(with_connection_defaults)
        .collect();
    let properties = ConnectionProperties::default().with_connection_name("conveyor tool".into());
    let (_, connection) = connect_first(&urls, 0, &tls_config(tls_ca.as_ref()), properties).await?;
    Ok(connection)
}

/// lapin's TLS settings: `tls_ca` as an extra trusted root, if given.
fn tls_config(tls_ca: Option<&TlsCa>) -> OwnedTLSConfig {
    OwnedTLSConfig {
        identity: None,
        cert_chain: tls_ca.map(|ca| ca.pem().to_owned()),
    }
}

/// The socket of a connection being made, kept to cut short a handshake
/// given up on. lapin runs each connection on an I/O thread of its own,
/// started before the handshake, which owns the socket and waits on it
/// until the peer closes it: dropping the connecting future does not end
/// it. A node that takes the socket and never answers (stopped with
/// `SIGSTOP`, or a link gone silent) left one thread, socket and pair of
/// frame buffers behind per attempt, every few seconds, for as long as
/// it stayed so.
#[derive(Clone, Default)]
struct HandshakeSocket {
    inner: Arc<std::sync::Mutex<(bool, Option<std::net::TcpStream>)>>,
}

impl HandshakeSocket {
    /// Keep a handle of the socket, or shut it down at once if the
    /// attempt was given up on meanwhile.
    fn keep(&self, socket: std::net::TcpStream) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.0 {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        } else {
            inner.1 = Some(socket);
        }
    }

    /// The connection is made: the handle kept of its socket (a second
    /// descriptor) is closed, the socket left to lapin.
    fn made(&self) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1 = None;
    }

    /// Whether the attempt was given up on.
    fn abandoned(&self) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Give the attempt up: shut the socket down (for both ends: lapin's
    /// thread reads its end and exits, closing the socket), and make no
    /// other.
    fn abandon(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0 = true;
        if let Some(socket) = inner.1.take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Gives its handshake up when dropped, unless emptied (the connection
/// was made).
struct AbandonOnDrop(Option<HandshakeSocket>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(socket) = self.0.take() {
            socket.abandon();
        }
    }
}

/// Connect to `url` as lapin's own connector does (TCP, then TLS for
/// `amqps://`), keeping a handle of the socket in `socket` so that the
/// attempt can be given up on ([`HandshakeSocket::abandon`]).
async fn connect_one(
    url: &str,
    properties: ConnectionProperties,
    tls: OwnedTLSConfig,
    socket: HandshakeSocket,
) -> lapin::Result<Connection> {
    // Not the parser's own text: for a URL without `//` it is `Invalid
    // URL: '<the whole URL>'`, password included.
    let uri: AMQPUri = url.parse().map_err(|_: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "amqp_url {} {}",
                redact_url(url),
                crate::config::amqp_url_problem(url).unwrap_or("is not an AMQP URL")
            ),
        )
    })?;
    let runtime = lapin::runtime::default_runtime()?;
    // Written where `connector` takes it: the types of its parameters (the
    // runtime's, and so the stream's) come from there.
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            if socket.abandoned() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection attempt was given up on",
                )
                .into());
            }
            let host = uri.authority.host.clone();
            let addresses: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), uri.authority.port))
                    .await?
                    .collect();
            let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
            if let AsyncTcpStream::Plain(plain) = &stream {
                use std::os::fd::AsFd;
                let handle = plain.get_ref().as_fd().try_clone_to_owned()?;
                socket.keep(std::net::TcpStream::from(handle));
            }
            Ok(match uri.scheme {
                AMQPScheme::AMQP => stream,
                AMQPScheme::AMQPS => stream.into_tls(&host, tls.as_ref()).await?,
            })
        },
        properties,
    )
    .await
}

/// A connection to the first of `urls` that accepts one, trying them in
/// turn from index `start`: its index and the connection, or an error
/// naming every node tried (passwords redacted).
async fn connect_first(
    urls: &[String],
    start: usize,
    tls: &OwnedTLSConfig,
    properties: ConnectionProperties,
) -> Result<(usize, Connection), BrokerError> {
    let mut failures = Vec::new();
    // Nodes that answered and refused the credentials or vhost, or whose
    // URL cannot be used at all: not an outage, and no amount of waiting
    // mends it.
    let mut refused = 0;
    for k in 0..urls.len() {
        let i = (start + k) % urls.len();
        let url = &urls[i];
        let socket = HandshakeSocket::default();
        // Given up on as well when this future is dropped mid-handshake
        // (a caller's own time-out, a hard stop).
        let mut unfinished = AbandonOnDrop(Some(socket.clone()));
        let attempt = connect_one(url, properties.clone(), tls.clone(), socket.clone());
        let text = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => {
                unfinished.0 = None;
                socket.made();
                return Ok((i, connection));
            }
            Ok(Err(e)) => {
                let text = e.to_string();
                let unusable_url = matches!(e.kind(), lapin::ErrorKind::IOError(io)
                    if io.kind() == std::io::ErrorKind::InvalidInput);
                if connection_refused_for_good(&text) || unusable_url {
                    refused += 1;
                }
                text
            }
            Err(_) => {
                socket.abandon();
                format!(
                    "no answer to the AMQP handshake within {} s (is the node starting or stopping, or is this not its AMQP port?)",
                    CONNECT_TIMEOUT.as_secs()
                )
            }
        };
        if urls.len() == 1 {
            failures.push(text);
        } else {
            failures.push(format!("{}: {text}", redact_url(url)));
        }
    }
    let what = format!("cannot connect to RabbitMQ: {}", failures.join("; "));
    if refused == urls.len() {
        Err(BrokerError::Fatal(format!(
            "{what} (check amqp_url: its form, user, password and vhost)"
        )))
    } else {
        Err(BrokerError::Unavailable(what))
    }
}

/// Whether a connection's refusal, as lapin words it, is one that waiting
/// cannot mend: credentials refused (`ACCESS_REFUSED`), or a vhost that
/// does not exist or that the user may not open (`NOT_ALLOWED`). RabbitMQ
/// answers `NOT_ALLOWED` for passing conditions too, which are outages: a
/// vhost still starting on a restarted node ("vhost / is down") and a
/// vhost's or user's connection limit ("connection limit (10) is
/// reached").
fn connection_refused_for_good(text: &str) -> bool {
    // RabbitMQ's own phrases (its reply text ends lapin's), not bare words:
    // a vhost may be named `rate-limits`.
    text.contains("ACCESS_REFUSED")
        || (text.contains("NOT_ALLOWED")
            && !text.trim_end().ends_with(" is down")
            && !text.contains("connection limit ("))
}

impl AmqpBroker {
    /// Connect to `url` (`amqp://` or `amqps://`, or several separated by
    /// commas: the nodes of one cluster), trusting `tls_ca` besides the
    /// system roots; fails if no node can be reached now (later losses are
    /// recovered transparently).
    pub async fn connect(
        url: &str,
        tls_ca: Option<&TlsCa>,
        topology: Topology,
    ) -> Result<AmqpBroker, BrokerError> {
        let urls: Vec<String> = split_urls(url)
            .into_iter()
            .map(with_connection_defaults)
            .collect();
        if urls.is_empty() {
            return Err(BrokerError::Fatal(
                "amqp_url (CONVEYOR_AMQP_URL) names no URL".into(),
            ));
        }
        let broker = AmqpBroker::unconnected(urls, tls_config(tls_ca), topology);
        broker.session().await?;
        Ok(broker)
    }

    /// A broker for `urls` that connects at its first call.
    fn unconnected(urls: Vec<String>, tls: OwnedTLSConfig, topology: Topology) -> AmqpBroker {
        AmqpBroker {
            urls,
            preferred: std::sync::atomic::AtomicUsize::new(0),
            tls,
            topology,
            session: tokio::sync::Mutex::new(None),
            consuming: tokio::sync::Mutex::new(None),
            failed_connect: std::sync::Mutex::new(None),
            live: std::sync::atomic::AtomicBool::new(false),
            declared: std::sync::Mutex::new(None),
        }
    }

    /// The live session, or a new one (with the topology declared again).
    async fn session(&self) -> Result<Arc<Session>, BrokerError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref() {
            if session.connection.status().connected() {
                return Ok(session.clone());
            }
            tracing::warn!("RabbitMQ connection lost; reconnecting");
        }
        *slot = None;
        self.live.store(false, std::sync::atomic::Ordering::Relaxed);
        let connection = self.connect_any("publishing").await?;
        let session = self.set_up(connection).await.inspect_err(|e| {
            // Shared as a failed connect is: every caller waiting on the
            // slot would otherwise make a connection of its own and redo
            // the declares, one after the other (a base queue without a
            // leader answers its declare only by the time-out).
            self.connect_failed(e);
        })?;
        *slot = Some(session.clone());
        self.live.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(session)
    }

    /// A session on a new `connection`: its confirm channel opened and the
    /// topology declared again. On failure the connection is dropped,
    /// which closes it.
    async fn set_up(&self, connection: Connection) -> Result<Arc<Session>, BrokerError> {
        let publisher = open_confirm_channel(&connection).await?;
        let session = Arc::new(Session {
            connection,
            publishers: Publishers::new(publisher),
        });
        let declared = self
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(declared) = declared {
            self.declare_again(&session, &declared).await?;
        }
        Ok(session)
    }

    /// Note a failed connect (or setting up of one), which callers that
    /// come within [`FAILED_CONNECT_SHARED`] share instead of trying again.
    fn connect_failed(&self, e: &BrokerError) {
        *self
            .failed_connect
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((std::time::Instant::now(), e.clone()));
    }

    /// The live connection for subscriptions, or a new one.
    async fn consuming(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut slot = self.consuming.lock().await;
        if let Some(connection) = slot.as_ref() {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
            tracing::warn!("RabbitMQ consuming connection lost; reconnecting");
        }
        *slot = None;
        let connection = Arc::new(self.connect_any("consuming").await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Drop the consuming connection if it is the one that just failed.
    async fn forget_consuming(&self, failed: &Arc<Connection>) {
        let mut slot = self.consuming.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            *slot = None;
        }
    }

    /// A connection to the first node that accepts one, starting with the
    /// one that answered last, named for its `purpose` (operators see
    /// `conveyor publishing` and `conveyor consuming` in RabbitMQ). Fails
    /// at once with the last failure if a connect failed less than
    /// [`FAILED_CONNECT_SHARED`] ago.
    async fn connect_any(&self, purpose: &str) -> Result<Connection, BrokerError> {
        use std::sync::atomic::Ordering;
        if let Some((at, e)) = self
            .failed_connect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && at.elapsed() < FAILED_CONNECT_SHARED
        {
            return Err(e.clone());
        }
        let start = self.preferred.load(Ordering::Relaxed);
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("conveyor {purpose}").as_str().into());
        let connected = connect_first(&self.urls, start, &self.tls, properties).await;
        let (i, connection) = connected.inspect_err(|e| self.connect_failed(e))?;
        if i != start {
            tracing::info!(node = %redact_url(&self.urls[i]), "connected to another RabbitMQ node");
        }
        self.preferred.store(i, Ordering::Relaxed);
        Ok(connection)
    }

    fn work_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let dead = self.topology.names.dead_queue();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(dead.as_str())),
        );
        match self.topology.queue_type {
            QueueType::Quorum => {
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("quorum".into()),
                );
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(i64::from(self.topology.delivery_limit)),
                );
            }
            QueueType::Classic => {
                args.insert(
                    "x-queue-type".into(),
                    AMQPValue::LongString("classic".into()),
                );
            }
        }
        args
    }

    /// The queues every process declares, with their arguments: dead,
    /// submit, referred.
    fn base_queues(&self) -> [(String, FieldTable); 3] {
        let names = &self.topology.names;
        let mut dead_args = FieldTable::default();
        if self.topology.queue_type == QueueType::Quorum {
            dead_args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        [
            (names.dead_queue(), dead_args),
            (names.submit_queue(), self.work_queue_args()),
            (names.referred_queue(), self.work_queue_args()),
        ]
    }

    async fn declare_all(
        &self,
        session: &Session,
        task_queues: &[String],
    ) -> Result<(), BrokerError> {
        let names = &self.topology.names;
        for (queue, args) in self.base_queues() {
            declare_queue(session, &queue, args).await?;
        }
        for q in task_queues {
            declare_queue(session, &names.task_queue(q), self.work_queue_args()).await?;
        }
        Ok(())
    }

    /// Declare again, on a new session, what this process declared (the
    /// base queues, then the task queues, several at once), as far as
    /// RabbitMQ lets it. A queue refused for good (since recreated with
    /// other arguments by a process of a newer config) is logged and left
    /// as it is: publishing to it still works, and failing the reconnect
    /// for it would cut this process off from every queue. A task queue
    /// that fails for another reason is logged and left for a publish or
    /// subscription that finds it missing to declare; a base queue, which
    /// RabbitMQ itself dead-letters into, is declared again in the
    /// background until it is. Only when no base queue could be declared
    /// (RabbitMQ answers no declare at all) does the session fail.
    ///
    /// A quorum queue without a leader answers only at the time-out: one
    /// such queue (the seldom used dead-letter queue, say, after losing the
    /// nodes it lived on) failed every reconnect until the thirty-seventh
    /// session, leaving the process publishing and consuming nothing.
    async fn declare_again(
        &self,
        session: &Arc<Session>,
        task_queues: &[String],
    ) -> Result<(), BrokerError> {
        let [dead, submit, referred] = self.base_queues();
        let (d, s, r) = tokio::join!(
            declare_queue(session, &dead.0, dead.1.clone()),
            declare_queue(session, &submit.0, submit.1.clone()),
            declare_queue(session, &referred.0, referred.1.clone()),
        );
        let declared = [(dead, d), (submit, s), (referred, r)];
        let base = declared.len();
        let mut missing = Vec::new();
        for (queue, declared) in declared {
            match declared {
                Ok(()) => {}
                Err(BrokerError::Fatal(e)) => {
                    tracing::warn!(queue = %queue.0, error = %e, "queue not declared again on reconnecting; using it as it is");
                }
                Err(e) => {
                    tracing::warn!(queue = %queue.0, error = %e, "queue not declared again on reconnecting; trying again in the background");
                    missing.push((queue, e));
                }
            }
        }
        // None declared: RabbitMQ answers no declare at all.
        if missing.len() == base
            && let Some((_, e)) = missing.pop()
        {
            return Err(e);
        }
        if !missing.is_empty() {
            let queues = missing.into_iter().map(|(queue, _)| queue).collect();
            tokio::spawn(keep_declaring(Arc::downgrade(session), queues));
        }
        let names = &self.topology.names;
        let args = self.work_queue_args();
        let queues: Vec<String> = task_queues.iter().map(|q| names.task_queue(q)).collect();
        let mut declares = futures::stream::iter(queues)
            .map(|queue: String| {
                let args = args.clone();
                async move { (declare_queue(session, &queue, args).await, queue) }
            })
            .buffer_unordered(DECLARE_AGAIN_AT_ONCE);
        while let Some((declared, queue)) = declares.next().await {
            match declared {
                Ok(()) => {}
                Err(BrokerError::Fatal(e)) => {
                    tracing::warn!(%queue, error = %e, "task queue not declared again on reconnecting; using it as it is");
                }
                // One task queue is not worth the session: a publish to
                // it, if it is missing, comes back returned and declares
                // it, and a subscription that finds it missing declares it.
                Err(e) => {
                    tracing::warn!(%queue, error = %e, "task queue not declared again on reconnecting; declared when a publish or a subscription finds it missing");
                }
            }
        }
        Ok(())
    }

    /// Drop the session if it is the one that just failed.
    async fn forget(&self, failed: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, failed)) {
            *slot = None;
            self.live.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Declare `queues` on `session` until each is, or refused for good,
/// while the session is in use and its connection up: the base queues a
/// new session could not declare ([`AmqpBroker::declare_again`]).
async fn keep_declaring(session: std::sync::Weak<Session>, mut queues: Vec<(String, FieldTable)>) {
    let mut waits = crate::backoff::Reconnect::new(Duration::from_secs(1), Duration::from_secs(30));
    while !queues.is_empty() {
        tokio::time::sleep(waits.next_delay()).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        if !session.connection.status().connected() {
            return;
        }
        let mut left = Vec::new();
        for (queue, args) in queues {
            match declare_queue(&session, &queue, args.clone()).await {
                Ok(()) => tracing::info!(%queue, "queue declared again"),
                Err(BrokerError::Fatal(e)) => {
                    tracing::warn!(%queue, error = %e, "queue not declared again; using it as it is");
                }
                Err(_) => left.push((queue, args)),
            }
        }
        queues = left;
    }
}

/// Whether `connection` still answers: a channel opened (and closed)
/// within [`CALL_TIMEOUT`]. A publish or subscription that failed on a
/// connection still marked connected may have met one slow queue (keep
/// the connection) or a peer gone silent whose heartbeat has not yet run
/// out (lapin notices after 30 s of silence at the 15 s heartbeat, and
/// never with the heartbeat turned off): make a new one.
async fn still_answers(connection: &Connection) -> bool {
    match open_channel(connection).await {
        Ok(channel) => {
            close_channel(&channel, "still answering").await;
            true
        }
        Err(_) => false,
    }
}

async fn declare_queue(session: &Session, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    unless_blocked(&session.connection)?;
    let channel = open_channel(&session.connection).await?;
    within(CALL_TIMEOUT, "queue.declare", async {
        channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map_err(|e| {
                if refused_for_good(&e) {
                    BrokerError::Fatal(format!(
                        "cannot declare queue {name} (if it exists with other arguments, delete it or use another prefix): {e}"
                    ))
                } else {
                    BrokerError::Unavailable(format!("cannot declare queue {name}: {e}"))
                }
            })
    })
    .await?;
    close_channel(&channel, "declared").await;
    Ok(())
}

/// A new channel on `connection`.
async fn open_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    within(CALL_TIMEOUT, "opening a channel", async {
        connection.create_channel().await.map_err(unavailable)
    })
    .await
}

/// Close a channel that served its purpose; an error or no answer leaves
/// it to the connection (nothing on it is waiting).
async fn close_channel(channel: &Channel, reason: &str) {
    let _ = tokio::time::timeout(CALL_TIMEOUT, channel.close(200, reason.into())).await;
}

fn properties(msg: &Outgoing) -> BasicProperties {
    let p = &msg.properties;
    let mut props = BasicProperties::default();
    if msg.persistent {
        props = props.with_delivery_mode(2);
    }
    if let Some(v) = p.content_type.as_deref().and_then(short) {
        props = props.with_content_type(v);
    }
    if let Some(v) = p.content_encoding.as_deref().and_then(short) {
        props = props.with_content_encoding(v);
    }
    if let Some(v) = p.correlation_id.as_deref().and_then(short) {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = p.reply_to.as_deref().and_then(short) {
        props = props.with_reply_to(v);
    }
    if let Some(v) = p.message_id.as_deref().and_then(short) {
        props = props.with_message_id(v);
    }
    if let Some(v) = p.timestamp {
        props = props.with_timestamp(v);
    }
    if let Some(v) = p.kind.as_deref().and_then(short) {
        props = props.with_type(v);
    }
    if let Some(v) = p.app_id.as_deref().and_then(short) {
        props = props.with_app_id(v);
    }
    if let Some(v) = p.priority {
        props = props.with_priority(v);
    }
    if !p.headers.is_empty() {
        props = props.with_headers(field_table(&p.headers));
    }
    props
}

/// `s` as an AMQP short string; `None` (the property or header left out)
/// past its 255-byte limit. What Conveyor copies came from the broker as
/// short strings, so only a caller's own over-long value is dropped.
fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

fn field_table(headers: &[(String, HeaderValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        if let Some(key) = short(k) {
            table.insert(key, amqp_value(v));
        }
    }
    table
}

fn amqp_value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Text(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.as_slice())),
        HeaderValue::List(items) => {
            AMQPValue::FieldArray(items.iter().map(amqp_value).collect::<Vec<_>>().into())
        }
        HeaderValue::Table(entries) => AMQPValue::FieldTable(field_table(entries)),
        HeaderValue::Void => AMQPValue::Void,
    }
}

fn header_value(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::DecimalValue(d) => HeaderValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => HeaderValue::Text(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::Text(text.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::FieldArray(items) => {
            HeaderValue::List(items.as_slice().iter().map(header_value).collect())
        }
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::FieldTable(table) => HeaderValue::Table(header_entries(table)),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => HeaderValue::Void,
    }
}

fn header_entries(table: &FieldTable) -> Vec<(String, HeaderValue)> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), header_value(v)))
        .collect()
}

/// What a delivered message says about itself, as Conveyor's neutral
/// [`Properties`] (`expiration` and `user_id` are not kept: see there).
fn delivered_properties(props: &BasicProperties) -> Properties {
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
    Properties {
        content_type: text(props.content_type()),
        content_encoding: text(props.content_encoding()),
        correlation_id: text(props.correlation_id()),
        reply_to: text(props.reply_to()),
        message_id: text(props.message_id()),
        timestamp: *props.timestamp(),
        kind: text(props.kind()),
        app_id: text(props.app_id()),
        priority: *props.priority(),
        headers: props
            .headers()
            .as_ref()
            .map(header_entries)
            .unwrap_or_default(),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, task_queues: &[String]) -> Result<(), BrokerError> {
        let session = self.session().await?;
        let result = self.declare_all(&session, task_queues).await;
        if result.is_ok() {
            let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
            let declared = declared.get_or_insert_with(Vec::new);
            for q in task_queues {
                if !declared.contains(q) {
                    declared.push(q.clone());
                }
            }
        }
        result
    }

    async fn publish(&self, batch: Vec<Outgoing>) -> Result<(), BrokerError> {
        self.publish_each(batch).await.map_err(|p| p.error)
    }

    async fn publish_each(&self, batch: Vec<Outgoing>) -> Result<(), PartlyPublished> {
        let sent = batch.len();
        let session = self
            .session()
            .await
            .map_err(|e| PartlyPublished::none_of(sent, e))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        if let Some(group) = session.publishers.enqueue(Request { batch, reply }) {
            // A task of its own, not this caller's future: the group holds
            // other callers' batches, which a caller dropped mid-publish (a
            // worker's hard stop) would cut short with its own.
            tokio::spawn(publish_group(session.clone(), group));
        }
        let result = answer.await.unwrap_or_else(|_| {
            Err(PartlyPublished::none_of(
                sent,
                BrokerError::Unavailable("the publish was cut short".into()),
            ))
        });
        // A failed publish keeps its connection if it is blocked or still
        // answers (the group's channel is closed already; the next group
        // opens another). A connection RabbitMQ blocked (a memory or disk
        // alarm) takes publishes again once the alarm clears; dropped, it
        // lingered unclosed (a blocked connection's Close is not read
        // either) while a new one was blocked in turn. And one slow queue
        // (a quorum queue without a leader confirms nothing until the
        // time-out) made a new connection, and declared every queue again,
        // after each time-out until the thirty-seventh session. A
        // connection that is down is replaced by the next call's `session`.
        if let Err(PartlyPublished {
            error: BrokerError::Unavailable(_),
            ..
        }) = &result
            && session.connection.status().connected()
            && !session.connection.status().blocked()
            && !still_answers(&session.connection).await
        {
            self.forget(&session).await;
        }
        result
    }

    async fn subscribe_with_priority(
        &self,
        queue: &str,
        prefetch: u16,
        priority: i16,
    ) -> Result<Box<dyn Subscription>, BrokerError> {
        // The publishing session first: a new one declares the queues
        // again (RabbitMQ may have lost them with its data).
        self.session().await?;
        let connection = self.consuming().await?;
        let mut result = subscribe_on(&connection, queue, prefetch, priority).await;
        if let Err(BrokerError::Unroutable { .. }) = &result {
            // The queue is gone (an operator deleted it): declared again,
            // as a returned publish has it, and consumed. Until the
            // thirty-first session nothing declared it, and every retry
            // dropped the (healthy) consuming connection.
            tracing::warn!(
                queue,
                "the queue to consume is missing (deleted?); declaring it again"
            );
            let names = &self.topology.names;
            let declared = match names.task_queue_of(queue) {
                Some(task_queue) => self.declare(&[task_queue.to_owned()]).await,
                None => self.declare(&[]).await,
            };
            result = match declared {
                Ok(()) => subscribe_on(&connection, queue, prefetch, priority).await,
                Err(e) => Err(e),
            };
        }
        // The consuming connection is made again once it is down
        // (`consuming` sees to that) or no longer answers. Until the
        // thirty-seventh session a subscription that failed on a sound one
        // (one slow queue's time-out, a declare refused on the blocked
        // publishing connection) dropped it, left open and in use by the
        // other subscriptions, while the next subscription opened another.
        if matches!(result, Err(BrokerError::Unavailable(_)))
            && connection.status().connected()
            && !still_answers(&connection).await
        {
            self.forget_consuming(&connection).await;
        }
        result
    }

    async fn queue_stats(&self, queues: &[String]) -> Result<Vec<QueueStats>, BrokerError> {
        let session = self.session().await?;
        let mut out = Vec::new();
        for q in queues {
            // A passive declare of a missing queue closes its channel, so
            // each query gets a throwaway channel.
            unless_blocked(&session.connection)?;
            let channel = open_channel(&session.connection).await?;
            let declared = within(CALL_TIMEOUT, "a passive queue.declare", async {
                Ok(channel
                    .queue_declare(
                        ShortString::from(q.as_str()),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await)
            })
            .await?;
            match declared {
                Ok(info) => {
                    out.push(QueueStats {
                        queue: q.clone(),
                        ready: info.message_count(),
                        consumers: info.consumer_count(),
                    });
                    close_channel(&channel, "done").await;
                }
                // Missing (deleted since it was listed): left out.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(out)
    }

    /// The publishing connection, which an idle process whose consumers
    /// live on their own connection would not make again until it
    /// published.
    async fn ensure_connected(&self) -> Result<(), BrokerError> {
        self.session().await.map(|_| ())
    }

    fn is_connected(&self) -> bool {
        // The lock is held for a moment by every call, and for as long as
        // a handshake takes by a reconnect: `live` says which.
        match self.session.try_lock() {
            Ok(slot) => slot
                .as_ref()
                .is_some_and(|s| s.connection.status().connected()),
            Err(_) => self.live.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Publishes handed to lapin at once. Each `basic_publish` returns only
/// after lapin's I/O thread has written its frames, so one at a time a
/// 10,000-task release costs 10,000 hand-offs between threads; in a
/// window they overlap. The first poll of each publish (which queues its
/// frames and takes its delivery tag, in one step) still happens in batch
/// order.
const PUBLISH_WINDOW: usize = 256;

/// Why each message of a batch was not confirmed (`None`: confirmed), in
/// batch order.
type Unconfirmed = Vec<Option<BrokerError>>;

async fn publish_on(publisher: PublishChannel<'_>, batch: &[Outgoing]) -> Result<(), Unconfirmed> {
    let unsent = |e: BrokerError| vec![Some(e); batch.len()];
    let mut pending = Vec::with_capacity(batch.len());
    let mut in_flight = FuturesOrdered::new();
    for msg in batch {
        in_flight.push_back(publish_one(&publisher.channel, msg));
        if in_flight.len() >= PUBLISH_WINDOW
            && let Some(sent) = in_flight.next().await
        {
            pending.push(sent.map_err(unsent)?);
        }
    }
    while let Some(sent) = in_flight.next().await {
        pending.push(sent.map_err(unsent)?);
    }
    drop(in_flight);
    // Nothing to allocate for a batch wholly confirmed.
    let mut failed: Vec<(usize, BrokerError)> = Vec::new();
    let mut returned: Vec<BasicReturnMessage> = Vec::new();
    for (i, confirm) in pending.into_iter().enumerate() {
        let err = match confirm.await {
            Ok(Confirmation::Ack(None)) => continue,
            Ok(Confirmation::Ack(Some(ret))) => {
                // Whose it is is settled below, by the queue it names.
                returned.push(ret);
                continue;
            }
            Ok(Confirmation::Nack(ret)) => {
                returned.extend(ret);
                BrokerError::Refused {
                    queue: batch[i].queue.clone(),
                    reason: "nacked".into(),
                }
            }
            Ok(Confirmation::NotRequested) => {
                BrokerError::Fatal("publisher confirms are not enabled".into())
            }
            Err(e) => unavailable(e),
        };
        failed.push((i, err));
    }
    // Every confirm settled and none refused: the channel serves the next
    // batch. Dropped, it closes (see `PublishChannel`).
    if failed.is_empty() {
        publisher.give_back();
        if returned.is_empty() {
            return Ok(());
        }
    }
    let mut unconfirmed: Unconfirmed = vec![None; batch.len()];
    for (i, err) in failed {
        unconfirmed[i] = Some(err);
    }
    for ret in &returned {
        let queue = ret.delivery.routing_key.as_str();
        for (msg, verdict) in batch.iter().zip(unconfirmed.iter_mut()) {
            if msg.queue == queue && verdict.is_none() {
                *verdict = Some(BrokerError::Unroutable {
                    queue: msg.queue.clone(),
                    reason: format!("returned: {} {}", ret.reply_code, ret.reply_text),
                });
            }
        }
    }
    Err(unconfirmed)
}

/// Hand one message to lapin: its queue and the confirm to wait for.
async fn publish_one(publisher: &Channel, msg: &Outgoing) -> Result<PublisherConfirm, BrokerError> {
    let confirm = publisher
        .basic_publish(
            ShortString::from(""),
            ShortString::from(msg.queue.as_str()),
            BasicPublishOptions {
                mandatory: msg.mandatory,
                ..BasicPublishOptions::default()
            },
            &msg.body,
            properties(msg),
        )
        .await
        .map_err(unavailable)?;
    Ok(confirm)
}

/// How long a failed connect answers for the callers that come after it:
/// each waited for the session lock while it was tried, and trying again
/// each in turn would make the last wait for all their attempts (10 s a
/// node that never answers), holding up their work and a shutdown.
const FAILED_CONNECT_SHARED: Duration = Duration::from_secs(1);

/// `x-priority` when it is not the default (0).
fn consumer_arguments(priority: i16) -> FieldTable {
    let mut arguments = FieldTable::default();
    if priority != 0 {
        arguments.insert("x-priority".into(), AMQPValue::LongInt(i32::from(priority)));
    }
    arguments
}

async fn subscribe_on(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    priority: i16,
) -> Result<Box<dyn Subscription>, BrokerError> {
    let channel = open_channel(connection).await?;
    match consume_on(&channel, queue, prefetch, priority).await {
        Ok(consumer) => Ok(Box::new(AmqpSubscription {
            queue: queue.to_owned(),
            acks: Arc::new(AckBatcher {
                channel: channel.clone(),
                state: std::sync::Mutex::new(AckState::default()),
                sending: tokio::sync::Mutex::new(()),
            }),
            channel,
            consumer,
        })),
        Err(e) => {
            // A `basic.consume` answered after its time-out registers a
            // consumer in lapin that nobody reads and nothing cancels:
            // RabbitMQ would push up to the prefetch into it, held unacked
            // until `consumer_timeout` (30 min) closed the channel. Closed
            // now, after the consume in RabbitMQ's order, the channel takes
            // that consumer with it and its messages go back at once.
            tokio::spawn(async move { close_channel(&channel, "subscription failed").await });
            Err(e)
        }
    }
}

/// Set `channel`'s prefetch and start consuming `queue` on it.
async fn consume_on(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
    priority: i16,
) -> Result<lapin::Consumer, BrokerError> {
    within(CALL_TIMEOUT, "basic.qos", async {
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(unavailable)
    })
    .await?;
    within(CALL_TIMEOUT, "basic.consume", async {
        channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                consumer_arguments(priority),
            )
            .await
            .map_err(|e| {
                // 404: the queue is missing, which closes this channel
                // only (the connection is sound).
                if is_not_found(&e) {
                    BrokerError::Unroutable {
                        queue: queue.to_owned(),
                        reason: e.to_string(),
                    }
                } else if refused_for_good(&e) {
                    // No read permission (403), the queue held exclusively
                    // (405), 406: this channel is closed, the connection
                    // is sound and kept for the other subscriptions.
                    BrokerError::Fatal(format!("consuming {queue}: {e}"))
                } else {
                    unavailable(e)
                }
            })
    })
    .await
}

struct AmqpSubscription {
    queue: String,
    channel: Channel,
    consumer: Consumer,
    acks: Arc<AckBatcher>,
}

/// Coalesces acks: one `basic.ack multiple=true` covers every delivery
/// acked since the last flush up to the oldest one still undecided, instead
/// of one frame (and one hand-off to lapin's I/O thread) per message.
/// Acks are flushed as soon as the acking tasks yield, so they are delayed
/// by a scheduler tick, not a timer. A delivery whose ack is lost with its
/// channel comes back and is deduplicated by its claim, as any redelivery.
struct AckBatcher {
    channel: Channel,
    state: std::sync::Mutex<AckState>,
    /// Flushes plan and send one at a time: a multiple ack overtaking an
    /// older flush's frame would make that frame ack an unknown tag, which
    /// closes the channel.
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct AckState {
    /// Delivered and not yet acked or requeued.
    outstanding: std::collections::BTreeSet<u64>,
    /// Acked by the caller, not yet sent.
    acked: std::collections::BTreeSet<u64>,
    flush_scheduled: bool,
}

/// What to send for the acks in `state`: a multiple ack up to a tag, and
/// single acks for tags beyond an older undecided delivery.
fn plan_acks(state: &mut AckState) -> (Option<u64>, Vec<u64>) {
    let oldest_open = state.outstanding.first().copied().unwrap_or(u64::MAX);
    let upto = state.acked.range(..oldest_open).next_back().copied();
    let singles: Vec<u64> = state.acked.range(oldest_open..).copied().collect();
    state.acked.clear();
    (upto, singles)
}

impl AckBatcher {
    fn delivered(&self, tag: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.outstanding.insert(tag);
    }

    fn ack(self: &Arc<Self>, tag: u64) {
        let schedule = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.outstanding.remove(&tag);
            state.acked.insert(tag);
            !std::mem::replace(&mut state.flush_scheduled, true)
        };
        if schedule {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                this.flush().await;
            });
        }
    }

    async fn flush(&self) {
        let _sending = self.sending.lock().await;
        let (upto, singles) = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.flush_scheduled = false;
            plan_acks(&mut state)
        };
        if let Some(tag) = upto
            && let Err(e) = within(CALL_TIMEOUT, "basic.ack", async {
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await
                    .map_err(unavailable)
            })
            .await
        {
            tracing::debug!(error = %e, "ack lost; the deliveries come back and are deduplicated");
        }
        for tag in singles {
            if let Err(e) = within(CALL_TIMEOUT, "basic.ack", async {
                self.channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                    .map_err(unavailable)
            })
            .await
            {
                tracing::debug!(error = %e, "ack lost; the delivery comes back and is deduplicated");
            }
        }
    }

    async fn requeue(&self, tag: u64) -> Result<(), BrokerError> {
        // The tag stays outstanding until the reject is on its way: a
        // multiple ack sent meanwhile must not cover (and so drop) it.
        let result = within(CALL_TIMEOUT, "basic.reject", async {
            self.channel
                .basic_reject(tag, BasicRejectOptions { requeue: true })
                .await
                .map_err(unavailable)
        })
        .await;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.outstanding.remove(&tag);
        result
    }
}

/// Settles one delivery. One dropped unsettled (the task holding it
/// panicked) is requeued: its subscription may live for days, and until
/// its channel closed the delivery would hold a prefetch slot, keep every
/// later ack on the channel out of the multiple ack, and, past RabbitMQ's
/// `consumer_timeout`, have the broker close the channel and requeue
/// everything on it.
struct AmqpAcker {
    tag: u64,
    batcher: Arc<AckBatcher>,
    settled: std::sync::atomic::AtomicBool,
}

impl AmqpAcker {
    fn new(tag: u64, batcher: Arc<AckBatcher>) -> AmqpAcker {
        batcher.delivered(tag);
        AmqpAcker {
            tag,
            batcher,
            settled: false.into(),
        }
    }

    /// Whether this is the first settling (a second is not sent: RabbitMQ
    /// closes the channel on an unknown tag).
    fn settling(&self) -> bool {
        !self.settled.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        if self.settling() {
            self.batcher.ack(self.tag);
        }
        Ok(())
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        if !self.settling() {
            return Ok(());
        }
        self.batcher.requeue(self.tag).await
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        if !self.settling() {
            return;
        }
        let (tag, batcher) = (self.tag, self.batcher.clone());
        // No runtime: the process is ending, and its channels with it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match batcher.requeue(tag).await {
                    Ok(()) => tracing::warn!(tag, "a delivery dropped unsettled was requeued"),
                    Err(e) => tracing::debug!(tag, error = %e, "a delivery dropped unsettled comes back with its channel"),
                }
            });
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BrokerError>> {
        let delivery = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(unavailable(e))),
        };
        let properties = delivered_properties(&delivery.properties);
        Some(Ok(Delivery {
            queue: self.queue.clone(),
            // The header only on a redelivery: on a first delivery it is
            // a publisher's (a message RabbitMQ's own delivery limit
            // dead-lettered, published again as it was), not a count.
            delivery_count: if delivery.redelivered {
                properties.delivery_count()
            } else {
                0
            },
            properties,
            redelivered: delivery.redelivered,
            body: delivery.data,
            acker: Box::new(AmqpAcker::new(delivery.delivery_tag, self.acks.clone())),
        }))
    }

    async fn cancel(&mut self) -> Result<(), BrokerError> {
        within(CALL_TIMEOUT, "basic.cancel", async {
            self.channel
                .basic_cancel(self.consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(unavailable)
        })
        .await
    }

    /// Acks are sent by a task of their own a moment after the caller's
    /// `ack` returns; a process exiting right after would lose them.
    async fn close(self: Box<Self>) {
        // A channel already closed (its connection lost) has nothing to
        // send; its deliveries went back with it.
        if !self.channel.status().connected() {
            return;
        }
        self.acks.flush().await;
        close_channel(&self.channel, "subscription closed").await;
    }
}

/// A listener that accepts connections and says nothing (a node whose
/// application is starting or stopping can look like this): its AMQP URL,
/// and the task to abort.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn silent_node() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), silent)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refusal_is_for_good_not_a_connection_lost_mid_call() {
        let amqp = |id: u16| {
            let error = lapin::protocol::AMQPError::from_id(id, "x".into()).unwrap();
            lapin::Error::from(lapin::ErrorKind::ProtocolError(error))
        };
        for refusal in [403, 405, 406] {
            assert!(refused_for_good(&amqp(refusal)), "{refusal}");
        }
        // CONNECTION_FORCED (a node shutting down), INTERNAL_ERROR.
        for passing in [320, 541] {
            assert!(!refused_for_good(&amqp(passing)), "{passing}");
        }
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!refused_for_good(&lapin::Error::from(reset)));
    }

    #[test]
    fn a_connection_refused_for_a_passing_reason_is_an_outage() {
        // As lapin words RabbitMQ's refusals (rabbit_reader's texts).
        let refused = |text: &str| {
            let reply = format!("NOT_ALLOWED - {text}");
            let error = lapin::protocol::AMQPError::from_id(530, reply.into()).unwrap();
            lapin::Error::from(lapin::ErrorKind::ProtocolError(error)).to_string()
        };
        for for_good in [
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN".to_owned(),
            refused("vhost nope not found"),
            refused("access to vhost '/' refused for user 'guest'"),
            refused("access to vhost 'rate-limits' refused for user 'x'"),
            refused("access to vhost 'is down' refused for user 'x'"),
        ] {
            assert!(connection_refused_for_good(&for_good), "{for_good}");
        }
        for passing in [
            refused("vhost / is down"),
            refused(
                "access to vhost '/' refused for user 'guest': connection limit (10) is reached",
            ),
            refused("Connection refused for user 'guest': user connection limit (5) is reached"),
            "connection reset by peer".to_owned(),
        ] {
            assert!(!connection_refused_for_good(&passing), "{passing}");
        }
    }

    #[test]
    fn acks_coalesce_up_to_the_oldest_undecided_delivery() {
        let mut state = AckState::default();
        state.outstanding.extend([4, 7]);
        state.acked.extend([1, 2, 3, 5, 6, 8]);
        assert_eq!(plan_acks(&mut state), (Some(3), vec![5, 6, 8]));
        assert!(state.acked.is_empty());
        let mut state = AckState::default();
        state.acked.extend([9, 10]);
        assert_eq!(plan_acks(&mut state), (Some(10), vec![]));
        let mut state = AckState::default();
        state.outstanding.insert(1);
        state.acked.insert(2);
        assert_eq!(plan_acks(&mut state), (None, vec![2]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_that_waited_for_a_failed_connect_share_its_failure() {
        let (url, silent) = silent_node().await;
        let topology = Topology {
            names: Names::new("unconnected"),
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
        };
        let broker = Arc::new(AmqpBroker::unconnected(
            vec![url],
            tls_config(None),
            topology,
        ));
        let started = std::time::Instant::now();
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let broker = broker.clone();
                tokio::spawn(async move { broker.declare(&[]).await })
            })
            .collect();
        for caller in callers {
            let failed = caller.await.unwrap();
            assert!(
                matches!(failed, Err(BrokerError::Unavailable(_))),
                "{failed:?}"
            );
        }
        let waited = started.elapsed();
        silent.abort();
        // One attempt (10 s), not one after another for each caller.
        assert!(
            waited < CONNECT_TIMEOUT * 2,
            "the last caller waited {waited:?}"
        );
    }

    /// A node that takes one socket and answers nothing on it: its URL,
    /// and a signal that fires once the client closed the socket.
    async fn silent_node_telling_when_closed() -> (
        String,
        tokio::sync::oneshot::Receiver<()>,
        tokio::task::JoinHandle<()>,
    ) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed, closing) = tokio::sync::oneshot::channel();
        let silent = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // Read (and answer nothing) until the client closes.
            let mut buf = [0u8; 64];
            while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            let _ = closed.send(());
        });
        let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
        (url, closing, silent)
    }

    /// A connect dropped mid-handshake (its caller's own time-out, a hard
    /// stop) gives the handshake up too: the socket is closed.
    #[tokio::test]
    async fn a_connect_dropped_mid_handshake_closes_its_socket() {
        let (url, closing, silent) = silent_node_telling_when_closed().await;
        let urls = [url];
        let tls = tls_config(None);
        let connect = connect_first(&urls, 0, &tls, ConnectionProperties::default());
        let cut_short = tokio::time::timeout(Duration::from_millis(500), connect).await;
        assert!(cut_short.is_err(), "the connect was not cut short");
        let seen = tokio::time::timeout(Duration::from_secs(5), closing).await;
        silent.abort();
        assert!(
            matches!(seen, Ok(Ok(()))),
            "the socket of the dropped connect is still open 5 s later"
        );
    }

    /// A node that takes the socket and never answers is given up on
    /// after [`CONNECT_TIMEOUT`], and its socket closed: lapin's I/O
    /// thread, which owns it, would otherwise wait on it (and stay) until
    /// the node closed it, one thread and socket more per attempt.
    #[tokio::test]
    async fn a_node_that_takes_the_socket_and_never_answers_is_given_up_on_and_its_socket_closed() {
        let (url, closing, silent) = silent_node_telling_when_closed().await;
        let urls = [url];
        let started = std::time::Instant::now();
        let outcome =
            connect_first(&urls, 0, &tls_config(None), ConnectionProperties::default()).await;
        let waited = started.elapsed();
        match outcome {
            Err(BrokerError::Unavailable(e)) => assert!(
                e.contains("no answer to the AMQP handshake within 10 s"),
                "{e}"
            ),
            Err(e) => panic!("not an outage: {e}"),
            Ok(_) => panic!("connected to a listener that never spoke AMQP"),
        }
        assert!(waited >= CONNECT_TIMEOUT, "gave up after {waited:?}");
        let seen = tokio::time::timeout(Duration::from_secs(5), closing).await;
        silent.abort();
        assert!(
            matches!(seen, Ok(Ok(()))),
            "the socket given up on is still open 5 s later"
        );
    }

    #[test]
    fn heartbeat_and_frame_size_are_added_unless_given() {
        assert_eq!(
            with_connection_defaults("amqp://h/%2f"),
            "amqp://h/%2f?heartbeat=15&frame_max=32768"
        );
        assert_eq!(
            with_connection_defaults("amqp://h/?a=b"),
            "amqp://h/?a=b&heartbeat=15&frame_max=32768"
        );
        assert_eq!(
            with_connection_defaults("amqp://h/?heartbeat=5&frame_max=131072"),
            "amqp://h/?heartbeat=5&frame_max=131072"
        );
        // Only the query counts: a password is not a setting.
        assert_eq!(
            with_connection_defaults("amqp://u:heartbeat=1@h/"),
            "amqp://u:heartbeat=1@h/?heartbeat=15&frame_max=32768"
        );
    }
}
