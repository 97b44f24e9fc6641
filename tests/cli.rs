//! The binaries as people and scripts use them: stampede-server started as
//! a child process, stampede-ctl run against it, output and exit codes checked.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::Status;

mod common;

use common::process::{server_command, ServerProcess, TempDir, ADMIN, CHECKOUT};

/// Start a server on an ephemeral port with a fresh data dir.
fn start() -> (ServerProcess, TempDir) {
    let dir = TempDir::new("cli");
    (ServerProcess::start(&dir.0, &[]), dir)
}

fn ctl(addr: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stampede-ctl"))
        .args(["--server", addr])
        .args(args)
        .env("STAMPEDE_TOKEN", token)
        .output()
        .expect("run stampede-ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ctl_json(addr: &str, token: &str, args: &[&str]) -> (i32, Value) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = ctl(addr, token, &full);
    let value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?} stderr {stderr:?}"));
    (code, value)
}

#[test]
fn server_refuses_to_start_without_a_token() {
    let dir = TempDir::new("notoken");
    let out = server_command("127.0.0.1:0", &dir.0).output().expect("run stampede-server");
    assert!(!out.status.success(), "must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STAMPEDE_ADMIN_TOKEN") && stderr.contains("--insecure"), "explains how: {stderr}");
}

#[test]
fn ctl_drives_a_sale_with_json_and_exit_codes() {
    let (server, _dir) = start();
    let addr = server.addr.as_str();
    let (code, v) = ctl_json(addr, ADMIN, &["sale", "create", "--sku", "42", "--stock", "2", "--limit", "1", "--hot"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("ok")));

    let (code, v) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "42", "--user", "7", "--id", "abc"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("reserved")), "{v}");
    assert!(v["expires_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(v["id"].as_str(), Some("00000000000000000000000000000abc"));
    let (_, again) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "42", "--user", "7", "--id", "abc"]);
    assert_eq!(again["expires_at_ms"], v["expires_at_ms"], "retry answers the original outcome");
    let (code, v) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "42", "--user", "7"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("limit_exceeded")));
    let (_, v) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "42", "--user", "8"]);
    assert_eq!(v["status"].as_str(), Some("reserved"));
    let (code, v) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "42", "--user", "9"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("sold_out")), "a sold_out answer still exits 0");

    let (_, v) = ctl_json(addr, CHECKOUT, &["confirm", "--id", "abc", "--payment-ref", "pi_1"]);
    assert_eq!(v["status"].as_str(), Some("confirmed"));
    let (_, v) = ctl_json(addr, CHECKOUT, &["release", "--id", "abc"]);
    assert_eq!(v["status"].as_str(), Some("already_confirmed"));
    let (code, v) = ctl_json(addr, CHECKOUT, &["status", "--sku", "42"]);
    assert_eq!(code, 0);
    assert_eq!(
        (
            v["status"].as_str(),
            v["total"].as_u64(),
            v["available"].as_u64(),
            v["reserved"].as_u64(),
            v["sold"].as_u64()
        ),
        (Some("ok"), Some(2), Some(0), Some(1), Some(1))
    );
    let (_, v) = ctl_json(addr, ADMIN, &["restock", "--sku", "42", "--qty", "3"]);
    assert_eq!((v["status"].as_str(), v["total"].as_u64()), (Some("ok"), Some(5)));
    let (code, stdout, _) = ctl(addr, CHECKOUT, &["status", "--sku", "42"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("total 5 available 3 reserved 1 sold 1"), "human output: {stdout}");

    // Errors exit non-zero: wrong role, bad token, usage, no server.
    let (code, v) = ctl_json(addr, CHECKOUT, &["restock", "--sku", "42", "--qty", "1"]);
    assert_eq!((code, v["status"].as_str()), (1, Some("error")));
    assert!(v["error"].as_str().unwrap().contains("forbidden"));
    let (code, _, stderr) = ctl(addr, "wrong-token", &["ping"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("auth"), "{stderr}");
    let (code, _, _) = ctl(addr, CHECKOUT, &["reserve", "--sku", "x"]);
    assert_eq!(code, 2, "usage error");
    let (code, _, _) = ctl(addr, CHECKOUT, &["confirm", "--id", "not-hex"]);
    assert_eq!(code, 2, "bad id is a usage error");
    let (code, _, stderr) = ctl("127.0.0.1:1", CHECKOUT, &["ping"]);
    assert_eq!(code, 1, "{stderr}");
}

#[test]
fn client_reconnects_after_the_server_restarts() {
    let (mut server, dir) = start();
    let addr = server.addr.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut config = ClientConfig::new(&addr, CHECKOUT);
        config.max_attempts = 20;
        config.request_timeout = Duration::from_secs(2);
        let client = Client::connect(config).await.unwrap();
        assert_eq!(client.ping().await.unwrap().status, Status::Ok);
        server.kill();
        // Bring a server back on the same port while the client keeps asking.
        let data_dir = dir.0.clone();
        let restarted = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            ServerProcess::start_on(&addr, &data_dir, &[])
        });
        let pinged = client.ping().await;
        let _server = restarted.join().unwrap();
        assert_eq!(pinged.expect("ping succeeds after reconnecting").status, Status::Ok);
    });
}

#[test]
fn ctl_drives_a_queued_sale() {
    let (server, _dir) = start();
    let addr = server.addr.as_str();
    let start_at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600)).to_string();
    let (code, v) = ctl_json(
        addr,
        ADMIN,
        &[
            "sale",
            "create",
            "--sku",
            "9",
            "--stock",
            "10",
            "--limit",
            "1",
            "--queue",
            "--admit-rate",
            "5",
            "--start-at",
            &start_at,
        ],
    );
    assert_eq!((code, v["status"].as_str()), (0, Some("ok")), "{v}");
    let (code, v) = ctl_json(addr, CHECKOUT, &["join", "--sku", "9", "--user", "7"]);
    assert_eq!((code, v["status"].as_str(), v["position"].as_u64()), (0, Some("waiting"), Some(0)), "{v}");
    assert_eq!(v["pre_start"], true);
    let (_, v) = ctl_json(addr, CHECKOUT, &["poll", "--sku", "9", "--user", "8"]);
    assert_eq!(v["status"].as_str(), Some("no_ticket"));
    let (_, v) = ctl_json(addr, CHECKOUT, &["reserve", "--sku", "9", "--user", "7"]);
    assert_eq!(v["status"].as_str(), Some("not_admitted"));
    let (_, v) = ctl_json(addr, CHECKOUT, &["status", "--sku", "9"]);
    assert_eq!(v["queue"]["waiting"].as_u64(), Some(1), "{v}");
    // --queue without a rate is a usage error.
    let (code, _, stderr) =
        ctl(addr, ADMIN, &["sale", "create", "--sku", "10", "--stock", "1", "--limit", "1", "--queue"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn config_file_settings_flags_override_it_and_unknown_keys_are_refused() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("config");
    let (from_file, from_flag) = (dir.0.join("from-file"), dir.0.join("from-flag"));

    // An unknown key is refused, naming it.
    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "listn = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stampede-server")).arg("--config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listn") && stderr.contains("unknown field"), "{stderr}");

    // Settings and tokens from the file; --data-dir on the command line wins.
    let good = dir.0.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nno_pin = true\nwal_retention = \"snapshot\"\n\n[tokens]\nadmin = \"file-admin\"\n",
            from_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stampede-server"))
        .arg("--config")
        .arg(&good)
        .arg("--data-dir")
        .arg(&from_flag)
        .env_remove("STAMPEDE_ADMIN_TOKEN")
        .env_remove("STAMPEDE_CHECKOUT_TOKEN")
        .env_remove("STAMPEDE_REPLICATION_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr =
        line.trim().strip_prefix("stampede-server listening on ").unwrap_or_else(|| panic!("{line:?}")).to_string();
    let (code, v) = ctl_json(&addr, "file-admin", &["ping"]);
    assert_eq!((code, v["status"].as_str()), (0, Some("ok")), "the file's admin token works");
    assert!(from_flag.join("LOCK").exists(), "the flag's data dir is used");
    assert!(!from_file.exists(), "the file's data dir is overridden");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn json_logs_are_one_object_per_line_and_show_the_effective_config() {
    use std::io::{BufRead, BufReader, Read};
    let dir = TempDir::new("jsonlog");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stampede-server"))
        .args(["--listen", "127.0.0.1:0", "--insecure", "--no-pin", "--log-format", "json", "--data-dir"])
        .arg(&dir.0)
        .env("RUST_LOG", "info")
        .env_remove("STAMPEDE_ADMIN_TOKEN")
        .env_remove("STAMPEDE_CHECKOUT_TOKEN")
        .env_remove("STAMPEDE_REPLICATION_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("stampede-server listening on"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{stderr}");
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
    assert!(stderr.contains("effective configuration"), "{stderr}");
    assert!(!stderr.contains("proc-admin"), "no token in the logs");
}
