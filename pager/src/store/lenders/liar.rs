//! Finding the lender that lied about an erasure-coded page: a page rebuilt from K shards failed
//! authentication above (a sealing layer), which cannot say which shard was changed. Every
//! readable shard of the page is read again; the liar is the one shard whose removal makes all
//! the others agree (one codeword). With at least K + 2 shards readable (so M >= 2) a single
//! liar is always found; with fewer, no lender is blamed and the page fails loudly.

use std::sync::Arc;

use rdma::{LocalSlice, Segment};

use super::io::{add_to, Direction, Group, LenderIo};
use super::Places;
use crate::store::{Slot, TransferError};

impl LenderIo {
    /// A page rebuilt from the shards of `slot` failed authentication above: reads every
    /// readable shard of it and, if exactly one shard disagrees with the others, marks its
    /// lender failed. With fewer than K + 2 shards readable the liar cannot be told apart: the
    /// page then fails (loudly) and nobody is blamed.
    pub(super) fn find_liar(&mut self, slot: Slot, why: &str) {
        let Some(places) = self.store.locate(slot) else { return };
        // A lender this page was built from is dropped already (found on another page of the
        // batch): the page is read again without it.
        let built_from = self.coded.read_from.iter().rev().find(|(s, _)| *s == slot).map(|(_, l)| l.clone());
        if built_from.is_some_and(|lenders| lenders.iter().any(|&l| !self.reachable(l))) {
            return;
        }
        let code_shards = self.code().shards();
        let Some((stripe, present)) = self.read_stripe(&places) else { return };
        let code = self.store.code.as_ref().expect("coded I/O on a store without a code");
        let shard_len = code.shard_len();
        let readable: Vec<usize> = (0..code_shards).filter(|&s| present[s]).collect();
        let mut liars = Vec::new();
        if readable.len() >= code.data() + 2 {
            for &j in &readable {
                let mut without = stripe.clone();
                let mut have = present.clone();
                have[j] = false;
                without[j * shard_len..(j + 1) * shard_len].fill(0);
                if code.rebuild(&mut without, &have, true).is_ok() {
                    // Only the shards that were read are compared (the others were rebuilt).
                    let agree = readable.iter().filter(|&&s| s != j).all(|&s| {
                        without[s * shard_len..(s + 1) * shard_len] == stripe[s * shard_len..(s + 1) * shard_len]
                    });
                    if agree && code.consistent(&without) {
                        liars.push(j);
                    }
                }
            }
        }
        match liars.as_slice() {
            [j] => {
                let lender = places.at[*j].lender;
                let why = format!("{why}: its shard {j} of the page disagrees with the other shards");
                self.distrust_lender(lender, &why);
            }
            _ => tracing::error!(
                slot = slot.raw(),
                shards_read = readable.len(),
                "{why}, and the shards read do not tell which lender changed it; the page fails"
            ),
        }
    }

    /// Reads every shard of a page that can be read (all posted, all waited for).
    fn read_stripe(&mut self, places: &Places) -> Option<(Vec<u8>, Vec<bool>)> {
        let code = self.store.code.as_ref()?;
        let (n, shard_len, stripe_len) = (code.shards(), code.shard_len(), code.stripe_len());
        let area = self.area(stripe_len).ok()?;
        let region = Arc::clone(&self.coded.areas[area]);
        let mut groups: Vec<Group> = Vec::new();
        let mut shard_of = Vec::new();
        for (s, loc) in places.copies().iter().enumerate() {
            if !self.usable(loc) {
                continue;
            }
            let slice = LocalSlice::new(&region, s * shard_len, shard_len).ok()?;
            add_to(
                &mut groups,
                loc.lender,
                s,
                &mut vec![Segment { local: slice, remote_addr: loc.addr, rkey: loc.rkey }],
            );
            shard_of.push(s);
        }
        let mut out = vec![Ok(()); n];
        for s in (0..n).filter(|s| !shard_of.contains(s)) {
            out[s] = Err(TransferError::LenderDown);
        }
        let timeout = self.store.timeout;
        self.run(Direction::Read, groups, timeout, &mut out);
        let present: Vec<bool> = out.iter().map(Result::is_ok).collect();
        let mut stripe = vec![0u8; stripe_len];
        region.read_at(0, &mut stripe).ok()?;
        Some((stripe, present))
    }
}
