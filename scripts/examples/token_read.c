/*
 * token_read: read a file on a dmabuf-fs mount into a buffer with one
 * token READ, and check the bytes against ordinary read().
 *
 *   cc -O2 -I src/uapi -o token_read scripts/examples/token_read.c
 *   ./token_read /mnt/dmabuf/some-file
 *
 * The buffer is a memfd sealed with F_SEAL_SHRINK (what the daemon asks
 * of memfds, so it can never shrink under its mapping). Where
 * /dev/udmabuf exists, the same memfd is also wrapped as a real dmabuf
 * and read into through a second token: that is what a GPU driver's
 * exported buffer looks like to dmabuf-fs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dmabuf_fs.h"

struct udmabuf_create {
	__u32 memfd;
	__u32 flags;
	__u64 offset;
	__u64 size;
};
#define UDMABUF_CREATE _IOW('u', 0x42, struct udmabuf_create)

static int fail(const char *what)
{
	fprintf(stderr, "token_read: %s: %s\n", what, strerror(errno));
	return 1;
}

/* Registers buf_fd on fd, reads len bytes from offset 0, unregisters. */
static int token_read(int fd, int buf_fd, __u64 len, __u64 *moved)
{
	struct dmabuf_fs_register reg = { .buf_fd = buf_fd };
	if (ioctl(fd, DMABUF_FS_IOC_REGISTER, &reg) < 0)
		return fail("REGISTER");
	struct dmabuf_fs_io io = { .token = reg.token, .file_offset = 0, .buf_offset = 0, .len = len };
	if (ioctl(fd, DMABUF_FS_IOC_READ, &io) < 0)
		return fail("READ");
	*moved = io.transferred;
	struct dmabuf_fs_unregister unreg = { .token = reg.token };
	if (ioctl(fd, DMABUF_FS_IOC_UNREGISTER, &unreg) < 0)
		return fail("UNREGISTER");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s FILE-ON-DMABUF-FS\n", argv[0]);
		return 2;
	}
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0)
		return fail(argv[1]);
	struct stat st;
	if (fstat(fd, &st) < 0)
		return fail("fstat");
	__u64 len = st.st_size ? (__u64)st.st_size : 1;
	__u64 buf_len = (len + 4095) / 4096 * 4096;

	struct dmabuf_fs_info info;
	if (ioctl(fd, DMABUF_FS_IOC_INFO, &info) < 0)
		return fail("INFO (is this file on a dmabuf-fs mount?)");
	printf("abi %u, backend %u (%s)\n", info.abi_version, info.backend, info.backend_reason);

	int mfd = memfd_create("token_read", MFD_ALLOW_SEALING);
	if (mfd < 0 || ftruncate(mfd, buf_len) < 0 || fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK) < 0)
		return fail("memfd");
	__u64 moved = 0;
	if (token_read(fd, mfd, len, &moved))
		return 1;

	unsigned char *buf = mmap(NULL, buf_len, PROT_READ, MAP_SHARED, mfd, 0);
	unsigned char *want = malloc(len);
	if (buf == MAP_FAILED || !want)
		return fail("mmap/malloc");
	ssize_t got = pread(fd, want, len, 0);
	if (got < 0)
		return fail("pread");
	if ((__u64)got != moved || memcmp(buf, want, moved) != 0) {
		fprintf(stderr, "token_read: MISMATCH: token READ moved %llu bytes, read() %zd\n",
			(unsigned long long)moved, got);
		return 1;
	}
	printf("memfd: token READ of %llu bytes matches read()\n", (unsigned long long)moved);

	int udev = open("/dev/udmabuf", O_RDWR);
	if (udev < 0) {
		printf("dmabuf: skipped (/dev/udmabuf not present)\n");
		return 0;
	}
	struct udmabuf_create create = { .memfd = (__u32)mfd, .offset = 0, .size = buf_len };
	int dmabuf = ioctl(udev, UDMABUF_CREATE, &create);
	if (dmabuf < 0)
		return fail("UDMABUF_CREATE");
	/* Clear the pages, then fill them again through the dmabuf. */
	unsigned char *zeros = calloc(1, buf_len);
	if (!zeros || pwrite(mfd, zeros, buf_len, 0) != (ssize_t)buf_len)
		return fail("clearing the memfd");
	if (token_read(fd, dmabuf, len, &moved))
		return 1;
	if (moved != (__u64)got || memcmp(buf, want, moved) != 0) {
		fprintf(stderr, "token_read: MISMATCH through the udmabuf\n");
		return 1;
	}
	printf("dmabuf: token READ of %llu bytes through a udmabuf matches read()\n",
	       (unsigned long long)moved);
	return 0;
}
