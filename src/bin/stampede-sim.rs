//! `stampede-sim`: the deterministic simulator (SIMULATION.md) from the
//! command line. Replay one seed exactly (`--seed S --trace`), or run many
//! seeds on every core for a long run before a release (`--seeds N`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use stampede::sim::{self, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "stampede-sim",
    about = "Run the deterministic simulator: a leader, its standby, etcd, disks, clock and clients"
)]
struct Args {
    /// Replay this seed (with --trace: print every step).
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds, from --first-seed on, on every core.
    #[arg(long, default_value_t = 64)]
    seeds: u64,
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Steps of the faulty phase per seed (a quiet phase follows).
    #[arg(long, default_value_t = 20_000)]
    steps: u64,
    /// Print the trace of a replayed seed.
    #[arg(long)]
    trace: bool,
    /// On a failure, look for a smaller failing configuration.
    #[arg(long)]
    shrink: bool,
    /// Threads (default: the available cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        let config = SimConfig { trace: args.trace, ..SimConfig::new(seed, args.steps) };
        let started = Instant::now();
        return match sim::run(&config) {
            Ok(report) => {
                for line in &report.trace {
                    println!("{line}");
                }
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "seed {seed}: ok in {secs:.2} s; {} steps, {} operations sent ({:.0}/s), {} answered, {} \
                     reservations acknowledged; {} kills, {} power losses, {} log failures, {} recoveries, {} \
                     refusals of flipped data, {} of ambiguous torn writes, {} checkpoints, {} moves between shards; standby: {} records \
                     replicated, {} failovers, {} rebuilds, {} crashes; {} terms won, {} leases lost, {} tails cut; reconciler: {} records, {} comparisons; trace digest \
                     {:016x}; leader's disk {:?}",
                    report.steps,
                    report.ops_sent,
                    report.ops_sent as f64 / secs,
                    report.ops_answered,
                    report.reservations_acked,
                    report.kills,
                    report.power_losses,
                    report.log_failures,
                    report.recoveries,
                    report.refusals,
                    report.torn_refusals,
                    report.checkpoints,
                    report.moves,
                    report.replicated,
                    report.failovers,
                    report.standby_rebuilds,
                    report.standby_crashes,
                    report.elections,
                    report.leases_lost,
                    report.tails_cut,
                    report.reconciled,
                    report.ledger_checks,
                    report.trace_digest,
                    report.disk
                );
                std::process::ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("{failure}");
                if args.shrink {
                    shrink(&config);
                }
                std::process::ExitCode::FAILURE
            }
        };
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = Arc::new(AtomicU64::new(args.first_seed));
    let end = args.first_seed + args.seeds;
    let ops = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (next, ops, failures) = (next.clone(), ops.clone(), failures.clone());
            let steps = args.steps;
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                match sim::run(&SimConfig::new(seed, steps)) {
                    Ok(report) => {
                        ops.fetch_add(report.ops_sent, Ordering::Relaxed);
                    }
                    Err(failure) => {
                        eprintln!("{failure}");
                        failures.lock().push(failure.seed);
                    }
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    let failed = failures.lock().clone();
    println!(
        "{} seeds ({}..{end}) in {secs:.1} s on {threads} threads: {} failed; {ops} client operations, {:.0} per \
         second of real time ({:.0} per thread)",
        args.seeds,
        args.first_seed,
        failed.len(),
        ops as f64 / secs,
        ops as f64 / secs / threads as f64
    );
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        println!("failed seeds: {failed:?} (replay: stampede-sim --seed S --trace --shrink)");
        std::process::ExitCode::FAILURE
    }
}

fn shrink(config: &SimConfig) {
    match sim::shrink(&SimConfig { trace: false, ..config.clone() }) {
        Some((smaller, failure)) => eprintln!(
            "shrunk: --steps {} with faults {:?} still fails at step {}: {}",
            smaller.steps,
            smaller.faults.names(),
            failure.step,
            failure.message
        ),
        None => eprintln!("shrink: the failure did not reproduce"),
    }
}
