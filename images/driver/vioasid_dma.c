// SPDX-License-Identifier: GPL-2.0
/*
 * vioasid PASID DMA function driver (PCI 7a50:0001).
 *
 * The device is vioasid's descriptor DMA engine presented over vfio-user; its registers,
 * descriptors and completion records are specified in docs/pasid-dma.md, which is also the
 * contract of this driver's user interface:
 *
 *   /dev/vioasid-dmaN                 read/write/lseek over the function's 1 MiB buffer
 *   /sys/class/vioasid-dma/dmaN/cmd   one command per write(); read: the last result line
 *   /sys/class/vioasid-dma/dmaN/type  dedicated | translating | mdev | enqcmd
 *
 * Every bound PASID P has a paging domain of its own, attached to the function with
 * iommu_attach_device_pasid(), in which buffer pages appear at IOVA 0x10000000 * P + OFF and a
 * 64 KiB control area (completion records, batch descriptors) at 0x10000000 * P + 0x100000.
 * PASIDs come from iommu_alloc_global_pasid() and are shared module-wide (refcounted), so the
 * same P can be bound on several functions.  The driver never second-guesses a job: what the
 * device does with it (and whether it faults) is the device's verdict.
 */

#include <linux/bitmap.h>
#include <linux/cdev.h>
#include <linux/delay.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/iommu.h>
#include <linux/jiffies.h>
#include <linux/kref.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>
#include <linux/wait.h>
#include <linux/xarray.h>

#include "vioasid_dma_cmd.h"

#define VDMA_NAME		"vioasid-dma"
#define VDMA_VENDOR		0x7a50
#define VDMA_DEVICE		0x0001
#define VDMA_MAX_DEVS		64

/* BAR0 registers (docs/pasid-dma.md, "BAR0 registers") */
#define VDMA_REG_ID		0x000
#define VDMA_REG_VERSION	0x004
#define VDMA_REG_TYPE		0x008
#define VDMA_REG_CAPS		0x00c
#define VDMA_REG_MAX_XFER	0x010
#define VDMA_REG_MAX_BATCH	0x014
#define VDMA_REG_CTRL		0x018
#define VDMA_REG_STATUS		0x01c
#define VDMA_REG_INTR_STATUS	0x020
#define VDMA_REG_PORTAL_STATUS	0x024
#define VDMA_REG_BIND_PASID	0x030
#define VDMA_REG_BIND_CMD	0x034
#define VDMA_REG_BIND_STATUS	0x038
#define VDMA_REG_BIND_INFO	0x040
#define VDMA_REG_BOUND_COUNT	0x048
#define VDMA_REG_ERR_STATUS	0x080
#define VDMA_REG_ERR_PASID	0x084
#define VDMA_REG_ERR_ADDR	0x088
#define VDMA_REG_ERR_REASON	0x090
#define VDMA_REG_PORTAL		0x1000
#define VDMA_BAR_MIN		0x2000

#define VDMA_ID_MAGIC		0x414d4456	/* "VDMA" */
#define VDMA_CAPS_WIDTH		GENMASK(4, 0)
#define VDMA_CAPS_SWQ		BIT(8)
#define VDMA_CAPS_BATCH		BIT(9)
#define VDMA_CTRL_ENABLE	BIT(0)
#define VDMA_CTRL_INTR		BIT(1)
#define VDMA_CTRL_RESET		BIT(31)
#define VDMA_STATUS_ENABLED	BIT(0)
#define VDMA_INTR_COMPLETION	BIT(0)
#define VDMA_ERR_RECORD		BIT(0)
#define VDMA_ERR_REASON		GENMASK(7, 0)
#define VDMA_ERR_WRITE		BIT(8)

#define VDMA_BIND_CMD_BIND	1
#define VDMA_BIND_CMD_UNBIND	2

/* Descriptor opcodes and flags */
#define VDMA_OPC_COPY		1
#define VDMA_OPC_FILL		2
#define VDMA_OPC_COMPARE	3
#define VDMA_OPC_BATCH		4
#define VDMA_FLAG_COMP		BIT(0)
#define VDMA_FLAG_INTR		BIT(1)

/* Completion record status */
#define VDMA_CS_SUCCESS		1
#define VDMA_CS_FAULT		2
#define VDMA_CS_INVALID		3
#define VDMA_CS_NOT_BOUND	4
#define VDMA_CS_BATCH_FAIL	5
#define VDMA_CS_TOO_LARGE	6

/* IOVA layout of one PASID's window, and its control area */
#define VDMA_WINDOW		0x10000000ULL
#define VDMA_CTRL_OFF		VDMA_BUF_SIZE
#define VDMA_CTRL_SIZE		0x10000UL
#define VDMA_CTRL_ORDER		4		/* 16 pages */
#define VDMA_CR_JOB		0x0000		/* the record of a single job */
#define VDMA_CR_BATCH		0x0040		/* the record of a batch */
#define VDMA_CTRL_DESCS		0x1000		/* batch descriptor array (256 x 64 B) */
#define VDMA_CTRL_SUBCR		0x8000		/* records of a batch's descriptors (256 x 32 B) */
#define VDMA_BUF_ORDER		8		/* 256 pages */

#define VDMA_RESULT_LEN		192

struct vdma_desc {
	__le32 pasid;
	u8 opcode;
	u8 flags;
	__le16 rsvd0;
	__le64 completion;
	__le64 src;
	__le64 dst;
	__le32 size;
	__le32 rsvd1;
	__le64 pattern;
	__le64 rsvd2[2];
} __packed;
static_assert(sizeof(struct vdma_desc) == 64);

struct vdma_comp {
	u8 status;
	u8 fault_reason;
	u8 fault_flags;
	u8 result;
	__le32 bytes_done;
	__le64 fault_addr;
	__le32 fault_pasid;
	u8 rsvd[12];
} __packed;
static_assert(sizeof(struct vdma_comp) == 32);

/* A PASID any function uses (module-wide). */
struct vdma_pasid {
	u32 pasid;
	unsigned int users;	/* functions it is bound on */
	bool owned;		/* from iommu_alloc_global_pasid(): free it with the last user */
};

/* One PASID bound on one function. */
struct vdma_binding {
	u32 pasid;
	struct iommu_domain *domain;
	struct page *ctrl;
	void *ctrl_va;
	DECLARE_BITMAP(mapped, VDMA_BUF_PAGES);	/* window pages mapped in the domain */
};

struct vdma_func {
	struct kref ref;
	struct pci_dev *pdev;
	void __iomem *regs;
	int index;
	u32 type;
	u32 caps;
	bool msi;
	int irq;
	struct page *buf;
	void *buf_va;
	struct xarray bindings;		/* PASID -> struct vdma_binding */
	struct mutex lock;		/* commands, bindings, the portal, result */
	wait_queue_head_t wq;
	struct cdev *cdev;
	struct device *dev;
	char result[VDMA_RESULT_LEN];
};

static unsigned int timeout_ms = 5000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms, "how long a job may take before it fails with ETIMEDOUT");

static dev_t vdma_devt;
static DEFINE_IDR(vdma_idr);
static DEFINE_MUTEX(vdma_idr_lock);
static DEFINE_XARRAY(vdma_pasids);
static DEFINE_MUTEX(vdma_pasid_lock);

static const char *const vdma_types[] = {
	[1] = "dedicated", [2] = "translating", [3] = "mdev", [4] = "enqcmd",
};

/* Bind status codes -> (word, errno), docs/pasid-dma.md */
static const struct {
	const char *word;
	int err;
} vdma_bind_status[] = {
	{ "ok", 0 },
	{ "invalid", EINVAL },
	{ "not-present", ENOENT },
	{ "pasid-conflict", EBUSY },
	{ "exhausted", ENOSPC },
	{ "not-bound", ENXIO },
	{ "internal", EIO },
};

/* A register read of all ones: the device does not answer (gone, or its server closed). */
static inline bool vdma_gone(u32 v)
{
	return v == U32_MAX;
}

static inline u64 vdma_iova(u32 pasid, u64 off)
{
	return VDMA_WINDOW * pasid + off;
}

static __printf(3, 4) int vdma_result(struct vdma_func *f, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(f->result, sizeof(f->result), fmt, ap);
	va_end(ap);
	return err;
}

static const char *vdma_type_name(u32 type)
{
	if (type < ARRAY_SIZE(vdma_types) && vdma_types[type])
		return vdma_types[type];
	return "unknown";
}

/* --- the module-wide PASID table --------------------------------------------------------- */

/*
 * A fresh global PASID no function uses.  A PASID given to "bind P" is not reserved in the
 * global allocator, which may hand it out later: such a value is then made owned by its entry
 * (freed with its last user) and the allocator is asked again.  Caller holds vdma_pasid_lock.
 */
static int vdma_pasid_alloc(struct device *dev, u32 *out)
{
	struct vdma_pasid *used;
	int tries;

	for (tries = 0; tries < 64; tries++) {
		ioasid_t pasid = iommu_alloc_global_pasid(dev);

		if (pasid == IOMMU_PASID_INVALID)
			return -ENOSPC;
		used = xa_load(&vdma_pasids, pasid);
		if (!used) {
			*out = pasid;
			return 0;
		}
		if (used->owned)	/* cannot happen: the allocator gave it out twice */
			return -EIO;
		used->owned = true;
	}
	return -ENOSPC;
}

/* A PASID for a new binding: @want, or a fresh global one when @want is 0. */
static int vdma_pasid_get(struct device *dev, u32 want, u32 *out)
{
	struct vdma_pasid *p;
	int ret = 0;

	mutex_lock(&vdma_pasid_lock);
	if (want) {
		p = xa_load(&vdma_pasids, want);
		if (p) {
			p->users++;
			*out = want;
			goto unlock;
		}
	}
	p = kzalloc(sizeof(*p), GFP_KERNEL);
	if (!p) {
		ret = -ENOMEM;
		goto unlock;
	}
	if (want) {
		p->pasid = want;
	} else {
		ret = vdma_pasid_alloc(dev, &p->pasid);
		if (ret) {
			kfree(p);
			goto unlock;
		}
		p->owned = true;
	}
	p->users = 1;
	ret = xa_err(xa_store(&vdma_pasids, p->pasid, p, GFP_KERNEL));
	if (ret) {
		if (p->owned)
			iommu_free_global_pasid(p->pasid);
		kfree(p);
		goto unlock;
	}
	*out = p->pasid;
unlock:
	mutex_unlock(&vdma_pasid_lock);
	return ret;
}

static void vdma_pasid_put(u32 pasid)
{
	struct vdma_pasid *p;

	mutex_lock(&vdma_pasid_lock);
	p = xa_load(&vdma_pasids, pasid);
	if (p && !--p->users) {
		xa_erase(&vdma_pasids, pasid);
		if (p->owned)
			iommu_free_global_pasid(pasid);
		kfree(p);
	}
	mutex_unlock(&vdma_pasid_lock);
}

/* --- bindings ------------------------------------------------------------------------------ */

static u32 vdma_device_bind_cmd(struct vdma_func *f, u32 pasid, u32 cmd, u64 *info)
{
	writel(pasid, f->regs + VDMA_REG_BIND_PASID);
	writel(cmd, f->regs + VDMA_REG_BIND_CMD);
	if (info)
		*info = readq(f->regs + VDMA_REG_BIND_INFO);
	return readl(f->regs + VDMA_REG_BIND_STATUS);
}

/* Undo the guest side of a binding: detach, free the domain, the control area, the PASID. */
static void vdma_binding_free(struct vdma_func *f, struct vdma_binding *b, bool attached)
{
	if (attached)
		iommu_detach_device_pasid(b->domain, &f->pdev->dev, b->pasid);
	if (b->domain)
		iommu_domain_free(b->domain);
	if (b->ctrl)
		__free_pages(b->ctrl, VDMA_CTRL_ORDER);
	vdma_pasid_put(b->pasid);
	kfree(b);
}

static int vdma_bind_status_result(struct vdma_func *f, u32 st, u32 pasid, u64 info,
				   const char *what)
{
	const char *word = st < ARRAY_SIZE(vdma_bind_status) ? vdma_bind_status[st].word :
							     "internal";
	int err = st < ARRAY_SIZE(vdma_bind_status) ? vdma_bind_status[st].err : EIO;

	if (vdma_gone(st)) {
		dev_err(&f->pdev->dev, "%s pasid %u: the device does not answer\n", what, pasid);
		return vdma_result(f, -ENODEV, "error gone %s pasid %u: the device does not answer",
				   what, pasid);
	}

	if (st == 3) {
		dev_err(&f->pdev->dev, "%s pasid %u refused: %s (pPASID %llu in the way)\n",
			what, pasid, word, info);
		return vdma_result(f, -err, "error %s %s pasid %u refused (pPASID %llu in the way)",
				   word, what, pasid, info);
	}
	if (!strcmp(what, "bind"))
		dev_err(&f->pdev->dev, "%s pasid %u refused: %s (status %#x)\n", what, pasid,
			word, st);
	else
		dev_info(&f->pdev->dev, "%s pasid %u refused: %s (status %#x)\n", what, pasid,
			 word, st);
	return vdma_result(f, -err, "error %s %s pasid %u refused (status %#x)", word, what,
			   pasid, st);
}

static int vdma_bind(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct device *dev = &f->pdev->dev;
	struct vdma_binding *b;
	u32 pasid, st;
	u64 info = 0;
	int ret;

	if (c->has_pasid && xa_load(&f->bindings, c->pasid))
		return vdma_result(f, -EBUSY, "error busy pasid %u is already bound on dma%d",
				   c->pasid, f->index);
	if (c->has_pasid && !c->pasid)
		return vdma_result(f, -EINVAL, "error invalid pasid 0 is the RID's (no PASID)");
	ret = vdma_pasid_get(dev, c->has_pasid ? c->pasid : 0, &pasid);
	if (ret == -ENOSPC)
		return vdma_result(f, ret, "error exhausted no free global PASID");
	if (ret)
		return vdma_result(f, ret, "error internal PASID table: %d", ret);

	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!b) {
		vdma_pasid_put(pasid);
		return vdma_result(f, -ENOMEM, "error internal out of memory");
	}
	b->pasid = pasid;
	b->domain = iommu_paging_domain_alloc(dev);
	if (IS_ERR_OR_NULL(b->domain)) {
		ret = b->domain ? PTR_ERR(b->domain) : -ENOMEM;
		b->domain = NULL;
		vdma_binding_free(f, b, false);
		return vdma_result(f, ret, "error internal iommu_paging_domain_alloc: %d", ret);
	}
	b->ctrl = alloc_pages(GFP_KERNEL | __GFP_ZERO, VDMA_CTRL_ORDER);
	if (!b->ctrl) {
		vdma_binding_free(f, b, false);
		return vdma_result(f, -ENOMEM, "error internal out of memory (control area)");
	}
	b->ctrl_va = page_address(b->ctrl);
	ret = iommu_map(b->domain, vdma_iova(pasid, VDMA_CTRL_OFF), page_to_phys(b->ctrl),
			VDMA_CTRL_SIZE, IOMMU_READ | IOMMU_WRITE, GFP_KERNEL);
	if (ret) {
		vdma_binding_free(f, b, false);
		return vdma_result(f, ret, "error internal iommu_map of the control area: %d", ret);
	}
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 11, 0)
	ret = iommu_attach_device_pasid(b->domain, dev, pasid, NULL);
#else
	ret = iommu_attach_device_pasid(b->domain, dev, pasid);
#endif
	if (ret) {
		vdma_binding_free(f, b, false);
		dev_err(dev, "bind pasid %u: iommu_attach_device_pasid failed: %d\n", pasid, ret);
		return vdma_result(f, ret, "error attach iommu_attach_device_pasid(pasid %u): %d",
				   pasid, ret);
	}
	st = vdma_device_bind_cmd(f, pasid, VDMA_BIND_CMD_BIND, &info);
	if (st) {
		vdma_binding_free(f, b, true);
		return vdma_bind_status_result(f, st, pasid, info, "bind");
	}
	ret = xa_err(xa_store(&f->bindings, pasid, b, GFP_KERNEL));
	if (ret) {
		vdma_device_bind_cmd(f, pasid, VDMA_BIND_CMD_UNBIND, NULL);
		vdma_binding_free(f, b, true);
		return vdma_result(f, ret, "error internal binding table: %d", ret);
	}
	dev_dbg(dev, "dma%d: pasid %u bound\n", f->index, pasid);
	return vdma_result(f, 0, "ok pasid=%u", pasid);
}

static int vdma_unbind(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct vdma_binding *b = xa_load(&f->bindings, c->pasid);
	u32 st;

	/*
	 * The device is asked even when the driver has no such binding (it answers not-bound,
	 * normally).  A binding the device no longer knows is dropped here all the same.
	 */
	st = vdma_device_bind_cmd(f, c->pasid, VDMA_BIND_CMD_UNBIND, NULL);
	if (b && (st == 0 || st == 5)) {
		xa_erase(&f->bindings, c->pasid);
		vdma_binding_free(f, b, true);
	}
	if (st)
		return vdma_bind_status_result(f, st, c->pasid, 0, "unbind");
	return vdma_result(f, 0, "ok");
}

static struct vdma_binding *vdma_bound(struct vdma_func *f, u32 pasid)
{
	struct vdma_binding *b = xa_load(&f->bindings, pasid);

	if (!b)
		vdma_result(f, -ENXIO, "error not-bound pasid %u is not bound on dma%d", pasid,
			    f->index);
	return b;
}

/*
 * The binding of @c->pasid, with the pages of the window at @at (@c->len bytes) all mapped
 * (@mapped) or all unmapped (!@mapped); else an ERR_PTR, its result line saying why.
 */
static struct vdma_binding *vdma_window(struct vdma_func *f, const struct vdma_cmd *c, u64 at,
					bool mapped)
{
	struct vdma_binding *b = vdma_bound(f, c->pasid);
	unsigned long first = at / VDMA_PAGE_SIZE, end = first + c->len / VDMA_PAGE_SIZE;

	if (!b)
		return ERR_PTR(-ENXIO);
	if (mapped && find_next_zero_bit(b->mapped, end, first) < end)
		return ERR_PTR(vdma_result(f, -EINVAL,
					   "error not-mapped window 0x%llx+0x%llx not mapped", at,
					   c->len));
	if (!mapped && find_next_bit(b->mapped, end, first) < end)
		return ERR_PTR(vdma_result(f, -EBUSY,
					   "error busy window 0x%llx+0x%llx already mapped", at,
					   c->len));
	return b;
}

static int vdma_map(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct vdma_binding *b = vdma_window(f, c, c->at, false);
	int prot = IOMMU_READ | (c->rw ? IOMMU_WRITE : 0);
	int ret;

	if (IS_ERR(b))
		return PTR_ERR(b);
	ret = iommu_map(b->domain, vdma_iova(c->pasid, c->at), page_to_phys(f->buf) + c->off,
			c->len, prot, GFP_KERNEL);
	if (ret)
		return vdma_result(f, ret, "error map iommu_map: %d", ret);
	bitmap_set(b->mapped, c->at / VDMA_PAGE_SIZE, c->len / VDMA_PAGE_SIZE);
	return vdma_result(f, 0, "ok");
}

static int vdma_unmap(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct vdma_binding *b = vdma_window(f, c, c->off, true);
	size_t done;

	if (IS_ERR(b))
		return PTR_ERR(b);
	done = iommu_unmap(b->domain, vdma_iova(c->pasid, c->off), c->len);
	bitmap_clear(b->mapped, c->off / VDMA_PAGE_SIZE, c->len / VDMA_PAGE_SIZE);
	if (done != c->len)
		return vdma_result(f, -EIO, "error internal iommu_unmap: %zu of %llu bytes", done,
				   c->len);
	return vdma_result(f, 0, "ok");
}

/* --- jobs --------------------------------------------------------------------------------- */

static void vdma_desc_init(struct vdma_desc *d, u8 opcode, u32 pasid, u64 comp, u8 flags)
{
	memset(d, 0, sizeof(*d));
	d->pasid = cpu_to_le32(pasid);
	d->opcode = opcode;
	d->flags = VDMA_FLAG_COMP | flags;
	d->completion = cpu_to_le64(comp);
}

static int vdma_fault_result(struct vdma_func *f, u8 reason, u64 addr, u32 pasid, bool write)
{
	return vdma_result(f, -EFAULT, "fault reason=0x%02x addr=0x%llx pasid=%u write=%u",
			   reason, addr, pasid, write);
}

static int vdma_record_result(struct vdma_func *f, const struct vdma_comp *cr, u32 pasid)
{
	switch (cr->status) {
	case VDMA_CS_SUCCESS:
		return 0;
	case VDMA_CS_FAULT:
		return vdma_fault_result(f, cr->fault_reason, le64_to_cpu(cr->fault_addr),
					 le32_to_cpu(cr->fault_pasid), cr->fault_flags & 1);
	case VDMA_CS_INVALID:
		return vdma_result(f, -EINVAL, "error invalid the device refused the descriptor");
	case VDMA_CS_NOT_BOUND:
		return vdma_result(f, -ENXIO, "error not-bound pasid %u is not bound on the device",
				   pasid);
	case VDMA_CS_TOO_LARGE:
		return vdma_result(f, -E2BIG, "error too-large size beyond MAX_XFER/MAX_BATCH");
	default:
		return vdma_result(f, -EIO, "error internal completion status %u", cr->status);
	}
}

static bool vdma_done(struct vdma_comp *cr)
{
	return cr && READ_ONCE(cr->status);
}

/*
 * Submit one descriptor through the portal (8 qword writes; the last one submits) and wait
 * for its completion record @cr (NULL when the PASID is not bound here: then only the error
 * registers can tell what happened).  Returns 0 with the record complete, or a result.
 */
static int vdma_submit(struct vdma_func *f, const struct vdma_desc *d, struct vdma_comp *cr)
{
	const u64 *q = (const u64 *)d;
	unsigned long deadline;
	bool slept;
	u32 ps, err;
	int i;

	writel(VDMA_ERR_RECORD, f->regs + VDMA_REG_ERR_STATUS);
	if (cr)
		WRITE_ONCE(cr->status, 0);
	wmb();	/* the record is clear before the device may write it */
	for (i = 0; i < 8; i++)
		writeq(q[i], f->regs + VDMA_REG_PORTAL + 8 * i);
	ps = readl(f->regs + VDMA_REG_PORTAL_STATUS);
	if (vdma_gone(ps))
		return vdma_result(f, -ENODEV, "error gone the device does not answer");
	switch (ps) {
	case 0:
		break;
	case 1:
		return vdma_result(f, -EACCES,
				   "error refused the portal refused the descriptor (PASID unknown)");
	case 2:
		return vdma_result(f, -EINVAL, "error invalid the portal refused the descriptor");
	case 3:
		return vdma_result(f, -ENODEV, "error not-enabled the device is not enabled");
	default:
		return vdma_result(f, -EIO, "error internal portal status %u", ps);
	}

	deadline = jiffies + msecs_to_jiffies(timeout_ms);
	for (slept = false;; slept = true) {
		if (vdma_done(cr)) {
			rmb();	/* the record's other fields after its status */
			if (slept && f->msi)
				writel(VDMA_INTR_COMPLETION, f->regs + VDMA_REG_INTR_STATUS);
			return 0;
		}
		err = readl(f->regs + VDMA_REG_ERR_STATUS);
		if (vdma_gone(err))
			return vdma_result(f, -ENODEV, "error gone the device does not answer");
		if (err & VDMA_ERR_RECORD) {
			u32 reason = readl(f->regs + VDMA_REG_ERR_REASON);
			u32 pasid = readl(f->regs + VDMA_REG_ERR_PASID);
			u64 addr = readq(f->regs + VDMA_REG_ERR_ADDR);

			writel(VDMA_ERR_RECORD, f->regs + VDMA_REG_ERR_STATUS);
			return vdma_fault_result(f, reason & VDMA_ERR_REASON, addr, pasid,
						 reason & VDMA_ERR_WRITE);
		}
		if (time_after(jiffies, deadline))
			return vdma_result(f, -ETIMEDOUT,
					   "error timeout the device did not complete in %u ms",
					   timeout_ms);
		if (f->msi && cr)
			wait_event_timeout(f->wq, vdma_done(cr), msecs_to_jiffies(10));
		else
			usleep_range(50, 200);
	}
}

static int vdma_job(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct vdma_binding *b = xa_load(&f->bindings, c->pasid);
	struct vdma_comp *cr = b ? b->ctrl_va + VDMA_CR_JOB : NULL;
	u8 intr = f->msi ? VDMA_FLAG_INTR : 0;
	struct vdma_desc d;
	int ret;

	vdma_desc_init(&d, 0, c->pasid, vdma_iova(c->pasid, VDMA_CTRL_OFF + VDMA_CR_JOB), intr);
	d.size = cpu_to_le32(c->len);
	switch (c->op) {
	case VDMA_OP_COPY:
		d.opcode = VDMA_OPC_COPY;
		d.src = cpu_to_le64(vdma_iova(c->a.pasid, c->a.off));
		d.dst = cpu_to_le64(vdma_iova(c->b.pasid, c->b.off));
		break;
	case VDMA_OP_FILL:
		d.opcode = VDMA_OPC_FILL;
		d.dst = cpu_to_le64(vdma_iova(c->a.pasid, c->a.off));
		d.pattern = cpu_to_le64(0x0101010101010101ULL * c->byte);
		break;
	default:
		d.opcode = VDMA_OPC_COMPARE;
		d.src = cpu_to_le64(vdma_iova(c->a.pasid, c->a.off));
		d.dst = cpu_to_le64(vdma_iova(c->b.pasid, c->b.off));
		break;
	}
	ret = vdma_submit(f, &d, cr);
	if (ret)
		return ret;
	ret = vdma_record_result(f, cr, c->pasid);
	if (ret)
		return ret;
	if (c->op == VDMA_OP_COMPARE)
		return vdma_result(f, 0, "ok equal=%u", cr->result ? 0 : 1);
	return vdma_result(f, 0, "ok");
}

static int vdma_batch(struct vdma_func *f, const struct vdma_cmd *c)
{
	struct vdma_binding *b = xa_load(&f->bindings, c->pasid);
	struct vdma_comp *cr = b ? b->ctrl_va + VDMA_CR_BATCH : NULL;
	u64 ctrl = vdma_iova(c->pasid, VDMA_CTRL_OFF);
	struct vdma_desc d;
	u32 i;
	int ret;

	if (b) {
		struct vdma_desc *arr = b->ctrl_va + VDMA_CTRL_DESCS;
		struct vdma_comp *sub = b->ctrl_va + VDMA_CTRL_SUBCR;

		for (i = 0; i < c->count; i++) {
			vdma_desc_init(&arr[i], VDMA_OPC_COPY, c->pasid,
				       ctrl + VDMA_CTRL_SUBCR + i * sizeof(*sub), 0);
			arr[i].src = cpu_to_le64(vdma_iova(c->a.pasid, c->a.off + i * c->len));
			arr[i].dst = cpu_to_le64(vdma_iova(c->b.pasid, c->b.off + i * c->len));
			arr[i].size = cpu_to_le32(c->len);
			WRITE_ONCE(sub[i].status, 0);
		}
	}
	vdma_desc_init(&d, VDMA_OPC_BATCH, c->pasid, ctrl + VDMA_CR_BATCH,
		       f->msi ? VDMA_FLAG_INTR : 0);
	d.src = cpu_to_le64(ctrl + VDMA_CTRL_DESCS);
	d.size = cpu_to_le32(c->count);
	ret = vdma_submit(f, &d, cr);
	if (ret)
		return ret;
	if (cr->status == VDMA_CS_BATCH_FAIL) {
		struct vdma_comp *sub = b->ctrl_va + VDMA_CTRL_SUBCR;

		for (i = 0; i < c->count; i++) {
			if (READ_ONCE(sub[i].status) != VDMA_CS_SUCCESS) {
				if (!sub[i].status)
					return vdma_result(f, -EIO,
							   "error batch-failed job %u of %u did not run",
							   i, c->count);
				return vdma_record_result(f, &sub[i], c->pasid);
			}
		}
		return vdma_result(f, -EIO, "error batch-failed after %u jobs",
				   le32_to_cpu(cr->bytes_done));
	}
	ret = vdma_record_result(f, cr, c->pasid);
	if (ret)
		return ret;
	return vdma_result(f, 0, "ok jobs=%u", c->count);
}

static int vdma_command(struct vdma_func *f, const char *buf, size_t len)
{
	struct vdma_cmd c;
	const char *why;

	if (vdma_parse_cmd(buf, len, &c, &why))
		return vdma_result(f, -EINVAL, "error invalid %s", why);
	switch (c.op) {
	case VDMA_OP_BIND:
		return vdma_bind(f, &c);
	case VDMA_OP_UNBIND:
		return vdma_unbind(f, &c);
	case VDMA_OP_MAP:
		return vdma_map(f, &c);
	case VDMA_OP_UNMAP:
		return vdma_unmap(f, &c);
	case VDMA_OP_BATCH:
		return vdma_batch(f, &c);
	default:
		return vdma_job(f, &c);
	}
}

/* --- sysfs ----------------------------------------------------------------------------- */

static ssize_t cmd_store(struct device *dev, struct device_attribute *attr, const char *buf,
			 size_t count)
{
	struct vdma_func *f = dev_get_drvdata(dev);
	int ret;

	mutex_lock(&f->lock);
	ret = vdma_command(f, buf, count);
	mutex_unlock(&f->lock);
	return ret ? ret : count;
}

static ssize_t cmd_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_func *f = dev_get_drvdata(dev);
	ssize_t n;

	mutex_lock(&f->lock);
	n = sysfs_emit(buf, "%s\n", f->result);
	mutex_unlock(&f->lock);
	return n;
}
static DEVICE_ATTR_RW(cmd);

static ssize_t type_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vdma_func *f = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%s\n", vdma_type_name(f->type));
}
static DEVICE_ATTR_RO(type);

static struct attribute *vdma_attrs[] = {
	&dev_attr_cmd.attr,
	&dev_attr_type.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vdma);

static char *vdma_devnode(const struct device *dev, umode_t *mode)
{
	if (mode)
		*mode = 0600;
	return kasprintf(GFP_KERNEL, "vioasid-%s", dev_name(dev));
}

static const struct class vdma_class = {
	.name = VDMA_NAME,
	.dev_groups = vdma_groups,
	.devnode = vdma_devnode,
};

/* --- the buffer's character device -------------------------------------------------------- */

static void vdma_release(struct kref *ref)
{
	struct vdma_func *f = container_of(ref, struct vdma_func, ref);

	if (f->buf)
		__free_pages(f->buf, VDMA_BUF_ORDER);
	kfree(f);
}

static int vdma_open(struct inode *inode, struct file *file)
{
	struct vdma_func *f;

	mutex_lock(&vdma_idr_lock);
	f = idr_find(&vdma_idr, iminor(inode));
	if (f)
		kref_get(&f->ref);
	mutex_unlock(&vdma_idr_lock);
	if (!f)
		return -ENODEV;
	file->private_data = f;
	return 0;
}

static int vdma_file_release(struct inode *inode, struct file *file)
{
	struct vdma_func *f = file->private_data;

	kref_put(&f->ref, vdma_release);
	return 0;
}

static ssize_t vdma_read(struct file *file, char __user *ubuf, size_t count, loff_t *ppos)
{
	struct vdma_func *f = file->private_data;

	return simple_read_from_buffer(ubuf, count, ppos, f->buf_va, VDMA_BUF_SIZE);
}

static ssize_t vdma_write(struct file *file, const char __user *ubuf, size_t count,
			  loff_t *ppos)
{
	struct vdma_func *f = file->private_data;

	/* the buffer is full: past its end a write fails, as on a full disk */
	if (*ppos >= VDMA_BUF_SIZE && count)
		return -ENOSPC;
	return simple_write_to_buffer(f->buf_va, VDMA_BUF_SIZE, ppos, ubuf, count);
}

static loff_t vdma_llseek(struct file *file, loff_t off, int whence)
{
	return fixed_size_llseek(file, off, whence, VDMA_BUF_SIZE);
}

static const struct file_operations vdma_fops = {
	.owner = THIS_MODULE,
	.open = vdma_open,
	.release = vdma_file_release,
	.read = vdma_read,
	.write = vdma_write,
	.llseek = vdma_llseek,
};

/* --- PCI --------------------------------------------------------------------------------- */

/*
 * The MSI vector is this function's alone and every completion raises it, so the handler only
 * wakes the waiter: reading and clearing INTR_STATUS would cost two more round trips to the
 * device per job.  A waiter that really slept clears INTR_STATUS itself.
 */
static irqreturn_t vdma_irq(int irq, void *data)
{
	struct vdma_func *f = data;

	wake_up_all(&f->wq);
	return IRQ_HANDLED;
}

static void vdma_setup_irq(struct vdma_func *f)
{
	struct pci_dev *pdev = f->pdev;
	int ret;

	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI);
	if (ret < 0) {
		dev_info(&pdev->dev, "no MSI (%d): polling for completions\n", ret);
		return;
	}
	f->irq = pci_irq_vector(pdev, 0);
	ret = request_irq(f->irq, vdma_irq, 0, VDMA_NAME, f);
	if (ret) {
		dev_info(&pdev->dev, "request_irq failed (%d): polling for completions\n", ret);
		pci_free_irq_vectors(pdev);
		return;
	}
	f->msi = true;
}

static void vdma_teardown_bindings(struct vdma_func *f)
{
	struct vdma_binding *b;
	unsigned long idx;

	xa_for_each(&f->bindings, idx, b) {
		vdma_device_bind_cmd(f, b->pasid, VDMA_BIND_CMD_UNBIND, NULL);
		xa_erase(&f->bindings, idx);
		vdma_binding_free(f, b, true);
	}
	xa_destroy(&f->bindings);
}

static int vdma_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct vdma_func *f;
	u32 magic, version;
	int ret;

	f = kzalloc(sizeof(*f), GFP_KERNEL);
	if (!f)
		return -ENOMEM;
	kref_init(&f->ref);
	f->pdev = pdev;
	f->index = -1;
	mutex_init(&f->lock);
	init_waitqueue_head(&f->wq);
	xa_init(&f->bindings);
	strscpy(f->result, "ok", sizeof(f->result));

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_free;
	if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, 0) < VDMA_BAR_MIN) {
		dev_err(dev, "BAR0 is not a memory BAR of at least %#x bytes\n", VDMA_BAR_MIN);
		ret = -ENODEV;
		goto err_disable;
	}
	ret = pci_request_region(pdev, 0, VDMA_NAME);
	if (ret)
		goto err_disable;
	f->regs = pci_iomap(pdev, 0, 0);
	if (!f->regs) {
		ret = -ENOMEM;
		goto err_region;
	}
	magic = readl(f->regs + VDMA_REG_ID);
	version = readl(f->regs + VDMA_REG_VERSION);
	f->type = readl(f->regs + VDMA_REG_TYPE);
	f->caps = readl(f->regs + VDMA_REG_CAPS);
	if (magic != VDMA_ID_MAGIC || version != 1 || !f->type ||
	    f->type >= ARRAY_SIZE(vdma_types)) {
		dev_err(dev, "not a vioasid DMA function (ID %#x, version %u, type %u)\n", magic,
			version, f->type);
		ret = -ENODEV;
		goto err_unmap;
	}
	pci_set_master(pdev);
	f->buf = alloc_pages(GFP_KERNEL | __GFP_ZERO, VDMA_BUF_ORDER);
	if (!f->buf) {
		ret = -ENOMEM;
		goto err_unmap;
	}
	f->buf_va = page_address(f->buf);
	vdma_setup_irq(f);
	writel(VDMA_CTRL_ENABLE | (f->msi ? VDMA_CTRL_INTR : 0), f->regs + VDMA_REG_CTRL);
	if (!(readl(f->regs + VDMA_REG_STATUS) & VDMA_STATUS_ENABLED))
		dev_warn(dev, "the device did not report itself enabled\n");

	mutex_lock(&vdma_idr_lock);
	f->index = idr_alloc(&vdma_idr, f, 0, VDMA_MAX_DEVS, GFP_KERNEL);
	mutex_unlock(&vdma_idr_lock);
	if (f->index < 0) {
		ret = f->index;
		goto err_irq;
	}
	f->cdev = cdev_alloc();
	if (!f->cdev) {
		ret = -ENOMEM;
		goto err_idr;
	}
	f->cdev->owner = THIS_MODULE;
	f->cdev->ops = &vdma_fops;
	ret = cdev_add(f->cdev, MKDEV(MAJOR(vdma_devt), f->index), 1);
	if (ret) {
		kobject_put(&f->cdev->kobj);
		goto err_idr;
	}
	f->dev = device_create(&vdma_class, dev, MKDEV(MAJOR(vdma_devt), f->index), f, "dma%d",
			       f->index);
	if (IS_ERR(f->dev)) {
		ret = PTR_ERR(f->dev);
		goto err_cdev;
	}
	pci_set_drvdata(pdev, f);
	dev_info(dev, "dma%d: %s function, PASID width %lu, %s\n", f->index,
		 vdma_type_name(f->type), f->caps & VDMA_CAPS_WIDTH,
		 f->msi ? "MSI" : "polling");
	return 0;

err_cdev:
	cdev_del(f->cdev);
err_idr:
	mutex_lock(&vdma_idr_lock);
	idr_remove(&vdma_idr, f->index);
	mutex_unlock(&vdma_idr_lock);
err_irq:
	writel(0, f->regs + VDMA_REG_CTRL);
	if (f->msi) {
		free_irq(f->irq, f);
		pci_free_irq_vectors(pdev);
	}
err_unmap:
	pci_iounmap(pdev, f->regs);
err_region:
	pci_release_region(pdev, 0);
err_disable:
	pci_disable_device(pdev);
err_free:
	kref_put(&f->ref, vdma_release);
	return ret;
}

static void vdma_remove(struct pci_dev *pdev)
{
	struct vdma_func *f = pci_get_drvdata(pdev);

	mutex_lock(&vdma_idr_lock);
	idr_remove(&vdma_idr, f->index);
	mutex_unlock(&vdma_idr_lock);
	device_destroy(&vdma_class, MKDEV(MAJOR(vdma_devt), f->index));
	cdev_del(f->cdev);

	mutex_lock(&f->lock);
	vdma_teardown_bindings(f);
	writel(VDMA_CTRL_RESET, f->regs + VDMA_REG_CTRL);
	writel(0, f->regs + VDMA_REG_CTRL);
	mutex_unlock(&f->lock);
	if (f->msi) {
		free_irq(f->irq, f);
		pci_free_irq_vectors(pdev);
	}
	pci_clear_master(pdev);
	pci_iounmap(pdev, f->regs);
	pci_release_region(pdev, 0);
	pci_disable_device(pdev);
	kref_put(&f->ref, vdma_release);	/* the buffer lives while a file holds it open */
}

static const struct pci_device_id vdma_ids[] = {
	{ PCI_DEVICE(VDMA_VENDOR, VDMA_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vdma_ids);

static struct pci_driver vdma_driver = {
	.name = VDMA_NAME,
	.id_table = vdma_ids,
	.probe = vdma_probe,
	.remove = vdma_remove,
};

static int __init vdma_init(void)
{
	int ret;

	ret = alloc_chrdev_region(&vdma_devt, 0, VDMA_MAX_DEVS, VDMA_NAME);
	if (ret)
		return ret;
	ret = class_register(&vdma_class);
	if (ret)
		goto err_chrdev;
	ret = pci_register_driver(&vdma_driver);
	if (ret)
		goto err_class;
	return 0;

err_class:
	class_unregister(&vdma_class);
err_chrdev:
	unregister_chrdev_region(vdma_devt, VDMA_MAX_DEVS);
	return ret;
}

static void __exit vdma_exit(void)
{
	pci_unregister_driver(&vdma_driver);
	class_unregister(&vdma_class);
	unregister_chrdev_region(vdma_devt, VDMA_MAX_DEVS);
	idr_destroy(&vdma_idr);
	xa_destroy(&vdma_pasids);
}

module_init(vdma_init);
module_exit(vdma_exit);

MODULE_DESCRIPTION("vioasid PASID DMA function (PASID-tagged descriptor DMA over vfio-user)");
MODULE_AUTHOR("the vioasid project");
MODULE_LICENSE("GPL");
