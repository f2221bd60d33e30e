//! Data-path requests (what a lender's target decodes) and completions (what a borrower's
//! endpoint decodes): any bytes decode or are refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let _ = rdma::wire::decode_request(kind, body);
    let _ = rdma::wire::decode_completion(body);
});
