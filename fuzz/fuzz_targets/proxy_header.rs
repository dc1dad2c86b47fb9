//! The PROXY protocol header codec on arbitrary bytes: it must never panic, and must give the same answer
//! whatever the pieces the header arrives in: Partial on every prefix shorter than a whole header, the same
//! header and length on the header alone, and never a whole header within bytes it refused.
#![no_main]

use anteroom::proxy_protocol::{parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Complete(header, len)) => {
            assert!(len > 0 && len <= data.len());
            assert_eq!(parse(&data[..len]), Ok(Parsed::Complete(header, len)));
            for cut in [0, 1, len / 2, len - 1] {
                assert_eq!(parse(&data[..cut.min(len - 1)]), Ok(Parsed::Partial));
            }
        }
        Ok(Parsed::Partial) => {
            for cut in [0, data.len() / 2] {
                assert_eq!(parse(&data[..cut]), Ok(Parsed::Partial));
            }
        }
        Err(_) => {
            // Refused: no prefix is a whole header either.
            let cut = data.len() / 2;
            assert!(!matches!(parse(&data[..cut]), Ok(Parsed::Complete(..))));
        }
    }
});
