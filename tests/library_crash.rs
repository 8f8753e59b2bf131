//! Crash safety of the `fs` layer on a simulated device: random
//! workloads, "power cut" at many points (unflushed writes dropped, or a
//! random subset of them kept), then remount and check.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::Rng;
use dmabuf_fs::blockdev::{BlockDevice, MemDevice};
use dmabuf_fs::fs::{self, check, Caller, Fs, MountOptions, RenameMode, ROOT_INO};

const ROOT: Caller = Caller { uid: 0, gid: 0 };

fn opts() -> MountOptions {
    MountOptions {
        commit_interval: Duration::from_secs(3600),
        ..MountOptions::default()
    }
}

fn fresh(size: u64) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::new(size));
    fs::format(dev.as_ref(), ROOT).unwrap();
    dev.flush().unwrap();
    dev
}

fn mount(dev: &Arc<MemDevice>) -> Arc<Fs> {
    Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts()).unwrap()
}

/// Every file's bytes carry its inode's tag, so foreign (stale) data
/// shows. Inode numbers are never reused, and a run makes < 250 files.
fn tag(ino: u64) -> u8 {
    (ino % 251) as u8 + 1
}

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    fs.read(ino, 0, size as usize).unwrap().to_vec()
}

fn check_after_crash(img: Vec<u8>, durable: &HashMap<String, Vec<u8>>, seed: u64, point: usize) {
    let dev = Arc::new(MemDevice::from_bytes(img));
    let report = check::fsck(dev.as_ref(), false)
        .unwrap_or_else(|e| panic!("seed {seed} point {point}: fsck could not read: {e}"));
    let bad: Vec<_> = report.remaining.iter().filter(|p| !p.is_orphan()).collect();
    assert!(bad.is_empty(), "seed {seed} point {point}: fsck: {bad:?}");
    let fs = mount(&dev);
    let mut seen = HashMap::new();
    fs.readdir(ROOT_INO, 0, |e| {
        if e.name != b"." && e.name != b".." {
            seen.insert(String::from_utf8(e.name.to_vec()).unwrap(), e.ino);
        }
        false
    })
    .unwrap();
    for (name, ino) in &seen {
        let data = read_all(&fs, *ino);
        assert!(
            data.iter().all(|&b| b == 0 || b == tag(*ino)),
            "seed {seed} point {point}: {name} holds bytes it never had"
        );
    }
    for (name, want) in durable {
        let ino = seen
            .get(name)
            .unwrap_or_else(|| panic!("seed {seed} point {point}: fsynced {name} is gone"));
        assert_eq!(
            &read_all(&fs, *ino),
            want,
            "seed {seed} point {point}: fsynced {name} differs"
        );
    }
    fs.unmount().unwrap();
}

/// One random workload over a handful of names, with a simulated power
/// cut every few steps; returns the number of crash points tried.
fn run_seed(seed: u64, ops: usize) -> usize {
    let mut rng = Rng::new(seed);
    let dev = fresh(16 << 20);
    let fs = mount(&dev);
    let mut live: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut durable: HashMap<String, Vec<u8>> = HashMap::new();
    let mut touched: Vec<String> = Vec::new();
    let mut points = 0;
    let mut tmp = 0u64;
    for step in 0..ops {
        let name = format!("n{}", rng.below(12));
        match rng.below(10) {
            0 | 1 if !live.contains_key(&name) => {
                let (a, fh) = fs
                    .create(ROOT, ROOT_INO, name.as_bytes(), 0o644, true, true)
                    .unwrap();
                fs.release(fh).unwrap();
                live.insert(name.clone(), (a.ino, Vec::new()));
                touched.push(name);
            }
            2..=4 if live.contains_key(&name) => {
                let (ino, content) = live.get_mut(&name).unwrap();
                let off = rng.below(200_000);
                let len = 1 + rng.below(70_000) as usize;
                let data = vec![tag(*ino); len];
                fs.write(*ino, off, &data).unwrap();
                let end = off as usize + len;
                if content.len() < end {
                    content.resize(end, 0);
                }
                content[off as usize..end].copy_from_slice(&data);
                touched.push(name);
            }
            5 if live.contains_key(&name) => {
                let (ino, content) = live.get_mut(&name).unwrap();
                let size = rng.below(150_000);
                let set = fs::SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                fs.setattr(*ino, &set).unwrap();
                content.resize(size as usize, 0);
                touched.push(name);
            }
            6 if live.contains_key(&name) => {
                fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                live.remove(&name);
                touched.push(name);
            }
            7 => {
                // Write a temp file, fsync it, rename it over `name`.
                tmp += 1;
                let t = format!("tmp{tmp}");
                let (a, fh) = fs
                    .create(ROOT, ROOT_INO, t.as_bytes(), 0o644, true, true)
                    .unwrap();
                let data = vec![tag(a.ino); 1 + rng.below(50_000) as usize];
                fs.write(a.ino, 0, &data).unwrap();
                fs.fsync(a.ino).unwrap();
                fs.release(fh).unwrap();
                fs.rename(
                    ROOT_INO,
                    t.as_bytes(),
                    ROOT_INO,
                    name.as_bytes(),
                    RenameMode::Replace,
                )
                .unwrap();
                live.insert(name.clone(), (a.ino, data));
                touched.push(name);
            }
            _ => {
                // Crash inside the commit too: before each of its flushes,
                // with a random subset of the writes it is making durable.
                let stable: HashMap<String, Vec<u8>> = durable
                    .iter()
                    .filter(|(n, _)| !touched.contains(n))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut r3 = Rng::new(seed.wrapping_mul(31) + step as u64);
                let inner = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let count = inner.clone();
                dev.set_flush_hook(Some(Box::new(move |durable_img, unflushed| {
                    let mut img = durable_img.to_vec();
                    for (off, data) in unflushed {
                        if r3.below(2) == 0 {
                            img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                        }
                    }
                    check_after_crash(img, &stable, seed, step);
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })));
                fs.fsync(ROOT_INO).unwrap();
                dev.set_flush_hook(None);
                points += inner.load(std::sync::atomic::Ordering::Relaxed);
                durable = live.iter().map(|(k, v)| (k.clone(), v.1.clone())).collect();
                touched.clear();
            }
        }
        if step % 3 == 0 {
            let stable: HashMap<String, Vec<u8>> = durable
                .iter()
                .filter(|(n, _)| !touched.contains(n))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut r2 = Rng::new(seed ^ (step as u64 + 7));
            let img = if step % 2 == 0 {
                dev.crash_image(|_, _, _| false)
            } else {
                dev.crash_image(|_, _, _| r2.below(2) == 0)
            };
            check_after_crash(img, &stable, seed, step);
            points += 1;
        }
    }
    fs.unmount().unwrap();
    // A clean unmount leaves exactly the live state.
    let dev2 = Arc::new(MemDevice::from_bytes(dev.snapshot()));
    let fs2 = mount(&dev2);
    for (name, (_, content)) in &live {
        let a = fs2.lookup(ROOT_INO, name.as_bytes()).unwrap();
        assert_eq!(
            &read_all(&fs2, a.ino),
            content,
            "seed {seed}: {name} after unmount"
        );
    }
    points
}

#[test]
fn random_workloads_survive_power_cuts() {
    let mut points = 0;
    for seed in 1..=12 {
        points += run_seed(seed, 150);
    }
    println!("crash points tried: {points}");
    assert!(points >= 500, "only {points} crash points");
}

#[test]
fn fsynced_data_survives_and_deleted_data_never_reappears() {
    let dev = fresh(8 << 20);
    let fs = mount(&dev);
    let (a, fh) = fs
        .create(ROOT, ROOT_INO, b"old", 0o644, true, true)
        .unwrap();
    fs.write(a.ino, 0, &vec![0xAA; 1 << 20]).unwrap();
    fs.release(fh).unwrap();
    fs.fsync(a.ino).unwrap();
    fs.unlink(ROOT_INO, b"old").unwrap();
    fs.fsync(ROOT_INO).unwrap();
    // Its blocks are free now; a new file may take them.
    let (b, fh) = fs
        .create(ROOT, ROOT_INO, b"new", 0o644, true, true)
        .unwrap();
    fs.write(b.ino, 0, &vec![0x55; 1 << 20]).unwrap();
    fs.setattr(
        b.ino,
        &fs::SetAttr {
            size: Some(3 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    fs.release(fh).unwrap();
    // Crash before any fsync of "new": whatever survives must not show 0xAA.
    for keep_all in [false, true] {
        let img = dev.crash_image(|_, _, _| keep_all);
        let dev2 = Arc::new(MemDevice::from_bytes(img));
        let fs2 = mount(&dev2);
        assert!(fs2.lookup(ROOT_INO, b"old").is_err());
        if let Ok(n) = fs2.lookup(ROOT_INO, b"new") {
            let d = read_all(&fs2, n.ino);
            assert!(d.iter().all(|&x| x == 0 || x == 0x55));
        }
    }
}

#[test]
fn orphans_are_reclaimed_after_a_crash() {
    let dev = fresh(8 << 20);
    let fs = mount(&dev);
    let free0 = fs.statfs().bfree;
    let (a, _fh) = fs
        .create(ROOT, ROOT_INO, b"tmp", 0o644, true, true)
        .unwrap();
    fs.write(a.ino, 0, &vec![1; 2 << 20]).unwrap();
    fs.unlink(ROOT_INO, b"tmp").unwrap();
    // Still open: the data lives.
    assert_eq!(&fs.read(a.ino, 0, 4).unwrap()[..], [1; 4]);
    fs.fsync(a.ino).unwrap();
    let img = dev.crash_image(|_, _, _| false);
    let dev2 = Arc::new(MemDevice::from_bytes(img));
    let report = check::fsck(dev2.as_ref(), false).unwrap();
    assert!(report.problems.iter().any(|p| p.is_orphan()));
    let fs2 = mount(&dev2);
    assert!(fs2.getattr(a.ino).is_err(), "orphan inode still present");
    assert!(
        fs2.statfs().bfree + 8 >= free0,
        "orphan blocks not reclaimed"
    );
    fs2.unmount().unwrap();
    let report = check::fsck(dev2.as_ref(), false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn torn_and_corrupt_metadata_is_refused_not_panicked() {
    let dev = fresh(8 << 20);
    let fs = mount(&dev);
    fs.mkdir(ROOT, ROOT_INO, b"d", 0o755).unwrap();
    fs.unmount().unwrap();
    let good = dev.snapshot();
    let mut rng = Rng::new(99);
    for i in 0..200 {
        let mut img = good.clone();
        match i % 4 {
            0 => {
                let at = rng.below(64 * 4096) as usize;
                img[at] ^= 1 << rng.below(8);
            }
            1 => img.truncate(rng.below(img.len() as u64) as usize / 4096 * 4096),
            2 => {
                let at = rng.below(64) as usize * 4096;
                img[at..at + 4096].fill(0);
            }
            _ => {
                let (a, b) = (rng.below(40) as usize, rng.below(40) as usize);
                let blk_a = img[a * 4096..(a + 1) * 4096].to_vec();
                let blk_b = img[b * 4096..(b + 1) * 4096].to_vec();
                img[a * 4096..(a + 1) * 4096].copy_from_slice(&blk_b);
                img[b * 4096..(b + 1) * 4096].copy_from_slice(&blk_a);
            }
        }
        let d = Arc::new(MemDevice::from_bytes(img));
        // Either refused with an error or mounted consistently.
        let _ = check::fsck(d.as_ref(), false);
        if let Ok(fs) = Fs::mount(d.clone() as Arc<dyn BlockDevice>, opts()) {
            let _ = fs.readdir(ROOT_INO, 0, |_| false);
            let _ = fs.unmount();
        }
    }
}
