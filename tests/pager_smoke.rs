#![allow(missing_docs, clippy::unwrap_used)]
mod common;
use coalesce_pager::{Pager, PagerConfig, RegionOptions};
use common::ServerProcess;

#[test]
fn smoke() {
    let server = ServerProcess::start(&["--capacity", "256MiB", "--slab-size", "16MiB"]);
    let pager = Pager::new(PagerConfig::new(vec![server.addr], 4 << 20)).unwrap();
    let mut region = pager.map(32 << 20, RegionOptions::default()).unwrap();
    let s = region.as_mut_slice();
    let pages = s.len() / 4096;
    for p in 0..pages {
        s[p * 4096..p * 4096 + 8].copy_from_slice(&(p as u64 * 7 + 1).to_le_bytes());
    }
    eprintln!("after write:\n{}", pager.stats());
    for p in 0..pages {
        let v = u64::from_le_bytes(s[p * 4096..p * 4096 + 8].try_into().unwrap());
        assert_eq!(v, p as u64 * 7 + 1, "page {p}");
    }
    eprintln!("after read:\n{}", pager.stats());
}
