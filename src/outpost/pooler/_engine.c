/* The pooler's forwarding engine: frame-and-forward in C, everything else in Python.
 *
 * A Link is one logged-in connection (a client, or a server connection). Once the Python side
 * has logged it in, a plain TCP connection's socket is handed to the Engine (raw mode): the
 * engine's epoll set is watched by the asyncio loop (loop.add_reader(engine.fileno(), poll)),
 * and poll() reads, frames and forwards in C. A TLS connection keeps its asyncio transport
 * (transport mode): its protocol feeds the bytes it receives to Link.feed() and the engine
 * writes through transport.write(); the framing is the same.
 *
 * While a client Link is paired with a server Link, bytes flow between them here. The engine
 * calls back into Python only where pooling decisions are made:
 *
 *   client owner: _on_data(bytes)            bytes while not paired (or not forwarding)
 *                 _engine_message(kind, body) -> bytes | None
 *                                            a message Python must see: a Query or Parse that
 *                                            mentions search_path/reset/discard/listen/advisory/
 *                                            hold, a named Parse/Bind/Describe/Close in
 *                                            transaction mode, anything while skipping to Sync.
 *                                            None: forward it unchanged; bytes: send these
 *                                            instead (b"": nothing, and no bookkeeping)
 *                 _engine_terminate()        Terminate ('X')
 *                 _engine_bad_length(kind, length)
 *                 _engine_release()          a chunk ended with nothing outstanding
 *                 on_ready(server_owner)     ReadyForQuery(idle) with nothing outstanding
 *   server owner: _on_data(bytes), _engine_param(body), _unanswered((name, kind, drop)),
 *                 _engine_bad_length(kind, length)
 *   both:         connection_lost(exc)       once (raw mode only): at the end of Engine.poll
 *                                              when it closed there, else via loop.call_soon
 *   logging in:   _engine_login(info, kind, outcome, rest)
 *                                            an md5 login the engine took on (see below) ended
 *                 _engine_scram_login(info, outcome, data, extra)
 *                                            a SCRAM login the engine took on ended, or is
 *                                            Python's from here on (see scram_done)
 *
 * The server Link keeps what is outstanding: Syncs/Queries not yet answered by ReadyForQuery
 * ('syncs'), an extended-protocol message since the last Sync ('unsynced'), the transaction
 * status, and the queue of ParseComplete/CloseComplete answers due (those of statements the
 * pooler added itself are hidden from the client).
 *
 * A PoolCore is the part of a pool.Pool the engine needs: the idle server links, the queue of
 * waiting clients, the statistics. In transaction mode a client with no server takes an idle
 * one in the same state (search_path and tracked settings: Link.state) or queues when none can
 * be opened (fast_checkout), and a server whose transaction ended goes to the first waiter in
 * the same state or back to the idle list (fast_release) -- without calling Python. Anything
 * else (a connection to open or to bring to the client's state, a paused, closed or redirected
 * pool, a connection past max_lifetime, a waiter that is not a client link) is on_ready /
 * _on_data in Python, which uses the same PoolCore.
 *
 * Logins: a client link with 'login' set (one the engine accepted) has its startup packet read
 * here. One that Python put in Engine.logins (a startup packet it logged in with before, with
 * the route's secret and how long that stays current) has its password exchange run here:
 * md5 (the request with a salt, the answer checked: Python hears once, from _engine_login) or
 * SCRAM-SHA-256 (AuthenticationSASL, the server-first with a nonce, the proof checked and the
 * server signature sent: Python hears once, from _engine_scram_login). The engine handles the
 * messages libpq and the usual drivers send; a SCRAM message in any other shape (channel
 * binding, extensions, another mechanism, a malformed one) is handed to Python with what the
 * exchange has so far, and Python's ScramServer goes on from there, so every error is the one
 * the Python path gives. Anything else (a packet not there or expired, a malformed one) goes
 * to Python's _on_data as if the engine had not looked; an SSLRequest or GSSENCRequest is
 * answered 'N' (no TLS on this path).
 *
 * Clients without a Python session: the engine accepts the connections of the listeners Python
 * gives it (Engine.listen) in its own epoll set. Such a client link starts with owner None
 * ('unowned'). When its startup packet is one Python remembered and max_client_conn allows,
 * the engine runs the login, and when it matches greets the client itself with what Python
 * kept with the login (AuthenticationOk and the ParameterStatus messages, the state and the
 * PoolCore) and BackendKeyData with a pid of its own (ENGINE_PID_BIT set; Engine.pids maps it
 * to the link); its transactions then go through fast_checkout/fast_release and a Terminate
 * closes it, all without Python. Whenever the engine would call the client's owner, or the
 * client must wait in the pool's queue, or it vanishes while paired, the owner is made first:
 * Engine.materialize(link) (Python's PoolerServer._materialize) builds the session from what
 * the link keeps (peer and local address, connect time, the login's info, the backend key).
 * Python asks for the same for all (materialize_all: listings, shutdown), by pid (session_of:
 * cancel requests) or for logins past a time (materialize_logins: login timeouts). A
 * connection that arrives with no login remembered, or past max_client_conn, is materialized
 * at once and logs in through Python as before.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_MESSAGE_LENGTH 0x3FFFFFFF
#define READ_SIZE (256 * 1024)
#define HIGH_WATER (256 * 1024)
#define LOW_WATER (64 * 1024)
#define MAX_EVENTS 256

typedef struct EngineObject EngineObject;
typedef struct LinkObject LinkObject;

#define MAX_LISTENERS 16
#define ENGINE_PID_BIT 0x800000 /* the engine's backend pids; Python's have it clear */

typedef struct {
    int fd;
    PyObject *local; /* (host, port) the connections have; NULL: ask (a wildcard listener) */
    PyObject *asked; /* a wildcard listener: the last (host, port) asked, shared while it holds */
} Listener;

/* --- PoolCore: what the engine needs of a pool to hand out and take back connections ------ */

typedef struct {
    PyObject_HEAD
    long long received; /* bytes from clients */
    long long sent;     /* bytes from servers */
    long long xact_count, wait_count;
    double xact_time, wait_time;
    double max_lifetime, wait_timeout;
    int pool_size, connecting, generation, paused, closed;
    PyObject *active; /* Python's Pool.active: the ServerConnections in use */
    LinkObject **idle; /* server links, most recently used last */
    Py_ssize_t idle_len, idle_cap;
    PyObject **wq; /* waiting clients (their Links) or Python waiters, first come first */
    Py_ssize_t wq_head, wq_len, wq_cap;
} PoolCoreObject;

static PyTypeObject PoolCoreType;

/* --- Engine ---------------------------------------------------------------------------------- */

struct EngineObject {
    PyObject_HEAD
    int epfd;
    PyObject *call_soon; /* loop.call_soon */
    PyObject *links;     /* dict fd -> Link: keeps every registered link alive */
    PyObject *logins;    /* dict startup packet -> (secret, valid until, info); the secret:
                            md5: the hex digits (bytes); SCRAM: (StoredKey, ServerKey,
                            b",s=<salt>,i=<iterations>") */
    char *rbuf;
    char rand[256]; /* getrandom(2) bytes for md5 salts and SCRAM nonces, used from the end */
    int rand_left;
    int polling;    /* in Engine.poll: links closed meanwhile are told at its end */
    PyObject *lost; /* list of (owner, exc or None) to call connection_lost on at poll's end */
    /* connections the engine accepts itself (Engine.listen): see "Clients without a Python
       session" at the top */
    Listener listeners[MAX_LISTENERS];
    PyObject *materialize;  /* materialize(link): give the link its Python session */
    PyObject *accept_error; /* accept_error(listen fd, OSError): the listener was dropped */
    PyObject *clients;      /* Python's set of sessions (counted against max_clients) */
    PyObject *client_pids;  /* Python's dict pid -> session (the engine's pids avoid them) */
    PyObject *pids;         /* pid (int) -> link: logged in here, no Python session yet */
    PyObject *no_extra;     /* {} : get_extra_info of an accepted link */
    long max_clients;       /* max_client_conn */
    long pid_base;          /* (worker id + 1) << 24 */
    int client_txn;         /* transaction pooling: the accepted links' txn */
    uint32_t next_pid;
    Py_ssize_t unowned; /* client links without a Python session */
};

typedef struct {
    char kind;  /* 'Z' (a Sync/Query's ReadyForQuery), '1' or '3' */
    char drop;  /* hide the answer from the client */
    PyObject *name; /* statement name (bytes) or NULL */
} Expect;

struct LinkObject {
    PyObject_HEAD
    EngineObject *engine;
    PyObject *owner;
    PyObject *transport; /* transport mode: the asyncio transport; NULL in raw mode */
    PyObject *extra;     /* get_extra_info values (dict) */
    LinkObject *peer;
    PoolCoreObject *core;
    PyObject *state; /* search_path and tracked settings: a client and a server must agree */
    double attached_at, last_used, created_at, request_at, wait_deadline, wait_started;
    int generation;
    int broken;
    int waiting; /* in the pool's queue */
    int holding; /* bytes go to 'pend' until a server connection comes */
    char *pend;
    Py_ssize_t pend_len, pend_cap;
    int fd;
    int server;
    int forwarding;
    int txn;
    int reading;   /* the application wants to read */
    int throttled; /* paused because the peer's output is full */
    uint32_t events;
    int closing;
    int closed;
    /* a login the engine runs: LOGIN_STARTUP, then LOGIN_MD5 or LOGIN_SCRAM_FIRST and
       LOGIN_SCRAM_FINAL, with what Engine.logins had */
    int login;
    PyObject *login_with;
    PyObject *scram; /* SCRAM so far: (client-first-bare, gs2 header, nonce, server-first) */
    char salt[4];
    /* a client the engine accepted and may run alone (owner None until materialized) */
    int unowned;
    int peer_port;
    PyObject *peer_host; /* interned str */
    PyObject *local;     /* (host, port) of the pooler's end */
    PyObject *info;      /* logged in here: (route, pool, startup, greeting, core) */
    double connect_time; /* wall clock */
    uint32_t pid, key;   /* logged in here: its BackendKeyData */
    /* output (raw mode) */
    char *out;
    Py_ssize_t out_start, out_end, out_cap;
    /* framing */
    char *part;
    Py_ssize_t part_len, part_cap;
    Py_ssize_t remain;
    int skip_to_sync;
    /* server side */
    int syncs;
    int unsynced;
    int status;
    Expect *exp;
    Py_ssize_t exp_head, exp_len, exp_cap;
};

static PyTypeObject LinkType;
static PyTypeObject EngineType;

static PyObject *address_text(struct sockaddr_storage *addr, int *port);

static PyObject *s_on_data, *s_engine_message, *s_engine_terminate, *s_engine_bad_length,
    *s_engine_release, *s_on_ready, *s_engine_param, *s_unanswered, *s_connection_lost,
    *s_write, *s_engine_login, *s_engine_scram_login, *s_hexdigest, *s_sha256, *s_digest;
/* Calls the engine made into Python (owner callbacks, materialize, ...): Engine.select goes back
 * to the event loop after a round that made any, since they may have given it work. */
static unsigned long py_calls;

static PyObject *s_usedforsecurity; /* ("usedforsecurity",): md5 salts passwords, as PostgreSQL */
static PyObject *md5_new; /* hashlib.md5 */
static PyObject *sha256_new; /* hashlib.sha256 */
static PyObject *hmac_digest; /* OpenSSL's one-shot HMAC: _hashlib.hmac_digest, as hmac.digest
                                 calls it (without its Python frame), or hmac.digest */

/* --- small helpers ----------------------------------------------------------------------------- */

static inline uint32_t be32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return ((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) | ((uint32_t)u[2] << 8) | u[3];
}

static int ensure_cap(char **buf, Py_ssize_t *cap, Py_ssize_t need) {
    if (need <= *cap)
        return 0;
    Py_ssize_t n = *cap ? *cap : 256;
    while (n < need)
        n *= 2;
    char *b = PyMem_Realloc(*buf, n);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = b;
    *cap = n;
    return 0;
}

static inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c; }

/* Case-insensitive: does BODY mention a word that may need Python's attention? */
static int mentions_keyword(const char *s, Py_ssize_t n) {
    static const struct {
        const char *w;
        Py_ssize_t n;
    } words[] = {{"search_path", 11}, {"reset", 5}, {"discard", 7},
                 {"listen", 6},       {"advisory", 8}, {"hold", 4}};
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = lower(s[i]);
        if (c != 's' && c != 'r' && c != 'd' && c != 'l' && c != 'a' && c != 'h')
            continue;
        for (size_t k = 0; k < sizeof(words) / sizeof(words[0]); k++) {
            Py_ssize_t wn = words[k].n;
            if (words[k].w[0] != c || i + wn > n)
                continue;
            Py_ssize_t j = 1;
            while (j < wn && lower(s[i + j]) == words[k].w[j])
                j++;
            if (j == wn)
                return 1;
        }
    }
    return 0;
}

/* --- the expected-answers queue (server links) ------------------------------------------------ */

static int expect_push(LinkObject *s, char kind, char drop, PyObject *name) {
    if (s->exp_len == s->exp_cap) {
        Py_ssize_t cap = s->exp_cap ? s->exp_cap * 2 : 16;
        Expect *e = PyMem_Malloc(cap * sizeof(Expect));
        if (e == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < s->exp_len; i++)
            e[i] = s->exp[(s->exp_head + i) % s->exp_cap];
        PyMem_Free(s->exp);
        s->exp = e;
        s->exp_head = 0;
        s->exp_cap = cap;
    }
    Expect *slot = &s->exp[(s->exp_head + s->exp_len) % s->exp_cap];
    slot->kind = kind;
    slot->drop = drop;
    Py_XINCREF(name);
    slot->name = name;
    s->exp_len++;
    return 0;
}

static Expect expect_pop(LinkObject *s) {
    Expect e = s->exp[s->exp_head];
    s->exp_head = (s->exp_head + 1) % s->exp_cap;
    s->exp_len--;
    return e;
}

static void expect_clear(LinkObject *s) {
    while (s->exp_len) {
        Expect e = expect_pop(s);
        Py_XDECREF(e.name);
    }
}

/* --- raw-mode I/O ------------------------------------------------------------------------------- */

static void update_events(LinkObject *l) {
    if (l->fd < 0 || l->closed)
        return;
    uint32_t ev = 0;
    if (l->reading && !l->throttled && !l->closing)
        ev |= EPOLLIN;
    if (l->out_end > l->out_start)
        ev |= EPOLLOUT;
    if (ev == l->events)
        return;
    struct epoll_event e = {.events = ev, .data.ptr = l};
    epoll_ctl(l->engine->epfd, EPOLL_CTL_MOD, l->fd, &e);
    l->events = ev;
}

/* A client link the engine no longer runs alone: out of its count and its pid map. */
static void link_disown(LinkObject *l) {
    if (!l->unowned)
        return;
    l->unowned = 0;
    EngineObject *e = l->engine;
    if (e != NULL) {
        e->unowned--;
        if (l->pid && e->pids != NULL) {
            PyObject *key = PyLong_FromUnsignedLong(l->pid);
            if (key == NULL || PyDict_DelItem(e->pids, key) < 0)
                PyErr_Clear();
            Py_XDECREF(key);
        }
    }
}

/* The Python side of L (borrowed), made now (Engine.materialize) when the engine has run this
 * client alone so far; NULL with an exception. */
static PyObject *link_owner(LinkObject *l) {
    if (!l->unowned) {
        if (l->owner == NULL)
            PyErr_SetString(PyExc_RuntimeError, "the link has no owner");
        return l->owner;
    }
    EngineObject *e = l->engine;
    if (e == NULL || e->materialize == NULL || e->materialize == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "a client link without a session and no way to make one");
        return NULL;
    }
    link_disown(l);
    py_calls++;
    PyObject *r = PyObject_CallOneArg(e->materialize, (PyObject *)l);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    if (l->owner == Py_None) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.materialize left the link without an owner");
        return NULL;
    }
    return l->owner;
}

/* Close the socket and tell the owner (later, from the loop), once. EXC may be NULL. */
static void link_finish(LinkObject *l, PyObject *exc) {
    if (l->closed)
        return;
    if (l->unowned) {
        if (l->peer != NULL || l->waiting) {
            /* mid-transaction: Python's connection_lost rolls the server connection back */
            if (link_owner(l) == NULL)
                PyErr_WriteUnraisable((PyObject *)l);
        } else {
            link_disown(l); /* nothing to tell anyone */
        }
    }
    l->closed = 1;
    l->out_start = l->out_end = 0;
    if (l->fd >= 0) {
        int fd = l->fd;
        epoll_ctl(l->engine->epfd, EPOLL_CTL_DEL, fd, NULL);
        close(fd);
        l->fd = -1;
        PyObject *key = PyLong_FromLong(fd);
        Py_INCREF(l); /* the dict may hold the last reference */
        if (key != NULL) {
            if (PyDict_DelItem(l->engine->links, key) < 0)
                PyErr_Clear();
            Py_DECREF(key);
        } else {
            PyErr_Clear();
        }
        if (l->owner != NULL && l->owner != Py_None && l->engine->polling) {
            /* told at the end of this poll: no handle on the loop for each closed link */
            PyObject *entry = PyTuple_Pack(2, l->owner, exc ? exc : Py_None);
            if (entry == NULL || PyList_Append(l->engine->lost, entry) < 0)
                PyErr_WriteUnraisable((PyObject *)l);
            Py_XDECREF(entry);
        } else if (l->owner != NULL && l->owner != Py_None) {
            PyObject *cb = PyObject_GetAttr(l->owner, s_connection_lost);
            if (cb != NULL) {
                py_calls++;
                PyObject *r = PyObject_CallFunctionObjArgs(l->engine->call_soon, cb,
                                                           exc ? exc : Py_None, NULL);
                Py_XDECREF(r);
                Py_DECREF(cb);
            }
            if (PyErr_Occurred())
                PyErr_WriteUnraisable((PyObject *)l);
        }
        Py_DECREF(l);
    }
}

static PyObject *os_error(int err) {
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
    if (exc == NULL)
        PyErr_Clear();
    return exc;
}

static void link_fail(LinkObject *l, int err) {
    PyObject *exc = err ? os_error(err) : NULL;
    link_finish(l, exc);
    Py_XDECREF(exc);
}

static void set_throttle(LinkObject *l, int on) {
    if (l == NULL || l->closed || l->throttled == on)
        return;
    l->throttled = on;
    if (l->transport != NULL) {
        py_calls++;
        PyObject *r = PyObject_CallMethod(l->transport, on ? "pause_reading" : "resume_reading",
                                          NULL);
        if (r == NULL)
            PyErr_WriteUnraisable((PyObject *)l);
        Py_XDECREF(r);
    } else {
        update_events(l);
    }
}

/* Send what is buffered; returns 0, or -1 when the link failed (and was finished). */
static int flush_out(LinkObject *l) {
    while (l->out_end > l->out_start) {
        ssize_t w = send(l->fd, l->out + l->out_start, l->out_end - l->out_start,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            link_fail(l, errno);
            return -1;
        }
        l->out_start += w;
    }
    if (l->out_start == l->out_end) {
        l->out_start = l->out_end = 0;
        if (l->closing) {
            link_finish(l, NULL);
            return 0;
        }
    }
    if (l->out_end - l->out_start < LOW_WATER && l->peer != NULL && l->peer->throttled)
        set_throttle(l->peer, 0);
    update_events(l);
    return 0;
}

/* Queue LEN bytes for L (raw: send now when nothing is waiting; transport: write()). */
static int link_out(LinkObject *l, const char *data, Py_ssize_t len) {
    if (len <= 0 || l->closed)
        return 0;
    if (l->fd < 0 && l->transport == NULL) /* no I/O yet (being logged in): nothing to send */
        return 0;
    if (l->transport != NULL) {
        PyObject *b = PyBytes_FromStringAndSize(data, len);
        if (b == NULL)
            return -1;
        py_calls++;
        PyObject *r = PyObject_CallMethodOneArg(l->transport, s_write, b);
        Py_DECREF(b);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    if (l->closing)
        return 0;
    if (l->out_end == l->out_start) {
        for (;;) {
            ssize_t w = send(l->fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w == len)
                return 0;
            if (w >= 0) {
                data += w;
                len -= w;
                continue;
            }
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            link_fail(l, errno);
            return 0;
        }
        l->out_start = l->out_end = 0;
    }
    if (ensure_cap(&l->out, &l->out_cap, l->out_end + len) < 0)
        return -1;
    memcpy(l->out + l->out_end, data, len);
    l->out_end += len;
    if (l->out_end - l->out_start > HIGH_WATER && l->peer != NULL && l->peer->forwarding)
        set_throttle(l->peer, 1);
    update_events(l);
    return 0;
}

/* --- calling Python ------------------------------------------------------------------------------ */

static PyObject *call1(PyObject *owner, PyObject *name, PyObject *arg) {
    py_calls++;
    return PyObject_CallMethodOneArg(owner, name, arg);
}

static int call_on_data(LinkObject *l, const char *data, Py_ssize_t n) {
    if (n <= 0)
        return 0;
    PyObject *b = PyBytes_FromStringAndSize(data, n);
    if (b == NULL)
        return -1;
    PyObject *owner = link_owner(l);
    PyObject *r = owner != NULL ? call1(owner, s_on_data, b) : NULL;
    Py_DECREF(b);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int call_bad_length(LinkObject *l, int kind, uint32_t length) {
    PyObject *owner = link_owner(l);
    if (owner == NULL)
        return -1;
    PyObject *k = PyLong_FromLong(kind), *len = PyLong_FromUnsignedLong(length);
    py_calls++;
    PyObject *r = (k && len) ? PyObject_CallMethodObjArgs(owner, s_engine_bad_length, k, len,
                                                           NULL)
                             : NULL;
    Py_XDECREF(k);
    Py_XDECREF(len);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* --- the pool's fast paths: hand out and take back connections without Python ---------------- */

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* what time.monotonic() reads */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int state_eq(PyObject *a, PyObject *b) {
    if (a == b)
        return a != NULL;
    if (a == NULL || b == NULL)
        return 0;
    int r = PyObject_RichCompareBool(a, b, Py_EQ);
    if (r < 0) {
        PyErr_Clear();
        return 0;
    }
    return r;
}

static Py_ssize_t core_total(PoolCoreObject *core) {
    return core->idle_len + PySet_GET_SIZE(core->active) + core->connecting;
}

static int core_push_idle(PoolCoreObject *core, LinkObject *s) {
    if (core->idle_len == core->idle_cap) {
        Py_ssize_t cap = core->idle_cap ? core->idle_cap * 2 : 16;
        LinkObject **n = PyMem_Realloc(core->idle, cap * sizeof(LinkObject *));
        if (n == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        core->idle = n;
        core->idle_cap = cap;
    }
    Py_INCREF(s);
    core->idle[core->idle_len++] = s;
    return 0;
}

/* Take idle connection I out of the list (a new reference). */
static LinkObject *core_take_at(PoolCoreObject *core, Py_ssize_t i) {
    LinkObject *s = core->idle[i];
    memmove(core->idle + i, core->idle + i + 1, (core->idle_len - i - 1) * sizeof(LinkObject *));
    core->idle_len--;
    return s;
}

/* The most recently used idle connection whose state is STATE (ANY: else the most recent one);
 * NULL when there is none. A new reference. */
static LinkObject *core_take(PoolCoreObject *core, PyObject *state, int any) {
    if (core->idle_len == 0 || core->paused)
        return NULL;
    for (Py_ssize_t i = core->idle_len - 1; i >= 0; i--)
        if (state_eq(core->idle[i]->state, state))
            return core_take_at(core, i);
    return any ? core_take_at(core, core->idle_len - 1) : NULL;
}

static int wq_push(PoolCoreObject *core, PyObject *w) {
    if (core->wq_len == core->wq_cap) {
        Py_ssize_t cap = core->wq_cap ? core->wq_cap * 2 : 64;
        PyObject **n = PyMem_Malloc(cap * sizeof(PyObject *));
        if (n == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < core->wq_len; i++)
            n[i] = core->wq[(core->wq_head + i) % core->wq_cap];
        PyMem_Free(core->wq);
        core->wq = n;
        core->wq_head = 0;
        core->wq_cap = cap;
    }
    Py_INCREF(w);
    core->wq[(core->wq_head + core->wq_len) % core->wq_cap] = w;
    core->wq_len++;
    return 0;
}

static PyObject *wq_pop(PoolCoreObject *core) { /* a new reference, or NULL when empty */
    if (core->wq_len == 0)
        return NULL;
    PyObject *w = core->wq[core->wq_head];
    core->wq_head = (core->wq_head + 1) % core->wq_cap;
    core->wq_len--;
    return w;
}

static void pair_links(LinkObject *c, LinkObject *s) {
    Py_INCREF(s);
    Py_XSETREF(c->peer, s);
    Py_INCREF(c);
    Py_XSETREF(s->peer, c);
    s->forwarding = 1;
}

static void set_throttle(LinkObject *l, int on);

static void unpair_links(LinkObject *c, LinkObject *s) {
    set_throttle(c, 0);
    set_throttle(s, 0);
    if (c->peer == s)
        Py_CLEAR(c->peer);
    if (s->peer == c) { /* the half-forwarded rest of a message is nobody's now */
        Py_CLEAR(s->peer);
        s->part_len = 0;
        s->remain = 0;
    }
}

static int dispatch(LinkObject *l, const char *data, Py_ssize_t n);

/* Keep N bytes for client C until a server connection comes. */
static int pend_append(LinkObject *c, const char *data, Py_ssize_t n) {
    if (ensure_cap(&c->pend, &c->pend_cap, c->pend_len + n) < 0)
        return -1;
    memcpy(c->pend + c->pend_len, data, n);
    c->pend_len += n;
    return 0;
}

/* A waiting client got server S (already paired): send what it held. */
static int send_held(LinkObject *c) {
    if (c->pend_len == 0)
        return 0;
    char *held = c->pend;
    Py_ssize_t n = c->pend_len, cap = c->pend_cap;
    c->pend = NULL;
    c->pend_len = c->pend_cap = 0;
    int rc = dispatch(c, held, n);
    if (c->pend == NULL) { /* keep the buffer for the next wait */
        c->pend = held;
        c->pend_cap = cap;
    } else {
        PyMem_Free(held);
    }
    return rc;
}

/* Server S answered ReadyForQuery(idle) for client C with nothing outstanding (transaction
 * mode): give S to the first waiting client, or back to the idle list. 1: done; 0: Python
 * must decide (a waiter that needs its search_path set, a paused or closing pool, a
 * connection to retire); -1: error. */
static int fast_release(LinkObject *s, LinkObject *c) {
    PoolCoreObject *core = s->core;
    if (core == NULL || core != c->core || core->paused || core->closed || s->broken ||
        s->generation != core->generation || s->closed)
        return 0;
    double now = now_mono();
    if (core->max_lifetime > 0 && now - s->created_at > core->max_lifetime)
        return 0;
    LinkObject *w = NULL;
    while (core->wq_len) {
        PyObject *head = core->wq[core->wq_head];
        if (!PyObject_TypeCheck(head, &LinkType))
            return 0;
        LinkObject *cand = (LinkObject *)head;
        if (!cand->waiting || cand->closed) {
            PyObject *gone = wq_pop(core);
            Py_DECREF(gone);
            continue;
        }
        if (!state_eq(cand->state, s->state))
            return 0;
        w = (LinkObject *)wq_pop(core);
        break;
    }
    core->xact_count++;
    core->xact_time += now - s->attached_at;
    s->last_used = now;
    Py_INCREF(s);
    unpair_links(c, s);
    int rc = 1;
    if (w == NULL) {
        if (PySet_Discard(core->active, s->owner) < 0 || core_push_idle(core, s) < 0)
            rc = -1;
        Py_DECREF(s);
        return rc;
    }
    w->waiting = 0;
    w->holding = 0;
    core->wait_count++;
    core->wait_time += now - w->wait_started;
    pair_links(w, s);
    s->attached_at = now;
    w->request_at = now;
    if (send_held(w) < 0)
        rc = -1;
    Py_DECREF(w);
    Py_DECREF(s);
    return rc;
}

/* Bytes from client C, which has no server connection: take an idle one with the same state
 * (or wait in the queue when none can be opened), or close on a Terminate. 1: done; 0: Python
 * decides; -1: error. */
static int fast_checkout(LinkObject *c, const char *data, Py_ssize_t n) {
    PoolCoreObject *core = c->core;
    if (core == NULL || core->paused || core->closed || c->state == NULL || n <= 0 ||
        c->closed || !c->txn)
        return 0;
    char first = c->part_len ? c->part[0] : data[0];
    if (first == 'X') {
        if (c->transport != NULL)
            return 0; /* (TLS: Python's transport closes) */
        /* Terminate between transactions: no server needed; closed as Link.close does */
        if (c->out_end > c->out_start) {
            c->closing = 1;
            update_events(c);
        } else {
            link_finish(c, NULL);
        }
        return 1;
    }
    LinkObject *s = core_take(core, c->state, 0);
    if (s != NULL) {
        if (PySet_Add(core->active, s->owner) < 0) {
            Py_DECREF(s);
            return -1;
        }
        double now = now_mono();
        pair_links(c, s);
        s->attached_at = now;
        c->request_at = now;
        Py_DECREF(s);
        return 0; /* paired: dispatch forwards the bytes */
    }
    if (core->idle_len || core_total(core) < core->pool_size)
        return 0; /* a connection to prepare, or one to open: Python's work */
    /* wait for a connection in the queue, holding the bytes (with a session: Python's
       timeouts and hand-overs see the queue) */
    if (c->unowned && link_owner(c) == NULL)
        return -1;
    if (pend_append(c, c->part, c->part_len) < 0 || pend_append(c, data, n) < 0)
        return -1;
    c->part_len = 0;
    double now = now_mono();
    c->holding = 1;
    c->waiting = 1;
    c->wait_started = now;
    c->wait_deadline = now + core->wait_timeout;
    if (wq_push(core, (PyObject *)c) < 0)
        return -1;
    return 1;
}

/* --- framing: client -> server ---------------------------------------------------------------------- */

static int dispatch(LinkObject *l, const char *data, Py_ssize_t n);

/* Store DATA[POS:N] as the partial message to finish with the next bytes. */
static int keep_partial(LinkObject *l, const char *data, Py_ssize_t pos, Py_ssize_t n) {
    Py_ssize_t len = n - pos;
    if (ensure_cap(&l->part, &l->part_cap, len) < 0)
        return -1;
    memmove(l->part, data + pos, len);
    l->part_len = len;
    return 0;
}

/* What a statement name in a Parse/Bind/Describe/Close body looks like. */
static inline int cstring_end(const char *body, Py_ssize_t blen, Py_ssize_t from) {
    const char *z = memchr(body + from, 0, blen - from);
    return z ? (int)(z - body) : -1;
}

/* Whether the engine can handle an extended-protocol message itself (transaction mode). */
static int extended_is_plain(int kind, const char *body, Py_ssize_t blen) {
    if (blen <= 0)
        return 0;
    switch (kind) {
    case 'P': {
        if (body[0] != 0)
            return 0; /* a named statement: renamed by Python */
        int q_end = cstring_end(body, blen, 1);
        if (q_end < 0)
            return 0;
        return !mentions_keyword(body + 1, q_end - 1);
    }
    case 'B': {
        int portal_end = cstring_end(body, blen, 0);
        if (portal_end < 0 || portal_end + 1 >= blen)
            return 0;
        return body[portal_end + 1] == 0;
    }
    case 'D':
    case 'C':
        if (body[0] != 'S')
            return 1; /* a portal */
        return blen >= 2 && body[1] == 0;
    }
    return 0;
}

/* Bookkeeping for a client message sent to the server: the answers it is due (ANSWERS: also
 * the ParseComplete/CloseComplete of an unnamed Parse/Close; Python queues its own). */
static int account_client(LinkObject *s, int kind, int answers) {
    switch (kind) {
    case 'S':
        s->unsynced = 0;
        /* fallthrough */
    case 'Q':
    case 'F':
        s->syncs++;
        return expect_push(s, 'Z', 0, NULL);
    case 'P':
        s->unsynced = 1;
        return answers ? expect_push(s, '1', 0, NULL) : 0;
    case 'C':
        s->unsynced = 1;
        return answers ? expect_push(s, '3', 0, NULL) : 0;
    case 'B':
    case 'D':
    case 'E':
        s->unsynced = 1;
        return 0;
    }
    return 0;
}

static int scan_client(LinkObject *c, LinkObject *s, const char *data, Py_ssize_t n) {
    Py_ssize_t pos = c->remain, start = 0;
    int txn = c->txn;
    if (pos) {
        if (pos >= n) {
            c->remain = pos - n;
            return link_out(s, data, n);
        }
        c->remain = 0;
    }
    while (pos < n) {
        if (pos + 5 > n)
            break;
        int kind = (unsigned char)data[pos];
        uint32_t length = be32(data + pos + 1);
        if (length < 4 || length > MAX_MESSAGE_LENGTH) {
            if (link_out(s, data + start, pos - start) < 0)
                return -1;
            return call_bad_length(c, kind, length);
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        const char *body = data + pos + 5;
        Py_ssize_t blen = (Py_ssize_t)length - 4;
        int python = 0;
        if (c->skip_to_sync && kind != 'S') {
            python = 1;
        } else if (kind == 'X') {
            if (link_out(s, data + start, pos - start) < 0)
                return -1;
            PyObject *owner = link_owner(c);
            py_calls++;
            PyObject *r = owner ? PyObject_CallMethodNoArgs(owner, s_engine_terminate) : NULL;
            if (r == NULL)
                return -1;
            Py_DECREF(r);
            return 0;
        } else if (txn) {
            if (kind == 'Q') {
                if (end > n)
                    break;
                python = mentions_keyword(body, blen);
            } else if (kind == 'P' || kind == 'B' || kind == 'D' || kind == 'C') {
                if (end > n)
                    break;
                python = !extended_is_plain(kind, body, blen);
            }
        }
        if (python) {
            if (end > n)
                break;
            if (link_out(s, data + start, pos - start) < 0)
                return -1;
            start = end;
            if (!c->skip_to_sync &&
                (kind == 'P' || kind == 'B' || kind == 'D' || kind == 'C' || kind == 'E'))
                s->unsynced = 1;
            PyObject *bodyb = PyBytes_FromStringAndSize(body, blen);
            if (bodyb == NULL)
                return -1;
            PyObject *owner = link_owner(c);
            PyObject *k = owner ? PyLong_FromLong(kind) : NULL;
            py_calls++;
            PyObject *r = k ? PyObject_CallMethodObjArgs(owner, s_engine_message, k, bodyb, NULL)
                            : NULL;
            Py_XDECREF(k);
            Py_DECREF(bodyb);
            if (r == NULL)
                return -1;
            int forward = 0;
            if (r == Py_None) {
                forward = 1;
                if (link_out(s, data + pos, end - pos) < 0) {
                    Py_DECREF(r);
                    return -1;
                }
            } else if (PyBytes_Check(r)) {
                forward = PyBytes_GET_SIZE(r) > 0;
                if (link_out(s, PyBytes_AS_STRING(r), PyBytes_GET_SIZE(r)) < 0) {
                    Py_DECREF(r);
                    return -1;
                }
            }
            Py_DECREF(r);
            if (forward && account_client(s, kind, 0) < 0)
                return -1;
            if (forward && kind == 'S')
                c->skip_to_sync = 0;
            if (c->closed || c->peer != s || !c->forwarding) {
                /* Python changed the picture: the rest goes through dispatch again */
                pos = end;
                if (pos < n && !c->closed)
                    return dispatch(c, data + pos, n - pos);
                return 0;
            }
            pos = end;
            continue;
        }
        if (kind == 'S')
            c->skip_to_sync = 0;
        if (account_client(s, kind, txn) < 0)
            return -1;
        if (end > n) {
            c->remain = end - n;
            pos = n;
            break;
        }
        pos = end;
    }
    if (pos < n) {
        if (keep_partial(c, data, pos, n) < 0)
            return -1;
        n = pos;
    }
    if (n > start && link_out(s, data + start, n - start) < 0)
        return -1;
    if (txn && !s->syncs && !s->unsynced && c->peer == s && !c->part_len && !c->remain &&
        s->status == 'I' && !s->remain && !s->part_len) {
        PyObject *owner = link_owner(c);
        py_calls++;
        PyObject *r = owner ? PyObject_CallMethodNoArgs(owner, s_engine_release) : NULL;
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* --- framing: server -> client --------------------------------------------------------------------- */

static int scan_server(LinkObject *s, LinkObject *c, const char *data, Py_ssize_t n) {
    Py_ssize_t pos = s->remain, start = 0;
    int ready = 0;
    if (pos) {
        if (pos >= n) {
            s->remain = pos - n;
            return link_out(c, data, n);
        }
        s->remain = 0;
    }
    while (pos + 5 <= n) {
        int kind = (unsigned char)data[pos];
        uint32_t length = be32(data + pos + 1);
        if (length < 4 || length > MAX_MESSAGE_LENGTH) {
            if (link_out(c, data + start, pos - start) < 0)
                return -1;
            return call_bad_length(s, kind, length);
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (kind == 'Z') {
            if (end > n)
                break;
            s->status = (unsigned char)data[pos + 5];
            while (s->exp_len) {
                Expect e = expect_pop(s);
                if (e.kind == 'Z')
                    break;
                if (e.name != NULL) {
                    PyObject *entry = Py_BuildValue("(OiO)", e.name, e.kind == '1' ? '1' : '3',
                                                    e.drop ? Py_True : Py_False);
                    Py_DECREF(e.name);
                    if (entry == NULL)
                        return -1;
                    PyObject *r = call1(s->owner, s_unanswered, entry);
                    Py_DECREF(entry);
                    if (r == NULL)
                        return -1;
                    Py_DECREF(r);
                }
            }
            if (s->syncs)
                s->syncs--;
            ready = 1;
        } else if (kind == 'S') {
            if (end > n)
                break;
            PyObject *b = PyBytes_FromStringAndSize(data + pos + 5, end - pos - 5);
            if (b == NULL)
                return -1;
            PyObject *r = call1(s->owner, s_engine_param, b);
            Py_DECREF(b);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        } else if ((kind == '1' || kind == '3') && s->exp_len &&
                   s->exp[s->exp_head].kind != 'Z') {
            if (end > n)
                break;
            Expect e = expect_pop(s);
            Py_XDECREF(e.name);
            if (e.drop) { /* the answer to a message the pooler added: hidden */
                if (link_out(c, data + start, pos - start) < 0)
                    return -1;
                start = end;
            }
        }
        pos = end;
    }
    if (pos > n) {
        s->remain = pos - n;
    } else if (pos < n) {
        if (keep_partial(s, data, pos, n) < 0)
            return -1;
        n = pos;
    }
    if (n > start && link_out(c, data + start, n - start) < 0)
        return -1;
    if (ready && s->status == 'I' && !s->syncs && !s->unsynced && c->peer == s && c->txn &&
        !c->part_len && !c->remain) {
        int done = fast_release(s, c);
        if (done)
            return done < 0 ? -1 : 0;
        PyObject *owner = link_owner(c);
        PyObject *r = owner ? call1(owner, s_on_ready, s->owner) : NULL;
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* Bytes from L's socket (or transport): frame and forward, or hand them to Python. */
/* --- logins the engine runs (md5, a startup packet Python has seen) ------------------------------ */

#define LOGIN_STARTUP 1
#define LOGIN_MD5 2
#define LOGIN_SCRAM_FIRST 3
#define LOGIN_SCRAM_FINAL 4
#define SSL_REQUEST_CODE 80877103u
#define GSSENC_REQUEST_CODE 80877104u
#define MAX_STARTUP_LENGTH 10000 /* protocol.MAX_STARTUP_LENGTH */
#define MAX_AUTH_MESSAGE 8192    /* auth.MAX_AUTH_MESSAGE */

/* N (at most 64) random bytes, for an md5 salt or a SCRAM nonce, from a batch read with
 * getrandom(2). */
static int engine_random(EngineObject *e, char *out, int n) {
    if (e->rand_left < n) {
        ssize_t r;
        do {
            r = getrandom(e->rand, sizeof(e->rand), 0);
        } while (r < 0 && errno == EINTR);
        if (r != (ssize_t)sizeof(e->rand)) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        e->rand_left = (int)sizeof(e->rand);
    }
    e->rand_left -= n;
    memcpy(out, e->rand + e->rand_left, n);
    return 0;
}

/* Whether a password message's BODY is "md5" + md5(SECRET + SALT) in hex (SECRET: the hex
 * digits of the stored md5(password + user)); 1, 0, or -1 with an exception. */
static int md5_answer_matches(PyObject *secret, const char *salt, const char *body,
                              Py_ssize_t blen) {
    while (blen > 0 && body[blen - 1] == '\0')
        blen--;
    Py_ssize_t slen = PyBytes_GET_SIZE(secret);
    PyObject *input = PyBytes_FromStringAndSize(NULL, slen + 4);
    if (input == NULL)
        return -1;
    memcpy(PyBytes_AS_STRING(input), PyBytes_AS_STRING(secret), slen);
    memcpy(PyBytes_AS_STRING(input) + slen, salt, 4);
    PyObject *args[] = {input, Py_False};
    PyObject *h = PyObject_Vectorcall(md5_new, args, 1, s_usedforsecurity);
    Py_DECREF(input);
    if (h == NULL)
        return -1;
    PyObject *hex = PyObject_CallMethodNoArgs(h, s_hexdigest);
    Py_DECREF(h);
    if (hex == NULL)
        return -1;
    Py_ssize_t xlen;
    const char *x = PyUnicode_AsUTF8AndSize(hex, &xlen);
    if (x == NULL) {
        Py_DECREF(hex);
        return -1;
    }
    int diff = (blen != xlen + 3);
    if (!diff) { /* in constant time */
        unsigned char acc = 0;
        acc |= (unsigned char)(body[0] ^ 'm') | (unsigned char)(body[1] ^ 'd') |
               (unsigned char)(body[2] ^ '5');
        for (Py_ssize_t i = 0; i < xlen; i++)
            acc |= (unsigned char)(body[3 + i] ^ x[i]);
        diff = acc != 0;
    }
    Py_DECREF(hex);
    return !diff;
}

/* The login buffer is not kept: most clients never need one again (idle memory). */
static void login_forget_buffer(LinkObject *l) {
    PyMem_Free(l->part);
    l->part = NULL;
    l->part_len = l->part_cap = 0;
}

/* The login ended here: tell the owner (info, message kind, 1 matched / 0 not / -1 a bad
 * length, the bytes after the message: REST, or none when NULL). */
static int login_done(LinkObject *l, int kind, int outcome, PyObject *rest) {
    PyObject *with = l->login_with;
    l->login_with = NULL;
    l->login = 0;
    login_forget_buffer(l); /* (REST is a copy) */
    PyObject *r = NULL, *owner = link_owner(l);
    PyObject *b = rest != NULL ? Py_NewRef(rest) : PyBytes_FromStringAndSize(NULL, 0);
    PyObject *k = PyLong_FromLong(kind), *o = PyLong_FromLong(outcome);
    if (owner != NULL && b != NULL && k != NULL && o != NULL) {
        PyObject *args[] = {owner, PyTuple_GET_ITEM(with, 2), k, o, b};
        py_calls++;
        r = PyObject_VectorcallMethod(s_engine_login, args, 5, NULL);
    }
    Py_XDECREF(b);
    Py_XDECREF(k);
    Py_XDECREF(o);
    Py_DECREF(with);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* A backend pid of the engine's own (ENGINE_PID_BIT set: Python's never have it) that neither
 * side has given to a connected client, as an int; NULL with an exception. */
static PyObject *engine_pid(EngineObject *e) {
    for (long tries = 0; tries < ENGINE_PID_BIT; tries++) {
        e->next_pid = (e->next_pid + 1) & (ENGINE_PID_BIT - 1);
        if (!e->next_pid)
            continue;
        PyObject *key = PyLong_FromLong(e->pid_base | ENGINE_PID_BIT | (long)e->next_pid);
        if (key == NULL)
            return NULL;
        int taken = PyDict_Contains(e->pids, key);
        if (taken == 0 && e->client_pids != NULL && PyDict_Check(e->client_pids))
            taken = PyDict_Contains(e->client_pids, key);
        if (taken == 0)
            return key;
        Py_DECREF(key);
        if (taken < 0)
            return NULL;
    }
    PyErr_SetString(PyExc_RuntimeError, "every backend pid is in use");
    return NULL;
}

/* The login the engine ran for a client without a Python session matched: greet it as
 * ClientSession._logged_in does (FINAL: the AuthenticationSASLFinal first, or NULL for md5;
 * then AuthenticationOk and the ParameterStatus messages of the greeting Python kept with the
 * login, BackendKeyData with a pid of the engine's own, ReadyForQuery) and go on with REST,
 * still without Python. 1 done; 0 Python's to finish (nothing kept to greet with, or
 * max_client_conn reached: Python says so); -1 an exception. */
static int login_here(LinkObject *l, PyObject *final, PyObject *rest) {
    EngineObject *e = l->engine;
    PyObject *info = PyTuple_GET_ITEM(l->login_with, 2);
    if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) != 5 || e->clients == NULL ||
        !PyAnySet_Check(e->clients) || e->pids == NULL)
        return 0;
    PyObject *greeting = PyTuple_GET_ITEM(info, 3), *core = PyTuple_GET_ITEM(info, 4);
    if (!PyTuple_Check(greeting) || PyTuple_GET_SIZE(greeting) != 4 ||
        !PyObject_TypeCheck(core, &PoolCoreType) || !PyBytes_Check(PyTuple_GET_ITEM(greeting, 3)))
        return 0;
    if (PySet_GET_SIZE(e->clients) + e->unowned > e->max_clients)
        return 0;
    PyObject *messages = PyTuple_GET_ITEM(greeting, 3);
    PyObject *pid = engine_pid(e);
    if (pid == NULL)
        return -1;
    char key[4];
    if (engine_random(e, key, 4) < 0 || PyDict_SetItem(e->pids, pid, (PyObject *)l) < 0) {
        Py_DECREF(pid);
        return -1;
    }
    key[0] &= 0x7F;
    l->pid = (uint32_t)PyLong_AsLong(pid);
    l->key = be32(key);
    Py_DECREF(pid);
    Py_ssize_t flen = final != NULL ? PyBytes_GET_SIZE(final) : 0;
    Py_ssize_t mlen = PyBytes_GET_SIZE(messages), total = flen + mlen + 19;
    char *out = PyMem_Malloc(total);
    if (out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (flen)
        memcpy(out, PyBytes_AS_STRING(final), flen);
    memcpy(out + flen, PyBytes_AS_STRING(messages), mlen);
    char *k = out + flen + mlen;
    uint32_t npid = htonl(l->pid);
    k[0] = 'K';
    memcpy(k + 1, "\0\0\0\x0c", 4);
    memcpy(k + 5, &npid, 4);
    memcpy(k + 9, key, 4);
    memcpy(k + 13, "Z\0\0\0\x05I", 6);
    Py_XSETREF(l->info, Py_NewRef(info));
    Py_XSETREF(l->state, Py_NewRef(PyTuple_GET_ITEM(greeting, 2)));
    Py_XSETREF(l->core, (PoolCoreObject *)Py_NewRef(core));
    l->login = 0;
    Py_CLEAR(l->login_with);
    Py_CLEAR(l->scram);
    login_forget_buffer(l);
    int rc = link_out(l, out, total);
    PyMem_Free(out);
    if (rc < 0)
        return -1;
    if (PyBytes_GET_SIZE(rest) && dispatch(l, PyBytes_AS_STRING(rest), PyBytes_GET_SIZE(rest)) < 0)
        return -1;
    return 1;
}

/* --- SCRAM-SHA-256 logins (auth.ScramServer is the reference: see the comment at the top) -- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding; OUT has room for 4 * ((N + 2) / 3) bytes. */
static Py_ssize_t b64_encode(const unsigned char *in, Py_ssize_t n, char *out) {
    Py_ssize_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = B64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    return o;
}

static int b64_value(char c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* The 32 bytes whose canonical base64 is the 44 characters at IN; 0 when they are not that. */
static int b64_decode32(const char *in, unsigned char *out) {
    if (in[43] != '=')
        return 0;
    uint32_t v = 0;
    int bits = 0, o = 0;
    for (int i = 0; i < 43; i++) {
        int d = b64_value(in[i]);
        if (d < 0)
            return 0;
        v = v << 6 | (uint32_t)d;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(v >> bits);
        }
    }
    return (v & ((1u << bits) - 1)) == 0; /* (the unused bits are zero) */
}

static int scram_char_ok(char c) { return c > ' ' && c < 127 && c != ','; }

/* The SCRAM login ended here, or goes on in Python: _engine_scram_login(info, OUTCOME, DATA,
 * EXTRA). 1: the proof matched, DATA is the AuthenticationSASLFinal to send, EXTRA what the
 * client sent after its message; 0: it did not match; 2: Python takes the exchange on after
 * AuthenticationSASL, DATA is what the client sent since; 3: Python takes it on after
 * server-first, DATA as for 2, EXTRA the exchange so far (Link.scram). */
static int scram_done(LinkObject *l, int outcome, PyObject *data, PyObject *extra) {
    PyObject *with = l->login_with, *state = l->scram;
    l->login_with = NULL;
    l->scram = NULL;
    l->login = 0;
    login_forget_buffer(l); /* (DATA is a copy) */
    PyObject *r = NULL, *owner = link_owner(l), *o = owner ? PyLong_FromLong(outcome) : NULL;
    if (o != NULL) {
        PyObject *args[] = {owner, PyTuple_GET_ITEM(with, 2), o, data,
                            extra != NULL ? extra : (outcome == 3 ? state : Py_None)};
        py_calls++;
        r = PyObject_VectorcallMethod(s_engine_scram_login, args, 5, NULL);
        Py_DECREF(o);
    }
    Py_DECREF(with);
    Py_XDECREF(state);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The body of a SASLInitialResponse in the shape libpq sends ("SCRAM-SHA-256", then
 * "n,,n=<user>,r=<nonce>" or "y,,..."): answer with server-first and keep the exchange in
 * L->scram. 1 done, 0 another shape (Python's), -1 an exception. */
static int scram_first(LinkObject *l, const char *body, Py_ssize_t blen) {
    static const char mechanism[] = "SCRAM-SHA-256"; /* (with its NUL: 14 bytes) */
    if (blen < 18 || memcmp(body, mechanism, sizeof(mechanism)) != 0)
        return 0;
    Py_ssize_t dlen = (Py_ssize_t)be32(body + 14);
    const char *d = body + 18;
    if (dlen != blen - 18 || dlen < 9 || (d[0] != 'n' && d[0] != 'y') || d[1] != ',' ||
        d[2] != ',' || d[3] != 'n' || d[4] != '=')
        return 0;
    const char *bare = d + 3;
    Py_ssize_t bare_len = dlen - 3, i = 2;
    while (i < bare_len && bare[i] != ',') {
        if (!scram_char_ok(bare[i]))
            return 0;
        i++;
    }
    if (i + 4 > bare_len || memcmp(bare + i, ",r=", 3) != 0)
        return 0;
    const char *cnonce = bare + i + 3;
    Py_ssize_t cnonce_len = bare_len - i - 3;
    for (Py_ssize_t j = 0; j < cnonce_len; j++)
        if (!scram_char_ok(cnonce[j]))
            return 0;
    PyObject *tail = PyTuple_GET_ITEM(PyTuple_GET_ITEM(l->login_with, 0), 2);
    Py_ssize_t tail_len = PyBytes_GET_SIZE(tail);
    unsigned char raw[18];
    if (engine_random(l->engine, (char *)raw, 18) < 0)
        return -1;
    /* server-first: r=<client nonce><server nonce>,s=<salt>,i=<iterations> */
    Py_ssize_t nonce_len = cnonce_len + 24, sf_len = 2 + nonce_len + tail_len;
    PyObject *nonce = PyBytes_FromStringAndSize(NULL, nonce_len);
    PyObject *sf = PyBytes_FromStringAndSize(NULL, sf_len);
    PyObject *state = NULL;
    if (nonce != NULL && sf != NULL) {
        char *n = PyBytes_AS_STRING(nonce), *s = PyBytes_AS_STRING(sf);
        memcpy(n, cnonce, cnonce_len);
        b64_encode(raw, 18, n + cnonce_len);
        s[0] = 'r';
        s[1] = '=';
        memcpy(s + 2, n, nonce_len);
        memcpy(s + 2 + nonce_len, PyBytes_AS_STRING(tail), tail_len);
        state = Py_BuildValue("(y#y#OO)", bare, bare_len, d, (Py_ssize_t)3, nonce, sf);
    }
    Py_XDECREF(nonce);
    if (state == NULL) {
        Py_XDECREF(sf);
        return -1;
    }
    Py_XSETREF(l->scram, state);
    /* AuthenticationSASLContinue, in one send */
    char stack[512], *out = 9 + sf_len <= (Py_ssize_t)sizeof(stack) ? stack : PyMem_Malloc(9 + sf_len);
    if (out == NULL) {
        Py_DECREF(sf);
        PyErr_NoMemory();
        return -1;
    }
    uint32_t mlen = htonl((uint32_t)(8 + sf_len));
    out[0] = 'R';
    memcpy(out + 1, &mlen, 4);
    memcpy(out + 5, "\0\0\0\x0b", 4);
    memcpy(out + 9, PyBytes_AS_STRING(sf), sf_len);
    int rc = link_out(l, out, 9 + sf_len);
    if (out != stack)
        PyMem_Free(out);
    Py_DECREF(sf);
    return rc < 0 ? -1 : 1;
}

/* HMAC-SHA-256(KEY, MSG) into OUT (32 bytes); -1 with an exception. */
static int scram_hmac(PyObject *key, PyObject *msg, unsigned char *out) {
    PyObject *args[] = {key, msg, s_sha256};
    PyObject *d = PyObject_Vectorcall(hmac_digest, args, 3, NULL);
    if (d == NULL)
        return -1;
    int ok = PyBytes_Check(d) && PyBytes_GET_SIZE(d) == 32;
    if (ok)
        memcpy(out, PyBytes_AS_STRING(d), 32);
    Py_DECREF(d);
    if (!ok)
        PyErr_SetString(PyExc_RuntimeError, "hmac.digest gave no SHA-256 digest");
    return ok ? 0 : -1;
}

/* The body of a SASLResponse in the shape libpq sends ("c=<gs2 header>,r=<nonce>,p=<proof>"):
 * check the proof. 1 it matched (*FINAL: the AuthenticationSASLFinal), 0 it did not, 2 another
 * shape (Python's), -1 an exception. */
static int scram_final(LinkObject *l, const char *body, Py_ssize_t blen, PyObject **final) {
    PyObject *bare = PyTuple_GET_ITEM(l->scram, 0), *gs2 = PyTuple_GET_ITEM(l->scram, 1),
             *nonce = PyTuple_GET_ITEM(l->scram, 2), *sf = PyTuple_GET_ITEM(l->scram, 3);
    PyObject *secret = PyTuple_GET_ITEM(l->login_with, 0);
    const char *binding = PyBytes_AS_STRING(gs2)[0] == 'n' ? "biws" : "eSws";
    Py_ssize_t nlen = PyBytes_GET_SIZE(nonce), without = 2 + 4 + 3 + nlen;
    unsigned char proof[32], sig[32], key[32];
    if (blen != without + 3 + 44 || memcmp(body, "c=", 2) != 0 || memcmp(body + 2, binding, 4) ||
        memcmp(body + 6, ",r=", 3) != 0 || memcmp(body + 9, PyBytes_AS_STRING(nonce), nlen) ||
        memcmp(body + without, ",p=", 3) != 0 || !b64_decode32(body + without + 3, proof))
        return 2;
    /* AuthMessage: client-first-bare,server-first,client-final-without-proof */
    Py_ssize_t bl = PyBytes_GET_SIZE(bare), sl = PyBytes_GET_SIZE(sf);
    PyObject *auth = PyBytes_FromStringAndSize(NULL, bl + 1 + sl + 1 + without);
    if (auth == NULL)
        return -1;
    char *a = PyBytes_AS_STRING(auth);
    memcpy(a, PyBytes_AS_STRING(bare), bl);
    a[bl] = ',';
    memcpy(a + bl + 1, PyBytes_AS_STRING(sf), sl);
    a[bl + 1 + sl] = ',';
    memcpy(a + bl + 2 + sl, body, without);
    int rc = -1;
    PyObject *stored = PyTuple_GET_ITEM(secret, 0);
    if (scram_hmac(stored, auth, sig) < 0)
        goto out;
    for (int i = 0; i < 32; i++) /* ClientKey = proof XOR ClientSignature */
        key[i] = proof[i] ^ sig[i];
    PyObject *ck = PyBytes_FromStringAndSize((const char *)key, 32);
    if (ck == NULL)
        goto out;
    PyObject *h = PyObject_CallOneArg(sha256_new, ck);
    Py_DECREF(ck);
    if (h == NULL)
        goto out;
    PyObject *hashed = PyObject_CallMethodNoArgs(h, s_digest);
    Py_DECREF(h);
    if (hashed == NULL)
        goto out;
    unsigned char acc = PyBytes_GET_SIZE(stored) != 32 || PyBytes_GET_SIZE(hashed) != 32;
    if (!acc) /* it must hash to StoredKey: compared in constant time */
        for (int i = 0; i < 32; i++)
            acc |= (unsigned char)(PyBytes_AS_STRING(hashed)[i] ^ PyBytes_AS_STRING(stored)[i]);
    Py_DECREF(hashed);
    if (acc) {
        rc = 0;
        goto out;
    }
    if (scram_hmac(PyTuple_GET_ITEM(secret, 1), auth, sig) < 0) /* ServerSignature */
        goto out;
    /* AuthenticationSASLFinal: v=<server signature> */
    char msg[55] = {'R', 0, 0, 0, 54, 0, 0, 0, 12, 'v', '='};
    b64_encode(sig, 32, msg + 11);
    *final = PyBytes_FromStringAndSize(msg, 55);
    rc = *final == NULL ? -1 : 1;
out:
    Py_DECREF(auth);
    return rc;
}

/* What a logging-in client sent (L->login set): see the comment at the top. */
static int login_dispatch(LinkObject *l, const char *data, Py_ssize_t n) {
    EngineObject *e = l->engine;
    if (ensure_cap(&l->part, &l->part_cap, l->part_len + n) < 0)
        return -1;
    memcpy(l->part + l->part_len, data, n);
    l->part_len += n;
    const char *buf = l->part;
    Py_ssize_t len = l->part_len, pos = 0;
    while (l->login && !l->closed) {
        if (l->login == LOGIN_STARTUP) {
            if (len - pos < 4)
                break;
            uint32_t plen = be32(buf + pos);
            if (plen < 8 || plen > MAX_STARTUP_LENGTH)
                goto to_python;
            if (len - pos < (Py_ssize_t)plen)
                break;
            uint32_t code = be32(buf + pos + 4);
            if (plen == 8 && (code == SSL_REQUEST_CODE || code == GSSENC_REQUEST_CODE)) {
                pos += 8;
                if (link_out(l, "N", 1) < 0)
                    return -1;
                continue;
            }
            if (e == NULL || e->logins == NULL)
                goto to_python;
            PyObject *key = PyBytes_FromStringAndSize(buf + pos + 4, plen - 4);
            if (key == NULL)
                return -1;
            PyObject *with = PyDict_GetItemWithError(e->logins, key);
            Py_DECREF(key);
            if (with == NULL) {
                if (PyErr_Occurred())
                    return -1;
                goto to_python;
            }
            Py_INCREF(with); /* ours now, whatever Python does to Engine.logins meanwhile */
            Py_XSETREF(l->login_with, with);
            if (!PyTuple_Check(with) || PyTuple_GET_SIZE(with) != 3 ||
                !PyFloat_Check(PyTuple_GET_ITEM(with, 1)) ||
                PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(with, 1)) <= now_mono())
                goto to_python; /* expired: Python looks the route up again */
            PyObject *secret = PyTuple_GET_ITEM(with, 0);
            if (PyTuple_Check(secret)) { /* SCRAM: (StoredKey, ServerKey, server-first tail) */
                if (PyTuple_GET_SIZE(secret) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(secret, 0)) ||
                    !PyBytes_Check(PyTuple_GET_ITEM(secret, 1)) ||
                    !PyBytes_Check(PyTuple_GET_ITEM(secret, 2)))
                    goto to_python;
                static const char sasl[24] = {'R', 0,   0,   0,   23,  0,   0,   0,
                                              10,  'S', 'C', 'R', 'A', 'M', '-', 'S',
                                              'H', 'A', '-', '2', '5', '6', 0,   0};
                l->login = LOGIN_SCRAM_FIRST;
                pos += plen;
                if (link_out(l, sasl, 24) < 0)
                    return -1;
                continue;
            }
            if (!PyBytes_Check(secret))
                goto to_python;
            char request[13] = {'R', 0, 0, 0, 12, 0, 0, 0, 5};
            if (engine_random(e, request + 9, 4) < 0)
                return -1;
            memcpy(l->salt, request + 9, 4);
            l->login = LOGIN_MD5;
            pos += plen;
            if (link_out(l, request, 13) < 0)
                return -1;
            continue;
        }
        if (len - pos < 5)
            break;
        int kind = (unsigned char)buf[pos];
        uint32_t mlen = be32(buf + pos + 1);
        if (l->login != LOGIN_MD5) { /* SCRAM: client-first, then client-final */
            int first = l->login == LOGIN_SCRAM_FIRST, rc = 2;
            if (kind == 'p' && mlen >= 4 && mlen <= MAX_AUTH_MESSAGE) {
                if (len - pos < 1 + (Py_ssize_t)mlen)
                    break;
                PyObject *final = NULL;
                rc = first ? scram_first(l, buf + pos + 5, (Py_ssize_t)mlen - 4)
                           : scram_final(l, buf + pos + 5, (Py_ssize_t)mlen - 4, &final);
                if (rc < 0)
                    return -1;
                if (first && rc == 1) {
                    l->login = LOGIN_SCRAM_FINAL;
                    pos += 1 + mlen;
                    continue;
                }
                if (!first && rc != 2) { /* the proof matched (1) or not (0) */
                    pos += 1 + mlen;
                    PyObject *rest = PyBytes_FromStringAndSize(buf + pos, len - pos);
                    if (rest == NULL) {
                        Py_XDECREF(final);
                        return -1;
                    }
                    int here = rc && l->unowned ? login_here(l, final, rest) : 0;
                    if (here)
                        rc = here < 0 ? -1 : 0;
                    else
                        rc = rc ? scram_done(l, 1, final, rest) : scram_done(l, 0, rest, NULL);
                    Py_XDECREF(final);
                    Py_DECREF(rest);
                    return rc;
                }
            }
            /* another shape: Python goes on from here, with the message */
            PyObject *data = PyBytes_FromStringAndSize(buf + pos, len - pos);
            if (data == NULL)
                return -1;
            rc = scram_done(l, first ? 2 : 3, data, NULL);
            Py_DECREF(data);
            return rc;
        }
        /* LOGIN_MD5: the answer */
        if (kind != 'p')
            return login_done(l, kind, 0, NULL);
        if (mlen < 4 || mlen > MAX_AUTH_MESSAGE) {
            PyObject *message = PyBytes_FromStringAndSize(buf + pos, len - pos);
            if (message == NULL)
                return -1;
            int rc = login_done(l, kind, -1, message);
            Py_DECREF(message);
            return rc;
        }
        if (len - pos < 1 + (Py_ssize_t)mlen)
            break;
        int ok = md5_answer_matches(PyTuple_GET_ITEM(l->login_with, 0), l->salt, buf + pos + 5,
                                    (Py_ssize_t)mlen - 4);
        if (ok < 0)
            return -1;
        pos += 1 + mlen;
        /* (the owner may write and read: what follows goes with the call, not in l->part) */
        PyObject *rest = PyBytes_FromStringAndSize(buf + pos, len - pos);
        if (rest == NULL)
            return -1;
        int rc = ok && l->unowned ? login_here(l, NULL, rest) : 0;
        if (rc)
            rc = rc < 0 ? -1 : 0;
        else
            rc = login_done(l, kind, ok, rest);
        Py_DECREF(rest);
        return rc;
    }
    if (l->closed) {
        login_forget_buffer(l);
        Py_CLEAR(l->scram);
        return 0;
    }
    if (pos) /* keep the unfinished message */
        memmove(l->part, buf + pos, len - pos);
    l->part_len = len - pos;
    return 0;

to_python:
    l->login = 0;
    Py_CLEAR(l->login_with);
    Py_CLEAR(l->scram);
    {
        PyObject *b = PyBytes_FromStringAndSize(buf + pos, len - pos);
        login_forget_buffer(l);
        if (b == NULL)
            return -1;
        PyObject *owner = link_owner(l); /* (even with no bytes: Python takes the login on) */
        PyObject *r = owner == NULL           ? NULL
                      : PyBytes_GET_SIZE(b) ? call1(owner, s_on_data, b)
                                            : Py_NewRef(Py_None);
        Py_DECREF(b);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
}

static int dispatch(LinkObject *l, const char *data, Py_ssize_t n) {
    if (l->closed)
        return 0;
    if (l->login)
        return login_dispatch(l, data, n);
    if (l->holding) /* waiting for a server connection */
        return pend_append(l, data, n);
    if (l->peer == NULL && !l->server) {
        int done = fast_checkout(l, data, n);
        if (done)
            return done < 0 ? -1 : 0;
    }
    LinkObject *peer = l->peer;
    if (peer == NULL || !l->forwarding || peer->closed) {
        if (l->part_len) { /* bytes kept from a message cut in two go first */
            Py_ssize_t plen = l->part_len;
            l->part_len = 0;
            PyObject *b = PyBytes_FromStringAndSize(NULL, plen + n);
            if (b == NULL)
                return -1;
            memcpy(PyBytes_AS_STRING(b), l->part, plen);
            memcpy(PyBytes_AS_STRING(b) + plen, data, n);
            PyObject *owner = link_owner(l);
            PyObject *r = owner ? call1(owner, s_on_data, b) : NULL;
            Py_DECREF(b);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
            return 0;
        }
        return call_on_data(l, data, n);
    }
    if (l->core != NULL) {
        if (l->server)
            l->core->sent += n;
        else
            l->core->received += n;
    }
    int rc;
    Py_INCREF(peer);
    if (l->part_len) {
        /* finish the partial message: work on a private copy of partial + data */
        Py_ssize_t total = l->part_len + n;
        char *tmp = PyMem_Malloc(total);
        if (tmp == NULL) {
            Py_DECREF(peer);
            PyErr_NoMemory();
            return -1;
        }
        memcpy(tmp, l->part, l->part_len);
        memcpy(tmp + l->part_len, data, n);
        l->part_len = 0;
        rc = l->server ? scan_server(l, peer, tmp, total) : scan_client(l, peer, tmp, total);
        PyMem_Free(tmp);
    } else {
        rc = l->server ? scan_server(l, peer, data, n) : scan_client(l, peer, data, n);
    }
    Py_DECREF(peer);
    return rc;
}

/* --- Link: Python methods ------------------------------------------------------------------------- */

static int Link_traverse(LinkObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->engine);
    Py_VISIT(self->owner);
    Py_VISIT(self->transport);
    Py_VISIT(self->extra);
    Py_VISIT(self->peer);
    Py_VISIT(self->core);
    Py_VISIT(self->state);
    Py_VISIT(self->login_with);
    Py_VISIT(self->scram);
    Py_VISIT(self->peer_host);
    Py_VISIT(self->local);
    Py_VISIT(self->info);
    for (Py_ssize_t i = 0; i < self->exp_len; i++)
        Py_VISIT(self->exp[(self->exp_head + i) % self->exp_cap].name);
    return 0;
}

static int Link_clear(LinkObject *self) {
    Py_CLEAR(self->owner);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->extra);
    Py_CLEAR(self->peer);
    Py_CLEAR(self->core);
    Py_CLEAR(self->state);
    Py_CLEAR(self->login_with);
    Py_CLEAR(self->scram);
    Py_CLEAR(self->peer_host);
    Py_CLEAR(self->local);
    Py_CLEAR(self->info);
    expect_clear(self);
    Py_CLEAR(self->engine);
    return 0;
}

static void Link_dealloc(LinkObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->fd >= 0) { /* not reachable while registered (the engine holds it) */
        close(self->fd);
        self->fd = -1;
    }
    Link_clear(self);
    PyMem_Free(self->out);
    PyMem_Free(self->part);
    PyMem_Free(self->pend);
    PyMem_Free(self->exp);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new link, no socket yet: OWNER is called back (None: a client the engine runs alone). */
static LinkObject *link_new(PyTypeObject *type, PyObject *owner, int server, int txn) {
    LinkObject *self = (LinkObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->owner = Py_NewRef(owner);
    self->server = server;
    self->txn = txn;
    self->status = 'I';
    self->reading = 1;
    self->forwarding = 1;
    self->fd = -1;
    return self;
}

static PyObject *Link_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"owner", "server", "txn", NULL};
    PyObject *owner;
    int server, txn;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Opp", kwlist, &owner, &server, &txn))
        return NULL;
    return (PyObject *)link_new(type, owner, server, txn);
}

/* L reads and writes FD from now on, in E's epoll set and table (EXTRA: its get_extra_info).
 * 0, or -1 with an exception (FD is then still the caller's). */
static int link_register(LinkObject *l, EngineObject *e, int fd, PyObject *extra) {
    uint32_t ev = (l->reading && !l->throttled) ? EPOLLIN : 0;
    struct epoll_event event = {.events = ev, .data.ptr = l};
    if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &event) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    PyObject *key = PyLong_FromLong(fd);
    if (key == NULL || PyDict_SetItem(e->links, key, (PyObject *)l) < 0) {
        Py_XDECREF(key);
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
        return -1;
    }
    Py_DECREF(key);
    l->fd = fd;
    l->events = ev;
    Py_XSETREF(l->engine, (EngineObject *)Py_NewRef(e));
    Py_XSETREF(l->extra, Py_NewRef(extra));
    return 0;
}

/* Give the link its I/O: an asyncio transport (written to with write()) ... */
static PyObject *Link_use_transport(LinkObject *self, PyObject *transport) {
    if (self->fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "the link already owns a socket");
        return NULL;
    }
    Py_INCREF(transport);
    Py_XSETREF(self->transport, transport);
    Py_RETURN_NONE;
}

/* ... or a socket the engine reads and writes itself (the caller hands over FD). */
static PyObject *Link_adopt(LinkObject *self, PyObject *args) {
    PyObject *engine, *extra;
    int fd;
    if (!PyArg_ParseTuple(args, "O!iO!", &EngineType, &engine, &fd, &PyDict_Type, &extra))
        return NULL;
    EngineObject *eng = (EngineObject *)engine;
    if (self->fd >= 0 || self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the link already owns a socket");
        return NULL;
    }
    if (eng->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    if (link_register(self, eng, fd, extra) < 0)
        return NULL;
    Py_CLEAR(self->transport);
    Py_RETURN_NONE;
}

static void link_read(EngineObject *engine, LinkObject *l);

static PyObject *Link_read_now(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->fd < 0 || self->closed || self->engine == NULL || self->engine->epfd < 0 ||
        !self->reading || self->throttled)
        Py_RETURN_NONE;
    Py_INCREF(self);
    link_read(self->engine, self);
    Py_DECREF(self);
    Py_RETURN_NONE;
}

static PyObject *Link_write(LinkObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = link_out(self, view.buf, view.len);
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Link_close(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->closed || self->closing)
        Py_RETURN_NONE;
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "close", NULL);
    if (self->out_end > self->out_start) {
        self->closing = 1;
        update_events(self);
    } else {
        link_finish(self, NULL);
    }
    Py_RETURN_NONE;
}

static PyObject *Link_abort(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "abort", NULL);
    link_finish(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *Link_is_closing(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "is_closing", NULL);
    return PyBool_FromLong(self->closing || self->closed);
}

static PyObject *Link_pause_reading(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "pause_reading", NULL);
    self->reading = 0;
    update_events(self);
    Py_RETURN_NONE;
}

static PyObject *Link_resume_reading(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "resume_reading", NULL);
    self->reading = 1;
    update_events(self);
    Py_RETURN_NONE;
}

static PyObject *Link_get_write_buffer_size(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "get_write_buffer_size", NULL);
    return PyLong_FromSsize_t(self->out_end - self->out_start);
}

static PyObject *Link_get_extra_info(LinkObject *self, PyObject *args) {
    PyObject *name, *dflt = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &name, &dflt))
        return NULL;
    if (self->transport != NULL)
        return PyObject_CallMethod(self->transport, "get_extra_info", "OO", name, dflt);
    PyObject *v = self->extra ? PyDict_GetItemWithError(self->extra, name) : NULL;
    if (v == NULL) {
        if (PyErr_Occurred())
            return NULL;
        v = dflt;
    }
    Py_INCREF(v);
    return v;
}

static PyObject *Link_pair(LinkObject *self, PyObject *arg) {
    if (!PyObject_TypeCheck(arg, &LinkType)) {
        PyErr_SetString(PyExc_TypeError, "pair() takes a Link");
        return NULL;
    }
    LinkObject *other = (LinkObject *)arg;
    if (self->server == other->server) {
        PyErr_SetString(PyExc_ValueError, "pair() joins a client link and a server link");
        return NULL;
    }
    LinkObject *c = self->server ? other : self, *s = self->server ? self : other;
    if (c->peer != NULL && c->peer != s)
        unpair_links(c, c->peer);
    if (s->peer != NULL && s->peer != c)
        unpair_links(s->peer, s);
    pair_links(c, s);
    Py_RETURN_NONE;
}

static PyObject *Link_unpair(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    LinkObject *other = self->peer;
    if (other != NULL) {
        Py_INCREF(other);
        if (self->server)
            unpair_links(other, self);
        else
            unpair_links(self, other);
        Py_DECREF(other);
    } else if (self->server) { /* the half-forwarded rest of a message is nobody's now */
        self->part_len = 0;
        self->remain = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *Link_feed(LinkObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_INCREF(self);
    int rc = dispatch(self, view.buf, view.len);
    Py_DECREF(self);
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Link_expect(LinkObject *self, PyObject *args) {
    PyObject *name;
    int kind, drop;
    if (!PyArg_ParseTuple(args, "Sip", &name, &kind, &drop))
        return NULL;
    if (kind != '1' && kind != '3') {
        PyErr_SetString(PyExc_ValueError, "expect() takes ParseComplete or CloseComplete");
        return NULL;
    }
    if (expect_push(self, (char)kind, (char)drop, PyBytes_GET_SIZE(name) ? name : NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Link_get_partial(LinkObject *self, void *Py_UNUSED(closure)) {
    return PyBytes_FromStringAndSize(self->part, self->part_len);
}

static int Link_set_partial(LinkObject *self, PyObject *value, void *Py_UNUSED(closure)) {
    if (value == NULL || !PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "partial is bytes");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(value);
    if (ensure_cap(&self->part, &self->part_cap, n) < 0)
        return -1;
    memcpy(self->part, PyBytes_AS_STRING(value), n);
    self->part_len = n;
    return 0;
}

static PyObject *Link_get_peer(LinkObject *self, void *Py_UNUSED(closure)) {
    PyObject *p = self->peer ? (PyObject *)self->peer : Py_None;
    Py_INCREF(p);
    return p;
}

static PyObject *Link_get_pending_answers(LinkObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->exp_len);
}

static PyObject *Link_get_closed(LinkObject *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->closed);
}

static int Link_set_core(LinkObject *self, PyObject *value, void *Py_UNUSED(closure)) {
    if (value != NULL && value != Py_None && !PyObject_TypeCheck(value, &PoolCoreType)) {
        PyErr_SetString(PyExc_TypeError, "core is a PoolCore or None");
        return -1;
    }
    PyObject *v = (value == NULL || value == Py_None) ? NULL : value;
    Py_XINCREF(v);
    Py_XSETREF(self->core, (PoolCoreObject *)v);
    return 0;
}

static PyObject *Link_get_core(LinkObject *self, void *Py_UNUSED(closure)) {
    PyObject *c = self->core ? (PyObject *)self->core : Py_None;
    Py_INCREF(c);
    return c;
}

static PyObject *Link_get_state(LinkObject *self, void *Py_UNUSED(closure)) {
    PyObject *v = self->state ? self->state : Py_None;
    Py_INCREF(v);
    return v;
}

static int Link_set_state(LinkObject *self, PyObject *value, void *Py_UNUSED(closure)) {
    Py_XINCREF(value);
    Py_XSETREF(self->state, value);
    return 0;
}

static PyObject *Link_get_pending(LinkObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->pend_len);
}

static PyObject *Link_hold(LinkObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = pend_append(self, view.buf, view.len);
    PyBuffer_Release(&view);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Link_take_pending(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *b = PyBytes_FromStringAndSize(self->pend, self->pend_len);
    if (b != NULL)
        self->pend_len = 0;
    return b;
}

static PyObject *Link_materialize(LinkObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *owner = link_owner(self);
    return owner != NULL ? Py_NewRef(owner) : NULL;
}

static PyObject *Link_get_peer_address(LinkObject *self, void *Py_UNUSED(closure)) {
    if (self->peer_host == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(Oi)", self->peer_host, self->peer_port);
}

static PyObject *Link_get_local_address(LinkObject *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->local != NULL ? self->local : Py_None);
}

static PyObject *Link_get_info(LinkObject *self, void *Py_UNUSED(closure)) {
    return Py_NewRef(self->info != NULL ? self->info : Py_None);
}

static PyObject *Link_get_backend_key(LinkObject *self, void *Py_UNUSED(closure)) {
    if (!self->pid)
        Py_RETURN_NONE;
    return Py_BuildValue("(ll)", (long)self->pid, (long)self->key);
}

static PyObject *Link_get_unowned(LinkObject *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->unowned);
}

static PyGetSetDef Link_getset[] = {
    {"peer_address", (getter)Link_get_peer_address, NULL,
     "an accepted client's (host, port), or None", NULL},
    {"local_address", (getter)Link_get_local_address, NULL,
     "an accepted client's (host, port) of the pooler's end, or None", NULL},
    {"info", (getter)Link_get_info, NULL,
     "logged in by the engine: (route, pool, startup, greeting, core); else None", NULL},
    {"backend_key", (getter)Link_get_backend_key, NULL,
     "logged in by the engine: the (pid, key) it sent; else None", NULL},
    {"unowned", (getter)Link_get_unowned, NULL,
     "a client the engine runs alone (no Python session yet)", NULL},
    {"partial", (getter)Link_get_partial, (setter)Link_set_partial,
     "bytes of a message cut in two, kept until the rest arrives", NULL},
    {"peer", (getter)Link_get_peer, NULL, "the paired link, or None", NULL},
    {"pending_answers", (getter)Link_get_pending_answers, NULL,
     "ReadyForQuery/ParseComplete/CloseComplete answers still due", NULL},
    {"closed", (getter)Link_get_closed, NULL, "whether the socket is closed", NULL},
    {"core", (getter)Link_get_core, (setter)Link_set_core, "the pool's PoolCore", NULL},
    {"state", (getter)Link_get_state, (setter)Link_set_state,
     "search_path and tracked settings (equal on a client and the server it gets)", NULL},
    {"pending", (getter)Link_get_pending, NULL, "bytes held until a server comes", NULL},
    {NULL},
};

static PyMemberDef Link_members[] = {
    {"owner", T_OBJECT, offsetof(LinkObject, owner), 0, "the protocol object called back"},
    {"forwarding", T_INT, offsetof(LinkObject, forwarding), 0, "frame and forward to the peer"},
    {"txn", T_INT, offsetof(LinkObject, txn), 0, "transaction pooling"},
    {"remain", T_PYSSIZET, offsetof(LinkObject, remain), 0,
     "bytes of the current message still to pass through"},
    {"skip_to_sync", T_INT, offsetof(LinkObject, skip_to_sync), 0,
     "drop client messages until Sync (after a refused Parse)"},
    {"syncs", T_INT, offsetof(LinkObject, syncs), 0, "ReadyForQuery answers still due"},
    {"unsynced", T_INT, offsetof(LinkObject, unsynced), 0,
     "an extended-protocol message was sent since the last Sync"},
    {"status", T_INT, offsetof(LinkObject, status), 0, "the transaction status byte"},
    {"attached_at", T_DOUBLE, offsetof(LinkObject, attached_at), 0,
     "server: when its current client got it (monotonic)"},
    {"last_used", T_DOUBLE, offsetof(LinkObject, last_used), 0, "server: last released"},
    {"created_at", T_DOUBLE, offsetof(LinkObject, created_at), 0, "server: opened"},
    {"request_at", T_DOUBLE, offsetof(LinkObject, request_at), 0,
     "client: when it last got a server connection"},
    {"wait_deadline", T_DOUBLE, offsetof(LinkObject, wait_deadline), 0, NULL},
    {"wait_started", T_DOUBLE, offsetof(LinkObject, wait_started), 0, NULL},
    {"generation", T_INT, offsetof(LinkObject, generation), 0,
     "server: the pool's destination generation it logged in to"},
    {"broken", T_INT, offsetof(LinkObject, broken), 0, "server: never to be reused"},
    {"waiting", T_INT, offsetof(LinkObject, waiting), 0, "client: in the pool's queue"},
    {"holding", T_INT, offsetof(LinkObject, holding), 0,
     "client: bytes are held until a server connection is ready"},
    {"connect_time", T_DOUBLE, offsetof(LinkObject, connect_time), READONLY,
     "an accepted client: when it connected (Unix time)"},
    {"login", T_INT, offsetof(LinkObject, login), 0,
     "client: the engine reads its startup packet (1) and may run its md5 or SCRAM login"},
    {NULL},
};

static PyMethodDef Link_methods[] = {
    {"write", (PyCFunction)Link_write, METH_O, "Send bytes to this link's peer socket."},
    {"close", (PyCFunction)Link_close, METH_NOARGS, "Close once the buffered bytes are sent."},
    {"abort", (PyCFunction)Link_abort, METH_NOARGS, "Close now."},
    {"is_closing", (PyCFunction)Link_is_closing, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)Link_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)Link_resume_reading, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)Link_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)Link_get_extra_info, METH_VARARGS, NULL},
    {"pair", (PyCFunction)Link_pair, METH_O, "Forward between this link and another."},
    {"unpair", (PyCFunction)Link_unpair, METH_NOARGS, "Stop forwarding to the peer."},
    {"feed", (PyCFunction)Link_feed, METH_O, "Bytes received (transport mode, or pending)."},
    {"use_transport", (PyCFunction)Link_use_transport, METH_O,
     "Send through this asyncio transport (TLS)."},
    {"adopt", (PyCFunction)Link_adopt, METH_VARARGS,
     "adopt(engine, fd, extra): the engine owns socket FD from now on."},
    {"materialize", (PyCFunction)Link_materialize, METH_NOARGS,
     "The owner, made by Engine.materialize first for a client the engine ran alone."},
    {"read_now", (PyCFunction)Link_read_now, METH_NOARGS,
     "Read what the socket already has, without waiting for the engine's poll."},
    {"expect", (PyCFunction)Link_expect, METH_VARARGS,
     "expect(name, kind, drop): a ParseComplete/CloseComplete due for a message sent."},
    {"hold", (PyCFunction)Link_hold, METH_O, "Keep bytes until a server connection comes."},
    {"take_pending", (PyCFunction)Link_take_pending, METH_NOARGS, "The bytes held, emptied."},
    {NULL},
};

static PyTypeObject LinkType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "outpost.pooler._engine.Link",
    .tp_basicsize = sizeof(LinkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Link_new,
    .tp_dealloc = (destructor)Link_dealloc,
    .tp_traverse = (traverseproc)Link_traverse,
    .tp_clear = (inquiry)Link_clear,
    .tp_methods = Link_methods,
    .tp_members = Link_members,
    .tp_getset = Link_getset,
    .tp_doc = "One logged-in connection: a transport to Python, a framer to its peer.",
};

/* --- PoolCore: Python methods ------------------------------------------------------------------ */

static PyObject *PoolCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"active", NULL};
    PyObject *active;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PySet_Type, &active))
        return NULL;
    PoolCoreObject *self = (PoolCoreObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(active);
    self->active = active;
    return (PyObject *)self;
}

static int PoolCore_traverse(PoolCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->active);
    for (Py_ssize_t i = 0; i < self->idle_len; i++)
        Py_VISIT(self->idle[i]);
    for (Py_ssize_t i = 0; i < self->wq_len; i++)
        Py_VISIT(self->wq[(self->wq_head + i) % self->wq_cap]);
    return 0;
}

static void core_clear_idle(PoolCoreObject *self) {
    while (self->idle_len) {
        LinkObject *s = self->idle[--self->idle_len];
        Py_DECREF(s);
    }
}

static void core_clear_waiters(PoolCoreObject *self) {
    PyObject *w;
    while ((w = wq_pop(self)) != NULL)
        Py_DECREF(w);
}

static int PoolCore_clear(PoolCoreObject *self) {
    Py_CLEAR(self->active);
    core_clear_idle(self);
    core_clear_waiters(self);
    return 0;
}

static void PoolCore_dealloc(PoolCoreObject *self) {
    PyObject_GC_UnTrack(self);
    PoolCore_clear(self);
    PyMem_Free(self->idle);
    PyMem_Free(self->wq);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *PoolCore_take_idle(PoolCoreObject *self, PyObject *args) {
    PyObject *state;
    int any = 1;
    if (!PyArg_ParseTuple(args, "O|p", &state, &any))
        return NULL;
    LinkObject *s = core_take(self, state, any);
    if (s == NULL)
        Py_RETURN_NONE;
    return (PyObject *)s;
}

static PyObject *PoolCore_push_idle(PoolCoreObject *self, PyObject *arg) {
    if (!PyObject_TypeCheck(arg, &LinkType)) {
        PyErr_SetString(PyExc_TypeError, "push_idle() takes a Link");
        return NULL;
    }
    if (core_push_idle(self, (LinkObject *)arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *PoolCore_pop_idle(PoolCoreObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->idle_len == 0)
        Py_RETURN_NONE;
    return (PyObject *)core_take_at(self, self->idle_len - 1);
}

static PyObject *PoolCore_remove_idle(PoolCoreObject *self, PyObject *arg) {
    for (Py_ssize_t i = 0; i < self->idle_len; i++) {
        if ((PyObject *)self->idle[i] == arg) {
            LinkObject *s = core_take_at(self, i);
            Py_DECREF(s);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *PoolCore_idle_links(PoolCoreObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *list = PyList_New(self->idle_len);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->idle_len; i++) {
        Py_INCREF(self->idle[i]);
        PyList_SET_ITEM(list, i, (PyObject *)self->idle[i]);
    }
    return list;
}

static PyObject *PoolCore_set_idle(PoolCoreObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "set_idle() takes a list of Links");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(PySequence_Fast_GET_ITEM(seq, i), &LinkType)) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "set_idle() takes a list of Links");
            return NULL;
        }
    }
    core_clear_idle(self);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (core_push_idle(self, (LinkObject *)PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *PoolCore_enqueue(PoolCoreObject *self, PyObject *arg) {
    if (wq_push(self, arg) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *PoolCore_popleft(PoolCoreObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *w = wq_pop(self);
    if (w == NULL)
        Py_RETURN_NONE;
    return w;
}

static PyObject *PoolCore_waiters(PoolCoreObject *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *list = PyList_New(self->wq_len);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->wq_len; i++) {
        PyObject *w = self->wq[(self->wq_head + i) % self->wq_cap];
        Py_INCREF(w);
        PyList_SET_ITEM(list, i, w);
    }
    return list;
}

static PyObject *PoolCore_set_waiters(PoolCoreObject *self, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "set_waiters() takes a list");
    if (seq == NULL)
        return NULL;
    core_clear_waiters(self);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (wq_push(self, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *PoolCore_get_idle_count(PoolCoreObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->idle_len);
}

static PyObject *PoolCore_get_waiter_count(PoolCoreObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->wq_len);
}

static PyGetSetDef PoolCore_getset[] = {
    {"idle_count", (getter)PoolCore_get_idle_count, NULL, "idle server links", NULL},
    {"waiter_count", (getter)PoolCore_get_waiter_count, NULL,
     "entries in the queue (some may have stopped waiting)", NULL},
    {NULL},
};

static PyMemberDef PoolCore_members[] = {
    {"received", T_LONGLONG, offsetof(PoolCoreObject, received), 0, "bytes from clients"},
    {"sent", T_LONGLONG, offsetof(PoolCoreObject, sent), 0, "bytes from servers"},
    {"xact_count", T_LONGLONG, offsetof(PoolCoreObject, xact_count), 0, NULL},
    {"wait_count", T_LONGLONG, offsetof(PoolCoreObject, wait_count), 0, NULL},
    {"xact_time", T_DOUBLE, offsetof(PoolCoreObject, xact_time), 0, NULL},
    {"wait_time", T_DOUBLE, offsetof(PoolCoreObject, wait_time), 0, NULL},
    {"max_lifetime", T_DOUBLE, offsetof(PoolCoreObject, max_lifetime), 0, NULL},
    {"wait_timeout", T_DOUBLE, offsetof(PoolCoreObject, wait_timeout), 0, NULL},
    {"pool_size", T_INT, offsetof(PoolCoreObject, pool_size), 0, NULL},
    {"connecting", T_INT, offsetof(PoolCoreObject, connecting), 0, NULL},
    {"generation", T_INT, offsetof(PoolCoreObject, generation), 0, NULL},
    {"paused", T_INT, offsetof(PoolCoreObject, paused), 0, NULL},
    {"closed", T_INT, offsetof(PoolCoreObject, closed), 0, NULL},
    {NULL},
};

static PyMethodDef PoolCore_methods[] = {
    {"take_idle", (PyCFunction)PoolCore_take_idle, METH_VARARGS,
     "take_idle(state, any=True): an idle Link, one with STATE when there is one."},
    {"push_idle", (PyCFunction)PoolCore_push_idle, METH_O, NULL},
    {"pop_idle", (PyCFunction)PoolCore_pop_idle, METH_NOARGS, NULL},
    {"remove_idle", (PyCFunction)PoolCore_remove_idle, METH_O, NULL},
    {"idle_links", (PyCFunction)PoolCore_idle_links, METH_NOARGS, NULL},
    {"set_idle", (PyCFunction)PoolCore_set_idle, METH_O, NULL},
    {"enqueue", (PyCFunction)PoolCore_enqueue, METH_O, NULL},
    {"popleft", (PyCFunction)PoolCore_popleft, METH_NOARGS, NULL},
    {"waiters", (PyCFunction)PoolCore_waiters, METH_NOARGS, NULL},
    {"set_waiters", (PyCFunction)PoolCore_set_waiters, METH_O, NULL},
    {NULL},
};

static PyTypeObject PoolCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "outpost.pooler._engine.PoolCore",
    .tp_basicsize = sizeof(PoolCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PoolCore_new,
    .tp_dealloc = (destructor)PoolCore_dealloc,
    .tp_traverse = (traverseproc)PoolCore_traverse,
    .tp_clear = (inquiry)PoolCore_clear,
    .tp_methods = PoolCore_methods,
    .tp_members = PoolCore_members,
    .tp_getset = PoolCore_getset,
    .tp_doc = "A pool's idle connections, waiting clients and statistics (see pool.Pool).",
};

/* --- Engine: Python methods ------------------------------------------------------------------------ */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"call_soon", NULL};
    PyObject *call_soon;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &call_soon))
        return NULL;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(call_soon);
    self->call_soon = call_soon;
    self->links = PyDict_New();
    self->logins = PyDict_New();
    self->lost = PyList_New(0);
    self->pids = PyDict_New();
    self->no_extra = PyDict_New();
    self->rbuf = PyMem_Malloc(READ_SIZE);
    for (int i = 0; i < MAX_LISTENERS; i++)
        self->listeners[i].fd = -1;
    self->max_clients = LONG_MAX;
    self->client_txn = 1;
    if (self->links == NULL || self->logins == NULL || self->lost == NULL || self->rbuf == NULL ||
        self->pids == NULL || self->no_extra == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->call_soon);
    Py_VISIT(self->links);
    Py_VISIT(self->logins);
    Py_VISIT(self->lost);
    Py_VISIT(self->materialize);
    Py_VISIT(self->accept_error);
    Py_VISIT(self->clients);
    Py_VISIT(self->client_pids);
    Py_VISIT(self->pids);
    Py_VISIT(self->no_extra);
    for (int i = 0; i < MAX_LISTENERS; i++) {
        Py_VISIT(self->listeners[i].local);
        Py_VISIT(self->listeners[i].asked);
    }
    return 0;
}

static int Engine_clear_refs(EngineObject *self) {
    Py_CLEAR(self->call_soon);
    Py_CLEAR(self->links);
    Py_CLEAR(self->logins);
    Py_CLEAR(self->lost);
    Py_CLEAR(self->materialize);
    Py_CLEAR(self->accept_error);
    Py_CLEAR(self->clients);
    Py_CLEAR(self->client_pids);
    Py_CLEAR(self->pids);
    Py_CLEAR(self->no_extra);
    for (int i = 0; i < MAX_LISTENERS; i++) {
        Py_CLEAR(self->listeners[i].local);
        Py_CLEAR(self->listeners[i].asked);
    }
    return 0;
}

static void Engine_dealloc(EngineObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->epfd >= 0)
        close(self->epfd);
    Engine_clear_refs(self);
    PyMem_Free(self->rbuf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_fileno(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->epfd);
}

/* Read what L's socket has and act on it (the caller holds a reference to L). */
static void link_read(EngineObject *engine, LinkObject *l) {
    ssize_t r;
    do {
        r = recv(l->fd, engine->rbuf, READ_SIZE, 0);
    } while (r < 0 && errno == EINTR);
    if (r > 0) {
        if (dispatch(l, engine->rbuf, r) < 0)
            PyErr_WriteUnraisable(l->owner);
    } else if (r == 0) {
        link_finish(l, NULL);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        link_fail(l, errno);
    }
}

/* --- clients the engine accepts (Engine.listen) ---------------------------------------------- */

static double now_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts); /* what time.time() reads */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void listener_drop(EngineObject *e, Listener *ls) {
    if (ls->fd < 0)
        return;
    if (e->epfd >= 0)
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, ls->fd, NULL);
    ls->fd = -1;
    Py_CLEAR(ls->local);
    Py_CLEAR(ls->asked);
}

/* A connection accepted on LS (FD, from ADDR): a client link with no Python session, which
 * reads its startup packet at once (a client sends it with its connect). The engine runs its
 * login when Python remembered the packet (Engine.logins) and max_client_conn allows; else it
 * is materialized now and Python logs it in, as before the engine accepted. */
static int engine_take_client(EngineObject *e, Listener *ls, int fd, struct sockaddr_storage *addr) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    LinkObject *l = link_new(&LinkType, Py_None, 0, e->client_txn);
    if (l == NULL) {
        close(fd);
        return -1;
    }
    int port = 0;
    l->peer_host = address_text(addr, &port);
    l->peer_port = port;
    if (l->peer_host == NULL)
        goto fail;
    if (ls->local != NULL) {
        l->local = Py_NewRef(ls->local);
    } else { /* a wildcard listener: the address this connection came to */
        socklen_t alen = sizeof(*addr);
        int local_port = 0;
        PyObject *host = getsockname(fd, (struct sockaddr *)addr, &alen) == 0
                             ? address_text(addr, &local_port)
                             : PyUnicode_InternFromString("");
        if (host == NULL)
            goto fail;
        PyObject *last = ls->asked;
        if (last != NULL && PyTuple_GET_ITEM(last, 0) == host &&
            PyLong_AsLong(PyTuple_GET_ITEM(last, 1)) == local_port) { /* (hosts are interned) */
            Py_DECREF(host);
            l->local = Py_NewRef(last);
        } else {
            if ((l->local = Py_BuildValue("(Ni)", host, local_port)) == NULL)
                goto fail;
            Py_XSETREF(ls->asked, Py_NewRef(l->local));
        }
    }
    l->connect_time = now_wall();
    l->request_at = now_mono();
    if (link_register(l, e, fd, e->no_extra) < 0)
        goto fail;
    l->unowned = 1;
    e->unowned++;
    if (PyDict_GET_SIZE(e->logins) && PySet_GET_SIZE(e->clients) + e->unowned <= e->max_clients) {
        l->login = LOGIN_STARTUP;
    } else if (link_owner(l) == NULL) {
        link_finish(l, NULL);
        Py_DECREF(l);
        return -1;
    }
    link_read(e, l);
    Py_DECREF(l);
    return 0;
fail:
    close(fd);
    Py_DECREF(l);
    return -1;
}

/* Accept what LS has waiting: at most 64, then the loop does other work (epoll reports the
 * listener again). A failure other than a connection already gone (out of file descriptors,
 * say) drops the listener and tells Python (accept_error), which tries again later. */
static void engine_accept(EngineObject *e, Listener *ls) {
    for (int i = 0; i < 64 && ls->fd >= 0 && e->epfd >= 0; i++) {
        struct sockaddr_storage addr;
        socklen_t alen = sizeof(addr);
        int fd = accept4(ls->fd, (struct sockaddr *)&addr, &alen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
                continue; /* that one is gone: the next */
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            int err = errno, lfd = ls->fd;
            listener_drop(e, ls);
            PyObject *exc = os_error(err), *fdo = PyLong_FromLong(lfd);
            if (e->accept_error != NULL && e->accept_error != Py_None) {
                py_calls++;
                PyObject *r = exc != NULL && fdo != NULL
                                  ? PyObject_CallFunctionObjArgs(e->accept_error, fdo, exc, NULL)
                                  : NULL;
                if (r == NULL)
                    PyErr_WriteUnraisable((PyObject *)e);
                Py_XDECREF(r);
            }
            Py_XDECREF(exc);
            Py_XDECREF(fdo);
            return;
        }
        if (engine_take_client(e, ls, fd, &addr) < 0)
            PyErr_WriteUnraisable((PyObject *)e);
    }
}

static PyObject *Engine_listen(EngineObject *self, PyObject *args) {
    int fd;
    PyObject *local;
    if (!PyArg_ParseTuple(args, "iO", &fd, &local))
        return NULL;
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    if (self->materialize == NULL || self->materialize == Py_None || self->clients == NULL ||
        !PyAnySet_Check(self->clients)) {
        PyErr_SetString(PyExc_RuntimeError, "set Engine.materialize and Engine.clients first");
        return NULL;
    }
    if (local != Py_None && !PyTuple_Check(local)) {
        PyErr_SetString(PyExc_TypeError, "local is a (host, port) tuple or None");
        return NULL;
    }
    Listener *slot = NULL;
    for (int i = 0; i < MAX_LISTENERS; i++) {
        if (self->listeners[i].fd == fd) {
            PyErr_Format(PyExc_RuntimeError, "fd %d is listened on already", fd);
            return NULL;
        }
        if (slot == NULL && self->listeners[i].fd < 0)
            slot = &self->listeners[i];
    }
    if (slot == NULL) {
        PyErr_Format(PyExc_RuntimeError, "at most %d listeners", MAX_LISTENERS);
        return NULL;
    }
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = slot};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &e) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    slot->fd = fd;
    slot->local = local == Py_None ? NULL : Py_NewRef(local);
    Py_RETURN_NONE;
}

static PyObject *Engine_unlisten(EngineObject *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    for (int i = 0; i < MAX_LISTENERS; i++)
        if (self->listeners[i].fd == fd) {
            listener_drop(self, &self->listeners[i]);
            Py_RETURN_TRUE;
        }
    Py_RETURN_FALSE;
}

/* Materialize the client links the engine runs alone: all (CUTOFF < 0), or those logging in
 * since before CUTOFF (monotonic). */
static int materialize_links(EngineObject *self, double cutoff) {
    if (self->unowned == 0)
        return 0;
    PyObject *links = PyDict_Values(self->links);
    if (links == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(links) && rc == 0; i++) {
        LinkObject *l = (LinkObject *)PyList_GET_ITEM(links, i);
        if (!l->unowned || l->closed || (cutoff >= 0 && (!l->login || l->request_at > cutoff)))
            continue;
        if (link_owner(l) == NULL)
            rc = -1;
    }
    Py_DECREF(links);
    return rc;
}

static PyObject *Engine_materialize_all(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    if (materialize_links(self, -1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_materialize_logins(EngineObject *self, PyObject *arg) {
    double cutoff = PyFloat_AsDouble(arg);
    if (cutoff == -1.0 && PyErr_Occurred())
        return NULL;
    if (materialize_links(self, cutoff < 0 ? 0 : cutoff) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Engine_session_of(EngineObject *self, PyObject *pid) {
    PyObject *l = PyDict_GetItemWithError(self->pids, pid);
    if (l == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(l);
    PyObject *owner = link_owner((LinkObject *)l);
    Py_XINCREF(owner);
    Py_DECREF(l);
    return owner;
}

static PyObject *Engine_get_unowned(EngineObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->unowned);
}

/* One round: wait up to TIMEOUT_MS (0: not at all; the GIL is released while waiting) and handle
 * what is ready: links, listeners, and (FOUND not NULL) the asyncio loop's own fds, appended
 * to FOUND as (fd, selectors mask). -1 with an exception; EINTR is a round with nothing. */
static int engine_round(EngineObject *self, int timeout_ms, PyObject *found) {
    struct epoll_event evs[MAX_EVENTS];
    if (self->epfd < 0)
        return 0;
    int n;
    if (timeout_ms == 0) {
        n = epoll_wait(self->epfd, evs, MAX_EVENTS, 0);
    } else {
        Py_BEGIN_ALLOW_THREADS n = epoll_wait(self->epfd, evs, MAX_EVENTS, timeout_ms);
        Py_END_ALLOW_THREADS
    }
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->polling = 1;
    for (int i = 0; i < n; i++) {
        uint64_t tag = evs[i].data.u64;
        if (tag & 1) { /* an fd of the asyncio loop's (Engine.watch) */
            if (found == NULL)
                continue;
            uint32_t ev = evs[i].events;
            int mask = ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) ? 1 : 0) |
                       ((ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) ? 2 : 0);
            PyObject *item = Py_BuildValue("(Ki)", (unsigned long long)(tag >> 1), mask);
            if (item == NULL || PyList_Append(found, item) < 0)
                PyErr_WriteUnraisable((PyObject *)self);
            Py_XDECREF(item);
            continue;
        }
        void *ptr = evs[i].data.ptr;
        if ((char *)ptr >= (char *)self->listeners &&
            (char *)ptr < (char *)(self->listeners + MAX_LISTENERS)) {
            engine_accept(self, (Listener *)ptr);
            continue;
        }
        LinkObject *l = ptr;
        uint32_t ev = evs[i].events;
        Py_INCREF(l);
        if ((ev & EPOLLOUT) && !l->closed)
            flush_out(l);
        if ((ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !l->closed)
            link_read(self, l);
        Py_DECREF(l);
    }
    /* connection_lost for the links closed meanwhile (and for any those calls close) */
    PyObject *lost = self->lost;
    for (Py_ssize_t i = 0; lost != NULL && i < PyList_GET_SIZE(lost); i++) {
        PyObject *entry = Py_NewRef(PyList_GET_ITEM(lost, i));
        PyObject *owner = PyTuple_GET_ITEM(entry, 0);
        py_calls++;
        PyObject *r = PyObject_CallMethodOneArg(owner, s_connection_lost, PyTuple_GET_ITEM(entry, 1));
        if (r == NULL)
            PyErr_WriteUnraisable(owner);
        Py_XDECREF(r);
        Py_DECREF(entry);
    }
    self->polling = 0;
    if (lost != NULL && PyList_GET_SIZE(lost) && PyList_SetSlice(lost, 0, PY_SSIZE_T_MAX, NULL) < 0)
        PyErr_WriteUnraisable((PyObject *)self);
    return n;
}

static PyObject *Engine_poll(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    if (engine_round(self, 0, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Engine.select(timeout): the asyncio selector's select (EngineSelector) on this epoll set.
 * Rounds go on in C, links and listeners handled as they come, until an fd of the loop's is
 * ready, a round called into Python (which may have given the loop work), or TIMEOUT (seconds;
 * negative: none) has passed: one epoll_wait per wake-up, and the loop's Python runs only when
 * it has something to do. */
static PyObject *Engine_select(EngineObject *self, PyObject *arg) {
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    double deadline = timeout < 0 ? -1 : now_mono() + timeout;
    PyObject *found = PyList_New(0);
    if (found == NULL)
        return NULL;
    for (;;) {
        int ms = -1;
        if (deadline >= 0) {
            double left = deadline - now_mono();
            ms = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        }
        unsigned long calls = py_calls;
        int n = engine_round(self, ms, found);
        if (n < 0 || PyErr_CheckSignals() < 0) { /* (a signal's Python handler runs here) */
            Py_DECREF(found);
            return NULL;
        }
        if (PyList_GET_SIZE(found) || py_calls != calls || ms == 0 || n == 0 || self->epfd < 0)
            break; /* (n == 0: the time is up, or a signal came: the loop's to handle) */
    }
    return found;
}

static PyObject *Engine_watch(EngineObject *self, PyObject *args) {
    int fd, mask;
    if (!PyArg_ParseTuple(args, "ii", &fd, &mask))
        return NULL;
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    struct epoll_event e = {.events = ((mask & 1) ? EPOLLIN : 0) | ((mask & 2) ? EPOLLOUT : 0)};
    e.data.u64 = ((uint64_t)fd << 1) | 1;
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
        if (errno != EEXIST || epoll_ctl(self->epfd, EPOLL_CTL_MOD, fd, &e) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_unwatch(EngineObject *self, PyObject *arg) {
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (self->epfd >= 0)
        epoll_ctl(self->epfd, EPOLL_CTL_DEL, (int)fd, NULL); /* (gone already: fine) */
    Py_RETURN_NONE;
}

/* Close every link's socket and stop listening; the epoll set stays (the loop's, when it runs
 * on it: EngineLoop). */
static PyObject *Engine_close_links(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->epfd < 0)
        Py_RETURN_NONE;
    PyObject *links = PyDict_Values(self->links);
    if (links == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(links); i++)
        link_finish((LinkObject *)PyList_GET_ITEM(links, i), NULL);
    Py_DECREF(links);
    for (int i = 0; i < MAX_LISTENERS; i++)
        listener_drop(self, &self->listeners[i]);
    Py_RETURN_NONE;
}

static PyObject *Engine_close(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    if (self->epfd < 0)
        Py_RETURN_NONE;
    PyObject *r = Engine_close_links(self, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    close(self->epfd);
    self->epfd = -1;
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd to watch for reading."},
    {"poll", (PyCFunction)Engine_poll, METH_NOARGS, "Handle the sockets that are ready."},
    {"select", (PyCFunction)Engine_select, METH_O,
     "select(timeout): run rounds until one of the loop's fds is ready (as (fd, mask) pairs), "
     "Python was called, or the time is up."},
    {"watch", (PyCFunction)Engine_watch, METH_VARARGS,
     "watch(fd, mask): add or change an fd of the asyncio loop's (selectors' mask)."},
    {"unwatch", (PyCFunction)Engine_unwatch, METH_O, "Stop watching one of the loop's fds."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Close every socket and the epoll fd."},
    {"close_links", (PyCFunction)Engine_close_links, METH_NOARGS,
     "Close every link's socket and stop listening; keep the epoll fd."},
    {"listen", (PyCFunction)Engine_listen, METH_VARARGS,
     "listen(fd, local): accept the connections of a listening socket (local: their (host, "
     "port), or None to ask each)."},
    {"unlisten", (PyCFunction)Engine_unlisten, METH_O, "Stop accepting on a listening fd."},
    {"materialize_all", (PyCFunction)Engine_materialize_all, METH_NOARGS,
     "Give every client the engine runs alone its Python session."},
    {"materialize_logins", (PyCFunction)Engine_materialize_logins, METH_O,
     "materialize_logins(cutoff): the same for those logging in since before CUTOFF."},
    {"session_of", (PyCFunction)Engine_session_of, METH_O,
     "The session of the client the engine gave this backend pid (made now), or None."},
    {NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"unowned", (getter)Engine_get_unowned, NULL, "clients without a Python session", NULL},
    {NULL},
};

static PyMemberDef Engine_members[] = {
    {"logins", T_OBJECT, offsetof(EngineObject, logins), READONLY,
     "startup packet (bytes) -> (md5 secret hex digits (bytes), valid until (monotonic), info): "
     "logins the engine runs itself; Python adds and forgets them"},
    {"materialize", T_OBJECT, offsetof(EngineObject, materialize), 0,
     "materialize(link): give a client link the engine ran alone its Python owner"},
    {"accept_error", T_OBJECT, offsetof(EngineObject, accept_error), 0,
     "accept_error(fd, OSError): accept failed; the listener was dropped"},
    {"clients", T_OBJECT, offsetof(EngineObject, clients), 0, "Python's set of sessions"},
    {"client_pids", T_OBJECT, offsetof(EngineObject, client_pids), 0,
     "Python's dict of backend pids in use"},
    {"max_clients", T_LONG, offsetof(EngineObject, max_clients), 0, "max_client_conn"},
    {"pid_base", T_LONG, offsetof(EngineObject, pid_base), 0,
     "the top bits of the engine's backend pids"},
    {"client_txn", T_INT, offsetof(EngineObject, client_txn), 0,
     "transaction pooling for the clients it accepts"},
    {NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "outpost.pooler._engine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_traverse = (traverseproc)Engine_traverse,
    .tp_clear = (inquiry)Engine_clear_refs,
    .tp_methods = Engine_methods,
    .tp_members = Engine_members,
    .tp_getset = Engine_getset,
    .tp_doc = "An epoll set of links, polled from the asyncio loop.",
};

static PyObject *py_mentions_keyword(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int r = mentions_keyword(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyBool_FromLong(r);
}

/* The text of ADDR's host as an interned str (PORT set too; "" for another family): the last
 * few are kept, since clients come from a few hosts and inet_ntop formats with sprintf. */
#define HOST_CACHE 8
static struct {
    int family;
    unsigned char raw[16];
    PyObject *text;
} host_cache[HOST_CACHE];
static int host_cache_next;

static PyObject *address_text(struct sockaddr_storage *addr, int *port) {
    const void *raw;
    size_t rlen;
    int family = addr->ss_family;
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)addr;
        raw = &a->sin_addr;
        rlen = 4;
        *port = ntohs(a->sin_port);
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)addr;
        raw = &a->sin6_addr;
        rlen = 16;
        *port = ntohs(a->sin6_port);
    } else {
        *port = 0;
        return PyUnicode_InternFromString("");
    }
    for (int i = 0; i < HOST_CACHE; i++)
        if (host_cache[i].text != NULL && host_cache[i].family == family &&
            memcmp(host_cache[i].raw, raw, rlen) == 0)
            return Py_NewRef(host_cache[i].text);
    char host[INET6_ADDRSTRLEN] = "";
    inet_ntop(family, raw, host, sizeof(host));
    PyObject *text = PyUnicode_InternFromString(host);
    if (text == NULL)
        return NULL;
    int slot = host_cache_next;
    host_cache_next = (slot + 1) % HOST_CACHE;
    Py_XSETREF(host_cache[slot].text, Py_NewRef(text));
    host_cache[slot].family = family;
    memcpy(host_cache[slot].raw, raw, rlen);
    return text;
}

static PyMethodDef module_methods[] = {
    {"mentions_keyword", py_mentions_keyword, METH_O,
     "Whether SQL mentions a word that sends it to Python (the engine's pre-screen)."},
    {NULL},
};

static struct PyModuleDef engine_module = {
    PyModuleDef_HEAD_INIT, "_engine", "The pooler's forwarding engine (see _engine.c).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__engine(void) {
#define INTERN(var, text)                                                                       \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                       \
        return NULL;
    INTERN(s_on_data, "_on_data");
    INTERN(s_engine_message, "_engine_message");
    INTERN(s_engine_terminate, "_engine_terminate");
    INTERN(s_engine_bad_length, "_engine_bad_length");
    INTERN(s_engine_release, "_engine_release");
    INTERN(s_on_ready, "on_ready");
    INTERN(s_engine_param, "_engine_param");
    INTERN(s_unanswered, "_unanswered");
    INTERN(s_connection_lost, "connection_lost");
    INTERN(s_write, "write");
    INTERN(s_engine_login, "_engine_login");
    INTERN(s_engine_scram_login, "_engine_scram_login");
    INTERN(s_hexdigest, "hexdigest");
    INTERN(s_sha256, "sha256");
    INTERN(s_digest, "digest");
    if ((s_usedforsecurity = Py_BuildValue("(s)", "usedforsecurity")) == NULL)
        return NULL;
    PyObject *hashlib = PyImport_ImportModule("hashlib");
    if (hashlib == NULL)
        return NULL;
    md5_new = PyObject_GetAttrString(hashlib, "md5");
    sha256_new = PyObject_GetAttrString(hashlib, "sha256");
    Py_DECREF(hashlib);
    if (md5_new == NULL || sha256_new == NULL)
        return NULL;
    PyObject *hashopenssl = PyImport_ImportModule("_hashlib");
    if (hashopenssl != NULL) {
        hmac_digest = PyObject_GetAttrString(hashopenssl, "hmac_digest");
        Py_DECREF(hashopenssl);
    }
    if (hmac_digest == NULL) { /* (a Python built without OpenSSL's _hashlib) */
        PyErr_Clear();
        PyObject *hmac = PyImport_ImportModule("hmac");
        if (hmac == NULL)
            return NULL;
        hmac_digest = PyObject_GetAttrString(hmac, "digest");
        Py_DECREF(hmac);
    }
    if (hmac_digest == NULL)
        return NULL;
    if (PyType_Ready(&PoolCoreType) < 0 || PyType_Ready(&LinkType) < 0 ||
        PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&engine_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PoolCoreType);
    Py_INCREF(&LinkType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "PoolCore", (PyObject *)&PoolCoreType) < 0 ||
        PyModule_AddObject(m, "Link", (PyObject *)&LinkType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0 ||
        PyModule_AddIntConstant(m, "HIGH_WATER", HIGH_WATER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
