//! The etcd v3 operations the cluster needs (get, put, delete, a
//! compare-and-set transaction, leases), over etcd's JSON gateway: the
//! `/v3/...` HTTP endpoints every etcd since 3.3 serves on its client port.
//!
//! Why not the `etcd-client` crate: it generates its gRPC code with
//! `tonic-build` at build time, which needs `protoc`, and the project must
//! build on a fresh machine with nothing but the Rust toolchain. The JSON
//! gateway is part of etcd's documented API (keys and values in base64,
//! 64-bit integers as strings) and needs only the HTTP/1 client the server
//! already links (hyper). A connection per request keeps it simple; the
//! cluster makes a few requests a second.
//!
//! Endpoints are tried in order; the first that answers is used.

use std::future::Future;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

/// How long one etcd request may take before the next endpoint is tried.
/// Short: the leader's lease renewals must not wait long on a dead node.
pub const ETCD_REQUEST_TIMEOUT_MS: u64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint answered ({0})")]
    Unreachable(String),
    #[error("etcd answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("etcd sent something unexpected: {0}")]
    Malformed(String),
}

/// One key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A client for a list of endpoints (`http://host:port` or `host:port`).
#[derive(Clone, Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn parse_kv(v: &Value) -> Result<KeyValue, EtcdError> {
    let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v.get(field).and_then(Value::as_str) {
            Some(s) => B64.decode(s).map_err(|e| EtcdError::Malformed(format!("{field}: {e}"))),
            None => Ok(Vec::new()),
        }
    };
    Ok(KeyValue {
        key: String::from_utf8_lossy(&decode("key")?).into_owned(),
        value: decode("value")?,
        create_revision: v.get("create_revision").map_or(0, int),
        mod_revision: v.get("mod_revision").map_or(0, int),
        lease: v.get("lease").map_or(0, int),
    })
}

impl Etcd {
    pub fn new(endpoints: &[String]) -> Etcd {
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim().trim_start_matches("http://").trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        Etcd { endpoints }
    }

    /// POST `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let body = Bytes::from(body.to_string());
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            let attempt = tokio::time::timeout(
                Duration::from_millis(ETCD_REQUEST_TIMEOUT_MS),
                Self::post(endpoint, path, body.clone()),
            )
            .await;
            match attempt {
                Ok(Ok((200, reply))) => {
                    return serde_json::from_slice(&reply).map_err(|e| EtcdError::Malformed(e.to_string()))
                }
                Ok(Ok((status, reply))) => {
                    return Err(EtcdError::Refused { status, body: String::from_utf8_lossy(&reply).into_owned() })
                }
                Ok(Err(e)) => failures.push(format!("{endpoint}: {e}")),
                Err(_) => failures.push(format!("{endpoint}: timed out")),
            }
        }
        Err(EtcdError::Unreachable(failures.join("; ")))
    }

    /// One POST to one endpoint's JSON gateway, no retries: the status and
    /// body. (Public so tests can watch etcd from outside a partition.)
    pub async fn post(endpoint: &str, path: &str, body: Bytes) -> Result<(u16, Bytes), String> {
        let stream = tokio::net::TcpStream::connect(endpoint).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).ok();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, endpoint)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    /// Delete `key` only while it has `create_revision` (a leader giving up
    /// its own key, never a successor's).
    pub async fn delete_if_created_at(&self, key: &str, create_revision: i64) -> Result<bool, EtcdError> {
        let body = json!({
            "compare": [{ "target": "CREATE", "key": b64(key.as_bytes()), "create_revision": create_revision.to_string() }],
            "success": [{ "request_delete_range": { "key": b64(key.as_bytes()) } }],
        });
        let reply = self.call("/v3/kv/txn", body).await?;
        Ok(reply.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }
}

/// The etcd operations the election uses, as a seam: the server runs them
/// against etcd ([`Etcd`]), the simulator against its own model of etcd's
/// keys, revisions and leases (`sim/etcd.rs`), so the election's real code
/// runs in both. Each operation is documented on etcd's implementation.
pub trait Kv: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, EtcdError>> + Send;
    fn get_prefix(&self, prefix: &str) -> impl Future<Output = Result<Vec<KeyValue>, EtcdError>> + Send;
    fn put(&self, key: &str, value: &[u8], lease: i64) -> impl Future<Output = Result<i64, EtcdError>> + Send;
    fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> impl Future<Output = Result<Option<i64>, EtcdError>> + Send;
    fn put_if_created_at(
        &self,
        guard: &str,
        create_revision: i64,
        key: &str,
        value: &[u8],
    ) -> impl Future<Output = Result<bool, EtcdError>> + Send;
    fn grant(&self, ttl_s: u64) -> impl Future<Output = Result<i64, EtcdError>> + Send;
    fn keep_alive(&self, lease: i64) -> impl Future<Output = Result<bool, EtcdError>> + Send;
    fn revoke(&self, lease: i64) -> impl Future<Output = Result<(), EtcdError>> + Send;
}

impl Kv for Etcd {
    /// The key, if it exists.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let reply = self.call("/v3/kv/range", json!({ "key": b64(key.as_bytes()) })).await?;
        match reply.get("kvs").and_then(Value::as_array).and_then(|kvs| kvs.first()) {
            Some(kv) => Ok(Some(parse_kv(kv)?)),
            None => Ok(None),
        }
    }

    /// Every key under `prefix`.
    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let reply = self.call("/v3/kv/range", json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&end) })).await?;
        reply.get("kvs").and_then(Value::as_array).map_or(Ok(Vec::new()), |kvs| kvs.iter().map(parse_kv).collect())
    }

    /// Put `value` at `key`, attached to `lease` (0: none); the revision.
    async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let reply = self.call("/v3/kv/put", body).await?;
        Ok(reply.get("header").and_then(|h| h.get("revision")).map_or(0, int))
    }

    /// Create `key` = `value` (with `lease`) only if it does not exist: the
    /// campaign. `Some(revision)` of the creation if this call created it.
    async fn create(&self, key: &str, value: &[u8], lease: i64) -> Result<Option<i64>, EtcdError> {
        let mut put = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let body = json!({
            "compare": [{ "target": "CREATE", "key": b64(key.as_bytes()), "create_revision": "0" }],
            "success": [{ "request_put": put }],
        });
        let reply = self.call("/v3/kv/txn", body).await?;
        let succeeded = reply.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok(succeeded.then(|| reply.get("header").and_then(|h| h.get("revision")).map_or(0, int)))
    }

    /// Put `key` = `value` only while `guard` still has `create_revision`
    /// (the writer still holds the key it created: a leader writing under
    /// its own term). Whether it was written.
    async fn put_if_created_at(
        &self,
        guard: &str,
        create_revision: i64,
        key: &str,
        value: &[u8],
    ) -> Result<bool, EtcdError> {
        let body = json!({
            "compare": [{
                "target": "CREATE", "key": b64(guard.as_bytes()), "create_revision": create_revision.to_string(),
            }],
            "success": [{ "request_put": { "key": b64(key.as_bytes()), "value": b64(value) } }],
        });
        let reply = self.call("/v3/kv/txn", body).await?;
        Ok(reply.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// A new lease of `ttl` seconds; its id.
    async fn grant(&self, ttl_s: u64) -> Result<i64, EtcdError> {
        let reply = self.call("/v3/lease/grant", json!({ "TTL": ttl_s.to_string() })).await?;
        match reply.get("ID").map(int) {
            Some(id) if id != 0 => Ok(id),
            _ => Err(EtcdError::Malformed(format!("lease grant without an id: {reply}"))),
        }
    }

    /// Renew a lease once; `false` if etcd no longer has it (it expired).
    async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let reply = self.call("/v3/lease/keepalive", json!({ "ID": lease.to_string() })).await?;
        let result = reply.get("result").unwrap_or(&reply);
        Ok(result.get("TTL").map_or(0, int) > 0)
    }

    /// Give a lease up (its keys go at once).
    async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({ "ID": lease.to_string() })).await.map(|_| ())
    }
}
