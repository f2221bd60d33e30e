//! The `coalesce` command: measure the transport, and (with later subcommands) run programs on
//! borrowed memory.

use std::net::SocketAddr;
use std::process::ExitCode;

use bytesize::ByteSize;
use clap::{Parser, Subcommand};
use coalesce::latency::{self, LatencyOptions};
use rdma::LinkProfile;

#[derive(Debug, Parser)]
#[command(name = "coalesce", version, about = "Borrow memory from nearby machines: tools for Coalesce")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure one-sided READ and WRITE round trips (median, p99), blocking and busy-polling.
    ///
    /// Without --server, starts a memory-server inside this process on 127.0.0.1.
    Latency {
        /// memory-server to measure against (default: an embedded one on loopback).
        #[arg(long)]
        server: Option<SocketAddr>,
        /// Round trips per measurement.
        #[arg(long, default_value_t = 20_000)]
        ops: usize,
        /// Bytes per request.
        #[arg(long, default_value = "4KiB")]
        size: ByteSize,
        /// Link emulation: loopback, lan, 5g-urllc, wifi, or e.g. delay=1ms,jitter=100us,bandwidth=1Gbit.
        #[arg(long, default_value = "loopback")]
        link: LinkProfile,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    remote_mem_server::init_logging("warn");
    match cli.command {
        Command::Latency { server, ops, size, link } => {
            let Ok(size) = usize::try_from(size.as_u64()) else {
                eprintln!("coalesce: --size is too large for this machine");
                return ExitCode::FAILURE;
            };
            if size == 0 || size > 16 << 20 {
                eprintln!("coalesce: --size must be between 1 byte and 16 MiB");
                return ExitCode::FAILURE;
            }
            println!("link: {link}");
            match latency::run(&LatencyOptions { server, ops: ops.max(1), size, link }) {
                Ok(reports) => {
                    for r in reports {
                        println!("{r}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("coalesce: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
