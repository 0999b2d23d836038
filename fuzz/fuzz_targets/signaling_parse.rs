//! `signaling::protocol::parse_client` on arbitrary text: every frame a client sends on `/rtc`
//! goes through it before anything else looks at it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::protocol::{ClientMessage, ErrorCode, parse_client};

fuzz_target!(|text: &str| {
    match parse_client(text) {
        // What parsed must survive a round trip (the server echoes nothing back verbatim, but a
        // message that re-serializes to something else would mean two readings of one frame).
        Ok(m) => {
            let again = serde_json::to_string(&m).expect("a parsed message serializes");
            let back: ClientMessage = serde_json::from_str(&again).expect("and parses again");
            assert_eq!(back, m);
        }
        Err((code, message)) => {
            assert!(matches!(
                code,
                ErrorCode::Malformed | ErrorCode::UnknownType
            ));
            assert!(!message.is_empty());
        }
    }
});
