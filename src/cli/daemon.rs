//! `dmabuf-fs mount`: the daemon that serves a mount, started in the
//! background so the command returns only once the mount is live.
//!
//! The parent re-executes itself with `--ready-fd`, a pipe the daemon
//! writes "ok" (or its error) to once the FUSE handshake is done.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use log::{error, info};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::statvfs::{statvfs, FsFlags};

use super::options::MountOpts;
use crate::blockdev::fault::FailingDevice;
use crate::blockdev::undo::UndoDevice;
use crate::blockdev::{BlockDevice, FileDevice, OpenMode};
use crate::fs::{Fs, MountOptions};
use crate::fuse::{self, MountConfig};
use crate::tokens;

const READY: &[u8] = b"ok";

/// Starts the daemon and waits for it to report the mount live or fail.
pub fn spawn_background(target: &Path, mountpoint: &Path, options: &str) -> i32 {
    let (read_end, write_end) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("dmabuf-fs: pipe: {e}");
            return 1;
        }
    };
    // Only the write end crosses exec.
    if let Err(e) = fcntl(&write_end, FcntlArg::F_SETFD(FdFlag::empty())) {
        eprintln!("dmabuf-fs: fcntl: {e}");
        return 1;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("dmabuf-fs: cannot find own executable: {e}");
            return 1;
        }
    };
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg(target).arg(mountpoint);
    if !options.is_empty() {
        cmd.arg("-o").arg(options);
    }
    cmd.arg("--ready-fd")
        .arg(write_end.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dmabuf-fs: cannot start the daemon: {e}");
            return 1;
        }
    };
    drop(write_end);
    let mut msg = Vec::new();
    let _ = File::from(read_end).read_to_end(&mut msg);
    if msg == READY {
        return 0;
    }
    let status = child.wait();
    if msg.is_empty() {
        eprintln!("dmabuf-fs: the daemon exited before the mount was live ({status:?})");
    } else {
        eprintln!("dmabuf-fs: {}", String::from_utf8_lossy(&msg));
    }
    1
}

/// Serves the mount in this process until it is unmounted.
pub fn run_foreground(
    target: &Path,
    mountpoint: &Path,
    opts: &MountOpts,
    ready_fd: Option<i32>,
) -> i32 {
    // SAFETY: the fd number was passed by our parent for exactly this use
    // and nothing else in this process owns it.
    let mut ready = ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    if ready.is_some() {
        // Outlive the shell that started us.
        let _ = nix::unistd::setsid();
    }
    if let Some(path) = &opts.log {
        if let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // Logs go to the file; env_logger writes to stderr.
            let _ = nix::unistd::dup2_stderr(f);
        }
    }
    super::init_logging(Some("info,fuser=error"));
    let mut notify = |msg: &[u8]| {
        if let Some(mut f) = ready.take() {
            let _ = f.write_all(msg);
        }
    };
    match serve(target, mountpoint, opts, &mut notify) {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            if ready_fd.is_some() {
                notify(e.as_bytes());
            } else {
                eprintln!("dmabuf-fs: {e}");
            }
            1
        }
    }
}

fn serve(
    target: &Path,
    mountpoint: &Path,
    opts: &MountOpts,
    notify: &mut dyn FnMut(&[u8]),
) -> Result<(), String> {
    // Termination signals unmount cleanly instead of killing the daemon;
    // blocked here so every thread started below inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| format!("sigprocmask: {e}"))?;

    raise_fd_limit();
    let source = target
        .canonicalize()
        .map_err(|e| format!("cannot open {}: {e}", target.display()))?;
    if !mountpoint.is_dir() {
        return Err(format!(
            "mount point {} is not a directory",
            mountpoint.display()
        ));
    }
    let mut dev = FileDevice::open(
        &source,
        OpenMode {
            read_only: opts.read_only,
            ..OpenMode::default()
        },
    )
    .map_err(|e| format!("cannot open {}: {e}", source.display()))?;
    let plain = opts.test_fail_after.is_none() && opts.test_undo_log.is_none();
    let backend = tokens::choose(opts.tokens, &mut dev, plain)?;
    let mut dev: Arc<dyn BlockDevice> = Arc::new(dev);
    if let Some(n) = opts.test_fail_after {
        dev = Arc::new(FailingDevice::new(dev, n));
    }
    if let Some(log) = &opts.test_undo_log {
        let undo = UndoDevice::new(dev, log).map_err(|e| format!("{}: {e}", log.display()))?;
        dev = Arc::new(undo);
    }
    let fs = Fs::mount(
        dev,
        MountOptions {
            read_only: opts.read_only,
            commit_interval: opts.commit,
            atime: opts.atime,
            nodiratime: opts.nodiratime,
            dirty_limit: opts.dirty_limit,
            background_writeback: true,
        },
    )
    .map_err(|e| format!("cannot mount {}: {e}", source.display()))?;
    let cfg = MountConfig {
        fsname: source.display().to_string(),
        read_only: opts.read_only,
        // As root this is a system mount: every user may use it, and the
        // kernel enforces permissions (default_permissions).
        allow_other: opts.allow_other.unwrap_or(nix::unistd::geteuid().is_root()),
        threads: opts.threads,
        flags: kernel_flags(&opts.flags),
    };
    let tokens = Arc::new(tokens::Registry::new(backend, opts.token_limits));
    let session = match fuse::mount(fs.clone(), tokens.clone(), mountpoint, &cfg) {
        Ok(s) => s,
        Err(e) => {
            let _ = fs.unmount();
            return Err(format!("cannot mount on {}: {e}", mountpoint.display()));
        }
    };
    info!(
        "{} mounted on {} ({} threads)",
        source.display(),
        mountpoint.display(),
        cfg.threads
    );
    raise_readahead(mountpoint);
    match tokens::mount_dev_of(mountpoint) {
        Some(dev) => tokens.set_mount_dev(dev),
        None => log::warn!(
            "mount not found in /proc/self/mountinfo: REGISTER cannot check that the caller still holds the file"
        ),
    }
    notify(READY);

    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                info!("{sig}: unmounting {}", mp.display());
                if let Err(e) = umount2(&mp, MntFlags::MNT_DETACH) {
                    error!("unmount of {} failed: {e}", mp.display());
                }
            }
        })
        .map_err(|e| e.to_string())?;

    let served = session.run();
    let closed = fs.unmount();
    if let Err(e) = &served {
        error!("FUSE session ended with an error: {e}");
    }
    closed.map_err(|e| format!("final commit failed: {e}"))
}

/// Every token holds an fd of the caller's buffer, so the soft fd limit
/// (often 1024) would cap the whole mount at about a thousand tokens:
/// raise it to the hard limit. Running out anyway is ENFILE to REGISTER.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        log::warn!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let soft = lim.rlim_cur;
    if soft >= lim.rlim_max {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        info!("fd limit raised from {soft} to {}", lim.rlim_max);
    } else {
        log::warn!(
            "fd limit left at {soft}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The kernel flags of the mount. fuser defaults to nodev,nosuid; a root
/// mount behaves like any other filesystem mounted by root (device nodes
/// and setuid binaries work) unless asked otherwise.
fn kernel_flags(asked: &[fuser::MountOption]) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    let mut flags = asked.to_vec();
    if nix::unistd::geteuid().is_root() {
        if !flags.contains(&M::NoDev) {
            flags.push(M::Dev);
        }
        if !flags.contains(&M::NoSuid) {
            flags.push(M::Suid);
        }
    }
    flags
}

/// FUSE mounts start with the kernel's default 128 KiB readahead, which
/// also caps the size of the read requests the daemon sees. Sequential
/// readers do far better with 1 MiB (the largest request we accept), so
/// raise it through the mount's bdi in sysfs (root only; best effort).
/// The device number comes from mountinfo: a stat() of the mount point
/// would wait for this very daemon, which is not serving yet.
fn raise_readahead(mountpoint: &Path) {
    let Ok(mp) = mountpoint.canonicalize() else {
        return;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // Fields: id parent major:minor root mountpoint options ... - type ...
    let dev = info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let ours = f.len() > 4
            && Path::new(&f[4].replace("\\040", " ")) == mp
            && (l.contains(" - fuse ") || l.contains(" - fuse.dmabuf-fs "));
        ours.then(|| f[2].to_string())
    });
    let Some(dev) = dev else {
        return;
    };
    let bdi = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&bdi, "1024") {
        Ok(()) => info!("readahead raised to 1 MiB ({bdi})"),
        Err(e) => info!("readahead left at the kernel default: {bdi}: {e}"),
    }
}

/// `-o remount,...`: change the flags of the live mount; no new daemon.
pub fn remount(mountpoint: &Path, opts: &MountOpts) -> Result<(), String> {
    let mp = mountpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
    let ours = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _src = f.next();
        let dir = f.next().unwrap_or("").replace("\\040", " ");
        let ty = f.next().unwrap_or("");
        Path::new(&dir) == mp && (ty == "fuse" || ty == "fuse.dmabuf-fs")
    });
    if !ours {
        return Err(format!(
            "{} is not a FUSE mount: nothing to remount",
            mp.display()
        ));
    }
    // MS_REMOUNT replaces the per-mount flags: keep the ones in force.
    let mut flags = MsFlags::MS_REMOUNT;
    let current = statvfs(&mp).map_err(|e| format!("{}: {e}", mp.display()))?;
    for (have, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.flags().contains(have) {
            flags |= keep;
        }
    }
    if opts.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    for f in &opts.flags {
        flags |= match f {
            fuser::MountOption::NoSuid => MsFlags::MS_NOSUID,
            fuser::MountOption::NoDev => MsFlags::MS_NODEV,
            fuser::MountOption::NoExec => MsFlags::MS_NOEXEC,
            fuser::MountOption::NoAtime => MsFlags::MS_NOATIME,
            fuser::MountOption::Sync => MsFlags::MS_SYNCHRONOUS,
            fuser::MountOption::DirSync => MsFlags::MS_DIRSYNC,
            _ => MsFlags::empty(),
        };
    }
    mount(None::<&str>, &mp, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remount of {} failed: {e}", mp.display()))
}
