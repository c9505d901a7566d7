//! Any line a control client sends must parse into a named command or into the refusal it
//! is answered with; never panic.
#![no_main]

use common::control::parse_command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_command(line) {
        Ok((name, cmd)) => assert_eq!(cmd["cmd"].as_str(), Some(name.as_str())),
        Err(refusal) => assert!(refusal["error"].is_string()),
    }
});
