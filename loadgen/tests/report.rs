//! The HTML reports: one self-contained page (nothing fetched, so it
//! opens offline) with plotters' SVG charts, their ticks and axis titles,
//! for a drill and for `compare`. The summaries are made by hand (a
//! real drill's page is checked in drills.rs); with STAMPEDE_REPORT_DIR
//! set, the pages are written there to look at.

use std::collections::BTreeMap;

use serde_json::json;
use stampede_loadgen::drill::DrillConfig;
use stampede_loadgen::report::{compare_html, Invariants, Latency, OpSummary, Second, Summary};
use stampede_loadgen::scenario::Scenario;
use stampede_loadgen::target::SkuState;

fn latency(p50: u64) -> Latency {
    Latency { p50, p90: p50 * 2, p99: p50 * 5, p999: p50 * 12, max: p50 * 40 }
}

/// A flash sale of `seconds` seconds at about `rate` requests per second,
/// with a second of silence in the middle of a longer one (as in a
/// failover).
fn summary(target: &str, rate: u64, p50: u64, seconds: u64) -> Summary {
    let timeline: Vec<Second> = (0..seconds)
        .map(|second| {
            let requests = if seconds > 2 && second == seconds / 2 { 0 } else { rate + second * rate / 20 };
            let slower = 1 + second % 3;
            Second {
                second,
                requests,
                p50_us: if requests == 0 { 0 } else { p50 * slower },
                p99_us: if requests == 0 { 0 } else { p50 * 6 * slower },
                max_us: if requests == 0 { 0 } else { p50 * 30 * slower },
            }
        })
        .collect();
    let requests: u64 = timeline.iter().map(|second| second.requests).sum();
    let duration_s = seconds as f64 - 0.4;
    let reserves = requests * 9 / 10;
    let mut ops = BTreeMap::new();
    ops.insert("reserve".to_string(), OpSummary { count: reserves, latency_us: latency(p50) });
    ops.insert("confirm".to_string(), OpSummary { count: requests - reserves, latency_us: latency(p50 * 3 / 2) });
    let outcomes = BTreeMap::from([
        ("reserved".to_string(), 10_000),
        ("confirmed".to_string(), 10_000),
        ("sold_out".to_string(), reserves.saturating_sub(10_000)),
    ]);
    Summary {
        scenario: Scenario::Flash,
        target: target.to_string(),
        users: reserves,
        duration_s,
        requests,
        throughput_rps: requests as f64 / duration_s,
        latency_us: latency(p50),
        ops,
        outcomes,
        invariants: Invariants { acknowledged: 10_000, ok: true, ..Invariants::default() },
        audit: vec![SkuState { sku: 1, total: 10_000, available: 0, reserved: 0, sold: 10_000 }],
        timeline,
        config: DrillConfig::closed_loop(32, 4, 16),
        failover: None,
        server_cpu: None,
        placement: None,
        regional: None,
    }
}

/// The texts of the page's SVG <text> elements: ticks, axis titles,
/// legends and labels.
fn svg_texts(page: &str) -> Vec<String> {
    page.split("<text")
        .skip(1)
        .filter_map(|element| {
            let (_, rest) = element.split_once('>')?;
            let (text, _) = rest.split_once("</text>")?;
            Some(text.trim().to_string())
        })
        .collect()
}

fn assert_self_contained(page: &str) {
    assert!(page.starts_with("<!doctype html>") && page.ends_with("</html>"));
    for fetch in ["http://", "https://", "<script", "<link", "src=", "@import", "url(", "<img", "<iframe"] {
        assert!(!page.contains(fetch), "the report must open with no network: it has {fetch}");
    }
}

fn write_example(name: &str, page: &str) {
    if let Some(dir) = std::env::var_os("STAMPEDE_REPORT_DIR") {
        std::fs::write(std::path::Path::new(&dir).join(name), page).unwrap();
    }
}

#[test]
fn a_drill_report_is_one_page_with_charts_ticks_and_a_readable_title() {
    let summary = summary("stampede", 120_000, 180, 12);
    let page = summary.html();
    write_example("report.html", &page);
    assert_self_contained(&page);
    assert!(page.contains("<h1>Flash sale drill against stampede</h1>"), "the title reads as words");
    assert!(!page.contains("Flash`") && !page.contains(">Flash<"), "no enum names in the prose");
    assert!(page.contains("32 connections × 4 requests in flight each"), "the shape");
    assert!(page.contains("16 reserves per request") && page.contains("10,000 units"), "batch and stock");
    // Throughput, latency over time, percentiles per operation.
    assert_eq!(page.matches("<svg").count(), 3, "three charts");
    assert!(page.contains("<polyline"), "lines drawn by plotters");
    let texts = svg_texts(&page);
    for expected in [
        "time into the drill",
        "requests per second",
        "latency (log scale)",
        "percentile",
        // Ticks: seconds, rates, and latencies in units on the log axes.
        "0 s",
        "10 s",
        "100k",
        "1 ms",
        "p50",
        "p99.9",
        "max",
        // Legends.
        "p99",
        "reserve",
        "confirm",
        "all operations",
    ] {
        assert!(texts.iter().any(|text| text == expected), "no {expected:?} among the chart texts {texts:?}");
    }
    assert!(texts.iter().any(|text| text.starts_with("mean: ")), "the mean throughput line is in the legend");
    // The outcomes, the invariants and the operations table are still there.
    for kept in ["sold_out", "lost acks", "phantoms", "acknowledged reservations checked", "p99.9 µs"] {
        assert!(page.contains(kept), "the page lost {kept}");
    }
}

#[test]
fn the_callers_shape_and_a_ping_run_read_as_such() {
    let mut summary = summary("stampede", 50_000, 90, 3);
    summary.config.callers = Some(512);
    summary.config.connections = 2;
    assert!(summary.html().contains("512 callers, each one operation at a time, over 2 connections"));
    summary.config.ping_only = true;
    summary.audit.clear();
    assert!(summary.html().contains("<h1>PING floor drill against stampede</h1>"));
}

#[test]
fn a_run_shorter_than_a_second_still_draws_its_point() {
    let mut summary = summary("stampede", 20_000, 150, 1);
    summary.duration_s = 0.2;
    let page = summary.html();
    assert_self_contained(&page);
    assert!(page.contains("<circle"), "the one second is a marked point");
}

#[test]
fn the_compare_report_puts_the_targets_side_by_side() {
    let stampede = summary("stampede", 400_000, 120, 8);
    let redis = summary("redis (appendfsync everysec)", 90_000, 400, 8);
    let postgres = summary("postgres", 6_000, 4_000, 8);
    let ratios = json!({
        "stampede_vs_redis_throughput": stampede.throughput_rps / redis.throughput_rps,
        "stampede_vs_postgres_p99": 0.03,
    });
    let page =
        compare_html(&[("stampede", &stampede), (&redis.target, &redis), (&postgres.target, &postgres)], &ratios);
    write_example("compare.html", &page);
    assert_self_contained(&page);
    assert!(page.contains("<h1>Flash sale drill: 3 targets side by side</h1>"));
    // Bars for throughput, percentiles overlaid, throughput over time.
    assert_eq!(page.matches("<svg").count(), 3, "three charts");
    assert!(page.matches("<rect").count() >= 3, "a bar per target");
    let texts = svg_texts(&page);
    for expected in ["stampede", "redis (appendfsync everysec)", "postgres", "p50", "p90", "p99", "p99.9", "max"] {
        assert!(texts.iter().any(|text| text == expected), "no {expected:?} among the chart texts {texts:?}");
    }
    let value_labels = texts.iter().filter(|text| text.ends_with(" requests/s")).count();
    assert_eq!(value_labels, 3, "each bar is labelled with its value: {texts:?}");
    assert!(page.contains("stampede vs redis throughput") && page.contains("0.03×"), "the ratios table");
    assert_eq!(page.matches("<details>").count(), 3, "each run's own tables");
}
