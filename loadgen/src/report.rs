//! What a drill found: the summary (JSON), a table for people, and a
//! self-contained HTML report (inline SVG charts, no network).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::drill::DrillConfig;
use crate::scenario::Scenario;
use crate::target::SkuState;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct OpSummary {
    pub count: u64,
    pub latency_us: Latency,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Invariants {
    /// Units the target's counters cannot account for: counters that do
    /// not add up, units sold beyond the stock or without a confirmed
    /// reservation, and sales acknowledged to the drill beyond the stock.
    pub oversold: u64,
    /// (sku, user) pairs holding more than the limit, by the target's
    /// reservations plus by the drill's acknowledgements.
    pub limit_violations: u64,
    /// Acknowledged reservations the target does not have in the
    /// acknowledged state (see `audit`).
    pub lost_acks: u64,
    /// Reservations the target holds or sold that the drill was refused
    /// or never asked for.
    pub phantoms: u64,
    /// Acknowledged reservations checked one by one against the target.
    pub acknowledged: u64,
    pub ok: bool,
}

impl Invariants {
    /// The counts, for the table and the HTML report.
    pub fn counts(&self) -> String {
        format!(
            "oversold {}, limit violations {}, lost acks {}, phantoms {}; {} acknowledged reservations checked",
            self.oversold, self.limit_violations, self.lost_acks, self.phantoms, self.acknowledged
        )
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Second {
    pub second: u64,
    pub requests: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: Scenario,
    pub target: String,
    pub users: u64,
    pub duration_s: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    pub latency_us: Latency,
    pub ops: BTreeMap<String, OpSummary>,
    pub outcomes: BTreeMap<String, u64>,
    pub invariants: Invariants,
    /// The target's counters after the drill.
    pub audit: Vec<SkuState>,
    pub timeline: Vec<Second>,
    pub config: DrillConfig,
    /// `drill --cluster N --kill-leader-at-secs S`: what clients saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    /// `--server-pid`: the server process's CPU time over the load phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu: Option<ServerCpu>,
}

/// A server process's CPU time over a drill's load phase.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ServerCpu {
    pub cpu_us: u64,
    pub us_per_request: f64,
}

/// A leader killed during a drill, as the clients saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Failover {
    /// The node killed (kill -9) and when, seconds into the drill.
    pub killed: String,
    pub killed_at_secs: f64,
    /// The node that took over.
    pub new_leader: String,
    /// From the kill to the first reservation the new leader acknowledged.
    pub unavailable_ms: f64,
    /// Calls that found the new leader and were sent again there (same
    /// reservation ids); answers that were errors are in `outcomes.error`.
    pub retried_calls: u64,
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

impl Summary {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "drill {:?} against {}: {} requests in {:.2} s = {} req/s",
            self.scenario,
            self.target,
            self.requests,
            self.duration_s,
            human(self.throughput_rps)
        );
        let _ = writeln!(
            out,
            "{:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "count", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
        );
        for (name, op) in &self.ops {
            let l = &op.latency_us;
            let _ = writeln!(
                out,
                "{name:<10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
                op.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        let outcomes: Vec<String> = self.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "outcomes: {}", outcomes.join(", "));
        if let Some(cpu) = &self.server_cpu {
            let _ = writeln!(
                out,
                "server cpu: {:.3} s over the load, {:.2} us per request",
                cpu.cpu_us as f64 / 1e6,
                cpu.us_per_request
            );
        }
        if let Some(f) = &self.failover {
            // NaN: no reserve was acknowledged after the kill (sold out
            // before it, or the drill ended first): no window to report.
            let again = if f.unavailable_ms.is_finite() {
                format!("{} acknowledged again {:.0} ms after the kill", f.new_leader, f.unavailable_ms)
            } else {
                "no reservation was acknowledged after the kill (sold out before it, or the drill ended): \
                 no window measured"
                    .to_string()
            };
            let _ = writeln!(
                out,
                "failover: killed {} at {:.1} s; {again}; {} calls found the new leader and went again",
                f.killed, f.killed_at_secs, f.retried_calls
            );
        }
        for s in &self.audit {
            let _ = writeln!(
                out,
                "sku {}: total {} available {} reserved {} sold {}",
                s.sku, s.total, s.available, s.reserved, s.sold
            );
        }
        let _ = writeln!(
            out,
            "invariants: {} ({})",
            if self.invariants.ok { "OK" } else { "BROKEN" },
            self.invariants.counts()
        );
        out
    }

    /// A self-contained HTML page: summary, throughput and latency over time.
    pub fn html(&self) -> String {
        let throughput: Vec<(f64, f64)> = self.timeline.iter().map(|s| (s.second as f64, s.requests as f64)).collect();
        let p50: Vec<(f64, f64)> = self.timeline.iter().map(|s| (s.second as f64, s.p50_us as f64)).collect();
        let p99: Vec<(f64, f64)> = self.timeline.iter().map(|s| (s.second as f64, s.p99_us as f64)).collect();
        let max: Vec<(f64, f64)> = self.timeline.iter().map(|s| (s.second as f64, s.max_us as f64)).collect();
        let mut page = String::new();
        let _ = write!(
            page,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>stampede drill: {:?} on {}</title>\
             <style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.ok{{color:#070}}.bad{{color:#b00}}</style>\
             </head><body><h1>Drill <code>{:?}</code> against {}</h1>",
            self.scenario, self.target, self.scenario, self.target
        );
        let _ = write!(
            page,
            "<p>{} requests in {:.2} s: <b>{} req/s</b>. Invariants: <b class=\"{}\">{}</b> ({}).</p>",
            self.requests,
            self.duration_s,
            human(self.throughput_rps),
            if self.invariants.ok { "ok" } else { "bad" },
            if self.invariants.ok { "OK" } else { "BROKEN" },
            self.invariants.counts()
        );
        page.push_str("<table><tr><th>op</th><th>count</th><th>p50 µs</th><th>p90 µs</th><th>p99 µs</th><th>p99.9 µs</th><th>max µs</th></tr>");
        for (name, op) in &self.ops {
            let l = &op.latency_us;
            let _ = write!(
                page,
                "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                op.count, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        page.push_str("</table><h2>Throughput (requests per second)</h2>");
        page.push_str(&chart(&[("requests/s", "#1f77b4", &throughput)], "s", ""));
        page.push_str("<h2>Latency over time (µs)</h2>");
        page.push_str(&chart(
            &[("p50", "#2ca02c", &p50), ("p99", "#ff7f0e", &p99), ("max", "#d62728", &max)],
            "s",
            "µs",
        ));
        page.push_str("<h2>Outcomes</h2><table>");
        for (k, v) in &self.outcomes {
            let _ = write!(page, "<tr><td style=\"text-align:left\">{k}</td><td>{v}</td></tr>");
        }
        let _ = write!(
            page,
            "</table><h2>Configuration</h2><pre>{}</pre></body></html>",
            serde_json::to_string_pretty(&self.config).unwrap_or_default()
        );
        page
    }
}

/// One line of a chart: name, colour, (x, y) points.
type Series<'a> = (&'a str, &'a str, &'a Vec<(f64, f64)>);

/// A line chart as inline SVG.
fn chart(series: &[Series<'_>], x_unit: &str, y_unit: &str) -> String {
    let (w, h, pad) = (800.0, 260.0, 50.0);
    let x_max = series.iter().flat_map(|(_, _, s)| s.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_max = series.iter().flat_map(|(_, _, s)| s.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.05;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" style=\"border:1px solid #ddd\">"
    );
    let _ = write!(
        svg,
        "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"10\" x2=\"{pad}\" y2=\"{}\" stroke=\"#888\"/>",
        h - pad,
        w - 10.0,
        h - pad,
        h - pad
    );
    let _ = write!(svg, "<text x=\"5\" y=\"20\" font-size=\"11\">{} {y_unit}</text>", human(y_max));
    let _ =
        write!(svg, "<text x=\"{}\" y=\"{}\" font-size=\"11\">{x_max:.0} {x_unit}</text>", w - 60.0, h - pad + 20.0);
    for (i, (name, color, points)) in series.iter().enumerate() {
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!("{:.1},{:.1}", pad + x / x_max * (w - pad - 10.0), (h - pad) - y / y_max * (h - pad - 10.0))
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            coords.join(" ")
        );
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{name}</text>",
            pad + 10.0 + 90.0 * i as f64,
            h - 10.0
        );
    }
    svg.push_str("</svg>");
    svg
}
