//! End-to-end tests of `libcoalesce.so`: the hazard probe under the preload (threads, read(2) into
//! paged-out memory, allocator purges, fork without exec, fork+exec, posix_spawn, raw anonymous
//! mappings), configuration errors, and real programs from Debian packages (python3 with and
//! without its own allocator, sqlite3, sort, redis-server with a fork-based save) whose output must
//! match a plain run while their peak resident memory stays below the budget plus a fixed overhead.

#![allow(missing_docs, clippy::unwrap_used, clippy::cast_precision_loss)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coalesce_pager::ExitReport;

const MIB: u64 = 1 << 20;
/// What a preloaded process may hold beyond its heap budget: the program's own binary, libraries
/// and stack, this library's internal (glibc) heap, staging buffers and touched page-table entries.
const FIXED_OVERHEAD: u64 = 40 * MIB;

fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    // `cargo build` puts the library in target/<profile>; `cargo test` leaves it in deps/.
    let candidates = [deps.parent().unwrap().join("libcoalesce.so"), deps.join("libcoalesce.so")];
    let lib = candidates.iter().filter(|p| p.is_file()).max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    lib.unwrap_or_else(|| {
        panic!("libcoalesce.so is missing from {candidates:?}: build it first: cargo build --workspace --release")
    })
    .clone()
}

fn probe() -> &'static str {
    env!("CARGO_BIN_EXE_coalesce-preload-probe")
}

fn server() -> lender::ServerHandle {
    let config = lender::ServerConfig::embedded(8 << 30);
    lender::start(config).unwrap()
}

struct Outcome {
    status: i32,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
    max_rss: u64,
    stats: Option<ExitReport>,
}

/// Runs `cmd` (optionally preloaded against `server` with `budget`) and collects its output, exit
/// status, wall time and peak RSS.
fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn run(mut cmd: Command, preload: Option<(&lender::ServerHandle, u64)>, stdin: &[u8]) -> Outcome {
    let stats_file =
        std::env::temp_dir().join(format!("coalesce-test-stats-{}-{}", std::process::id(), fastrand::u64(..)));
    if let Some((server, budget)) = preload {
        cmd.env("LD_PRELOAD", library())
            .env("COALESCE_SERVERS", server.addr().to_string())
            .env("COALESCE_LOCAL", budget.to_string())
            .env("COALESCE_HEAP_SIZE", "8GiB")
            .env("COALESCE_STATS", &stats_file);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut v).unwrap();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = String::new();
        std::io::Read::read_to_string(&mut err, &mut v).unwrap();
        v
    });
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // Peak RSS: the kernel's high-water mark of the program's own address space, polled until it
    // exits (`wait4`'s ru_maxrss would also count this large test process, whose address space a
    // spawned child shares until exec). The program's stats add the value read at exit.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hwm_t = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(kib) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                {
                    peak = peak.max(kib * 1024);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    std::mem::forget(child);
    done.store(true, std::sync::atomic::Ordering::Release);
    let polled_peak = hwm_t.join().unwrap();
    writer.join().unwrap();
    let elapsed = start.elapsed();
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    let stats: Option<ExitReport> = std::fs::read_to_string(&stats_file).ok().map(|t| {
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("the statistics are not an exit report ({e}): {t}"))
    });
    let _ = std::fs::remove_file(&stats_file);
    Outcome {
        status: code,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed,
        max_rss: polled_peak.max(stats.as_ref().map_or(0, |s| s.peak_rss_bytes)),
        stats,
    }
}

fn probe_mode(mode: &str) -> Outcome {
    let server = server();
    let out = run(cmd(probe(), &[mode]), Some((&server, 32 * MIB)), b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status, 0, "probe {mode}: {stdout}\n{}", out.stderr);
    assert!(stdout.contains(&format!("OK {mode}")), "{stdout}");
    let stats = out.stats.as_ref().expect("statistics were written");
    eprintln!(
        "probe {mode}: {:.2} s, peak RSS {:.1} MiB\n{stats}",
        out.elapsed.as_secs_f64(),
        out.max_rss as f64 / MIB as f64
    );
    out
}

#[test]
fn threads_allocating_and_freeing_across_threads() {
    probe_mode("threads");
}

#[test]
fn read_syscall_into_a_paged_out_buffer() {
    probe_mode("read-into");
}

#[test]
fn fork_without_exec_sees_the_heap_as_it_was() {
    let out = probe_mode("fork");
    // Pulling the heap local for the child is said and counted, not hidden.
    assert!(out.stderr.contains("fork: the child needs the whole heap"), "{}", out.stderr);
    let stats = out.stats.unwrap();
    assert!(stats.pager.held_pages > 0, "{stats}");
    assert!(stats.pager.overshoot_events > 0, "pages past the budget for the fork are over-budget events:\n{stats}");
}

#[test]
fn a_fork_that_would_bring_back_more_than_fork_max_fails_with_enomem() {
    let server = server();
    let mut c = cmd(probe(), &["fork"]);
    c.env("COALESCE_FORK_MAX", "8MiB");
    let out = run(c, Some((&server, 32 * MIB)), b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The probe's heap is far larger than 8 MiB: its fork fails, and the program says so.
    assert_eq!(out.status, 1, "{stdout}\n{}", out.stderr);
    assert!(stdout.contains("FAIL fork failed") || out.stderr.contains("FAIL fork failed"), "{stdout}");
    assert!(out.stderr.contains("fork refused (ENOMEM)"), "{}", out.stderr);
    let stats = out.stats.unwrap();
    assert_eq!(stats.preload.forks_refused, 1, "{stats}");
    assert_eq!(stats.pager.held_pages, 0, "nothing may be brought back for a refused fork:\n{stats}");
}

#[test]
fn fork_then_exec() {
    probe_mode("fork-exec");
}

#[test]
fn posix_spawn() {
    probe_mode("spawn");
}

#[test]
fn allocator_purges_become_discards() {
    let server = server();
    let out = run(cmd(probe(), &["purge"]), Some((&server, 32 * MIB)), b"");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let stats = out.stats.unwrap();
    assert!(stats.pager.removed_pages > 0, "mimalloc's purges were not seen as discards:\n{stats}");
}

#[test]
fn raw_anonymous_mappings_are_paged_and_keep_the_kernel_semantics() {
    // 256 MiB mapped with mmap at a 32 MiB budget: zero pages, partial munmap, MADV_DONTNEED,
    // MAP_FIXED, mremap growth and shrink, a fork child, small and file mappings.
    let out = probe_mode("mmap");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stats = out.stats.unwrap();
    let m = stats.preload;
    assert!(m.mmaps_served >= 4, "the mappings were not served from the paged heap:\n{stats}");
    assert!(m.mmap_peak_bytes >= 256 * MIB, "{stats}");
    // mprotect to read-only and munmap of malloc's memory are refused, counted and said.
    assert!(stdout.contains("refused: 2"), "{stdout}");
    assert_eq!(m.calls_refused, 2, "{stats}");
    assert_eq!(m.mmaps_too_large, 1, "a 64 GiB reservation does not fit the 8 GiB heap:\n{stats}");
    assert!(out.stderr.contains("mprotect on the paged heap refused"), "{}", out.stderr);
    assert!(stats.pager.remote_faults > 0, "nothing was paged back:\n{stats}");
    // The budget held although the program touched 256 MiB (the fork child's copy is its own).
    assert!(out.max_rss < 32 * MIB + FIXED_OVERHEAD, "peak RSS {} MiB", out.max_rss / MIB);
}

#[test]
fn with_mmap_interception_off_mappings_pass_through() {
    let server = server();
    let mut c = cmd(probe(), &["mmap"]);
    c.env("COALESCE_MMAP_MIN", "off");
    let out = run(c, Some((&server, 32 * MIB)), b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status, 0, "{stdout}\n{}", out.stderr);
    let stats = out.stats.unwrap();
    assert_eq!(stats.preload.mmaps_served, 0, "{stats}");
    // mprotect of its own mapping is the kernel's again; munmap of malloc's memory is still refused.
    assert!(stdout.contains("refused: 1"), "{stdout}");
    assert!(out.max_rss > 256 * MIB, "the mapping should be plain local memory: {} MiB", out.max_rss / MIB);
}

#[test]
fn a_full_lender_never_lets_the_heap_exceed_local_max_and_malloc_fails_with_enomem() {
    let mut config = lender::ServerConfig::embedded(16 * MIB);
    config.capacity = 16 * MIB;
    config.slab_size = MIB;
    let server = lender::start(config).unwrap();
    let mut c = cmd(probe(), &["until-enomem", "512"]);
    c.env("COALESCE_LOCAL_MAX", "64MiB");
    let out = run(c, Some((&server, 32 * MIB)), b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status, 0, "{stdout}\n{}", out.stderr);
    assert!(stdout.contains("refused: true"), "malloc never failed: {stdout}");
    assert!(out.stderr.contains("local memory is at its maximum"), "not reported: {}", out.stderr);
    let stats = out.stats.unwrap();
    eprintln!("{stdout}peak RSS {:.1} MiB\n{stats}", out.max_rss as f64 / MIB as f64);
    let p = &stats.pager;
    assert_eq!(p.local_max_pages, 64 * MIB / 4096);
    assert!(p.peak_resident_pages <= p.local_max_pages && p.local_max_refusals >= 1, "{stats}");
    assert!(out.max_rss < 64 * MIB + FIXED_OVERHEAD, "peak RSS {} past the maximum", out.max_rss);
}

#[test]
fn without_servers_the_program_runs_on_plain_local_memory() {
    let mut cmd = Command::new(probe());
    cmd.arg("threads").env("LD_PRELOAD", library()).env_remove("COALESCE_SERVERS").env("COALESCE_STATS", "stderr");
    let out = run(cmd, None, b"");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(!out.stderr.contains("pager statistics"), "no pager should run: {}", out.stderr);
}

#[test]
fn a_reply_spin_set_in_the_environment_is_taken_and_pages_still_come_back() {
    let server = server();
    for spin in ["0us", "0.5ms"] {
        let mut c = cmd(probe(), &["read-into"]);
        c.env("COALESCE_REPLY_SPIN", spin);
        let out = run(c, Some((&server, 32 * MIB)), b"");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status, 0, "COALESCE_REPLY_SPIN={spin}: {stdout}\n{}", out.stderr);
        assert!(stdout.contains("OK read-into"), "{stdout}");
        let stats = out.stats.as_ref().expect("statistics were written");
        assert!(stats.pager.remote_faults > 0, "the reads must have waited for replies: {stats}");
    }
}

#[test]
fn misconfiguration_prints_one_line_and_exits_125() {
    for (var, value, expect) in [
        ("COALESCE_LOCAL", "lots", "COALESCE_LOCAL"),
        ("COALESCE_SERVERS", "not-an-address", "COALESCE_SERVERS"),
        ("COALESCE_SERVERS", "127.0.0.1:1", "127.0.0.1:1"),
        ("COALESCE_PROVIDER", "carrier-pigeon", "COALESCE_PROVIDER"),
        ("COALESCE_FETCH_TIMEOUT", "1e30", "COALESCE_FETCH_TIMEOUT"),
        ("COALESCE_FETCH_TIMEOUT", "1e19s", "fetch timeout"),
        ("COALESCE_REPLY_SPIN", "soon", "COALESCE_REPLY_SPIN"),
        ("COALESCE_REPLY_SPIN", "2s", "reply spin 2s is above the maximum of 1 s"),
        ("COALESCE_LOCAL_MAX", "lots", "COALESCE_LOCAL_MAX"),
        ("COALESCE_LOCAL_MAX", "1MiB", "below the local budget"),
        ("COALESCE_REPAIR_RATE", "fast", "COALESCE_REPAIR_RATE"),
        ("COALESCE_REPAIR_RATE", "100GiB", "repair rate"),
        ("COALESCE_MMAP_MIN", "big", "COALESCE_MMAP_MIN"),
        ("COALESCE_MMAP_MIN", "100", "below a page"),
        ("COALESCE_FORK_MAX", "lots", "COALESCE_FORK_MAX"),
        ("COALESCE_PREFETCH", "maybe", "COALESCE_PREFETCH=\"maybe\" is neither 1 nor 0"),
        ("COALESCE_HEDGE", "2", "COALESCE_HEDGE"),
        ("COALESCE_DEMAND_FIRST", "yes please", "COALESCE_DEMAND_FIRST"),
        ("COALESCE_TRUSTED_LENDERS", "perhaps", "COALESCE_TRUSTED_LENDERS"),
        ("COALESCE_FAULT_THREADS", "0", "from 1 to 64"),
        ("COALESCE_HISTORY", "-1", "COALESCE_HISTORY"),
        ("COALESCE_SLO", "p99", "COALESCE_SLO"),
        ("COALESCE_REDUNDANCY", "triple", "COALESCE_REDUNDANCY"),
        ("COALESCE_BACKUP", "nowhere", "10.0.0.9:7470"),
        ("COALESCE_BACKUP_LAG", "later", "COALESCE_BACKUP_LAG"),
        ("COALESCE_DISCOVER_WAIT", "a while", "COALESCE_DISCOVER_WAIT"),
    ] {
        let mut cmd = Command::new(probe());
        cmd.arg("hello").env("LD_PRELOAD", library()).env("COALESCE_SERVERS", "127.0.0.1:7").env(var, value);
        let out = run(cmd, None, b"");
        assert_eq!(out.status, 125, "{var}={value}: {}", out.stderr);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{var}={value}: expected one line, got {lines:?}");
        assert!(lines[0].contains(expect), "{var}={value}: {}", lines[0]);
        assert!(out.stdout.is_empty(), "the program must not have run");
    }
}

/// True if `path` exists; otherwise says the test is skipped, or fails when
/// `COALESCE_REQUIRE_PROGRAMS` is set (as .ci/run sets it, after installing the packages).
fn program_available(path: &str) -> bool {
    if std::path::Path::new(path).is_file() {
        return true;
    }
    assert!(std::env::var_os("COALESCE_REQUIRE_PROGRAMS").is_none(), "{path} is required but missing");
    eprintln!("skipped: {path} is not installed (apt-get install sqlite3 python3)");
    false
}

/// Runs a real program plainly and under the preload; checks the output is identical and the
/// preloaded peak RSS stays under budget + overhead; prints the figures.
fn real_program(name: &str, build: impl Fn() -> Command, stdin: &[u8], budget: u64) -> ExitReport {
    let plain = run(build(), None, stdin);
    assert_eq!(plain.status, 0, "plain {name} failed: {}", plain.stderr);
    let server = server();
    let pre = run(build(), Some((&server, budget)), stdin);
    assert_eq!(pre.status, 0, "{name} under the preload failed: {}", pre.stderr);
    assert!(pre.stdout == plain.stdout, "{name}: output differs under the preload");
    let stats = pre.stats.unwrap();
    let remote_faults = stats.pager.remote_faults;
    eprintln!(
        "{name}: plain {:.2} s, peak RSS {:.1} MiB | preloaded with {} MiB budget {:.2} s, peak RSS {:.1} MiB, faults: {} zero, {} remote, {} first-write",
        plain.elapsed.as_secs_f64(),
        plain.max_rss as f64 / MIB as f64,
        budget / MIB,
        pre.elapsed.as_secs_f64(),
        pre.max_rss as f64 / MIB as f64,
        stats.pager.zero_faults,
        remote_faults,
        stats.pager.write_faults,
    );
    assert!(plain.max_rss > budget + FIXED_OVERHEAD, "{name} is too small to test paging ({} bytes)", plain.max_rss);
    assert!(
        pre.max_rss <= budget + FIXED_OVERHEAD,
        "{name}: peak RSS {} MiB exceeds budget {} MiB + overhead {} MiB",
        pre.max_rss / MIB,
        budget / MIB,
        FIXED_OVERHEAD / MIB
    );
    assert!(remote_faults > 0, "{name}: nothing was paged in from the server:\n{stats}");
    stats
}

#[test]
fn python3_builds_and_checksums_objects() {
    if !program_available("/usr/bin/python3") {
        return;
    }
    let script = "import hashlib\n\
        objs = [bytes([i % 251]) * 4000 + str(i).encode() for i in range(75000)]\n\
        d = {i: objs[i][:64] for i in range(0, 75000, 3)}\n\
        h = hashlib.sha256()\n\
        for o in objs: h.update(o)\n\
        print(len(objs), len(d), h.hexdigest())\n";
    real_program(
        "python3",
        || {
            let mut c = Command::new("/usr/bin/python3");
            c.args(["-c", script]);
            c
        },
        b"",
        64 * MIB,
    );
}

#[test]
fn python3_with_its_own_allocator_keeps_a_large_dict_within_the_budget() {
    if !program_available("/usr/bin/python3") {
        return;
    }
    // Small objects: CPython's allocator takes them from 1 MiB arenas it maps with mmap, not from
    // malloc (PYTHONMALLOC unset). About 190 MiB of them at a 32 MiB budget.
    let script = "import hashlib\n\
        d = {i: str(i) * 3 for i in range(1_500_000)}\n\
        h = hashlib.sha256()\n\
        for k in range(0, 1_500_000, 7): h.update(d[k].encode())\n\
        print(len(d), h.hexdigest())\n";
    let stats = real_program(
        "python3 (pymalloc)",
        || {
            let mut c = Command::new("/usr/bin/python3");
            c.args(["-c", script]).env_remove("PYTHONMALLOC");
            c
        },
        b"",
        32 * MIB,
    );
    assert!(stats.preload.mmaps_served >= 100, "pymalloc's arenas were not served from the paged heap:\n{stats}");
}

#[test]
fn sqlite3_in_memory_million_rows_with_index_and_aggregates() {
    if !program_available("/usr/bin/sqlite3") {
        return;
    }
    let sql = "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);\n\
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000)\n\
        INSERT INTO t SELECT x, (x * 7919) % 100003, printf('%.60c', char(65 + x % 26)) FROM c;\n\
        CREATE INDEX tk ON t(k);\n\
        SELECT count(*), sum(k), count(DISTINCT k), max(length(v)) FROM t;\n\
        SELECT k, count(*) FROM t WHERE k BETWEEN 100 AND 105 GROUP BY k;\n";
    real_program(
        "sqlite3",
        || {
            let mut c = Command::new("/usr/bin/sqlite3");
            c.arg(":memory:");
            c
        },
        sql.as_bytes(),
        32 * MIB,
    );
}

#[test]
fn sort_of_a_few_hundred_mib_with_a_large_buffer() {
    if !program_available("/usr/bin/sort") {
        return;
    }
    let path = std::env::temp_dir().join(format!("coalesce-sort-input-{}", std::process::id()));
    {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        // 200 MB: a million lines of 199 random characters (sort holds about 260 MiB).
        for _ in 0..1_000_000 {
            let line: String = (0..199).map(|_| rng.alphanumeric()).collect();
            writeln!(f, "{line}").unwrap();
        }
    }
    let p = path.clone();
    real_program(
        "sort",
        move || {
            let mut c = Command::new("/usr/bin/sort");
            c.args(["-S", "400M", "--parallel=2"]).arg(&p).env("LC_ALL", "C");
            c
        },
        b"",
        128 * MIB,
    );
    let _ = std::fs::remove_file(&path);
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends one command to a Redis server and returns its reply (a status, an integer, an error or
/// the contents of a bulk string) as text.
fn redis(port: u16, command: &str) -> String {
    use std::io::{BufRead, Read};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    (&stream).write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let line = line.trim_end().to_owned();
    match line.strip_prefix('$').map(str::parse::<usize>) {
        Some(Ok(len)) => {
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).unwrap();
            String::from_utf8_lossy(&body[..len]).into_owned()
        }
        _ => line,
    }
}

/// Waits until the Redis server on `port` answers PING.
fn wait_for_redis(port: u16, server: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && redis(port, "PING") == "+PONG";
        if up {
            return;
        }
        assert!(server.try_wait().unwrap().is_none(), "redis-server exited at start");
        assert!(Instant::now() < deadline, "redis-server did not answer within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn redis_server(port: u16, dir: &std::path::Path) -> Command {
    let mut c = Command::new("/usr/bin/redis-server");
    c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--enable-debug-command", "local", "--daemonize", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn resident_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn redis_loaded_past_its_budget_stays_within_it_and_saves_a_correct_dump_with_fork() {
    if !program_available("/usr/bin/redis-server") {
        return;
    }
    let budget = 64 * MIB;
    let dir = std::env::temp_dir().join(format!("coalesce-redis-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let stats_file = dir.join("stats.json");
    let lender = server();
    let port = free_port();
    let mut c = redis_server(port, &dir);
    c.env("LD_PRELOAD", library())
        .env("COALESCE_SERVERS", lender.addr().to_string())
        .env("COALESCE_LOCAL", budget.to_string())
        .env("COALESCE_STATS", &stats_file);
    let mut preloaded = c.spawn().unwrap();
    wait_for_redis(port, &mut preloaded);
    // About 230 MiB of keys and values, several times the budget.
    assert_eq!(redis(port, "DEBUG POPULATE 200000 key 1000"), "+OK");
    let info = redis(port, "INFO memory");
    let used: u64 = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap().trim().parse().unwrap();
    let peak = resident_bytes(preloaded.id(), "VmHWM:");
    eprintln!("redis: {} MiB used, peak RSS {} MiB before the save", used / MIB, peak / MIB);
    assert!(used > budget + FIXED_OVERHEAD, "too little data to page: {used} bytes");
    assert!(peak <= budget + FIXED_OVERHEAD, "peak RSS {} MiB past the budget and overhead", peak / MIB);
    let digest = redis(port, "DEBUG DIGEST");
    // A fork-based save: the child writes the dump while the parent keeps serving.
    assert!(redis(port, "BGSAVE").contains("Background saving started"));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let p = redis(port, "INFO persistence");
        if p.contains("rdb_bgsave_in_progress:0") {
            assert!(p.contains("rdb_last_bgsave_status:ok"), "the save failed: {p}");
            break;
        }
        assert!(Instant::now() < deadline, "the save did not end within 300 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = redis(port, "SHUTDOWN NOSAVE");
    let status = preloaded.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut preloaded.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success() || status.code().is_none(), "redis-server under the preload: {status}: {stderr}");
    let report: ExitReport = serde_json::from_str(&std::fs::read_to_string(&stats_file).unwrap()).unwrap();
    eprintln!("{report}");
    assert!(report.pager.remote_faults > 0, "nothing was paged:\n{report}");

    // The dump, loaded by a plain server, holds exactly what the preloaded one held.
    let port = free_port();
    let mut plain = redis_server(port, &dir).spawn().unwrap();
    wait_for_redis(port, &mut plain);
    let loaded = redis(port, "DEBUG DIGEST");
    assert_eq!(redis(port, "DBSIZE"), ":200000");
    let _ = redis(port, "SHUTDOWN NOSAVE");
    plain.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(loaded, digest, "the dump differs from the data");
}
