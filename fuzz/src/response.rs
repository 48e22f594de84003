//! The daemon's answer as the plugin reads it. Input: the raw bytes read from the socket (an
//! HTTP/1.1 response, possibly cut short: the daemon may be killed mid-answer), parsed by
//! [`tether_api::client::parse_response`]; a body that parses is then read as the plugin does
//! (an ADD result rendered in every version, or the error body).

use tether_api::client::parse_response;
use tether_api::{CniResult, ErrorBody};
use tether_cni::plugin::{SUPPORTED, render};

/// One input.
pub fn one(data: &[u8]) {
    let Ok((status, body)) = parse_response(data) else {
        return;
    };
    assert!(body.len() <= data.len(), "a body longer than the answer");
    if status >= 400 {
        let _ = serde_json::from_slice::<ErrorBody>(&body);
        return;
    }
    if let Ok(r) = serde_json::from_slice::<CniResult>(&body) {
        for v in SUPPORTED {
            let out = render(v, &r);
            assert_eq!(out["ips"].as_array().map(Vec::len), Some(r.ips.len()));
        }
    }
}
