//! `dmabuf-fs info | stats | token-copy`: the token API from the shell.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::client::{sealed_memfd, TokenFile};
use crate::uapi::{self, Counters};

pub fn info(path: &Path) -> Result<(), String> {
    let f = TokenFile::open(path, false).map_err(|e| format!("{}: {e}", path.display()))?;
    let i = f.info().map_err(|e| {
        format!(
            "{}: INFO failed ({e}): not on a dmabuf-fs mount?",
            path.display()
        )
    })?;
    let backend = match i.backend {
        uapi::BACKEND_KERNEL => "kernel (io_uring READ_FIXED/WRITE_FIXED on registered buffers)",
        _ => "mapped (O_DIRECT into the daemon's mapping)",
    };
    println!("abi version:  {}", i.abi_version);
    println!("backend:      {backend}");
    println!("reason:       {}", i.reason());
    println!("fast align:   {} bytes", i.fast_align);
    println!("max batch:    {} ops", i.max_batch);
    println!("max io:       {} bytes", i.max_io);
    let names = [
        (uapi::FEAT_BATCH, "batch"),
        (uapi::FEAT_STATS, "stats"),
        (uapi::FEAT_UNALIGNED, "unaligned"),
        (uapi::FEAT_MEMFD, "memfd"),
        (uapi::FEAT_DMABUF, "dmabuf"),
        (uapi::FEAT_LIMITS, "limits"),
    ];
    let feats: Vec<&str> = names
        .iter()
        .filter(|(b, _)| i.features & b != 0)
        .map(|(_, n)| *n)
        .collect();
    println!("features:     {}", feats.join(" "));
    Ok(())
}

fn print_counters(c: &Counters) {
    println!(
        "read:  {} ops, {} bytes\nwrite: {} ops, {} bytes\nerrors: {}, unaligned: {}, fallback: {}, kernel: {}",
        c.read_ops,
        c.read_bytes,
        c.write_ops,
        c.write_bytes,
        c.errors,
        c.unaligned_ops,
        c.fallback_ops,
        c.kernel_ops
    );
}

pub fn stats(path: &Path) -> Result<(), String> {
    let f = TokenFile::open(path, false).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = f
        .stats(0)
        .map_err(|e| format!("{}: STATS failed: {e}", path.display()))?;
    println!("{}: {} live token(s)", path.display(), s.live_tokens);
    print_counters(&s.c);
    if f.info().is_ok_and(|i| i.features & uapi::FEAT_LIMITS != 0) {
        println!(
            "limits: {} tokens per open file, {} per user, {} bytes registered per user\n\
             you:    {} tokens, {} bytes registered; detached ops: {}",
            s.max_tokens_per_file,
            s.max_tokens_per_user,
            s.max_pinned_per_user,
            s.user_tokens,
            s.user_pinned,
            s.detached_ops
        );
    }
    Ok(())
}

/// Copies FILE into a fresh sealed memfd through token READs (or a source
/// file into FILE through token WRITEs) and checks the bytes.
pub fn copy(path: &Path, from: Option<&Path>, chunk: u64, verify: bool) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let chunk = chunk.max(4096) / 4096 * 4096;
    match from {
        None => {
            let f =
                TokenFile::open(path, false).map_err(|e| err(&path.display().to_string(), e))?;
            let size = f.file().metadata().map_err(|e| err("stat", e))?.len();
            let buf = sealed_memfd("dmabuf-fs token-copy", size).map_err(|e| err("memfd", e))?;
            let token = f.register(&buf, 0, 0).map_err(|e| err("REGISTER", e))?;
            let start = Instant::now();
            let mut off = 0;
            while off < size {
                let n = token
                    .read(off, off, chunk.min(size - off))
                    .map_err(|e| err("READ", e))?;
                if n == 0 {
                    break;
                }
                off += n;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "token READ: {} bytes of {} into a memfd in {:.3} s ({:.1} MiB/s)",
                off,
                path.display(),
                secs,
                off as f64 / (1 << 20) as f64 / secs.max(1e-9)
            );
            if verify {
                compare(&buf, f.file(), size)?;
                println!("verify: memfd matches read() of the file");
            }
            let s = token.stats().map_err(|e| err("STATS", e))?;
            print_counters(&s.c);
        }
        Some(src) => {
            let mut input = File::open(src).map_err(|e| err(&src.display().to_string(), e))?;
            let size = input.metadata().map_err(|e| err("stat", e))?.len();
            let mut buf =
                sealed_memfd("dmabuf-fs token-copy", size).map_err(|e| err("memfd", e))?;
            std::io::copy(&mut input, &mut buf).map_err(|e| err("filling the memfd", e))?;
            let out = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| err(&path.display().to_string(), e))?;
            let f = TokenFile::from_file(out);
            let token = f.register(&buf, 0, 0).map_err(|e| err("REGISTER", e))?;
            let start = Instant::now();
            let mut off = 0;
            while off < size {
                let n = token
                    .write(off, off, chunk.min(size - off))
                    .map_err(|e| err("WRITE", e))?;
                if n == 0 {
                    return Err("WRITE moved nothing: device full?".into());
                }
                off += n;
            }
            f.file().sync_all().map_err(|e| err("fsync", e))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "token WRITE: {} bytes from {} into {} in {:.3} s ({:.1} MiB/s)",
                off,
                src.display(),
                path.display(),
                secs,
                off as f64 / (1 << 20) as f64 / secs.max(1e-9)
            );
            if verify {
                compare(&buf, f.file(), size)?;
                println!("verify: read() of the file matches the source");
            }
        }
    }
    Ok(())
}

/// Compares the first `size` bytes of a memfd and a file.
fn compare(mut memfd: &File, file: &File, size: u64) -> Result<(), String> {
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    memfd.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(a.len() as u64) as usize;
        memfd
            .read_exact(&mut a[..n])
            .map_err(|e| format!("reading the memfd: {e}"))?;
        file.read_exact_at(&mut b[..n], off)
            .map_err(|e| format!("reading the file: {e}"))?;
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Err(format!(
                "verify FAILED: first difference at byte {}",
                off + i as u64
            ));
        }
        off += n as u64;
    }
    let _ = std::io::stdout().flush();
    Ok(())
}
