// SPDX-License-Identifier: GPL-2.0
/*
 * Userspace harness for the driver's command parser (images/driver/vioasid_dma_cmd.h):
 * one command per stdin line, one line out per command:
 *   "ok op=<n> pasid=<p> has=<0|1> off=<x> at=<x> len=<x> rw=<0|1> a=<q>:<x> b=<q>:<x>
 *    byte=<n> count=<n>" or "invalid <why>".
 * A line "@<n>" sends the next line with its length forced to n (to test embedded NULs and
 * overlong input); "\0" in a line is a NUL byte.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;

#include "vioasid_dma_cmd.h"

int main(void)
{
	char raw[4096], buf[4096];
	long force = -1;

	while (fgets(raw, sizeof(raw), stdin)) {
		size_t n = 0, i;
		struct vdma_cmd c;
		const char *why;

		raw[strcspn(raw, "\n")] = '\0';
		if (raw[0] == '@') {
			force = strtol(raw + 1, NULL, 10);
			continue;
		}
		for (i = 0; raw[i]; i++) {
			if (raw[i] == '\\' && raw[i + 1] == '0') {
				buf[n++] = '\0';
				i++;
			} else if (raw[i] == '\\' && raw[i + 1] == 'n') {
				buf[n++] = '\n';
				i++;
			} else {
				buf[n++] = raw[i];
			}
		}
		if (force >= 0) {
			while (n < (size_t)force)
				buf[n++] = 'x';
			n = (size_t)force;
			force = -1;
		}
		if (vdma_parse_cmd(buf, n, &c, &why)) {
			printf("invalid %s\n", why);
			continue;
		}
		printf("ok op=%d pasid=%u has=%d off=0x%llx at=0x%llx len=0x%llx rw=%d "
		       "a=%u:0x%llx b=%u:0x%llx byte=%u count=%u\n",
		       c.op, c.pasid, c.has_pasid, (unsigned long long)c.off,
		       (unsigned long long)c.at, (unsigned long long)c.len, c.rw, c.a.pasid,
		       (unsigned long long)c.a.off, c.b.pasid, (unsigned long long)c.b.off,
		       c.byte, c.count);
	}
	return 0;
}
