/* The front-end socket's reader thread without the GIL (vioasid/vhost_user/native.py loads it).
 *
 * Same contract as iotlb_reader.FrontendReader, in C so that an IOTLB invalidation is acknowledged
 * while the Python data path runs (a Python thread waits for the GIL): a lone IOTLB_MSG
 * invalidation read from `sock` is posted to the ring under `mu`, then acknowledged; every other
 * chunk (with its fds) is passed on, unchanged, as one packet on `fwd` (a SOCK_SEQPACKET
 * socketpair the event loop reads). The data path takes `mu` around each guest-memory access
 * (vr_enter .. vr_exit), applying what the ring holds first: an access either ends before an
 * invalidation is posted (so before its ack) or sees it.
 *
 * No layout is defined here: offsets, sizes, codes and the ack's bytes come from Python
 * (vioasid.formats.virtio). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RING 4096
#define MAX_FDS 253 /* SCM_MAX_FD */
#define BUF_SIZE 65536

struct layout {
    uint32_t msg_bytes;   /* header + IOTLB payload */
    uint32_t request;     /* IOTLB_MSG */
    uint32_t version;     /* flags & 3 */
    uint32_t need_reply;  /* flags bit */
    uint32_t payload;     /* header's size field for an IOTLB payload */
    uint32_t req_off, flags_off, size_off; /* u32 header fields */
    uint32_t iova_off, isize_off;          /* u64 payload fields (from the message start) */
    uint32_t type_off, invalidate;         /* u8 type field and its INVALIDATE value */
    uint32_t ack_len;
    unsigned char ack[64];
};

struct vr {
    int sock, fwd;
    struct layout l;
    pthread_t thread;
    pthread_mutex_t mu;
    uint64_t ring_iova[RING], ring_size[RING];
    unsigned count;    /* under mu */
    int overflow;      /* under mu */
    int acks;          /* REPLY_ACK negotiated */
    uint64_t fwd_bytes;  /* passed on (this thread) */
    uint64_t done_bytes; /* of those, handled by the loop (the loop's thread) */
    int partial;         /* the loop's decoder holds part of a message */
    uint64_t invalidations, msg_n, between_n;
    double msg_s, between_s, last;
    int tid; /* the thread's id (gettid), for CPU placement; set first thing by run() */
    unsigned char buf[BUF_SIZE];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint32_t u32_at(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v; /* vhost-user is native-endian; this host is little-endian like the layouts */
}

static uint64_t u64_at(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static int send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static void close_fds(struct msghdr *mh) {
    for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *fds = (int *)CMSG_DATA(c);
            for (size_t i = 0; i < k; i++)
                close(fds[i]);
        }
    }
}

/* A lone invalidation: post it, ack it. 0 if it is anything else. */
static int answer(struct vr *r, const unsigned char *m) {
    const struct layout *l = &r->l;
    uint32_t flags = u32_at(m + l->flags_off);
    if (u32_at(m + l->req_off) != l->request || u32_at(m + l->size_off) != l->payload ||
        (flags & 3) != l->version || m[l->type_off] != l->invalidate)
        return 0;
    double t0 = now();
    pthread_mutex_lock(&r->mu);
    if (r->count < RING) {
        r->ring_iova[r->count] = u64_at(m + l->iova_off);
        r->ring_size[r->count] = u64_at(m + l->isize_off);
        r->count++;
    } else {
        r->overflow = 1; /* the data path drops everything */
    }
    pthread_mutex_unlock(&r->mu);
    if ((flags & l->need_reply) && __atomic_load_n(&r->acks, __ATOMIC_SEQ_CST))
        send_all(r->sock, l->ack, l->ack_len);
    double t1 = now();
    __atomic_add_fetch(&r->invalidations, 1, __ATOMIC_SEQ_CST);
    if (t0 - r->last < 0.005) {
        r->between_s += t0 - r->last;
        r->between_n++;
    }
    r->msg_s += t1 - t0;
    r->msg_n++;
    r->last = t1;
    return 1;
}

static void *run(void *arg) {
    struct vr *r = arg;
    __atomic_store_n(&r->tid, (int)gettid(), __ATOMIC_SEQ_CST);
    static __thread union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    for (;;) {
        struct iovec iov = {r->buf, sizeof r->buf};
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        ssize_t n = recvmsg(r->sock, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (mh.msg_flags & MSG_CTRUNC)) {
            if (n > 0)
                close_fds(&mh);
            break;
        }
        if ((size_t)n == r->l.msg_bytes && mh.msg_controllen == 0 &&
            __atomic_load_n(&r->done_bytes, __ATOMIC_SEQ_CST) ==
                __atomic_load_n(&r->fwd_bytes, __ATOMIC_SEQ_CST) &&
            !__atomic_load_n(&r->partial, __ATOMIC_SEQ_CST) && answer(r, r->buf))
            continue;
        __atomic_add_fetch(&r->fwd_bytes, (uint64_t)n, __ATOMIC_SEQ_CST);
        struct msghdr out;
        memset(&out, 0, sizeof out);
        iov.iov_len = (size_t)n;
        out.msg_iov = &iov;
        out.msg_iovlen = 1;
        if (mh.msg_controllen) {
            out.msg_control = mh.msg_control;
            out.msg_controllen = mh.msg_controllen;
        }
        ssize_t k;
        do
            k = sendmsg(r->fwd, &out, MSG_NOSIGNAL);
        while (k < 0 && errno == EINTR);
        if (mh.msg_controllen)
            close_fds(&mh); /* the loop got its own copies */
        if (k != n)
            break;
    }
    shutdown(r->fwd, SHUT_RDWR); /* the loop reads the end of the session */
    return NULL;
}

struct vr *vr_start(int sock, int fwd, const struct layout *l) {
    if (l->ack_len > sizeof l->ack || l->msg_bytes > BUF_SIZE)
        return NULL;
    struct vr *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->sock = sock;
    r->fwd = fwd;
    r->l = *l;
    pthread_mutex_init(&r->mu, NULL);
    if (pthread_create(&r->thread, NULL, run, r)) {
        free(r);
        return NULL;
    }
    pthread_setname_np(r->thread, "vioasid-iotlb"); /* as `top -H` and /proc show it */
    return r;
}

/* The reader thread's id (0 while it has not run yet: the caller may ask again). */
int vr_tid(struct vr *r) { return __atomic_load_n(&r->tid, __ATOMIC_SEQ_CST); }

void vr_set_acks(struct vr *r, int acks) { __atomic_store_n(&r->acks, acks, __ATOMIC_SEQ_CST); }

/* The loop handled `n` forwarded bytes; `partial`: its decoder holds part of a message. */
void vr_handled(struct vr *r, uint64_t n, int partial) {
    __atomic_store_n(&r->partial, partial, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&r->done_bytes, n, __ATOMIC_SEQ_CST);
}

/* Take the lock and the posted invalidations (out: iova, size pairs); -1: the ring overflowed
 * (drop everything). The lock stays held until vr_exit. */
int vr_enter(struct vr *r, uint64_t *out) {
    pthread_mutex_lock(&r->mu);
    int k = (int)r->count;
    if (r->overflow) {
        r->overflow = 0;
        r->count = 0;
        return -1;
    }
    for (int i = 0; i < k; i++) {
        out[2 * i] = r->ring_iova[i];
        out[2 * i + 1] = r->ring_size[i];
    }
    r->count = 0;
    return k;
}

void vr_exit(struct vr *r) { pthread_mutex_unlock(&r->mu); }

unsigned vr_pending(struct vr *r) { return __atomic_load_n(&r->count, __ATOMIC_SEQ_CST); }

/* invalidations answered, seconds and counts of `message` and `between_messages` */
void vr_stats(struct vr *r, uint64_t *n, double *msg_s, uint64_t *msg_n, double *between_s,
              uint64_t *between_n) {
    *n = __atomic_load_n(&r->invalidations, __ATOMIC_SEQ_CST);
    *msg_s = r->msg_s;
    *msg_n = r->msg_n;
    *between_s = r->between_s;
    *between_n = r->between_n;
}

/* After the caller shut the socket down: wait for the thread (then vr_enter/vr_stats still
 * work, until vr_free). */
void vr_join(struct vr *r) { pthread_join(r->thread, NULL); }

void vr_free(struct vr *r) {
    pthread_mutex_destroy(&r->mu);
    free(r);
}

int vr_ring_size(void) { return RING; }
