//! The backup tier's requests (`BACKUP_PUT`, `BACKUP_GET`, `BACKUP_SYNC`, `BACKUP_FORGET`),
//! served from the append-only log of `persist.rs` to the session's client id, and the expiry of
//! the backups of clients that are gone (`--backup-expiry`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdma::control::{BackupPage, ControlRequest, ControlResponse, ErrorCode};
use rdma::ids::short;

use crate::persist::{PageLog, PersistError};

/// The backup log of a `memory-server --persist`.
#[derive(Debug)]
pub(crate) struct Backups {
    log: Mutex<PageLog>,
    /// When each client with backups was last seen with a session (or the log was opened).
    seen: Mutex<HashMap<u64, Instant>>,
    /// Backups of a client unseen for this long are dropped.
    expiry: Duration,
    /// When the clients were last checked.
    checked: Mutex<Instant>,
}

fn failed(e: &PersistError) -> ControlResponse {
    ControlResponse::Error { code: ErrorCode::Other(100), message: format!("the backup log failed: {e}") }
}

impl Backups {
    pub(crate) fn new(log: PageLog, expiry: Duration) -> Self {
        Self { log: Mutex::new(log), seen: Mutex::new(HashMap::new()), expiry, checked: Mutex::new(Instant::now()) }
    }

    /// How often the clients are checked: a tenth of the expiry, between 1 s and 1 min (a check
    /// walks the whole index).
    fn check_period(&self) -> Duration {
        (self.expiry / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Drops the backups of every client that has had no session (`has_session`) for the
    /// expiry; clients are first seen when the log is opened or their backups are written.
    /// Checks at most once per [`Backups::check_period`] (from the reaper thread).
    pub(crate) fn expire(&self, now: Instant, has_session: impl Fn(u64) -> bool) {
        {
            let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
            if now.saturating_duration_since(*checked) < self.check_period() {
                return;
            }
            *checked = now;
        }
        let clients = self.log().clients();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|c, _| clients.contains(c));
        for client in clients {
            let last = seen.entry(client).or_insert(now);
            if has_session(client) {
                *last = now;
                continue;
            }
            let unseen = now.saturating_duration_since(*last);
            if unseen < self.expiry {
                continue;
            }
            match self.log().forget(client) {
                Ok(pages) => {
                    seen.remove(&client);
                    tracing::info!(
                        client = %short(client),
                        pages,
                        unseen = ?unseen,
                        "backups dropped: the client has had no session for --backup-expiry"
                    );
                }
                Err(e) => tracing::error!(client = %short(client), error = %e, "dropping expired backups failed"),
            }
        }
    }

    fn log(&self) -> MutexGuard<'_, PageLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves one backup request of `client`.
    pub(crate) fn handle(&self, client: u64, req: ControlRequest, peer: SocketAddr) -> ControlResponse {
        let outcome = match req {
            ControlRequest::BackupPut { pages } => self
                .log()
                .put(client, pages.iter().map(|p| (p.region, p.page, p.version, &p.data[..])))
                .map(|count| ControlResponse::BackupStored { count }),
            ControlRequest::BackupGet { region, page } => match self.log().get(client, region, page) {
                Ok(Some((version, data))) => {
                    Ok(ControlResponse::BackupPage(BackupPage { region, page, version, data }))
                }
                Ok(None) => Ok(ControlResponse::Error {
                    code: ErrorCode::NotFound,
                    message: format!("no backup of page {page} of region {region}"),
                }),
                Err(e) => Err(e),
            },
            ControlRequest::BackupSync => self.log().sync().map(|()| ControlResponse::BackupSynced),
            ControlRequest::BackupForget => self.log().forget(client).map(|pages| {
                tracing::info!(%peer, client = %short(client), pages, "client's backups dropped");
                ControlResponse::BackupForgotten { pages }
            }),
            _ => Ok(ControlResponse::Error { code: ErrorCode::BadRequest, message: "not a backup request".into() }),
        };
        outcome.unwrap_or_else(|e| {
            tracing::error!(%peer, client = %short(client), error = %e, "backup request failed");
            failed(&e)
        })
    }

    /// Syncs the log if pages have waited past the interval (from the reaper thread).
    pub(crate) fn sync_if_due(&self) {
        if let Err(e) = self.log().sync_if_due() {
            tracing::error!(error = %e, "syncing the backup log failed");
        }
    }

    /// Pages kept and bytes of the log.
    pub(crate) fn usage(&self) -> (u64, u64) {
        let log = self.log();
        (log.pages(), log.log_bytes())
    }
}
