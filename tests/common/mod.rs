//! Shared harness for the integration tests: images, mounts that always
//! get unmounted, daemon lookup/kill, running code as another uid, and
//! small libc wrappers.
#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dmabuf-fs")
}

fn describe(cmd: &str, args: &[&OsStr], out: &Output) -> String {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "`{} {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        cmd,
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command, returns its output whatever the exit status.
pub fn run_unchecked<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd}: {e}"))
}

/// Runs a command and asserts it exits 0; the panic message has stderr.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Output {
    let out = run_unchecked(cmd, args);
    if !out.status.success() {
        let a: Vec<&OsStr> = args.iter().map(|s| s.as_ref()).collect();
        panic!("{}", describe(cmd, &a, &out));
    }
    out
}

/// Runs `sh -c SCRIPT` and asserts success.
pub fn sh(script: &str) -> Output {
    run("sh", &["-c", script])
}

/// Runs the binary under test with `args`, no assertion.
pub fn fs_cmd<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run_unchecked(bin(), args)
}

/// Whether `tool` is on PATH.
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Both output streams as one lowercase string (for message checks).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase()
}

pub fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create tempdir")
}

/// An image file in its own temporary directory, formatted by `mkfs`.
pub struct Image {
    path: PathBuf,
    dir: TempDir,
}

impl Image {
    /// Creates and formats an image of `size` (e.g. "256M"), or formats
    /// the block device named by `DMABUF_FS_TEST_DEVICE` (whole; the VM
    /// test runs the token cases on its NVMe namespace that way, one at a
    /// time).
    pub fn new(size: &str) -> Image {
        if let Some(dev) = test_device() {
            let dir = tempdir("dmabuf-img-");
            run(
                bin(),
                &[OsStr::new("mkfs"), dev.as_os_str(), OsStr::new("--force")],
            );
            return Image { path: dev, dir };
        }
        let img = Image::unformatted();
        run(
            bin(),
            &[
                OsStr::new("mkfs"),
                img.path.as_os_str(),
                OsStr::new("--size"),
                OsStr::new(size),
            ],
        );
        assert!(
            img.path.exists(),
            "mkfs did not create {}",
            img.path.display()
        );
        img
    }

    /// A path for an image in a fresh tempdir, file not created.
    pub fn unformatted() -> Image {
        let dir = tempdir("dmabuf-img-");
        let dir_path = fs::canonicalize(dir.path()).unwrap();
        Image {
            path: dir_path.join("fs.img"),
            dir,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tempdir that holds the image (for scratch files of a test).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn mount(&self) -> Mounted {
        Mounted::new(&self.path, None)
    }

    pub fn mount_with(&self, opts: &str) -> Mounted {
        Mounted::new(&self.path, Some(opts))
    }

    /// Runs `fsck IMAGE`, no assertion.
    pub fn fsck(&self) -> Output {
        fs_cmd(&[OsStr::new("fsck"), self.path.as_os_str()])
    }

    /// Asserts `fsck IMAGE` exits 0.
    pub fn assert_fsck_clean(&self) {
        fsck_clean(&self.path);
    }
}

/// Asserts `dmabuf-fs fsck IMAGE` exits 0.
pub fn fsck_clean(image: &Path) -> Output {
    run(bin(), &[OsStr::new("fsck"), image.as_os_str()])
}

/// The block device test images go on instead of files
/// (`DMABUF_FS_TEST_DEVICE`); everything on it is destroyed.
pub fn test_device() -> Option<PathBuf> {
    std::env::var_os("DMABUF_FS_TEST_DEVICE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The token backend every test mount asks for, from
/// `DMABUF_FS_TEST_TOKENS` (auto, mapped or kernel); scripts/test runs the
/// token cases once more with `kernel`, and the VM test on a patched
/// kernel forces it so that a missing kernel feature fails.
pub fn forced_token_backend() -> Option<String> {
    std::env::var("DMABUF_FS_TEST_TOKENS")
        .ok()
        .filter(|v| !v.is_empty())
}

/// Runs `dmabuf-fs mount IMAGE MNT [-o OPTS]`, no assertion.
pub fn mount_cmd(image: &Path, mnt: &Path, opts: Option<&str>) -> Output {
    let mut opts = opts.map(str::to_string);
    if let Some(b) = forced_token_backend() {
        let o = opts.get_or_insert_with(String::new);
        if !o.contains("tokens=") && !o.contains("remount") {
            if !o.is_empty() {
                o.push(',');
            }
            o.push_str(&format!("tokens={b}"));
        }
    }
    let mut args: Vec<&OsStr> = vec![OsStr::new("mount"), image.as_os_str(), mnt.as_os_str()];
    if let Some(o) = &opts {
        args.push(OsStr::new("-o"));
        args.push(OsStr::new(o));
    }
    fs_cmd(&args)
}

/// `/proc/mounts` lines: (source, mountpoint, fstype, options).
pub fn proc_mounts() -> Vec<(String, String, String, String)> {
    let text = fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 4 {
                return None;
            }
            Some((
                unescape_mount(f[0]),
                unescape_mount(f[1]),
                f[2].to_string(),
                f[3].to_string(),
            ))
        })
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The /proc/mounts entry for a mountpoint, if mounted.
pub fn mount_entry(mnt: &Path) -> Option<(String, String, String, String)> {
    let want = mnt.to_string_lossy();
    proc_mounts().into_iter().rev().find(|m| m.1 == want)
}

pub fn is_mounted(mnt: &Path) -> bool {
    mount_entry(mnt).is_some()
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rfind(')')?;
    stat[after + 1..].trim_start().chars().next()
}

fn pid_alive(pid: i32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// Pids of live dmabuf-fs processes whose argv has an element equal to
/// `mnt` (the mount daemon for that mountpoint).
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = mnt.as_os_str().as_bytes();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if argv.is_empty() || !argv.contains(&want) {
            continue;
        }
        let argv0 = String::from_utf8_lossy(argv[0]);
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(argv0.contains("dmabuf-fs") || exe.contains("dmabuf-fs")) {
            continue;
        }
        if pid_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until none of `pids` is alive; false on timeout.
pub fn wait_pids_gone(pids: &[i32], timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if pids.iter().all(|&p| !pid_alive(p)) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs the daemon serving `mnt`, waits for it to die and lazily
/// unmounts the dead mount. Panics if no daemon is found.
pub fn kill_daemon(mnt: &Path) {
    let pids = daemon_pids(mnt);
    assert!(
        !pids.is_empty(),
        "no dmabuf-fs daemon found for {}",
        mnt.display()
    );
    for &p in &pids {
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
    assert!(
        wait_pids_gone(&pids, Duration::from_secs(10)),
        "daemon {pids:?} did not die after SIGKILL"
    );
    lazy_unmount(mnt);
}

fn lazy_unmount(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    let out = run_unchecked("umount", &[OsStr::new("-l"), mnt.as_os_str()]);
    if !out.status.success() && is_mounted(mnt) {
        let _ = run_unchecked("umount", &[OsStr::new("-f"), mnt.as_os_str()]);
    }
}

/// A live mount of an image on a private temporary mountpoint. Dropping
/// it always unmounts (falling back to a lazy unmount).
pub struct Mounted {
    image: PathBuf,
    mnt: PathBuf,
    opts: Option<String>,
    mounted: bool,
    // Dropped after Drop::drop has unmounted.
    _dir: TempDir,
}

impl Mounted {
    /// Mounts `image` with `opts`, asserting success.
    pub fn new(image: &Path, opts: Option<&str>) -> Mounted {
        let dir = tempdir("dmabuf-mnt-");
        let mnt = fs::canonicalize(dir.path()).unwrap();
        let mut m = Mounted {
            image: image.to_path_buf(),
            mnt,
            opts: opts.map(str::to_string),
            mounted: false,
            _dir: dir,
        };
        m.mount();
        m
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.mnt.join(p)
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn is_mounted(&self) -> bool {
        self.mounted
    }

    /// Mounts again (after `unmount` or `kill`), same options.
    pub fn mount(&mut self) {
        assert!(!self.mounted, "already mounted");
        // Mark first so that Drop cleans up even if the assert below
        // fails after a half-successful mount.
        self.mounted = true;
        let out = mount_cmd(&self.image, &self.mnt, self.opts.as_deref());
        if !out.status.success() {
            let a = [self.image.as_os_str(), self.mnt.as_os_str()];
            panic!("{}", describe("dmabuf-fs mount", &a, &out));
        }
        assert!(
            is_mounted(&self.mnt),
            "mount returned 0 but {} is not in /proc/mounts",
            self.mnt.display()
        );
    }

    /// Mounts again with other options.
    pub fn mount_with(&mut self, opts: Option<&str>) {
        self.opts = opts.map(str::to_string);
        self.mount();
    }

    /// `umount` and wait for the daemon to exit; asserts success.
    pub fn unmount(&mut self) {
        assert!(self.mounted, "not mounted");
        let pids = daemon_pids(&self.mnt);
        let start = Instant::now();
        loop {
            let out = run_unchecked("umount", &[self.mnt.as_os_str()]);
            if out.status.success() {
                break;
            }
            if start.elapsed() > Duration::from_secs(3) {
                panic!("{}", describe("umount", &[self.mnt.as_os_str()], &out));
            }
            sleep(Duration::from_millis(100));
        }
        self.mounted = false;
        assert!(!is_mounted(&self.mnt), "still mounted after umount");
        assert!(
            wait_pids_gone(&pids, Duration::from_secs(30)),
            "daemon {pids:?} still running 30s after umount"
        );
    }

    /// umount + mount.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// SIGKILL the daemon and lazily unmount the dead mount.
    pub fn kill(&mut self) {
        assert!(self.mounted, "not mounted");
        kill_daemon(&self.mnt);
        self.mounted = false;
        assert!(
            !is_mounted(&self.mnt),
            "still mounted after kill + umount -l"
        );
    }

    /// Pids of the daemon(s) serving this mount.
    pub fn daemons(&self) -> Vec<i32> {
        daemon_pids(&self.mnt)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !self.mounted && !is_mounted(&self.mnt) {
            return;
        }
        let pids = daemon_pids(&self.mnt);
        let mut ok = false;
        for _ in 0..10 {
            let out = run_unchecked("umount", &[self.mnt.as_os_str()]);
            if out.status.success() || !is_mounted(&self.mnt) {
                ok = true;
                break;
            }
            sleep(Duration::from_millis(100));
        }
        if !ok {
            lazy_unmount(&self.mnt);
        }
        self.mounted = false;
        if !wait_pids_gone(&pids, Duration::from_secs(if ok { 20 } else { 3 })) {
            for &p in &pids {
                if pid_alive(p) {
                    unsafe {
                        libc::kill(p, libc::SIGKILL);
                    }
                }
            }
            wait_pids_gone(&pids, Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------
// Running code as another user.

pub const USER_A: (u32, u32) = (1000, 1000);
pub const USER_B: (u32, u32) = (65534, 65534);

/// Runs `f` in a forked child with uid/gid `uid`/`gid` and no
/// supplementary groups. Returns Ok(()) if `f` returned Ok, else the
/// errno it failed with (255 when unknown, 254 on panic).
pub fn as_user<F>(uid: u32, gid: u32, f: F) -> Result<(), i32>
where
    F: FnOnce() -> io::Result<()>,
{
    // Test mounts live under the temp dir; another user must be able to
    // walk into it, or every access fails EACCES for the wrong reason.
    let tmp = std::env::temp_dir();
    let mode = fs::metadata(&tmp)
        .map(|m| m.permissions().mode())
        .unwrap_or(0o777);
    assert!(
        mode & 0o001 != 0,
        "the temp dir {} has mode {:o}: other users cannot enter it, so tests that run as another user cannot reach their mounts (chmod o+x it, or use another TMPDIR)",
        tmp.display(),
        mode & 0o7777
    );
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                253
            } else {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    Ok(Ok(())) => 0,
                    Ok(Err(e)) => e.raw_os_error().unwrap_or(255).clamp(1, 255),
                    Err(_) => 254,
                }
            }
        };
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child killed: status {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        253 => panic!("child could not switch to uid {uid} gid {gid}"),
        254 => panic!("closure panicked in child running as uid {uid}"),
        c => Err(c),
    }
}

// ---------------------------------------------------------------------
// libc wrappers.

pub fn cpath<P: AsRef<Path>>(p: P) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).unwrap()
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Converts a libc return value (-1 = error) into an io::Result.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Asserts that `r` failed with `want` errno.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected errno {want} ({}), got Ok({v:?})",
            io::Error::from_raw_os_error(want)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(want),
            "{what}: expected {}, got {e}",
            io::Error::from_raw_os_error(want)
        ),
    }
}

pub fn statvfs(p: &Path) -> libc::statvfs {
    let c = cpath(p);
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    assert_eq!(
        r,
        0,
        "statvfs {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    s
}

/// Free bytes (f_bfree * f_frsize).
pub fn free_bytes(p: &Path) -> u64 {
    let s = statvfs(p);
    s.f_bfree * s.f_frsize
}

/// fsync a directory.
pub fn fsync_dir(p: &Path) {
    let d = fs::File::open(p).unwrap_or_else(|e| panic!("open dir {}: {e}", p.display()));
    d.sync_all()
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", p.display()));
}

/// Writes `data` to a new file and fsyncs it.
pub fn write_sync(p: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Asserts two byte slices are equal, reporting the first difference
/// instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: contents differ: len got {} want {}, first difference at byte {first} (got {:?} want {:?})",
        got.len(),
        want.len(),
        got.get(first),
        want.get(first)
    );
}

pub fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// A buffer aligned to 4096 bytes for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Polls `cond` every 50ms until true or `timeout`; returns the result.
pub fn wait_for<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// Small deterministic PRNG (xorshift64) so randomized tests reproduce
/// from their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}
