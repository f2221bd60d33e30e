//! An exhaustive model check of the page state machine: one page, one application thread that
//! writes and reads it, two fault-handling threads and the evictor, every interleaving of their
//! atomic steps (page-table compare-and-swaps and userfaultfd ioctls) explored by depth-first
//! search. The steps mirror `fault/` and `evict.rs` and change the entry with the same
//! [`Entry`] transitions; the checked property is the pager's
//! promise: every read returns the last value written, or the access gets SIGBUS. A stale fault
//! event (the application re-faulting after a wake) is part of the model.
//!
//! The model is also run with the bug class of issue #7 injected (the evictor drops a dirty page
//! as if clean): with the `WRITTEN` invariant no read may return zeros where data was written
//! (SIGBUS instead), and without it the search must find the silent zero, which shows the checker
//! can fail. (A dropped page whose lender holds an older copy reads back stale: only per-page
//! versions, planned with sealed pages, can catch that.)

use std::collections::HashSet;

use crate::entry::{Entry, PageState};
use crate::store::Slot;

/// What the application thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum App {
    /// Ready to run op `usize` of the script.
    Ready(usize),
    /// Blocked in a fault while doing op `usize`.
    Blocked(usize),
    /// Finished the script.
    Done,
    /// Killed by SIGBUS.
    Sigbus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Event {
    Missing { write: bool },
    WriteProtect,
}

/// A fault handler's progress through one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Handler {
    Idle,
    /// Holds the lock to serve a missing fault; `entry` as locked; the fetched copy if any.
    Missing {
        write: bool,
        fetched: Option<u8>,
    },
    /// Holds the lock to serve a write-protect fault.
    WriteProtect,
}

/// The evictor's progress through one eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Evictor {
    Idle,
    Locked,
    /// Moved out; the staged content.
    Moved(u8),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    // The page-table entry (the pager's own type and transitions) and its lock.
    entry: Entry,
    busy: bool,
    // The kernel's view of the page.
    mapped: bool,
    writable: bool,
    poison_marker: bool,
    content: u8,
    // The lender.
    remote: u8,
    // The truth: the last value the application wrote (0: never written).
    truth: u8,
    app: App,
    events: Vec<Event>,
    handlers: [Handler; 2],
    evictor: Evictor,
    evictions_left: u8,
    /// Wake-ups without an install left (a signal, or a wake for a neighbouring page): the thread
    /// retries and faults again, leaving a stale event behind.
    spurious_left: u8,
    violations: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

const SCRIPT: [Op; 5] = [Op::Read, Op::Write, Op::Read, Op::Write, Op::Read];

#[derive(Debug, Clone, Copy)]
struct Options {
    /// Inject the bug: the evictor treats a dirty page as clean.
    drop_dirty: bool,
    /// Check the `WRITTEN` invariant before filling zeros.
    invariant: bool,
}

#[derive(Debug, Default)]
struct Outcome {
    states: usize,
    wrong_reads: usize,
    zero_reads: usize,
    sigbus_ends: usize,
    clean_ends: usize,
}

impl State {
    fn new(evictions: u8) -> Self {
        Self {
            entry: Entry::ZERO,
            busy: false,
            mapped: false,
            writable: false,
            poison_marker: false,
            content: 0,
            remote: 0,
            truth: 0,
            app: App::Ready(0),
            events: Vec::new(),
            handlers: [Handler::Idle; 2],
            evictor: Evictor::Idle,
            evictions_left: evictions,
            spurious_left: 2,
            violations: 0,
        }
    }

    /// Any wake-up of the faulting thread (install, wake, unprotect, poison) makes it retry.
    fn wake(&mut self) {
        if let App::Blocked(i) = self.app {
            self.app = App::Ready(i);
        }
    }

    /// `UFFDIO_COPY`: installs unless something is mapped (EEXIST, which the caller wakes for).
    fn copy(&mut self, content: u8, writable: bool) -> bool {
        let installed = !self.mapped && !self.poison_marker;
        if installed {
            self.mapped = true;
            self.writable = writable;
            self.content = content;
        }
        self.wake();
        installed
    }

    /// The pager's poison path: poisons the entry and the page (SIGBUS on access).
    fn poison_page(&mut self) {
        self.entry = self.entry.poisoned();
        if !self.mapped {
            self.poison_marker = true;
        }
        self.wake();
    }
}

/// What a read step returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadResult {
    Other,
    Right,
    /// Zeros where data was written.
    Zero,
    /// Another wrong value (a stale copy).
    Wrong,
}

/// Every successor of `s` (one atomic step of one thread), with what a read step returned.
fn successors(s: &State, o: Options) -> Vec<(State, ReadResult)> {
    let mut out = Vec::new();
    // The application.
    if let App::Ready(i) = s.app {
        let mut n = s.clone();
        let mut read = ReadResult::Other;
        if i == SCRIPT.len() {
            n.app = App::Done;
        } else if n.poison_marker {
            n.app = App::Sigbus;
        } else if !n.mapped {
            n.events.push(Event::Missing { write: SCRIPT[i] == Op::Write });
            n.app = App::Blocked(i);
        } else if SCRIPT[i] == Op::Read {
            read = match (n.content, n.truth) {
                (c, t) if c == t => ReadResult::Right,
                (0, _) => ReadResult::Zero,
                _ => ReadResult::Wrong,
            };
            n.app = App::Ready(i + 1);
        } else if n.writable {
            n.truth += 1;
            n.content = n.truth;
            n.app = App::Ready(i + 1);
        } else {
            n.events.push(Event::WriteProtect);
            n.app = App::Blocked(i);
        }
        out.push((n, read));
    }
    if let App::Blocked(i) = s.app {
        if s.spurious_left > 0 {
            let mut n = s.clone();
            n.spurious_left -= 1;
            n.app = App::Ready(i);
            out.push((n, ReadResult::Other));
        }
    }
    // The fault handlers.
    for h in 0..2 {
        match s.handlers[h] {
            Handler::Idle => {
                // Take the oldest event (it may be stale) and lock the page for it, as
                // `missing_fault` and `write_fault` do after `wait_idle`.
                let Some(&ev) = s.events.first() else { continue };
                if s.busy {
                    continue; // wait_idle
                }
                let mut n = s.clone();
                n.events.remove(0);
                match ev {
                    Event::Missing { write } => match n.entry.state() {
                        PageState::Poisoned => n.poison_page(),
                        PageState::Resident => {
                            // fault_on_resident: mincore tells mapped (a stale event) from lost.
                            if !n.mapped {
                                n.violations += 1;
                                n.poison_page();
                            }
                            n.wake();
                        }
                        PageState::Remote => {
                            n.busy = true;
                            n.handlers[h] = Handler::Missing { write, fetched: Some(n.remote) };
                        }
                        PageState::Lost if o.invariant => {
                            n.violations += 1;
                            n.poison_page();
                        }
                        PageState::Lost | PageState::Absent => {
                            n.busy = true;
                            n.handlers[h] = Handler::Missing { write, fetched: None };
                        }
                    },
                    Event::WriteProtect => {
                        if n.entry.is_resident() {
                            n.busy = true;
                            n.handlers[h] = Handler::WriteProtect;
                        } else {
                            n.wake();
                        }
                    }
                }
                out.push((n, ReadResult::Other));
            }
            Handler::Missing { write, fetched } => {
                // Install (zero page or fetched copy), then unlock: one step each in the code,
                // merged here because nothing else may touch a locked entry in between.
                let mut n = s.clone();
                if n.copy(fetched.unwrap_or(0), write) {
                    n.entry = n.entry.installed(write);
                }
                n.busy = false;
                n.handlers[h] = Handler::Idle;
                out.push((n, ReadResult::Other));
            }
            Handler::WriteProtect => {
                let mut n = s.clone();
                if n.mapped {
                    n.writable = true;
                }
                n.wake();
                n.entry = n.entry.written_to();
                n.busy = false;
                n.handlers[h] = Handler::Idle;
                out.push((n, ReadResult::Other));
            }
        }
    }
    // The evictor.
    match s.evictor {
        Evictor::Idle if s.evictions_left > 0 && s.entry.is_resident() && !s.busy => {
            let mut n = s.clone();
            n.busy = true;
            n.evictions_left -= 1;
            n.evictor = Evictor::Locked;
            out.push((n, ReadResult::Other));
        }
        Evictor::Idle => {}
        Evictor::Locked => {
            // UFFDIO_MOVE: atomic with respect to the application's accesses.
            let mut n = s.clone();
            if n.mapped {
                n.evictor = Evictor::Moved(n.content);
                n.mapped = false;
                n.writable = false;
            } else {
                // ENOENT with no discard pending: the data is lost; poisoned, never zero.
                n.violations += 1;
                n.entry = n.entry.poisoned();
                n.busy = false;
                n.evictor = Evictor::Idle;
            }
            out.push((n, ReadResult::Other));
        }
        Evictor::Moved(staged) => {
            // Write back if dirty (the write completes before the unlock), then publish.
            let mut n = s.clone();
            let entry = if o.drop_dirty { n.entry.dirty_forgotten() } else { n.entry };
            n.entry = if entry.is_dirty() {
                n.remote = staged;
                entry.evicted(Some(Slot::from_raw(0)))
            } else {
                entry.evicted(None)
            };
            n.busy = false;
            n.evictor = Evictor::Idle;
            out.push((n, ReadResult::Other));
        }
    }
    out
}

fn explore(o: Options, evictions: u8) -> Outcome {
    let mut seen = HashSet::new();
    let mut stack = vec![State::new(evictions)];
    let mut outcome = Outcome::default();
    while let Some(s) = stack.pop() {
        if !seen.insert(s.clone()) {
            continue;
        }
        let next = successors(&s, o);
        if next.is_empty() {
            match s.app {
                App::Sigbus => outcome.sigbus_ends += 1,
                App::Done => outcome.clean_ends += 1,
                // A thread blocked with no event left and nobody to wake it would be a hang.
                other => panic!("stuck in {other:?}: {s:?}"),
            }
        }
        for (n, read) in next {
            match read {
                ReadResult::Zero => outcome.zero_reads += 1,
                ReadResult::Wrong => outcome.wrong_reads += 1,
                ReadResult::Other | ReadResult::Right => {}
            }
            stack.push(n);
        }
    }
    outcome.states = seen.len();
    outcome
}

#[test]
fn every_interleaving_reads_back_what_was_written() {
    let o = explore(Options { drop_dirty: false, invariant: true }, 4);
    assert!(o.states > 5_000, "the search must cover many interleavings: {o:?}");
    assert_eq!(o.wrong_reads + o.zero_reads, 0, "{o:?}");
    assert_eq!(o.sigbus_ends, 0, "a correct pager never poisons a healthy page: {o:?}");
    assert!(o.clean_ends > 0);
}

#[test]
fn a_dirty_page_dropped_as_clean_ends_in_sigbus_never_in_a_wrong_read() {
    let o = explore(Options { drop_dirty: true, invariant: true }, 3);
    assert_eq!(o.zero_reads, 0, "{o:?}");
    assert!(o.sigbus_ends > 0, "the injected bug must be caught: {o:?}");
}

#[test]
fn without_the_written_invariant_the_search_finds_the_silent_zero() {
    let o = explore(Options { drop_dirty: true, invariant: false }, 3);
    assert!(o.zero_reads > 0, "the checker must be able to fail: {o:?}");
}
