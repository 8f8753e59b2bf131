//! Concurrent use of one mount.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// Runs `ls -la DIR`; panics if it fails or takes longer than `limit`.
fn timed_ls(dir: &Path, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut child = Command::new("ls")
        .arg("-la")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "ls -la {} failed: {st}", dir.display());
            return start.elapsed();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ls -la {} did not finish within {limit:?} during a big write",
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// stat() in a helper thread; panics if it fails, if the file type is
/// not the expected one or if it does not answer in `limit`.
fn timed_stat(p: PathBuf, want_dir: bool, limit: Duration) -> Duration {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let shown = p.display().to_string();
    thread::spawn(move || {
        let r = fs::metadata(&p).map(|m| m.is_dir());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(is_dir)) if is_dir == want_dir => start.elapsed(),
        Ok(Ok(is_dir)) => panic!("stat {shown}: is_dir {is_dir}, expected {want_dir}"),
        Ok(Err(e)) => panic!("stat {shown} failed: {e}"),
        Err(_) => panic!("stat did not return within {limit:?} during a big write"),
    }
}

#[test]
fn metadata_ops_not_starved_by_big_write() {
    let img = Image::new("1G");
    let m = img.mount();
    for i in 0..50 {
        fs::write(m.join(format!("small{i}")), b"x").unwrap();
    }
    let big = m.join("big");
    let done = Arc::new(AtomicBool::new(false));
    let chunk = pseudo_random(42, MIB as usize);
    let writer = {
        let big = big.clone();
        let done = done.clone();
        let chunk = chunk.clone();
        thread::spawn(move || {
            // Write up to 400 MiB or 8 s, whichever comes first.
            let start = Instant::now();
            let mut f = File::create(&big).unwrap();
            let mut written = 0u64;
            while written < 400 * MIB && start.elapsed() < Duration::from_secs(8) {
                f.write_all(&chunk).unwrap();
                written += MIB;
            }
            f.sync_all().unwrap();
            done.store(true, Ordering::SeqCst);
            written
        })
    };
    // Let the writer get going.
    thread::sleep(Duration::from_millis(300));
    let limit = Duration::from_secs(10);
    let mut probes = 0;
    let mut worst = Duration::ZERO;
    while !done.load(Ordering::SeqCst) || probes < 5 {
        worst = worst.max(timed_ls(m.path(), limit));
        worst = worst.max(timed_stat(m.path().to_path_buf(), true, limit));
        worst = worst.max(timed_stat(m.join("small7"), false, limit));
        probes += 1;
        thread::sleep(Duration::from_millis(100));
    }
    let written = writer.join().unwrap();
    println!(
        "{probes} probes during a {} MiB write, slowest {worst:?}",
        written / MIB
    );
    assert!(written >= MIB, "writer wrote nothing");
    assert_eq!(fs::metadata(&big).unwrap().len(), written);
    // Spot-check the big file.
    let f = File::open(&big).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in [0, written / MIB / 2, written / MIB - 1] {
        f.read_exact_at(&mut buf, i * MIB).unwrap();
        assert_bytes_eq(&buf, &chunk, &format!("big file MiB {i}"));
    }
}

#[test]
fn parallel_writers_different_files() {
    let img = Image::new("256M");
    let mut m = img.mount();
    let mut handles = Vec::new();
    for t in 0..4u64 {
        let p = m.join(format!("writer{t}"));
        handles.push(thread::spawn(move || {
            let data = pseudo_random(1000 + t, 8 * MIB as usize + t as usize * 4099);
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .unwrap();
            // Varying chunk sizes so the writers interleave differently.
            let step = 4096 * (t as usize + 1) + 513;
            for c in data.chunks(step) {
                f.write_all(c).unwrap();
            }
            // Random-offset overwrites.
            for k in 0..64u64 {
                let off = (k * 131_071 * (t + 1)) % (data.len() as u64 - 100);
                f.write_all_at(&data[off as usize..off as usize + 100], off)
                    .unwrap();
            }
            f.sync_all().unwrap();
            let mut back = Vec::new();
            File::open(&p).unwrap().read_to_end(&mut back).unwrap();
            assert_bytes_eq(&back, &data, &format!("writer{t} read back"));
            data
        }));
    }
    let datas: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (t, d) in datas.iter().enumerate() {
        assert_bytes_eq(
            &fs::read(m.join(format!("writer{t}"))).unwrap(),
            d,
            &format!("writer{t} after join"),
        );
    }
    m.remount();
    for (t, d) in datas.iter().enumerate() {
        assert_bytes_eq(
            &fs::read(m.join(format!("writer{t}"))).unwrap(),
            d,
            &format!("writer{t} after remount"),
        );
    }
}

#[test]
fn parallel_creates_in_one_directory() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::create_dir(m.join("shared")).unwrap();
    let per_thread = 500;
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let d = m.join("shared");
            thread::spawn(move || {
                for i in 0..per_thread {
                    fs::write(d.join(format!("t{t}-{i}")), format!("{t}:{i}")).unwrap();
                    if i % 5 == 0 {
                        fs::remove_file(d.join(format!("t{t}-{i}"))).unwrap();
                    } else if i % 5 == 1 {
                        fs::rename(d.join(format!("t{t}-{i}")), d.join(format!("r{t}-{i}")))
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let check = |m: &Mounted| {
        let mut names: Vec<String> = fs::read_dir(m.join("shared"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names.len(),
            4 * per_thread * 4 / 5,
            "entries after parallel creates"
        );
        for t in 0..4 {
            for i in 0..per_thread {
                let (name, present) = match i % 5 {
                    0 => (format!("t{t}-{i}"), false),
                    1 => (format!("r{t}-{i}"), true),
                    _ => (format!("t{t}-{i}"), true),
                };
                let p = m.join("shared").join(&name);
                if present {
                    assert_eq!(
                        fs::read_to_string(&p).unwrap(),
                        format!("{t}:{i}"),
                        "{name}"
                    );
                } else {
                    assert!(!p.exists(), "{name} should be deleted");
                }
            }
        }
    };
    check(&m);
    m.remount();
    check(&m);
}
