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
        Self::start_at("127.0.0.1:0", args)
    }

    /// Starts `memory-server --listen LISTEN ARGS` (a fixed port, to restart a lender where it was).
    pub fn start_at(listen: &str, args: &[&str]) -> Self {
        let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn_at(listen, args, &level, Stdio::inherit())
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the server.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
    }

    /// Like [`ServerProcess::start`], logging at debug level into the file `log`.
    pub fn start_logging_to(args: &[&str], log: &std::path::Path) -> Self {
        Self::start_at_logging_to("127.0.0.1:0", args, log)
    }

    /// Like [`ServerProcess::start_at`], logging at debug level into the file `log`.
    pub fn start_at_logging_to(listen: &str, args: &[&str], log: &std::path::Path) -> Self {
        let file = std::fs::File::create(log).expect("log file");
        Self::spawn_at(listen, args, "debug", Stdio::from(file))
    }

    /// Starts `memory-server --listen 127.0.0.1:0 ARGS` inside the network namespace `ns`.
    pub fn start_in(ns: &Netns, args: &[&str]) -> Self {
        let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(ns.command(env!("CARGO_BIN_EXE_memory-server")), "127.0.0.1:0", args, &level, Stdio::inherit())
    }

    fn spawn_at(listen: &str, args: &[&str], level: &str, stderr: Stdio) -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_memory-server")), listen, args, level, stderr)
    }

    fn spawn(mut command: Command, listen: &str, args: &[&str], level: &str, stderr: Stdio) -> Self {
        let mut child = command
            .args(["--listen", listen])
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
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

    /// The server's resident memory now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        let kib: u64 = line.split_whitespace().nth(1).expect("value").parse().expect("number");
        kib * 1024
    }

    /// Waits for the server to exit (after a signal sent with [`ServerProcess::signal`]).
    pub fn wait(mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        std::mem::forget(self);
        status
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

/// Reads the page at `addr` from the kernel (into a pipe): a page the pager refuses to serve
/// gives `EFAULT` instead of killing the test with SIGBUS.
pub fn kernel_read(addr: usize) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `addr` is a whole page of a live region; the kernel reads it through userfaultfd
    // and reports a page the pager poisons as EFAULT.
    let rc = unsafe { libc::write(fds[1], addr as *const libc::c_void, coalesce_pager::PAGE_SIZE) };
    let result = if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    for fd in fds {
        // SAFETY: closes the descriptors pipe(2) just made.
        unsafe { libc::close(fd) };
    }
    result
}

/// Waits until `done` holds for the pager's statistics (panics after 60 s, naming `what`).
pub fn wait_stats(pager: &coalesce_pager::Pager, what: &str, done: impl Fn(&coalesce_pager::PagerStats) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = pager.stats();
        if done(&stats) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never happened:\n{stats}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace made for one test (`ip netns add`), with its loopback up and multicast on
/// (for mDNS); deleted on drop. Processes started in it must be stopped first.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace, or `None` (the test then skips, saying why) where namespaces cannot be
    /// made: not root, or no `ip`. With `COALESCE_REQUIRE_PROGRAMS` set (CI), that fails instead.
    pub fn new(tag: &str) -> Option<Self> {
        let name = format!("coalesce-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        let made = ip(&["netns", "add", &name])
            && ip(&["-n", &name, "link", "set", "lo", "up"])
            && ip(&["-n", &name, "link", "set", "lo", "multicast", "on"]);
        if !made {
            assert!(
                std::env::var_os("COALESCE_REQUIRE_PROGRAMS").is_none(),
                "cannot make a network namespace (needs root and iproute2)"
            );
            eprintln!("skipped: cannot make a network namespace (needs root and iproute2)");
            let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
            return None;
        }
        Some(Self { name })
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The sort pipeline the `coalesce run` tests give a program: 60 MB through `sort`.
pub const SORT_PIPELINE: [&str; 3] = ["sh", "-c", "head -c 60000000 /dev/zero | sort | wc -c"];

/// Checks the output of `coalesce run ... -- SORT_PIPELINE`: success, the right count, and a
/// report of its own from `sort`; returns sort's remote faults.
pub fn sort_pipeline_faults(out: &std::process::Output) -> u64 {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // sort ends its one line with a newline.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "60000001");
    let sort = stderr
        .lines()
        .find(|l| l.contains("(sort, parent "))
        .unwrap_or_else(|| panic!("no report from sort: {stderr}"));
    sort.split(", ").find_map(|f| f.strip_suffix(" remote faults")?.parse().ok()).unwrap()
}

/// A TCP proxy in front of a real `memory-server` that passes its first connection (the pager's
/// control session) and, while `refusing` is set, closes every later one as soon as it is
/// accepted (the pager's data connections, and its attempts to revive the lender).
pub struct RefusingProxy {
    pub addr: SocketAddr,
    pub refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections closed unanswered so far.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RefusingProxy {
    pub fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (refusing, refused) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicUsize::new(0)));
        let (flag, count) = (Arc::clone(&refusing), Arc::clone(&refused));
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                if n > 0 && flag.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                StallingProxy::pump_pair(client, server, false);
            }
        });
        Self { addr, refusing, refused }
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`, standing in for a lender that grants a session
/// and then stalls: on the first `stalls` connections through it, the server's replies stop once
/// the client has sent its second request (they are read and dropped); later connections pass
/// everything. Plaintext connections only (a request is one write).
pub struct StallingProxy {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl StallingProxy {
    pub fn start(target: SocketAddr, stalls: usize) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let stalling = count.fetch_add(1, Ordering::SeqCst) < stalls;
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                Self::pump_pair(client, server, stalling);
            }
        });
        Self { addr, accepted }
    }

    fn pump_pair(client: std::net::TcpStream, server: std::net::TcpStream, stalling: bool) {
        use std::io::{Read, Write};
        use std::sync::atomic::{AtomicBool, Ordering};
        let stalled = std::sync::Arc::new(AtomicBool::new(false));
        let (mut c_in, mut c_out) = (client.try_clone().unwrap(), client);
        let (mut s_in, mut s_out) = (server.try_clone().unwrap(), server);
        let flag = std::sync::Arc::clone(&stalled);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut requests = 0;
            while let Ok(n @ 1..) = c_in.read(&mut buf) {
                requests += 1;
                if stalling && requests == 2 {
                    flag.store(true, Ordering::SeqCst);
                }
                if s_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s_out.shutdown(std::net::Shutdown::Both);
        });
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n @ 1..) = s_in.read(&mut buf) {
                if !stalled.load(Ordering::SeqCst) && c_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c_out.shutdown(std::net::Shutdown::Both);
        });
    }
}
