//! A thin, checked wrapper over the userfaultfd system call and its ioctls (API handshake,
//! register, COPY, WRITEPROTECT, WAKE, MOVE, POISON) and its message format.
//!
//! The `userfaultfd` crate lacks MOVE and POISON and folds EAGAIN from COPY into other errors, so
//! this module talks to the kernel directly: every `repr(C)` struct has a compile-time size check
//! against the kernel ABI, and every ioctl's errno is surfaced unchanged for the caller to act on
//! (EEXIST: already mapped, wake the waiter; EAGAIN: events pending, drain and retry).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

const UFFD_API: u64 = 0xAA;
const IOC_TYPE: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (IOC_TYPE << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_MOVE: u64 = ioc(IOC_READ | IOC_WRITE, 0x05, std::mem::size_of::<UffdioMove>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_POISON: u64 = ioc(IOC_READ | IOC_WRITE, 0x08, std::mem::size_of::<UffdioPoison>());
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0x00, 0);

/// Feature bits of the API handshake.
pub mod features {
    /// Fault messages say whether a fault is a write-protect fault.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `madvise(DONTNEED/REMOVE)` in a registered range is reported.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// `UFFDIO_POISON` is available.
    pub const POISON: u64 = 1 << 14;
    /// `UFFDIO_MOVE` is available.
    pub const MOVE: u64 = 1 << 16;
}

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const COPY_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}
#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

// The kernel ABI sizes (include/uapi/linux/userfaultfd.h); a mismatch would corrupt ioctls.
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioMove>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioPoison>() == 32);
/// Size of one `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// A message read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page aligned).
    Fault {
        /// Faulting page address.
        addr: usize,
        /// The access was a write.
        write: bool,
        /// The page was present but write-protected.
        wp: bool,
    },
    /// `[start, end)` was zapped by `madvise`: its content is zero from now on.
    Remove {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// An event this pager did not ask for.
    Other(u8),
}

impl Event {
    /// Decodes one raw message.
    pub fn decode(raw: &[u8; MSG_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        let addr = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        match raw[0] {
            EVENT_PAGEFAULT => {
                let flags = u64_at(8);
                Event::Fault {
                    addr: addr(u64_at(16)) & !(crate::PAGE_SIZE - 1),
                    write: flags & PAGEFAULT_FLAG_WRITE != 0,
                    wp: flags & PAGEFAULT_FLAG_WP != 0,
                }
            }
            EVENT_REMOVE => Event::Remove { start: addr(u64_at(8)), end: addr(u64_at(16)) },
            other => Event::Other(other),
        }
    }
}

/// Why a userfaultfd could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The process may not handle kernel-mode faults.
    #[error(
        "this process may not use userfaultfd for kernel-mode faults ({syscall}; /dev/userfaultfd: {device}). \
         Run as root, grant CAP_SYS_PTRACE (setcap cap_sys_ptrace+ep BINARY), give this user read/write \
         access to /dev/userfaultfd, or set sysctl vm.unprivileged_userfaultfd=1. Coalesce refuses to run in \
         user-mode-only mode, where read(2) into a paged-out buffer would fail."
    )]
    Denied {
        /// Error of the system call.
        syscall: io::Error,
        /// Error of the device.
        device: io::Error,
    },
    /// The kernel lacks a feature the pager needs.
    #[error("the kernel's userfaultfd lacks {missing} (available feature bits {available:#x}); Coalesce needs Linux 6.8 or later")]
    MissingFeatures {
        /// Names of the missing features.
        missing: String,
        /// What the kernel offers.
        available: u64,
    },
    /// Another failure.
    #[error("userfaultfd {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    available: u64,
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a non-blocking userfaultfd that handles kernel-mode faults too, and enables
    /// `wanted` features (all of which must be available).
    pub fn open(wanted: u64) -> Result<Self, OpenError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
        let rc = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if rc >= 0 {
            let raw = libc::c_int::try_from(rc).map_err(|_| OpenError::Io {
                context: "descriptor out of range",
                source: io::Error::from_raw_os_error(libc::EBADF),
            })?;
            // SAFETY: `raw` is a fresh descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        } else {
            let syscall = io::Error::last_os_error();
            Self::open_device(flags).map_err(|device| OpenError::Denied { syscall, device })?
        };
        let uffd = Self { fd, available: 0 };
        let mut api = UffdioApi { api: UFFD_API, features: wanted, ioctls: 0 };
        // SAFETY: UFFDIO_API with a valid, exclusively borrowed `uffdio_api` of the size encoded in
        // the request number.
        let rc = unsafe { libc::ioctl(uffd.raw(), UFFDIO_API, &mut api) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EINVAL) {
                // Ask what is available to name what is missing.
                let probe = Self::open(0).ok().map_or(0, |p| p.available);
                return Err(Self::missing(wanted, probe));
            }
            return Err(OpenError::Io { context: "API handshake", source });
        }
        if api.features & wanted != wanted {
            return Err(Self::missing(wanted, api.features));
        }
        Ok(Self { available: api.features, ..uffd })
    }

    fn missing(wanted: u64, available: u64) -> OpenError {
        let names = [
            (features::PAGEFAULT_FLAG_WP, "write-protect faults"),
            (features::EVENT_REMOVE, "remove events"),
            (features::POISON, "UFFDIO_POISON"),
            (features::MOVE, "UFFDIO_MOVE"),
        ];
        let missing: Vec<&str> =
            names.iter().filter(|(bit, _)| wanted & bit != 0 && available & bit == 0).map(|&(_, n)| n).collect();
        OpenError::MissingFeatures { missing: missing.join(", "), available }
    }

    fn open_device(flags: libc::c_int) -> io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its argument.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(rc) })
    }

    fn raw(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }

    /// Registers `[start, start + len)` for missing faults, and write-protect faults if `wp`.
    pub fn register(&self, start: usize, len: usize, wp: bool) -> io::Result<()> {
        let mode = REGISTER_MODE_MISSING | if wp { REGISTER_MODE_WP } else { 0 };
        let mut reg = UffdioRegister { range: range(start, len), mode, ioctls: 0 };
        // SAFETY: valid `uffdio_register` of the encoded size; the kernel checks the range itself.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER, &mut reg) })
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = range(start, len);
        // SAFETY: valid `uffdio_range` of the encoded size.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER, &mut r) })
    }

    /// Atomically installs a copy of `src` at the registered page `dst` and wakes its waiters.
    /// `wp` maps it write-protected. Errors: `EEXIST` (already mapped: wake instead), `EAGAIN`
    /// (events pending: read them, then retry).
    pub fn copy(&self, dst: usize, src: *const u8, len: usize, wp: bool) -> io::Result<()> {
        self.copy_run(dst, src, len, wp).map_err(|(e, _)| e)
    }

    /// Like [`Uffd::copy`] for a run of pages; on failure also returns how many bytes were copied
    /// before the error (those pages are installed).
    pub fn copy_run(&self, dst: usize, src: *const u8, len: usize, wp: bool) -> Result<(), (io::Error, usize)> {
        let mut c = UffdioCopy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: if wp { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        // SAFETY: as for `copy`: a valid `uffdio_copy`; the kernel reads `len` bytes at `src` with
        // copy_from_user and fails with EFAULT on a bad pointer.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_COPY, &mut c) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err((err, usize::try_from(c.copy).unwrap_or(0).min(len)));
        }
        Ok(())
    }

    /// Moves the pages at `[src, src + len)` (anywhere in this process) to `dst` (registered with
    /// this userfaultfd), leaving `src` unmapped, without any event. On failure also returns how
    /// many bytes were moved before the error.
    pub fn move_pages(&self, dst: usize, src: usize, len: usize) -> Result<(), (io::Error, usize)> {
        let mut m = UffdioMove { dst: dst as u64, src: src as u64, len: len as u64, mode: 0, moved: 0 };
        // SAFETY: valid `uffdio_move`; the kernel validates both ranges against this process's
        // mappings and fails cleanly on anything it cannot move.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_MOVE, &mut m) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return Err((err, usize::try_from(m.moved).unwrap_or(0).min(len)));
        }
        Ok(())
    }

    /// Sets or clears write protection on a range (clearing also wakes waiters).
    pub fn write_protect(&self, start: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut w =
            UffdioWriteprotect { range: range(start, len), mode: if protect { WRITEPROTECT_MODE_WP } else { 0 } };
        // SAFETY: valid `uffdio_writeprotect` of the encoded size.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_WRITEPROTECT, &mut w) })
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = range(start, len);
        // SAFETY: valid `uffdio_range` of the encoded size.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE, &mut r) })
    }

    /// Marks a range poisoned: every access raises SIGBUS until it is zapped; wakes waiters.
    pub fn poison(&self, start: usize, len: usize) -> io::Result<()> {
        let mut p = UffdioPoison { range: range(start, len), mode: 0, updated: 0 };
        // SAFETY: valid `uffdio_poison` of the encoded size.
        cvt(unsafe { libc::ioctl(self.raw(), UFFDIO_POISON, &mut p) })
    }

    /// Reads pending messages into `buf` without blocking; returns how many were read (0: none).
    pub fn read_events(&self, buf: &mut [[u8; MSG_SIZE]]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is an exclusively borrowed, writable buffer of `bytes` bytes.
        let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        Ok(usize::try_from(n).unwrap_or(0) / MSG_SIZE)
    }

    /// Waits until a message is pending or `timeout` passes.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.raw(), events: libc::POLLIN, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        match rc {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// True if the page at `addr` (page aligned, in this process) is mapped: a present page-table
/// entry (`mincore`). Has no side effect on the page.
pub fn is_mapped(addr: usize) -> io::Result<bool> {
    let mut v = 0u8;
    // SAFETY: mincore only reads page-table state for one page and writes one byte into `v`;
    // an address outside any mapping fails with ENOMEM instead of faulting.
    cvt(unsafe { libc::mincore(addr as *mut libc::c_void, crate::PAGE_SIZE, &mut v) })?;
    Ok(v & 1 != 0)
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range(start: usize, len: usize) -> UffdioRange {
    UffdioRange { start: start as u64, len: len as u64 }
}

/// A one-page parking place for taking a page out of a region without an event: the page is
/// moved here (`UFFDIO_MOVE`, whose destination must be registered with a userfaultfd: this one
/// has its own, which nobody reads) and dropped at once.
#[derive(Debug)]
pub(crate) struct Scratch {
    uffd: Uffd,
    page: memmap2::MmapMut,
}

impl Scratch {
    pub(crate) fn new() -> io::Result<Self> {
        let uffd = Uffd::open(0).map_err(io::Error::other)?;
        let page = memmap2::MmapOptions::new().len(crate::PAGE_SIZE).map_anon()?;
        uffd.register(page.as_ptr() as usize, crate::PAGE_SIZE, false)?;
        Ok(Self { uffd, page })
    }

    /// Takes the page at `addr` out of its region and drops it. Returns whether a page was
    /// mapped there (`false`: nothing to take, `ENOENT`).
    pub(crate) fn take_out(&self, addr: usize) -> io::Result<bool> {
        let dst = self.page.as_ptr() as usize;
        let mut tries = 0;
        let result = loop {
            match self.uffd.move_pages(dst, addr, crate::PAGE_SIZE) {
                Err((e, _)) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 1000 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                other => break other,
            }
        };
        let taken = match result {
            Ok(()) => true,
            Err((e, _)) if e.raw_os_error() == Some(libc::ENOENT) => false,
            Err((e, _)) => return Err(e),
        };
        // SAFETY: the scratch page is this struct's own mapping; nothing references its bytes.
        let rc = unsafe { libc::madvise(self.page.as_ptr().cast_mut().cast(), crate::PAGE_SIZE, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(taken)
    }
}
