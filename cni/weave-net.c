/*
 * weave-net: the CNI plugin binary of weaved, a small static forwarder.
 *
 * Theory of operation
 * -------------------
 * Kubernetes nodes (kind, minikube, distroless hosts) often have no Python, so the binary the container
 * runtime executes must stand alone. It does as little as possible:
 *
 *   VERSION   answered here (runtimes such as podman call it with dummy CNI_NETNS/CNI_PATH);
 *   others    forwarded to the weaved daemon over a unix stream socket: the CNI_* environment and the
 *             network configuration from stdin go out in one framed request, and the pod's network
 *             namespace, when CNI_NETNS opens, travels as an open file descriptor (SCM_RIGHTS), so the
 *             daemon needs no access to the mount namespace the path lives in. The daemon's answer (exit
 *             status and stdout bytes) is copied out unchanged.
 *
 * When the daemon cannot be reached, ADD/CHECK/GC fail with CNI error 11 ("try again later") and STATUS
 * with 50 ("plugin not available"); DEL records a pending release as a small file named by the container id
 * in the spool directory (written to a temporary name, fsync'd, renamed) and succeeds, so the runtime can
 * proceed; the daemon releases the lease and removes the host veth when it next starts or scans the spool.
 *
 * Wire format (all integers big-endian u32):
 *   request  "WCN1" | env_len | conf_len | has_fd | env bytes (KEY=VALUE\0 ...) | conf bytes
 *            (the netns fd, if has_fd, rides on the first sendmsg)
 *   answer   "WCR1" | exit_status | out_len | out bytes
 *
 * Every size is bounded (MAX_CONF, MAX_ENV, MAX_OUT), every socket operation has a timeout, EINTR and
 * partial reads/writes are handled, and nothing is allocated that is not freed before exit.
 *
 * Build: gcc -static -Os -Wall -Wextra -o build/weave-net cni/weave-net.c   (scripts/build-cni.sh)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONF (1024 * 1024)       /* network configuration on stdin (prevResult included) */
#define MAX_ENV (64 * 1024)          /* the CNI_* variables, framed */
#define MAX_OUT (1024 * 1024)        /* the daemon's answer */
#define MAX_PATH_LEN 4096
#define IO_TIMEOUT_MS 5000           /* connect and send */
#define ANSWER_TIMEOUT_MS 240000     /* ADD may wait for IPAM; kubelet's own CNI timeout is longer */
#define SUPPORTED "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\",\"1.1.0\"]"
#define DEFAULT_SOCKET "/run/weave/cni.sock"
#define DEFAULT_SPOOL "/var/lib/weave/cni-pending"

static const char *FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                  "CNI_ARGS", "CNI_PATH", NULL};

/* --- output -------------------------------------------------------------------------------------- */

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Print a CNI error as JSON on stdout (msg is ASCII we control; details are escaped) and return 1. */
static int cni_error(const char *version, int code, const char *msg, const char *details) {
    char buf[2048];
    char esc[1024];
    size_t j = 0;
    for (const char *p = details ? details : ""; *p && j + 7 < sizeof esc; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            esc[j++] = '\\';
            esc[j++] = (char)c;
        } else if (c < 0x20) {
            j += (size_t)snprintf(esc + j, sizeof esc - j, "\\u%04x", c);
        } else {
            esc[j++] = (char)c;
        }
    }
    esc[j] = '\0';
    int n = snprintf(buf, sizeof buf, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\",\"details\":\"%s\"}\n",
                     version, code, msg, esc);
    if (n > 0) write_all(1, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    return 1;
}

/* --- a minimal JSON reader: top-level string members only ------------------------------------------ */

typedef struct {
    const char *p, *end;
} cursor;

static void skip_ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

/* Read a JSON string at c->p into out (NUL-terminated, at most cap-1 bytes); out may be NULL to skip.
 * \uXXXX escapes are refused for kept strings (paths never need them). Returns 0 on success. */
static int read_string(cursor *c, char *out, size_t cap) {
    size_t n = 0;
    if (c->p >= c->end || *c->p != '"') return -1;
    c->p++;
    while (c->p < c->end && *c->p != '"') {
        char ch = *c->p++;
        if (ch == '\\') {
            if (c->p >= c->end) return -1;
            char e = *c->p++;
            switch (e) {
            case '"': case '\\': case '/': ch = e; break;
            case 'n': ch = '\n'; break;
            case 't': ch = '\t'; break;
            case 'r': ch = '\r'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'u':
                if (c->end - c->p < 4) return -1;
                c->p += 4;
                if (out) return -1;
                continue;
            default: return -1;
            }
        }
        if (out) {
            if (n + 1 >= cap) return -1;
            out[n++] = ch;
        }
    }
    if (c->p >= c->end) return -1;
    c->p++;
    if (out) out[n] = '\0';
    return 0;
}

static int skip_value(cursor *c, int depth) {
    if (depth > 64) return -1;
    skip_ws(c);
    if (c->p >= c->end) return -1;
    char ch = *c->p;
    if (ch == '"') return read_string(c, NULL, 0);
    if (ch == '{' || ch == '[') {
        char close = ch == '{' ? '}' : ']';
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == close) {
            c->p++;
            return 0;
        }
        for (;;) {
            if (ch == '{') {
                skip_ws(c);
                if (read_string(c, NULL, 0) < 0) return -1;
                skip_ws(c);
                if (c->p >= c->end || *c->p != ':') return -1;
                c->p++;
            }
            if (skip_value(c, depth + 1) < 0) return -1;
            skip_ws(c);
            if (c->p >= c->end) return -1;
            if (*c->p == ',') {
                c->p++;
                continue;
            }
            if (*c->p == close) {
                c->p++;
                return 0;
            }
            return -1;
        }
    }
    /* number, true, false, null */
    const char *start = c->p;
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ']' && *c->p != ' ' && *c->p != '\n' &&
           *c->p != '\r' && *c->p != '\t')
        c->p++;
    return c->p > start ? 0 : -1;
}

/* Find the top-level member `key` whose value is a string. Returns 1 found, 0 absent (or not a string),
 * -1 when the document is not a JSON object we can walk. */
static int json_top_string(const char *doc, size_t len, const char *key, char *out, size_t cap) {
    cursor c = {doc, doc + len};
    char name[64];
    int found = 0;
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') return -1;
    c.p++;
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') return 0;
    for (;;) {
        skip_ws(&c);
        cursor save = c;
        if (read_string(&c, name, sizeof name) < 0) {
            c = save;  /* a long or escaped key: not one of ours */
            if (read_string(&c, NULL, 0) < 0) return -1;
            name[0] = '\0';
        }
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':') return -1;
        c.p++;
        skip_ws(&c);
        if (!found && strcmp(name, key) == 0 && c.p < c.end && *c.p == '"') {
            if (read_string(&c, out, cap) < 0) return -1;
            found = 1;
        } else if (skip_value(&c, 1) < 0) {
            return -1;
        }
        skip_ws(&c);
        if (c.p >= c.end) return -1;
        if (*c.p == ',') {
            c.p++;
            continue;
        }
        if (*c.p == '}') return found;
        return -1;
    }
}

/* --- helpers ------------------------------------------------------------------------------------- */

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for `events` on fd until the absolute deadline; 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r > 0) return 1;
    }
}

static int send_all(int fd, const char *buf, size_t len, long long deadline) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (wait_fd(fd, POLLOUT, deadline) != 1) return -1;
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static int recv_all(int fd, char *buf, size_t len, long long deadline) {
    while (len > 0) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n == 0) return -1; /* the daemon closed early */
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (wait_fd(fd, POLLIN, deadline) != 1) return -1;
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void put_u32(char *p, uint32_t v) {
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static uint32_t get_u32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | (uint32_t)u[3];
}

/* Read all of stdin up to MAX_CONF bytes; returns length or -1 (too large or read error). */
static ssize_t read_stdin(char *buf, size_t cap) {
    size_t n = 0;
    for (;;) {
        if (n == cap) {
            char extra;
            ssize_t r = read(0, &extra, 1);
            if (r < 0 && errno == EINTR) continue;
            return r == 0 ? (ssize_t)n : -1;
        }
        ssize_t r = read(0, buf + n, cap - n);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) return (ssize_t)n;
        n += (size_t)r;
    }
}

/* The container id names the spool file: CNI allows [A-Za-z0-9_.-], we also refuse a leading dot. */
static int valid_container_id(const char *id) {
    size_t n = strlen(id);
    if (n == 0 || n > 200 || id[0] == '.') return 0;
    for (const char *p = id; *p; p++) {
        char ch = *p;
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
              ch == '.' || ch == '-'))
            return 0;
    }
    return 1;
}

static int mkdir_p(const char *path) {
    char tmp[MAX_PATH_LEN];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp) return -1;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0755) < 0 && errno != EEXIST) return -1;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0755) < 0 && errno != EEXIST) return -1;
    return 0;
}

/* Record a release the daemon could not take now: SPOOL/<container id>, atomically. */
static int spool_release(const char *spool, const char *cid, const char *ifname, const char *netns) {
    char path[MAX_PATH_LEN], tmp[MAX_PATH_LEN], body[1024];
    if (mkdir_p(spool) < 0) return -1;
    int n1 = snprintf(path, sizeof path, "%s/%s", spool, cid);
    int n2 = snprintf(tmp, sizeof tmp, "%s/.%s.%ld.tmp", spool, cid, (long)getpid());
    int nb = snprintf(body, sizeof body, "container=%s\nifname=%s\nnetns=%.512s\n", cid, ifname, netns);
    if (n1 < 0 || n2 < 0 || nb < 0 || (size_t)n1 >= sizeof path || (size_t)n2 >= sizeof tmp ||
        (size_t)nb >= sizeof body)
        return -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) return -1;
    if (write_all(fd, body, (size_t)nb) < 0 || fsync(fd) < 0) {
        close(fd);
        unlink(tmp);
        return -1;
    }
    if (close(fd) < 0 || rename(tmp, path) < 0) {
        unlink(tmp);
        return -1;
    }
    int dfd = open(spool, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

/* Connect to the daemon within IO_TIMEOUT_MS; returns the socket or -1 (errno set). */
static int connect_daemon(const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(addr.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    long long deadline = now_ms() + IO_TIMEOUT_MS;
    for (;;) {
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0) return fd;
        if (errno == EINTR) continue;
        if (errno == EAGAIN) { /* backlog full: retry until the deadline */
            if (now_ms() >= deadline) break;
            struct timespec ts = {0, 20 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (errno == EINPROGRESS) {
            int err = 0;
            socklen_t len = sizeof err;
            if (wait_fd(fd, POLLOUT, deadline) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
                err == 0)
                return fd;
            errno = err ? err : ETIMEDOUT;
        }
        break;
    }
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* Append KEY=VALUE\0 for every forwarded variable that is set. Returns length or -1 when too large. */
static ssize_t frame_env(char *buf, size_t cap) {
    size_t n = 0;
    for (const char **k = FORWARDED; *k; k++) {
        const char *v = getenv(*k);
        if (!v) continue;
        size_t need = strlen(*k) + 1 + strlen(v) + 1;
        if (need > cap - n) return -1;
        n += (size_t)snprintf(buf + n, cap - n, "%s=%s", *k, v) + 1;
    }
    return (ssize_t)n;
}

/* --- main ---------------------------------------------------------------------------------------- */

int main(void) {
    static char conf[MAX_CONF];
    static char env[MAX_ENV];
    char version[32] = "1.1.0", sock_path[MAX_PATH_LEN] = DEFAULT_SOCKET, spool[MAX_PATH_LEN] = DEFAULT_SPOOL;
    const char *cmd = getenv("CNI_COMMAND");

    ssize_t conf_len = read_stdin(conf, sizeof conf);
    if (conf_len < 0) return cni_error(version, 6, "cannot read the network configuration", "stdin over 1 MiB");
    if (conf_len > 0) {
        char v[32];
        /* echoed into error JSON unescaped: only digits and dots are taken */
        if (json_top_string(conf, (size_t)conf_len, "cniVersion", v, sizeof v) == 1 && v[0] &&
            strspn(v, "0123456789.") == strlen(v))
            memcpy(version, v, sizeof v);
    }
    if (!cmd || !*cmd) return cni_error(version, 4, "CNI_COMMAND is not set", "");

    if (strcmp(cmd, "VERSION") == 0) {
        char out[256];
        int n = snprintf(out, sizeof out, "{\"cniVersion\":\"1.1.0\",\"supportedVersions\":%s}\n", SUPPORTED);
        return write_all(1, out, (size_t)n) == 0 ? 0 : 1;
    }
    if (conf_len > 0) {
        int r = json_top_string(conf, (size_t)conf_len, "daemonSocket", sock_path, sizeof sock_path);
        if (r < 0) return cni_error(version, 6, "cannot decode the network configuration", "not a JSON object");
        if (r == 0) memcpy(sock_path, DEFAULT_SOCKET, sizeof DEFAULT_SOCKET);
        r = json_top_string(conf, (size_t)conf_len, "spoolDir", spool, sizeof spool);
        if (r <= 0) memcpy(spool, DEFAULT_SPOOL, sizeof DEFAULT_SPOOL);
    }

    ssize_t env_len = frame_env(env, sizeof env);
    if (env_len < 0) return cni_error(version, 4, "CNI environment too large", "over 64 KiB");

    int netns_fd = -1;
    const char *netns = getenv("CNI_NETNS");
    if (netns && *netns && strcmp(cmd, "STATUS") != 0 && strcmp(cmd, "GC") != 0)
        netns_fd = open(netns, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY); /* a FIFO must not block us */

    int sock = connect_daemon(sock_path);
    if (sock < 0) {
        char why[MAX_PATH_LEN + 128];
        snprintf(why, sizeof why, "cannot connect to %.4000s: %s", sock_path, strerror(errno));
        if (netns_fd >= 0) close(netns_fd);
        if (strcmp(cmd, "DEL") == 0) {
            const char *cid = getenv("CNI_CONTAINERID");
            const char *ifname = getenv("CNI_IFNAME");
            if (!cid || !valid_container_id(cid))
                return cni_error(version, 4, "CNI_CONTAINERID missing or invalid", why);
            if (spool_release(spool, cid, ifname ? ifname : "", netns ? netns : "") < 0) {
                char err[MAX_PATH_LEN + 128];
                snprintf(err, sizeof err, "weaved is down and %.4000s is not writable: %s", spool, strerror(errno));
                return cni_error(version, 5, "cannot record the pending release", err);
            }
            fprintf(stderr, "weave-net: weaved unreachable (%s); release of %s recorded in %s\n", why, cid, spool);
            return 0;
        }
        if (strcmp(cmd, "STATUS") == 0) return cni_error(version, 50, "weaved is not running", why);
        return cni_error(version, 11, "weaved is not running: try again later", why);
    }

    /* request header + env + conf; the netns fd rides on the header */
    char head[16];
    memcpy(head, "WCN1", 4);
    put_u32(head + 4, (uint32_t)env_len);
    put_u32(head + 8, (uint32_t)conf_len);
    put_u32(head + 12, netns_fd >= 0 ? 1u : 0u);
    long long deadline = now_ms() + IO_TIMEOUT_MS;
    struct iovec iov = {head, sizeof head};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    memset(&ctl, 0, sizeof ctl);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (netns_fd >= 0) {
        msg.msg_control = ctl.buf;
        msg.msg_controllen = sizeof ctl.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &netns_fd, sizeof(int));
    }
    ssize_t sent;
    for (;;) {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(sock, POLLOUT, deadline) == 1) continue;
        break;
    }
    if (netns_fd >= 0) close(netns_fd);
    int ok = sent > 0 && send_all(sock, head + sent, sizeof head - (size_t)sent, deadline) == 0 &&
             send_all(sock, env, (size_t)env_len, deadline) == 0 &&
             send_all(sock, conf, (size_t)conf_len, deadline) == 0;
    if (!ok) {
        close(sock);
        return cni_error(version, 11, "weaved did not take the request: try again later", strerror(errno));
    }
    shutdown(sock, SHUT_WR);

    char ans[12];
    deadline = now_ms() + ANSWER_TIMEOUT_MS;
    if (recv_all(sock, ans, sizeof ans, deadline) < 0 || memcmp(ans, "WCR1", 4) != 0) {
        close(sock);
        return cni_error(version, 11, "weaved gave no answer: try again later", "no complete answer in time");
    }
    uint32_t status = get_u32(ans + 4), out_len = get_u32(ans + 8);
    if (out_len > MAX_OUT) {
        close(sock);
        return cni_error(version, 5, "weaved answer too large", "over 1 MiB");
    }
    char *out = malloc(out_len ? out_len : 1);
    if (!out) {
        close(sock);
        return cni_error(version, 5, "out of memory", "");
    }
    if (recv_all(sock, out, out_len, deadline) < 0) {
        free(out);
        close(sock);
        return cni_error(version, 11, "weaved answer cut short: try again later", "");
    }
    close(sock);
    int wr = write_all(1, out, out_len);
    free(out);
    if (wr < 0) return 1;
    return status > 255 ? 1 : (int)status;
}
