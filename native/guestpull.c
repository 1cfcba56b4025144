/*
 * guestpull_native: the few Linux system calls Node has no API for, as a plain C Node-API addon.
 *
 *   mknod(path, type, mode, major, minor)   device nodes and FIFOs (overlay whiteouts: char 0:0)
 *   lsetxattr / lgetxattr / llistxattr /     extended attributes, never following a final symlink
 *   lremovexattr
 *   mount(source, target, fstype, flags, data) / umount(target, flags)
 *
 * Every call is synchronous and thin: no policy here, the TypeScript side (src/native/index.ts)
 * decides what may be called with what. A failing call throws an Error with `errno` (a positive
 * number), `syscall` and `path`; the TypeScript wrapper adds the errno name as `code`.
 *
 * Strings arrive as UTF-8; a string containing NUL is refused (EINVAL) instead of being cut short,
 * so a path can never silently name a different file than the caller meant.
 *
 * Also streaming gunzip through Intel ISA-L (igzip), about 1.5 times as fast as zlib's inflate:
 *
 *   gunzipStatus()                     "" when libisal.so.2 loads, else why not
 *   gunzipOpen()                       a handle: one gzip stream's inflate state (members in sequence)
 *   gunzipRun(handle, input, output)   Promise<{consumed, produced, memberEnd, ended, code}>, run on
 *                                      the libuv thread pool; one run at a time per handle
 *   gunzipClose(handle)                frees the state (after the running call, if there is one)
 *   gunzipHash(handle, bytes)          Promise<number>: adds `bytes` to the digest (gunzipOpen("sha256"|
 *                                      "sha512")) on the pool thread, beside the next run; in order,
 *                                      one at a time per handle
 *   gunzipDigest(handle)               the digest of every byte hashed, once
 *
 * libisal.so.2 is dlopen'ed at first use, not linked, so the addon (mknod, xattrs, mount) still
 * loads on a system without it; <isa-l/igzip_lib.h> only gives the struct and constants.
 * The digest is OpenSSL's EVP (SHA-NI where the CPU has it), the copy Node itself carries and
 * exports to addons (its headers come with Node's): the diff_id hash, about a quarter of the
 * JavaScript thread's time, moves to the pool, where it runs beside the next inflate (hashing in
 * the inflate's own job made one layer's pool thread the slowest step: 2.3 -> 3.0 s for 700 MB).
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <dlfcn.h>
#include <errno.h>
#include <isa-l/igzip_lib.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>

#define CHECK(env, call)                                                     \
  do {                                                                       \
    if ((call) != napi_ok) {                                                 \
      throw_last(env);                                                       \
      return NULL;                                                           \
    }                                                                        \
  } while (0)

/* Rethrow whatever Node-API reported, unless an exception is already pending. */
static void throw_last(napi_env env) {
  bool pending = false;
  napi_is_exception_pending(env, &pending);
  if (pending) return;
  const napi_extended_error_info *info = NULL;
  napi_get_last_error_info(env, &info);
  napi_throw_error(env, "EINVAL", info && info->error_message ? info->error_message : "Node-API call failed");
}

static void set_string(napi_env env, napi_value obj, const char *key, const char *value) {
  napi_value v;
  if (napi_create_string_utf8(env, value, NAPI_AUTO_LENGTH, &v) == napi_ok) napi_set_named_property(env, obj, key, v);
}

/* Throw an Error for a failed system call: message "<syscall> <path>: <strerror>", plus errno/syscall/path. */
static void throw_errno(napi_env env, int err, const char *syscall, const char *path) {
  char msg[512];
  snprintf(msg, sizeof msg, "%s %s: %s", syscall, path ? path : "", strerror(err));
  napi_value text, error, num;
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text) != napi_ok) return;
  if (napi_create_error(env, NULL, text, &error) != napi_ok) return;
  if (napi_create_int32(env, err, &num) == napi_ok) napi_set_named_property(env, error, "errno", num);
  set_string(env, error, "syscall", syscall);
  if (path) set_string(env, error, "path", path);
  napi_throw(env, error);
}

/* Throw a TypeError with code EINVAL (bad argument from the caller). */
static void throw_arg(napi_env env, const char *msg) {
  napi_throw_type_error(env, "EINVAL", msg);
}

/* A string argument as a malloc'd NUL-terminated UTF-8 copy; NULL (with an exception) on failure. */
static char *get_string(napi_env env, napi_value v, const char *what) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_string) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a string", what);
    throw_arg(env, msg);
    return NULL;
  }
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) {
    throw_last(env);
    return NULL;
  }
  char *buf = malloc(len + 1);
  if (!buf) {
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  size_t got = 0;
  if (napi_get_value_string_utf8(env, v, buf, len + 1, &got) != napi_ok) {
    free(buf);
    throw_last(env);
    return NULL;
  }
  if (got != len || strlen(buf) != len) {
    free(buf);
    char msg[128];
    snprintf(msg, sizeof msg, "%s must not contain NUL characters", what);
    throw_arg(env, msg);
    return NULL;
  }
  return buf;
}

/* A number argument as a uint32; false (with an exception) unless it is an integer in range. */
static bool get_u32(napi_env env, napi_value v, const char *what, uint32_t *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number || napi_get_value_double(env, v, &d) != napi_ok ||
      d != (double)(uint32_t)d) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be an integer from 0 to 4294967295", what);
    throw_arg(env, msg);
    return false;
  }
  *out = (uint32_t)d;
  return true;
}

static bool get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_last(env);
    return false;
  }
  if (argc < want) {
    throw_arg(env, "missing arguments");
    return false;
  }
  return true;
}

/* mknod(path: string, type: 'char' | 'block' | 'fifo', mode: number, major: number, minor: number): void */
static napi_value Mknod(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv)) return NULL;
  char *path = get_string(env, argv[0], "path");
  if (!path) return NULL;
  char *type = get_string(env, argv[1], "type");
  uint32_t mode = 0, major = 0, minor = 0;
  if (!type || !get_u32(env, argv[2], "mode", &mode) || !get_u32(env, argv[3], "major", &major) ||
      !get_u32(env, argv[4], "minor", &minor)) {
    free(path);
    free(type);
    return NULL;
  }
  mode_t kind;
  if (strcmp(type, "char") == 0) kind = S_IFCHR;
  else if (strcmp(type, "block") == 0) kind = S_IFBLK;
  else if (strcmp(type, "fifo") == 0) kind = S_IFIFO;
  else {
    free(path);
    free(type);
    throw_arg(env, "type must be 'char', 'block' or 'fifo'");
    return NULL;
  }
  free(type);
  if (mode > 07777) {
    free(path);
    throw_arg(env, "mode must be permission bits only (at most 0o7777)");
    return NULL;
  }
  if (mknod(path, kind | (mode_t)mode, makedev(major, minor)) != 0) throw_errno(env, errno, "mknod", path);
  free(path);
  return NULL;
}

/* lsetxattr(path: string, name: string, value: Buffer): void */
static napi_value Lsetxattr(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!get_args(env, info, 3, argv)) return NULL;
  bool isbuf = false;
  void *data = NULL;
  size_t len = 0;
  if (napi_is_buffer(env, argv[2], &isbuf) != napi_ok || !isbuf ||
      napi_get_buffer_info(env, argv[2], &data, &len) != napi_ok) {
    throw_arg(env, "value must be a Buffer");
    return NULL;
  }
  char *path = get_string(env, argv[0], "path");
  if (!path) return NULL;
  char *name = get_string(env, argv[1], "name");
  if (!name) {
    free(path);
    return NULL;
  }
  if (lsetxattr(path, name, len ? data : "", len, 0) != 0) throw_errno(env, errno, "lsetxattr", path);
  free(name);
  free(path);
  return NULL;
}

/* lgetxattr(path: string, name: string): Buffer | undefined (undefined when the attribute is absent) */
static napi_value Lgetxattr(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  char *path = get_string(env, argv[0], "path");
  if (!path) return NULL;
  char *name = get_string(env, argv[1], "name");
  if (!name) {
    free(path);
    return NULL;
  }
  napi_value result = NULL;
  for (int attempt = 0; attempt < 8; attempt++) {
    ssize_t size = lgetxattr(path, name, NULL, 0);
    if (size < 0) {
      if (errno == ENODATA) napi_get_undefined(env, &result);
      else throw_errno(env, errno, "lgetxattr", path);
      break;
    }
    char *buf = malloc(size > 0 ? (size_t)size : 1);
    if (!buf) {
      napi_throw_error(env, "ENOMEM", "out of memory");
      break;
    }
    ssize_t got = lgetxattr(path, name, buf, (size_t)size);
    if (got < 0) {
      int err = errno;
      free(buf);
      if (err == ERANGE) continue; /* grew between the two calls */
      if (err == ENODATA) napi_get_undefined(env, &result);
      else throw_errno(env, err, "lgetxattr", path);
      break;
    }
    void *copy = NULL;
    if (napi_create_buffer_copy(env, (size_t)got, buf, &copy, &result) != napi_ok) {
      result = NULL;
      throw_last(env);
    }
    free(buf);
    break;
  }
  if (result == NULL) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (!pending) throw_errno(env, ERANGE, "lgetxattr", path);
  }
  free(name);
  free(path);
  return result;
}

/* llistxattr(path: string): string[] */
static napi_value Llistxattr(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  char *path = get_string(env, argv[0], "path");
  if (!path) return NULL;
  napi_value result = NULL;
  for (int attempt = 0; attempt < 8; attempt++) {
    ssize_t size = llistxattr(path, NULL, 0);
    if (size < 0) {
      throw_errno(env, errno, "llistxattr", path);
      break;
    }
    char *buf = malloc(size > 0 ? (size_t)size : 1);
    if (!buf) {
      napi_throw_error(env, "ENOMEM", "out of memory");
      break;
    }
    ssize_t got = llistxattr(path, buf, (size_t)size);
    if (got < 0) {
      int err = errno;
      free(buf);
      if (err == ERANGE) continue;
      throw_errno(env, err, "llistxattr", path);
      break;
    }
    if (napi_create_array(env, &result) != napi_ok) {
      free(buf);
      result = NULL;
      throw_last(env);
      break;
    }
    uint32_t n = 0;
    for (ssize_t at = 0; at < got;) {
      size_t l = strnlen(buf + at, (size_t)(got - at));
      napi_value s;
      if (l > 0 && napi_create_string_utf8(env, buf + at, l, &s) == napi_ok) napi_set_element(env, result, n++, s);
      at += (ssize_t)l + 1;
    }
    free(buf);
    break;
  }
  if (result == NULL) {
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (!pending) throw_errno(env, ERANGE, "llistxattr", path);
  }
  free(path);
  return result;
}

/* lremovexattr(path: string, name: string): void (throws ENODATA when `path` does not have it) */
static napi_value Lremovexattr(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  char *path = get_string(env, argv[0], "path");
  if (!path) return NULL;
  char *name = get_string(env, argv[1], "name");
  if (!name) {
    free(path);
    return NULL;
  }
  if (lremovexattr(path, name) != 0) throw_errno(env, errno, "lremovexattr", path);
  free(name);
  free(path);
  return NULL;
}

/* mount(source: string, target: string, fstype: string, flags: number, data: string): void ("" data → NULL) */
static napi_value Mount(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  if (!get_args(env, info, 5, argv)) return NULL;
  char *source = get_string(env, argv[0], "source");
  char *target = source ? get_string(env, argv[1], "target") : NULL;
  char *fstype = target ? get_string(env, argv[2], "fstype") : NULL;
  uint32_t flags = 0;
  char *data = NULL;
  if (fstype && get_u32(env, argv[3], "flags", &flags)) data = get_string(env, argv[4], "data");
  if (data) {
    if (mount(source, target, fstype, (unsigned long)flags, data[0] ? data : NULL) != 0) {
      throw_errno(env, errno, "mount", target);
    }
  }
  free(source);
  free(target);
  free(fstype);
  free(data);
  return NULL;
}

/* umount(target: string, flags: number): void */
static napi_value Umount(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  char *target = get_string(env, argv[0], "target");
  if (!target) return NULL;
  uint32_t flags = 0;
  if (get_u32(env, argv[1], "flags", &flags) && umount2(target, (int)flags) != 0) {
    throw_errno(env, errno, "umount2", target);
  }
  free(target);
  return NULL;
}

/* ---- gunzip through ISA-L ---------------------------------------------------------------------- */

/* The ISA-L entry points, resolved once per process (any thread, any worker) by isal_load. */
static struct {
  void (*init)(struct inflate_state *);
  void (*reset)(struct inflate_state *); /* optional: re-init does the same for our use */
  int (*inflate)(struct inflate_state *);
  char error[256]; /* why the library is unusable; "" when it loaded */
} isal;
static pthread_once_t isal_once = PTHREAD_ONCE_INIT;

static void isal_load(void) {
  void *lib = dlopen("libisal.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char *why = dlerror();
    snprintf(isal.error, sizeof isal.error, "%s", why ? why : "dlopen libisal.so.2 failed");
    return;
  }
  /* POSIX: a function pointer is stored through a void * (dlsym cannot return a function pointer type). */
  *(void **)&isal.init = dlsym(lib, "isal_inflate_init");
  *(void **)&isal.reset = dlsym(lib, "isal_inflate_reset");
  *(void **)&isal.inflate = dlsym(lib, "isal_inflate");
  if (!isal.init || !isal.inflate) {
    snprintf(isal.error, sizeof isal.error, "libisal.so.2 has no isal_inflate_init / isal_inflate");
    isal.init = NULL;
    isal.inflate = NULL;
    dlclose(lib);
  }
}

static bool isal_ready(void) {
  pthread_once(&isal_once, isal_load);
  return isal.inflate != NULL;
}

/* Errors of our own gzip header parser, beside ISA-L's (ISAL_INVALID_WRAPPER, ISAL_UNSUPPORTED_METHOD). */
#define GZ_RESERVED_FLAGS -101 /* FLG bits 5-7 set (zlib refuses them too) */
#define GZ_HEADER_CRC -102     /* FHCRC does not match the header */
#define GZ_DIGEST_FAILED -103  /* OpenSSL could not hash the output */

/*
 * Where in a member's header we are. ISA-L parses the header itself with ISAL_GZIP, but loses its
 * place when the header is split across isal_inflate calls (it re-initialises its header record on
 * every call: FEXTRA/FNAME/FCOMMENT/FHCRC then go wrong, seen with 2.30 and still so in 2.32), so
 * the header (RFC 1952 2.3) is read here and ISA-L gets the deflate data with ISAL_GZIP_NO_HDR_VER,
 * which still verifies the CRC-32 and ISIZE trailer.
 */
enum { HDR_FIXED, HDR_XLEN, HDR_EXTRA, HDR_NAME, HDR_COMMENT, HDR_HCRC, HDR_BODY };
#define FLG_FHCRC 0x02
#define FLG_FEXTRA 0x04
#define FLG_FNAME 0x08
#define FLG_FCOMMENT 0x10
#define FLG_RESERVED 0xe0

/*
 * One gzip stream. Members are read one after another, as zlib's gunzip in Node does: after a
 * member's trailer, a zero byte ends the data (whatever follows is not looked at: padding),
 * anything else must start the next member. `busy` is set while a run is queued or running; the
 * fields are only touched by that run's execute (pool thread) or by the JS thread while not busy.
 */
typedef struct {
  struct inflate_state *state; /* NULL once closed */
  bool busy;
  bool closed;  /* gunzipClose was called; a running call frees the state when it completes */
  bool between; /* a member has ended and the next has not begun */
  bool ended;   /* a zero byte followed a member: the gzip data is over */
  bool orphaned; /* finalized while busy or hashing: the last completion frees the handle too */
  bool hashing;  /* a gunzipHash work is queued or running (it only touches `md`) */
  int failed;   /* the first error; the state is unusable after it */
  int hdr;      /* HDR_*: the header field being read, HDR_BODY in the deflate data and trailer */
  uint8_t flags;
  uint8_t field[10]; /* the fixed-size field being read (10-byte base, XLEN, CRC16) */
  uint32_t got;      /* bytes of it so far */
  uint32_t extra;    /* FEXTRA bytes left */
  uint32_t hcrc;     /* CRC-32 of the header bytes so far */
  EVP_MD_CTX *md;    /* digest of the output, or NULL */
  bool md_final;     /* gunzipDigest was called */
} Gunzip;

/* CRC-32 (RFC 1952), bitwise: only ever run over header bytes. */
static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n) {
  crc = ~crc;
  while (n--) {
    crc ^= *p++;
    for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

/* The header field after `after`, given the member's flags. */
static int next_field(uint8_t flags, int after) {
  if (after < HDR_XLEN && (flags & FLG_FEXTRA)) return HDR_XLEN;
  if (after < HDR_EXTRA && (flags & FLG_FEXTRA)) return HDR_EXTRA;
  if (after < HDR_NAME && (flags & FLG_FNAME)) return HDR_NAME;
  if (after < HDR_COMMENT && (flags & FLG_FCOMMENT)) return HDR_COMMENT;
  if (after < HDR_HCRC && (flags & FLG_FHCRC)) return HDR_HCRC;
  return HDR_BODY;
}

/* Read header bytes from s->next_in: 0 when the header is complete, 1 when it needs more input, or an error. */
static int read_header(Gunzip *g, struct inflate_state *s) {
  while (g->hdr != HDR_BODY) {
    if (s->avail_in == 0) return 1;
    if (g->hdr == HDR_FIXED || g->hdr == HDR_XLEN || g->hdr == HDR_HCRC) {
      uint32_t size = g->hdr == HDR_FIXED ? 10 : 2;
      while (g->got < size && s->avail_in > 0) {
        g->field[g->got++] = *s->next_in++;
        s->avail_in--;
      }
      if (g->got < size) return 1;
      g->got = 0;
      if (g->hdr == HDR_FIXED) {
        if (g->field[0] != 0x1f || g->field[1] != 0x8b) return ISAL_INVALID_WRAPPER;
        if (g->field[2] != 8) return ISAL_UNSUPPORTED_METHOD;
        if (g->field[3] & FLG_RESERVED) return GZ_RESERVED_FLAGS;
        g->flags = g->field[3];
        g->hcrc = crc32_update(0, g->field, 10);
      } else if (g->hdr == HDR_XLEN) {
        g->extra = (uint32_t)g->field[0] | ((uint32_t)g->field[1] << 8);
        g->hcrc = crc32_update(g->hcrc, g->field, 2);
      } else if (((uint32_t)g->field[0] | ((uint32_t)g->field[1] << 8)) != (g->hcrc & 0xffffu)) {
        return GZ_HEADER_CRC;
      }
      g->hdr = next_field(g->flags, g->hdr);
    } else if (g->hdr == HDR_EXTRA) {
      uint32_t n = g->extra < s->avail_in ? g->extra : s->avail_in;
      g->hcrc = crc32_update(g->hcrc, s->next_in, n);
      s->next_in += n;
      s->avail_in -= n;
      g->extra -= n;
      if (g->extra == 0) g->hdr = next_field(g->flags, HDR_EXTRA);
    } else { /* HDR_NAME, HDR_COMMENT: up to and including a NUL */
      const uint8_t *nul = memchr(s->next_in, 0, s->avail_in);
      uint32_t n = nul ? (uint32_t)(nul - s->next_in) + 1 : s->avail_in;
      g->hcrc = crc32_update(g->hcrc, s->next_in, n);
      s->next_in += n;
      s->avail_in -= n;
      if (nul) g->hdr = next_field(g->flags, g->hdr);
    }
  }
  return 0;
}

/* A fresh ISA-L state for a member's deflate data (after its header), keeping the buffers. */
static void start_body(struct inflate_state *s) {
  uint8_t *next_in = s->next_in, *next_out = s->next_out;
  uint32_t avail_in = s->avail_in, avail_out = s->avail_out;
  if (isal.reset) isal.reset(s);
  else isal.init(s);
  s->crc_flag = ISAL_GZIP_NO_HDR_VER; /* verify the CRC-32 and ISIZE that follow the deflate data */
  s->next_in = next_in;
  s->avail_in = avail_in;
  s->next_out = next_out;
  s->avail_out = avail_out;
}

static const napi_type_tag GUNZIP_TAG = {0x6775657374707566ULL, 0x6c6c2d67756e7a69ULL};

typedef struct {
  Gunzip *g;
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep[3]; /* the handle, the input and the output stay alive while the work runs */
  uint8_t *in;
  uint8_t *out;
  uint32_t in_len, out_len, consumed, produced;
  int code;
  bool member_end, ended;
  bool hash; /* a gunzipHash work: `in` is the data, no output */
} GunzipWork;

static void gunzip_free_state(Gunzip *g) {
  free(g->state);
  g->state = NULL;
  EVP_MD_CTX_free(g->md);
  g->md = NULL;
}

static void gunzip_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  Gunzip *g = data;
  /* A running work holds a reference to the handle, but an environment being torn down may
   * finalize it anyway: then the work's completion frees it (or, if that never comes, it leaks). */
  if (g->busy || g->hashing) {
    g->closed = true;
    g->orphaned = true;
    return;
  }
  gunzip_free_state(g);
  free(g);
}

/* gunzipStatus(): "" when ISA-L is usable, else the reason (dlopen's message). */
static napi_value GunzipStatus(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value v;
  CHECK(env, napi_create_string_utf8(env, isal_ready() ? "" : isal.error, NAPI_AUTO_LENGTH, &v));
  return v;
}

/* gunzipOpen(digest?: "sha256" | "sha512"): a new handle (an external) for one gzip stream. */
static napi_value GunzipOpen(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value arg = NULL;
  CHECK(env, napi_get_cb_info(env, info, &argc, &arg, NULL, NULL));
  const EVP_MD *md = NULL;
  if (argc >= 1) {
    napi_valuetype t;
    CHECK(env, napi_typeof(env, arg, &t));
    if (t != napi_undefined) {
      char name[16];
      size_t n = 0;
      if (t != napi_string || napi_get_value_string_utf8(env, arg, name, sizeof name, &n) != napi_ok) {
        throw_arg(env, "digest must be \"sha256\" or \"sha512\"");
        return NULL;
      }
      if (strcmp(name, "sha256") == 0) md = EVP_sha256();
      else if (strcmp(name, "sha512") == 0) md = EVP_sha512();
      else {
        throw_arg(env, "digest must be \"sha256\" or \"sha512\"");
        return NULL;
      }
    }
  }
  if (!isal_ready()) {
    char msg[320];
    snprintf(msg, sizeof msg, "ISA-L is not available: %s", isal.error);
    napi_throw_error(env, "ENOENT", msg);
    return NULL;
  }
  Gunzip *g = calloc(1, sizeof *g);
  struct inflate_state *s = g ? malloc(sizeof *s) : NULL;
  if (!s) {
    free(g);
    napi_throw_error(env, "ENOMEM", "out of memory");
    return NULL;
  }
  if (md) {
    g->md = EVP_MD_CTX_new();
    if (!g->md || EVP_DigestInit_ex(g->md, md, NULL) != 1) {
      EVP_MD_CTX_free(g->md);
      free(s);
      free(g);
      napi_throw_error(env, "ENOMEM", "cannot start the digest (OpenSSL EVP)");
      return NULL;
    }
  }
  isal.init(s);
  g->state = s;
  g->hdr = HDR_FIXED;
  napi_value handle;
  if (napi_create_external(env, g, gunzip_finalize, NULL, &handle) != napi_ok) {
    free(s);
    free(g);
    throw_last(env);
    return NULL;
  }
  CHECK(env, napi_type_tag_object(env, handle, &GUNZIP_TAG));
  return handle;
}

static Gunzip *get_gunzip(napi_env env, napi_value v) {
  bool tagged = false;
  void *data = NULL;
  if (napi_check_object_type_tag(env, v, &GUNZIP_TAG, &tagged) != napi_ok || !tagged ||
      napi_get_value_external(env, v, &data) != napi_ok) {
    throw_arg(env, "handle must come from gunzipOpen()");
    return NULL;
  }
  return data;
}

/* Per call; also keeps ISA-L < 2.32 clear of its tmp_in_buffer overrun when avail_in nears 4 GiB. */
#define GUNZIP_MAX_BUFFER (1u << 30)

static bool get_bytes(napi_env env, napi_value v, const char *what, uint8_t **data, uint32_t *len) {
  bool is = false;
  napi_typedarray_type type;
  size_t n = 0;
  void *p = NULL;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is ||
      napi_get_typedarray_info(env, v, &type, &n, &p, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be a Buffer or Uint8Array", what);
    throw_arg(env, msg);
    return false;
  }
  if (n > GUNZIP_MAX_BUFFER) {
    char msg[128];
    snprintf(msg, sizeof msg, "%s must be at most 1 GiB", what);
    throw_arg(env, msg);
    return false;
  }
  *data = p;
  *len = (uint32_t)n;
  return true;
}

/* On a pool thread: inflate as much of the input as fits into the output, across member ends. */
static void gunzip_execute(napi_env env, void *data) {
  (void)env;
  GunzipWork *w = data;
  Gunzip *g = w->g;
  if (w->hash) {
    w->code = EVP_DigestUpdate(g->md, w->in, w->in_len) == 1 ? 0 : GZ_DIGEST_FAILED;
    return;
  }
  struct inflate_state *s = g->state;
  if (g->failed || g->ended) {
    w->code = g->failed;
    w->ended = g->ended;
    return;
  }
  s->next_in = w->in;
  s->avail_in = w->in_len;
  s->next_out = w->out;
  s->avail_out = w->out_len;
  int ret = ISAL_DECOMP_OK;
  for (;;) {
    if (g->between) {
      if (s->avail_in == 0 || s->avail_out == 0) break;
      if (s->next_in[0] == 0) {
        g->ended = true;
        break;
      }
      g->between = false;
      g->hdr = HDR_FIXED;
      g->got = 0;
    }
    if (g->hdr != HDR_BODY) {
      ret = read_header(g, s);
      if (ret == 1) ret = ISAL_DECOMP_OK; /* all input taken, the header goes on in the next call */
      if (ret != ISAL_DECOMP_OK || g->hdr != HDR_BODY) break;
      start_body(s);
    }
    uint32_t in_before = s->avail_in, out_before = s->avail_out;
    ret = isal.inflate(s);
    if (ret != ISAL_DECOMP_OK) break;
    if (s->block_state == ISAL_BLOCK_FINISH) {
      g->between = true; /* header, data, CRC-32 and ISIZE all checked */
      continue;
    }
    if (s->avail_in == 0 || s->avail_out == 0) break;
    if (s->avail_in == in_before && s->avail_out == out_before) break; /* no progress: the caller sees it */
  }
  w->consumed = w->in_len - s->avail_in;
  w->produced = w->out_len - s->avail_out;
  s->next_in = NULL;
  s->avail_in = 0;
  s->next_out = NULL;
  s->avail_out = 0;
  if (ret != ISAL_DECOMP_OK) g->failed = ret;
  w->code = ret;
  w->member_end = g->between;
  w->ended = g->ended;
}

static void set_u32(napi_env env, napi_value obj, const char *key, uint32_t value) {
  napi_value v;
  if (napi_create_uint32(env, value, &v) == napi_ok) napi_set_named_property(env, obj, key, v);
}

static void set_bool(napi_env env, napi_value obj, const char *key, bool value) {
  napi_value v;
  if (napi_get_boolean(env, value, &v) == napi_ok) napi_set_named_property(env, obj, key, v);
}

/* Back on the JS thread: settle the promise, release the buffers, free a state closed meanwhile. */
static void gunzip_complete(napi_env env, napi_status status, void *data) {
  GunzipWork *w = data;
  Gunzip *g = w->g;
  if (w->hash) g->hashing = false;
  else g->busy = false;
  if (g->closed && !g->busy && !g->hashing) gunzip_free_state(g);
  napi_value result = NULL;
  if (status == napi_ok && w->hash) {
    napi_value code;
    if (napi_create_int32(env, w->code, &code) == napi_ok) napi_resolve_deferred(env, w->deferred, code);
  } else if (status == napi_ok && napi_create_object(env, &result) == napi_ok) {
    set_u32(env, result, "consumed", w->consumed);
    set_u32(env, result, "produced", w->produced);
    set_bool(env, result, "memberEnd", w->member_end);
    set_bool(env, result, "ended", w->ended);
    napi_value code;
    if (napi_create_int32(env, w->code, &code) == napi_ok) napi_set_named_property(env, result, "code", code);
    napi_resolve_deferred(env, w->deferred, result);
  } else {
    napi_value msg, err;
    napi_create_string_utf8(env, status == napi_cancelled ? "gunzip call cancelled" : "gunzip call failed", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, NULL, msg, &err);
    napi_reject_deferred(env, w->deferred, err);
  }
  for (int i = 0; i < 3; i++)
    if (w->keep[i]) napi_delete_reference(env, w->keep[i]);
  napi_delete_async_work(env, w->work);
  free(w);
  if (g->orphaned && !g->busy && !g->hashing) free(g);
}

/* Throw Error(code, msg); NULL, for `return fail(...)`. */
static napi_value fail(napi_env env, const char *code, const char *msg) {
  napi_throw_error(env, code, msg);
  return NULL;
}

/* A work item for handle `g` over `in`; NULL with ENOMEM thrown. */
static GunzipWork *new_work(napi_env env, Gunzip *g, uint8_t *in, uint32_t in_len) {
  GunzipWork *w = calloc(1, sizeof *w);
  if (!w) {
    fail(env, "ENOMEM", "out of memory");
    return NULL;
  }
  w->g = g;
  w->in = in;
  w->in_len = in_len;
  return w;
}

/*
 * Queue work `w` (calloc'ed by the caller) on the pool, keeping argv[0..nkeep) alive until it
 * completes; its promise, or NULL with an exception pending and `w` freed.
 */
static napi_value queue_work(napi_env env, GunzipWork *w, napi_value *argv, int nkeep, const char *what) {
  napi_value promise, name;
  int refs = 0;
  for (; refs < nkeep; refs++) {
    if (napi_create_reference(env, argv[refs], 1, &w->keep[refs]) != napi_ok) break;
  }
  bool queued = refs == nkeep && napi_create_string_utf8(env, what, NAPI_AUTO_LENGTH, &name) == napi_ok &&
                napi_create_async_work(env, NULL, name, gunzip_execute, gunzip_complete, w, &w->work) == napi_ok;
  if (queued && napi_create_promise(env, &w->deferred, &promise) == napi_ok && napi_queue_async_work(env, w->work) == napi_ok) return promise;
  /* (a deferred that is never settled is only garbage) */
  for (int i = 0; i < refs; i++) napi_delete_reference(env, w->keep[i]);
  if (queued) napi_delete_async_work(env, w->work);
  free(w);
  throw_last(env);
  return NULL;
}

/* gunzipRun(handle, input: Uint8Array, output: Uint8Array): Promise<{consumed, produced, memberEnd, ended, code}> */
static napi_value GunzipRun(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  if (!get_args(env, info, 3, argv)) return NULL;
  Gunzip *g = get_gunzip(env, argv[0]);
  if (!g) return NULL;
  uint8_t *in = NULL, *out = NULL;
  uint32_t in_len = 0, out_len = 0;
  if (!get_bytes(env, argv[1], "input", &in, &in_len) || !get_bytes(env, argv[2], "output", &out, &out_len)) return NULL;
  if (out_len == 0) {
    throw_arg(env, "output must not be empty");
    return NULL;
  }
  if (g->closed) return fail(env, "EBADF", "the gunzip handle is closed");
  if (g->busy) return fail(env, "EBUSY", "a gunzip call is already running on this handle");
  GunzipWork *w = new_work(env, g, in, in_len);
  if (!w) return NULL;
  w->out = out;
  w->out_len = out_len;
  napi_value promise = queue_work(env, w, argv, 3, "guestpull:gunzip");
  if (!promise) return NULL;
  g->busy = true;
  return promise;
}

/* gunzipHash(handle, bytes: Uint8Array): Promise<code>, the digest updated with `bytes` on the pool. */
static napi_value GunzipHash(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  if (!get_args(env, info, 2, argv)) return NULL;
  Gunzip *g = get_gunzip(env, argv[0]);
  if (!g) return NULL;
  uint8_t *in = NULL;
  uint32_t in_len = 0;
  if (!get_bytes(env, argv[1], "bytes", &in, &in_len)) return NULL;
  if (g->closed || !g->state) return fail(env, "EBADF", "the gunzip handle is closed");
  if (!g->md || g->md_final) return fail(env, "EINVAL", g->md ? "the digest was already taken" : "the handle was opened without a digest");
  if (g->hashing) return fail(env, "EBUSY", "a gunzipHash call is already running on this handle");
  GunzipWork *w = new_work(env, g, in, in_len);
  if (!w) return NULL;
  w->hash = true;
  napi_value promise = queue_work(env, w, argv, 2, "guestpull:gunzip-hash");
  if (!promise) return NULL;
  g->hashing = true;
  return promise;
}

/* gunzipDigest(handle): the digest of what gunzipHash was given, once; not while one runs, nor after close. */
static napi_value GunzipDigest(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  Gunzip *g = get_gunzip(env, argv[0]);
  if (!g) return NULL;
  if (g->closed || !g->state) return fail(env, "EBADF", "the gunzip handle is closed");
  if (g->hashing) return fail(env, "EBUSY", "a gunzipHash call is still running on this handle");
  if (!g->md || g->md_final) return fail(env, "EINVAL", g->md ? "the digest was already taken" : "the handle was opened without a digest");
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (EVP_DigestFinal_ex(g->md, out, &n) != 1) {
    napi_throw_error(env, "EIO", "OpenSSL could not finish the digest");
    return NULL;
  }
  g->md_final = true;
  napi_value buf;
  void *data = NULL;
  CHECK(env, napi_create_buffer_copy(env, n, out, &data, &buf));
  return buf;
}

/* gunzipClose(handle): release the inflate state now, or when the running call completes. Idempotent. */
static napi_value GunzipClose(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  if (!get_args(env, info, 1, argv)) return NULL;
  Gunzip *g = get_gunzip(env, argv[0]);
  if (!g) return NULL;
  g->closed = true;
  if (!g->busy && !g->hashing) gunzip_free_state(g);
  return NULL;
}

static bool export_fn(napi_env env, napi_value exports, const char *name, napi_callback cb) {
  napi_value fn;
  return napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, NULL, &fn) == napi_ok &&
         napi_set_named_property(env, exports, name, fn) == napi_ok;
}

static bool export_u32(napi_env env, napi_value exports, const char *name, uint32_t value) {
  napi_value v;
  return napi_create_uint32(env, value, &v) == napi_ok && napi_set_named_property(env, exports, name, v) == napi_ok;
}

static napi_value Init(napi_env env, napi_value exports) {
  if (!export_fn(env, exports, "mknod", Mknod) || !export_fn(env, exports, "lsetxattr", Lsetxattr) ||
      !export_fn(env, exports, "lgetxattr", Lgetxattr) || !export_fn(env, exports, "llistxattr", Llistxattr) ||
      !export_fn(env, exports, "lremovexattr", Lremovexattr) ||
      !export_fn(env, exports, "mount", Mount) || !export_fn(env, exports, "umount", Umount) ||
      !export_fn(env, exports, "gunzipStatus", GunzipStatus) || !export_fn(env, exports, "gunzipOpen", GunzipOpen) ||
      !export_fn(env, exports, "gunzipRun", GunzipRun) || !export_fn(env, exports, "gunzipClose", GunzipClose) ||
      !export_fn(env, exports, "gunzipDigest", GunzipDigest) || !export_fn(env, exports, "gunzipHash", GunzipHash) ||
      !export_u32(env, exports, "MS_RDONLY", MS_RDONLY) || !export_u32(env, exports, "MS_NOSUID", MS_NOSUID) ||
      !export_u32(env, exports, "MS_NODEV", MS_NODEV) || !export_u32(env, exports, "MNT_DETACH", MNT_DETACH)) {
    throw_last(env);
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
