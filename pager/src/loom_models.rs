//! Loom models of the page-table lock and the budget: every interleaving (within loom's bounds)
//! of the real code, not a copy of it. Run with
//! `RUSTFLAGS="--cfg coalesce_loom" cargo test -p coalesce-pager --release --lib loom`
//! (CI does; a separate target directory keeps the normal build's cache).

use loom::sync::Arc;
use loom::thread;

use crate::budget::Budget;
use crate::history::Transition;
use crate::store::Slot;
use crate::table::PageTable;

/// Two threads each lock a page and bump a counter kept in its slot bits: the `BUSY` lock
/// excludes, so no increment is lost.
#[test]
fn loom_the_page_lock_excludes() {
    loom::model(|| {
        let t = Arc::new(PageTable::new(1).expect("table"));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    let e = t.lock(0);
                    let n = e.slot().map_or(0, Slot::raw) + 1;
                    t.unlock(0, e.with_slot(Slot::from_raw(n)), Transition::NotInstalled);
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(t.load(0).slot(), Some(Slot::from_raw(2)));
    });
}

/// A remove event's marks set while a fault holds the page survive the fault's unlock, whatever
/// the order: the discard is never forgotten.
#[test]
fn loom_remove_marks_survive_a_concurrent_unlock() {
    loom::model(|| {
        let t = Arc::new(PageTable::new(1).expect("table"));
        let fault = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                let e = t.lock(0);
                t.unlock(0, e.installed(true), Transition::Fetched);
            })
        };
        let reader = {
            let t = Arc::clone(&t);
            thread::spawn(move || t.begin_discard(0))
        };
        fault.join().expect("fault");
        reader.join().expect("reader");
        let e = t.load(0);
        assert!(e.remove_unhandled() && e.discard_pending(), "the marks were lost: {e}");
        assert!(e.is_resident() && e.is_dirty());
    });
}

/// Concurrent reservations never take the resident count past the limit, and every page given
/// back is accounted for.
#[test]
fn loom_reservations_never_exceed_the_budget() {
    loom::model(|| {
        let b = Arc::new(Budget::new(3, 1, 3));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = Arc::clone(&b);
                thread::spawn(move || {
                    if b.take(2) {
                        assert!(b.resident() <= 3, "over budget: {}", b.resident());
                        b.give_back(2);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(b.resident(), 0);
        assert!(b.peak() <= 3);
    });
}
