//! The endpoint's receive path against a scripted target on 127.0.0.1: READ payloads that arrive
//! in pieces, are cut off, or claim more than was asked for.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::ShimEndpoint;
use crate::frame::{encode_frame, read_frame};
use crate::region::{LocalRegion, LocalSlice};
use crate::wire::{decode_request, encode_completion, DataRequest, Opcode, RemoteStatus, KIND_DATA_CONNECT_OK};
use crate::{CompletionStatus, EndpointOptions, PollMode, Segment, TransportError, WorkRequest};

const PAGE: usize = 4096;

/// A target that accepts one data connection and hands each READ request (wr_id, payload length)
/// to `serve`, which answers on the stream as it likes.
fn scripted_target(
    serve: impl FnOnce(&mut TcpStream, Vec<(u64, usize)>) + Send + 'static,
    reads: usize,
) -> ShimEndpoint {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut body = Vec::new();
        read_frame(&mut stream, &mut body).expect("connect frame");
        let mut ok = Vec::new();
        encode_frame(&mut ok, KIND_DATA_CONNECT_OK, |_| {});
        stream.write_all(&ok).expect("connect reply");
        let mut requests = Vec::new();
        while requests.len() < reads {
            let header = read_frame(&mut stream, &mut body).expect("request");
            if let Ok(DataRequest::Read { wr_id, segments }) = decode_request(header.kind, &body) {
                requests.push((wr_id, segments.iter().map(|s| s.len as usize).sum()));
            }
        }
        serve(&mut stream, requests);
    });
    ShimEndpoint::connect(addr, 1, 2, &EndpointOptions::default()).expect("connect")
}

/// The bytes of a successful READ completion whose payload is `byte(i)` for its byte `i`.
fn completion(wr_id: u64, len: usize, byte: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    encode_completion(&mut out, wr_id, RemoteStatus::Success, Opcode::Read, len, |p| {
        for (i, b) in p.iter_mut().enumerate() {
            *b = byte(i);
        }
    });
    out
}

fn read_of(wr_id: u64, slices: &[(&Arc<LocalRegion>, usize, usize)]) -> WorkRequest {
    let segments = slices
        .iter()
        .map(|&(region, offset, len)| Segment {
            local: LocalSlice::new(region, offset, len).expect("slice"),
            remote_addr: 0,
            rkey: 1,
        })
        .collect();
    WorkRequest::read(wr_id, segments)
}

/// A target that answers a single READ with the bytes `reply(wr_id, length)` and then closes.
fn answering_once(reply: impl FnOnce(u64, usize) -> Vec<u8> + Send + 'static) -> ShimEndpoint {
    scripted_target(
        |stream, requests| {
            let (wr_id, len) = requests[0];
            stream.write_all(&reply(wr_id, len)).expect("send");
        },
        1,
    )
}

fn wait_one(ep: &ShimEndpoint) -> Result<crate::Completion, TransportError> {
    let mut out = Vec::new();
    let n = ep.wait(&mut out, 1, Duration::from_secs(10), PollMode::Block)?;
    assert_eq!(n, 1, "no completion within 10 s");
    Ok(out.remove(0))
}

#[test]
fn long_payloads_arriving_in_pieces_land_whole_between_short_ones() {
    let a = LocalRegion::new(64 * PAGE).expect("region");
    let b = LocalRegion::new(64 * PAGE).expect("region");
    let pattern = |wr_id: u64| move |i: usize| (i.wrapping_mul(7) as u64).wrapping_add(wr_id * 13).to_le_bytes()[0];
    let ep = scripted_target(
        move |stream, requests| {
            let mut all = Vec::new();
            for (wr_id, len) in requests {
                all.extend(completion(wr_id, len, pattern(wr_id)));
            }
            // Dribbled out in odd-sized pieces, so that frames and payloads split anywhere.
            for piece in all.chunks(3001) {
                stream.write_all(piece).expect("send");
                std::thread::sleep(Duration::from_micros(200));
            }
        },
        3,
    );
    // A long READ scattered over both regions, a short one, and another long one.
    let first = read_of(1, &[(&a, 0, 8 * PAGE), (&b, 3 * PAGE, 8 * PAGE), (&a, 20 * PAGE, 100)]);
    let second = read_of(2, &[(&b, 40 * PAGE, PAGE)]);
    let third = read_of(3, &[(&a, 30 * PAGE, 16 * PAGE)]);
    for wr in [&first, &second, &third] {
        ep.post(wr.wr_id, Some(wr)).expect("post");
    }
    for (wr, len) in [(&first, 16 * PAGE + 100), (&second, PAGE), (&third, 16 * PAGE)] {
        let c = wait_one(&ep).expect("completion");
        assert_eq!((c.wr_id, c.status, c.byte_len), (wr.wr_id, CompletionStatus::Success, len));
        let mut at = 0;
        for s in &wr.segments {
            let mut got = vec![0u8; s.local.len];
            s.local.region.read_at(s.local.offset, &mut got).expect("read back");
            let want: Vec<u8> = (at..at + s.local.len).map(pattern(wr.wr_id)).collect();
            assert!(got == want, "READ {} segment at byte {at} landed wrong", wr.wr_id);
            at += s.local.len;
        }
    }
}

#[test]
fn a_read_cut_off_mid_payload_completes_as_flushed() {
    let region = LocalRegion::new(16 * PAGE).expect("region");
    // The connection closes a third of the way into the frame.
    let ep = answering_once(|wr_id, len| {
        let frame = completion(wr_id, len, |_| 0xAB);
        frame[..frame.len() / 3].to_vec()
    });
    let wr = read_of(7, &[(&region, 0, 16 * PAGE)]);
    ep.post(7, Some(&wr)).expect("post");
    let c = wait_one(&ep).expect("a flushed completion, not an error");
    assert_eq!((c.wr_id, c.status), (7, CompletionStatus::Flushed));
    assert!(matches!(wait_one(&ep), Err(TransportError::Disconnected { .. })));
}

#[test]
fn a_payload_longer_than_the_request_breaks_the_connection_and_writes_nothing_past_it() {
    let region = LocalRegion::new(32 * PAGE).expect("region");
    // Twice the length asked for.
    let ep = answering_once(|wr_id, len| completion(wr_id, 2 * len, |_| 0xCD));
    let wr = read_of(9, &[(&region, 0, 16 * PAGE)]);
    ep.post(9, Some(&wr)).expect("post");
    let c = wait_one(&ep).expect("a flushed completion");
    assert_eq!((c.wr_id, c.status), (9, CompletionStatus::Flushed));
    let mut past = vec![0u8; 16 * PAGE];
    region.read_at(16 * PAGE, &mut past).expect("read");
    assert!(past.iter().all(|&b| b == 0), "bytes landed past the work request's buffer");
}
