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

/// A device whose writes and flushes fail while `failing` is set, and
/// whose flushes take a while then.
struct Flaky {
    inner: Arc<MemDevice>,
    failing: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), dmabuf_fs::blockdev::DeviceError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        Ok(())
    }
}

impl BlockDevice for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn submit(
        &self,
        dir: dmabuf_fs::blockdev::Direction,
        buf: &dmabuf_fs::blockdev::IoBuffer<'_>,
        ranges: &[dmabuf_fs::blockdev::IoRange],
    ) -> Result<(), dmabuf_fs::blockdev::DeviceError> {
        if dir == dmabuf_fs::blockdev::Direction::Write {
            self.check()?;
        }
        self.inner.submit(dir, buf, ranges)
    }
    fn flush(&self) -> Result<(), dmabuf_fs::blockdev::DeviceError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(400));
        }
        self.check()?;
        self.inner.flush()
    }
    fn describe(&self) -> String {
        "flaky test device".into()
    }
}

#[test]
fn a_failed_commit_fails_every_later_fsync() {
    let mem = fresh(16 << 20);
    let dev = Arc::new(Flaky {
        inner: mem.clone(),
        failing: false.into(),
    });
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts()).unwrap();
    let (kept, fh) = fs
        .create(ROOT, ROOT_INO, b"kept", 0o644, true, true)
        .unwrap();
    fs.release(fh).unwrap();
    fs.fsync(kept.ino).unwrap();
    let (lost, fh) = fs
        .create(ROOT, ROOT_INO, b"lost", 0o644, true, true)
        .unwrap();
    fs.release(fh).unwrap();
    dev.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    // A periodic commit takes the queue and fails slowly; an fsync that
    // arrives meanwhile waits behind it and must not find "nothing to do".
    let periodic = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.commit())
    };
    std::thread::sleep(Duration::from_millis(100));
    let waiting = fs.fsync(lost.ino);
    let first = periodic
        .join()
        .unwrap()
        .expect_err("commit on a failing device");
    assert_eq!(first.errno(), libc::EIO);
    let waiting = waiting.expect_err("an fsync behind a failed commit returned 0");
    assert_eq!(waiting.errno(), libc::EIO, "{waiting}");
    // The device works again, but what the failed commit carried is gone:
    // no later fsync may claim otherwise, and no change is taken.
    dev.failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..2 {
        let again = fs.fsync(lost.ino).expect_err("fsync after a failed commit");
        assert_eq!(again.errno(), libc::EIO, "{again}");
    }
    let refused = fs
        .create(ROOT, ROOT_INO, b"later", 0o644, true, true)
        .expect_err("a change after a failed commit");
    assert_eq!(refused.errno(), libc::EROFS);
    fs.unmount().unwrap();
    drop(fs);
    let img = mem.crash_image(|_, _, _| false);
    let report = check::fsck(&MemDevice::from_bytes(img.clone()), false).unwrap();
    assert!(report.remaining.is_empty(), "{:?}", report.remaining);
    let fs = mount(&Arc::new(MemDevice::from_bytes(img)));
    assert!(fs.lookup(ROOT_INO, b"kept").is_ok());
    assert!(fs.lookup(ROOT_INO, b"lost").is_err());
}

#[test]
fn truncate_and_punch_never_zero_fsynced_bytes_in_place() {
    let dev = fresh(16 << 20);
    let fs = mount(&dev);
    let (a, fh) = fs.create(ROOT, ROOT_INO, b"f", 0o644, true, true).unwrap();
    fs.release(fh).unwrap();
    let want = vec![0xAAu8; 3 * 4096 + 100];
    fs.write(a.ino, 0, &want).unwrap();
    fs.fsync(a.ino).unwrap();
    // Not fsynced: shrink into block 1, grow again, punch inside block 2,
    // zero a range inside block 0.
    let set = |size| fs::SetAttr {
        size: Some(size),
        ..fs::SetAttr::default()
    };
    fs.setattr(a.ino, &set(5000)).unwrap();
    fs.setattr(a.ino, &set(want.len() as u64)).unwrap();
    fs.fallocate(ROOT, a.ino, 9000, 100, fs::FallocMode::PunchHole)
        .unwrap();
    fs.fallocate(
        ROOT,
        a.ino,
        10,
        20,
        fs::FallocMode::ZeroRange { keep_size: true },
    )
    .unwrap();
    assert_eq!(read_all(&fs, a.ino)[5000], 0, "the shrink zeroed the tail");
    // Power cut: every unflushed data write kept, the metadata not
    // committed. The fsynced file must come back byte for byte.
    let img = dev.crash_image(|_, _, _| true);
    drop(fs);
    let dev = Arc::new(MemDevice::from_bytes(img));
    let fs = mount(&dev);
    let ino = fs.lookup(ROOT_INO, b"f").unwrap().ino;
    let got = read_all(&fs, ino);
    assert_eq!(got.len(), want.len());
    let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(
        first_bad, None,
        "fsynced bytes changed by an unsynced truncate/punch"
    );
    fs.unmount().unwrap();
}

/// Commits three times after a checkpoint; returns the image.
fn image_with_commits_after_a_checkpoint() -> (Arc<MemDevice>, Vec<u8>) {
    let dev = fresh(16 << 20);
    let fs = mount(&dev);
    fs.checkpoint().unwrap();
    for i in 0..3u32 {
        let name = format!("file-{i}-{}", "x".repeat(200));
        let (a, fh) = fs
            .create(ROOT, ROOT_INO, name.as_bytes(), 0o644, true, true)
            .unwrap();
        fs.release(fh).unwrap();
        fs.setxattr(a.ino, b"user.pad", &[i as u8; 6000], fs::XattrMode::Any)
            .unwrap();
        fs.fsync(a.ino).unwrap();
    }
    let img = dev.snapshot();
    drop(fs);
    (dev, img)
}

#[test]
fn damage_in_the_log_or_the_newest_checkpoint_is_refused_not_rolled_back() {
    use dmabuf_fs::format::{CheckpointHeader, Superblock, BLOCK_SIZE, LOG_START_BLOCK};
    let (_, img) = image_with_commits_after_a_checkpoint();
    let sb = Superblock::decode(&img[..4096]).unwrap();
    assert!(sb.log_blocks > 8);
    let clean = MemDevice::from_bytes(img.clone());
    assert!(Fs::mount(Arc::new(clean) as Arc<dyn BlockDevice>, opts()).is_ok());

    // A flipped byte in the first commit's body, with two newer commits.
    let mut bad_log = img.clone();
    bad_log[(LOG_START_BLOCK * BLOCK_SIZE) as usize + 500] ^= 0x40;
    let dev = MemDevice::from_bytes(bad_log);
    let err = Fs::mount(Arc::new(dev) as Arc<dyn BlockDevice>, opts())
        .err()
        .expect("mount of a damaged log");
    assert!(err.to_string().contains("damaged"), "{err}");
    let err = check::fsck(&MemDevice::from_bytes(img.clone()), false).map(|_| ());
    assert!(err.is_ok(), "the clean image checks clean: {err:?}");
    let mut bad_log = img.clone();
    bad_log[(LOG_START_BLOCK * BLOCK_SIZE) as usize + 500] ^= 0x40;
    let dev = MemDevice::from_bytes(bad_log);
    assert!(matches!(
        check::fsck(&dev, false),
        Err(fs::FsError::Corrupt(_))
    ));
    let repaired = check::fsck(&dev, true).expect("fsck --repair salvages");
    assert!(repaired.repaired);
    assert!(Fs::mount(Arc::new(dev) as Arc<dyn BlockDevice>, opts()).is_ok());

    // The newest checkpoint's snapshot is unreadable: its log was written
    // after it, so the older checkpoint cannot stand in silently.
    let newest = [1usize, 2]
        .iter()
        .filter_map(|&b| CheckpointHeader::decode(&img[b * 4096..(b + 1) * 4096]).ok())
        .max_by_key(|h| h.seq)
        .unwrap();
    let mut bad_ckpt = img.clone();
    bad_ckpt[(newest.extents[0].0 * BLOCK_SIZE) as usize + 100] ^= 0x01;
    let dev = MemDevice::from_bytes(bad_ckpt);
    let err = Fs::mount(Arc::new(dev) as Arc<dyn BlockDevice>, opts())
        .err()
        .expect("mount with the newest snapshot damaged");
    assert!(err.to_string().contains("reused"), "{err}");
}
