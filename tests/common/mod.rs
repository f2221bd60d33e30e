//! Helpers shared by the end-to-end tests: start a real `memory-server` process on 127.0.0.1 with
//! a free port, and stop it when the test ends.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdma::{Completion, CompletionStatus, Endpoint, PollMode};

/// A `memory-server` child process; killed on drop.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `memory-server --listen 127.0.0.1:0 ARGS` and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_memory-server"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn memory-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Self { child, addr }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        std::mem::forget(self);
        status
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for exactly one completion (panics after 10 s).
pub fn wait_one(ep: &Endpoint) -> Completion {
    let mut out = Vec::new();
    let n = ep.wait(&mut out, 1, Duration::from_secs(10), PollMode::Block).expect("wait");
    assert_eq!(n, 1, "no completion within 10 s");
    out[0]
}

/// Waits for one completion and checks it succeeded.
pub fn wait_ok(ep: &Endpoint) -> Completion {
    let c = wait_one(ep);
    assert_eq!(c.status, CompletionStatus::Success, "{c:?}");
    c
}

/// A page of 4 KiB whose every 8-byte word encodes (seed, page, word).
pub fn pattern(seed: u64, page: u64) -> Vec<u8> {
    (0..512u64).flat_map(|w| (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (page << 16) ^ w).to_le_bytes()).collect()
}
