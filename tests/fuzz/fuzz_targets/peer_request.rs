//! Any request line through the peer's request parser: a request it accepts names a single
//! safe file name; anything else is refused with a code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::peer::server::parse_request;
use shoal::protocol::validate_name;

fuzz_target!(|line: &[u8]| {
    match parse_request(line, Some("secret")) {
        Ok(req) => {
            assert!(validate_name(req.file()).is_ok());
            assert_eq!(req.secret(), Some("secret"));
        }
        Err((_, refusal)) => assert!(!refusal.message.is_empty()),
    }
});
