//! `coalesce run` as a user drives it: signals sent to the runner reach the program, and every
//! process of a pipeline reports its own statistics. Needs `cargo build --release --workspace`
//! first (for libcoalesce.so), as the README says.

#![allow(missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn coalesce() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coalesce"))
}

#[test]
fn sigterm_to_the_runner_stops_the_program_and_the_status_says_so() {
    let mut runner = coalesce()
        .args(["run", "--embedded-server", "--local", "16MiB", "--quiet", "--", "sh", "-c", "echo $$; exec sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(runner.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let program: libc::pid_t = line.trim().parse().unwrap();
    let start = Instant::now();
    // SAFETY: kill(2) on our own child has no memory-safety preconditions.
    unsafe { libc::kill(libc::pid_t::try_from(runner.id()).unwrap(), libc::SIGTERM) };
    let status = runner.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "the runner forwards the program's end: {status:?}");
    assert!(start.elapsed() < Duration::from_secs(10), "the program was not stopped");
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(program, 0) } == 0;
    assert!(!alive, "the program (pid {program}) outlived the runner");
}

#[test]
fn every_process_of_a_pipeline_reports_its_own_statistics() {
    let out = coalesce()
        .args([
            "run",
            "--embedded-server",
            "--local",
            "16MiB",
            "--",
            "sh",
            "-c",
            "head -c 60000000 /dev/zero | sort | wc -c",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // sort ends its one line with a newline.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "60000001");
    assert!(stderr.contains("other processes under the preload (each has a budget of its own):"), "{stderr}");
    assert!(stderr.contains("total of "), "no total: {stderr}");
    let sort = stderr
        .lines()
        .find(|l| l.contains("(sort, parent "))
        .unwrap_or_else(|| panic!("no report from sort: {stderr}"));
    let faults: u64 = sort.split(", ").find_map(|f| f.strip_suffix(" remote faults")?.parse().ok()).unwrap();
    assert!(faults > 0, "sort, the process that used the memory, paged nothing: {sort}");
    // Each line names the process's parent: the pipeline's three are the shell's children.
    let parent_of = |name: &str| {
        let line =
            stderr.lines().find(|l| l.contains(&format!("({name}, parent "))).unwrap_or_else(|| panic!("no {name}"));
        line.split("parent ").nth(1).and_then(|r| r.split(')').next()).unwrap().to_owned()
    };
    assert_eq!(parent_of("head"), parent_of("sort"), "{stderr}");
    assert_eq!(parent_of("wc"), parent_of("sort"), "{stderr}");
}

#[test]
fn fault_threads_are_chosen_per_run_and_absurd_counts_are_refused() {
    let out = coalesce()
        .args(["run", "--embedded-server", "--fault-threads", "2", "--local", "16MiB", "--"])
        .args(common::SORT_PIPELINE)
        .output()
        .unwrap();
    assert!(common::sort_pipeline_faults(&out) > 0, "sort paged nothing with two fault threads");
    for absurd in ["0", "65", "lots"] {
        let out = coalesce().args(["run", "--fault-threads", absurd, "--", "true"]).output().unwrap();
        assert!(!out.status.success(), "--fault-threads {absurd} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--fault-threads"), "{out:?}");
    }
}
