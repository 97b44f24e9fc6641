//! TLS on the client port, against a real server on 127.0.0.1: a client
//! that trusts the CA works (library and stampede-ctl), a plaintext client
//! is refused cleanly and the server goes on.

mod common;

use std::path::PathBuf;

use stampede_protocol::client::{Client, ClientConfig, ClientError};
use stampede_protocol::Status;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_clients_work_and_plaintext_is_refused_cleanly() {
    let tls = stampede_protocol::tls::server_config(&data("server.pem"), &data("server.key")).unwrap();
    let server = common::start_server_with(|c| c.tls = Some(tls)).await;

    let mut config = ClientConfig::new(&server.addr, common::ADMIN_TOKEN);
    config.tls = Some(stampede_protocol::tls::client_config(&data("ca.pem")).unwrap());
    let client = Client::connect(config.clone()).await.expect("a TLS client connects");
    assert_eq!(client.ping().await.unwrap().status, Status::Ok);
    let sale = stampede_protocol::message::SaleCreate {
        sku: 3,
        stock: 5,
        limit_per_user: 1,
        ttl_ms: 60_000,
        hot: false,
        queue: None,
    };
    assert_eq!(client.create_sale(sale).await.unwrap().status, Status::Ok);
    assert_eq!(client.reserve(3, 7, 1, 1).await.unwrap().status, Status::Reserved);

    // Plaintext on the TLS port: an error for that client, nothing more.
    let mut plain = ClientConfig::new(&server.addr, common::ADMIN_TOKEN);
    plain.max_attempts = 1;
    plain.connect_timeout = std::time::Duration::from_secs(2);
    plain.request_timeout = std::time::Duration::from_secs(2);
    match Client::connect(plain).await {
        Err(ClientError::Disconnected | ClientError::Protocol(_) | ClientError::Timeout(_)) => {}
        Err(other) => panic!("unexpected error for a plaintext client: {other}"),
        Ok(c) => panic!("a plaintext client got through: {:?}", c.ping().await),
    }
    // A client that does not trust the server's CA is refused too.
    let mut untrusting = config.clone();
    untrusting.tls = Some(stampede_protocol::tls::client_config(&data("server.pem")).unwrap());
    assert!(Client::connect(untrusting).await.is_err(), "an unknown CA must not be trusted");
    assert_eq!(client.ping().await.unwrap().status, Status::Ok, "the server goes on");

    // stampede-ctl over TLS.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stampede-ctl"))
        .args(["--server", &server.addr, "--json", "--tls-ca"])
        .arg(data("ca.pem"))
        .args(["status", "--sku", "3"])
        .env("STAMPEDE_TOKEN", common::ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["status"].as_str(), v["reserved"].as_u64()), (Some("ok"), Some(1)));
}
