//! The TCP server: accept loop, connection cap, and the state every
//! connection shares. See [`conn`] for one connection's life.

pub mod auth;
pub mod conn;
pub mod log;
pub mod metrics;
pub mod ratelimit;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use auth::Tokens;

use crate::clock::{Clock, SystemClock};
use crate::limits::CONNECTIONS_MAX;
pub use crate::shard::Router;
use crate::shard::{Engines, SinkFactory};
use crate::sink::VolatileSink;

/// Shared by every connection task.
pub struct Shared {
    /// The shards and their routing table: set at start on a node that
    /// decides (a single node, a leader), later on a standby that is
    /// promoted; until then sale requests are answered `not_leader`. A
    /// `OnceLock`: one atomic load per request to reach it, written once.
    router: std::sync::OnceLock<Arc<Router>>,
    /// How the router is built when it is installed.
    router_config: RouterConfig,
    /// The address this server listens on.
    pub addr: SocketAddr,
    /// This node's part in its cluster (role, term, leader, standbys).
    pub cluster: Arc<crate::cluster::ClusterState>,
    pub tokens: Tokens,
    pub clock: Arc<dyn Clock>,
    /// The log operations; `None` on a server without a write-ahead log.
    pub log: Option<Arc<log::LogService>>,
    /// Replies sent, by opcode and status (for /metrics).
    pub requests: metrics::RequestCounters,
    /// Close connections idle this long (`CONNECTION_IDLE_TIMEOUT_MS`).
    pub idle_timeout: std::time::Duration,
    /// Per-user RESERVE rate (`None`: off).
    pub user_rate: Option<ratelimit::UserRateLimiter>,
    /// At most this many connections (`CONNECTIONS_MAX`).
    pub connections_max: usize,
    /// HELLO (and the TLS handshake) must complete within this.
    pub handshake_timeout: std::time::Duration,
    /// One permit per open connection, `connections_max` in all.
    connection_slots: Arc<Semaphore>,
    /// How shutdown tells each connection to stop reading, send the replies
    /// it owes, and close. One oneshot per connection rather than one
    /// shared watch: a connection polls its own signal before every frame,
    /// and a shared signal's waiter list is behind a mutex that every I/O
    /// thread would then take per request.
    closers: parking_lot::Mutex<Closers>,
}

#[derive(Default)]
struct Closers {
    closing: bool,
    next_id: u64,
    senders: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>,
}

/// A connection's shutdown signal; deregisters when dropped.
pub struct CloseSignal {
    shared: Arc<Shared>,
    id: u64,
    pub rx: tokio::sync::oneshot::Receiver<()>,
}

impl Drop for CloseSignal {
    fn drop(&mut self) {
        self.shared.closers.lock().senders.remove(&self.id);
    }
}

/// What building a router needs besides the engines.
struct RouterConfig {
    clock: Arc<dyn Clock>,
    pin_hot_shards: bool,
    placement: crate::placement::PlacementConfig,
}

impl RouterConfig {
    /// A router over `engines`, with its demand monitor running.
    fn build(&self, engines: Engines, sinks: SinkFactory) -> Arc<Router> {
        let router = Router::new(engines, self.clock.clone(), sinks, self.pin_hot_shards);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(crate::placement::monitor(router.clone(), self.placement.clone()));
            }
            Err(_) => tracing::warn!("no runtime: sales are not moved by demand"),
        }
        router
    }
}

impl Shared {
    /// The router, once this node decides (`None`: not the leader).
    #[inline]
    pub fn router(&self) -> Option<&Arc<Router>> {
        self.router.get()
    }

    /// Start deciding with `engines` (a standby promoted to leader): the
    /// shards start and sale requests are served from now on.
    pub fn install_router(&self, engines: Engines, sinks: SinkFactory) {
        let router = self.router_config.build(engines, sinks);
        if self.router.set(router).is_err() {
            panic!("the router is installed once");
        }
    }

    /// Connections currently being served.
    pub fn connections_active(&self) -> usize {
        self.connections_max - self.connection_slots.available_permits()
    }

    /// A new connection's shutdown signal; `None` once shutdown began (the
    /// connection should close at once).
    pub fn close_signal(self: &Arc<Self>) -> Option<CloseSignal> {
        let mut closers = self.closers.lock();
        if closers.closing {
            return None;
        }
        let id = closers.next_id;
        closers.next_id += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        closers.senders.insert(id, tx);
        Some(CloseSignal { shared: self.clone(), id, rx })
    }
}

/// How to build a server.
pub struct ServerConfig {
    pub tokens: Tokens,
    /// Shards in the pool for ordinary SKUs (hot SKUs get their own); used
    /// when `engines` is `None`.
    pub pool_shards: usize,
    /// Recovered engines to serve; `None` starts empty.
    pub engines: Option<Engines>,
    /// Pin hot shards to cores.
    pub pin_hot_shards: bool,
    /// The demand monitor's settings.
    pub placement: crate::placement::PlacementConfig,
    pub clock: Arc<dyn Clock>,
    pub sinks: SinkFactory,
    /// Serve REPLICATE / SETTLED / STATE_DUMP from this log.
    pub log: Option<Arc<log::LogService>>,
    /// Close authenticated connections idle (nothing sent, nothing in
    /// flight) this long.
    pub idle_timeout: std::time::Duration,
    /// RESERVE operations per second and burst allowed per user id
    /// (`None`: no per-user rate limit).
    pub user_rate: Option<(u32, u32)>,
    /// Speak TLS on the client port (`None`: plaintext).
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// Start without a router (a cluster node that is not the leader yet);
    /// [`ServerHandle::install_router`] adds it on promotion.
    pub defer_router: bool,
    /// The node's cluster state (`ClusterState::single()` without a cluster).
    pub cluster: Arc<crate::cluster::ClusterState>,
    /// Connection cap (`CONNECTIONS_MAX`; lower only in tests).
    pub connections_max: usize,
    /// HELLO deadline (`HANDSHAKE_TIMEOUT_MS`).
    pub handshake_timeout: std::time::Duration,
}

impl ServerConfig {
    pub fn new(tokens: Tokens) -> Self {
        ServerConfig {
            tokens,
            pool_shards: 1,
            engines: None,
            pin_hot_shards: true,
            placement: crate::placement::PlacementConfig::defaults(crate::placement::cores()),
            clock: Arc::new(SystemClock),
            sinks: Box::new(|_| Box::new(VolatileSink::default())),
            log: None,
            idle_timeout: std::time::Duration::from_millis(crate::limits::CONNECTION_IDLE_TIMEOUT_MS),
            user_rate: Some((crate::limits::USER_RESERVES_PER_S_DEFAULT, crate::limits::USER_RESERVES_BURST_DEFAULT)),
            tls: None,
            defer_router: false,
            cluster: Arc::new(crate::cluster::ClusterState::single()),
            connections_max: CONNECTIONS_MAX,
            handshake_timeout: std::time::Duration::from_millis(crate::limits::HANDSHAKE_TIMEOUT_MS),
        }
    }
}

/// A running server (accept loop spawned on the current runtime).
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// Stop accepting new connections.
    pub fn stop_accepting(&self) {
        self.accept.abort();
    }

    /// Ask every connection to stop reading, send the replies it owes and
    /// close; wait until all have, or `deadline` passed (a client that does
    /// not read its replies cannot hold the shutdown). Blocking: call it
    /// off the runtime's worker threads.
    pub fn close_connections(&self, deadline: std::time::Duration) -> usize {
        {
            let mut closers = self.shared.closers.lock();
            closers.closing = true;
            for (_, tx) in closers.senders.drain() {
                let _ = tx.send(());
            }
        }
        let started = std::time::Instant::now();
        while self.shared.connections_active() > 0 && started.elapsed() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.shared.connections_active()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Start serving on `listener`.
pub fn start(listener: TcpListener, config: ServerConfig) -> std::io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let router_config = RouterConfig {
        clock: config.clock.clone(),
        pin_hot_shards: config.pin_hot_shards,
        placement: config.placement.clone(),
    };
    let router = std::sync::OnceLock::new();
    if !config.defer_router {
        let engines = config.engines.unwrap_or_else(|| Engines::empty(config.pool_shards));
        let _ = router.set(router_config.build(engines, config.sinks));
    }
    let connection_slots = Arc::new(Semaphore::new(config.connections_max));
    let shared = Arc::new(Shared {
        router,
        router_config,
        addr,
        cluster: config.cluster,
        tokens: config.tokens,
        clock: config.clock,
        log: config.log,
        requests: metrics::RequestCounters::default(),
        idle_timeout: config.idle_timeout,
        connections_max: config.connections_max,
        handshake_timeout: config.handshake_timeout,
        user_rate: config.user_rate.map(|(rate, burst)| ratelimit::UserRateLimiter::new(rate, burst)),
        connection_slots,
        closers: Default::default(),
    });
    let tls = config.tls.map(tokio_rustls::TlsAcceptor::from);
    let accept = tokio::spawn(accept_loop(listener, shared.clone(), tls));
    Ok(ServerHandle { addr, shared, accept })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<tokio_rustls::TlsAcceptor>) {
    let slots = shared.connection_slots.clone();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = shared.connections_max, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        stream.set_nodelay(true).ok();
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => conn::serve(stream, shared).await,
                Some(acceptor) => {
                    // The TLS handshake counts against the HELLO deadline:
                    // a client that never finishes it is a slowloris too.
                    match tokio::time::timeout(shared.handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => conn::serve(stream, shared).await,
                        // Plaintext on a TLS port, a bad certificate, a
                        // timeout: close this connection, nothing else.
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
}
