//! tokbench: the measuring half of `scripts/bench` (which orchestrates it).
//!
//! A small command line; every subcommand prints ONE line of `key=value`
//! results on stdout (errors go to stderr with a non-zero exit):
//!
//! ```text
//! tokbench seqread  --file F --op-size 1M --mode token|readcopy|direct|pread|fixed
//!                   [--bytes B] [--offset O] [--buf B] [--daemon-pid P] [--udmabuf]
//!                   [--verify REF]
//! tokbench seqwrite --file F --bytes B --op-size 1M --mode token|write|direct
//!                   [--buf B] [--daemon-pid P]            (fsync included)
//! tokbench randread --file F --threads N --batch K --secs S
//!                   [--span B] [--block 4096] [--daemon-pid P]
//! tokbench meta     --dir D --count N [--tree] [--dirs K] [--keep] [--daemon-pid P]
//! tokbench tokens   --file F --count N [--buf-size 64K] [--daemon-pid P]
//!                   (stops at a token quota, EDQUOT: quota_hit_at=I)
//! tokbench rwcheck  --file F --secs S [--size 4M] [--op-size 64K] [--udmabuf]
//!                   [--ops N] [--after PATH]
//! ```
//!
//! Modes: `token` = token READ/WRITE ioctls into/out of a registered sealed
//! memfd; `readcopy` = read() into a heap buffer + memcpy into the mmapped
//! memfd; `write` = write() straight from the mmapped memfd; `direct` =
//! pread/pwrite with O_DIRECT on F (the raw image or a raw file) into/out of
//! the mmapped memfd; `pread` = buffered pread into the mmapped memfd;
//! `fixed` = io_uring READ_FIXED from F (a block device or image, not
//! mounted) through dmabuf-fs's block-device layer alone, no filesystem.
//! `--udmabuf` makes the buffer of `token` and `fixed` a udmabuf over the
//! memfd (a real dmabuf; needs /dev/udmabuf). Client CPU comes from getrusage(RUSAGE_SELF); daemon
//! CPU (`--daemon-pid`) from utime+stime in /proc/PID/stat, both over the
//! timed window only.
//!
//! `seqread --verify REF` compares every byte each op moved with REF read
//! at the same offset (plain pread, outside the timed window: a completion
//! is not proof that data landed). `randread` reports daemon and client CPU
//! per op (`dcpu_us_op`, `ccpu_us_op`) besides their sum (`cpu_us_op`).
//! `rwcheck` is not a benchmark but a checker for fault injection (NVMe
//! resets in `scripts/vm/init`): token WRITEs of fresh known data then token
//! READs of the same range, aligned and unaligned, for S seconds; every READ
//! is compared with what the file must hold, and at the end the whole file
//! is compared through plain read(). Each op counts as ok, failed cleanly
//! (an errno) or wrong (success with wrong or missing bytes); the exit
//! status is non-zero when anything was wrong. With `--after PATH`, ops that
//! start once PATH exists (the fault is over) are also counted apart
//! (`after_*`): the same token must keep working.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dmabuf_fs::blockdev::{
    BlockDevice, Direction, FileDevice, FixedSource, IoBuffer, IoRange, OpenMode,
};
use dmabuf_fs::client::{sealed_memfd, udmabuf_from_memfd, TokenFile};
use dmabuf_fs::uapi::{BatchOp, MAX_BATCH, OP_READ};

type Res<T> = Result<T, String>;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` appends --bench; ignore it.
    let argv: Vec<String> = argv.into_iter().filter(|a| a != "--bench").collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("usage: tokbench seqread|seqwrite|randread|meta|tokens|rwcheck --help");
        return ExitCode::from(2);
    };
    let r = Args::parse(rest).and_then(|a| match cmd.as_str() {
        "seqread" => seqread(&a),
        "seqwrite" => seqwrite(&a),
        "randread" => randread(&a),
        "meta" => meta(&a),
        "tokens" => tokens(&a),
        "rwcheck" => rwcheck(&a),
        "-h" | "--help" | "help" => {
            println!("see the header of benches/tokbench.rs for the subcommands");
            Ok(String::new())
        }
        other => Err(format!("unknown subcommand {other:?}")),
    });
    match r {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tokbench {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

// ----- arguments -------------------------------------------------------------

const FLAGS: &[&str] = &["tree", "keep", "udmabuf"];

struct Args(HashMap<String, String>);

impl Args {
    fn parse(v: &[String]) -> Res<Self> {
        let mut m = HashMap::new();
        let mut it = v.iter();
        while let Some(a) = it.next() {
            let k = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}"))?;
            if FLAGS.contains(&k) {
                m.insert(k.to_string(), "1".to_string());
            } else {
                let val = it.next().ok_or_else(|| format!("--{k} needs a value"))?;
                m.insert(k.to_string(), val.clone());
            }
        }
        Ok(Self(m))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn req(&self, k: &str) -> Res<&str> {
        self.get(k).ok_or_else(|| format!("--{k} is required"))
    }

    fn path(&self, k: &str) -> Res<PathBuf> {
        self.req(k).map(PathBuf::from)
    }

    fn size(&self, k: &str, default: Option<u64>) -> Res<u64> {
        match self.get(k) {
            Some(s) => parse_size(s).ok_or_else(|| format!("--{k}: bad size {s:?}")),
            None => default.ok_or_else(|| format!("--{k} is required")),
        }
    }

    fn flag(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }

    fn pid(&self) -> Res<Option<u32>> {
        self.get("daemon-pid")
            .map(|s| s.parse().map_err(|_| format!("bad --daemon-pid {s:?}")))
            .transpose()
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_lowercase().trim_end_matches("ib") {
                "k" => 1u64 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "" | "b" => 1,
                _ => return None,
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

// ----- CPU, memory -----------------------------------------------------------

/// (user, sys) seconds of this whole process.
fn self_cpu() -> (f64, f64) {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by the kernel.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// utime+stime seconds of process `pid` (all its threads).
fn proc_cpu(pid: u32) -> Res<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("daemon pid {pid}: {e}"))?;
    let after = &s[s.rfind(')').ok_or("bad /proc stat")? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// VmHWM, VmRSS and RssAnon of `pid`, in KiB.
fn proc_mem(pid: u32) -> Res<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("daemon pid {pid}: {e}"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:"), field("RssAnon:")))
}

/// Wall time and CPU (client user/sys, daemon) over one timed window.
struct Window {
    pid: Option<u32>,
    start: Instant,
    cpu0: (f64, f64),
    d0: f64,
    /// Wall and client (user, sys) seconds spent in `exclude` (checks that
    /// are not part of what is measured; the daemon idles meanwhile).
    excluded: (f64, f64, f64),
}

struct Measured {
    secs: f64,
    user: f64,
    sys: f64,
    dcpu: f64,
}

impl Window {
    fn start(pid: Option<u32>) -> Res<Self> {
        let d0 = pid.map(proc_cpu).transpose()?.unwrap_or(0.0);
        Ok(Self {
            pid,
            cpu0: self_cpu(),
            d0,
            excluded: (0.0, 0.0, 0.0),
            start: Instant::now(),
        })
    }

    /// Runs `f` with the clock and the client's CPU stopped.
    fn exclude<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let (u0, s0) = self_cpu();
        let r = f();
        let (u1, s1) = self_cpu();
        self.excluded.0 += t.elapsed().as_secs_f64();
        self.excluded.1 += u1 - u0;
        self.excluded.2 += s1 - s0;
        r
    }

    fn stop(self) -> Res<Measured> {
        let secs = self.start.elapsed().as_secs_f64() - self.excluded.0;
        let (u, s) = self_cpu();
        let d = self.pid.map(proc_cpu).transpose()?.unwrap_or(0.0);
        Ok(Measured {
            secs,
            user: (u - self.cpu0.0 - self.excluded.1).max(0.0),
            sys: (s - self.cpu0.1 - self.excluded.2).max(0.0),
            dcpu: d - self.d0,
        })
    }
}

fn throughput_line(bytes: u64, m: &Measured) -> String {
    let gib = (bytes as f64 / GIB).max(1e-12);
    format!(
        "bytes={bytes} secs={:.4} mibps={:.1} user={:.3} sys={:.3} dcpu={:.3} cpu_per_gib={:.4} client_per_gib={:.4} daemon_per_gib={:.4}",
        m.secs,
        bytes as f64 / MIB / m.secs.max(1e-9),
        m.user,
        m.sys,
        m.dcpu,
        (m.user + m.sys + m.dcpu) / gib,
        (m.user + m.sys) / gib,
        m.dcpu / gib,
    )
}

// ----- buffers ---------------------------------------------------------------

/// A sealed memfd and the client's shared mapping of it.
struct MemBuf {
    file: File,
    ptr: *mut u8,
    len: usize,
}

impl MemBuf {
    fn new(name: &str, len: u64) -> Res<Self> {
        let file = sealed_memfd(name, len).map_err(|e| format!("memfd: {e}"))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
        // SAFETY: mapping a whole fd we own; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap of the memfd: {}", io::Error::last_os_error()));
        }
        let b = Self {
            file,
            ptr: p.cast(),
            len,
        };
        // Fault every page in now, outside any timed window.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in (0..len).step_by(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // SAFETY: i + 8 <= len (len is a multiple of 4096).
            unsafe { b.ptr.add(i).cast::<u64>().write_unaligned(seed) };
        }
        Ok(b)
    }

    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: within the mapping, which lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: within the mapping; callers use disjoint ranges one at a time.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for MemBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new().
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn open_direct(path: &Path, write: bool) -> Res<File> {
    let mut o = OpenOptions::new();
    o.read(true).custom_flags(libc::O_DIRECT);
    if write {
        // Overwrites in place (no truncate): the caller preallocates the
        // scratch file so that block allocation is not what is measured.
        o.write(true).create(true);
    }
    o.open(path)
        .map_err(|e| format!("{} (O_DIRECT): {e}", path.display()))
}

fn op_plan(a: &Args) -> Res<(u64, u64)> {
    let op = a.size("op-size", Some(1 << 20))?;
    if op == 0 || op % 4096 != 0 {
        return Err("--op-size must be a nonzero multiple of 4096".into());
    }
    let buf = a.size("buf", Some(op.max(64 << 20)))?;
    let buf = buf.div_ceil(op) * op;
    Ok((op, buf))
}

// ----- verification ----------------------------------------------------------

/// `--verify REF`: compares the bytes each op put in the buffer with REF at
/// the same offset, before the buffer wraps round and overwrites them.
struct Verifier {
    reference: File,
    name: String,
    scratch: Vec<u8>,
    /// Bytes of the stream (from `--offset`) already compared.
    checked: u64,
}

impl Verifier {
    fn from_args(a: &Args) -> Res<Option<Self>> {
        let Some(p) = a.get("verify") else {
            return Ok(None);
        };
        let reference = File::open(p).map_err(|e| format!("--verify {p}: {e}"))?;
        Ok(Some(Self {
            reference,
            name: p.to_string(),
            scratch: vec![0; 1 << 20],
            checked: 0,
        }))
    }

    /// Compares stream bytes [checked, done): stream byte x sits at buffer
    /// offset x % buf_len and at file offset `offset + x`.
    fn catch_up(&mut self, buf: &MemBuf, buf_len: u64, offset: u64, done: u64) -> Res<()> {
        while self.checked < done {
            let boff = self.checked % buf_len;
            let len = (done - self.checked)
                .min(buf_len - boff)
                .min(self.scratch.len() as u64) as usize;
            let at = offset + self.checked;
            self.reference
                .read_exact_at(&mut self.scratch[..len], at)
                .map_err(|e| format!("--verify: reading {} at {at}: {e}", self.name))?;
            let got = buf.slice(boff as usize, len);
            if let Some(i) = got
                .iter()
                .zip(&self.scratch[..len])
                .position(|(x, y)| x != y)
            {
                return Err(format!(
                    "--verify: byte {} differs from {} (the op reported success)",
                    at + i as u64,
                    self.name
                ));
            }
            self.checked += len as u64;
        }
        Ok(())
    }
}

// ----- seqread ---------------------------------------------------------------

fn seqread(a: &Args) -> Res<String> {
    let path = a.path("file")?;
    let mode = a.req("mode")?;
    let (op, buf_len) = op_plan(a)?;
    let offset = a.size("offset", Some(0))?;
    let file_len = if mode == "fixed" {
        u64::MAX // the device checks its own bounds
    } else {
        std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len()
    };
    let bytes = a.size("bytes", Some(file_len.saturating_sub(offset)))?;
    if offset + bytes > file_len {
        return Err(format!(
            "{} has {file_len} bytes, fewer than offset+bytes",
            path.display()
        ));
    }
    let buf = MemBuf::new("tokbench-seqread", buf_len)?;
    let dmabuf = a
        .flag("udmabuf")
        .then(|| udmabuf_from_memfd(&buf.file).map_err(|e| format!("udmabuf: {e}")))
        .transpose()?;
    let pid = a.pid()?;
    let mut verifier = Verifier::from_args(a)?;
    if verifier.is_some() && !matches!(mode, "token" | "fixed") {
        return Err("--verify works with --mode token and fixed".into());
    }
    // Compares what the ops moved so far once the buffer is full (before it
    // wraps) and at the end, with the clock stopped.
    let mut verify = |w: &mut Window, done: u64| -> Res<()> {
        match &mut verifier {
            Some(v) if done % buf_len == 0 || done >= bytes => {
                w.exclude(|| v.catch_up(&buf, buf_len, offset, done))
            }
            _ => Ok(()),
        }
    };
    let mut done = 0u64;
    let m = match mode {
        "token" => {
            let f = TokenFile::open(&path, false).map_err(|e| format!("open: {e}"))?;
            let token = match &dmabuf {
                Some(d) => f.register(d, 0, 0),
                None => f.register(&buf.file, 0, 0),
            }
            .map_err(|e| format!("REGISTER: {e}"))?;
            let mut w = Window::start(pid)?;
            while done < bytes {
                let len = op.min(bytes - done);
                let boff = done % buf_len;
                let n = token
                    .read(offset + done, boff, len)
                    .map_err(|e| format!("READ at {}: {e}", offset + done))?;
                if n == 0 {
                    return Err(format!("READ hit EOF at {}", offset + done));
                }
                done += n;
                verify(&mut w, done)?;
            }
            w.stop()?
        }
        "fixed" => {
            let mut dev = FileDevice::open(&path, OpenMode::default())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            dev.enable_fixed_buffers()
                .map_err(|e| format!("fixed buffers: {e}"))?;
            let fixed = match &dmabuf {
                Some(d) => dev.register_fixed(FixedSource::Dmabuf(d.as_fd())),
                None => dev.register_fixed(FixedSource::User {
                    addr: buf.ptr,
                    len: buf.len,
                }),
            }
            .map_err(|e| format!("registering the buffer: {e}"))?;
            let base = if dmabuf.is_some() { 0 } else { buf.ptr as u64 };
            let io_buf = IoBuffer::from_mut(buf.slice_mut(0, buf.len)).with_fixed(&fixed, base);
            let mut w = Window::start(pid)?;
            while done < bytes {
                let len = op.min(bytes - done) as usize;
                let boff = (done % buf_len) as usize;
                let r = IoRange {
                    dev_offset: offset + done,
                    buf_offset: boff,
                    len,
                };
                dev.submit(Direction::Read, &io_buf, &[r])
                    .map_err(|e| format!("READ_FIXED at {}: {e}", offset + done))?;
                done += len as u64;
                verify(&mut w, done)?;
            }
            w.stop()?
        }
        "readcopy" => {
            let mut f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut heap = vec![1u8; op as usize];
            let w = Window::start(pid)?;
            if offset != 0 {
                io::Seek::seek(&mut f, io::SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
            }
            while done < bytes {
                let len = op.min(bytes - done) as usize;
                let mut got = 0;
                while got < len {
                    let n = f.read(&mut heap[got..len]).map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err(format!("read() hit EOF at {}", offset + done));
                    }
                    got += n;
                }
                let boff = (done % buf_len) as usize;
                buf.slice_mut(boff, len).copy_from_slice(&heap[..len]);
                done += len as u64;
            }
            w.stop()?
        }
        "direct" | "pread" => {
            let f = if mode == "direct" {
                if offset % 4096 != 0 {
                    return Err("--offset must be 4096-aligned for O_DIRECT".into());
                }
                open_direct(&path, false)?
            } else {
                File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?
            };
            let w = Window::start(pid)?;
            while done < bytes {
                let len = op.min(bytes - done) as usize;
                let boff = (done % buf_len) as usize;
                let dst = buf.slice_mut(boff, len);
                let mut got = 0;
                while got < len {
                    let n = f
                        .read_at(&mut dst[got..], offset + done + got as u64)
                        .map_err(|e| format!("pread: {e}"))?;
                    if n == 0 {
                        return Err("pread hit EOF".into());
                    }
                    got += n;
                }
                done += len as u64;
            }
            w.stop()?
        }
        other => {
            return Err(format!(
                "unknown --mode {other:?} (token|readcopy|direct|pread)"
            ))
        }
    };
    let verified = verifier.map_or(0, |v| v.checked);
    Ok(format!(
        "mode={mode} op={op} {} verified_bytes={verified}",
        throughput_line(done, &m)
    ))
}

// ----- seqwrite --------------------------------------------------------------

fn seqwrite(a: &Args) -> Res<String> {
    let path = a.path("file")?;
    let mode = a.req("mode")?;
    let (op, buf_len) = op_plan(a)?;
    let bytes = a.size("bytes", None)?;
    let buf = MemBuf::new("tokbench-seqwrite", buf_len)?;
    let pid = a.pid()?;
    let create = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut done = 0u64;
    let m = match mode {
        "token" => {
            let f = TokenFile::from_file(create()?);
            let token = f
                .register(&buf.file, 0, 0)
                .map_err(|e| format!("REGISTER: {e}"))?;
            let w = Window::start(pid)?;
            while done < bytes {
                let len = op.min(bytes - done);
                let n = token
                    .write(done, done % buf_len, len)
                    .map_err(|e| format!("WRITE at {done}: {e}"))?;
                if n == 0 {
                    return Err("WRITE moved nothing (device full?)".into());
                }
                done += n;
            }
            f.file().sync_all().map_err(|e| format!("fsync: {e}"))?;
            w.stop()?
        }
        "write" | "direct" => {
            let mut f = if mode == "direct" {
                open_direct(&path, true)?
            } else {
                create()?
            };
            let w = Window::start(pid)?;
            while done < bytes {
                let len = op.min(bytes - done) as usize;
                let boff = (done % buf_len) as usize;
                f.write_all(buf.slice(boff, len))
                    .map_err(|e| format!("write at {done}: {e}"))?;
                done += len as u64;
            }
            f.sync_all().map_err(|e| format!("fsync: {e}"))?;
            w.stop()?
        }
        other => return Err(format!("unknown --mode {other:?} (token|write|direct)")),
    };
    Ok(format!("mode={mode} op={op} {}", throughput_line(done, &m)))
}

// ----- randread --------------------------------------------------------------

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

fn randread(a: &Args) -> Res<String> {
    let path = a.path("file")?;
    let threads = a.size("threads", Some(1))?.max(1) as usize;
    let batch = a.size("batch", Some(1))?.max(1) as usize;
    if batch > MAX_BATCH {
        return Err(format!("--batch is at most {MAX_BATCH}"));
    }
    let block = a.size("block", Some(4096))?;
    let secs: f64 = a
        .get("secs")
        .unwrap_or("3")
        .parse()
        .map_err(|_| "bad --secs")?;
    let file_len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let span = a.size("span", Some(file_len))?.min(file_len);
    let blocks = span / block;
    if blocks == 0 {
        return Err("file smaller than one block".into());
    }
    let pid = a.pid()?;
    let start = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let path = path.clone();
        let start = start.clone();
        handles.push(std::thread::spawn(move || -> Res<(u64, Vec<u64>)> {
            let f = TokenFile::open(&path, false).map_err(|e| format!("open: {e}"))?;
            let mem = sealed_memfd("tokbench-rand", block * batch as u64)
                .map_err(|e| format!("memfd: {e}"))?;
            let token = f
                .register(&mem, 0, 0)
                .map_err(|e| format!("REGISTER: {e}"))?;
            let mut rng = 0x2545_f491_4f6c_dd1du64 ^ ((t as u64 + 1) << 32);
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % blocks) * block
            };
            let mut ops = vec![BatchOp::default(); batch];
            let mut lat = Vec::with_capacity(1 << 20);
            let mut count = 0u64;
            start.wait();
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                if batch == 1 {
                    let n = token
                        .read(next(), 0, block)
                        .map_err(|e| format!("READ: {e}"))?;
                    if n != block {
                        return Err(format!("short READ: {n}"));
                    }
                } else {
                    for (i, op) in ops.iter_mut().enumerate() {
                        *op = BatchOp {
                            token: token.id(),
                            file_offset: next(),
                            buf_offset: i as u64 * block,
                            len: block,
                            cookie: i as u64,
                            op: OP_READ,
                            flags: 0,
                            result: 0,
                        };
                    }
                    f.batch(&mut ops).map_err(|e| format!("BATCH: {e}"))?;
                    if let Some(bad) = ops.iter().find(|o| o.result != block as i64) {
                        return Err(format!("BATCH op result {}", bad.result));
                    }
                }
                lat.push(t0.elapsed().as_nanos() as u64);
                count += batch as u64;
            }
            Ok((count, lat))
        }));
    }
    // Threads set up (open, register) before the window opens.
    start.wait();
    let w = Window::start(pid)?;
    let mut total = 0;
    let mut lat = Vec::new();
    let mut err = None;
    for h in handles {
        match h.join().map_err(|_| "thread panicked".to_string())? {
            Ok((c, l)) => {
                total += c;
                lat.extend(l);
            }
            Err(e) => err = Some(e),
        }
    }
    let m = w.stop()?;
    if let Some(e) = err {
        return Err(e);
    }
    lat.sort_unstable();
    Ok(format!(
        "threads={threads} batch={batch} ops={total} calls={} secs={:.3} iops={:.0} p50_us={:.1} p99_us={:.1} lat={} cpu_us_op={:.2} dcpu_us_op={:.2} ccpu_us_op={:.2} user={:.3} sys={:.3} dcpu={:.3}",
        lat.len(),
        m.secs,
        total as f64 / m.secs,
        percentile(&lat, 0.50) / 1e3,
        percentile(&lat, 0.99) / 1e3,
        if batch == 1 { "per-op" } else { "per-call" },
        (m.user + m.sys + m.dcpu) * 1e6 / total.max(1) as f64,
        m.dcpu * 1e6 / total.max(1) as f64,
        (m.user + m.sys) * 1e6 / total.max(1) as f64,
        m.user,
        m.sys,
        m.dcpu
    ))
}

// ----- meta ------------------------------------------------------------------

fn meta(a: &Args) -> Res<String> {
    let dir = a.path("dir")?;
    let count = a.size("count", None)?;
    let tree = a.flag("tree");
    let dirs = if tree {
        a.size("dirs", Some(((count as f64).sqrt().round() as u64).max(1)))?
    } else {
        1
    };
    let pid = a.pid()?;
    let per = count.div_ceil(dirs);
    let root = dir.join("meta");
    std::fs::create_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut names = Vec::with_capacity(count as usize);
    let mut subdirs = Vec::new();
    for d in 0..dirs {
        let base = if tree {
            let p = root.join(format!("d{d:05}"));
            subdirs.push(p.clone());
            p
        } else {
            root.clone()
        };
        for i in 0..per.min(count - d * per) {
            names.push(base.join(format!("file-{i:07}")));
        }
    }
    let t = Instant::now();
    let mut next_dir = 0;
    let mut mk = 0;
    for (i, n) in names.iter().enumerate() {
        if tree && i as u64 == next_dir {
            std::fs::create_dir(&subdirs[mk]).map_err(|e| format!("mkdir: {e}"))?;
            mk += 1;
            next_dir += per;
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(n)
            .map_err(|e| format!("create {}: {e}", n.display()))?;
    }
    let create = t.elapsed().as_secs_f64();
    let mem = |k: &str| -> Res<String> {
        Ok(match pid {
            Some(p) => {
                let (hwm, rss, anon) = proc_mem(p)?;
                format!(" {k}hwm_kb={hwm} {k}rss_kb={rss} {k}anon_kb={anon}")
            }
            None => String::new(),
        })
    };
    let mem_after_create = mem("")?;
    let mut line = format!(
        "count={count} dirs={dirs} create_s={create:.4} create_ops={:.0}",
        count as f64 / create
    );
    if a.flag("keep") {
        return Ok(line + &mem_after_create);
    }
    let t = Instant::now();
    for n in &names {
        std::fs::symlink_metadata(n).map_err(|e| format!("stat {}: {e}", n.display()))?;
    }
    let stat = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in &names {
        std::fs::remove_file(n).map_err(|e| format!("unlink {}: {e}", n.display()))?;
    }
    for d in &subdirs {
        std::fs::remove_dir(d).map_err(|e| format!("rmdir {}: {e}", d.display()))?;
    }
    let unlink = t.elapsed().as_secs_f64();
    std::fs::remove_dir(&root).map_err(|e| format!("rmdir: {e}"))?;
    line += &format!(
        " stat_s={stat:.4} stat_ops={:.0} unlink_s={unlink:.4} unlink_ops={:.0}",
        count as f64 / stat,
        count as f64 / unlink
    );
    Ok(line + &mem_after_create)
}

// ----- tokens ----------------------------------------------------------------

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn tokens(a: &Args) -> Res<String> {
    let path = a.path("file")?;
    let count = a.size("count", None)? as usize;
    let buf_size = a.size("buf-size", Some(64 << 10))?;
    let pid = a.pid()?;
    raise_nofile();
    let f = TokenFile::open(&path, false).map_err(|e| format!("open: {e}"))?;
    let before = pid.map(proc_mem).transpose()?;
    let mut bufs = Vec::with_capacity(count);
    let mut toks = Vec::with_capacity(count);
    let t = Instant::now();
    let mut err = String::new();
    // A token quota (EDQUOT) ends the loop without failing: memory is then
    // measured for as many tokens as one open file may hold.
    let mut quota = String::new();
    for i in 0..count {
        let b = match sealed_memfd("tokbench-tok", buf_size) {
            Ok(b) => b,
            Err(e) => {
                err = format!(" error=memfd_{i}:{}", e.raw_os_error().unwrap_or(0));
                break;
            }
        };
        match f.register(&b, 0, 0) {
            Ok(tk) => toks.push(tk),
            Err(e) if e.raw_os_error() == Some(libc::EDQUOT) => {
                quota = format!(" quota_hit_at={i}");
                break;
            }
            Err(e) => {
                err = format!(" error=REGISTER_{i}:{}", e.raw_os_error().unwrap_or(0));
                break;
            }
        }
        bufs.push(b);
    }
    let secs = t.elapsed().as_secs_f64();
    let mut line = format!(
        "tokens={} secs={secs:.4} register_us={:.1}{quota}{err}",
        toks.len(),
        secs * 1e6 / toks.len().max(1) as f64
    );
    if let Some(p) = pid {
        let (hwm, rss, anon) = proc_mem(p)?;
        line += &format!(" hwm_kb={hwm} rss_kb={rss} anon_kb={anon}");
        if let Some((_, rss0, anon0)) = before {
            line += &format!(" rss_before_kb={rss0} anon_before_kb={anon0}");
        }
    }
    drop(toks);
    if !err.is_empty() {
        println!("{line}");
        return Err(format!("registration stopped early:{err}"));
    }
    Ok(line)
}

// ----- rwcheck ---------------------------------------------------------------

/// A short name for the errnos token I/O can fail with.
fn errno_name(e: &io::Error) -> String {
    let n = e.raw_os_error().unwrap_or(0);
    let name = match n {
        libc::EIO => "EIO",
        libc::ENOENT => "ENOENT",
        libc::EFAULT => "EFAULT",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENOTCONN => "ENOTCONN",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno{n}"),
    };
    name.to_string()
}

/// Outcome counts of `rwcheck`.
#[derive(Default)]
struct Outcomes {
    ok: u64,
    failed: u64,
    wrong: u64,
    errnos: std::collections::BTreeMap<String, u64>,
    first_wrong: Option<String>,
    compared: u64,
}

impl Outcomes {
    fn fail(&mut self, e: &io::Error) {
        self.failed += 1;
        *self.errnos.entry(errno_name(e)).or_default() += 1;
    }

    fn wrong(&mut self, what: String) {
        self.wrong += 1;
        self.first_wrong.get_or_insert(what);
    }
}

fn rwcheck(a: &Args) -> Res<String> {
    let path = a.path("file")?;
    let size = a.size("size", Some(4 << 20))?;
    let op = a.size("op-size", Some(64 << 10))?;
    if op < 8192 || op % 4096 != 0 || op > size {
        return Err(
            "--op-size must be a multiple of 4096, at least 8192 and at most --size".into(),
        );
    }
    let secs: f64 = a
        .get("secs")
        .unwrap_or("3")
        .parse()
        .map_err(|_| "bad --secs")?;
    let max_ops = a.size("ops", Some(u64::MAX))?;
    // The file starts with known data, written through plain write().
    let mut expected = vec![0u8; size as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut fill = |dst: &mut [u8]| {
        for b in dst.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
    };
    fill(&mut expected);
    let mut known = vec![true; size as usize];
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(&expected)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    // Buffer: the WRITE source at 0, the READ destination at `slot`.
    let slot = op as usize;
    let buf = MemBuf::new("tokbench-rwcheck", 2 * op)?;
    let dmabuf = a
        .flag("udmabuf")
        .then(|| udmabuf_from_memfd(&buf.file).map_err(|e| format!("udmabuf: {e}")))
        .transpose()?;
    let tf = TokenFile::from_file(f);
    let token = match &dmabuf {
        Some(d) => tf.register(d, 0, 0),
        None => tf.register(&buf.file, 0, 0),
    }
    .map_err(|e| format!("REGISTER: {e}"))?;
    let mut out = Outcomes::default();
    let after_marker = a.get("after").map(PathBuf::from);
    // Counts of the ops started once the marker exists.
    let mut after = Outcomes::default();
    let mut max_op = Duration::ZERO;
    let mut timed = |r: &dyn Fn() -> io::Result<u64>| {
        let t = Instant::now();
        let v = r();
        max_op = max_op.max(t.elapsed());
        v
    };
    // The caller (scripts/vm/init) waits for this line to inject faults.
    eprintln!("rwcheck: loop started");
    let start = Instant::now();
    let mut i = 0u64;
    while i < max_ops && start.elapsed().as_secs_f64() < secs {
        // Even rounds: whole aligned blocks; odd rounds: an unaligned range
        // (heads and tails through the bounce path).
        let blocks = size / 4096;
        let first = (i.wrapping_mul(0x9e37_79b9) % blocks) * 4096;
        let (off, len) = if i % 2 == 0 {
            (first, op.min(size - first))
        } else {
            let off = first + 1 + (i % 4000);
            (off, (op - 4096 - 3 * (i % 7)).min(size.saturating_sub(off)))
        };
        if len == 0 {
            i += 1;
            continue;
        }
        let (o, l) = (off as usize, len as usize);
        let phase_after = after_marker.as_deref().is_some_and(Path::exists);
        let (ok0, failed0, wrong0) = (out.ok, out.failed, out.wrong);
        fill(buf.slice_mut(0, l));
        match timed(&|| token.write(off, 0, len)) {
            Ok(n) if n == len => {
                out.ok += 1;
                expected[o..o + l].copy_from_slice(buf.slice(0, l));
                known[o..o + l].fill(true);
            }
            Ok(n) => {
                out.wrong(format!("WRITE of {len} at {off} moved {n}"));
                known[o..o + l].fill(false);
            }
            Err(e) => {
                // The range now holds old or new bytes or a mix.
                out.fail(&e);
                known[o..o + l].fill(false);
            }
        }
        // Poison: every byte differs from what must land.
        for (d, e) in buf.slice_mut(slot, l).iter_mut().zip(&expected[o..o + l]) {
            *d = !*e;
        }
        match timed(&|| token.read(off, slot as u64, len)) {
            Ok(n) if n == len => {
                let got = buf.slice(slot, l);
                let bad = (0..l).find(|&k| known[o + k] && got[k] != expected[o + k]);
                out.compared += known[o..o + l].iter().filter(|&&k| k).count() as u64;
                match bad {
                    Some(k) => out.wrong(format!(
                        "READ of {len} at {off}: byte {} wrong",
                        off + k as u64
                    )),
                    None => out.ok += 1,
                }
            }
            Ok(n) => out.wrong(format!("READ of {len} at {off} moved {n}")),
            Err(e) => out.fail(&e),
        }
        if phase_after {
            after.ok += out.ok - ok0;
            after.failed += out.failed - failed0;
            after.wrong += out.wrong - wrong0;
        }
        i += 1;
    }
    let loop_secs = start.elapsed().as_secs_f64();
    // Everything the token ops said they wrote must be in the file, as
    // plain read() sees it.
    let mut content = vec![0u8; size as usize];
    let mut final_mismatch = 0u64;
    match tf.file().read_exact_at(&mut content, 0) {
        Ok(()) => {
            for k in 0..size as usize {
                if known[k] && content[k] != expected[k] {
                    if final_mismatch == 0 {
                        out.first_wrong
                            .get_or_insert(format!("read() of the file: byte {k} wrong"));
                    }
                    final_mismatch += 1;
                }
            }
        }
        Err(e) => out.fail(&e),
    }
    drop(token);
    let errnos: Vec<String> = out.errnos.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    let after_counts = if after_marker.is_some() {
        format!(
            " after_ops={} after_ok={} after_failed={} after_wrong={}",
            after.ok + after.failed + after.wrong,
            after.ok,
            after.failed,
            after.wrong
        )
    } else {
        String::new()
    };
    let line = format!(
        "ops={} ok={} failed={} wrong={} final_mismatch_bytes={final_mismatch} errnos={} compared_bytes={} max_op_ms={:.0} secs={loop_secs:.2}{after_counts}{}",
        out.ok + out.failed + out.wrong,
        out.ok,
        out.failed,
        out.wrong,
        if errnos.is_empty() { "none".to_string() } else { errnos.join(",") },
        out.compared,
        max_op.as_secs_f64() * 1e3,
        out.first_wrong
            .as_deref()
            .map(|w| format!(" first_wrong=\"{w}\""))
            .unwrap_or_default(),
    );
    if out.wrong > 0 || final_mismatch > 0 {
        println!("{line}");
        return Err("wrong bytes after a successful op".into());
    }
    Ok(line)
}
