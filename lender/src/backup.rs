//! The backup tier's requests (`BACKUP_PUT`, `BACKUP_GET`, `BACKUP_SYNC`, `BACKUP_FORGET`),
//! served from the append-only log of `persist.rs` to the session's client id.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rdma::control::{BackupPage, ControlRequest, ControlResponse, ErrorCode};
use rdma::ids::short;

use crate::persist::{PageLog, PersistError};

/// The backup log of a `memory-server --persist`.
#[derive(Debug)]
pub(crate) struct Backups {
    log: Mutex<PageLog>,
}

fn failed(e: &PersistError) -> ControlResponse {
    ControlResponse::Error { code: ErrorCode::Other(100), message: format!("the backup log failed: {e}") }
}

impl Backups {
    pub(crate) fn new(log: PageLog) -> Self {
        Self { log: Mutex::new(log) }
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
