//! Prints Coalesce lenders announced on the local network (mDNS) as they come and go, for SECS
//! seconds (default 10): `cargo run --release -p coalesce-discovery --example browse -- 30`.
use std::time::Duration;

use discovery::Source;

fn main() -> Result<(), discovery::DiscoveryError> {
    let browser = discovery::Browser::start()?;
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if let Some(e) = browser.next(Duration::from_millis(200)) {
            println!("{:?} {e:?}", std::time::SystemTime::now());
        }
    }
    Ok(())
}
