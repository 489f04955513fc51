/* longtrain's planned allocator: the core of `memory.planner.enabled` (docs/memory-planner.md).
 *
 * Every device allocation of the process comes here (torch's pluggable-allocator hooks, installed by
 * runtime.py). Inside a *window* (one decoder layer's forward, or its backward, or what runs between
 * two of those) the k-th request is matched with the k-th request of that window's plan: when the plan
 * places it and the size is the planned one, it gets `region + offset[k]` in one region allocated once;
 * everything else (requests outside windows or without a plan, unplanned requests, refused ones, any
 * request after a mismatch in its window) is served by the
 * fallback allocator: CUDA's stream-ordered allocator (cudaMallocAsync on the device's default pool;
 * it returns freed memory to the device until the plan serves, then keeps it: lt_pool_keep), or the one
 * the shim sets with lt_set_fallback (torch's own caching allocator: memory.planner.fallback=caching).
 * Before a plan serves, a request the device cannot hold may *overflow* into CUDA managed memory, up to a
 * cap runtime.py sets (lt_set_overflow; memory.planner.warmup_overflow_gib), so that an iteration only a
 * plan fits on the device can still be recorded.
 *
 * Safety, always on:
 *  - a planned offset is handed out only when no live planned block overlaps it (a free that came
 *    late, a tensor kept longer than the trace saw): otherwise the request is refused to the fallback;
 *  - a size, stream or count that differs from the plan switches the plan off for the rest of the
 *    window (the index alignment is lost; no offset is guessed after that);
 *  - a block another stream used (`record_stream`) is freed only once events recorded on those
 *    streams at free time have completed (deferred, as torch's caching allocator does);
 *  - a plan may place requests of several streams (a side stream's prefetch buffers) over the same bytes
 *    at different times: a planned block whose bytes a request on another stream may take later leaves a
 *    *ghost* when it is freed (its range and an event recorded on its stream), and that request's stream
 *    waits for the event before it gets the bytes (cross-stream reuse in stream order).
 * Check mode additionally counts planned blocks whose lifetime differs from the plan (freed in
 * another window than the plan's) and planned blocks still live when the window that should free them
 * ends.
 *
 * Record mode logs every allocation and free (7 int64 each: type, window, k, size, flag, block id, stream;
 * the flag is "on the window's stream" for an allocation, "used by another stream" for a free) so that
 * runtime.py can build the plans from a real step. A host backend (malloc, simulated events) lets the
 * CPU tests drive this exact code. Refusals are logged with the block in the way, for diagnosis.
 *
 * No CUDA headers: the runtime functions are looked up with dlsym in the libcudart torch loaded.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void *stream_t;
typedef int cuerr_t;

/* ---- backend ---------------------------------------------------------------------------------- */

enum { BACKEND_NONE = 0, BACKEND_HOST = 1, BACKEND_CUDA = 2 };
static int backend = BACKEND_NONE;

static cuerr_t (*c_malloc)(void **, size_t);
static cuerr_t (*c_free)(void *);
static cuerr_t (*c_malloc_async)(void **, size_t, stream_t);
static cuerr_t (*c_free_async)(void *, stream_t);
static cuerr_t (*c_event_create)(void **, unsigned);
static cuerr_t (*c_event_record)(void *, stream_t);
static cuerr_t (*c_event_query)(void *);
static cuerr_t (*c_event_destroy)(void *);
static cuerr_t (*c_stream_wait_event)(stream_t, void *, unsigned);
static cuerr_t (*c_device_sync)(void);
static cuerr_t (*c_get_last_error)(void);
static cuerr_t (*c_mem_get_info)(size_t *, size_t *);
static cuerr_t (*c_default_pool)(void **, int);
static cuerr_t (*c_pool_set)(void *, int, void *);
static cuerr_t (*c_pool_get)(void *, int, void *);
static cuerr_t (*c_pool_trim)(void *, size_t);
static cuerr_t (*c_malloc_managed)(void **, size_t, unsigned); /* optional: no overflow without it */
#define MEM_ATTACH_GLOBAL 1
static void *pool;

#define ATTR_RELEASE_THRESHOLD 4
#define ATTR_RESERVED_CURRENT 5
#define ATTR_RESERVED_HIGH 6
#define EVENT_DISABLE_TIMING 2
#define ERR_NOT_READY 600

/* host backend: events are tickets, complete once the test says so */
static int64_t host_tickets, host_done, host_reserved, host_reserved_peak, host_limit;
static int64_t host_granule = 1; /* the fallback's blocks are rounded up to this (lt_host_granule) */
static int64_t host_waits, host_last_wait[2]; /* stream waits queued: how many, the last (stream, ticket) */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

/* ---- blocks: ptr -> block, open addressing ------------------------------------------------------ */

#define MAX_STREAMS 8
typedef struct {
    void *ptr;
    int64_t size, id, offset, expect_free; /* offset < 0: fallback block */
    int64_t plan, k; /* where it was asked for: the window's plan id and its index there */
    int why; /* a fallback block: why the fallback served it (FB_*) */
    int freed; /* a planned block the program freed while other streams still read it (deferred) */
    int ghost; /* a planned block that leaves a ghost when freed (the plan's PLAN_GHOST) */
    int carved; /* a region block no plan placed: the last resort for a request nothing else served */
    int overflow; /* in managed memory: a request the device could not hold before a plan served */
    stream_t stream;
    int nrec;
    stream_t rec[MAX_STREAMS];
    int rec_overflow;
} block_t;

static block_t **table;
static int64_t tcap, tlen;

static uint64_t hash_ptr(void *p) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return x;
}

static int table_put(block_t *b);

static int table_grow(void) {
    block_t **old = table;
    int64_t ocap = tcap;
    tcap = ocap ? ocap * 2 : 4096;
    table = calloc((size_t)tcap, sizeof(block_t *));
    if (!table) { table = old; tcap = ocap; return -1; }
    tlen = 0;
    for (int64_t i = 0; i < ocap; i++)
        if (old[i]) table_put(old[i]);
    free(old);
    return 0;
}

static int table_put(block_t *b) {
    if ((tlen + 1) * 2 > tcap && table_grow()) return -1;
    uint64_t m = (uint64_t)tcap - 1, i = hash_ptr(b->ptr) & m;
    while (table[i]) i = (i + 1) & m;
    table[i] = b;
    tlen++;
    return 0;
}

static int64_t table_find(void *p) {
    if (!tcap) return -1;
    uint64_t m = (uint64_t)tcap - 1, i = hash_ptr(p) & m;
    while (table[i]) {
        if (table[i]->ptr == p) return (int64_t)i;
        i = (i + 1) & m;
    }
    return -1;
}

static block_t *table_take(void *p) {
    int64_t at = table_find(p);
    if (at < 0) return NULL;
    uint64_t m = (uint64_t)tcap - 1, i = (uint64_t)at;
    block_t *b = table[i];
    table[i] = NULL;
    tlen--;
    /* backward-shift deletion keeps every probe chain unbroken */
    for (uint64_t j = (i + 1) & m; table[j]; j = (j + 1) & m) {
        uint64_t h = hash_ptr(table[j]->ptr) & m;
        if ((j > i && (h <= i || h > j)) || (j < i && (h <= i && h > j))) {
            table[i] = table[j];
            table[j] = NULL;
            i = j;
        }
    }
    return b;
}

/* ---- plans, windows, live planned blocks, deferred frees, record ------------------------------- */

#define MAX_PLANS 4096
/* per request: size, offset (< 0: unplanned), the window that frees it, its stream (-1: the window's),
 * flags (PLAN_GHOST: leave a ghost at its free, a request on another stream may take its bytes later) */
typedef struct { int64_t n, *size, *offset, *free_at, *stream, *flags; } plan_t;
#define PLAN_GHOST 1
static plan_t plans[MAX_PLANS];

static char *region;
static int64_t region_bytes;

static block_t **live; /* the planned blocks whose memory is in use (held, or freed with copies pending) */
static int64_t nlive, live_cap, live_bytes;

static struct { int active, plan, asked, off; int64_t seq, k; stream_t stream; } win;
static int64_t next_seq, next_id;

typedef struct { block_t *b; int nev; void *ev[MAX_STREAMS]; stream_t on[MAX_STREAMS]; } deferred_t;
static deferred_t *deferred;
static int64_t ndeferred, deferred_cap;

/* ghosts: freed planned blocks whose bytes a request on another stream may take later; each holds an
 * event recorded on the block's stream at the free, and is dropped once that event has completed */
typedef struct { int64_t offset, size; stream_t stream; void *ev; } ghost_t;
static ghost_t *ghosts;
static int64_t nghosts, ghost_cap;
static void **spare_events; /* completed events, recorded again instead of created (cudaEventCreate is slow) */
static int64_t nspare, spare_cap;

#define REC_W 7
static int recording, check_mode;
static int64_t *rec;
static int64_t rec_len, rec_cap; /* in events; REC_W int64 each */

/* stats, in the order of lt_stats */
enum {
    S_ALLOCATED, S_ALLOCATED_PEAK, S_RESERVED, S_RESERVED_PEAK, S_SERVED, S_MISS_SIZE, S_MISS_LENGTH,
    S_MISS_STREAM, S_REFUSED_OVERLAP, S_FALLBACK, S_DEFERRED, S_CHECK_LIFETIME, S_CHECK_LEAKED,
    S_REGION, S_PLANNED_LIVE, S_OOM_RETRIES, S_WINDOWS, S_UNKNOWN_FREE, S_AFTER_MISS, S_REUSE_WAITS,
    S_CROSS_WAITS, S_GHOSTS, /* waits queued for a ghost's stream; ghosts pending now */
    S_REGION_GIVEN_BACK, /* times the idle region went back to the device for a request nothing else served */
    S_CARVED, /* requests served from a gap of the region no plan placed them in (region_carve) */
    /* requests served from managed memory because the device could not hold them (lt_set_overflow); the
     * bytes held there now, and their peak over the run (not reset with the others: it happens before the plan) */
    S_OVERFLOWED, S_OVERFLOW_BYTES, S_OVERFLOW_PEAK,
    /* requests nothing served (out of memory), and at the last one: the bytes live in the region, its
     * window's plan (-1: none, -2: outside every window) and whether a miss had turned that plan off */
    S_FAILED, S_FAILED_LIVE, S_FAILED_PLAN, S_FAILED_PLAN_OFF,
    S_FB_BYTES, /* FB_N: the fallback's bytes held now (until really released), by why it served them */
    S_FB_PEAK = S_FB_BYTES + 4, /* FB_N: their peaks since the last reset */
    S_N = S_FB_PEAK + 4
};
/* why the fallback served a block: no plan for its window (warm-up, recording, outside windows), a
 * request the plan leaves out, a planned one refused (its slot in use), after a mismatch in its window */
enum { FB_NO_PLAN, FB_UNPLANNED, FB_REFUSED, FB_AFTER_MISS, FB_N };
static int64_t st[S_N];

static void log_event(int64_t type, int64_t window, int64_t k, int64_t size, int64_t main_stream, int64_t id,
                      stream_t stream) {
    if (!recording) return;
    if (rec_len == rec_cap) {
        int64_t cap = rec_cap ? rec_cap * 2 : 65536;
        int64_t *n = realloc(rec, (size_t)cap * REC_W * sizeof(int64_t));
        if (!n) { recording = 0; return; } /* runtime.py sees the record stop short and plans nothing */
        rec = n;
        rec_cap = cap;
    }
    int64_t *e = rec + rec_len * REC_W;
    e[0] = type; e[1] = window; e[2] = k; e[3] = size; e[4] = main_stream; e[5] = id;
    e[6] = (int64_t)(intptr_t)stream;
    rec_len++;
}

/* ---- the fallback allocator: serves everything the plan does not -------------------------------
 * CUDA's stream-ordered pool (cudaMallocAsync on the device's default pool: lt_init_cuda), the host's
 * malloc (tests: lt_init_host), or one the shim sets with lt_set_fallback (torch's own caching allocator). */
typedef struct {
    void *(*alloc)(size_t size, stream_t stream); /* NULL: out of memory */
    void (*free)(void *ptr, size_t size, stream_t stream); /* every stream is done with it */
    int64_t (*reserved)(int peak); /* bytes it holds from the device: now (0), or its peak since reset (1) */
    void (*reset_peak)(void);
    void (*trim)(void); /* give what it caches back to the device (after a device synchronisation) */
} fallback_t;
static fallback_t fb;
static int fb_external; /* lt_set_fallback was called: the pool's release threshold is not ours to set */

static void *pool_alloc(size_t size, stream_t stream) {
    void *p = NULL;
    if (c_malloc_async(&p, size, stream) == 0) return p;
    c_get_last_error();
    return NULL;
}
static void pool_free(void *ptr, size_t size, stream_t stream) {
    (void)size;
    if (c_free_async(ptr, stream)) c_get_last_error();
}
static int64_t pool_reserved(int peak) {
    uint64_t v = 0;
    if (c_pool_get(pool, peak ? ATTR_RESERVED_HIGH : ATTR_RESERVED_CURRENT, &v)) { c_get_last_error(); return 0; }
    return (int64_t)v;
}
static void pool_reset_peak(void) {
    uint64_t zero = 0; /* the driver restarts the high-water at the current reserved bytes */
    if (c_pool_set(pool, ATTR_RESERVED_HIGH, &zero)) c_get_last_error();
}
static void pool_trim(void) {
    c_device_sync();
    if (c_pool_trim(pool, 0)) c_get_last_error();
}

/* host backend with a limit: the bytes a test's "device" has left beside the region and the fallback's */
static int64_t host_room(void) { return host_limit - host_reserved - region_bytes; }

static int64_t host_block(size_t size) { return ((int64_t)size + host_granule - 1) / host_granule * host_granule; }

static void *host_alloc(size_t size, stream_t stream) {
    (void)stream;
    if (host_limit && host_block(size) > host_room()) return NULL; /* a test's "device" is full */
    void *p = malloc(size);
    if (p) {
        host_reserved += host_block(size);
        if (host_reserved > host_reserved_peak) host_reserved_peak = host_reserved;
    }
    return p;
}
static void host_free(void *ptr, size_t size, stream_t stream) {
    (void)stream;
    host_reserved -= host_block(size);
    free(ptr);
}
static int64_t host_reserved_bytes(int peak) { return peak ? host_reserved_peak : host_reserved; }
static void host_reset_peak(void) { host_reserved_peak = host_reserved; }
static void host_trim(void) {}

/* reserved peak = max(reserved_floor, region + the fallback's peak since the region came) */
static int64_t reserved_floor;

static void note_allocated(int64_t delta) {
    st[S_ALLOCATED] += delta;
    if (st[S_ALLOCATED] > st[S_ALLOCATED_PEAK]) st[S_ALLOCATED_PEAK] = st[S_ALLOCATED];
}

/* refusals, for diagnosis: (plan, k, size, blocking block's plan, its k, whether the program had freed
 * it already and it waited on another stream); the first REFUSAL_LOG kept */
#define REFUSAL_LOG 4096
#define REFUSAL_W 6
static int64_t refusals[REFUSAL_LOG][REFUSAL_W];
static int64_t nrefusals;

/* check mode: planned blocks freed in another window than the plan's: (plan, k, size, the plan's freeing
 * window, the window that freed it: -1 outside any); the first REFUSAL_LOG kept */
static int64_t lifetimes[REFUSAL_LOG][5];
static int64_t nlifetimes;

static int live_add(block_t *b) {
    if (nlive == live_cap) {
        int64_t cap = live_cap ? live_cap * 2 : 256;
        block_t **n = realloc(live, (size_t)cap * sizeof(block_t *));
        if (!n) return -1;
        live = n;
        live_cap = cap;
    }
    live[nlive++] = b;
    live_bytes += b->size;
    return 0;
}

static void live_remove(block_t *b) {
    for (int64_t i = 0; i < nlive; i++)
        if (live[i] == b) {
            live_bytes -= b->size;
            live[i] = live[--nlive];
            return;
        }
}

static void note_fallback(int why, int64_t delta) {
    st[S_FB_BYTES + why] += delta;
    if (st[S_FB_BYTES + why] > st[S_FB_PEAK + why]) st[S_FB_PEAK + why] = st[S_FB_BYTES + why];
}

/* Managed memory for a request the device cannot hold (lt_set_overflow): NULL when overflow is off, past its
 * cap, or unavailable. The driver moves its pages between the device and the host as they are touched. */
static int64_t overflow_cap;

static void *overflow_alloc(size_t size) {
    if (st[S_OVERFLOW_BYTES] + (int64_t)size > overflow_cap) return NULL;
    void *p = NULL;
    if (backend == BACKEND_HOST) p = malloc(size);
    else if (c_malloc_managed && c_malloc_managed(&p, size, MEM_ATTACH_GLOBAL)) { c_get_last_error(); p = NULL; }
    if (!p) return NULL;
    st[S_OVERFLOWED]++;
    st[S_OVERFLOW_BYTES] += (int64_t)size;
    if (st[S_OVERFLOW_BYTES] > st[S_OVERFLOW_PEAK]) st[S_OVERFLOW_PEAK] = st[S_OVERFLOW_BYTES];
    return p;
}

static void release(block_t *b) {
    if (b->overflow) {
        st[S_OVERFLOW_BYTES] -= b->size;
        if (backend == BACKEND_HOST) free(b->ptr);
        else if (c_free(b->ptr)) c_get_last_error(); /* cudaFree waits for the device first */
    } else if (b->offset >= 0) {
        live_remove(b);
    } else {
        note_fallback(b->why, -b->size);
        fb.free(b->ptr, (size_t)b->size, b->stream);
    }
    free(b);
}

static int event_done(void *ev) {
    if (backend == BACKEND_HOST) return (int64_t)(intptr_t)ev <= host_done;
    cuerr_t e = c_event_query(ev);
    if (e == 0) return 1;
    /* not ready (600) is a status, not an error, and must not clear an error torch has yet to read;
     * anything else is the query's own failure: clear it and keep the block until a later look */
    if (e != ERR_NOT_READY) c_get_last_error();
    return 0;
}

static void event_destroy(void *ev) {
    if (backend == BACKEND_CUDA) c_event_destroy(ev);
}

/* An event recorded on `stream` now (a spare one recorded again, else a new one); NULL when CUDA refuses. */
static void *event_on(stream_t stream) {
    if (backend == BACKEND_HOST) return (void *)(intptr_t)(++host_tickets);
    void *ev = nspare ? spare_events[--nspare] : NULL;
    if (!ev && c_event_create(&ev, EVENT_DISABLE_TIMING)) { c_get_last_error(); return NULL; }
    if (c_event_record(ev, stream)) { c_get_last_error(); c_event_destroy(ev); return NULL; }
    return ev;
}

/* A completed event, kept to be recorded again (a stream wait queued on it earlier is not affected). */
static void event_spare(void *ev) {
    if (backend != BACKEND_CUDA) return;
    if (nspare == spare_cap) {
        int64_t cap = spare_cap ? spare_cap * 2 : 256;
        void **n = realloc(spare_events, (size_t)cap * sizeof(void *));
        if (!n) { c_event_destroy(ev); return; }
        spare_events = n;
        spare_cap = cap;
    }
    spare_events[nspare++] = ev;
}

/* A planned block with PLAN_GHOST is freed: its bytes stay guarded against other streams until the work
 * its stream queued so far is done. Where no event can be recorded the device is synchronised instead. */
static void ghost_add(block_t *b) {
    void *ev = event_on(b->stream);
    if (ev && nghosts == ghost_cap) {
        int64_t cap = ghost_cap ? ghost_cap * 2 : 256;
        ghost_t *n = realloc(ghosts, (size_t)cap * sizeof(ghost_t));
        if (n) { ghosts = n; ghost_cap = cap; }
    }
    if (!ev || nghosts == ghost_cap) {
        if (backend == BACKEND_CUDA) c_device_sync();
        if (ev) event_spare(ev);
        return;
    }
    ghosts[nghosts++] = (ghost_t){b->offset, b->size, b->stream, ev};
    st[S_GHOSTS] = nghosts;
}

/* Ghosts whose event has completed go (all of them with `all`, after a device synchronisation). */
static void prune_ghosts(int all) {
    if (all && nghosts && backend == BACKEND_CUDA) c_device_sync();
    if (all && backend == BACKEND_HOST) host_done = host_tickets;
    int64_t j = 0;
    for (int64_t i = 0; i < nghosts; i++) {
        if (all || event_done(ghosts[i].ev)) event_spare(ghosts[i].ev);
        else ghosts[j++] = ghosts[i];
    }
    nghosts = j;
    st[S_GHOSTS] = nghosts;
}

/* The waits queued so far, by (waiting stream, stream of the event it waits for): which streams the plan
 * orders behind which (a diagnosis: a wait on a stream that queues far ahead, a communication stream say,
 * can hold back the waiting one). Pairs past WAIT_PAIRS are counted in the last one, both streams set to -1
 * (0 is a real handle: CUDA's default stream). */
#define WAIT_PAIRS 32
typedef struct { stream_t waiting, on; int64_t reuse, cross; } wait_pair_t;
static wait_pair_t wait_pairs[WAIT_PAIRS];
static int nwait_pairs;

static void note_wait(stream_t waiting, stream_t on, int cross) {
    int i;
    for (i = 0; i < nwait_pairs && !(wait_pairs[i].waiting == waiting && wait_pairs[i].on == on); i++) {}
    if (i == nwait_pairs) {
        if (nwait_pairs < WAIT_PAIRS) {
            wait_pairs[nwait_pairs++] = (wait_pair_t){waiting, on, 0, 0};
        } else {
            i = WAIT_PAIRS - 1;
            wait_pairs[i].waiting = wait_pairs[i].on = (stream_t)(intptr_t)-1;
        }
    }
    if (cross) wait_pairs[i].cross++;
    else wait_pairs[i].reuse++;
}

/* Queue on `stream` a wait for `ev` (host backend: count it); 0 ok. */
static int stream_wait(stream_t stream, void *ev) {
    if (backend == BACKEND_HOST) {
        host_waits++;
        host_last_wait[0] = (int64_t)(intptr_t)stream;
        host_last_wait[1] = (int64_t)(intptr_t)ev;
        return 0;
    }
    if (c_stream_wait_event(stream, ev, 0)) { c_get_last_error(); return -1; }
    return 0;
}

static void process_deferred(int wait_all) {
    int64_t j = 0;
    if (wait_all && ndeferred && backend == BACKEND_CUDA) c_device_sync();
    if (wait_all && ndeferred && backend == BACKEND_HOST) host_done = host_tickets; /* as the device sync above */
    for (int64_t i = 0; i < ndeferred; i++) {
        deferred_t *d = &deferred[i];
        int done = 1;
        for (int e = 0; e < d->nev && done; e++) done = event_done(d->ev[e]);
        if (done) {
            for (int e = 0; e < d->nev; e++) event_destroy(d->ev[e]);
            /* record mode: when the other streams were seen done with it (memory.planner.reuse_after) */
            log_event(2, win.active ? win.seq : -1, -1, d->b->size, 0, d->b->id, d->b->stream);
            release(d->b);
        } else {
            deferred[j++] = *d;
        }
    }
    ndeferred = j;
    st[S_DEFERRED] = ndeferred;
}

/* Stream-ordered reuse. The planned slot [off, off + size) for a request on `stream`: -1 when it may be
 * handed out, else the index in `live` of a planned block the program still holds there (the request is
 * refused; nothing was changed), or -2 when a wait could not be queued (refused). Ghosts there of blocks
 * freed on another stream make `stream` wait for their events first. Blocks there that the program has
 * freed but other streams still read (record_stream) do not stand in the way: `stream` first waits for the
 * events recorded on those streams at the free (cudaStreamWaitEvent; none for its own, whose order covers
 * it), so every kernel queued on `stream` from here on runs after their last
 * use; the freed blocks stay listed (and so guard the rest of their bytes against other streams) until
 * those events complete. The plan placed the request there because the program had freed the old tensor:
 * this keeps the plan's timeline instead of refusing it. As with any allocation, the memory is ready for
 * work ordered after the allocation on the allocating stream. */
static int64_t claim_slot(int64_t off, int64_t size, stream_t stream) {
    int64_t nfreed = 0;
    for (int64_t i = 0; i < nlive; i++)
        if (live[i]->offset < off + size && off < live[i]->offset + live[i]->size) {
            if (!live[i]->freed) return i;
            nfreed++;
        }
    for (int64_t i = 0; i < nghosts; i++) {
        ghost_t *g = &ghosts[i];
        if (g->stream == stream || !(g->offset < off + size && off < g->offset + g->size)) continue;
        if (event_done(g->ev)) continue;
        if (stream_wait(stream, g->ev)) return -2; /* cannot order the reuse: refuse */
        st[S_CROSS_WAITS]++;
        note_wait(stream, g->stream, 1);
    }
    if (!nfreed) return -1;
    for (int64_t i = 0; i < nlive; i++) {
        if (!(live[i]->offset < off + size && off < live[i]->offset + live[i]->size)) continue;
        int64_t d;
        for (d = 0; d < ndeferred && deferred[d].b != live[i]; d++) {}
        if (d == ndeferred) continue; /* released meanwhile: nothing to wait for */
        for (int e = 0; e < deferred[d].nev; e++) {
            void *ev = deferred[d].ev[e];
            if (deferred[d].on[e] == stream || event_done(ev)) continue; /* own stream: its order covers it */
            if (stream_wait(stream, ev)) return -2; /* cannot order the reuse: refuse */
            note_wait(stream, deferred[d].on[e], 0);
        }
        st[S_REUSE_WAITS]++;
    }
    return -1;
}

/* ---- API --------------------------------------------------------------------------------------- */

int lt_init_host(void) {
    pthread_mutex_lock(&mu);
    backend = BACKEND_HOST;
    fb = (fallback_t){host_alloc, host_free, host_reserved_bytes, host_reset_peak, host_trim};
    pthread_mutex_unlock(&mu);
    return 0;
}

#define SYM(var, name) if (!(*(void **)&var = dlsym(h, name))) return -2
/* 0 ok, -1 library not found, -2 symbol missing, -3 pool setup failed */
int lt_init_cuda(const char *cudart, int device) {
    void *h = dlopen(cudart, RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen(cudart, RTLD_NOW);
    if (!h) return -1;
    SYM(c_malloc, "cudaMalloc"); SYM(c_free, "cudaFree");
    SYM(c_malloc_async, "cudaMallocAsync"); SYM(c_free_async, "cudaFreeAsync");
    SYM(c_event_create, "cudaEventCreateWithFlags"); SYM(c_event_record, "cudaEventRecord");
    SYM(c_event_query, "cudaEventQuery"); SYM(c_event_destroy, "cudaEventDestroy");
    SYM(c_stream_wait_event, "cudaStreamWaitEvent");
    SYM(c_device_sync, "cudaDeviceSynchronize"); SYM(c_get_last_error, "cudaGetLastError");
    SYM(c_mem_get_info, "cudaMemGetInfo");
    SYM(c_default_pool, "cudaDeviceGetDefaultMemPool"); SYM(c_pool_set, "cudaMemPoolSetAttribute");
    SYM(c_pool_get, "cudaMemPoolGetAttribute"); SYM(c_pool_trim, "cudaMemPoolTrimTo");
    *(void **)&c_malloc_managed = dlsym(h, "cudaMallocManaged");
    if (c_default_pool(&pool, device)) return -3;
    uint64_t keep = 0; /* until a plan serves: see lt_pool_keep */
    if (c_pool_set(pool, ATTR_RELEASE_THRESHOLD, &keep)) return -3;
    pthread_mutex_lock(&mu);
    backend = BACKEND_CUDA;
    fb = (fallback_t){pool_alloc, pool_free, pool_reserved, pool_reset_peak, pool_trim};
    pthread_mutex_unlock(&mu);
    return 0;
}

/* Another fallback allocator (after lt_init_*): the shim passes torch's own caching allocator, so that what
 * the plan does not serve (the warm-up, weights, optimizer state, side streams) is placed as in a run
 * without the plan, in the caching allocator's mode (expandable segments or not). */
void lt_set_fallback(void *(*alloc)(size_t, stream_t), void (*free_fn)(void *, size_t, stream_t),
                     int64_t (*reserved)(int), void (*reset_peak)(void), void (*trim)(void)) {
    pthread_mutex_lock(&mu);
    fb = (fallback_t){alloc, free_fn, reserved, reset_peak, trim};
    fb_external = 1;
    pthread_mutex_unlock(&mu);
}

/* The region every plan's offsets live in; 0 ok, -1 out of memory, -2 already set. */
int lt_region_alloc(int64_t bytes) {
    int r = 0;
    pthread_mutex_lock(&mu);
    if (region) {
        r = -2;
    } else if (bytes > 0) {
        void *p = NULL;
        if (backend == BACKEND_HOST) p = host_limit && bytes > host_room() ? NULL : malloc((size_t)bytes);
        else if (c_malloc(&p, (size_t)bytes)) { c_get_last_error(); p = NULL; }
        if (!p) {
            r = -1;
        } else {
            /* the pool's high-water so far was reached without the region: keep it as a floor and
             * restart the pool's own high-water, so region + pool peak counts only what coexisted */
            int64_t before = fb.reserved(1);
            if (before > reserved_floor) reserved_floor = before;
            fb.reset_peak();
            region = p; region_bytes = bytes; st[S_REGION] = bytes;
        }
    }
    pthread_mutex_unlock(&mu);
    return r;
}

int64_t lt_region_base(void) { return (int64_t)(intptr_t)region; }

/* The device's free bytes (cudaMemGetInfo): what a region could still take beside what the fallback holds.
 * Host backend: the test's limit less what is reserved; -1 without a limit (as much as needed). */
int64_t lt_device_free(void) {
    int64_t r = -1;
    pthread_mutex_lock(&mu);
    if (backend == BACKEND_HOST) {
        if (host_limit) r = host_room();
    } else if (backend == BACKEND_CUDA) {
        size_t free_b = 0, total = 0;
        if (c_mem_get_info(&free_b, &total)) c_get_last_error();
        else r = (int64_t)free_b;
    }
    pthread_mutex_unlock(&mu);
    return r;
}

/* offsets[k] < 0: request k is not planned; free_at[k]: the plan id of the window that frees it (check
 * mode); stream[k]: the stream it must come on (-1: the window's); flags[k]: PLAN_GHOST. Every planned
 * block must lie inside the region. */
int lt_set_plan(int id, int64_t n, const int64_t *size, const int64_t *offset, const int64_t *free_at,
                const int64_t *stream, const int64_t *flags) {
    if (id < 0 || id >= MAX_PLANS || n < 0) return -1;
    for (int64_t k = 0; k < n; k++)
        if (offset[k] >= 0 && offset[k] + size[k] > region_bytes) return -2;
    size_t bytes = (size_t)(n ? n : 1) * sizeof(int64_t);
    const int64_t *src[5] = {size, offset, free_at, stream, flags};
    int64_t *dst[5];
    for (int a = 0; a < 5; a++) {
        dst[a] = malloc(bytes);
        if (!dst[a]) { while (a--) free(dst[a]); return -3; }
        memcpy(dst[a], src[a], (size_t)n * sizeof(int64_t));
    }
    pthread_mutex_lock(&mu);
    free(plans[id].size); free(plans[id].offset); free(plans[id].free_at);
    free(plans[id].stream); free(plans[id].flags);
    plans[id] = (plan_t){n, dst[0], dst[1], dst[2], dst[3], dst[4]};
    pthread_mutex_unlock(&mu);
    return 0;
}

static void close_window(void) {
    if (win.active && check_mode && win.plan >= 0)
        for (int64_t i = 0; i < nlive; i++)  /* blocks the plan says this window frees, still held */
            if (live[i]->expect_free == win.plan && !live[i]->freed) st[S_CHECK_LEAKED]++;
    win.active = 0;
}

/* Opens a window (closing an open one); plan < 0: no plan, everything goes to the fallback. */
int64_t lt_window_begin(int plan, stream_t stream) {
    pthread_mutex_lock(&mu);
    process_deferred(0);
    prune_ghosts(0);
    close_window();
    win.active = 1;
    win.plan = (region && plan >= 0 && plan < MAX_PLANS && plans[plan].size) ? plan : -1;
    win.asked = plan;
    win.off = 0;
    win.k = 0;
    win.stream = stream;
    win.seq = next_seq++;
    st[S_WINDOWS]++;
    int64_t seq = win.seq;
    pthread_mutex_unlock(&mu);
    return seq;
}

void lt_window_end(void) {
    pthread_mutex_lock(&mu);
    close_window();
    pthread_mutex_unlock(&mu);
}

/* A request the device cannot serve while the region holds no planned tensor and no plan serves: outside
 * every window (evaluation, a checkpoint, the export between the trainer's steps), or in a window whose plan
 * a miss turned off (a longer sequence, another layout). The region goes back to the device, and runtime.py
 * takes it again when the next iteration starts (lt_region_alloc). In a window whose plan still serves it
 * stays: the window's planned requests need it. 1: given back. */
static int region_give_back(void) {
    if (!region || nlive || (win.active && win.plan >= 0 && !win.off)) return 0;
    prune_ghosts(1); /* every stream done with the region's bytes (a device synchronisation) */
    if (backend == BACKEND_HOST) free(region);
    else if (c_free(region)) { c_get_last_error(); return 0; }
    int64_t peak = region_bytes + fb.reserved(1); /* the reserved peak with the region, kept as a floor */
    if (peak > reserved_floor) reserved_floor = peak;
    region = NULL; region_bytes = 0; st[S_REGION] = 0;
    st[S_REGION_GIVEN_BACK]++;
    return 1;
}

/* The last resort for a request neither the plan nor the device can serve while the region stays (a planned
 * tensor live, or the window's plan still serving: a miss at the memory limit, a refused request): the
 * highest gap of the region no block the program holds covers (aligned as the plans; a plan fills its region
 * from the bottom and reaches the top only at its peak). Blocks there that the program freed while other
 * streams still read them, and ghosts, are waited for as for a planned request (claim_slot). The block
 * then guards its bytes as a planned one does: a planned request over it is refused until it is freed.
 * -1: no such gap. */
#define CARVE_ALIGN 512 /* runtime.py's ALIGNMENT, as the plans' offsets */
static int64_t region_carve(int64_t size, stream_t stream) {
    int64_t off = region_bytes - size;
    for (;;) {
        if (off < 0) return -1;
        off = off / CARVE_ALIGN * CARVE_ALIGN;
        int64_t low = -1; /* the lowest start of a held block in [off, off + size) */
        for (int64_t i = 0; i < nlive; i++) {
            block_t *l = live[i];
            if (!l->freed && l->offset < off + size && off < l->offset + l->size && (low < 0 || l->offset < low))
                low = l->offset;
        }
        if (low < 0) break;
        off = low - size;
    }
    return claim_slot(off, size, stream) == -1 ? off : -1;
}

static void *alloc_locked(size_t size, stream_t stream) {
    process_deferred(0);
    int64_t k = -1, window = -1, offset = -1, expect = -1;
    int why = FB_NO_PLAN, ghost = 0, carved = 0, overflow = 0;
    if (win.active) {
        k = win.k++;
        window = win.seq;
        if (win.plan >= 0) {
            plan_t *p = &plans[win.plan];
            why = FB_AFTER_MISS;
            if (win.off) st[S_AFTER_MISS]++;
            else if (k >= p->n) { win.off = 1; st[S_MISS_LENGTH]++; }
            else if ((int64_t)size != p->size[k]) { win.off = 1; st[S_MISS_SIZE]++; }
            else if (p->offset[k] >= 0
                     && stream != (p->stream[k] < 0 ? win.stream : (stream_t)(intptr_t)p->stream[k])) {
                win.off = 1;
                st[S_MISS_STREAM]++;
            }
            else if (p->offset[k] < 0) why = FB_UNPLANNED;
            else {
                int64_t in_the_way = claim_slot(p->offset[k], (int64_t)size, stream);
                if (in_the_way != -1) {
                    st[S_REFUSED_OVERLAP]++;
                    why = FB_REFUSED;
                    if (nrefusals < REFUSAL_LOG) {
                        int64_t *r = refusals[nrefusals++];
                        r[0] = win.plan; r[1] = k; r[2] = (int64_t)size;
                        block_t *w = in_the_way >= 0 ? live[in_the_way] : NULL;
                        r[3] = w ? w->plan : -1; r[4] = w ? w->k : -1; r[5] = w ? w->freed : 2; /* 2: no wait queued */
                    }
                } else {
                    offset = p->offset[k];
                    expect = p->free_at[k];
                    ghost = (int)(p->flags[k] & PLAN_GHOST);
                }
            }
        }
    }
    block_t *b = calloc(1, sizeof(block_t));
    if (!b) return NULL;
    void *ptr = NULL;
    if (offset < 0) {
        ptr = fb.alloc ? fb.alloc(size, stream) : NULL; /* no backend yet: nothing to serve from */
        if (!ptr && fb.alloc) {
            /* everything deferred, then the fallback's cached memory back to the device, then once more */
            st[S_OOM_RETRIES]++;
            process_deferred(1);
            fb.trim();
            ptr = fb.alloc(size, stream);
            if (!ptr && region_give_back()) ptr = fb.alloc(size, stream); /* then the idle region */
            if (!ptr && region && (offset = region_carve((int64_t)size, stream)) >= 0) carved = 1; /* or a gap */
            if (!ptr && !carved && (ptr = overflow_alloc(size))) overflow = 1; /* before a plan: managed memory */
        }
        if (!ptr && !carved) {
            st[S_FAILED]++;
            st[S_FAILED_LIVE] = live_bytes;
            st[S_FAILED_PLAN] = win.active ? win.plan : -2;
            st[S_FAILED_PLAN_OFF] = win.active && win.off;
            free(b);
            return NULL;
        }
        if (!carved && !overflow) st[S_FALLBACK]++;
    }
    if (offset >= 0) ptr = region + offset;
    b->ptr = ptr; b->size = (int64_t)size; b->id = next_id++; b->offset = offset;
    b->stream = stream;
    b->expect_free = expect;
    b->plan = win.active ? win.plan : -1;
    b->k = k;
    b->why = why;
    b->ghost = ghost;
    b->carved = carved;
    b->overflow = overflow;
    if (offset >= 0 && live_add(b)) { free(b); return NULL; }
    if (table_put(b)) { /* cannot track it: give it back rather than lose it */
        if (offset >= 0 || overflow) release(b);
        else { fb.free(ptr, size, stream); free(b); }
        return NULL;
    }
    if (carved) st[S_CARVED]++;
    else if (offset >= 0) st[S_SERVED]++;
    note_allocated((int64_t)size);
    if (offset < 0 && !overflow) note_fallback(why, (int64_t)size);
    log_event(0, window, k, (int64_t)size, win.active && stream == win.stream, b->id, stream);
    return ptr;
}

void *lt_malloc(size_t size, int device, stream_t stream) {
    (void)device;
    if (size == 0) return NULL;
    pthread_mutex_lock(&mu);
    void *p = alloc_locked(size, stream);
    st[S_PLANNED_LIVE] = live_bytes;
    pthread_mutex_unlock(&mu);
    return p;
}

void lt_free(void *ptr, size_t size, int device, stream_t stream) {
    (void)size; (void)device; (void)stream;
    if (!ptr) return;
    pthread_mutex_lock(&mu);
    block_t *b = table_take(ptr);
    if (!b) { st[S_UNKNOWN_FREE]++; pthread_mutex_unlock(&mu); return; }
    /* allocated bytes drop now (as torch counts them); the memory itself waits for other streams */
    note_allocated(-b->size);
    int other_streams = b->nrec || b->rec_overflow;
    log_event(1, win.active ? win.seq : -1, -1, b->size, other_streams, b->id, b->stream);
    if (b->offset >= 0 && b->ghost) ghost_add(b);
    if (check_mode && b->offset >= 0 && !b->carved && (!win.active || win.asked != b->expect_free)) {
        st[S_CHECK_LIFETIME]++;
        if (nlifetimes < REFUSAL_LOG) {
            int64_t *r = lifetimes[nlifetimes++];
            r[0] = b->plan; r[1] = b->k; r[2] = b->size; r[3] = b->expect_free; r[4] = win.active ? win.asked : -1;
        }
    }
    if (other_streams) {
        if (ndeferred == deferred_cap) {
            int64_t cap = deferred_cap ? deferred_cap * 2 : 64;
            deferred_t *n = realloc(deferred, (size_t)cap * sizeof(deferred_t));
            if (!n) { /* no room to defer: wait for the device instead */
                if (backend == BACKEND_CUDA) c_device_sync();
                release(b);
                goto out;
            }
            deferred = n;
            deferred_cap = cap;
        }
        deferred_t d = {b, 0, {0}, {0}};
        b->freed = 1;
        if (b->rec_overflow) {
            if (backend == BACKEND_CUDA) c_device_sync();
        } else {
            for (int i = 0; i < b->nrec; i++) {
                void *ev = NULL;
                if (backend == BACKEND_HOST) ev = (void *)(intptr_t)(++host_tickets);
                else if (c_event_create(&ev, EVENT_DISABLE_TIMING) || c_event_record(ev, b->rec[i])) {
                    c_get_last_error();
                    c_device_sync();
                    if (ev) c_event_destroy(ev);
                    continue; /* synchronised: this stream is done with the block */
                }
                d.on[d.nev] = b->rec[i];
                d.ev[d.nev++] = ev;
            }
        }
        deferred[ndeferred++] = d;
        st[S_DEFERRED] = ndeferred;
        process_deferred(0);
    } else {
        release(b);
    }
out:
    st[S_PLANNED_LIVE] = live_bytes;
    pthread_mutex_unlock(&mu);
}

void lt_record_stream(void *ptr, stream_t stream) {
    pthread_mutex_lock(&mu);
    int64_t at = table_find(ptr);
    if (at >= 0) {
        block_t *b = table[at];
        int seen = stream == b->stream;
        for (int i = 0; i < b->nrec && !seen; i++) seen = b->rec[i] == stream;
        if (!seen) {
            if (b->nrec < MAX_STREAMS) b->rec[b->nrec++] = stream;
            else b->rec_overflow = 1;
        }
    }
    pthread_mutex_unlock(&mu);
}

/* Managed memory for requests the device cannot hold, up to `cap` bytes at once (0: none). runtime.py allows
 * it until the plan is made: the iterations before it may need more than the device holds where only the
 * plan's packing fits it, and the recorded one must run whole. Blocks already there stay until freed. */
void lt_set_overflow(int64_t cap) { pthread_mutex_lock(&mu); overflow_cap = cap; pthread_mutex_unlock(&mu); }

void lt_set_record(int on) { pthread_mutex_lock(&mu); recording = on; pthread_mutex_unlock(&mu); }
void lt_set_check(int on) { pthread_mutex_lock(&mu); check_mode = on; pthread_mutex_unlock(&mu); }
int64_t lt_record_len(void) { return rec_len; }
const int64_t *lt_record_data(void) { return rec; }
void lt_record_clear(void) { pthread_mutex_lock(&mu); rec_len = 0; pthread_mutex_unlock(&mu); }

/* allocated and reserved bytes now and at their peaks, plan counters (the S_* order) */
int lt_stats(int64_t *out, int n) {
    pthread_mutex_lock(&mu);
    st[S_PLANNED_LIVE] = live_bytes;
    st[S_RESERVED] = region_bytes + (fb.reserved ? fb.reserved(0) : 0);
    st[S_RESERVED_PEAK] = region_bytes + (fb.reserved ? fb.reserved(1) : 0);
    if (reserved_floor > st[S_RESERVED_PEAK]) st[S_RESERVED_PEAK] = reserved_floor;
    int m = n < S_N ? n : S_N;
    memcpy(out, st, (size_t)m * sizeof(int64_t));
    pthread_mutex_unlock(&mu);
    return S_N;
}

void lt_reset_peaks(void) {
    pthread_mutex_lock(&mu);
    st[S_ALLOCATED_PEAK] = st[S_ALLOCATED];
    for (int i = 0; i < FB_N; i++) st[S_FB_PEAK + i] = st[S_FB_BYTES + i];
    reserved_floor = 0;
    if (fb.reset_peak) fb.reset_peak();
    pthread_mutex_unlock(&mu);
}

/* the logged refusals: REFUSAL_W int64 each (see `refusals`); returns how many */
int64_t lt_refusals(int64_t *out, int64_t max) {
    pthread_mutex_lock(&mu);
    int64_t n = nrefusals < max ? nrefusals : max;
    memcpy(out, refusals, (size_t)n * REFUSAL_W * sizeof(int64_t));
    pthread_mutex_unlock(&mu);
    return n;
}

/* check mode's logged lifetime breaks: 5 int64 each (see `lifetimes`); returns how many */
int64_t lt_lifetimes(int64_t *out, int64_t max) {
    pthread_mutex_lock(&mu);
    int64_t n = nlifetimes < max ? nlifetimes : max;
    memcpy(out, lifetimes, (size_t)n * 5 * sizeof(int64_t));
    pthread_mutex_unlock(&mu);
    return n;
}

/* the wait pairs (see note_wait): 4 int64 each (waiting stream, stream waited on, reuse waits, cross-stream
 * waits); returns how many */
int64_t lt_wait_pairs(int64_t *out, int64_t max) {
    pthread_mutex_lock(&mu);
    int64_t n = nwait_pairs < max ? nwait_pairs : max;
    for (int64_t i = 0; i < n; i++) {
        out[4 * i] = (int64_t)(intptr_t)wait_pairs[i].waiting;
        out[4 * i + 1] = (int64_t)(intptr_t)wait_pairs[i].on;
        out[4 * i + 2] = wait_pairs[i].reuse;
        out[4 * i + 3] = wait_pairs[i].cross;
    }
    pthread_mutex_unlock(&mu);
    return n;
}

/* host backend only: the fallback fails past this many bytes (0: no limit), as a full device would */
void lt_host_limit(int64_t bytes) { pthread_mutex_lock(&mu); host_limit = bytes; pthread_mutex_unlock(&mu); }

/* host backend only: the fallback rounds every block up to a multiple of this many bytes, as a caching
 * allocator rounds its blocks and pages (1: exact) */
void lt_host_granule(int64_t bytes) {
    pthread_mutex_lock(&mu);
    host_granule = bytes > 0 ? bytes : 1;
    pthread_mutex_unlock(&mu);
}

/* host backend only: the stream waits queued so far; out: the last one's (stream, event ticket) */
int64_t lt_host_waits(int64_t *out) {
    pthread_mutex_lock(&mu);
    out[0] = host_last_wait[0]; out[1] = host_last_wait[1];
    int64_t n = host_waits;
    pthread_mutex_unlock(&mu);
    return n;
}

/* host backend only: every event recorded so far completes */
void lt_host_complete_events(void) { pthread_mutex_lock(&mu); host_done = host_tickets; pthread_mutex_unlock(&mu); }

/* Frees whose events completed go back now; with wait, after a device synchronisation. */
void lt_flush(int wait) {
    pthread_mutex_lock(&mu);
    process_deferred(wait);
    prune_ghosts(wait);
    pthread_mutex_unlock(&mu);
}

/* torch.cuda.empty_cache(): deferred frees after a device synchronisation, then the fallback's
 * unused memory back to the device (the plan's region stays: it is in use by design). */
void lt_empty_cache(void) {
    pthread_mutex_lock(&mu);
    process_deferred(1);
    prune_ghosts(1);
    if (fb.trim) fb.trim();
    pthread_mutex_unlock(&mu);
}

/* The fallback pool's release threshold. 0 (from lt_init_cuda on) while the iterations before the plan
 * run: freed memory goes back to the device at each synchronisation, so what those iterations leave
 * behind does not stay reserved next to the region. UINT64_MAX once the plan serves: the pool keeps
 * what it frees (the requests it serves then repeat every iteration), as a caching allocator does. */
int lt_pool_keep(int keep) {
    if (backend != BACKEND_CUDA || fb_external) return 0; /* another fallback keeps its own cache */
    uint64_t v = keep ? UINT64_MAX : 0;
    if (c_pool_set(pool, ATTR_RELEASE_THRESHOLD, &v)) { c_get_last_error(); return -1; }
    return 0;
}
