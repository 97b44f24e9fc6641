//! Short drills of every scenario against a real stampede server on
//! 127.0.0.1 (in-process, durable), the baselines' semantics against the
//! real Redis and PostgreSQL, and the binary's exit codes and outputs.

use std::sync::Arc;

use stampede::wal::Durability;
use stampede_loadgen::audit::Acked;
use stampede_loadgen::drill::{self, DrillConfig, Spike};
use stampede_loadgen::local::LocalStampede;
use stampede_loadgen::scenario::{Plan, Scenario, Session};
use stampede_loadgen::target::stampede::StampedeTarget;
use stampede_loadgen::target::Target;
use stampede_protocol::client::{Client, ClientConfig};
use stampede_protocol::message::HoldState;
use stampede_protocol::Status;

fn config() -> DrillConfig {
    DrillConfig::closed_loop(4, 4, 1)
}

async fn local_target(server: &LocalStampede) -> Arc<Target> {
    local_target_with(server, 4, false).await
}

/// The server's own token, passed explicitly: `STAMPEDE_TOKEN` is one
/// variable for the whole test process, and tests run in parallel, each
/// with a server of its own (setting it raced: `auth_failed`).
async fn local_target_with(server: &LocalStampede, connections: usize, coalesce: bool) -> Arc<Target> {
    let addr = server.addr().to_string();
    let target = StampedeTarget::connect(&addr, &server.token, connections, coalesce).await.unwrap();
    Arc::new(Target::Stampede(target))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_keeps_the_invariants_on_stampede() {
    for (scenario, users, stock) in [
        (Scenario::Flash, 3_000, 200),
        (Scenario::Mixed, 3_000, 20),
        (Scenario::Checkout, 2_000, 300),
        (Scenario::Queue, 600, 100),
        (Scenario::Shifting, 3_000, 100),
        (Scenario::Regional, 3_000, 500),
    ] {
        // A fresh server per scenario (the sales are created anew).
        let server = LocalStampede::start(Durability::Fsync).await.unwrap();
        let target = local_target(&server).await;
        let plan = Arc::new(Plan::new(scenario, users, stock, 600_000, scenario as u64 + 7));
        let mut config = config();
        config.batch = if scenario == Scenario::Flash { 16 } else { 1 };
        let summary = drill::run(target, plan.clone(), config, "stampede").await.unwrap();
        assert!(summary.invariants.ok, "{scenario:?}: {}", summary.table());
        assert_eq!(
            summary.invariants.acknowledged, summary.outcomes["reserved"],
            "{scenario:?}: every acknowledged reservation was checked on the server"
        );
        let sold: u64 = summary.audit.iter().map(|s| s.sold).sum();
        let reserved: u64 = summary.audit.iter().map(|s| s.reserved).sum();
        let confirmed = summary.outcomes.get("confirmed").copied().unwrap_or(0);
        assert_eq!(sold, confirmed, "{scenario:?}: every confirmation the drill saw is a sale on the server");
        match scenario {
            Scenario::Flash | Scenario::Queue => {
                assert_eq!(sold, stock, "{scenario:?}: demand above stock sells out exactly");
                assert_eq!(
                    summary.outcomes["sold_out"],
                    users - stock,
                    "{scenario:?}: every other buyer hears sold_out"
                );
            }
            Scenario::Checkout => {
                assert!(reserved > 0 && summary.outcomes["released"] > 0, "{}", summary.table());
            }
            Scenario::Mixed => {
                assert_eq!(summary.audit.len(), 100);
                assert!(summary.outcomes["limit_exceeded"] > 0, "third attempts are refused: {}", summary.table());
            }
            Scenario::Shifting => {
                assert_eq!(summary.audit.len(), 20);
                let placement = summary.placement.as_ref().expect("the drill watched the placement");
                let hot: Vec<u64> = placement.phases.iter().map(|p| p.hot_sku).collect();
                assert_eq!(hot, [1, 2, 3, 4, 5, 6], "each phase has its own hot SKU: {}", summary.table());
                // The phase's SKU sells most: 85 % of its phase's demand.
                let sold = |sku: u64| summary.audit.iter().find(|s| s.sku == sku).map_or(0, |s| s.sold);
                assert!(sold(1) > 4 * sold(20), "{}", summary.table());
            }
            Scenario::Regional => check_regional(&summary, sold),
        }
        server.stop().await.unwrap();
    }
}

/// `regional`: every warehouse audited (each acknowledged reservation at
/// the location its answer named, the counters per location), the sale's
/// counters their sums, and the regions' answers adding up.
fn check_regional(summary: &stampede_loadgen::report::Summary, sold: u64) {
    let table = summary.table();
    let regional = summary.regional.as_ref().expect("the regional drill reports its warehouses");
    let warehouses = &regional.warehouses;
    assert_eq!(warehouses.iter().map(|w| w.location).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6], "{table}");
    assert_eq!(warehouses.iter().map(|w| w.stock).sum::<u64>(), 500);
    assert!(warehouses.iter().all(|w| w.ok && w.misplaced == 0 && w.total == w.stock), "{table}");
    assert!(warehouses.iter().all(|w| w.sold + w.reserved <= w.stock), "{table}");
    assert!(warehouses.iter().all(|w| w.acknowledged > 0), "every warehouse served someone: {table}");
    assert_eq!(warehouses.iter().map(|w| w.sold).sum::<u64>(), sold, "the sale's sold is its warehouses': {table}");
    let acked: u64 = warehouses.iter().map(|w| w.acknowledged).sum();
    assert_eq!(acked, summary.invariants.acknowledged, "every acknowledgement was checked at its location");
    assert!(table.contains("warehouse") && table.contains("north"), "{table}");

    let regions = &regional.regions;
    assert_eq!(regions.iter().map(|r| r.region).collect::<Vec<_>>(), [1, 2, 3, 4]);
    let total = |f: fn(&stampede_loadgen::report::RegionServed) -> u64| regions.iter().map(f).sum::<u64>();
    assert_eq!(total(|r| r.shoppers), summary.ops["reserve"].count, "one RESERVE_AT per shopper");
    assert_eq!(total(|r| r.reserved), summary.outcomes["reserved"]);
    assert_eq!(total(|r| r.refused) + total(|r| r.errors) + total(|r| r.reserved), total(|r| r.shoppers));
    for r in regions {
        assert_eq!(r.first_choice + r.further + r.elsewhere, r.reserved, "{table}");
        assert_eq!(r.by_warehouse.iter().map(|(_, n)| n).sum::<u64>(), r.reserved, "{table}");
        assert!(r.elsewhere <= r.explicit, "only explicit lists reach past the region: {table}");
        assert!(r.explicit > 0 && r.explicit < r.shoppers / 2, "about 1 in 5 send a list: {table}");
    }
    // Skewed demand: north (40 %) has the most shoppers, west (10 %) the fewest.
    assert!(regions[0].shoppers > regions[1].shoppers && regions[2].shoppers > regions[3].shoppers, "{table}");
    // 3000 shoppers for 500 units: the near warehouses run out, so some
    // are served further away, and some are turned away.
    assert!(total(|r| r.further) > 0 && total(|r| r.refused) > 0, "{table}");
}

/// The baselines have one stock counter per SKU: `compare` refuses the
/// `regional` scenario before it starts anything.
#[test]
fn compare_refuses_the_regional_scenario_up_front() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stampede-loadgen"))
        .args(["compare", "--scenario", "regional", "--users", "100", "--stock", "10", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the regional scenario needs a stampede target"), "{stderr}");
}

/// The checkout-service shape: 512 callers share two coalescing
/// connections; every acknowledgement is audited on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_on_coalescing_connections_keep_the_invariants() {
    let server = LocalStampede::start(Durability::Fsync).await.unwrap();
    let target = local_target_with(&server, 2, true).await;
    let plan = Arc::new(Plan::new(Scenario::Checkout, 6_000, 2_000, 600_000, 11));
    let mut config = config();
    config.connections = 2;
    config.callers = Some(512);
    let summary = drill::run(target, plan, config, "stampede").await.unwrap();
    assert!(summary.invariants.ok, "{}", summary.table());
    // 6000 shoppers for 2000 units, a fifth of the winners giving theirs
    // back: every unit is held at least once.
    assert!(summary.outcomes["reserved"] >= 2_000, "{}", summary.table());
    assert_eq!(summary.invariants.acknowledged, summary.outcomes["reserved"]);
    let settled = summary.outcomes.get("confirmed").copied().unwrap_or(0)
        + summary.outcomes.get("released").copied().unwrap_or(0);
    assert!(settled > 1_000, "winners pay or give back: {}", summary.table());
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_with_a_spike_offers_the_scheduled_load() {
    let server = LocalStampede::start(Durability::Async).await.unwrap();
    let target = local_target(&server).await;
    let plan = Arc::new(Plan::new(Scenario::Flash, 100_000, 1_000_000, 600_000, 3));
    let mut config = config();
    config.duration_secs = 2.0;
    config.rate = Some(500.0);
    config.spike = Some(Spike { factor: 4.0, at_secs: 0.5, hold_secs: 0.5 });
    let summary = drill::run(target, plan, config, "stampede").await.unwrap();
    // 2 s at 500/s, plus the spike: the ramp (1 s averaging 2.5x) and 0.5 s
    // at 4x add 750 + 750 users: 2500 due in all.
    let reserves = summary.ops["reserve"].count as f64;
    assert!((reserves - 2_500.0).abs() < 2_500.0 * 0.05, "{reserves} reserves offered: {}", summary.table());
    assert!(summary.invariants.ok);
    server.stop().await.unwrap();
}

/// The audit reads the server's state: a reservation taken away behind
/// the drill's back is a lost ack, one it was refused is a phantom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_finds_a_lost_and_a_phantom_reservation_on_a_real_server() {
    let server = LocalStampede::start(Durability::Fsync).await.unwrap();
    let target = local_target(&server).await;
    let mut plan = Plan::new(Scenario::Flash, 500, 100, 600_000, 11);
    plan.reserve_only = true;
    let plan = Arc::new(plan);
    let (summary, tally) = drill::execute(target.clone(), plan.clone(), config(), "stampede").await.unwrap();
    assert!(summary.invariants.ok, "{}", summary.table());
    assert_eq!(summary.invariants.acknowledged, 100);

    let held = (0..500).find(|&i| tally.get(i).0 == Acked::Held).unwrap();
    let refused = (0..500).find(|&i| tally.get(i).0 == Acked::Nothing).unwrap();
    let client = Client::connect(ClientConfig::new(server.addr(), &server.token)).await.unwrap();
    let (held, refused) = (plan.session(held), plan.session(refused));
    assert_eq!(client.release(held.reservation_id).await.unwrap().status, Status::Released);
    let phantom = client.reserve(refused.sku, refused.user, 1, refused.reservation_id).await.unwrap();
    assert_eq!(phantom.status, Status::Reserved);

    let (invariants, _) = drill::verify(&target, &plan, &tally).await.unwrap();
    assert_eq!((invariants.lost_acks, invariants.phantoms, invariants.ok), (1, 1, false), "{invariants:?}");
    server.stop().await.unwrap();
}

/// The Redis baseline's Lua scripts do what stampede does: per-user limit,
/// stock decrement, idempotent retry, reservation TTL, confirm/release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_lua_script_has_stampedes_semantics() {
    if std::env::var_os("STAMPEDE_SKIP_REDIS").is_some() {
        eprintln!("STAMPEDE_SKIP_REDIS set: not testing the Redis baseline");
        return;
    }
    let target = Target::connect("redis://127.0.0.1:6379/15", 1, false).await.unwrap_or_else(|e| {
        panic!(
            "{e}\nthe Redis baseline test needs Redis on 127.0.0.1:6379 (start it: redis-server --daemonize yes \
             --bind 127.0.0.1 --port 6379 --save '' --appendonly no), or set STAMPEDE_SKIP_REDIS=1 to opt out"
        )
    });
    check_baseline_semantics(&target, 300).await;
}

/// The PostgreSQL baseline's transaction has the same semantics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_baseline_has_stampedes_semantics() {
    let target = Target::connect("postgres://postgres@127.0.0.1:5432/test", 2, false).await.unwrap();
    check_baseline_semantics(&target, 300).await;
}

async fn check_baseline_semantics(target: &Target, ttl_ms: u64) {
    // Stock in several locations is stampede's alone: refused, nothing touched.
    let regional = Plan::new(Scenario::Regional, 10, 10, ttl_ms, 99);
    let refused = target.prepare(&regional).await.expect_err("the regional scenario is stampede's");
    assert!(refused.to_string().contains("needs a stampede target"), "{refused}");
    // Stock 3, limit 1 (flash).
    let plan = Plan::new(Scenario::Flash, 10, 3, ttl_ms, 99);
    target.prepare(&plan).await.unwrap();
    let s: Vec<Session> = (0..4).map(|i| plan.session(i)).collect();
    let same_user_again = Session { reservation_id: s[3].reservation_id, ..s[0] };
    let first = target.reserve(&plan, &s[..2]).await.unwrap();
    assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), vec![Status::Reserved, Status::Reserved]);
    assert_eq!(target.reserve(&plan, &s[..1]).await.unwrap()[0].0, Status::Reserved, "an idempotent retry");
    assert_eq!(target.reserve(&plan, &[same_user_again]).await.unwrap()[0].0, Status::LimitExceeded);
    assert_eq!(target.reserve(&plan, &s[2..3]).await.unwrap()[0].0, Status::Reserved);
    assert_eq!(target.reserve(&plan, &s[3..4]).await.unwrap()[0].0, Status::SoldOut);
    // Release gives the unit back; confirm sells.
    assert_eq!(target.release(&s[1]).await.unwrap(), Status::Released);
    assert_eq!(target.confirm(&s[0]).await.unwrap(), Status::Confirmed);
    assert_eq!(target.reserve(&plan, &s[3..4]).await.unwrap()[0].0, Status::Reserved);
    assert_eq!(target.confirm(&s[0]).await.unwrap(), Status::Confirmed, "confirming twice");
    assert_eq!(target.release(&s[0]).await.unwrap(), Status::AlreadyConfirmed);
    assert_eq!(target.release(&s[1]).await.unwrap(), Status::Released, "releasing twice");
    assert_eq!(target.confirm(&s[1]).await.unwrap(), Status::AlreadyReleased);
    let audit = target.audit(&plan).await.unwrap();
    assert_eq!((audit[0].total, audit[0].available, audit[0].reserved, audit[0].sold), (3, 0, 2, 1));
    // The audit's view: every reservation with its owner and state.
    let state = target.state(&plan).await.unwrap();
    let mut found: Vec<(u128, u64, HoldState)> = state.reservations.iter().map(|r| (r.id, r.user, r.state)).collect();
    found.sort();
    let mut expected = vec![
        (s[0].reservation_id, s[0].user, HoldState::Confirmed),
        (s[1].reservation_id, s[1].user, HoldState::Released),
        (s[2].reservation_id, s[2].user, HoldState::Held),
        (s[3].reservation_id, s[3].user, HoldState::Held),
    ];
    expected.sort();
    assert_eq!(found, expected);
    assert!(state.reservations.iter().all(|r| r.sku == s[0].sku && r.qty == 1));
    // After the TTL the hold cannot be confirmed.
    tokio::time::sleep(std::time::Duration::from_millis(ttl_ms + 200)).await;
    assert_eq!(target.confirm(&s[2]).await.unwrap(), Status::Expired);
}

/// `regional` through the binary: the per-warehouse and per-region tables
/// are printed, and are in the JSON and HTML reports.
#[test]
fn the_binary_reports_regional_demand_per_warehouse() {
    let dir = std::env::temp_dir().join(format!("stampede-loadgen-regional-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = (dir.join("drill.json"), dir.join("drill.html"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stampede-loadgen"))
        .args(["drill", "--scenario", "regional", "--users", "2000", "--stock", "400", "--quiet"])
        .args(["--callers", "64", "--connections", "2", "--json"])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("invariants: OK") && stdout.contains("warehouse"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let warehouses = v["regional"]["warehouses"].as_array().expect("regional.warehouses");
    assert_eq!(warehouses.len(), 6);
    assert!(warehouses.iter().all(|w| w["ok"] == true && w["stock"].is_u64() && w["sold"].is_u64()), "{v}");
    let regions = v["regional"]["regions"].as_array().expect("regional.regions");
    assert_eq!(regions.len(), 4);
    assert!(regions.iter().all(|r| r["first_choice"].is_u64() && r["further"].is_u64()), "{v}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<h2>Warehouses</h2>") && page.contains("<h2>Regions</h2>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_binary_writes_json_and_html_and_exits_zero_when_the_invariants_hold() {
    let dir = std::env::temp_dir().join(format!("stampede-loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = (dir.join("drill.json"), dir.join("drill.html"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stampede-loadgen"))
        .args(["drill", "--scenario", "flash", "--users", "2000", "--stock", "100", "--quiet", "--connections", "4"])
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("invariants: OK"), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in
        ["scenario", "target", "duration_s", "requests", "throughput_rps", "latency_us", "outcomes", "invariants"]
    {
        assert!(v.get(key).is_some(), "JSON lacks {key}: {v}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"].get(key).is_some(), "latency lacks {key}");
    }
    assert_eq!(v["invariants"]["ok"], true);
    assert_eq!(v["outcomes"]["sold_out"], 1_900);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("<polyline") && page.ends_with("</html>"));
    for fetch in ["<script", "<link", "src=", "@import"] {
        assert!(!page.contains(fetch), "the report must open with no network: it has {fetch}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
