//! A cluster the drill starts itself (`drill --cluster N`): an etcd process
//! (a free loopback port, a temporary data dir, stopped by PID) and N
//! stampede nodes as child processes (this binary's hidden `node`
//! subcommand: the same `stampede::node::Node` the server runs, so a
//! `kill -9` of one is a real process crash), and the failover watch that
//! measures what clients saw when the leader was killed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stampede::cluster::{ClusterConfig, SyncDegrade};
use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede::wal::Durability;
use stampede_protocol::message::NodeRole;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The environment variable that carries a local cluster's token to its
/// nodes (every role: the drill is admin, the nodes follow each other).
const TOKEN_ENV: &str = "STAMPEDE_LOADGEN_CLUSTER_TOKEN";

pub struct LocalCluster {
    etcd: Child,
    nodes: Vec<(String, Option<Child>)>,
    pub token: String,
    dir: PathBuf,
}

impl LocalCluster {
    /// etcd and `n` nodes; returns once a leader serves.
    pub async fn start(n: usize, durability: Durability, sync_standbys: usize) -> anyhow::Result<LocalCluster> {
        let token = format!("{:032x}", stampede_protocol::client::new_reservation_id());
        let dir = std::env::temp_dir().join(format!("stampede-loadgen-cluster-{}-{}", std::process::id(), &token[..8]));
        std::fs::create_dir_all(&dir)?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("127.0.0.1:{client}");
        let etcd = Command::new("etcd")
            .args(["--data-dir", &dir.join("etcd").display().to_string()])
            .args(["--listen-client-urls", &format!("http://{endpoint}")])
            .args(["--advertise-client-urls", &format!("http://{endpoint}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log"))?)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start etcd (apt-get install etcd-server): {e}"))?;
        let mut cluster = LocalCluster { etcd, nodes: Vec::new(), token, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&endpoint).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "etcd did not listen on {endpoint}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let exe = std::env::current_exe()?;
        for i in 1..=n {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let child = Command::new(&exe)
                .args(["node", "--listen", &addr, "--etcd", &endpoint, "--node-id", &format!("n{i}")])
                .args(["--durability", if durability == Durability::Async { "async" } else { "fsync" }])
                .args(["--sync-standbys", &sync_standbys.to_string()])
                .arg("--data-dir")
                .arg(cluster.dir.join(format!("n{i}")))
                .env(TOKEN_ENV, &cluster.token)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(cluster.dir.join(format!("n{i}.log")))?)
                .spawn()?;
            cluster.nodes.push((addr, Some(child)));
        }
        cluster.leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Every node's address, comma-separated.
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>().join(",")
    }

    /// The index of the node that leads, waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, (addr, child)) in self.nodes.iter().enumerate() {
                if child.is_none() {
                    continue;
                }
                let mut config = stampede_protocol::client::ClientConfig::new(addr, &self.token);
                config.max_attempts = 1;
                config.connect_timeout = Duration::from_millis(300);
                if let Ok(client) = stampede_protocol::client::Client::connect(config).await {
                    if matches!(client.cluster().await, Ok(r) if r.role == NodeRole::Leader) {
                        return Ok(i);
                    }
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 the leader: its address and the moment.
    pub async fn kill_leader(&mut self) -> anyhow::Result<(String, Instant)> {
        let i = self.leader(Duration::from_secs(10)).await?;
        let (addr, child) = &mut self.nodes[i];
        let mut child = child.take().expect("a running leader");
        let killed = child.kill();
        let at = Instant::now();
        let _ = child.wait();
        killed?;
        Ok((addr.clone(), at))
    }

    /// The node at `addr`'s id, for reports.
    pub fn node_id(&self, addr: &str) -> String {
        self.nodes.iter().position(|(a, _)| a == addr).map_or_else(|| addr.to_string(), |i| format!("n{}", i + 1))
    }

    /// Stop every node (SIGTERM, then kill) and etcd; remove the data dirs.
    pub fn stop(mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(child) = child.as_mut() {
                let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The hidden `node` subcommand: one node of a [`LocalCluster`].
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    etcd: String,
    #[arg(long)]
    node_id: String,
    #[arg(long, value_enum, default_value = "fsync")]
    durability: Durability,
    #[arg(long, default_value_t = 1)]
    sync_standbys: usize,
}

/// Run one cluster node until SIGTERM (or until it must rejoin: exit 75).
pub fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let token = std::env::var(TOKEN_ENV).map_err(|_| anyhow::anyhow!("{TOKEN_ENV} is not set"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let node = runtime.block_on(async {
        let t = || Some(token.clone().into_bytes());
        let tokens = Tokens { admin: t(), checkout: None, replication: t(), insecure: false };
        let mut config = NodeConfig::new(&args.data_dir, &args.listen, tokens);
        config.wal.durability = args.durability;
        config.retention = Retention::Snapshot;
        config.pin_hot_shards = false;
        config.cluster = Some(ClusterConfig {
            etcd: vec![args.etcd.clone()],
            cluster: "drill".into(),
            node_id: args.node_id.clone(),
            advertise: args.listen.clone(),
            sync_standbys: args.sync_standbys,
            degrade: SyncDegrade::Never,
            sync_timeout: Duration::from_millis(stampede::limits::SYNC_STANDBY_TIMEOUT_MS_DEFAULT),
            lease_ttl: Duration::from_millis(stampede::limits::LEADER_LEASE_TTL_MS_DEFAULT),
            peer_token: token.clone(),
        });
        config.rejoin = Arc::new(|_: &str| std::process::exit(stampede::limits::EXIT_REJOIN));
        config.fatal = Arc::new(|_: &str| std::process::exit(70));
        Node::start(config).await
    })?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        term.recv().await;
        anyhow::Ok(())
    })?;
    node.shutdown()
}

/// What clients saw of a killed leader: armed at the kill, it records the
/// first reservation acknowledged by another node.
#[derive(Default)]
pub struct FailoverWatch {
    armed: AtomicBool,
    killed: Mutex<Option<(String, Instant)>>,
    first_ack: Mutex<Option<(String, Instant)>>,
}

impl FailoverWatch {
    pub fn arm(&self, killed_addr: String, at: Instant) {
        *self.killed.lock() = Some((killed_addr, at));
        self.armed.store(true, Ordering::Release);
    }

    /// A reservation was acknowledged by `node` (one atomic load when idle).
    pub fn acknowledged_by(&self, node: &str) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let killed = self.killed.lock().clone();
        if let Some((addr, _)) = killed {
            if addr != node {
                let mut first = self.first_ack.lock();
                if first.is_none() {
                    *first = Some((node.to_string(), Instant::now()));
                }
                self.armed.store(false, Ordering::Release);
            }
        }
    }

    /// `(killed node, new leader, ms from the kill to its first ack)`.
    pub fn window(&self) -> Option<(String, String, f64)> {
        let (killed, at) = self.killed.lock().clone()?;
        let (node, first) = self.first_ack.lock().clone()?;
        Some((killed, node, first.duration_since(at).as_secs_f64() * 1e3))
    }
}
