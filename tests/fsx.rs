//! A randomized model checker in the spirit of xfstests' fsx: random
//! operations on one mounted file (write, read, mmap read/write,
//! truncate, fallocate modes, punch hole, copy_file_range, token
//! READ/WRITE, remount), each checked against an in-memory model.
//!
//! On a mismatch it prints the seed and the op log that reproduces it.
//! CI runs a fixed number of ops for several seeds; for long runs:
//! `FSX_OPS=1000000 FSX_SEEDS=1 FSX_SEED=42 cargo test --release --test fsx -- --nocapture`
//! (`scripts/fsx` wraps that).

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::{Image, Mounted, Rng};
use dmabuf_fs::client::{sealed_memfd, TokenFile};

const MAX_LEN: u64 = 1 << 20; // file size the ops stay around
const MAX_OP: u64 = 96 << 10; // bytes one op touches at most

struct Fsx {
    seed: u64,
    rng: Rng,
    model: Vec<u8>,
    log: Vec<String>,
    m: Mounted,
    file: File,
    other: File,
    token: Option<(TokenFile, File, u64)>,
}

impl Fsx {
    fn new(m: Mounted, seed: u64) -> Self {
        let file = Self::open(&m, "fsx.file");
        let other = Self::open(&m, "fsx.other");
        Self {
            seed,
            rng: Rng::new(seed),
            model: Vec::new(),
            log: Vec::new(),
            m,
            file,
            other,
            token: None,
        }
    }

    fn open(m: &Mounted, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.join(name))
            .unwrap()
    }

    fn fail(&self, what: &str) -> ! {
        let start = self.log.len().saturating_sub(40);
        panic!(
            "fsx seed {}: {what}\nlast ops (of {}):\n{}",
            self.seed,
            self.log.len(),
            self.log[start..].join("\n")
        );
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let base = self.rng.next();
        for (i, b) in v.iter_mut().enumerate() {
            *b = (base.wrapping_add(i as u64 * 0x9E37) >> 13) as u8 | 1;
        }
        v
    }

    fn model_write(&mut self, off: u64, data: &[u8]) {
        let end = off as usize + data.len();
        if self.model.len() < end {
            self.model.resize(end, 0);
        }
        self.model[off as usize..end].copy_from_slice(data);
    }

    fn check_range(&self, off: u64, got: &[u8], what: &str) {
        let size = self.model.len() as u64;
        let want_len = size.saturating_sub(off).min(got.len() as u64) as usize;
        let want = &self.model[(off as usize).min(self.model.len())..][..want_len];
        if &got[..want_len.min(got.len())] != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            self.fail(&format!(
                "{what}: byte {} is {:#x}, model says {:#x}",
                off + i as u64,
                got.get(i).copied().unwrap_or(0),
                want.get(i).copied().unwrap_or(0)
            ));
        }
    }

    fn check_all(&self, what: &str) {
        let size = self.file.metadata().unwrap().len();
        if size != self.model.len() as u64 {
            self.fail(&format!("{what}: size {size}, model {}", self.model.len()));
        }
        let mut buf = vec![0u8; size as usize];
        self.file.read_exact_at(&mut buf, 0).unwrap();
        self.check_range(0, &buf, what);
    }

    fn token(&mut self) -> (u64, File) {
        if self.token.is_none() {
            let tf = TokenFile::from_file(self.file.try_clone().unwrap());
            let buf = sealed_memfd("fsx", MAX_OP + 8192).unwrap();
            let id = tf.register(&buf, 0, 0).unwrap().leak();
            self.token = Some((tf, buf, id));
        }
        let (_, buf, id) = self.token.as_ref().unwrap();
        (*id, buf.try_clone().unwrap())
    }

    fn step(&mut self) {
        if std::env::var_os("FSX_TRACE").is_some() {
            if let Some(l) = self.log.last() {
                eprintln!("fsx: {l}");
            }
        }
        let size = self.model.len() as u64;
        let off = self.rng.below(MAX_LEN);
        let len = 1 + self.rng.below(MAX_OP);
        match self.rng.below(13) {
            0..=2 => {
                let d = self.data(len as usize);
                self.log.push(format!("write {off} {len}"));
                self.file.write_all_at(&d, off).unwrap();
                self.model_write(off, &d);
            }
            3 | 4 => {
                let roff = self.rng.below(size + 1);
                self.log.push(format!("read {roff} {len}"));
                let mut buf = vec![0u8; len as usize];
                let n = read_at_most(&self.file, &mut buf, roff);
                let want = size.saturating_sub(roff).min(len) as usize;
                if n != want {
                    self.fail(&format!("read returned {n}, model says {want}"));
                }
                self.check_range(roff, &buf[..n], "read");
            }
            5 if size > 0 => {
                // mmap read and write within the current size.
                let moff = self.rng.below(size);
                let mlen = len.min(size - moff);
                self.log.push(format!("mapwrite {moff} {mlen}"));
                let d = self.data(mlen as usize);
                mmap_write(&self.file, moff, &d);
                self.model_write(moff, &d);
                let mut got = vec![0u8; mlen as usize];
                mmap_read(&self.file, moff, &mut got);
                self.check_range(moff, &got, "mapread");
            }
            6 => {
                let nsize = self.rng.below(MAX_LEN + MAX_OP);
                self.log.push(format!("truncate {nsize}"));
                self.file.set_len(nsize).unwrap();
                self.model.resize(nsize as usize, 0);
            }
            7 => {
                let mode = [0, libc::FALLOC_FL_KEEP_SIZE][self.rng.below(2) as usize];
                self.log.push(format!("fallocate mode {mode} {off} {len}"));
                fallocate(&self.file, mode, off, len);
                if mode == 0 && off + len > size {
                    self.model.resize((off + len) as usize, 0);
                }
            }
            8 => {
                self.log.push(format!("punch_hole {off} {len}"));
                fallocate(
                    &self.file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                );
                let end = ((off + len) as usize).min(self.model.len());
                if (off as usize) < end {
                    self.model[off as usize..end].fill(0);
                }
            }
            9 => {
                let keep = self.rng.below(2) == 1;
                let mode =
                    libc::FALLOC_FL_ZERO_RANGE | if keep { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
                self.log.push(format!("zero_range keep={keep} {off} {len}"));
                fallocate(&self.file, mode, off, len);
                let end = (off + len) as usize;
                if !keep && end > self.model.len() {
                    self.model.resize(end, 0);
                }
                let end = end.min(self.model.len());
                if (off as usize) < end {
                    self.model[off as usize..end].fill(0);
                }
            }
            10 => {
                // copy_file_range from a scratch file into ours.
                let d = self.data(len as usize);
                self.other.set_len(0).unwrap();
                self.other.write_all_at(&d, 0).unwrap();
                self.log.push(format!("copy_file_range -> {off} {len}"));
                let mut src_off: i64 = 0;
                let mut dst_off = off as i64;
                let mut left = len as usize;
                while left > 0 {
                    // SAFETY: offsets are local variables; fds are open.
                    let n = unsafe {
                        libc::copy_file_range(
                            self.other.as_raw_fd(),
                            &mut src_off,
                            self.file.as_raw_fd(),
                            &mut dst_off,
                            left,
                            0,
                        )
                    };
                    if n <= 0 {
                        self.fail(&format!(
                            "copy_file_range: {}",
                            std::io::Error::last_os_error()
                        ));
                    }
                    left -= n as usize;
                }
                self.model_write(off, &d);
            }
            11 => {
                let (id, buf) = self.token();
                let write = self.rng.below(2) == 1;
                let boff = self.rng.below(8192);
                if write {
                    let d = self.data(len as usize);
                    buf.write_all_at(&d, boff).unwrap();
                    self.log
                        .push(format!("token_write {off} {len} boff {boff}"));
                    let tf = &self.token.as_ref().unwrap().0;
                    let n = tf.transfer(id, true, off, boff, len).unwrap();
                    if n != len {
                        self.fail(&format!("token WRITE moved {n} of {len}"));
                    }
                    self.model_write(off, &d);
                } else {
                    let roff = self.rng.below(size + 1);
                    self.log
                        .push(format!("token_read {roff} {len} boff {boff}"));
                    let tf = &self.token.as_ref().unwrap().0;
                    let n = tf.transfer(id, false, roff, boff, len).unwrap();
                    let want = size.saturating_sub(roff).min(len);
                    if n != want {
                        self.fail(&format!("token READ moved {n}, model says {want}"));
                    }
                    let mut got = vec![0u8; n as usize];
                    buf.read_exact_at(&mut got, boff).unwrap();
                    self.check_range(roff, &got, "token_read");
                }
            }
            _ => {
                if self.rng.below(8) == 0 {
                    self.log.push("remount".into());
                    self.token = None;
                    let file = std::mem::replace(&mut self.file, File::open("/dev/null").unwrap());
                    let other =
                        std::mem::replace(&mut self.other, File::open("/dev/null").unwrap());
                    drop((file, other));
                    self.m.remount();
                    self.file = Self::open(&self.m, "fsx.file");
                    self.other = Self::open(&self.m, "fsx.other");
                }
                self.check_all("full check");
            }
        }
    }
}

fn read_at_most(f: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) {
    // SAFETY: plain syscall on an open fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "fallocate mode {mode}: {}",
        std::io::Error::last_os_error()
    );
}

/// Maps the pages covering `off..off+len`.
fn with_map<T>(f: &File, off: u64, len: usize, prot: i32, op: impl FnOnce(*mut u8) -> T) -> T {
    let page = off / 4096 * 4096;
    let span = (off - page) as usize + len;
    // SAFETY: a shared mapping of an open file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            page as i64,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: off - page < span, inside the mapping.
    let r = op(unsafe { p.cast::<u8>().add((off - page) as usize) });
    // SAFETY: flushing and unmapping what we mapped.
    unsafe {
        libc::msync(p, span, libc::MS_SYNC);
        libc::munmap(p, span);
    }
    r
}

fn mmap_write(f: &File, off: u64, data: &[u8]) {
    with_map(
        f,
        off,
        data.len(),
        libc::PROT_READ | libc::PROT_WRITE,
        |p| {
            // SAFETY: p..p+len lies inside the writable mapping.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
        },
    )
}

fn mmap_read(f: &File, off: u64, out: &mut [u8]) {
    with_map(f, off, out.len(), libc::PROT_READ, |p| {
        // SAFETY: p..p+len lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
    })
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn fsx_random_ops_match_the_model() {
    let ops = env("FSX_OPS", 1500);
    let seeds = env("FSX_SEEDS", 4);
    let first = env("FSX_SEED", 1);
    for seed in first..first + seeds {
        let img = Image::new("256M");
        let mut fsx = Fsx::new(img.mount(), seed);
        for _ in 0..ops {
            fsx.step();
        }
        fsx.check_all("final");
        drop(fsx.token.take());
        let Fsx {
            mut m, file, other, ..
        } = fsx;
        drop((file, other));
        m.unmount();
        img.assert_fsck_clean();
        println!("fsx seed {seed}: {ops} ops ok");
    }
}
