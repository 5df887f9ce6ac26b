//! `loadgen`: drives a real `ternd` over TCP and reports what it sustained.
//!
//! The process a user starts is the coordinator ([`coord`]): it starts
//! `--procs` worker processes ([`worker`]), each running `--threads` glommio
//! executors that open many connections from many source addresses
//! ([`wire`]), set up users ([`users`]) and run one scenario ([`connect`],
//! [`pairs`], [`groups`], [`offline`], [`churn`], [`mix`] from a
//! [`profile`], [`presence`] over a friend graph; against nats-server or
//! mosquitto [`peer_load`] over [`peer`], [`nats`] and [`mqtt`]). Every
//! received stream is checked for loss, duplicates and reordering
//! ([`verify`]). Latencies go into HdrHistograms ([`stats`]) that
//! the coordinator merges into one result ([`report`]): a human summary on
//! stdout, `--json` and `--hdr-log` files. `loadgen report` turns results
//! into a capacity plan ([`plan`]) and a percentile plot ([`plot`]). [`sys`]
//! handles fd limits and reading the server's memory. Usage: `loadgen --help`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod churn;
mod cli;
mod connect;
mod coord;
mod groups;
mod jwt;
mod mix;
mod mqtt;
mod nats;
mod offline;
mod pairs;
mod peer;
mod peer_load;
mod plan;
mod plot;
mod presence;
mod profile;
mod report;
mod stats;
mod sys;
mod users;
mod verify;
mod wire;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let cli::Scenario::Report(args) = &cli.scenario {
        return match plan::run(args) {
            Ok(markdown) => {
                print!("{markdown}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen report: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(e) = cli.validate() {
        eprintln!("loadgen: {e}");
        return ExitCode::from(2);
    }
    if let Some(child) = cli.common.child {
        return match worker::run(cli, child) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // The coordinator reads this line and stops the other workers.
                println!("fatal {e}");
                ExitCode::FAILURE
            }
        };
    }
    match coord::run(&cli) {
        Ok((result, hist)) => {
            print!("{}", report::summary(&result));
            let mut status = ExitCode::SUCCESS;
            let presence = result.presence.as_ref().map_or(0, |p| p.violations());
            let violations = result.lost + result.duplicated + result.reordered + presence;
            if cli.common.verify && violations > 0 {
                eprintln!(
                    "loadgen: verify failed: {} lost, {} duplicated, {} reordered, {} wrong presence",
                    result.lost, result.duplicated, result.reordered, presence
                );
                status = ExitCode::FAILURE;
            }
            if let Some(path) = &cli.common.json {
                if let Err(e) = report::write_json(path, &result, &hist) {
                    eprintln!("loadgen: {e}");
                    status = ExitCode::FAILURE;
                }
            }
            if let Some(path) = &cli.common.hdr_log {
                if let Err(e) = report::write_hdr_log(path, &hist, result.duration_s) {
                    eprintln!("loadgen: {e}");
                    status = ExitCode::FAILURE;
                }
            }
            status
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
