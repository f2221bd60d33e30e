//! The backup tier (`--backup ADDR`): a layer over the lender store that writes every page the
//! lenders take behind, asynchronously, to a farther `memory-server --persist` (an append-only
//! log on its disk), and reads a page back from there when every lender copy of it is gone.
//!
//! Consistency is relaxed, by design: a write-back completes when the lenders have the page; a
//! thread (`backup`) sends it to the backup server later, in batches, within a bounded lag (at
//! most `max_lag` after the write, and at most `max_lag_pages` pages queued: a write-back waits
//! for room past that, up to the fetch timeout). A page whose lender copies are all lost comes
//! back from the backup only if the backup holds the very version the page table names; a page
//! written again after its last write-behind fails loudly (SIGBUS and a log line), never as an
//! older version or zeros. A checkpoint (every `checkpoint_interval`, default 10 s, and at
//! [`PageStore::checkpoint`]) waits until every page written back before it is in the backup and
//! on its disk: an epoch the backup is consistent with, shown in the statistics.
//!
//! The layer sits below the sealing layer: the backup server keeps sealed pages and their tags,
//! and can no more read or change them unnoticed than a lender can.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma::client::{ClientOptions, ControlClient};
use rdma::control::BackupPage;
use rdma::LocalRegion;

use super::{LenderInfo, PageId, PageIo, PageStore, PageTransfer, Slot, TransferError};
use crate::{PagerError, PAGE_SIZE};

/// Pages per `BACKUP_PUT` (a sealed control frame holds at most 64 KiB).
const BATCH: usize = 12;

/// How long after a failure the backup server is tried again.
const RETRY: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the backup tier is reached and how far behind it may be.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The backup server (`memory-server --persist`).
    pub addr: SocketAddr,
    /// How the connection is opened (cluster key, provider).
    pub client: ClientOptions,
    /// A page is sent at most this long after its write-back.
    pub max_lag: Duration,
    /// At most this many pages wait to be sent; a write-back waits for room past it.
    pub max_lag_pages: usize,
    /// How long a write-back waits for room, and a request for its reply.
    pub timeout: Duration,
    /// A checkpoint is made this often (when pages were written behind since the last one).
    pub checkpoint_interval: Duration,
}

/// The backup tier's counters (see [`crate::PagerStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupStats {
    /// Pages written behind to the backup server.
    pub written: u64,
    /// Pages waiting to be sent.
    pub lag_pages: u64,
    /// How long the oldest waiting page has waited, in milliseconds.
    pub lag_ms: u64,
    /// Pages read back from the backup (every lender copy was gone).
    pub read_back: u64,
    /// Pages whose lender copies were gone and whose backup is older than the page: failed.
    pub stale: u64,
    /// Requests to the backup server that failed (it is tried again a second later).
    pub failures: u64,
    /// Pages dropped from a full queue before they were written behind (their backup is older).
    pub dropped: u64,
    /// Checkpoints made (periodic and asked for).
    pub checkpoints: u64,
    /// How long ago the last checkpoint was made, in milliseconds (`None`: none yet).
    pub last_checkpoint_ms: Option<u64>,
    /// Pages written back since the newest checkpoint (not yet covered by one).
    pub since_checkpoint: u64,
}

/// One page waiting to be written behind.
#[derive(Debug)]
struct Pending {
    id: PageId,
    data: Vec<u8>,
    at: Instant,
    /// Its place in the order of write-backs.
    seq: u64,
}

#[derive(Debug, Default)]
struct Queue {
    pages: VecDeque<Pending>,
    /// Pages taken by the sender and not yet acknowledged.
    sending: usize,
    /// Sequence number of the next page queued.
    next_seq: u64,
    /// Checkpoints asked for, and done (a checkpoint waits for `done` to reach its number).
    asked: u64,
    done: u64,
    /// The newest checkpoint asked for covers the pages queued before this sequence number.
    mark: u64,
    /// The newest checkpoint done covers the pages queued before this one.
    done_mark: u64,
    /// When the last checkpoint completed.
    last: Option<Instant>,
}

impl Queue {
    /// Asks for a checkpoint of every page queued so far; returns its number.
    fn ask(&mut self) -> u64 {
        self.asked += 1;
        self.mark = self.next_seq;
        self.asked
    }

    /// Whether a page queued before the newest checkpoint's mark still waits.
    fn checkpoint_waits_for_pages(&self) -> bool {
        self.asked > self.done && self.pages.front().is_some_and(|p| p.seq < self.mark)
    }
}

/// State shared with the sender thread.
#[derive(Debug)]
struct Shared {
    options: BackupOptions,
    control: Mutex<Option<ControlClient>>,
    /// The client id and session of the last connection (to resume it, or keep the same id).
    identity: Mutex<Option<ClientOptions>>,
    queue: Mutex<Queue>,
    changed: Condvar,
    /// The version of each page the backup holds: (region, page) -> version.
    held: Mutex<HashMap<(u32, u32), u32>>,
    shutdown: AtomicBool,
    written: AtomicU64,
    read_back: AtomicU64,
    stale: AtomicU64,
    failures: AtomicU64,
    dropped: AtomicU64,
    checkpoints: AtomicU64,
    started: Instant,
    down_since: Mutex<Option<Instant>>,
}

/// The backup layer over another store.
pub struct BackupStore {
    inner: Arc<dyn PageStore>,
    shared: Arc<Shared>,
    sender: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupStore").field("addr", &self.shared.options.addr).field("inner", &self.inner).finish()
    }
}

impl BackupStore {
    /// Connects to the backup server and starts the sender thread; fails naming the server when
    /// it cannot be reached or keeps no backups.
    pub fn new(inner: Arc<dyn PageStore>, options: BackupOptions) -> Result<Self, PagerError> {
        let addr = options.addr;
        let mut control =
            ControlClient::connect(addr, &options.client).map_err(|source| PagerError::Server { addr, source })?;
        control.set_timeout(options.timeout).map_err(|source| PagerError::Server { addr, source })?;
        // A server without --persist refuses backup requests: say so now, not at the first loss.
        control.backup_sync().map_err(|e| {
            PagerError::Config(format!("backup server {addr} cannot keep backups ({e}); start it with --persist DIR"))
        })?;
        let identity = ClientOptions { client_id: Some(control.client_id()), ..options.client.clone() };
        tracing::info!(%addr, max_lag = ?options.max_lag, max_lag_pages = options.max_lag_pages, "writing pages behind to a backup server");
        let shared = Arc::new(Shared {
            options,
            control: Mutex::new(Some(control)),
            identity: Mutex::new(Some(identity)),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            held: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
            written: AtomicU64::new(0),
            read_back: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            started: Instant::now(),
            down_since: Mutex::new(None),
        });
        let s = Arc::clone(&shared);
        let sender = std::thread::Builder::new()
            .name("backup".into())
            .spawn(move || s.send_loop())
            .map_err(PagerError::Thread)?;
        Ok(Self { inner, shared, sender: Mutex::new(Some(sender)) })
    }
}

impl Drop for BackupStore {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.changed.notify_all();
        if let Some(t) = lock(&self.sender).take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// Runs `f` on the connection, reconnecting first if it was lost (at most every [`RETRY`]).
    fn with_control<T>(&self, f: impl FnMut(&mut ControlClient) -> Result<T, rdma::client::ClientError>) -> Option<T> {
        self.with_control_retrying(false, f)
    }

    /// Like [`Shared::with_control`]; with `urgent` (a page is needed now) a lost connection is
    /// opened again at once, and a request that fails on a connection found dead is sent again
    /// on a new one.
    fn with_control_retrying<T>(
        &self,
        urgent: bool,
        mut f: impl FnMut(&mut ControlClient) -> Result<T, rdma::client::ClientError>,
    ) -> Option<T> {
        let attempts = if urgent { 2 } else { 1 };
        for _ in 0..attempts {
            if let Some(v) = self.try_control(urgent, &mut f) {
                return Some(v);
            }
        }
        None
    }

    fn try_control<T>(
        &self,
        urgent: bool,
        f: &mut impl FnMut(&mut ControlClient) -> Result<T, rdma::client::ClientError>,
    ) -> Option<T> {
        let mut control = lock(&self.control);
        if control.is_none() {
            let mut down = lock(&self.down_since);
            if !urgent && down.is_some_and(|t| t.elapsed() < RETRY) {
                return None;
            }
            let options = lock(&self.identity).clone().unwrap_or_else(|| self.options.client.clone());
            match ControlClient::connect(self.options.addr, &options) {
                Ok(mut c) => {
                    let _ = c.set_timeout(self.options.timeout);
                    tracing::warn!(addr = %self.options.addr, "backup server reachable again");
                    *lock(&self.identity) = Some(ClientOptions { resume: Some(c.proof()), ..options });
                    *control = Some(c);
                    *down = None;
                }
                Err(e) => {
                    *down = Some(Instant::now());
                    tracing::debug!(addr = %self.options.addr, error = %e, "backup server still unreachable");
                    return None;
                }
            }
        }
        let c = control.as_mut()?;
        match f(c) {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if lock(&self.down_since).replace(Instant::now()).is_none() {
                    tracing::error!(
                        addr = %self.options.addr,
                        error = %e,
                        "backup server failed; pages wait for it (tried again every second)"
                    );
                }
                *control = None;
                None
            }
        }
    }

    /// The sender thread: writes waiting pages behind when a batch is full, when the oldest has
    /// waited `max_lag`, or when a checkpoint is asked for; syncs for checkpoints.
    fn send_loop(&self) {
        loop {
            let (batch, checkpoint) = {
                let mut q = lock(&self.queue);
                loop {
                    if self.shutdown.load(Ordering::Acquire) {
                        return;
                    }
                    // A periodic checkpoint, unless one is under way or nothing was queued since.
                    let since = q.last.map_or(self.started.elapsed(), |t| t.elapsed());
                    if q.asked == q.done && since >= self.options.checkpoint_interval && q.next_seq > q.mark {
                        q.ask();
                    }
                    let due = q.pages.front().is_some_and(|p| p.at.elapsed() >= self.options.max_lag);
                    if q.pages.len() >= BATCH || due || q.checkpoint_waits_for_pages() {
                        let n = q.pages.len().min(BATCH);
                        q.sending = n;
                        break (q.pages.drain(..n).collect::<Vec<_>>(), None);
                    }
                    if q.asked > q.done {
                        break (Vec::new(), Some((q.asked, q.mark)));
                    }
                    let lag = q.pages.front().map_or(Duration::from_millis(200), |p| {
                        self.options.max_lag.saturating_sub(p.at.elapsed()).max(Duration::from_millis(1))
                    });
                    let next_checkpoint =
                        self.options.checkpoint_interval.saturating_sub(since).max(Duration::from_millis(1));
                    let wait = lag.min(next_checkpoint);
                    q = self.changed.wait_timeout(q, wait).unwrap_or_else(PoisonError::into_inner).0;
                }
            };
            if let Some((asked, mark)) = checkpoint {
                if self.with_control(ControlClient::backup_sync).is_some() {
                    let mut q = lock(&self.queue);
                    q.done = q.done.max(asked);
                    q.done_mark = q.done_mark.max(mark);
                    q.last = Some(Instant::now());
                    self.checkpoints.fetch_add(1, Ordering::Relaxed);
                    self.changed.notify_all();
                } else {
                    std::thread::sleep(RETRY.min(Duration::from_millis(100)));
                }
                continue;
            }
            self.send(batch);
        }
    }

    fn send(&self, batch: Vec<Pending>) {
        let pages: Vec<BackupPage> = batch
            .iter()
            .map(|p| BackupPage { region: p.id.region, page: p.id.page, version: p.id.version, data: p.data.clone() })
            .collect();
        // One attempt (not urgent): the pages are moved into the request.
        let mut pages = Some(pages);
        let stored = self.with_control(|c| c.backup_put(pages.take().unwrap_or_default()));
        let mut q = lock(&self.queue);
        q.sending = 0;
        if stored.is_some() {
            let mut held = lock(&self.held);
            for p in &batch {
                let v = held.entry((p.id.region, p.id.page)).or_insert(p.id.version);
                *v = (*v).max(p.id.version);
            }
            self.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        } else {
            // Back to the front, in order; the sender waits before it tries again.
            for p in batch.into_iter().rev() {
                q.pages.push_front(p);
            }
            drop(q);
            std::thread::sleep(Duration::from_millis(100));
            self.changed.notify_all();
            return;
        }
        drop(q);
        self.changed.notify_all();
    }

    /// Queues a page written to the lenders; waits (up to the timeout) while the queue is full.
    /// While the backup server is down the queue does not wait: past its bound the oldest page
    /// is dropped (it loses its backup, counted, said once), so a lost backup costs the program
    /// no speed and bounded memory.
    fn enqueue(&self, id: PageId, data: Vec<u8>) {
        let mut q = lock(&self.queue);
        let deadline = Instant::now() + self.options.timeout;
        while q.pages.len() >= self.options.max_lag_pages
            && Instant::now() < deadline
            && lock(&self.down_since).is_none()
        {
            self.changed.notify_all();
            let left = deadline.saturating_duration_since(Instant::now());
            q = self.changed.wait_timeout(q, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        while q.pages.len() >= self.options.max_lag_pages {
            q.pages.pop_front();
            if self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    addr = %self.options.addr,
                    max_lag_pages = self.options.max_lag_pages,
                    "the backup server is not keeping up (or is down): the oldest waiting pages are dropped \
                     and lose their backup"
                );
            }
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        q.pages.push_back(Pending { id, data, at: Instant::now(), seq });
        if q.pages.len() >= BATCH {
            self.changed.notify_all();
        }
    }

    /// The page `id` from the backup, if it holds that very version.
    fn fetch(&self, id: PageId) -> Result<Vec<u8>, String> {
        let held = lock(&self.held).get(&(id.region, id.page)).copied();
        if held != Some(id.version) {
            self.stale.fetch_add(1, Ordering::Relaxed);
            return Err(match held {
                Some(v) => format!(
                    "the backup holds version {v} of it, not {}: it was written again after its last write-behind",
                    id.version
                ),
                None => "it was never written behind to the backup".into(),
            });
        }
        match self.with_control_retrying(true, |c| c.backup_get(id.region, id.page)) {
            Some(Some(p)) if p.version == id.version => {
                self.read_back.fetch_add(1, Ordering::Relaxed);
                Ok(p.data)
            }
            Some(Some(p)) => Err(format!("the backup server returned version {}, not {}", p.version, id.version)),
            Some(None) => Err("the backup server has no copy of it".into()),
            None => Err("the backup server cannot be reached".into()),
        }
    }

    fn stats(&self) -> BackupStats {
        let q = lock(&self.queue);
        BackupStats {
            written: self.written.load(Ordering::Relaxed),
            lag_pages: (q.pages.len() + q.sending) as u64,
            lag_ms: q.pages.front().map_or(0, |p| u64::try_from(p.at.elapsed().as_millis()).unwrap_or(u64::MAX)),
            read_back: self.read_back.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            last_checkpoint_ms: q.last.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            since_checkpoint: q.next_seq - q.done_mark,
        }
    }
}

impl PageStore for BackupStore {
    fn open_io(self: Arc<Self>) -> Result<Box<dyn PageIo>, PagerError> {
        let inner = Arc::clone(&self.inner).open_io()?;
        Ok(Box::new(BackupIo { inner, shared: Arc::clone(&self.shared), trailer: self.inner.trailer_len() }))
    }

    fn free(&self, slot: Slot) {
        self.inner.free(slot);
    }

    fn lender_of(&self, slot: Slot) -> Option<SocketAddr> {
        self.inner.lender_of(slot)
    }

    fn trailer_len(&self) -> usize {
        self.inner.trailer_len()
    }

    fn seals_pages(&self) -> bool {
        self.inner.seals_pages()
    }

    fn maintain(&self) {
        self.inner.maintain();
        // Keeps the backup session's lease alive (and notices a lost server).
        let _ = self.shared.with_control(|c| c.heartbeat().map(|_| ()));
    }

    fn maintenance_period(&self) -> Duration {
        self.inner.maintenance_period()
    }

    fn remote_pages(&self) -> u64 {
        self.inner.remote_pages()
    }

    fn bookkeeping_bytes(&self) -> usize {
        self.inner.bookkeeping_bytes() + lock(&self.shared.held).capacity() * 16
    }

    fn lenders(&self) -> Vec<LenderInfo> {
        self.inner.lenders()
    }

    /// Gives the lenders' memory back and drops this client's backups.
    fn release_all(&self) {
        self.inner.release_all();
        lock(&self.shared.queue).pages.clear();
        let _ = self.shared.with_control(ControlClient::backup_forget);
    }

    fn open_repair(self: Arc<Self>) -> Result<Option<Box<dyn super::PageRepair>>, PagerError> {
        Arc::clone(&self.inner).open_repair()
    }

    fn repair_pending(&self) -> u64 {
        self.inner.repair_pending()
    }

    fn copies_rejected(&self) -> Option<u64> {
        self.inner.copies_rejected()
    }

    fn add_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.inner.add_lender(addr)
    }

    fn retire_lender(&self, addr: SocketAddr) -> Result<(), PagerError> {
        self.inner.retire_lender(addr)
    }

    fn migrated_pages(&self) -> u64 {
        self.inner.migrated_pages()
    }

    fn hot_pages_moved_nearer(&self) -> u64 {
        self.inner.hot_pages_moved_nearer()
    }

    fn hedged_reads(&self) -> (u64, u64) {
        self.inner.hedged_reads()
    }

    fn checkpoint(&self, timeout: Duration) -> Result<(), PagerError> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.shared.queue);
        let mine = q.ask();
        self.shared.changed.notify_all();
        while q.done < mine {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PagerError::Config(format!(
                    "checkpoint: the backup server {} did not take every page within {timeout:?} ({} waiting)",
                    self.shared.options.addr,
                    q.pages.len() + q.sending
                )));
            }
            q = self.shared.changed.wait_timeout(q, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        Ok(())
    }

    fn backup_stats(&self) -> Option<BackupStats> {
        Some(self.shared.stats())
    }
}

/// One thread's I/O: the lender store's, plus the write-behind and the read-back.
struct BackupIo {
    inner: Box<dyn PageIo>,
    shared: Arc<Shared>,
    trailer: usize,
}

impl fmt::Debug for BackupIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupIo").field("inner", &self.inner).finish()
    }
}

impl PageIo for BackupIo {
    fn read_pages(&mut self, buf: &Arc<LocalRegion>, pages: &[PageTransfer], out: &mut Vec<Result<(), TransferError>>) {
        self.inner.read_pages(buf, pages, out);
        for (i, p) in pages.iter().enumerate() {
            if out[i].is_ok() || out[i] == Err(TransferError::Corrupt) || self.inner.readable(p.slot) {
                continue;
            }
            // Every lender copy is gone: the backup, if it holds this version.
            match self.shared.fetch(p.id) {
                Ok(data) if data.len() == PAGE_SIZE + self.trailer => {
                    let wrote = buf
                        .write_at(p.offset, &data[..PAGE_SIZE])
                        .and_then(|()| p.trailer.map_or(Ok(()), |t| buf.write_at(t, &data[PAGE_SIZE..])));
                    out[i] = wrote.map_err(|e| TransferError::Local(e.to_string()));
                }
                Ok(data) => {
                    tracing::error!(
                        page = p.id.page,
                        region = p.id.region,
                        len = data.len(),
                        "the backup of a page has the wrong length"
                    );
                }
                Err(why) => tracing::error!(
                    page = p.id.page,
                    region = p.id.region,
                    version = p.id.version,
                    backup = %self.shared.options.addr,
                    "every lender copy of the page is gone and the backup cannot replace it: {why}"
                ),
            }
        }
    }

    fn write_pages(
        &mut self,
        buf: &Arc<LocalRegion>,
        pages: &[PageTransfer],
        out: &mut Vec<Result<(), TransferError>>,
    ) {
        self.inner.write_pages(buf, pages, out);
        for (p, _) in pages.iter().zip(out.iter()).filter(|(_, o)| o.is_ok()) {
            let mut data = vec![0u8; PAGE_SIZE + self.trailer];
            let read = buf.read_at(p.offset, &mut data[..PAGE_SIZE]).and_then(|()| match p.trailer {
                Some(t) => buf.read_at(t, &mut data[PAGE_SIZE..]),
                None => Ok(()),
            });
            match read {
                Ok(()) => self.shared.enqueue(p.id, data),
                Err(e) => tracing::error!(page = p.id.page, error = %e, "cannot copy a page for the backup"),
            }
        }
    }

    fn set_read_within(&mut self, within: Option<std::time::Duration>) {
        self.inner.set_read_within(within);
    }

    fn readable(&self, slot: Slot) -> bool {
        self.inner.readable(slot)
    }

    fn intact(&self, slot: Slot) -> bool {
        self.inner.intact(slot)
    }

    fn held_elsewhere(&self, id: PageId) -> bool {
        lock(&self.shared.held).get(&(id.region, id.page)) == Some(&id.version)
    }

    fn distrust(&mut self, slot: Slot, why: &str) {
        self.inner.distrust(slot, why);
    }

    fn place(&mut self, current: Option<Slot>) -> Option<Slot> {
        self.inner.place(current)
    }

    fn wants_nearer(&self, slot: Slot) -> bool {
        self.inner.wants_nearer(slot)
    }
}
