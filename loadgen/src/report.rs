//! What a drill found: the summary (JSON), a table for people, and
//! self-contained HTML reports (SVG charts drawn by plotters, inlined; no
//! scripts, fonts or links, so they open offline): one per drill, and one
//! with the targets of `compare` side by side.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::ops::Range;

use plotters::chart::MeshStyle;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use crate::audit::LocationAudit;
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
    /// `shifting`: where the hot SKU of each phase ran, and when it moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    /// `regional`: each warehouse's units and audit, and where each
    /// region's shoppers were served from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regional: Option<Regional>,
}

/// The `regional` drill per location (warehouse) and per region.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Regional {
    /// Per warehouse: its stock, the target's counters after the drill,
    /// what the drill was told about it, and whether the two agree.
    pub warehouses: Vec<LocationAudit>,
    pub regions: Vec<RegionServed>,
}

/// Where one region's shoppers got their units, as the `reserved`
/// answers said (RESERVE_AT's location).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RegionServed {
    pub region: u16,
    pub name: String,
    /// The region's warehouses, nearest first.
    pub order: Vec<u16>,
    /// Shoppers who asked (one RESERVE_AT each)...
    pub shoppers: u64,
    /// ...of whom this many sent an explicit list (the region's order,
    /// then every other warehouse) instead of the region.
    pub explicit: u64,
    pub reserved: u64,
    /// Served from the region's nearest warehouse...
    pub first_choice: u64,
    /// ...from a further one of the region's...
    pub further: u64,
    /// ...or (explicit lists only) from one outside the region's order.
    pub elsewhere: u64,
    /// Refused: `sold_out` (none of their warehouses had a unit), `busy`, ...
    pub refused: u64,
    /// Answers lost (unknown outcome).
    pub errors: u64,
    /// Reservations per warehouse: (location, reservations).
    pub by_warehouse: Vec<(u16, u64)>,
}

/// The `shifting` drill's view of the server's placement, from STATUS
/// polled every `PLACEMENT_POLL_MS`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Placement {
    pub phases: Vec<Phase>,
    /// Every change seen: seconds into the drill, SKU, dedicated or not.
    pub moves: Vec<(f64, u64, bool)>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Phase {
    pub phase: u64,
    /// The SKU taking most of the phase's demand.
    pub hot_sku: u64,
    /// When its first user was taken (seconds into the drill).
    pub started_s: f64,
    /// From then until the SKU was first seen on a dedicated shard (`None`:
    /// never, within the phase and the drill).
    pub promoted_after_ms: Option<f64>,
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
        if let Some(p) = &self.placement {
            for phase in &p.phases {
                let promoted = phase
                    .promoted_after_ms
                    .map_or("never promoted".to_string(), |ms| format!("on a dedicated shard {ms:.0} ms later"));
                let _ = writeln!(
                    out,
                    "phase {}: sku {} hot from {:.1} s, {promoted}",
                    phase.phase, phase.hot_sku, phase.started_s
                );
            }
            let moves: Vec<String> = p
                .moves
                .iter()
                .map(|(t, sku, dedicated)| {
                    format!("{t:.1}s sku {sku} {}", if *dedicated { "dedicated" } else { "pool" })
                })
                .collect();
            let _ = writeln!(out, "placement changes: {}", moves.join(", "));
        }
        for s in &self.audit {
            let _ = writeln!(
                out,
                "sku {}: total {} available {} reserved {} sold {}",
                s.sku, s.total, s.available, s.reserved, s.sold
            );
        }
        if let Some(r) = &self.regional {
            out.push_str(&r.table());
        }
        let _ = writeln!(
            out,
            "invariants: {} ({})",
            if self.invariants.ok { "OK" } else { "BROKEN" },
            self.invariants.counts()
        );
        out
    }

    /// A self-contained HTML page (no scripts, fonts or links: it opens
    /// offline): what was run, the headline numbers, charts drawn by
    /// plotters, the outcomes and the invariants.
    pub fn html(&self) -> String {
        let title = format!("{} drill against {}", drill_name(self), self.target);
        let mut page = page_start(&title);
        let _ = write!(page, "<h1>{}</h1><p>{}</p>", escape(&title), escape(drill_description(self)));
        let _ = write!(page, "<p class=\"lead\">{}</p>", headline(self));
        page.push_str("<h2>Configuration</h2><table class=\"fields\">");
        for (field, value) in configuration(self) {
            let _ = write!(page, "<tr><th>{field}</th><td>{}</td></tr>", escape(&value));
        }
        page.push_str("</table><h2>Headline numbers</h2>");
        page.push_str(&runs_table(&[(self.target.as_str(), self)]));
        page.push_str("<h2>Throughput over time</h2>");
        page.push_str(&throughput_over_time(&[(self.target.as_str(), self)], true));
        page.push_str(
            "<h2>Latency over time</h2><p>Per second of the drill, over every operation answered in it \
             (log scale).</p>",
        );
        page.push_str(&latency_over_time(self));
        page.push_str("<h2>Latency percentiles per operation</h2>");
        let mut operations: Vec<(&str, &Latency, RGBColor)> = self
            .ops
            .iter()
            .enumerate()
            .map(|(index, (name, op))| (name.as_str(), &op.latency_us, colour(index)))
            .collect();
        // With one kind of operation the overall line is the same line.
        if operations.len() > 1 {
            operations.push(("all operations", &self.latency_us, TOTAL));
        }
        page.push_str(&percentiles_chart(&operations, "the latency percentiles of each operation"));
        page.push_str(&operations_table(self));
        page.push_str("<h2>Outcomes</h2>");
        page.push_str(&outcomes_table(self));
        page.push_str("<h2>Invariants</h2>");
        page.push_str(&invariants_section(self));
        if let Some(failover) = &self.failover {
            page.push_str("<h2>Failover</h2>");
            page.push_str(&failover_paragraph(failover));
        }
        if !self.audit.is_empty() {
            page.push_str(&audit_table(self));
        }
        if let Some(regional) = &self.regional {
            page.push_str(&regional.html());
        }
        let _ = write!(
            page,
            "<details><summary>Configuration as JSON</summary><pre>{}</pre></details></body></html>",
            escape(&serde_json::to_string_pretty(&self.config).unwrap_or_default())
        );
        page
    }
}

impl Regional {
    /// The per-warehouse and per-region tables of the text report.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}  audit",
            "warehouse", "stock", "sold", "held", "available", "acked sold", "acked held", "in flight", "misplaced"
        );
        for w in &self.warehouses {
            let _ = writeln!(
                out,
                "{:<9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}  {}",
                w.location,
                w.stock,
                w.sold,
                w.reserved,
                w.available,
                w.acked_sold,
                w.acked_held + w.maybe_held,
                w.in_flight,
                w.misplaced,
                if w.ok { "OK".to_string() } else { format!("BROKEN ({} units unaccounted)", w.unaccounted) }
            );
        }
        let _ = writeln!(
            out,
            "{:<19} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>8}  reservations by warehouse",
            "region", "shoppers", "explicit", "reserved", "first", "further", "elsewhere", "refused", "first %",
        );
        for r in &self.regions {
            let order: Vec<String> = r.order.iter().map(u16::to_string).collect();
            let by: Vec<String> = r.by_warehouse.iter().map(|(w, n)| format!("{w}:{n}")).collect();
            let _ = writeln!(
                out,
                "{:<19} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>9} {:>7.1}%  {}",
                format!("{} {} [{}]", r.region, r.name, order.join(",")),
                r.shoppers,
                r.explicit,
                r.reserved,
                r.first_choice,
                r.further,
                r.elsewhere,
                r.refused,
                100.0 * r.first_choice as f64 / r.reserved.max(1) as f64,
                by.join(" ")
            );
        }
        out
    }

    fn html(&self) -> String {
        let mut page = String::from(
            "<h2>Warehouses</h2><p>Each warehouse's units after the drill, what the drill was told about it (the \
             location each <code>reserved</code> answer named), and the audit of the two.</p><table><tr>\
             <th>warehouse</th><th>stock</th><th>sold</th><th>held</th><th>available</th><th>acked sold</th>\
             <th>acked held</th><th>in flight</th><th>misplaced</th><th>audit</th></tr>",
        );
        for w in &self.warehouses {
            let audit = if w.ok {
                "<b class=\"ok\">OK</b>".to_string()
            } else {
                format!("<b class=\"bad\">BROKEN</b> ({} units unaccounted)", w.unaccounted)
            };
            let _ = write!(
                page,
                "<tr><td class=\"name\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{audit}</td></tr>",
                w.location,
                grouped(w.stock),
                grouped(w.sold),
                grouped(w.reserved),
                grouped(w.available),
                grouped(w.acked_sold),
                grouped(w.acked_held + w.maybe_held),
                grouped(w.in_flight),
                grouped(w.misplaced)
            );
        }
        page.push_str(
            "</table><h2>Regions</h2><p>Where each region's shoppers were served from: their nearest warehouse, a \
             further one of their region's, or (explicit lists only) one outside it.</p><table><tr><th>region</th>\
             <th>warehouses</th><th>shoppers</th><th>explicit lists</th><th>reserved</th><th>first choice</th>\
             <th>further</th><th>elsewhere</th><th>refused</th><th>by warehouse</th></tr>",
        );
        for r in &self.regions {
            let order: Vec<String> = r.order.iter().map(u16::to_string).collect();
            let by: Vec<String> = r.by_warehouse.iter().map(|(w, n)| format!("{w}: {}", grouped(*n))).collect();
            let _ = write!(
                page,
                "<tr><td class=\"name\">{} {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td class=\"name\">{}</td></tr>",
                r.region,
                escape(&r.name),
                order.join(", "),
                grouped(r.shoppers),
                grouped(r.explicit),
                grouped(r.reserved),
                grouped(r.first_choice),
                grouped(r.further),
                grouped(r.elsewhere),
                grouped(r.refused),
                escape(&by.join(", "))
            );
        }
        page.push_str("</table>");
        page
    }
}

/// One self-contained page with the runs of `compare` side by side (one
/// run per target, the same drill): throughput as bars, the latency
/// percentiles overlaid on a log scale, throughput over time, the ratios
/// and each run's numbers. `runs` are (label, summary), in the order to
/// show them; `ratios` is the JSON object `compare` prints.
pub fn compare_html(runs: &[(&str, &Summary)], ratios: &serde_json::Value) -> String {
    let drill = runs.first().map_or("Comparison", |(_, summary)| scenario_name(summary.scenario));
    let title = format!("{drill} drill: {} targets side by side", runs.len());
    let mut page = page_start(&title);
    let labels: Vec<&str> = runs.iter().map(|(label, _)| *label).collect();
    let _ = write!(page, "<h1>{}</h1><p>The same drill against {}.", escape(&title), escape(&labels.join(", ")));
    if let Some((_, first)) = runs.first() {
        let _ = write!(page, " {}", escape(drill_description(first)));
    }
    let broken: Vec<&str> =
        runs.iter().filter(|(_, summary)| !summary.invariants.ok).map(|(label, _)| *label).collect();
    if broken.is_empty() {
        page.push_str(" Invariants: <b class=\"ok\">OK</b> on every target.</p>");
    } else {
        let _ = write!(page, " Invariants: <b class=\"bad\">BROKEN</b> on {}.</p>", escape(&broken.join(", ")));
    }
    if let Some((_, first)) = runs.first() {
        // The shape is the command line's, the same for every run; what
        // differs per run (duration, counters) is in the tables below.
        page.push_str("<h2>Configuration</h2><table class=\"fields\">");
        for (field, value) in configuration(first) {
            if field != "duration" && field != "server CPU" {
                let _ = write!(page, "<tr><th>{field}</th><td>{}</td></tr>", escape(&value));
            }
        }
        page.push_str("</table>");
    }
    page.push_str("<h2>Throughput</h2><p>Requests answered per second over each run.</p>");
    page.push_str(&throughput_bars(runs));
    page.push_str(
        "<h2>Latency percentiles</h2><p>Over every operation of each run (log scale): the lower and flatter, \
         the better.</p>",
    );
    // The same colour per target as on the bars.
    let latencies: Vec<(&str, &Latency, RGBColor)> =
        runs.iter().enumerate().map(|(index, (label, summary))| (*label, &summary.latency_us, colour(index))).collect();
    page.push_str(&percentiles_chart(&latencies, "the latency percentiles of each target"));
    page.push_str("<h2>Throughput over time</h2>");
    page.push_str(&throughput_over_time(runs, false));
    page.push_str(&ratios_table(ratios));
    page.push_str("<h2>Runs</h2>");
    page.push_str(&runs_table(runs));
    for (label, summary) in runs {
        let _ = write!(
            page,
            "<details><summary>{}: operations and outcomes</summary>{}{}</details>",
            escape(label),
            operations_table(summary),
            outcomes_table(summary)
        );
    }
    page.push_str("</body></html>");
    page
}

/// A person's name for a scenario (the enum's are for the command line).
fn scenario_name(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Flash => "Flash sale",
        Scenario::Mixed => "Mixed catalogue sale",
        Scenario::Checkout => "Checkout",
        Scenario::Queue => "Queue-gated flash sale",
        Scenario::Shifting => "Shifting demand",
        Scenario::Regional => "Regional demand",
    }
}

/// What the drill did: a PING-only run does none of its scenario's sale.
fn drill_name(summary: &Summary) -> &'static str {
    if summary.config.ping_only {
        "PING floor"
    } else {
        scenario_name(summary.scenario)
    }
}

fn drill_description(summary: &Summary) -> &'static str {
    if summary.config.ping_only {
        return "PING only: the protocol and network floor of the target, no sale operations.";
    }
    match summary.scenario {
        Scenario::Flash => "One hot SKU, limited stock, one unit per user: a spike of buyers, most of whom lose.",
        Scenario::Mixed => {
            "100 SKUs with Zipf-skewed demand (s = 1.1), the top two hot; each shopper tries three times with a \
             limit of two."
        }
        Scenario::Checkout => {
            "Reserve, then confirm (60 %), release (20 %) or abandon the reservation until it expires (20 %)."
        }
        Scenario::Queue => "A queue-gated flash sale: join the queue, poll until admitted, reserve, confirm.",
        Scenario::Shifting => {
            "20 ordinary SKUs, none created hot; the shoppers come in six phases and in each another SKU takes 85 % \
             of the demand. The server moves the hot one to a shard of its own, and back when the demand moves on."
        }
        Scenario::Regional => {
            "One sale whose stock sits in six warehouses (40/25/15/10/6/4 %); four regions (40/30/20/10 % of the \
             shoppers) each ship from three or four of them, nearest first, sharing some. Shoppers reserve by \
             region (one in five with an explicit list of warehouses), then confirm (70 %), release (20 %) or \
             abandon (10 %)."
        }
    }
}

/// The page's head: the styles are inline, nothing is fetched.
fn page_start(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>\
         body{{font-family:sans-serif;margin:2em auto;max-width:62em;padding:0 1em;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f4f4f4}}th:first-child,td.name,table.fields td{{text-align:left}}\
         .lead{{font-size:1.1em}}.ok{{color:#070}}.bad{{color:#b00}}\
         svg{{max-width:100%;height:auto;border:1px solid #ddd;display:block;margin:0.5em 0}}\
         details{{margin:0.5em 0}}summary{{cursor:pointer}}</style></head><body>",
        escape(title)
    )
}

fn headline(summary: &Summary) -> String {
    let latency = &summary.latency_us;
    format!(
        "{} requests in {:.2} s: <b>{} requests/s</b>; latency p50 {}, p99 {}, max {}. Invariants: {}.",
        grouped(summary.requests),
        summary.duration_s,
        compact(summary.throughput_rps),
        latency_label(latency.p50 as f64),
        latency_label(latency.p99 as f64),
        latency_label(latency.max as f64),
        verdict(summary)
    )
}

fn verdict(summary: &Summary) -> &'static str {
    if summary.invariants.ok {
        "<b class=\"ok\">OK</b>"
    } else {
        "<b class=\"bad\">BROKEN</b>"
    }
}

/// What was run, as (field, value) rows for people.
fn configuration(summary: &Summary) -> Vec<(&'static str, String)> {
    let config = &summary.config;
    let mut rows = Vec::new();
    let shape = match config.callers {
        Some(callers) => {
            format!("{callers} callers, each one operation at a time, over {} connections", config.connections)
        }
        None => format!(
            "{} connections × {} requests in flight each ({} in flight)",
            config.connections,
            config.depth,
            config.connections * config.depth
        ),
    };
    rows.push(("shape", shape));
    // --callers conflicts with --batch: a caller makes one call at a time.
    if config.callers.is_none() {
        let plural = if config.batch == 1 { "" } else { "s" };
        rows.push(("batch", format!("{} reserve{plural} per request", config.batch)));
    }
    let load = match (config.rate, &config.spike) {
        (None, _) => "closed loop: each worker sends its next request when the previous one is answered".to_string(),
        (Some(rate), None) => {
            format!("open loop at {} virtual users/s (latency counted from the scheduled time)", compact(rate))
        }
        (Some(rate), Some(spike)) => format!(
            "open loop at {} virtual users/s (latency counted from the scheduled time), spiking to {}× from {} s \
             for {} s",
            compact(rate),
            trim(spike.factor),
            trim(spike.at_secs),
            trim(spike.hold_secs)
        ),
    };
    rows.push(("load", load));
    if config.ping_only {
        rows.push(("operations", "PING only".to_string()));
    }
    rows.push(("users", format!("{} virtual users", grouped(summary.users))));
    rows.push(("stock", stock(&summary.audit)));
    rows.push((
        "duration",
        format!(
            "{:.2} s (stops after {} s, or when every user is done)",
            summary.duration_s,
            trim(config.duration_secs)
        ),
    ));
    if let Some(cpu) = &summary.server_cpu {
        rows.push((
            "server CPU",
            format!("{:.3} s over the load, {:.2} µs per request", cpu.cpu_us as f64 / 1e6, cpu.us_per_request),
        ));
    }
    rows
}

/// The sale's stock, from the target's counters (the summary has no
/// other record of it; a PING-only run has none).
fn stock(audit: &[SkuState]) -> String {
    let Some(first) = audit.first() else { return "none (no sale)".to_string() };
    if audit.iter().all(|state| state.total == first.total) {
        if audit.len() == 1 {
            format!("{} units", grouped(first.total))
        } else {
            format!("{} units on each of {} SKUs", grouped(first.total), audit.len())
        }
    } else {
        let total: u64 = audit.iter().map(|state| state.total).sum();
        format!("{} units over {} SKUs", grouped(total), audit.len())
    }
}

/// One row per run: the numbers a reader compares first.
fn runs_table(runs: &[(&str, &Summary)]) -> String {
    let mut table = String::from(
        "<table><tr><th>target</th><th>requests</th><th>duration</th><th>throughput</th><th>p50</th><th>p90</th>\
         <th>p99</th><th>p99.9</th><th>max</th><th>invariants</th></tr>",
    );
    for (label, summary) in runs {
        let latency = &summary.latency_us;
        let _ = write!(
            table,
            "<tr><td class=\"name\">{}</td><td>{}</td><td>{:.2} s</td><td>{} requests/s</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(label),
            grouped(summary.requests),
            summary.duration_s,
            compact(summary.throughput_rps),
            latency_label(latency.p50 as f64),
            latency_label(latency.p90 as f64),
            latency_label(latency.p99 as f64),
            latency_label(latency.p999 as f64),
            latency_label(latency.max as f64),
            verdict(summary)
        );
    }
    table.push_str("</table>");
    table
}

fn operations_table(summary: &Summary) -> String {
    let mut table = String::from(
        "<table><tr><th>operation</th><th>count</th><th>p50 µs</th><th>p90 µs</th><th>p99 µs</th>\
         <th>p99.9 µs</th><th>max µs</th></tr>",
    );
    for (name, op) in &summary.ops {
        let latency = &op.latency_us;
        let _ = write!(
            table,
            "<tr><td class=\"name\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            grouped(op.count),
            latency.p50,
            latency.p90,
            latency.p99,
            latency.p999,
            latency.max
        );
    }
    table.push_str("</table>");
    table
}

fn outcomes_table(summary: &Summary) -> String {
    let mut table = String::from("<table><tr><th>outcome</th><th>count</th></tr>");
    for (outcome, count) in &summary.outcomes {
        let _ = write!(table, "<tr><td class=\"name\">{}</td><td>{}</td></tr>", escape(outcome), grouped(*count));
    }
    table.push_str("</table>");
    table
}

fn invariants_section(summary: &Summary) -> String {
    let invariants = &summary.invariants;
    let mut section = format!("<p>{}: {}.</p><table>", verdict(summary), escape(&invariants.counts()));
    for (name, count, meaning) in [
        ("oversold", invariants.oversold, "units the target's counters cannot account for"),
        ("limit violations", invariants.limit_violations, "(SKU, user) pairs holding more than the limit"),
        ("lost acks", invariants.lost_acks, "acknowledged reservations the target does not have"),
        ("phantoms", invariants.phantoms, "reservations the drill was refused or never asked for"),
    ] {
        let class = if count == 0 { "ok" } else { "bad" };
        let _ = write!(
            section,
            "<tr><td class=\"name\">{name}</td><td class=\"{class}\">{}</td><td class=\"name\">{meaning}</td></tr>",
            grouped(count)
        );
    }
    let _ = write!(
        section,
        "<tr><td class=\"name\">checked</td><td>{}</td><td class=\"name\">acknowledged reservations checked one by \
         one against the target</td></tr></table>",
        grouped(invariants.acknowledged)
    );
    section
}

fn failover_paragraph(failover: &Failover) -> String {
    // NaN: no reserve was acknowledged after the kill (as in `table`).
    let again = if failover.unavailable_ms.is_finite() {
        format!("{} acknowledged again {:.0} ms after the kill", failover.new_leader, failover.unavailable_ms)
    } else {
        "no reservation was acknowledged after the kill (sold out before it, or the drill ended): no window measured"
            .to_string()
    };
    format!(
        "<p>{}</p>",
        escape(&format!(
            "Killed {} at {:.1} s; {again}; {} calls found the new leader and went again.",
            failover.killed, failover.killed_at_secs, failover.retried_calls
        ))
    )
}

/// The target's counters after the drill; folded when there are many
/// SKUs (the mixed scenario has 100).
fn audit_table(summary: &Summary) -> String {
    let mut table =
        String::from("<table><tr><th>SKU</th><th>total</th><th>available</th><th>reserved</th><th>sold</th></tr>");
    for state in &summary.audit {
        let _ = write!(
            table,
            "<tr><td class=\"name\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            state.sku,
            grouped(state.total),
            grouped(state.available),
            grouped(state.reserved),
            grouped(state.sold)
        );
    }
    table.push_str("</table>");
    if summary.audit.len() > 10 {
        format!(
            "<details><summary>The target's counters after the drill ({} SKUs)</summary>{table}</details>",
            summary.audit.len()
        )
    } else {
        format!("<h2>The target's counters after the drill</h2>{table}")
    }
}

fn ratios_table(ratios: &serde_json::Value) -> String {
    let Some(ratios) = ratios.as_object() else { return String::new() };
    let mut table = String::from(
        "<h2>Ratios</h2><p>stampede's number divided by the other target's: above 1 is more throughput for \
         stampede, below 1 a lower p99 for stampede.</p><table><tr><th>ratio</th><th>value</th></tr>",
    );
    for (name, value) in ratios {
        let value = match value.as_f64() {
            Some(ratio) => format!("{ratio:.2}×"),
            None => value.to_string(),
        };
        let _ = write!(
            table,
            "<tr><td class=\"name\">{}</td><td>{}</td></tr>",
            escape(&name.replace('_', " ")),
            escape(&value)
        );
    }
    table.push_str("</table>");
    table
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            _ => escaped.push(character),
        }
    }
    escaped
}

/// 1234567 as "1,234,567".
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A number with at most `places` decimals and no trailing zeros.
fn decimals(value: f64, places: usize) -> String {
    let text = format!("{value:.places$}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    if text == "-0" {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// A setting as typed: 2, 2.5, 0.25.
fn trim(value: f64) -> String {
    decimals(value, 2)
}

/// Three significant digits at most (more is noise in a measurement):
/// 547, 24.5, 1.23.
fn significant(value: f64) -> String {
    let magnitude = value.abs();
    decimals(
        value,
        if magnitude >= 99.95 {
            0
        } else if magnitude >= 9.995 {
            1
        } else {
            2
        },
    )
}

/// A rate or count for tick labels and headlines: 950, 12.5k, 1.25M.
fn compact(value: f64) -> String {
    // The thresholds sit where three digits round up to the next unit.
    if value.abs() >= 999_500.0 {
        format!("{}M", significant(value / 1e6))
    } else if value.abs() >= 999.5 {
        format!("{}k", significant(value / 1e3))
    } else {
        significant(value)
    }
}

/// Microseconds for people: 750 µs, 1.5 ms, 2 s.
fn latency_label(us: f64) -> String {
    if us < 999.5 {
        format!("{} µs", significant(us))
    } else if us < 999_500.0 {
        format!("{} ms", significant(us / 1e3))
    } else {
        format!("{} s", significant(us / 1e6))
    }
}

// Charts: plotters draws each into a string with its SVG backend, which
// the page inlines. No font feature: the SVG carries its text as <text>
// elements that the browser lays out in its own sans-serif, and plotters
// only estimates their extent for the layout (see the workspace's
// Cargo.toml).

/// The series colours, in order (distinct, and readable in print).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
/// The line of a total drawn among its parts (all operations of a run).
const TOTAL: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(220, 220, 220);
const LIGHT_GRID: RGBColor = RGBColor(240, 240, 240);
const FONT: &str = "sans-serif";
const WIDTH: u32 = 900;
const HEIGHT: u32 = 380;
const MARGIN: u32 = 16;
/// Room under the plot for the x ticks and the x axis title.
const X_LABELS: u32 = 52;
/// Room left of the plot for the y ticks and the y axis title.
const Y_LABELS: u32 = 84;
/// The x categories of the percentile charts.
const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn colour(index: usize) -> RGBColor {
    COLOURS[index % COLOURS.len()]
}

/// A line with its points marked (a run of one second is one point).
fn line_style(colour: RGBColor) -> ShapeStyle {
    colour.filled().stroke_width(2)
}

type ChartResult = Result<(), Box<dyn std::error::Error>>;

/// Draws one chart into a string with plotters' SVG backend and returns
/// it ready to inline; if plotters fails, a note saying so instead (a
/// report without one chart beats no report).
fn svg(
    description: &str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> ChartResult,
) -> String {
    let mut svg = String::new();
    let drawn: ChartResult = (|| {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    if let Err(error) = drawn {
        return format!(
            "<p class=\"bad\">The chart of {} could not be drawn: {}</p>",
            escape(description),
            escape(&error.to_string())
        );
    }
    // Inside an HTML page the parser puts <svg> in the SVG namespace by
    // itself; without the attribute the page names no URL at all.
    svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1).replacen(
        "<svg ",
        &format!("<svg role=\"img\" aria-label=\"{}\" ", escape(description)),
        1,
    )
}

/// The look every chart here shares: fonts, grid colours, tick labels
/// and axis titles; the caller adds the formatters and draws.
fn house_style<'mesh, 'a, 'b, X: Ranged, Y: Ranged>(
    mesh: &'mesh mut MeshStyle<'a, 'b, X, Y, SVGBackend<'a>>,
    x_title: &'b str,
    y_title: &'b str,
) -> &'mesh mut MeshStyle<'a, 'b, X, Y, SVGBackend<'a>> {
    mesh.x_desc(x_title)
        .y_desc(y_title)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .bold_line_style(GRID)
        .light_line_style(LIGHT_GRID)
}

/// Plotters draws the legend over the plot, wherever the lines are: the
/// share of the plot's height that a legend of `rows` takes at its top,
/// for the axis to keep the data below it.
fn legend_share(rows: usize) -> f64 {
    let plot_height = f64::from(HEIGHT - 2 * MARGIN - X_LABELS);
    ((rows as f64 * 19.0 + 26.0) / plot_height).min(0.6)
}

/// The top of a linear axis whose data reaches `high`, with room for a
/// legend of `rows` above it.
fn linear_top(high: f64, rows: usize) -> f64 {
    high.max(1.0) / (1.0 - legend_share(rows))
}

/// The top of a log axis whose data spans `low..high`, with room for a
/// legend of `rows` above it.
fn log_top(low: f64, high: f64, rows: usize) -> f64 {
    let span = (high.max(low * 2.0) / low).log10();
    low * 10f64.powf(span / (1.0 - legend_share(rows)))
}

fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> ChartResult {
    chart
        .configure_series_labels()
        .position(position)
        .margin(8)
        .background_style(WHITE.mix(0.9))
        .border_style(GRID)
        .label_font((FONT, 13))
        .draw()?;
    Ok(())
}

/// The legend's sample of a line.
fn legend_line(colour: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
}

/// A log axis over [low, high] microseconds, widened to round values,
/// with ticks at 1-2-5 steps while it spans up to three decades and at
/// the decades beyond (plotters' own log ticks are the decades only:
/// too few on the usual one- or two-decade latency axis), and light grid
/// lines at every 1..9 multiple.
fn log_axis(low: f64, high: f64) -> WithKeyPoints<LogCoord<f64>> {
    let low = round_down(low.max(1.0));
    let high = round_up(high.max(low * 2.0));
    let decades = (high / low).log10();
    let first = low.log10().floor() as i32;
    let last = high.log10().ceil() as i32;
    let within = |value: f64| value >= low * (1.0 - 1e-9) && value <= high * (1.0 + 1e-9);
    let mut ticks = Vec::new();
    let mut light = Vec::new();
    for exponent in first..=last {
        let decade = 10f64.powi(exponent);
        for multiple in 1..=9 {
            let value = decade * f64::from(multiple);
            if !within(value) {
                continue;
            }
            light.push(value);
            if multiple == 1 || (decades <= 3.0 && (multiple == 2 || multiple == 5)) {
                ticks.push(value);
            }
        }
    }
    (low..high).log_scale().with_key_points(ticks).with_light_points(light)
}

/// The largest 1-2-5 step (1, 2, 5, 10, 20, ...) at or below `value`.
fn round_down(value: f64) -> f64 {
    let decade = 10f64.powi(value.log10().floor() as i32);
    [5.0, 2.0, 1.0]
        .into_iter()
        .map(|multiple| multiple * decade)
        .find(|&step| step <= value * (1.0 + 1e-9))
        .unwrap_or(decade)
}

/// The smallest 1-2-5 step at or above `value`.
fn round_up(value: f64) -> f64 {
    let decade = 10f64.powi(value.log10().floor() as i32);
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|multiple| multiple * decade)
        .find(|&step| step >= value * (1.0 - 1e-9))
        .unwrap_or(10.0 * decade)
}

/// An axis of `count` categories at 0, 1, ...: ticks and labels at their
/// centres, no light grid. (Plotters' segmented axes put the ticks on the
/// edges, and a float axis with fixed key points has no label formatter.)
struct Categories(usize);

impl Ranged for Categories {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = (value + 0.5) / self.0.max(1) as f64;
        limit.0 + (fraction * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            (0..self.0).map(|index| index as f64).collect()
        }
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

/// A second of a run's timeline as the charts over time draw it.
struct DrawnSecond<'a> {
    second: &'a Second,
    /// Where it is drawn: the middle of the time it covers.
    middle: f64,
    /// How long it lasted: the last second is usually cut short by the
    /// end of the drill.
    width: f64,
}

/// The seconds of a run worth a point. A last sliver under 0.1 s is left
/// out (a handful of requests, no rate to speak of) unless it is all
/// there is; its requests are still in the percentiles.
fn drawn_seconds(summary: &Summary) -> Vec<DrawnSecond<'_>> {
    let seconds = summary.timeline.len();
    summary
        .timeline
        .iter()
        .filter_map(|second| {
            let start = second.second as f64;
            let width = (summary.duration_s - start).clamp(0.0, 1.0);
            (width >= 0.1 || seconds == 1).then(|| DrawnSecond { second, middle: start + width / 2.0, width })
        })
        .collect()
}

/// Requests per second of each second of a run. The last second's count
/// is divided by the part of the second the drill lasted, so the line
/// does not dive at the end.
fn throughput_points(summary: &Summary) -> Vec<(f64, f64)> {
    drawn_seconds(summary)
        .iter()
        .map(|drawn| (drawn.middle, drawn.second.requests as f64 / drawn.width.max(1e-3)))
        .collect()
}

/// The end of the x axis of the charts over time: whole seconds, at
/// least one, up to the last second drawn.
fn time_axis_end(runs: &[(&str, &Summary)]) -> f64 {
    runs.iter()
        .filter_map(|(_, summary)| drawn_seconds(summary).last().map(|drawn| drawn.second.second as f64 + drawn.width))
        .fold(1.0, f64::max)
        .ceil()
}

/// Requests per second over time, one line per run; `mean` adds each
/// run's mean as a dashed line (for a single run's page).
fn throughput_over_time(runs: &[(&str, &Summary)], mean: bool) -> String {
    let lines: Vec<Vec<(f64, f64)>> = runs.iter().map(|(_, summary)| throughput_points(summary)).collect();
    let end = time_axis_end(runs);
    let high = lines.iter().flatten().map(|point| point.1).fold(1.0, f64::max) * 1.05;
    let legend_rows = runs.len() * if mean { 2 } else { 1 };
    svg("requests per second over time", (WIDTH, HEIGHT), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(MARGIN)
            .x_label_area_size(X_LABELS)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0f64..end, 0f64..linear_top(high, legend_rows))?;
        house_style(&mut chart.configure_mesh(), "time into the drill", "requests per second")
            .x_label_formatter(&|seconds| format!("{} s", trim(*seconds)))
            .y_label_formatter(&|rate| compact(*rate))
            // Light lines between the ticks of a linear axis add nothing.
            .max_light_lines(0)
            .draw()?;
        for (index, ((label, summary), points)) in runs.iter().zip(&lines).enumerate() {
            let colour = colour(index);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), line_style(colour)).point_size(3))?
                .label(*label)
                .legend(legend_line(colour, 2));
            if mean {
                let rate = summary.throughput_rps;
                chart
                    .draw_series(DashedLineSeries::new([(0.0, rate), (end, rate)], 6, 4, colour.stroke_width(1)))?
                    .label(format!("mean: {} requests/s", compact(rate)))
                    .legend(legend_line(colour, 1));
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// A line of the latency over time: its name, its colour and its value
/// in a second.
type LatencyLine = (&'static str, RGBColor, fn(&Second) -> u64);

/// p50, p99 and max latency per second, on a log axis. Seconds without a
/// request have no latency: the lines break there (a failover's
/// unavailable window shows as a gap, not as a slope).
fn latency_over_time(summary: &Summary) -> String {
    let end = time_axis_end(&[("", summary)]);
    // p50 green, p99 orange, max red, as on the first reports.
    let series: [LatencyLine; 3] = [
        ("p50", COLOURS[2], |second| second.p50_us),
        ("p99", COLOURS[1], |second| second.p99_us),
        ("max", COLOURS[3], |second| second.max_us),
    ];
    let lines: Vec<Vec<Vec<(f64, f64)>>> = series
        .iter()
        .map(|(_, _, value)| {
            let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
            for drawn in drawn_seconds(summary) {
                let latency = value(drawn.second);
                if drawn.second.requests == 0 || latency == 0 {
                    segments.push(Vec::new());
                } else if let Some(segment) = segments.last_mut() {
                    segment.push((drawn.middle, latency as f64));
                }
            }
            segments.retain(|segment| !segment.is_empty());
            segments
        })
        .collect();
    let values = || lines.iter().flatten().flatten().map(|point| point.1);
    let low = values().fold(f64::INFINITY, f64::min);
    let low = if low.is_finite() { low } else { 1.0 };
    let high = values().fold(1.0, f64::max);
    svg("p50, p99 and max latency per second", (WIDTH, HEIGHT), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(MARGIN)
            .x_label_area_size(X_LABELS)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0f64..end, log_axis(low, log_top(low, high, series.len())))?;
        house_style(&mut chart.configure_mesh(), "time into the drill", "latency (log scale)")
            .x_label_formatter(&|seconds| format!("{} s", trim(*seconds)))
            .y_label_formatter(&|us| latency_label(*us))
            .x_max_light_lines(0)
            .draw()?;
        for ((name, colour, _), segments) in series.iter().zip(&lines) {
            for (number, segment) in segments.iter().enumerate() {
                let drawn =
                    chart.draw_series(LineSeries::new(segment.iter().copied(), line_style(*colour)).point_size(3))?;
                if number == 0 {
                    drawn.label(*name).legend(legend_line(*colour, 2));
                }
            }
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    })
}

/// Latency percentiles (p50 ... max as the x categories) on a log axis,
/// one line per series (name, latency, colour): the operations of one
/// run, or the runs of `compare`.
fn percentiles_chart(series: &[(&str, &Latency, RGBColor)], description: &str) -> String {
    let values = |latency: &Latency| [latency.p50, latency.p90, latency.p99, latency.p999, latency.max];
    let all = || series.iter().flat_map(|(_, latency, _)| values(latency)).filter(|&us| us > 0).map(|us| us as f64);
    let low = all().fold(f64::INFINITY, f64::min);
    let low = if low.is_finite() { low } else { 1.0 };
    let high = all().fold(1.0, f64::max);
    svg(description, (WIDTH, HEIGHT), |root| {
        let mut chart =
            ChartBuilder::on(root)
                .margin(MARGIN)
                .x_label_area_size(X_LABELS)
                .y_label_area_size(Y_LABELS)
                .build_cartesian_2d(Categories(PERCENTILES.len()), log_axis(low, log_top(low, high, series.len())))?;
        house_style(&mut chart.configure_mesh(), "percentile", "latency (log scale)")
            .x_label_formatter(&|index| PERCENTILES.get(index.round() as usize).unwrap_or(&"").to_string())
            .y_label_formatter(&|us| latency_label(*us))
            .draw()?;
        for (name, latency, colour) in series {
            let points: Vec<(f64, f64)> = values(latency)
                .into_iter()
                .enumerate()
                .filter(|&(_, us)| us > 0)
                .map(|(category, us)| (category as f64, us as f64))
                .collect();
            chart
                .draw_series(LineSeries::new(points, line_style(*colour)).point_size(4))?
                .label(*name)
                .legend(legend_line(*colour, 2));
        }
        // Percentiles rise to the right: the upper left is the clearest.
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
}

/// Throughput per run as horizontal bars (room for long target names),
/// each labelled with its value, the first run on top.
fn throughput_bars(runs: &[(&str, &Summary)]) -> String {
    let count = runs.len();
    // Room right of the longest bar for its label.
    let top = runs.iter().map(|(_, summary)| summary.throughput_rps).fold(1.0, f64::max) * 1.3;
    // Plotters estimates ~7 px a character of a 13 px label.
    let longest = runs.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0) as u32;
    let row = |index: usize| (count - 1 - index) as f64;
    svg("requests per second of each target", (WIDTH, 2 * MARGIN + X_LABELS + 20 + 48 * count as u32), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(MARGIN)
            .x_label_area_size(X_LABELS)
            .y_label_area_size((longest * 7 + 24).clamp(Y_LABELS, 320))
            .build_cartesian_2d(0f64..top, Categories(count))?;
        house_style(&mut chart.configure_mesh(), "requests per second", "")
            .x_label_formatter(&|rate| compact(*rate))
            .y_label_formatter(&|position| {
                let index = count as f64 - 1.0 - position.round();
                runs.get(index as usize).map_or(String::new(), |(label, _)| label.to_string())
            })
            // No grid line through the bars.
            .disable_y_mesh()
            .max_light_lines(0)
            .draw()?;
        chart.draw_series(runs.iter().enumerate().map(|(index, (_, summary))| {
            let row = row(index);
            Rectangle::new([(0.0, row - 0.32), (summary.throughput_rps, row + 0.32)], colour(index).filled())
        }))?;
        chart.draw_series(runs.iter().enumerate().map(|(index, (_, summary))| {
            let label = format!("{} requests/s", compact(summary.throughput_rps));
            let style = (FONT, 13).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
            EmptyElement::at((summary.throughput_rps, row(index))) + Text::new(label, (6, 0), style)
        }))?;
        Ok(())
    })
}
