/* SPDX-License-Identifier: MIT */
/*
 * dmabuf-fs token ioctls, ABI version 1.
 *
 * A token binds a buffer (a dmabuf, or a memfd sealed with F_SEAL_SHRINK)
 * to one open file of a dmabuf-fs mount; READ and WRITE then move bytes
 * between file ranges and buffer ranges without going through the
 * caller's memory. All structs are fixed-size, little-endian, no
 * pointers; reserved fields and unknown flags must be zero.
 *
 * Errors (errno of the ioctl call), first match wins:
 *   EINVAL      malformed: nonzero flags/reserved fields, file_offset + len
 *               overflows, REGISTER with buf_offset or size not a multiple
 *               of 4096, a buffer whose size is not a multiple of 4096, an
 *               empty window or one past the end of the buffer, buf_fd
 *               neither a dmabuf nor a memfd, a memfd without F_SEAL_SHRINK,
 *               BATCH count of 0 or above DMABUF_FS_MAX_BATCH;
 *               under the kernel backend, READ/WRITE of a range that needs
 *               the CPU on a dmabuf the CPU cannot map (GPU memory): an
 *               offset or length not a multiple of 4096, or a READ over a
 *               hole or past EOF (zeros to fill), as the kernel series
 *               answers misaligned I/O. Such a dmabuf registers without a
 *               CPU mapping; aligned ranges of written data always work.
 *   EBADF       the token is not registered on this open file (foreign,
 *               stale and unknown tokens look the same); READ on a file
 *               opened write-only, WRITE on one opened read-only; buf_fd
 *               not open in the caller
 *   EFAULT      len == 0, or the buffer range lies outside the token window;
 *               or the buffer's memory faulted under the transfer (a memfd
 *               truncated, an exporter answering a CPU access with SIGBUS):
 *               that op fails, the mount goes on
 *   EACCES      READ into a buffer that could only be mapped read-only
 *               (e.g. a write-sealed memfd)
 *   EOPNOTSUPP  a dmabuf the active backend cannot reach (under the mapped
 *               backend: one the CPU cannot map); REGISTER on something
 *               other than a regular file (a directory)
 *   EPERM       the daemon may not take the caller's fd (pid namespace,
 *               ptrace rules), or the caller no longer holds the file it
 *               called REGISTER through (it exited and its tid was reused)
 *   EDQUOT      REGISTER past a token quota of the mount: live tokens per
 *               open file (mount option token_max_per_file, default 1024),
 *               live tokens per user (token_max_per_user, default 4096),
 *               window bytes of one user's live tokens (token_max_pinned,
 *               default half of RAM). UNREGISTER or close gives the quota back
 *               (once in-flight I/O on the token ends). STATS shows the
 *               limits and the caller's usage.
 *   ENFILE      REGISTER while the daemon itself is out of file
 *               descriptors (every token holds one) or of io_uring buffer
 *               table slots (16384 per mount); not the caller's quota
 *   ENOMEM      no memory for a bounce buffer (never an abort)
 *   EFBIG       WRITE past the maximum file size
 *   ENOSPC      WRITE with nothing written because the device is full
 *   EIO         the device failed
 * READ at or past EOF succeeds with transferred = 0; reads are short only
 * at EOF, writes only when the device fills up.
 */
#ifndef DMABUF_FS_H
#define DMABUF_FS_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define DMABUF_FS_ABI_VERSION 1
#define DMABUF_FS_IOC_MAGIC 0xDB
/* Ops per BATCH call. */
#define DMABUF_FS_MAX_BATCH 128

struct dmabuf_fs_register {          /* 64 bytes */
	__s32 buf_fd;      /* in: dmabuf fd, or memfd with F_SEAL_SHRINK */
	__u32 flags;       /* in: 0 */
	__u64 buf_offset;  /* in: first byte covered; multiple of 4096 */
	__u64 size;        /* in: bytes covered; 0 = to the end of the buffer */
	__u64 token;       /* out: nonzero, never reused within a mount */
	__u64 resv[4];
};

struct dmabuf_fs_unregister {        /* 32 bytes */
	__u64 token;
	__u64 resv[3];
};

struct dmabuf_fs_io {                /* 64 bytes */
	__u64 token;
	__u64 file_offset;
	__u64 buf_offset;  /* relative to the token's window */
	__u64 len;
	__u32 flags;       /* 0 */
	__u32 resv0;
	__u64 transferred; /* out: bytes moved */
	__u64 resv[2];
};

/* INFO: what this mount offers. */
#define DMABUF_FS_BACKEND_MAPPED 1   /* O_DIRECT into the daemon's mapping */
#define DMABUF_FS_BACKEND_KERNEL 2   /* io_uring registered buffers (dmabufs: the kernel series) */

#define DMABUF_FS_FEAT_BATCH     (1ULL << 0)
#define DMABUF_FS_FEAT_STATS     (1ULL << 1)
#define DMABUF_FS_FEAT_UNALIGNED (1ULL << 2) /* any offset/length works */
#define DMABUF_FS_FEAT_MEMFD     (1ULL << 3)
#define DMABUF_FS_FEAT_DMABUF    (1ULL << 4)
#define DMABUF_FS_FEAT_LIMITS    (1ULL << 5) /* STATS fills max_* , user_*, detached_ops */

struct dmabuf_fs_info {              /* 128 bytes */
	__u32 abi_version;     /* out: DMABUF_FS_ABI_VERSION */
	__u32 backend;         /* out: DMABUF_FS_BACKEND_* */
	__u32 fast_align;      /* out: offsets/lengths multiple of this are fastest */
	__u32 max_batch;       /* out: DMABUF_FS_MAX_BATCH */
	__u64 features;        /* out: DMABUF_FS_FEAT_* */
	__u64 max_io;          /* out: largest len of one op */
	char  backend_reason[88]; /* out: why this backend, NUL-terminated */
	__u64 resv[1];
};

/* STATS: counters of a file (token = 0) or of one token of this open file. */
struct dmabuf_fs_counters {          /* 64 bytes */
	__u64 read_ops;
	__u64 write_ops;
	__u64 read_bytes;
	__u64 write_bytes;
	__u64 errors;
	__u64 unaligned_ops;  /* offset or length not 4096-aligned */
	__u64 fallback_ops;   /* went through a bounce instead of straight DMA */
	__u64 kernel_ops;     /* went through io_uring READ_FIXED/WRITE_FIXED */
};

#define DMABUF_FS_BUF_MEMFD  1
#define DMABUF_FS_BUF_DMABUF 2

#define DMABUF_FS_PATH_DIRECT 1 /* O_DIRECT into the mapping */
#define DMABUF_FS_PATH_BOUNCE 2 /* through an aligned bounce buffer */
#define DMABUF_FS_PATH_KERNEL 3 /* io_uring dmabuf registered buffer */

struct dmabuf_fs_stats {             /* 128 bytes */
	__u64 token;          /* in: 0 = the file's totals since mount */
	__u32 flags;          /* in: 0 */
	__u32 live_tokens;    /* out: tokens registered on the file now */
	__u64 window_size;    /* out: the token's window (0 for file totals) */
	__u32 buf_kind;       /* out: DMABUF_FS_BUF_* (0 for file totals) */
	__u32 path;           /* out: DMABUF_FS_PATH_* (0 for file totals) */
	struct dmabuf_fs_counters c; /* out */
	/* out, with DMABUF_FS_FEAT_LIMITS (ignored on input; reserved, 0, in older daemons): */
	__u32 max_tokens_per_file;  /* the mount's quotas (EDQUOT past them) */
	__u32 max_tokens_per_user;
	__u64 max_pinned_per_user;  /* window bytes */
	__u64 user_pinned;          /* the caller's uid: window bytes of its live tokens */
	__u32 user_tokens;          /* the caller's uid: its live tokens, all files */
	__u32 detached_ops;         /* ops that found the kernel registration
	                               detached (NVMe reset) and bounced; the
	                               token then stays on the bounce path */
};

/*
 * BATCH: many READ/WRITE ops in one call, each with its own result. Ops
 * run concurrently (as an io_uring submission would): ops whose ranges
 * overlap, with at least one a WRITE, have no defined order. (Today all
 * READs go to the device together, then the WRITEs in order.)
 */
#define DMABUF_FS_OP_READ  1
#define DMABUF_FS_OP_WRITE 2

struct dmabuf_fs_batch_op {          /* 56 bytes */
	__u64 token;
	__u64 file_offset;
	__u64 buf_offset;
	__u64 len;
	__u64 cookie;      /* in: copied back untouched */
	__u32 op;          /* in: DMABUF_FS_OP_* */
	__u32 flags;       /* in: 0 */
	__s64 result;      /* out: bytes moved, or -errno */
};

struct dmabuf_fs_batch {             /* 16 + 128 * 56 = 7184 bytes */
	__u32 count;       /* in: ops used, 1..DMABUF_FS_MAX_BATCH */
	__u32 flags;       /* in: 0 */
	__u64 resv;
	struct dmabuf_fs_batch_op ops[DMABUF_FS_MAX_BATCH];
};

#define DMABUF_FS_IOC_REGISTER   _IOWR(DMABUF_FS_IOC_MAGIC, 0x40, struct dmabuf_fs_register)
#define DMABUF_FS_IOC_UNREGISTER _IOW(DMABUF_FS_IOC_MAGIC, 0x41, struct dmabuf_fs_unregister)
#define DMABUF_FS_IOC_READ       _IOWR(DMABUF_FS_IOC_MAGIC, 0x42, struct dmabuf_fs_io)
#define DMABUF_FS_IOC_WRITE      _IOWR(DMABUF_FS_IOC_MAGIC, 0x43, struct dmabuf_fs_io)
#define DMABUF_FS_IOC_INFO       _IOR(DMABUF_FS_IOC_MAGIC, 0x44, struct dmabuf_fs_info)
#define DMABUF_FS_IOC_STATS      _IOWR(DMABUF_FS_IOC_MAGIC, 0x45, struct dmabuf_fs_stats)
#define DMABUF_FS_IOC_BATCH      _IOWR(DMABUF_FS_IOC_MAGIC, 0x46, struct dmabuf_fs_batch)

#endif /* DMABUF_FS_H */
