//! A program that exercises the hazards of an LD_PRELOAD heap: threads allocating and freeing
//! across threads, read(2) into a paged-out buffer, allocator purges, fork without exec, fork+exec
//! and posix_spawn, allocating until `malloc` fails, and raw anonymous mappings (`mmap`, partial
//! `munmap`, `mremap`, `madvise`, `MAP_FIXED`, `mprotect`). Run it under `libcoalesce.so`; each mode prints `OK <mode>` or exits non-zero.
//! It uses only the C allocator (Rust's default global allocator is malloc), so every allocation
//! goes through the preloaded library.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod mappings;

use std::io::{Read, Write};
use std::sync::mpsc;

const MIB: usize = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = seed | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn fail(msg: &str) -> ! {
    eprintln!("FAIL {msg}");
    std::process::exit(1)
}

/// Allocates `mib` MiB of garbage that the program keeps, to push older data out of local memory.
fn pressure(mib: usize) -> Vec<Vec<u8>> {
    (0..mib).map(|i| vec![(i % 250) as u8 + 1; MIB]).collect()
}

fn threads() {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let freers: Vec<_> = (0..4)
        .map(|_| {
            let rx = std::sync::Arc::clone(&rx);
            std::thread::spawn(move || {
                let mut freed = 0usize;
                loop {
                    let msg = rx.lock().unwrap().recv();
                    let Ok(buf) = msg else { break };
                    let seed = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    if buf[8..] != pattern(seed, buf.len())[8..] {
                        fail("a block handed to another thread changed");
                    }
                    freed += buf.len();
                }
                freed
            })
        })
        .collect();
    let producers: Vec<_> = (0..12u64)
        .map(|t| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                for i in 0..3000u64 {
                    let len = 64 + ((t * 7919 + i * 104_729) % 60_000) as usize;
                    let seed = t << 32 | i;
                    let mut buf = pattern(seed, len);
                    buf[..8].copy_from_slice(&seed.to_le_bytes());
                    if i % 3 == 0 {
                        kept.push((seed, buf));
                    } else {
                        tx.send(buf).unwrap();
                    }
                }
                for (seed, buf) in kept {
                    if buf[8..] != pattern(seed, buf.len())[8..] {
                        fail("a kept block changed");
                    }
                }
            })
        })
        .collect();
    drop(tx);
    for p in producers {
        p.join().unwrap();
    }
    let freed: usize = freers.into_iter().map(|f| f.join().unwrap()).sum();
    println!("OK threads ({} MiB freed across threads)", freed / MIB);
}

fn read_into() {
    let path = std::env::temp_dir().join(format!("coalesce-probe-{}", std::process::id()));
    let content = pattern(42, 48 * MIB);
    std::fs::write(&path, &content).unwrap();
    let mut buf = vec![0u8; 48 * MIB]; // written (zeros), then pushed out of local memory
    let _keep = pressure(160);
    let mut f = std::fs::File::open(&path).unwrap();
    // read(2) writes straight into pages that live on a memory server right now.
    let mut done = 0;
    while done < buf.len() {
        let n = f.read(&mut buf[done..]).unwrap();
        if n == 0 {
            fail("short file");
        }
        done += n;
    }
    let _ = std::fs::remove_file(&path);
    if buf != content {
        fail("read(2) into the heap lost data");
    }
    println!("OK read-into");
}

fn purge() {
    for round in 0..3u8 {
        let blocks: Vec<Vec<u8>> = (0..96u8).map(|i| vec![i.wrapping_add(round) | 1; MIB]).collect();
        drop(blocks);
        // mimalloc purges freed memory after a delay (madvise): let it happen.
        std::thread::sleep(std::time::Duration::from_millis(400));
    }
    // Memory reused after a purge reads as what calloc promises.
    let z = vec![0u8; 64 * MIB];
    if z.iter().any(|&b| b != 0) {
        fail("calloc'd memory after a purge is not zero");
    }
    println!("OK purge");
}

fn fork_no_exec() {
    let original = pattern(7, 96 * MIB);
    let mut data = original.clone();
    let _keep = pressure(64);
    let (mut r, mut w) = {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) with a valid two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh descriptors owned here.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
    };
    // SAFETY: fork(2); the child only reads its copy, writes to a pipe and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail("fork failed");
    }
    if pid == 0 {
        drop(w);
        let mut go = [0u8; 1];
        let _ = r.read(&mut go); // wait until the parent has rewritten its copy
        let ok = data == original;
        // SAFETY: _exit in the child.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    drop(r);
    // The parent rewrites everything; its pages are written back to the servers meanwhile.
    for b in data.iter_mut() {
        *b ^= 0xff;
    }
    let _more = pressure(64);
    w.write_all(b"g").unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        fail(&format!("the forked child saw a different heap (status {status})"));
    }
    if data.iter().zip(&original).any(|(a, b)| *a != b ^ 0xff) {
        fail("the parent's heap changed");
    }
    println!("OK fork");
}

fn fork_exec() {
    let _keep = pressure(64);
    // SAFETY: fork(2) then execv of /bin/true in the child.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        // SAFETY: valid NUL-terminated argv.
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        // SAFETY: exec failed.
        unsafe { libc::_exit(127) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        fail("fork+exec of /bin/true failed");
    }
    println!("OK fork-exec");
}

fn spawn() {
    let _keep = pressure(64);
    // std uses posix_spawn where it can.
    let out = std::process::Command::new("/bin/echo").arg("spawned").output().unwrap();
    if out.stdout != b"spawned\n" {
        fail("posix_spawn'd child misbehaved");
    }
    println!("OK spawn");
}

/// Allocates 1 MiB blocks (up to `limit_mib`) and writes each, until `malloc` fails with
/// `ENOMEM`; then checks every block. Prints how far it got. Everything it needs after a refusal
/// is allocated first.
fn until_enomem(limit_mib: usize) {
    let mut blocks: Vec<*mut u8> = Vec::with_capacity(limit_mib);
    let mut scratch = vec![0u8; MIB];
    let mut stdout = std::io::stdout().lock();
    let mut refused = false;
    for i in 0..limit_mib {
        // SAFETY: a plain allocation; the block is used only while live, below.
        let p = unsafe { libc::malloc(MIB) }.cast::<u8>();
        if p.is_null() {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOMEM) {
                fail("malloc failed without ENOMEM");
            }
            refused = true;
            break;
        }
        fill_pattern(i as u64, &mut scratch);
        // SAFETY: `p` holds MIB writable bytes.
        unsafe { p.copy_from_nonoverlapping(scratch.as_ptr(), MIB) };
        blocks.push(p);
    }
    for (i, &p) in blocks.iter().enumerate() {
        fill_pattern(i as u64, &mut scratch);
        // SAFETY: `p` is a live block of MIB bytes written above.
        if unsafe { std::slice::from_raw_parts(p, MIB) } != scratch.as_slice() {
            fail(&format!("block {i} came back changed"));
        }
        // SAFETY: a live block from malloc, freed once.
        unsafe { libc::free(p.cast()) };
    }
    writeln!(stdout, "OK until-enomem {} MiB, refused: {refused}", blocks.len()).unwrap();
}

/// `pattern(seed, buf.len())` written into `buf`, without allocating.
fn fill_pattern(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "threads" => threads(),
        "read-into" => read_into(),
        "purge" => purge(),
        "fork" => fork_no_exec(),
        "fork-exec" => fork_exec(),
        "spawn" => spawn(),
        "hello" => println!("OK hello"),
        "mmap" => mappings::run(),
        "until-enomem" => until_enomem(std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(1024)),
        other => fail(&format!("unknown mode {other:?}")),
    }
}
