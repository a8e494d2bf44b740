//! A TCP forwarder a test can cut: one process reaches a server through
//! it, and the test cuts that process off (every connection through it
//! closed, new ones closed as soon as they are accepted) while the rest of
//! the deployment still reaches the server directly. A network partition
//! between one worker and Redis, made for real.
//!
//! It can also go silent ([`Cutter::silence`]): every connection stays
//! open and nothing crosses, and new ones are accepted and never answered,
//! as when packets are dropped on the way. Nothing tells either side the
//! link is dead: only heartbeats and time-outs can.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Cutter {
    pub port: u16,
    /// 1 while armed ([`Cutter::drop_next_reply`]), 3 while armed to cut
    /// too ([`Cutter::drop_next_reply_then_cut`]); 2 once it dropped one.
    drop_reply: Arc<AtomicUsize>,
    cut: Arc<AtomicBool>,
    silent: tokio::sync::watch::Sender<bool>,
    /// Connections accepted while silent, held open unanswered.
    held: Arc<Mutex<Vec<TcpStream>>>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Cutter {
    /// Forward 127.0.0.1:<a free port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the forwarder");
        let port = listener.local_addr().expect("its address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let (silent, _) = tokio::sync::watch::channel(false);
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let drop_reply = Arc::new(AtomicUsize::new(0));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, links, held, silent, drop_reply) = (
                cut.clone(),
                links.clone(),
                held.clone(),
                silent.clone(),
                drop_reply.clone(),
            );
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    // Checked under the lock `cut` drains with, so no link
                    // starts after a cut and survives it.
                    let mut live = links.lock().unwrap();
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    if *silent.borrow() {
                        held.lock().unwrap().push(inbound);
                        continue;
                    }
                    let mut silenced = silent.subscribe();
                    let drop_reply = drop_reply.clone();
                    let cut = cut.clone();
                    live.push(tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            tokio::select! {
                                _ = forward(&mut inbound, &mut outbound, &drop_reply, &cut) => {}
                                _ = async { drop(silenced.wait_for(|s| *s).await) } => {
                                    // Both sockets stay open, and nothing
                                    // crosses, until the link is dropped.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    }));
                }
            }
        });
        Cutter {
            port,
            drop_reply,
            cut,
            silent,
            held,
            links,
            accept,
        }
    }

    /// Close the connection the next answer from the server comes on,
    /// instead of forwarding it: the server ran the request, and its
    /// client never hears so.
    pub fn drop_next_reply(&self) {
        self.drop_reply.store(1, Ordering::SeqCst);
    }

    /// [`Cutter::drop_next_reply`], and refuse every new connection from
    /// then on, until [`Cutter::heal`]: the request ran, its answer is
    /// lost, and the client cannot reach the server to ask again.
    pub fn drop_next_reply_then_cut(&self) {
        self.drop_reply.store(3, Ordering::SeqCst);
    }

    /// Whether an answer was dropped since [`Cutter::drop_next_reply`].
    pub fn dropped_a_reply(&self) -> bool {
        self.drop_reply.load(Ordering::SeqCst) == 2
    }

    /// A `redis://` URL through the forwarder.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Close every connection through it, and every new one until
    /// [`Cutter::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            // Dropping the link's task drops both of its sockets.
            link.abort();
        }
    }

    /// Forward nothing, on every connection, old or new, and close none.
    pub fn silence(&self) {
        self.silent.send_replace(true);
    }

    /// Forward new connections again; close every connection left open
    /// by [`Cutter::silence`].
    pub fn heal(&self) {
        let mut live = self.links.lock().unwrap();
        for link in live.drain(..) {
            link.abort();
        }
        self.held.lock().unwrap().clear();
        self.silent.send_replace(false);
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Forward both ways until either side closes; an answer that comes while
/// `drop_reply` is armed (1, or 3 to set `cut` too) ends the link instead
/// (and marks it 2).
async fn forward(
    client: &mut TcpStream,
    server: &mut TcpStream,
    drop_reply: &AtomicUsize,
    cut: &AtomicBool,
) {
    let (mut from_client, mut to_client) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let up = tokio::io::copy(&mut from_client, &mut to_server);
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let armed = drop_reply.load(Ordering::SeqCst);
            if (armed == 1 || armed == 3)
                && drop_reply
                    .compare_exchange(armed, 2, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                if armed == 3 {
                    // Before the link closes: the client's next connection
                    // is refused.
                    cut.store(true, Ordering::SeqCst);
                }
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
