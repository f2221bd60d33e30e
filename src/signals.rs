//! Signal forwarding for `coalesce run`: a SIGTERM, SIGINT, SIGHUP or SIGQUIT sent to the runner
//! goes on to the program it runs, so that stopping the runner stops the program (instead of
//! leaving it to die later of SIGBUS when the runner's embedded lender goes away). Signals the
//! terminal sends (Ctrl-C) reach the program by themselves, through its process group: those are
//! not sent twice.

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::{Handle, SignalsInfo};

/// Starts forwarding to `pid`; close the returned handle once the program has exited.
pub fn forward_to(pid: libc::pid_t) -> std::io::Result<Handle> {
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT])?;
    let handle = signals.handle();
    std::thread::Builder::new().name("forward-signals".into()).spawn(move || {
        for origin in signals.forever() {
            // Sent by a process (kill), not by the kernel for the terminal.
            if origin.process.is_none() {
                continue;
            }
            tracing::debug!(signal = origin.signal, pid, "forwarding a signal to the program");
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our child, not yet
            // reaped (the runner closes this forwarding before it reaps it).
            unsafe { libc::kill(pid, origin.signal) };
        }
    })?;
    Ok(handle)
}
