//! Completion events: how a blocking wait sleeps until its completion queue has something instead
//! of polling it on a timer. The queue is armed (`ibv_req_notify_cq`: one event at its next
//! completion), polled once more (a completion that came before the arming raises no event), and
//! the wait sleeps in `ppoll` on the completion channel's descriptor until the event or its
//! deadline. Events are taken and acknowledged as soon as they are seen (a queue cannot be
//! destroyed while any is unacknowledged); the descriptor is non-blocking, so several threads may
//! wait on one queue.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionChannel, CompletionQueue};
use sideway::ibverbs::device_context::DeviceContext;

/// A completion channel with its descriptor made non-blocking.
#[derive(Debug)]
pub(super) struct CompletionEvents {
    channel: Arc<CompletionChannel>,
}

impl CompletionEvents {
    /// A new channel on `ctx`.
    pub(super) fn new(ctx: &Arc<DeviceContext>) -> io::Result<Self> {
        let channel = CompletionChannel::new(ctx).map_err(io::Error::other)?;
        channel.set_nonblocking(true)?;
        Ok(Self { channel })
    }

    /// The channel, for the completion queue to be created with.
    pub(super) fn channel(&self) -> &Arc<CompletionChannel> {
        &self.channel
    }

    /// The channel's descriptor: readable once an event is waiting.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor belongs to the channel, which `self` keeps open for the borrow.
        unsafe { BorrowedFd::borrow_raw(self.channel.as_raw_fd()) }
    }

    /// Takes and acknowledges every event already waiting, then asks for one at `cq`'s next
    /// completion. `cq` must have been created with this channel.
    pub(super) fn arm(&self, cq: &BasicCompletionQueue) -> io::Result<()> {
        while self.take()? {}
        // SAFETY: `cq` is a live completion queue (borrowed for the call) created with this
        // channel; arming only asks the provider for an event.
        let rc = unsafe { rdma_mummy_sys::ibv_req_notify_cq(cq.cq().as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Sleeps until an event is waiting or `timeout` passes (a signal ends it early), then takes
    /// the events that came; true if one did.
    pub(super) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut any = false;
        if crate::sys::wait_fd(self.fd(), false, timeout)? {
            while self.take()? {
                any = true;
            }
        }
        Ok(any)
    }

    /// Takes and acknowledges one waiting event; false when none is waiting.
    fn take(&self) -> io::Result<bool> {
        let mut cq: *mut rdma_mummy_sys::ibv_cq = std::ptr::null_mut();
        let mut context: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: the channel is live (held by `self`) and its descriptor non-blocking, so the
        // call returns at once; it writes only the two out-pointers, which are valid locals.
        let rc =
            unsafe { rdma_mummy_sys::ibv_get_cq_event(self.channel.comp_channel().as_ptr(), &mut cq, &mut context) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(err),
            };
        }
        // SAFETY: `cq` is the queue the event came from: created with this channel and alive
        // (a queue holds its channel, and its owner arms and waits only while holding the queue).
        unsafe { rdma_mummy_sys::ibv_ack_cq_events(cq, 1) };
        Ok(true)
    }
}
