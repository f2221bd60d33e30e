//! Control messages: any kind and body decodes or is refused; what decodes re-encodes to a frame
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rdma::control::{decode_request, decode_response, encode_request, encode_response};
use rdma::frame::HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    if let Ok(req) = decode_request(kind, body) {
        let mut out = Vec::new();
        encode_request(&mut out, &req);
        assert_eq!(decode_request(out[5], &out[HEADER_LEN..]).ok(), Some(req));
    }
    if let Ok(resp) = decode_response(kind, body) {
        let mut out = Vec::new();
        encode_response(&mut out, &resp);
        assert_eq!(decode_response(out[5], &out[HEADER_LEN..]).ok(), Some(resp));
    }
});
