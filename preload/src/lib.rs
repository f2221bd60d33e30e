//! # libcoalesce.so: unmodified programs borrow memory
//!
//! An `LD_PRELOAD` allocator. Its heap lives in a Coalesce pager region, so the program's heap
//! pages are subject to the local budget and page out to memory servers. The allocator is mimalloc
//! (through `libmimalloc-sys`), run over the region as an arena; this library only routes calls
//! and sets things up.
//!
//! ```sh
//! COALESCE_SERVERS=127.0.0.1:7470 COALESCE_LOCAL=256MiB LD_PRELOAD=target/release/libcoalesce.so python3 big.py
//! ```
//! (`coalesce run` sets all of this up for you.)
//!
//! ## Configuration (environment)
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `COALESCE_SERVERS` | unset | memory servers, `HOST:PORT[,HOST:PORT...]`. Unset or empty, and no `COALESCE_DISCOVER` or `COALESCE_REGISTRY`: no pager at all; the program runs on plain local memory with mimalloc as its allocator |
//! | `COALESCE_DISCOVER` | `0` | `1`: also use the lenders announced on the local network (mDNS, `memory-server --announce`), those seen within `COALESCE_DISCOVER_WAIT` at start and any announced later |
//! | `COALESCE_REGISTRY` | unset | `etcd://HOST:PORT[/PREFIX]`: also use the lenders registered there (`memory-server --registry`), watched while the program runs |
//! | `COALESCE_DISCOVER_WAIT` | `2s` | with either: how long the start waits for the first lenders (before `main`; up to 10 minutes); no lender at all then is a misconfiguration |
//! | `COALESCE_LOCAL` | `256MiB` | local memory budget of the heap |
//! | `COALESCE_LOCAL_MAX` | twice `COALESCE_LOCAL` | when no lender can take a page (all full or down), the heap stays local past its budget up to this size (or `unlimited`); there, `malloc` fails with `ENOMEM` and an access that needs another local page waits up to the fetch timeout, then gets SIGBUS |
//! | `COALESCE_HEAP_SIZE` | `16GiB` | heap size limit (address space reserved; allocations beyond it fail with `ENOMEM`). Costs 12 bytes of pager metadata per 4 KiB page of it |
//! | `COALESCE_PROVIDER` | `shim` | data path: `shim` or `verbs` (the library must be built with `--features coalesce-rdma/verbs`) |
//! | `COALESCE_DEVICE` | first | RDMA device of the verbs provider, e.g. `rxe0` |
//! | `COALESCE_FETCH_TIMEOUT` | `5s` | a page not fetched in this time raises SIGBUS in the access |
//! | `COALESCE_REPLY_SPIN` | `200us` | how long a thread waiting for a lender's reply busy-polls before it sleeps (at most `1s`; `0us`: sleep at once, the least CPU; longer: fewer slow wake-ups on virtual machines) |
//! | `COALESCE_PREFETCH` | `1` | `0` turns prefetch off |
//! | `COALESCE_PREFETCH_AHEAD` | `1` | `0`: a stream's faults fetch their window only, not also the next one ahead (on a thread of its own) |
//! | `COALESCE_DEMAND_FIRST` | `1` | `0`: a stream's faults fetch their window with the faulting page even while other regions take demand faults, which then wait behind it (`PagerConfig::demand_first`) |
//! | `COALESCE_FAULT_THREADS` | 2 with 4 or more CPUs, else 1 | fault-handling threads (1 to 64); they also take the allocator's discards (remove events) |
//! | `COALESCE_REDUNDANCY` | `replicate:2` with two or more servers, else `none` | copies of each page on distinct lenders: `none` or `replicate:N` (N from 2 to 4) |
//! | `COALESCE_SLO` | unset | a service-level objective on remote-fault service time, e.g. `p99=500us`: when a second's faults miss it, the heap's local share grows (up to `COALESCE_LOCAL_MAX`), and shrinks back once comfortably met; replicated reads are hedged soon enough to meet it |
//! | `COALESCE_HEDGE` | `1` | with copies (`replicate:N`): `0` turns hedged reads off (a read not answered within its lender's recent 95th percentile is posted again to the next copy; the first answer wins) |
//! | `COALESCE_REPAIR_RATE` | `256MiB` | bytes per second copied in the background to rebuild copies lost with a lender (or on a leaving one); `0`: off |
//! | `COALESCE_KEY_FILE` | unset | the cluster key file (`coalesce keygen`), for lenders that require one |
//! | `COALESCE_TRUSTED_LENDERS` | `0` | `1`: pages travel and rest in plaintext (faster; a lender can read and change them). By default every page is sealed (AES-256-GCM, a key that never leaves the process) |
//! | `COALESCE_MMAP_MIN` | `64KiB` | private anonymous read-write `mmap`s at least this large are served from the paged heap (so allocators that take memory with `mmap`, like CPython's and jemalloc, stay within the budget); `off`: none (see "Anonymous mappings" below) |
//! | `COALESCE_FORK_MAX` | `available` | how much of the heap a `fork` (without `exec`) may bring back from the lenders, since the child needs it all locally: a size, `available` (the memory the kernel reports available at the time), or `unlimited`. A fork that would need more fails with `ENOMEM` and one log line |
//! | `COALESCE_HISTORY` | 0 | page-table transitions kept for a page-state violation's log (40 bytes each) |
//! | `COALESCE_LOG` | `warn` | log filter (`tracing` syntax), written to stderr |
//! | `COALESCE_STATS` | unset | `1` or `stderr`: print pager statistics on exit, as text; a directory: every process writes `coalesce-stats-PID.json` in it (a `coalesce_pager::ExitReport`: the pager's statistics, the peak RSS, the pid and program name; `coalesce run` reads them); any other value: a file to write the report to, as JSON (the last process to exit wins) |
//!
//! Misconfiguration (an unparsable value, an unreachable server, no userfaultfd privilege, a kernel
//! without the needed userfaultfd features) prints one line on stderr and exits with status 125
//! before `main` runs: the program never runs half-configured.
//!
//! ## Hazards handled
//!
//! - No recursion at start-up: nothing on the allocation path allocates; set-up runs from
//!   `.init_array` with the calling thread marked internal.
//! - The pager's own threads (and this library's Rust code, through its global allocator) allocate
//!   from glibc's allocator, never from the heap the pager serves, and never enter mimalloc: a
//!   mimalloc purge of the region run by a pager thread would wait for the fault handler to read
//!   its remove event, possibly while holding a lock that handler needs.
//! - System calls writing into a non-resident heap page (e.g. `read(2)`) work: the pager handles
//!   kernel-mode faults (it refuses to run in user-mode-only userfaultfd).
//! - mimalloc's purges (`madvise(MADV_DONTNEED)`) become remove events: the pages read as zero and
//!   their remote copies are freed.
//! - `fork` without `exec`: see [`setup::fork`]: the child gets a complete private heap (bounded
//!   by `COALESCE_FORK_MAX`). `posix_spawn`, `vfork` and `fork`+`exec` need nothing special.
//!
//! ## Anonymous mappings
//!
//! `mmap`, `munmap`, `mremap`, `madvise` and `mprotect` are interposed too (`mapping_calls`,
//! `mappings`): a private anonymous read-write mapping of at least `COALESCE_MMAP_MIN` bytes is a
//! page-aligned block of the application heap, so allocators that map their own memory (CPython's
//! arenas, jemalloc) stay within the budget. The kernel's semantics that programs rely on hold:
//! zero pages, partial `munmap`, `mremap` growth and shrinking, `MADV_DONTNEED`/`MADV_FREE`
//! zeroing, `MAP_FIXED` over a served mapping, fork. Everything else passes to the kernel
//! unchanged, except calls that would change the pager's region behind its back, which fail
//! loudly: `mprotect` of heap memory to anything but read-write (`EACCES`), `munmap`/`mremap` of
//! `malloc`'s memory and `MAP_FIXED` over it (`EINVAL`). An unmapped page of a served mapping
//! reads as zero rather than faulting.
//!
//! A panic can never unwind out of an exported function: Rust aborts at an `extern "C"` boundary.

mod exports;
mod heap;
mod mapping_calls;
mod mappings;
mod settings;
pub mod setup;
mod sys;

#[global_allocator]
static ALLOCATOR: heap::InternalAllocator = heap::InternalAllocator;

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = setup::init;
