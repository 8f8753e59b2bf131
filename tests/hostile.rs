//! The token path under hostile callers, on a real mount: requests sized
//! to exhaust the daemon's memory, buffers that fault under a running op,
//! batches mixing good and bad ops. Whatever a caller does, it gets an
//! errno and the daemon keeps serving everyone else.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{pseudo_random, Image, Rng};
use dmabuf_fs::client::{sealed_memfd, TokenFile};
use dmabuf_fs::uapi::{self, BatchOp};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
}

/// A path other processes can open to reach the fd `f` of this process.
fn proc_fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()))
}

/// A shell pipeline printing bytes `[from, from + len)` of a fixed
/// pseudo-random stream: AES-CTR of zeros, fast, the same every time and
/// seekable (the counter starts at the 16-byte block of `from`), so a GiB
/// can be compared again without being kept anywhere.
fn stream(from: u64, len: u64) -> String {
    format!(
        "openssl enc -aes-128-ctr -K 00112233445566778899aabbccddeeff -iv {:032x} \
         -in /dev/zero 2>/dev/null | tail -c +{} | head -c {len}",
        from / 16,
        from % 16 + 1
    )
}

/// Whether bytes `[skip, skip + len)` of the stream equal those at
/// `at` of `file` (cmp is C and streams: no GiB in this process).
fn stream_matches(skip: u64, file: &Path, at: u64, len: u64) -> bool {
    let out = common::run_unchecked(
        "sh",
        &[
            "-c".to_string(),
            format!(
                "{} | cmp -n {len} -i 0:{at} - '{}'",
                stream(skip, len),
                file.display()
            ),
        ],
    );
    if !out.status.success() {
        println!("cmp: {}", common::output_text(&out).trim());
    }
    out.status.success()
}

/// Anonymous resident memory (RssAnon) of the processes, in bytes: the
/// daemon's heap, where bounce buffers live. Caller memfd pages the
/// daemon touches are RssShmem and do not count.
fn rss_anon(pids: &[i32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Runs `op` while sampling the daemon's RssAnon every ~5 ms; returns
/// what `op` returned and the peak seen.
fn peak_anon<T>(pids: &[i32], op: impl FnOnce() -> T) -> (T, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pids) = (stop.clone(), pids.to_vec());
        thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(rss_anon(&pids));
                if stop.load(Ordering::SeqCst) {
                    return peak;
                }
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let r = op();
    stop.store(true, Ordering::SeqCst);
    (r, sampler.join().unwrap())
}

/// Runs `cmp -n len -i skip_a:skip_b a b`; whether the bytes match.
fn files_match(a: &Path, skip_a: u64, b: &Path, skip_b: u64, len: u64) -> bool {
    let out = common::run_unchecked(
        "cmp",
        &[
            "-n".to_string(),
            len.to_string(),
            "-i".to_string(),
            format!("{skip_a}:{skip_b}"),
            a.display().to_string(),
            b.display().to_string(),
        ],
    );
    if !out.status.success() {
        println!("cmp: {}", common::output_text(&out).trim());
    }
    out.status.success()
}

/// One unaligned token READ of 1 GiB and one unaligned token WRITE of
/// 1 GiB (every byte needs a bounce on the mapped backend, and the
/// buffer's addresses are off by one for the kernel backend's fixed
/// I/O): right bytes, and the daemon's anonymous memory grows by less
/// than 64 MiB during each, whatever the request size. Windows are 1 GiB,
/// the most io_uring registers as one fixed buffer, so that the kernel
/// backend takes them.
#[test]
fn unaligned_gib_token_io_keeps_daemon_memory_bounded() {
    let started = Instant::now();
    const LIMIT: u64 = 64 * MIB;
    if !common::have_tool("openssl") {
        println!("SKIP: needs openssl to make and check a GiB of data");
        return;
    }
    let img = Image::new("1300M");
    let m = img.mount();
    let pids = m.daemons();
    assert!(!pids.is_empty(), "no daemon found for the mount");
    let big = m.join("big");
    File::create(&big).unwrap();
    let f = TokenFile::open(&big, true).unwrap();
    let info = f.info().unwrap();
    println!("INFO: backend {} ({})", info.backend, info.reason());
    let buf = sealed_memfd("gib", GIB).unwrap();
    let buf_path = proc_fd_path(&buf);
    let fill = |from: u64, len: u64| {
        common::sh(&format!(
            "{} | dd of='{}' bs=4M iflag=fullblock conv=notrunc status=none",
            stream(from, len),
            buf_path.display()
        ))
    };
    fill(0, GIB);
    println!(
        "mkfs, mount and a GiB of data in a memfd: {:.1?}",
        started.elapsed()
    );
    let t = f.register(&buf, 0, 0).unwrap();
    // The file (stream bytes [0, 1 GiB + 4 KiB)) goes in by aligned
    // WRITEs, no bounce.
    let file_len = GIB + 4096;
    assert_eq!(t.write(0, 0, GIB).unwrap(), GIB);
    fill(GIB, 4096);
    assert_eq!(t.write(GIB, 0, 4096).unwrap(), 4096);
    println!("prepared the 1 GiB file in {:.1?}", started.elapsed());

    // Bounce memory the daemon holds from here on counts: peak memory
    // must not grow with request size, whichever op came first.
    let baseline = rss_anon(&pids);
    // READ file [1, 1 GiB + 1) into buffer [0, 1 GiB).
    let t0 = Instant::now();
    let (read, read_peak) = peak_anon(&pids, || t.read(1, 0, GIB));
    let read_time = t0.elapsed();
    assert_eq!(read.expect("unaligned 1 GiB READ"), GIB);
    assert!(
        stream_matches(1, &buf_path, 0, GIB),
        "READ moved wrong bytes"
    );

    // WRITE buffer [0, 1 GiB) to file [3, 1 GiB + 3).
    let t0 = Instant::now();
    let (written, write_peak) = peak_anon(&pids, || t.write(3, 0, GIB));
    let write_time = t0.elapsed();
    assert_eq!(written.expect("unaligned 1 GiB WRITE"), GIB);
    let s = t.stats().unwrap();

    // The file now: 3 stream bytes, the buffer, the stream's tail. Read
    // back by aligned READs into a second memfd, compared with the first
    // (no stream to make again for the GiB).
    let t0 = Instant::now();
    let check = sealed_memfd("check", GIB).unwrap();
    let check_path = proc_fd_path(&check);
    let t2 = f.register(&check, 0, 0).unwrap();
    assert_eq!(t2.read(0, 0, GIB).unwrap(), GIB);
    println!("aligned READ of the GiB back: {:.1?}", t0.elapsed());
    assert!(stream_matches(0, &check_path, 0, 3), "head changed");
    assert!(
        files_match(&check_path, 3, &buf_path, 0, GIB - 3),
        "WRITE stored wrong bytes"
    );
    assert_eq!(t2.read(GIB, 0, 4096).unwrap(), file_len - GIB);
    assert!(
        files_match(&check_path, 0, &buf_path, GIB - 3, 3),
        "WRITE stored wrong last bytes"
    );
    assert!(
        stream_matches(GIB + 3, &check_path, 3, 4096 - 3),
        "tail changed"
    );
    drop((t, t2));

    let (read_growth, write_growth) = (
        read_peak.saturating_sub(baseline),
        write_peak.saturating_sub(baseline),
    );
    println!(
        "daemon RssAnon {} MiB before; peak growth: READ {} MiB in {:.1?}, WRITE {} MiB in {:.1?} (limit {} MiB); counters {:?}; whole test {:.1?}",
        baseline / MIB,
        read_growth / MIB,
        read_time,
        write_growth / MIB,
        write_time,
        LIMIT / MIB,
        s.c,
        started.elapsed()
    );
    assert!(
        read_growth < LIMIT,
        "an unaligned 1 GiB READ grew the daemon's anonymous memory by {} MiB",
        read_growth / MIB
    );
    assert!(
        write_growth < LIMIT,
        "an unaligned 1 GiB WRITE grew the daemon's anonymous memory by {} MiB",
        write_growth / MIB
    );
}

/// One op of the faulting-buffer test: (file offset, buffer offset, len).
const FAULT_OPS: [(u64, u64, u64); 3] = [
    (0, 0, 32 * MIB),            // aligned, data and hole
    (1, 4096, 16 * MIB),         // unaligned: bounced by the CPU
    (16 * MIB + 5, 0, 16 * MIB), // all hole: zeroed by the CPU
];

/// A caller's memfd loses its pages (ftruncate to 0) under running token
/// READs: each op succeeds or fails with EFAULT (or EIO), and the daemon
/// keeps serving — `ls`, `cat` and a new token READ still work. Needs the
/// daemon's test switch DMABUF_FS_TEST_ALLOW_UNSEALED=1 (REGISTER then
/// takes a memfd without F_SEAL_SHRINK, the only way to make pages vanish
/// under the daemon); without it REGISTER refuses and the test says so.
#[test]
fn a_faulting_buffer_fails_the_op_and_the_daemon_keeps_serving() {
    let started = Instant::now();
    // The mount command daemonizes; the daemon inherits this environment.
    std::env::set_var("DMABUF_FS_TEST_ALLOW_UNSEALED", "1");
    let img = Image::new("256M");
    let m = img.mount();
    let pids = m.daemons();
    assert!(!pids.is_empty(), "no daemon found for the mount");
    // 16 MiB data, 16 MiB hole, 16 MiB data.
    let p = m.join("data");
    let data = pseudo_random(7, (16 * MIB) as usize);
    {
        let f = File::create(&p).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&data, 32 * MIB).unwrap();
    }
    let small = pseudo_random(8, 100_000);
    write_file(&m.join("small"), &small);

    let f = TokenFile::open(&p, false).unwrap();
    let mfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("vanishing")
        .unwrap()
        .into_file();
    let window = 64 * MIB;
    mfd.set_len(window).unwrap();
    let t = match f.register(&mfd, 0, 0) {
        Ok(t) => t,
        Err(e) => panic!(
            "REGISTER of an unsealed memfd failed ({e}): this test needs the daemon's \
             DMABUF_FS_TEST_ALLOW_UNSEALED=1 switch (added with the token quotas); \
             on a branch without it this failure is expected"
        ),
    };
    let id = t.id();
    // Before any fault every op works.
    for (fo, bo, len) in FAULT_OPS {
        let r = t.read(fo, bo, len);
        assert_eq!(r.ok(), Some(len), "READ {fo}+{len} before the fault");
    }

    let mut in_flight = 0;
    let mut outcomes = [0usize; 3]; // ok, EFAULT, EIO
    for round in 0..20 {
        mfd.set_len(window).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // (op, start, end, result) of every op of this round.
        let log = Arc::new(Mutex::new(Vec::new()));
        let runner = {
            let (stop, log, f) = (stop.clone(), log.clone(), f.file().try_clone().unwrap());
            thread::spawn(move || {
                let f = TokenFile::from_file(f);
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    let (fo, bo, len) = FAULT_OPS[k % FAULT_OPS.len()];
                    let start = Instant::now();
                    let r = f.transfer(id, false, fo, bo, len);
                    log.lock().unwrap().push((k, start, Instant::now(), r));
                    k += 1;
                }
            })
        };
        // Let some ops finish before the cut, and catch others in flight.
        thread::sleep(Duration::from_millis(30 + 11 * round % 40));
        let cut = Instant::now();
        mfd.set_len(0).unwrap();
        thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        runner.join().unwrap();
        for (k, start, end, r) in log.lock().unwrap().drain(..) {
            let (fo, bo, len) = FAULT_OPS[k % FAULT_OPS.len()];
            let what = format!("round {round} op {k} (file {fo}, buf {bo}, len {len})");
            match r {
                Ok(n) => {
                    assert_eq!(n, len, "{what}");
                    outcomes[0] += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => outcomes[1] += 1,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => outcomes[2] += 1,
                Err(e) => panic!(
                    "{what}: {e}; daemon {}",
                    if m.daemons().is_empty() {
                        "dead (killed by the fault?)"
                    } else {
                        "alive"
                    }
                ),
            }
            if start < cut && cut < end {
                in_flight += 1;
            }
        }
        if in_flight >= 3 {
            break;
        }
    }
    println!(
        "ops: {} ok, {} EFAULT, {} EIO; {in_flight} caught in flight by the truncation",
        outcomes[0], outcomes[1], outcomes[2]
    );
    assert!(in_flight > 0, "no op was running when the pages vanished");
    assert!(outcomes[1] + outcomes[2] > 0, "no op saw the fault");
    drop(t);

    // The daemon is the same process and still serves everyone.
    assert_eq!(m.daemons(), pids, "the daemon is not the one that started");
    let ls = common::run("ls", &[m.path()]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("small"));
    let cat = common::run("cat", &[m.join("small")]);
    assert!(cat.stdout == small, "cat after the fault");
    let sealed = sealed_memfd("after", 16 * MIB).unwrap();
    let t = f.register(&sealed, 0, 0).unwrap();
    assert_eq!(t.read(1, 0, 16 * MIB).unwrap(), 16 * MIB);
    let mut got = vec![0u8; (16 * MIB) as usize];
    sealed.read_exact_at(&mut got, 0).unwrap();
    assert!(
        got[..got.len() - 1] == data[1..],
        "token READ after the fault"
    );
    assert_eq!(got[got.len() - 1], 0, "first byte of the hole");
    println!("whole test {:.1?}", started.elapsed());
}

/// A BATCH of 128 4 KiB reads at random offsets: each op gets its own
/// bytes and result, and a bad op among good ones fails alone.
#[test]
fn batch_of_reads_goes_down_as_one_wave() {
    let started = Instant::now();
    let img = Image::new("128M");
    let m = img.mount();
    let size = 16 * MIB;
    let data = pseudo_random(9, size as usize);
    let p = m.join("f");
    write_file(&p, &data);
    let f = TokenFile::open(&p, false).unwrap();
    let buf = sealed_memfd("batch", uapi::MAX_BATCH as u64 * 4096).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    let mut rng = Rng::new(98);
    for round in 0..5 {
        let bad = rng.below(uapi::MAX_BATCH as u64) as usize;
        let mut ops: Vec<BatchOp> = (0..uapi::MAX_BATCH as u64)
            .map(|i| BatchOp {
                token: t.id(),
                // Block-aligned and not, some running past EOF.
                file_offset: match rng.below(4) {
                    0 => rng.below(size / 4096) * 4096,
                    1 => size - rng.below(4096),
                    _ => rng.below(size),
                },
                buf_offset: i * 4096,
                len: 4096,
                cookie: round * 1000 + i,
                op: uapi::OP_READ,
                ..Default::default()
            })
            .collect();
        ops[bad].token = 0x5eed_0bad;
        f.batch(&mut ops).unwrap();
        let mut got = vec![0u8; ops.len() * 4096];
        buf.read_exact_at(&mut got, 0).unwrap();
        for (i, op) in ops.iter().enumerate() {
            assert_eq!(op.cookie, round * 1000 + i as u64);
            if i == bad {
                assert_eq!(op.result, -(libc::EBADF as i64), "round {round} op {i}");
                continue;
            }
            let start = op.file_offset as usize;
            let end = (start + 4096).min(data.len());
            assert_eq!(op.result, (end - start) as i64, "round {round} op {i}");
            assert!(
                got[i * 4096..i * 4096 + end - start] == data[start..end],
                "round {round} op {i}: wrong bytes"
            );
        }
    }
    let s = t.stats().unwrap();
    println!("counters {:?}; whole test {:.1?}", s.c, started.elapsed());
}
