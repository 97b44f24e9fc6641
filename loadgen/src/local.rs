//! Servers the loadgen starts itself: a stampede node in-process (temporary
//! data dir, ephemeral loopback port) and, for `compare`, `redis-server`
//! processes with the durability under test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stampede::node::{Node, NodeConfig};
use stampede::recovery::Retention;
use stampede::server::Tokens;
use stampede::wal::Durability;

/// A stampede server in this process, on a temporary data dir.
pub struct LocalStampede {
    pub node: Node,
    pub token: String,
    dir: PathBuf,
}

impl LocalStampede {
    pub async fn start(durability: Durability) -> anyhow::Result<LocalStampede> {
        let token = format!("{:032x}", stampede_protocol::client::new_reservation_id());
        let dir = std::env::temp_dir().join(format!("stampede-loadgen-{}-{}", std::process::id(), &token[..8]));
        let tokens =
            Tokens { admin: Some(token.clone().into_bytes()), checkout: None, replication: None, insecure: false };
        let mut config = NodeConfig::new(&dir, "127.0.0.1:0", tokens);
        config.wal.durability = durability;
        // No reconciler follows a drill's throwaway log.
        config.retention = Retention::Snapshot;
        config.pool_shards = 1;
        let node = Node::start(config).await?;
        Ok(LocalStampede { node, token, dir })
    }

    pub fn addr(&self) -> String {
        self.node.addr().to_string()
    }

    /// Stop (off the async workers) and remove the data dir.
    pub async fn stop(self) -> anyhow::Result<()> {
        let LocalStampede { node, dir, .. } = self;
        tokio::task::spawn_blocking(move || node.shutdown()).await??;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}

/// A `redis-server` child on a free loopback port, killed on drop.
pub struct LocalRedis {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl LocalRedis {
    /// `appendfsync`: `always` (durable) or `everysec` (relaxed).
    pub fn start(appendfsync: &str) -> anyhow::Result<LocalRedis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("stampede-loadgen-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", appendfsync, "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot start redis-server (is it on PATH? apt-get install redis-server): {e}")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(LocalRedis { child, url: format!("redis://127.0.0.1:{port}"), dir })
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
