//! The backup tier's storage (`memory-server --persist DIR`): an append-only log of pages in
//! `DIR/pages.log`, with an index in memory of the newest version of every (client, region,
//! page).
//!
//! Record layout (little-endian): magic `u32` ("CPLG"), body length `u32`, CRC-32 of the body
//! `u32`, then the body: client id `u64`, region `u32`, page `u32`, version `u32`, data. A record
//! whose region is [`FORGET_REGION`] is a tombstone: every record of that client before it is
//! dead.
//!
//! Durability: a record is written to the file (the OS page cache) before its put is answered,
//! so a killed server loses nothing; the file is fsynced at every `BACKUP_SYNC` (a client's
//! checkpoint) and at most every [`PageLog::sync_interval`] otherwise, so a machine crash loses
//! at most that much.
//!
//! Opening replays the log: every record's checksum is verified. A record cut short at the end
//! (a torn write: the server died while appending) is dropped and the file truncated to the last
//! whole record. A whole record that fails its checksum is skipped and counted. When dead
//! records (older versions, forgotten clients) outweigh live ones, the log is compacted: the live
//! records are copied to a new file, fsynced, and renamed over the old one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: u32 = u32::from_le_bytes(*b"CPLG");
const HEADER: usize = 12;
const KEY: usize = 20;
/// Longest record body accepted when replaying (a page with its tag is far smaller).
const MAX_BODY: usize = KEY + 64 * 1024;
/// The log is compacted when dead bytes pass this and the live bytes.
const COMPACT_MIN_DEAD: u64 = 64 << 20;

/// The region id of a tombstone record.
pub const FORGET_REGION: u32 = u32::MAX;

/// Why the backup log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The directory or log file could not be opened, read or written.
    #[error("backup log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Where the newest version of one page is in the log.
#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
    version: u32,
}

/// What a replay found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Records read whose checksum held.
    pub records: u64,
    /// Pages live after the replay.
    pub pages: u64,
    /// Whole records whose checksum failed (skipped).
    pub corrupt: u64,
    /// Bytes of a record cut short at the end (dropped).
    pub torn_bytes: u64,
}

/// The append-only page log and its index.
#[derive(Debug)]
pub struct PageLog {
    dir: PathBuf,
    file: File,
    end: u64,
    index: HashMap<(u64, u32, u32), Entry>,
    live_bytes: u64,
    dead_bytes: u64,
    last_sync: Instant,
    dirty: bool,
    sync_interval: Duration,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io { path: path.to_path_buf(), source }
}

impl PageLog {
    /// Opens (or creates) the log in `dir` and replays it.
    pub fn open(dir: &Path, sync_interval: Duration) -> Result<(Self, Replay), PersistError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join("pages.log");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            file,
            end: 0,
            index: HashMap::new(),
            live_bytes: 0,
            dead_bytes: 0,
            last_sync: Instant::now(),
            dirty: false,
            sync_interval,
        };
        let replay = log.replay().map_err(io_err(&path))?;
        Ok((log, replay))
    }

    /// How long a stored page may wait for its fsync when no client asks for one.
    pub fn sync_interval(&self) -> Duration {
        self.sync_interval
    }

    fn path(&self) -> PathBuf {
        self.dir.join("pages.log")
    }

    fn replay(&mut self) -> io::Result<Replay> {
        let mut replay = Replay::default();
        let len = self.file.metadata()?.len();
        let file = self.file.try_clone()?;
        let mut reader = io::BufReader::with_capacity(1 << 20, file);
        reader.seek(SeekFrom::Start(0))?;
        let mut offset = 0u64;
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; HEADER];
            let got = read_full(&mut reader, &mut head)?;
            if got == 0 {
                break;
            }
            let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let body_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let crc = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
            if got < HEADER || magic != MAGIC || !(KEY..=MAX_BODY).contains(&body_len) {
                // A header cut short or not a header at all: nothing after it can be trusted
                // to be aligned; drop the tail.
                break;
            }
            body.resize(body_len, 0);
            if read_full(&mut reader, &mut body)? < body_len {
                break;
            }
            let record_len = (HEADER + body_len) as u64;
            if crc32fast::hash(&body) == crc {
                replay.records += 1;
                self.index_record(&body, offset, record_len);
            } else {
                replay.corrupt += 1;
                self.dead_bytes += record_len;
            }
            offset += record_len;
        }
        if offset < len {
            replay.torn_bytes = len - offset;
            self.file.set_len(offset)?;
            self.file.sync_all()?;
        }
        self.end = offset;
        replay.pages = self.index.len() as u64;
        Ok(replay)
    }

    /// Updates the index with the record at `offset` (whose body is `body`).
    fn index_record(&mut self, body: &[u8], offset: u64, record_len: u64) {
        let client = u64::from_le_bytes(body[0..8].try_into().unwrap_or([0; 8]));
        let region = u32::from_le_bytes(body[8..12].try_into().unwrap_or([0; 4]));
        let page = u32::from_le_bytes(body[12..16].try_into().unwrap_or([0; 4]));
        let version = u32::from_le_bytes(body[16..20].try_into().unwrap_or([0; 4]));
        if region == FORGET_REGION {
            self.forget_index(client);
            self.dead_bytes += record_len;
            return;
        }
        let len = u32::try_from(record_len).unwrap_or(u32::MAX);
        match self.index.get_mut(&(client, region, page)) {
            Some(e) if e.version > version => self.dead_bytes += record_len,
            Some(e) => {
                self.dead_bytes += u64::from(e.len);
                self.live_bytes = self.live_bytes + record_len - u64::from(e.len);
                *e = Entry { offset, len, version };
            }
            None => {
                self.live_bytes += record_len;
                self.index.insert((client, region, page), Entry { offset, len, version });
            }
        }
    }

    fn forget_index(&mut self, client: u64) {
        let (live, dead) = (&mut self.live_bytes, &mut self.dead_bytes);
        self.index.retain(|&(c, _, _), e| {
            if c == client {
                *live -= u64::from(e.len);
                *dead += u64::from(e.len);
            }
            c != client
        });
    }

    /// Appends records for `pages` of `client` (region, page, version, data); a page older than
    /// the version kept is stored but stays dead.
    pub fn put<'a>(
        &mut self,
        client: u64,
        pages: impl IntoIterator<Item = (u32, u32, u32, &'a [u8])>,
    ) -> Result<u32, PersistError> {
        let mut buf = Vec::new();
        let mut records = Vec::new();
        for (region, page, version, data) in pages {
            let start = buf.len();
            encode_record(&mut buf, client, region, page, version, data);
            records.push((start, buf.len() - start));
        }
        self.append(&buf, &records)?;
        self.maybe_compact()?;
        Ok(u32::try_from(records.len()).unwrap_or(u32::MAX))
    }

    fn append(&mut self, buf: &[u8], records: &[(usize, usize)]) -> Result<(), PersistError> {
        let path = self.path();
        self.file.write_all_at(buf, self.end).map_err(io_err(&path))?;
        for &(start, len) in records {
            let body = &buf[start + HEADER..start + len];
            self.index_record(body, self.end + start as u64, len as u64);
        }
        self.end += buf.len() as u64;
        self.dirty = true;
        if self.last_sync.elapsed() >= self.sync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// The newest version of a page of `client`: (version, data).
    pub fn get(&self, client: u64, region: u32, page: u32) -> Result<Option<(u32, Vec<u8>)>, PersistError> {
        let Some(e) = self.index.get(&(client, region, page)) else { return Ok(None) };
        let mut record = vec![0u8; e.len as usize];
        let path = self.path();
        self.file.read_exact_at(&mut record, e.offset).map_err(io_err(&path))?;
        // Checked again: the disk may have changed under the index.
        let crc = u32::from_le_bytes([record[8], record[9], record[10], record[11]]);
        if crc32fast::hash(&record[HEADER..]) != crc {
            return Err(PersistError::Io {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, "a stored record failed its checksum"),
            });
        }
        Ok(Some((e.version, record[HEADER + KEY..].to_vec())))
    }

    /// The clients with pages kept.
    pub fn clients(&self) -> std::collections::HashSet<u64> {
        self.index.keys().map(|&(c, _, _)| c).collect()
    }

    /// Drops every page of `client` (a tombstone is appended); returns how many.
    pub fn forget(&mut self, client: u64) -> Result<u64, PersistError> {
        let pages = self.index.keys().filter(|&&(c, _, _)| c == client).count() as u64;
        let mut buf = Vec::new();
        encode_record(&mut buf, client, FORGET_REGION, 0, 0, &[]);
        let len = buf.len();
        self.append(&buf, &[(0, len)])?;
        self.maybe_compact()?;
        Ok(pages)
    }

    /// Makes every record written so far durable.
    pub fn sync(&mut self) -> Result<(), PersistError> {
        if self.dirty {
            let path = self.path();
            self.file.sync_data().map_err(io_err(&path))?;
            self.dirty = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Syncs if records have waited longer than the interval (called from the reaper).
    pub fn sync_if_due(&mut self) -> Result<(), PersistError> {
        if self.dirty && self.last_sync.elapsed() >= self.sync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Pages kept (live).
    pub fn pages(&self) -> u64 {
        self.index.len() as u64
    }

    /// Bytes of the log file.
    pub fn log_bytes(&self) -> u64 {
        self.end
    }

    fn maybe_compact(&mut self) -> Result<(), PersistError> {
        if self.dead_bytes < COMPACT_MIN_DEAD.max(self.live_bytes) {
            return Ok(());
        }
        self.compact()
    }

    /// Copies the live records to a new log and renames it over the old one.
    pub fn compact(&mut self) -> Result<(), PersistError> {
        let tmp = self.dir.join("pages.log.compact");
        let mut out = io::BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        let mut entries: Vec<((u64, u32, u32), Entry)> = self.index.iter().map(|(k, e)| (*k, *e)).collect();
        entries.sort_by_key(|(_, e)| e.offset);
        let mut offset = 0u64;
        let mut record = Vec::new();
        let path = self.path();
        for (_, e) in &mut entries {
            record.resize(e.len as usize, 0);
            self.file.read_exact_at(&mut record, e.offset).map_err(io_err(&path))?;
            out.write_all(&record).map_err(io_err(&tmp))?;
            e.offset = offset;
            offset += u64::from(e.len);
        }
        let file = out.into_inner().map_err(|e| PersistError::Io { path: tmp.clone(), source: e.into_error() })?;
        file.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err(&self.dir))?;
        let before = self.end;
        self.file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        self.index = entries.into_iter().collect();
        self.end = offset;
        self.live_bytes = offset;
        self.dead_bytes = 0;
        self.dirty = false;
        tracing::info!(before, after = offset, pages = self.index.len(), "backup log compacted");
        Ok(())
    }
}

fn encode_record(buf: &mut Vec<u8>, client: u64, region: u32, page: u32, version: u32, data: &[u8]) {
    let mut body = Vec::with_capacity(KEY + data.len());
    body.extend_from_slice(&client.to_le_bytes());
    body.extend_from_slice(&region.to_le_bytes());
    body.extend_from_slice(&page.to_le_bytes());
    body.extend_from_slice(&version.to_le_bytes());
    body.extend_from_slice(data);
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        vec![seed; 4112]
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("coalesce-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn pages_survive_a_reopen_and_the_newest_version_wins() {
        let d = dir("reopen");
        let (mut log, replay) = PageLog::open(&d, Duration::from_secs(1)).unwrap();
        assert_eq!(replay, Replay::default());
        let (a, b, c) = (page(1), page(2), page(3));
        log.put(7, [(0, 1, 1, &a[..]), (0, 2, 1, &b[..])]).unwrap();
        log.put(7, [(0, 1, 2, &c[..])]).unwrap();
        log.put(7, [(0, 2, 0, &c[..])]).unwrap(); // older than the one kept: stays dead
        log.put(9, [(0, 1, 5, &a[..])]).unwrap();
        drop(log);
        let (mut log, replay) = PageLog::open(&d, Duration::from_secs(1)).unwrap();
        assert_eq!((replay.records, replay.pages, replay.corrupt, replay.torn_bytes), (5, 3, 0, 0));
        assert_eq!(log.get(7, 0, 1).unwrap(), Some((2, c.clone())));
        assert_eq!(log.get(7, 0, 2).unwrap(), Some((1, b.clone())));
        assert_eq!(log.get(9, 0, 1).unwrap(), Some((5, a.clone())));
        assert_eq!(log.get(7, 1, 1).unwrap(), None);
        assert_eq!(log.forget(7).unwrap(), 2);
        assert_eq!(log.get(7, 0, 1).unwrap(), None);
        log.compact().unwrap();
        assert_eq!(log.get(9, 0, 1).unwrap(), Some((5, a.clone())));
        drop(log);
        let (log, replay) = PageLog::open(&d, Duration::from_secs(1)).unwrap();
        assert_eq!((replay.records, replay.pages), (1, 1), "only the live record is left after compaction");
        assert_eq!(log.get(9, 0, 1).unwrap(), Some((5, a)));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_a_corrupt_record_skipped() {
        let d = dir("torn");
        let (mut log, _) = PageLog::open(&d, Duration::from_secs(1)).unwrap();
        for p in 0..3 {
            log.put(1, [(0, p, 1, &page(p as u8)[..])]).unwrap();
        }
        drop(log);
        let path = d.join("pages.log");
        let record = (HEADER + KEY + 4112) as u64;
        // Flip a byte in the middle record's data, and leave half a record at the end.
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, record + 100).unwrap();
        file.write_all_at(&[byte[0] ^ 1], record + 100).unwrap();
        let mut half = Vec::new();
        encode_record(&mut half, 1, 0, 9, 1, &page(9));
        file.write_all_at(&half[..half.len() / 2], 3 * record).unwrap();
        drop(file);
        let (log, replay) = PageLog::open(&d, Duration::from_secs(1)).unwrap();
        assert_eq!(replay.records, 2);
        assert_eq!(replay.corrupt, 1);
        assert_eq!(replay.torn_bytes, half.len() as u64 / 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * record, "the torn tail is cut off");
        assert_eq!(log.get(1, 0, 0).unwrap(), Some((1, page(0))));
        assert_eq!(log.get(1, 0, 1).unwrap(), None, "the corrupt record is never served");
        assert_eq!(log.get(1, 0, 2).unwrap(), Some((1, page(2))));
        let _ = std::fs::remove_dir_all(&d);
    }
}
