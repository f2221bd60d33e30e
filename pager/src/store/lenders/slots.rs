//! Slot allocation: slots handed out over the live lenders by proximity (the one whose pages per
//! weight are fewest, `proximity.rs`), from free lists and
//! the bump pointer of each lender's group being filled; groups made (a slab on each of `width`
//! distinct lenders) when a lender's group is full; slots of groups that are not whole parked
//! until a repair or a revival makes them whole.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use rdma::client::ClientError;

use super::{lock, make_slot, proximity, Group, LenderStore, Slab, Slot, MAX_GROUP, MAX_SLABS, SLOT_PAGE_BITS};

impl LenderStore {
    /// Reserves a slot on the live lender (and `usable`) whose share of the pages is furthest
    /// below its weight, allocating a slab if needed. `None` when every lender is full, down or
    /// not usable.
    pub(super) fn alloc_slot(&self, usable: impl Fn(usize) -> bool) -> Option<Slot> {
        let n = self.lenders.len();
        let start = self.next_lender.fetch_add(1, Ordering::Relaxed);
        let mut tried = [0u64; super::MAX_LENDERS / 64];
        let was_tried = |tried: &[u64], i: usize| tried[i / 64] & (1 << (i % 64)) != 0;
        for _ in 0..n {
            let candidates = self.lenders.iter().map(|(i, s)| {
                let c = proximity::Candidate {
                    pages: s.pages.load(Ordering::Relaxed),
                    weight: f64::from_bits(s.weight.load(Ordering::Relaxed)),
                    usable: s.is_alive() && usable(i),
                };
                (i, c)
            });
            let Some(i) = proximity::next_lender(candidates, n, start, |i| was_tried(&tried, i)) else { break };
            tried[i / 64] |= 1 << (i % 64);
            if let Some(slot) = self.alloc_slot_on(i) {
                return Some(slot);
            }
        }
        None
    }

    /// Reserves a slot in a group led by lender `i` (a hot page moving nearer, `proximity.rs`).
    pub(super) fn alloc_slot_on(&self, i: usize) -> Option<Slot> {
        let slot = self.slot_from(i)?;
        if let Some(places) = self.locate(slot) {
            for loc in places.copies() {
                self.lenders[loc.lender].pages.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(slot)
    }

    fn slot_from(&self, i: usize) -> Option<Slot> {
        let s = &self.lenders[i];
        let mut slots = lock(&s.slots);
        // Free slots and the group being filled are used only while all their copies exist.
        while let Some(slot) = slots.free.pop() {
            if self.locate(Slot(slot)).is_some_and(|p| self.healthy(&p)) {
                return Some(Slot(slot));
            }
        }
        if let Some((group, next)) = slots.bump {
            let records = self.groups.read().unwrap_or_else(PoisonError::into_inner)[group].records;
            let slot = make_slot(group, next);
            if next < records && self.locate(slot).is_some_and(|p| self.healthy(&p)) {
                slots.bump = Some((group, next + 1));
                return Some(slot);
            }
        }
        if s.full.load(Ordering::Acquire) {
            return None;
        }
        let group = self.new_group(i)?;
        slots.bump = Some((group, 1));
        Some(make_slot(group, 0))
    }

    /// Makes a group led by lender `leader`: a slab on it and on the nearest other live lenders
    /// with room (equally near ones in turn after the leader), up to `width` of them. `None` when
    /// the leader has no room (or fails).
    fn new_group(&self, leader: usize) -> Option<usize> {
        let n = self.lenders.len();
        let mut group = Group { copies: [Slab::default(); MAX_GROUP], len: 0, records: u32::MAX };
        let mut order: Vec<usize> = (1..n).map(|k| (leader + k) % n).collect();
        // Stable: among equal weights the rotation after the leader stays.
        order.sort_by(|&a, &b| self.weight_of(b).total_cmp(&self.weight_of(a)));
        order.insert(0, leader);
        for (k, &j) in order.iter().enumerate() {
            if group.len == self.width {
                break;
            }
            let s = &self.lenders[j];
            if !s.is_alive() || s.full.load(Ordering::Acquire) {
                if k == 0 {
                    return None;
                }
                continue;
            }
            let grant = match lock(&s.control).alloc_slab() {
                Ok(g) => {
                    s.has_room();
                    g
                }
                Err(ClientError::CapacityExhausted { message, .. }) => {
                    s.mark_full(&message);
                    if k == 0 {
                        return None;
                    }
                    continue;
                }
                Err(ClientError::Refused { code: rdma::control::ErrorCode::ShuttingDown, .. }) => {
                    self.mark_leaving(j, None);
                    if k == 0 {
                        return None;
                    }
                    continue;
                }
                Err(e) => {
                    self.mark_failed(j, &e.to_string());
                    if k == 0 {
                        return None;
                    }
                    continue;
                }
            };
            let records = u32::try_from(grant.len / self.record_len()).unwrap_or(0).min(1 << SLOT_PAGE_BITS);
            group.records = group.records.min(records);
            let generation = s.generation.load(Ordering::Acquire);
            group.copies[group.len] =
                Slab { server: j, generation, slab_id: grant.slab_id, addr: grant.addr, rkey: grant.rkey };
            group.len += 1;
            tracing::debug!(server = %s.addr, slab = grant.slab_id, records, "slab allocated");
        }
        // A coded page needs its K data shards; the parity shards may come later (repair).
        let fewest = self.code.as_ref().map_or(1, super::coding::PageCode::data);
        let mut groups = self.groups.write().unwrap_or_else(PoisonError::into_inner);
        if group.len < fewest || group.records == 0 || groups.len() >= MAX_SLABS {
            drop(groups);
            self.give_back(&group);
            self.lenders[leader].mark_full("no slab group could be made there");
            return None;
        }
        if group.len < self.width && !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                lenders = group.len,
                wanted = self.width,
                "fewer live lenders with room than the redundancy asks for: new pages are less protected \
                 until more lenders have room"
            );
        }
        groups.push(group);
        Some(groups.len() - 1)
    }

    /// Frees the slabs of a group that will not be used.
    fn give_back(&self, group: &Group) {
        for slab in group.slabs() {
            let _ = lock(&self.lenders[slab.server].control).free_slab(slab.slab_id);
        }
    }

    /// Hands out again the parked slots whose group is whole now (after a repair or a revival).
    pub(super) fn unpark(&self) {
        let mut parked = lock(&self.parked);
        let mut waiting = Vec::new();
        for slot in parked.drain(..) {
            match self.locate(Slot(slot)) {
                Some(p) if self.healthy(&p) => lock(&self.lenders[p.copies()[0].lender].slots).free.push(slot),
                Some(_) => waiting.push(slot),
                None => {}
            }
        }
        *parked = waiting;
    }
}
