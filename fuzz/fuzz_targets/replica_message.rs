//! `ReplicaMessage::from_bytes` on arbitrary bytes: never panics, and whatever it accepts is the
//! canonical encoding of the value it returns (re-encoding gives the same bytes, which decode to
//! the same value).

#![no_main]

use kmmr_protocol::wire::codec::{Decode, Encode};
use kmmr_protocol::wire::messages::ReplicaMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = ReplicaMessage::from_bytes(data) else {
        return;
    };
    let again = msg.to_bytes();
    let back = ReplicaMessage::from_bytes(&again).expect("a re-encoded message decodes");
    assert_eq!(back, msg, "re-encoding changed the message");
    assert_eq!(again, data, "accepted a non-canonical encoding of {msg:?}");
    let _ = msg.kind();
});
