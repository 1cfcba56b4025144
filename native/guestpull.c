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
 */
#define NAPI_VERSION 8
#include <node_api.h>

#include <errno.h>
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
      !export_u32(env, exports, "MS_RDONLY", MS_RDONLY) || !export_u32(env, exports, "MS_NOSUID", MS_NOSUID) ||
      !export_u32(env, exports, "MS_NODEV", MS_NODEV) || !export_u32(env, exports, "MNT_DETACH", MNT_DETACH)) {
    throw_last(env);
    return NULL;
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
