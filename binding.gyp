# The guestpull native addon (native/guestpull.c): mknod, xattrs, mount for overlay bundles and
# special files in layers. Built by `npm run build:native` into build/Release/guestpull_native.node.
{
  'targets': [
    {
      'target_name': 'guestpull_native',
      'sources': ['native/guestpull.c'],
      'cflags': ['-std=gnu11', '-Wall', '-Wextra', '-fvisibility=hidden'],
      'ldflags': ['-Wl,-z,relro', '-Wl,-z,now', '-Wl,-z,noexecstack'],
    },
  ],
}
