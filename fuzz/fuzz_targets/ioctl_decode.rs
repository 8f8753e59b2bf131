//! The ioctl argument decoder and the checks that run before any I/O:
//! arbitrary command numbers and payloads must decode or be refused,
//! never panic.
#![no_main]

use dmabuf_fs::tokens::Registry;
use dmabuf_fs::uapi::{self, Request};
use libfuzzer_sys::fuzz_target;

const COMMANDS: [u32; 7] = [
    uapi::IOC_REGISTER,
    uapi::IOC_UNREGISTER,
    uapi::IOC_READ_CMD,
    uapi::IOC_WRITE_CMD,
    uapi::IOC_INFO,
    uapi::IOC_STATS,
    uapi::IOC_BATCH,
];

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let raw = u32::from_le_bytes(*head);
    // The raw command, then the input as the payload of each known one.
    let cmds = std::iter::once(raw).chain(COMMANDS.iter().copied().filter(|_| raw & 1 == 1));
    for cmd in cmds {
        match uapi::decode(cmd, rest) {
            Ok(Request::Read(io)) => {
                let _ = Registry::request(&io, false);
            }
            Ok(Request::Write(io)) => {
                let _ = Registry::request(&io, true);
            }
            Ok(Request::Batch(b)) => {
                for op in b.ops.iter().take(b.count as usize) {
                    let _ = op.file_offset.checked_add(op.len);
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
});
