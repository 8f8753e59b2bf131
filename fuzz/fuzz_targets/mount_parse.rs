//! Mount-time parsing: every decoder alone, then whole images (a small
//! valid filesystem with the input laid over its metadata, or appended to
//! its log as one correctly checksummed commit) through fsck and a
//! read-only mount that then reads everything. Nothing may panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use dmabuf_fs::blockdev::{BlockDevice, MemDevice};
use dmabuf_fs::format::{
    encode_commit, scan_log, CheckpointHeader, Record, Superblock, BLOCK_SIZE, LOG_START_BLOCK,
};
use dmabuf_fs::fs::{self, check, Caller, Fs, MountOptions, ROOT_INO};
use libfuzzer_sys::fuzz_target;

/// A 4 MiB filesystem with a few files, unmounted cleanly.
fn base() -> &'static (Vec<u8>, Superblock) {
    static BASE: OnceLock<(Vec<u8>, Superblock)> = OnceLock::new();
    BASE.get_or_init(|| {
        let dev = Arc::new(MemDevice::new(4 << 20));
        let root = Caller { uid: 0, gid: 0 };
        fs::format(dev.as_ref(), root).unwrap();
        let f = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, MountOptions::default()).unwrap();
        let d = f.mkdir(root, ROOT_INO, b"dir", 0o755).unwrap();
        let (a, fh) = f.create(root, d.ino, b"file", 0o644, true, true).unwrap();
        f.write(a.ino, 5000, &[7u8; 20000]).unwrap();
        f.release(fh).unwrap();
        f.symlink(root, ROOT_INO, b"link", b"dir/file").unwrap();
        f.unmount().unwrap();
        let img = dev.snapshot();
        let sb = fs::read_superblock(dev.as_ref()).unwrap();
        (img, sb)
    })
}

fn exercise(img: Vec<u8>) {
    let dev = Arc::new(MemDevice::from_bytes(img));
    let _ = check::fsck(dev.as_ref(), false);
    let opts = MountOptions {
        read_only: true,
        ..MountOptions::default()
    };
    let Ok(f) = Fs::mount(dev as Arc<dyn BlockDevice>, opts) else {
        return;
    };
    let mut stack = vec![ROOT_INO];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let mut kids = Vec::new();
        let _ = f.readdir(dir, 0, |e| {
            if e.name != b"." && e.name != b".." {
                kids.push(e.ino);
            }
            false
        });
        for ino in kids {
            seen += 1;
            if seen > 1000 {
                return;
            }
            if let Ok(a) = f.getattr(ino) {
                match a.kind {
                    fs::Kind::Dir => stack.push(ino),
                    fs::Kind::Symlink => {
                        let _ = f.readlink(ino);
                    }
                    _ => {
                        let _ = f.read(ino, 0, 1 << 16);
                        let _ = f.listxattr(ino);
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    let _ = CheckpointHeader::decode(data);
    let _ = Record::from_bytes(data);
    let _ = scan_log(data, 0, 1);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (img0, sb) = base();
    let mut img = img0.clone();
    let bs = BLOCK_SIZE as usize;
    match mode % 3 {
        // XOR the input over one metadata block.
        0 | 1 => {
            let Some((&which, rest)) = rest.split_first() else {
                return;
            };
            let block = match which % 4 {
                0 => 0,
                1 => 1 + (which as usize / 4) % 2,
                2 => LOG_START_BLOCK as usize,
                _ => sb.data_start() as usize + (which as usize / 4) % 4,
            };
            let at = block * bs;
            for (i, b) in rest.iter().take(bs).enumerate() {
                img[at + i] ^= b;
            }
        }
        // A checksummed log commit of records with arbitrary payloads
        // (2-byte lengths), replayed on top of the newest checkpoint.
        _ => {
            let epoch = (1..=2)
                .filter_map(|slot| {
                    CheckpointHeader::decode(&img[slot * bs..(slot + 1) * bs]).ok()
                })
                .map(|h| h.seq)
                .max()
                .unwrap_or(1);
            let mut records = Vec::new();
            let mut r = rest;
            while r.len() >= 2 {
                let n = (u16::from_le_bytes([r[0], r[1]]) as usize).min(r.len() - 2);
                records.push(r[2..2 + n].to_vec());
                r = &r[2 + n..];
            }
            let log = encode_commit(sb.salt(), epoch, 0, &records);
            let at = LOG_START_BLOCK as usize * bs;
            let n = log.len().min(sb.log_blocks as usize * bs);
            img[at..at + n].copy_from_slice(&log[..n]);
        }
    }
    exercise(img);
});
