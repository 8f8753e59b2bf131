//! The `dmabuf-fs` command: mkfs, mount (and its daemon), fsck.

mod daemon;
mod options;
mod token;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::blockdev::{BlockDevice, FileDevice, OpenMode};
use crate::format::{self, BLOCK_SIZE, RECOGNISE_BYTES};
use crate::fs::{self, check, Caller};

pub use options::{parse_size, MountOpts};

#[derive(Parser)]
#[command(
    name = "dmabuf-fs",
    version,
    about = "A crash-safe FUSE filesystem with dmabuf token I/O"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format TARGET (an image file, created sparse if missing, or a block device).
    Mkfs {
        target: PathBuf,
        /// Size of a new image: bytes or a number with K, M, G or T.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Overwrite an existing filesystem.
        #[arg(long, short)]
        force: bool,
    },
    /// Mount TARGET on MOUNTPOINT; returns once the mount is live.
    Mount {
        target: PathBuf,
        mountpoint: PathBuf,
        /// Comma-separated options: ro, rw, allow_other, default_permissions,
        /// threads=N, commit=SECONDS, dirty_limit=SIZE, noatime, remount,
        /// log=FILE, token_max_*, and the
        /// generic ones mount(8) passes.
        #[arg(short = 'o', action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// Stay in the foreground (logs to stderr).
        #[arg(long, short = 'f')]
        foreground: bool,
        /// Internal: fd on which a background daemon reports readiness.
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
    },
    /// Show what the token API of the mount holding PATH offers.
    Info { path: PathBuf },
    /// Show token counters of the file PATH.
    Stats { path: PathBuf },
    /// Copy FILE into a sealed memfd with token READs (default), or a local
    /// file into FILE with token WRITEs (--from-memfd SRC), and verify.
    TokenCopy {
        file: PathBuf,
        /// File -> memfd through token READ (the default).
        #[arg(long, conflicts_with = "from_memfd")]
        to_memfd: bool,
        /// SRC -> memfd -> FILE through token WRITE.
        #[arg(long, value_name = "SRC")]
        from_memfd: Option<PathBuf>,
        /// Compare the result with ordinary read() of the file.
        #[arg(long)]
        verify: bool,
        /// Bytes per ioctl.
        #[arg(long, value_parser = parse_size, default_value = "8M")]
        chunk: u64,
    },
    /// Check TARGET; exit 0 clean, 1 repaired, 4 errors left, 8 could not check.
    Fsck {
        target: PathBuf,
        /// Fix what is found.
        #[arg(long)]
        repair: bool,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mkfs {
            target,
            size,
            force,
        } => report(mkfs(&target, size, force)),
        Cmd::Mount {
            target,
            mountpoint,
            options,
            foreground,
            ready_fd,
        } => {
            let opts = match MountOpts::parse(&options.join(",")) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("dmabuf-fs: {e}");
                    return 1;
                }
            };
            if opts.remount {
                return report(daemon::remount(&mountpoint, &opts));
            }
            if foreground || ready_fd.is_some() {
                daemon::run_foreground(&target, &mountpoint, &opts, ready_fd)
            } else {
                daemon::spawn_background(&target, &mountpoint, &options.join(","))
            }
        }
        Cmd::Info { path } => report(token::info(&path)),
        Cmd::Stats { path } => report(token::stats(&path)),
        Cmd::TokenCopy {
            file,
            to_memfd: _,
            from_memfd,
            verify,
            chunk,
        } => report(token::copy(&file, from_memfd.as_deref(), chunk, verify)),
        Cmd::Fsck { target, repair } => {
            init_logging(None);
            fsck(&target, repair)
        }
    }
}

fn report(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("dmabuf-fs: {e}");
            1
        }
    }
}

/// Sets up `log` output: RUST_LOG decides the level (default info for the
/// daemon, warn otherwise).
pub(crate) fn init_logging(default: Option<&str>) {
    let env = env_logger::Env::default().default_filter_or(default.unwrap_or("warn"));
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
}

fn mkfs(target: &Path, size: Option<u64>, force: bool) -> Result<(), String> {
    init_logging(None);
    let open = |read_only| {
        FileDevice::open(
            target,
            OpenMode {
                read_only,
                lock_wait: Duration::from_secs(2),
                ..OpenMode::default()
            },
        )
        .map_err(|e| format!("cannot open {}: {e}", target.display()))
    };
    let set_len = |f: &std::fs::File, s: u64| {
        f.set_len(s / BLOCK_SIZE * BLOCK_SIZE)
            .map_err(|e| format!("cannot size {}: {e}", target.display()))
    };
    if !target.exists() {
        let s = size.ok_or_else(|| {
            format!(
                "{} does not exist: give --size to create an image",
                target.display()
            )
        })?;
        let f = std::fs::File::create_new(target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        set_len(&f, s)?;
    } else {
        // Look before touching anything.
        if let Some(what) = recognised(&open(true)?) {
            if !force {
                return Err(format!(
                    "{} already holds a {what} filesystem; use --force to overwrite it",
                    target.display()
                ));
            }
        }
        if let Some(s) = size {
            if std::fs::metadata(target).is_ok_and(|m| m.is_file()) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(target)
                    .map_err(|e| e.to_string())?;
                set_len(&f, s)?;
            }
        }
    }
    let dev = open(false)?;
    let owner = Caller {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    let summary = fs::format(&dev, owner).map_err(|e| format!("mkfs failed: {e}"))?;
    let sb = summary.superblock;
    println!(
        "dmabuf-fs: formatted {} ({}): {} blocks of 4 KiB, log {} blocks, data {} blocks, uuid {}",
        target.display(),
        dev.describe(),
        sb.total_blocks,
        sb.log_blocks,
        sb.data_end() - sb.data_start(),
        hex(&sb.uuid)
    );
    Ok(())
}

fn recognised(dev: &FileDevice) -> Option<&'static str> {
    let n = (RECOGNISE_BYTES as u64).min(dev.size() / BLOCK_SIZE * BLOCK_SIZE) as usize;
    let mut head = vec![0u8; n];
    dev.read_at(0, &mut head).ok()?;
    format::recognise(&head)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fsck(target: &Path, repair: bool) -> i32 {
    let dev = match FileDevice::open(
        target,
        OpenMode {
            read_only: !repair,
            ..OpenMode::default()
        },
    ) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("dmabuf-fs fsck: cannot open {}: {e}", target.display());
            return 8;
        }
    };
    let r = match check::fsck(dev.as_ref(), repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmabuf-fs fsck: {}: {e}", target.display());
            return if matches!(e, fs::FsError::Corrupt(_)) {
                4
            } else {
                8
            };
        }
    };
    println!(
        "{}: checkpoint {}, {} inodes, {} blocks used, {} free",
        target.display(),
        r.checkpoint_seq,
        r.inodes,
        r.used_blocks,
        r.free_blocks
    );
    for n in &r.notes {
        println!("note: {n}");
    }
    for p in &r.problems {
        let how = if p.is_orphan() { "orphan" } else { "problem" };
        println!("{how}: {p}");
    }
    let real: Vec<_> = r.remaining.iter().filter(|p| !p.is_orphan()).collect();
    if r.repaired {
        println!("repaired: {} problem(s) fixed", r.problems.len());
        1
    } else if real.is_empty() {
        let orphans = r.problems.len();
        if orphans > 0 {
            println!("clean ({orphans} orphan(s) will be reclaimed at the next mount)");
        } else {
            println!("clean");
        }
        0
    } else {
        println!("{} problem(s) found; run with --repair to fix", real.len());
        4
    }
}
