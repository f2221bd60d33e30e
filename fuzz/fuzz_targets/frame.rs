//! Frames read from a byte stream: headers and bodies, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let mut body = Vec::new();
    // Read frames until the bytes run out or one is refused; none may panic or over-allocate.
    while let Ok(header) = rdma::frame::read_frame_within(&mut input, &mut body, 1 << 20) {
        assert_eq!(body.len(), header.body_len as usize);
    }
});
