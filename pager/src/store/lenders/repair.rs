//! Re-replication and drain: a slab group that lost a copy (its lender failed, or came back with
//! a new session), has a copy on a lender that is leaving (draining), or was made with fewer
//! copies than asked gets a new slab on another live lender, filled from a surviving copy, in the
//! background; then the new slab takes the lost (or leaving) copy's place in the group, and a
//! leaving lender's slab is freed (it exits once it holds none). The page table does not change:
//! a slot names a record of a group, wherever the group's slabs are.
//!
//! Erasure-coded groups are repaired the same way, shard by shard: a lost shard is rebuilt,
//! record by record, from K surviving shards of the group (a leaving lender's shard, still
//! there, is copied as it is).
//!
//! Why copying a group is safe while the program runs: no page is written to a group that is
//! not whole (`place` moves a page out of such a group to a whole one, and free slots of such a
//! group are not handed out), and a copy starts only once every write batch that was open when
//! the group stopped being whole has closed (`quiesce.rs`: such a batch may have placed a page
//! there just before), so its records only get read or freed while they are copied. A
//! write that was in flight when the lender failed fails as a whole and leaves its page dirty,
//! to be written elsewhere. The new slab joins the group only if, at that moment, the copy it
//! was filled from still exists, the new slab's lender is still in the session that granted it,
//! and the place it takes is still empty; otherwise the work is dropped and the slab freed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use rdma::LocalRegion;

use super::io::LenderIo;
use super::{lock, Group, LenderStore, Location, Slab};
use crate::store::PageRepair;
use crate::PagerError;

/// Records copied per work request.
const CHUNK_RECORDS: u64 = 64;

/// The location of a slab's first record (for validity checks).
fn location(slab: &Slab) -> Location {
    Location { lender: slab.server, generation: slab.generation, addr: slab.addr, rkey: slab.rkey }
}

/// What a repair reads from: (place in the group, copy) pairs (see [`Job::sources`]).
type Sources = Vec<(usize, Location)>;

/// One group being repaired.
#[derive(Debug, Clone)]
struct Job {
    group: usize,
    /// Where the new slab goes in the group: the index of a lost copy, or the group's length
    /// (one more copy).
    at: usize,
    /// The group's length when the job began.
    len_before: usize,
    /// The copies read from, each with its place in the group: one copy (copied as it is), or
    /// K shards (the lost shard is rebuilt from them).
    sources: Sources,
    /// The new slab.
    target: Slab,
    /// Records in use (copied).
    used: u64,
    /// Next record to copy.
    next: u64,
    /// The write batches open when the job began: copying starts once they closed.
    writes: super::quiesce::Snapshot,
    /// A slab moving toward a nearer lender (`migrate.rs`), not a lost one.
    migration: bool,
}

/// The repair thread's state: its own connections, a copy buffer and the job in progress.
#[derive(Debug)]
pub(super) struct Repairer {
    store: Arc<LenderStore>,
    io: LenderIo,
    buf: Arc<LocalRegion>,
    job: Option<Job>,
    /// Set once "no lender has room" was said, until a job starts again.
    told_no_room: bool,
}

impl Repairer {
    pub(super) fn open(store: Arc<LenderStore>) -> Result<Self, PagerError> {
        let io = LenderIo::open(Arc::clone(&store))?;
        // Room for a chunk from each of K shards and the rebuilt one.
        let chunks = store.code.as_ref().map_or(1, |code| code.data() + 1) as u64;
        let len = usize::try_from(chunks * CHUNK_RECORDS * store.record_len()).unwrap_or(usize::MAX);
        let buf = LocalRegion::new(len).map_err(PagerError::Buffer)?;
        Ok(Self { store, io, buf, job: None, told_no_room: false })
    }

    /// Starts the next job: the first group that is not whole, has a surviving copy, and a
    /// lender this thread can reach that has room and holds no copy of it.
    fn start(&mut self) -> Option<Job> {
        let count = self.store.groups.read().unwrap_or_else(PoisonError::into_inner).len();
        let mut stuck = false;
        for group in 0..count {
            let Some((g, at, sources)) = self.store.repairable(group) else { continue };
            let used = self.store.records_used(group, &g);
            if used == 0 {
                continue;
            }
            // A lender whose copy was lost (it came back with a new session) may take the new one.
            let holders: Vec<usize> =
                g.slabs().iter().filter(|s| self.store.copy_valid(&location(s))).map(|s| s.server).collect();
            let migration = self.store.is_migrating(group);
            if migration {
                continue; // Started below, once nothing needs repair.
            }
            let Some(target) = self.new_slab(&holders, used, 0.0) else {
                stuck = true;
                continue;
            };
            self.told_no_room = false;
            tracing::debug!(group, records = used, to = %self.store.lenders[target.server].addr, "re-replicating a slab group");
            // The group is already marked (not whole): wait for the writes placed before that.
            let writes = self.store.write_batches.snapshot();
            return Some(Job { group, at, len_before: g.len, sources, target, used, next: 0, writes, migration });
        }
        if !stuck {
            if let Some(job) = self.start_migration() {
                return Some(job);
            }
        }
        if stuck && !self.told_no_room {
            self.told_no_room = true;
            tracing::warn!(
                pages = self.store.pending_repair(),
                "pages have fewer copies (or shards) than asked for (a lender was lost or is leaving, or the \
                 lenders were full when the pages were written) and no live lender outside their groups has \
                 room for another; they stay as they are until one has (add a lender)"
            );
        }
        None
    }

    /// The next slab to move toward a nearer lender, marked, with its new slab (`migrate.rs`).
    fn start_migration(&mut self) -> Option<Job> {
        let min_weight = self.store.start_migration()?;
        let job = (|| {
            let (group, at) = self.store.migrating()?;
            let (g, _, sources) = self.store.repairable(group)?;
            let used = self.store.records_used(group, &g);
            let holders: Vec<usize> = g.slabs().iter().map(|s| s.server).collect();
            let target = self.new_slab(&holders, used, min_weight)?;
            tracing::debug!(group, pages = used, to = %self.store.lenders[target.server].addr, "moving a slab toward a nearer lender");
            let writes = self.store.write_batches.snapshot();
            Some(Job { group, at, len_before: g.len, sources, target, used, next: 0, writes, migration: true })
        })();
        if job.is_none() {
            self.store.end_migration();
        }
        job
    }

    /// A slab of at least `used` records on a live, reachable lender with room that is not one
    /// of `holders` and weighs at least `min_weight`: the nearest such lender.
    fn new_slab(&mut self, holders: &[usize], used: u64, min_weight: f64) -> Option<Slab> {
        let store = Arc::clone(&self.store);
        let mut order: Vec<usize> = (0..store.lenders.len()).collect();
        order.sort_by(|&a, &b| store.weight_of(b).total_cmp(&store.weight_of(a)));
        for j in order {
            let s = &store.lenders[j];
            let unusable = !s.is_alive() || s.full.load(Ordering::Acquire) || s.leaving.load(Ordering::Acquire);
            if holders.contains(&j) || unusable || !self.io.can_reach(j) || store.weight_of(j) < min_weight {
                continue;
            }
            let generation = s.generation.load(Ordering::Acquire);
            let grant = match lock(&s.control).alloc_slab() {
                Ok(g) => {
                    s.has_room();
                    g
                }
                Err(rdma::client::ClientError::CapacityExhausted { message, .. }) => {
                    s.mark_full(&message);
                    continue;
                }
                Err(e) => {
                    store.mark_failed(j, &e.to_string());
                    continue;
                }
            };
            let slab = Slab { server: j, generation, slab_id: grant.slab_id, addr: grant.addr, rkey: grant.rkey };
            if grant.len / store.record_len() < used {
                // Its slabs are smaller than this group's: no use for this group.
                let _ = lock(&s.control).free_slab(grant.slab_id);
                continue;
            }
            return Some(slab);
        }
        None
    }

    /// Copies (or rebuilds) the next chunk of `job`; true when the chunk was written.
    fn copy_chunk(&mut self, job: &mut Job) -> bool {
        let record = self.store.record_len();
        let n = CHUNK_RECORDS.min(job.used - job.next);
        let (Ok(len), Ok(stride)) = (usize::try_from(n * record), usize::try_from(CHUNK_RECORDS * record)) else {
            return false;
        };
        let offset = job.next * record;
        for (k, (_, source)) in job.sources.iter().enumerate() {
            let read =
                self.io.move_bytes(false, &self.buf, k * stride, len, source.lender, source.addr + offset, source.rkey);
            if read.is_err() || !self.store.copy_valid(source) {
                return false;
            }
        }
        // One source is a copy of what the target gets; K sources are shards to rebuild it from.
        let from = if job.sources.len() == 1 {
            0
        } else {
            match self.rebuild_chunk(job, len, stride) {
                Some(at) => at,
                None => return false,
            }
        };
        let (server, addr, rkey) = (job.target.server, job.target.addr + offset, job.target.rkey);
        if self.io.move_bytes(true, &self.buf, from, len, server, addr, rkey).is_err() {
            return false;
        }
        job.next += n;
        true
    }

    /// Rebuilds shard `job.at` of every record of a chunk from the K source chunks in the buffer
    /// (chunk `k` at `k * stride`); returns where the rebuilt chunk is.
    fn rebuild_chunk(&self, job: &Job, len: usize, stride: usize) -> Option<usize> {
        let code = self.store.code.as_ref()?;
        let shard_len = code.shard_len();
        let out = job.sources.len() * stride;
        let mut stripe = vec![0u8; code.stripe_len()];
        let mut present = vec![false; code.shards()];
        for &(s, _) in &job.sources {
            present[s] = true;
        }
        let mut shard = vec![0u8; shard_len];
        for r in 0..len / shard_len {
            for (k, &(s, _)) in job.sources.iter().enumerate() {
                self.buf.read_at(k * stride + r * shard_len, &mut stripe[s * shard_len..(s + 1) * shard_len]).ok()?;
            }
            code.rebuild(&mut stripe, &present, true).ok()?;
            shard.copy_from_slice(&stripe[job.at * shard_len..(job.at + 1) * shard_len]);
            self.buf.write_at(out + r * shard_len, &shard).ok()?;
        }
        Some(out)
    }

    /// Drops a job: its new slab is freed (if its lender is still there).
    fn abandon(&self, job: &Job, why: &str) {
        tracing::debug!(group = job.group, why, "re-replication of a slab group dropped");
        if job.migration {
            self.store.end_migration();
        }
        let s = &self.store.lenders[job.target.server];
        if s.is_alive() && s.generation.load(Ordering::Acquire) == job.target.generation {
            let _ = lock(&s.control).free_slab(job.target.slab_id);
        }
    }
}

impl PageRepair for Repairer {
    fn repair(&mut self, max_pages: usize) -> usize {
        let mut job = match self.job.take() {
            Some(job) => job,
            None => match self.start() {
                Some(job) => job,
                None => return 0,
            },
        };
        if !job.writes.settled(self.store.timeout) {
            self.job = Some(job);
            return 0;
        }
        let mut copied = 0;
        while job.next < job.used && copied < max_pages {
            let before = job.next;
            if !self.copy_chunk(&mut job) {
                self.abandon(&job, "a copy failed, or the copy read from is gone");
                return copied;
            }
            copied += usize::try_from(job.next - before).unwrap_or(0);
        }
        if job.next < job.used {
            self.job = Some(job);
        } else if let Err(why) = self.store.complete(&job) {
            self.abandon(&job, why);
        }
        copied
    }
}

impl LenderStore {
    /// If group `group` is not whole but can be made whole: the group, where a new copy (or
    /// shard) goes, and what to fill it from (see [`Job::sources`]).
    fn repairable(&self, group: usize) -> Option<(Group, usize, Sources)> {
        let g = *self.groups.read().unwrap_or_else(PoisonError::into_inner).get(group)?;
        // `locate` of record 0 gives the slabs' base addresses.
        let places = self.locate(super::make_slot(group, 0))?;
        if self.healthy(&places) {
            return None;
        }
        let copies = places.copies();
        // A slab moving toward a nearer lender is copied as it is (`migrate.rs`).
        if let Some((_, at)) = self.migrating().filter(|&(g, _)| g == group) {
            return (at < copies.len() && self.copy_valid(&copies[at])).then(|| (g, at, vec![(at, copies[at])]));
        }
        let at = match copies.iter().position(|loc| !self.copy_whole(loc)) {
            Some(lost) => lost,
            None if g.len < self.width => g.len,
            None => return None,
        };
        let Some(code) = &self.code else {
            // Read from a copy that stays, else from the leaving one.
            let source = copies
                .iter()
                .find(|loc| self.copy_whole(loc))
                .or_else(|| copies.iter().find(|loc| self.copy_valid(loc)))?;
            return Some((g, at, vec![(0, *source)]));
        };
        // A leaving lender's shard is still there: copy it as it is.
        if at < copies.len() && self.copy_valid(&copies[at]) {
            return Some((g, at, vec![(at, copies[at])]));
        }
        // Else rebuild it from K shards (those that stay first).
        let mut valid: Vec<usize> = (0..copies.len()).filter(|&s| s != at && self.copy_valid(&copies[s])).collect();
        valid.sort_by_key(|&s| !self.copy_whole(&copies[s]));
        if valid.len() < code.data() {
            return None;
        }
        Some((g, at, valid[..code.data()].iter().map(|&s| (s, copies[s])).collect()))
    }

    /// Records of group `group` that may hold pages: up to the bump pointer of the group being
    /// filled, else all of them.
    pub(super) fn records_used(&self, group: usize, g: &Group) -> u64 {
        let bump =
            self.lenders.iter().find_map(|(_, s)| lock(&s.slots).bump.filter(|&(gi, _)| gi == group).map(|(_, n)| n));
        u64::from(bump.unwrap_or(g.records).min(g.records))
    }

    /// Puts a filled slab into its group, if the group is still as the job found it.
    fn complete(&self, job: &Job) -> Result<(), &'static str> {
        let target = &self.lenders[job.target.server];
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        let Some(g) = groups.get_mut(job.group) else { return Err("the group is gone") };
        if !job.sources.iter().all(|(_, source)| self.copy_valid(source)) {
            return Err("a copy read from is gone");
        }
        if !target.is_alive() || target.generation.load(Ordering::Acquire) != job.target.generation {
            return Err("the lender copied to is gone");
        }
        let mut replaced = None;
        if job.at < job.len_before {
            let old = g.copies[job.at];
            if job.migration {
                if !self.copy_valid(&location(&old)) {
                    return Err("the slab moved from is gone");
                }
            } else if self.copy_whole(&location(&old)) {
                return Err("the lost copy came back");
            }
            g.copies[job.at] = job.target;
            // A leaving lender's copy still exists: free it, so the lender can leave. A copy on
            // a lender that failed is freed if the lender comes back in the same session.
            if self.copy_valid(&location(&old)) {
                replaced = Some(old);
            } else {
                lock(&self.orphans).push((old.server, old.generation, old.slab_id));
            }
        } else {
            if g.len != job.len_before || g.len >= self.width {
                return Err("the group changed");
            }
            g.copies[g.len] = job.target;
            g.len += 1;
        }
        target.pages.fetch_add(job.used, Ordering::Relaxed);
        drop(groups);
        if let Some(old) = replaced {
            let s = &self.lenders[old.server];
            let _ = s.pages.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(job.used)));
            // Freed later: a read that found the old slab just before may still be on its way.
            lock(&self.replaced).push((old.server, old.generation, old.slab_id, Instant::now()));
        }
        if job.migration {
            self.migrated.fetch_add(job.used, Ordering::Relaxed);
            self.end_migration();
            tracing::info!(group = job.group, pages = job.used, to = %target.addr, "slab moved to a nearer lender");
        } else {
            tracing::info!(group = job.group, pages = job.used, to = %target.addr, "slab group whole again");
        }
        self.unpark();
        Ok(())
    }

    /// Frees the replaced slabs that no read can still use: a read finds its copies
    /// (`locate`) and posts at once, and completes or fails within the request timeout.
    pub(super) fn free_replaced(&self) {
        let grace = self.timeout + Duration::from_secs(1);
        let due: Vec<(usize, u64, u64, Instant)> = {
            let mut replaced = lock(&self.replaced);
            let (due, keep) = replaced.drain(..).partition(|&(_, _, _, at)| at.elapsed() >= grace);
            *replaced = keep;
            due
        };
        for (i, generation, slab, _) in due {
            let s = &self.lenders[i];
            if s.is_alive() && s.generation.load(Ordering::Acquire) == generation {
                let _ = lock(&s.control).free_slab(slab);
            }
        }
    }

    /// Pages in groups that are not whole and can still be made whole.
    pub(super) fn pending_repair(&self) -> u64 {
        let count = self.groups.read().unwrap_or_else(PoisonError::into_inner).len();
        (0..count).filter_map(|group| self.repairable(group).map(|(g, _, _)| self.records_used(group, &g))).sum()
    }
}
