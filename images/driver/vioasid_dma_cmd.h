/* SPDX-License-Identifier: GPL-2.0 */
/*
 * vioasid PASID DMA function: the command syntax of /sys/class/vioasid-dma/dmaN/cmd
 * (docs/pasid-dma.md, "Guest driver contract").  Syntax only: whether a PASID is bound or an
 * IOVA mapped is the driver's and the device's business, not the parser's.
 *
 * This header has no kernel dependencies beyond the basic types and errno values, so the unit
 * tests compile it into a small userspace harness (tests/driver_parser_harness.c).
 */
#ifndef VIOASID_DMA_CMD_H
#define VIOASID_DMA_CMD_H

#ifdef __KERNEL__
#include <linux/errno.h>
#include <linux/string.h>
#include <linux/types.h>
#endif

#define VDMA_BUF_SIZE		0x100000ULL	/* the data buffer: 256 pages */
#define VDMA_PAGE_SIZE		0x1000ULL
#define VDMA_BUF_PAGES		(VDMA_BUF_SIZE / VDMA_PAGE_SIZE)
#define VDMA_MAX_PASID		0xfffffU	/* the descriptor's 20-bit PASID field */
#define VDMA_MAX_BATCH		256U		/* descriptors in the control area's array */
#define VDMA_CMD_MAX		160		/* longest command line */
#define VDMA_MAX_TOKENS		10

enum vdma_op {
	VDMA_OP_BIND,
	VDMA_OP_UNBIND,
	VDMA_OP_MAP,
	VDMA_OP_UNMAP,
	VDMA_OP_COPY,
	VDMA_OP_FILL,
	VDMA_OP_COMPARE,
	VDMA_OP_BATCH,
};

/* An address operand: offset @off in the IOVA window of PASID @pasid. */
struct vdma_addr {
	u32 pasid;
	u64 off;
};

struct vdma_cmd {
	enum vdma_op op;
	u32 pasid;		/* every command but a bare "bind" */
	bool has_pasid;		/* bind: a PASID was given */
	u64 off;		/* map: buffer offset; unmap: window offset */
	u64 at;			/* map: window offset (default: off) */
	u64 len;		/* map, unmap, and the length of a job */
	bool rw;		/* map: read-write (else read-only) */
	struct vdma_addr a;	/* copy: source; fill: destination; compare: first */
	struct vdma_addr b;	/* copy: destination; compare: second */
	u8 byte;		/* fill */
	u32 count;		/* batch: number of copies */
};

/* Decimal or 0x-hex, no sign, at most @max. */
static int vdma_parse_num(const char *s, u64 max, u64 *out)
{
	unsigned int base = 10;
	u64 v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return -EINVAL;
	for (; *s; s++) {
		unsigned int d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return -EINVAL;
		if (d > max || v > (max - d) / base)
			return -EINVAL;
		v = v * base + d;
	}
	*out = v;
	return 0;
}

static int vdma_parse_pasid(const char *s, u32 *pasid)
{
	u64 v;

	if (vdma_parse_num(s, VDMA_MAX_PASID, &v))
		return -EINVAL;
	*pasid = (u32)v;
	return 0;
}

/* "OFF" (in PASID @pasid's window) or "Q:OFF" (in PASID Q's window). */
static int vdma_parse_addr(const char *s, u32 pasid, struct vdma_addr *a)
{
	char q[16];
	const char *colon = s;
	size_t n;

	while (*colon && *colon != ':')
		colon++;
	a->pasid = pasid;
	if (*colon == ':') {
		n = colon - s;
		if (n == 0 || n >= sizeof(q))
			return -EINVAL;
		memcpy(q, s, n);
		q[n] = '\0';
		if (vdma_parse_pasid(q, &a->pasid))
			return -EINVAL;
		s = colon + 1;
	}
	return vdma_parse_num(s, VDMA_BUF_SIZE, &a->off);
}

static bool vdma_in_window(u64 off, u64 len)
{
	return len <= VDMA_BUF_SIZE && off <= VDMA_BUF_SIZE - len;
}

static bool vdma_page_range(u64 off, u64 len)
{
	return len && !(off % VDMA_PAGE_SIZE) && !(len % VDMA_PAGE_SIZE) &&
	       vdma_in_window(off, len);
}

/*
 * Parse one command line (a trailing newline is allowed).  Returns 0, or -EINVAL with
 * *why set to a short reason for the "error invalid <message>" result line.
 */
static int vdma_parse_cmd(const char *buf, size_t len, struct vdma_cmd *c,
			  const char **why)
{
	char line[VDMA_CMD_MAX];
	char *tok[VDMA_MAX_TOKENS];
	unsigned int nt = 0;
	size_t i;
	u64 v;

	memset(c, 0, sizeof(*c));
	*why = "bad syntax";
	if (len >= sizeof(line)) {
		*why = "command too long";
		return -EINVAL;
	}
	memcpy(line, buf, len);
	line[len] = '\0';
	for (i = 0; i < len; i++) {
		if (line[i] == '\0') {
			*why = "NUL in command";
			return -EINVAL;
		}
		if (line[i] == ' ' || line[i] == '\t' || line[i] == '\n' || line[i] == '\r') {
			line[i] = '\0';
		} else if (i == 0 || line[i - 1] == '\0') {
			if (nt == VDMA_MAX_TOKENS) {
				*why = "too many words";
				return -EINVAL;
			}
			tok[nt++] = &line[i];
		}
	}
	if (!nt) {
		*why = "empty command";
		return -EINVAL;
	}

#define VDMA_WORD(k, s)	(!strcmp(tok[k], (s)))
	if (VDMA_WORD(0, "bind")) {
		c->op = VDMA_OP_BIND;
		if (nt == 1)
			return 0;
		c->has_pasid = true;
		*why = "usage: bind [P]";
		if (nt != 2 || vdma_parse_pasid(tok[1], &c->pasid))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "unbind")) {
		c->op = VDMA_OP_UNBIND;
		*why = "usage: unbind P";
		if (nt != 2 || vdma_parse_pasid(tok[1], &c->pasid))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "map")) {
		c->op = VDMA_OP_MAP;
		*why = "usage: map P OFF LEN ro|rw [AT]";
		if ((nt != 5 && nt != 6) || vdma_parse_pasid(tok[1], &c->pasid) ||
		    vdma_parse_num(tok[2], VDMA_BUF_SIZE, &c->off) ||
		    vdma_parse_num(tok[3], VDMA_BUF_SIZE, &c->len))
			return -EINVAL;
		if (VDMA_WORD(4, "rw"))
			c->rw = true;
		else if (!VDMA_WORD(4, "ro"))
			return -EINVAL;
		c->at = c->off;
		if (nt == 6 && vdma_parse_num(tok[5], VDMA_BUF_SIZE, &c->at))
			return -EINVAL;
		*why = "OFF, LEN and AT must be page-aligned, LEN > 0, within the buffer";
		if (!vdma_page_range(c->off, c->len) || !vdma_page_range(c->at, c->len))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "unmap")) {
		c->op = VDMA_OP_UNMAP;
		*why = "usage: unmap P OFF LEN";
		if (nt != 4 || vdma_parse_pasid(tok[1], &c->pasid) ||
		    vdma_parse_num(tok[2], VDMA_BUF_SIZE, &c->off) ||
		    vdma_parse_num(tok[3], VDMA_BUF_SIZE, &c->len))
			return -EINVAL;
		*why = "OFF and LEN must be page-aligned, LEN > 0, within the buffer";
		if (!vdma_page_range(c->off, c->len))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "copy") || VDMA_WORD(0, "compare")) {
		c->op = VDMA_WORD(0, "copy") ? VDMA_OP_COPY : VDMA_OP_COMPARE;
		*why = c->op == VDMA_OP_COPY ? "usage: copy P SRC DST LEN" :
					       "usage: compare P A B LEN";
		if (nt != 5 || vdma_parse_pasid(tok[1], &c->pasid) ||
		    vdma_parse_addr(tok[2], c->pasid, &c->a) ||
		    vdma_parse_addr(tok[3], c->pasid, &c->b) ||
		    vdma_parse_num(tok[4], VDMA_BUF_SIZE, &c->len))
			return -EINVAL;
		*why = "range beyond the buffer";
		if (!vdma_in_window(c->a.off, c->len) || !vdma_in_window(c->b.off, c->len))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "fill")) {
		c->op = VDMA_OP_FILL;
		*why = "usage: fill P DST LEN BYTE";
		if (nt != 5 || vdma_parse_pasid(tok[1], &c->pasid) ||
		    vdma_parse_addr(tok[2], c->pasid, &c->a) ||
		    vdma_parse_num(tok[3], VDMA_BUF_SIZE, &c->len) ||
		    vdma_parse_num(tok[4], 0xff, &v))
			return -EINVAL;
		c->byte = (u8)v;
		*why = "range beyond the buffer";
		if (!vdma_in_window(c->a.off, c->len))
			return -EINVAL;
		return 0;
	}
	if (VDMA_WORD(0, "batch")) {
		c->op = VDMA_OP_BATCH;
		*why = "usage: batch N copy P SRC DST LEN (1 <= N <= 256)";
		if (nt != 7 || vdma_parse_num(tok[1], VDMA_MAX_BATCH, &v) || !v ||
		    !VDMA_WORD(2, "copy") || vdma_parse_pasid(tok[3], &c->pasid) ||
		    vdma_parse_addr(tok[4], c->pasid, &c->a) ||
		    vdma_parse_addr(tok[5], c->pasid, &c->b) ||
		    vdma_parse_num(tok[6], VDMA_BUF_SIZE, &c->len))
			return -EINVAL;
		c->count = (u32)v;
		*why = "N copies of LEN beyond the buffer";
		if (c->len > VDMA_BUF_SIZE / c->count ||
		    !vdma_in_window(c->a.off, c->len * c->count) ||
		    !vdma_in_window(c->b.off, c->len * c->count))
			return -EINVAL;
		return 0;
	}
#undef VDMA_WORD
	*why = "unknown command";
	return -EINVAL;
}

#endif /* VIOASID_DMA_CMD_H */
