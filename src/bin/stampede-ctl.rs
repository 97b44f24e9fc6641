//! `stampede-ctl`: a redis-cli-like tool for people and scripts.
//!
//! Exit status: 0 whenever the server answered (whatever the outcome: a
//! `sold_out` is an answer), 1 on connection, auth or protocol errors,
//! 2 on usage errors (from clap). With `--json` each command prints one
//! JSON object whose `status` field names the outcome.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use stampede_protocol::client::{new_reservation_id, Client, ClientConfig, ClientError};
use stampede_protocol::limits::RESERVE_PREFS_MAX;
use stampede_protocol::message::{NodeRole, Outcome, QueueConfig, QueueTicket, SaleCreate, SaleLocations, Where};
use stampede_protocol::Status;

#[derive(Parser, Debug)]
#[command(name = "stampede-ctl", version, about = "Talk to a stampede server")]
struct Args {
    /// Server address; for a cluster, every node's, comma-separated (the
    /// commands go to the leader, wherever it is).
    #[arg(long, default_value = "127.0.0.1:7070", global = true)]
    server: String,
    /// Print one JSON object per command.
    #[arg(long, global = true)]
    json: bool,
    /// Connect over TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long, global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Token (from the environment only, so it never shows in `ps`).
    #[arg(skip = std::env::var("STAMPEDE_TOKEN").unwrap_or_default())]
    token: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the server answers (prints its clock).
    Ping,
    /// A cluster's nodes (any token).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Sale administration (admin token).
    #[command(subcommand)]
    Sale(SaleCommand),
    /// Add stock to a sale (admin token): at one location, or at its first.
    Restock {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        qty: u64,
        /// The location (warehouse) id; default: the sale's first location.
        #[arg(long)]
        location: Option<u16>,
    },
    /// Pause a sale: reserves answer `paused` (admin token).
    Pause {
        #[arg(long)]
        sku: u64,
    },
    /// Resume a paused sale (admin token).
    Resume {
        #[arg(long)]
        sku: u64,
    },
    /// Hold units for a user. Prints the reservation id to confirm or release.
    Reserve {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        user: u64,
        #[arg(long, default_value_t = 1)]
        qty: u32,
        /// Reservation id in hex (default: a fresh random id). Reuse it to retry safely.
        #[arg(long, value_parser = parse_id)]
        id: Option<u128>,
        /// Preferred locations, in order (repeat the flag); the units come
        /// from the first that has them all.
        #[arg(long = "location", conflicts_with = "region")]
        locations: Vec<u16>,
        /// The shopper's region (the sale maps it to an order of locations).
        #[arg(long)]
        region: Option<u16>,
    },
    /// Turn a reservation into a sale.
    Confirm {
        #[arg(long, value_parser = parse_id)]
        id: u128,
        #[arg(long, default_value = "")]
        payment_ref: String,
    },
    /// Give a reservation's units back.
    Release {
        #[arg(long, value_parser = parse_id)]
        id: u128,
    },
    /// Counters of a sale.
    Status {
        #[arg(long)]
        sku: u64,
    },
    /// Take a place in a queued sale's line (the same ticket if already in it).
    Join {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        user: u64,
    },
    /// Where a user stands in a queued sale's line.
    Poll {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        user: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Every node given in --server: role, term, the leader, and from the
    /// leader each standby's durable and applied LSN and lag.
    Status,
}

#[derive(Subcommand, Debug)]
enum SaleCommand {
    /// Create a sale.
    Create {
        #[arg(long)]
        sku: u64,
        /// Units on sale (with --location: their sum, the default).
        #[arg(long, required_unless_present = "locations")]
        stock: Option<u64>,
        /// A location (warehouse) and its stock, ID=UNITS; repeat for each,
        /// in the default order of reservation.
        #[arg(long = "location", value_parser = parse_location)]
        locations: Vec<(u16, u64)>,
        /// A region's order of locations, R=ID,ID,...; repeat for each.
        #[arg(long = "region", value_parser = parse_region, requires = "locations")]
        regions: Vec<(u16, Vec<u16>)>,
        /// Units one user may hold reserved + sold.
        #[arg(long)]
        limit: u32,
        /// Reservation time-to-live.
        #[arg(long, default_value_t = 600)]
        ttl_secs: u64,
        /// Give this SKU its own shard thread pinned to a core.
        #[arg(long)]
        hot: bool,
        /// Gate the sale with a virtual queue (needs --admit-rate).
        #[arg(long, requires = "admit_rate")]
        queue: bool,
        /// Users admitted per second.
        #[arg(long, requires = "queue")]
        admit_rate: Option<u32>,
        /// Most admitted-but-not-yet-reserved users at once (default: follow the available stock).
        #[arg(long, requires = "queue", default_value_t = 0)]
        admit_cap: u32,
        /// How long an admitted user may take to reserve.
        #[arg(long, requires = "queue", default_value_t = 120)]
        admission_secs: u64,
        /// When the queue opens, RFC 3339 in UTC (2026-11-27T09:00:00Z); joiners before are shuffled.
        #[arg(long, requires = "queue", value_parser = parse_rfc3339_ms)]
        start_at: Option<u64>,
    },
    /// Add a location (warehouse) with its stock to a running sale.
    AddLocation {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        location: u16,
        #[arg(long)]
        stock: u64,
    },
    /// Set a region's order of locations (replacing the old one).
    Region {
        #[arg(long)]
        sku: u64,
        #[arg(long)]
        region: u16,
        /// Location ids in order, comma-separated (3,1).
        #[arg(long, value_delimiter = ',', required = true)]
        order: Vec<u16>,
    },
    /// Where sales run: dedicated shards, and the hottest sales with the
    /// requests per second the server's demand monitor measured.
    Placement,
    /// Move a live sale to a shard of its own or back to the shared pool.
    /// The placement is pinned: the server's demand monitor leaves it.
    Move {
        #[arg(long)]
        sku: u64,
        /// To a dedicated shard thread pinned to a core.
        #[arg(long, conflicts_with = "pool", required_unless_present = "pool")]
        dedicated: bool,
        /// Back to the pool shards.
        #[arg(long)]
        pool: bool,
    },
}

/// `ID=UNITS`.
fn parse_location(s: &str) -> Result<(u16, u64), String> {
    let (id, units) = s.split_once('=').ok_or("expected ID=UNITS (e.g. 3=500)")?;
    Ok((id.parse().map_err(|e| format!("location id: {e}"))?, units.parse().map_err(|e| format!("units: {e}"))?))
}

/// `R=ID,ID,...`.
fn parse_region(s: &str) -> Result<(u16, Vec<u16>), String> {
    let (region, ids) = s.split_once('=').ok_or("expected REGION=ID,ID,... (e.g. 2=3,1)")?;
    let ids = ids
        .split(',')
        .map(|id| id.parse().map_err(|e| format!("location id {id:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok((region.parse().map_err(|e| format!("region: {e}"))?, ids))
}

fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339(s).map_err(|e| format!("{e} (expected e.g. 2026-11-27T09:00:00Z)"))?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| "before 1970".to_string())?.as_millis();
    Ok(ms as u64)
}

fn parse_id(s: &str) -> Result<u128, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    if digits.is_empty() || digits.len() > 32 {
        return Err("expected 1 to 32 hex digits".into());
    }
    match u128::from_str_radix(digits, 16) {
        Ok(0) => Err("reservation id 0 is reserved".into()),
        Ok(id) => Ok(id),
        Err(e) => Err(format!("not hex: {e}")),
    }
}

fn outcome_json(outcome: &Outcome) -> Value {
    let mut v = json!({ "status": outcome.status.name(), "code": outcome.status.code() });
    match outcome.status {
        Status::Reserved => v["expires_at_ms"] = json!(outcome.detail),
        Status::Confirmed => v["confirmed_at_ms"] = json!(outcome.detail),
        Status::Expired if outcome.detail != 0 => v["expired_at_ms"] = json!(outcome.detail),
        Status::Busy => v["retry_after_ms"] = json!(outcome.detail),
        Status::Ok if outcome.detail != 0 => v["detail"] = json!(outcome.detail),
        _ => {}
    }
    v
}

fn ticket_json(t: &QueueTicket) -> Value {
    let mut v = json!({ "status": t.status.name(), "code": t.status.code(), "position": t.position });
    if t.status == Status::Waiting {
        v["estimated_wait_ms"] = json!(t.estimated_wait_ms);
        v["pre_start"] = json!(t.pre_start);
    }
    if t.stock_pending {
        v["stock_pending"] = json!(true);
    }
    if t.status == Status::Admitted && t.admitted_until_ms != 0 {
        v["admitted_until_ms"] = json!(t.admitted_until_ms);
    }
    v
}

/// `cluster status`: ask each node for itself, and the leader for its standbys.
async fn cluster_status(config: &ClientConfig) -> Result<Value, ClientError> {
    let mut nodes = Vec::new();
    let mut leader_view = None;
    for addr in config.addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let mut one = config.clone();
        one.addr = addr.to_string();
        one.max_attempts = 1;
        let answer = match Client::connect(one).await {
            Ok(client) => client.cluster().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(reply) => {
                nodes.push(json!({
                    "addr": addr, "reachable": true, "role": reply.role.name(), "term": reply.term,
                    "leader": reply.leader_addr,
                }));
                if matches!(reply.role, NodeRole::Leader | NodeRole::Single) {
                    leader_view = Some(reply);
                }
            }
            Err(e) => nodes.push(json!({ "addr": addr, "reachable": false, "error": e.to_string() })),
        }
    }
    let Some(leader) = leader_view else {
        return Ok(json!({ "status": "no_leader", "nodes": nodes }));
    };
    let head = leader.nodes.first().map_or(0, |n| n.durable_lsn);
    let members: Vec<Value> = leader
        .nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id, "addr": n.addr, "role": n.role.name(), "in_sync_set": n.in_sync_set,
                "streaming": n.streaming, "durable_lsn": n.durable_lsn, "applied_lsn": n.applied_lsn,
                "lag_records": head.saturating_sub(n.durable_lsn),
            })
        })
        .collect();
    Ok(json!({ "status": "ok", "term": leader.term, "leader": leader.leader_addr, "members": members, "nodes": nodes }))
}

async fn run(args: Args) -> Result<Value, ClientError> {
    let mut config = ClientConfig::new(args.server.clone(), args.token.clone());
    if let Some(ca) = &args.tls_ca {
        config.tls = Some(
            stampede_protocol::tls::client_config(ca)
                .map_err(|e| ClientError::InvalidRequest(format!("TLS CA file: {e}")))?,
        );
    }
    if let Command::Cluster(ClusterCommand::Status) = args.command {
        return cluster_status(&config).await;
    }
    let client = Client::connect(config).await?;
    Ok(match args.command {
        Command::Cluster(_) => unreachable!("answered above"),
        Command::Ping => {
            let o = client.ping().await?;
            json!({ "status": o.status.name(), "server_time_ms": o.detail })
        }
        Command::Sale(SaleCommand::Create {
            sku,
            stock,
            locations,
            regions,
            limit,
            ttl_secs,
            hot,
            queue,
            admit_rate,
            admit_cap,
            admission_secs,
            start_at,
        }) => {
            let ttl_ms = ttl_secs.saturating_mul(1000);
            let queue = queue.then(|| QueueConfig {
                admit_rate_per_s: admit_rate.unwrap_or(0),
                admit_cap,
                admission_ms: admission_secs.saturating_mul(1000),
                start_at_ms: start_at.unwrap_or(0),
            });
            let stock = stock.unwrap_or_else(|| locations.iter().map(|(_, units)| units).sum());
            let create = SaleCreate { sku, stock, limit_per_user: limit, ttl_ms, hot, queue };
            let o = if locations.is_empty() {
                client.create_sale(create).await?
            } else {
                client.create_sale_at(create, SaleLocations { locations, regions }).await?
            };
            let mut v = outcome_json(&o);
            v["sku"] = json!(sku);
            v
        }
        Command::Sale(SaleCommand::AddLocation { sku, location, stock }) => {
            let o = client.add_location(sku, location, stock).await?;
            let mut v = outcome_json(&o);
            v["sku"] = json!(sku);
            if o.status == Status::Ok {
                v["total"] = json!(o.detail);
                v.as_object_mut().expect("object").remove("detail");
            }
            v
        }
        Command::Sale(SaleCommand::Region { sku, region, order }) => {
            let mut v = outcome_json(&client.set_region(sku, region, &order).await?);
            v["sku"] = json!(sku);
            v
        }
        Command::Sale(SaleCommand::Placement) => {
            let p = client.placement().await?;
            let sales: Vec<Value> = p
                .sales
                .iter()
                .map(|s| {
                    json!({
                        "sku": s.sku, "placement": if s.dedicated { "dedicated" } else { "pool" },
                        "pinned": s.pinned, "decided_per_s": s.decided_per_s,
                    })
                })
                .collect();
            json!({
                "status": p.status.name(), "code": p.status.code(), "dedicated_shards": p.dedicated_shards,
                "dedicated_max": p.dedicated_max, "auto": p.auto, "sales": sales,
            })
        }
        Command::Sale(SaleCommand::Move { sku, dedicated, pool: _ }) => {
            let o = client.move_sale(sku, dedicated).await?;
            let mut v = json!({ "status": o.status.name(), "code": o.status.code(), "sku": sku });
            if o.status == Status::Ok {
                v["placement"] = json!(if dedicated { "dedicated" } else { "pool" });
                // How long the sale's requests waited for it (0: it was there already).
                v["held_us"] = json!(o.detail);
            }
            v
        }
        Command::Restock { sku, qty, location } => {
            let o = match location {
                None => client.restock(sku, qty).await?,
                Some(location) => client.restock_at(sku, location, qty).await?,
            };
            let mut v = outcome_json(&o);
            v["sku"] = json!(sku);
            if o.status == Status::Ok {
                // RESTOCK answers the sale's new total, RESTOCK_AT the location's.
                v[if location.is_some() { "location_total" } else { "total" }] = json!(o.detail);
                v.as_object_mut().expect("object").remove("detail");
            }
            v
        }
        Command::Pause { sku } => outcome_json(&client.pause(sku).await?),
        Command::Resume { sku } => outcome_json(&client.resume(sku).await?),
        Command::Reserve { sku, user, qty, id, locations, region } => {
            let id = id.unwrap_or_else(new_reservation_id);
            let at = match (region, locations.len()) {
                (Some(region), _) => Where::Region(region),
                (None, 0) => Where::Default,
                (None, n) if n <= RESERVE_PREFS_MAX => Where::locations(&locations),
                (None, n) => {
                    return Err(ClientError::InvalidRequest(format!("{n} locations; at most {RESERVE_PREFS_MAX}")))
                }
            };
            let o = client.reserve_at(sku, user, qty, id, at).await?;
            let mut v = outcome_json(&o);
            v["id"] = json!(format!("{id:032x}"));
            if o.status == Status::Reserved {
                v["location"] = json!(o.location);
            }
            v
        }
        Command::Confirm { id, payment_ref } => outcome_json(&client.confirm(id, payment_ref.as_bytes()).await?),
        Command::Release { id } => outcome_json(&client.release(id).await?),
        Command::Status { sku } => {
            let s = client.status(sku).await?;
            let sale = s.sale;
            let mut v = json!({
                "status": s.status.name(), "sku": sku,
                "total": sale.total, "available": sale.available,
                "reserved": sale.reserved, "sold": sale.sold,
                "reservations": sale.reservations, "limit_per_user": sale.limit_per_user,
                "ttl_ms": sale.ttl_ms, "hot": sale.hot, "paused": sale.paused,
                "placement": if sale.hot { "dedicated" } else { "pool" }, "pinned": sale.pinned,
            });
            if s.status == Status::Ok {
                let l = client.locations(sku).await?;
                v["locations"] = json!(l
                    .locations
                    .iter()
                    .map(|l| json!({
                        "location": l.location, "total": l.total, "available": l.available,
                        "reserved": l.reserved, "sold": l.sold,
                    }))
                    .collect::<Vec<_>>());
                if !l.regions.is_empty() {
                    v["regions"] = json!(l
                        .regions
                        .iter()
                        .map(|(r, order)| json!({ "region": r, "order": order }))
                        .collect::<Vec<_>>());
                }
            }
            if let Some(q) = sale.queue {
                v["queue"] = json!({
                    "waiting": q.waiting, "admit_rate_per_s": q.admit_rate_per_s,
                    "admitted_outstanding": q.admitted_outstanding, "admitted_total": q.admitted_total,
                    "oldest_wait_ms": q.oldest_wait_ms,
                });
            }
            v
        }
        Command::Join { sku, user } => ticket_json(&client.join(sku, user).await?),
        Command::Poll { sku, user } => ticket_json(&client.poll(sku, user).await?),
    })
}

fn print_human(v: &Value) {
    let status = v["status"].as_str().unwrap_or("?");
    if let Some(members) = v.get("members").and_then(Value::as_array) {
        println!("{status}: term {} leader {}", v["term"], v["leader"].as_str().unwrap_or("?"));
        println!(
            "{:>10} {:>22} {:>8} {:>5} {:>9} {:>12} {:>12} {:>8}",
            "id", "addr", "role", "sync", "streaming", "durable_lsn", "applied_lsn", "lag"
        );
        for m in members {
            println!(
                "{:>10} {:>22} {:>8} {:>5} {:>9} {:>12} {:>12} {:>8}",
                m["id"].as_str().unwrap_or(""),
                m["addr"].as_str().unwrap_or(""),
                m["role"].as_str().unwrap_or(""),
                // Value's Display ignores widths: strings first.
                m["in_sync_set"].to_string(),
                m["streaming"].to_string(),
                m["durable_lsn"].to_string(),
                m["applied_lsn"].to_string(),
                m["lag_records"].to_string()
            );
        }
        for n in v["nodes"].as_array().into_iter().flatten().filter(|n| n["reachable"] == json!(false)) {
            println!("unreachable: {} ({})", n["addr"].as_str().unwrap_or(""), n["error"].as_str().unwrap_or(""));
        }
        return;
    }
    if let Some(sales) = v.get("dedicated_max").and(v.get("sales")).and_then(Value::as_array) {
        println!(
            "{status}: {} dedicated shard(s) of {} the monitor may use; moves by demand {}",
            v["dedicated_shards"],
            v["dedicated_max"],
            if v["auto"] == json!(true) { "on" } else { "off" }
        );
        println!("{:>20} {:>10} {:>7} {:>14}", "sku", "placement", "pinned", "decided/s");
        for s in sales {
            println!(
                "{:>20} {:>10} {:>7} {:>14}",
                s["sku"].to_string(),
                s["placement"].as_str().unwrap_or(""),
                s["pinned"].to_string(),
                s["decided_per_s"].to_string()
            );
        }
        return;
    }
    if v.get("total").is_some() && v.get("available").is_some() {
        println!(
            "{status}: total {} available {} reserved {} sold {} (reservations {}, limit {}/user, ttl {} ms{}{}{})",
            v["total"],
            v["available"],
            v["reserved"],
            v["sold"],
            v["reservations"],
            v["limit_per_user"],
            v["ttl_ms"],
            if v["hot"] == json!(true) { ", hot" } else { "" },
            if v["pinned"] == json!(true) { ", pinned" } else { "" },
            if v["paused"] == json!(true) { ", paused" } else { "" },
        );
        // One location (id 0) is a sale without locations: nothing more to say.
        let locations = v.get("locations").and_then(Value::as_array).filter(|l| l.len() > 1 || l[0]["location"] != 0);
        if let Some(locations) = locations {
            println!("{:>10} {:>12} {:>12} {:>12} {:>12}", "location", "total", "available", "reserved", "sold");
            for l in locations {
                println!(
                    "{:>10} {:>12} {:>12} {:>12} {:>12}",
                    l["location"].to_string(),
                    l["total"].to_string(),
                    l["available"].to_string(),
                    l["reserved"].to_string(),
                    l["sold"].to_string()
                );
            }
            for r in v["regions"].as_array().into_iter().flatten() {
                println!("region {}: {}", r["region"], r["order"]);
            }
        }
        if let Some(q) = v.get("queue") {
            println!(
                "queue: {} waiting, {} admitted now, {} admitted in all, {}/s, oldest wait {} ms",
                q["waiting"],
                q["admitted_outstanding"],
                q["admitted_total"],
                q["admit_rate_per_s"],
                q["oldest_wait_ms"]
            );
        }
        return;
    }
    let mut line = status.to_string();
    for (key, value) in v.as_object().into_iter().flatten() {
        if key != "status" && key != "code" {
            line.push_str(&format!(
                " {key}={}",
                value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string())
            ));
        }
    }
    println!("{line}");
}

fn main() {
    let args = Args::parse();
    let json_output = args.json;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(v) => {
            if json_output {
                println!("{v}");
            } else {
                print_human(&v);
            }
        }
        Err(e) => {
            if json_output {
                println!("{}", json!({ "status": "error", "error": e.to_string() }));
            }
            eprintln!("stampede-ctl: {e}");
            std::process::exit(1);
        }
    }
}
