/** Help texts for every command. */
import { DEFAULT_SOCKET, DEFAULT_WORK_DIR } from '../config/index.js';
import { DEFAULT_INITDATA_DIR } from '../initdata/index.js';
import { EXIT_CODES_HELP } from './exit-codes.js';

export const MAIN_HELP = `Usage: guestpull <command> [options]

Pulls container images inside confidential VM guests: serves the confidential data hub's
api.ImagePullService/PullImage over gRPC, or pulls one image from the command line.

Commands:
  serve              run the gRPC daemon (ImagePullService + grpc.health.v1)
  pull IMAGE BUNDLE  pull one image into BUNDLE/rootfs + BUNDLE/config.json, print its digest
  gc                 clean the work dir (layer store); --drop-unused frees unused layers
  fsck               check the work dir (layer store); exit 1 when problems are found
  initdata ...       prepare init-data on the host: digest, pack, annotation, check
  help [COMMAND]     show help

Options:
  -h, --help         show help
  --version          print the version

Run 'guestpull <command> --help' for the options of a command.`;

const COMMON_OPTIONS = `  -c, --config FILE    cdh.toml to read (the confidential data hub configuration);
                       not together with --initdata
  --work-dir DIR       layer store and staging directory; overrides [image] work_dir
                       (default ${DEFAULT_WORK_DIR})
  --initdata PATH|auto init-data: a TOML file, a disk image or block device in the kata
                       layout, or 'auto' (scan /dev/vd* and /dev/sd*). Its digest is checked
                       before anything else; its cdh.toml is then the configuration
  --initdata-digest V  expected digest, hex or base64: the TEE field value (HOST_DATA,
                       MRCONFIGID, ...) or the raw digest. Default: read from the TEE
                       (TDX sysfs mrconfigid, else a configfs-tsm report)
  --allow-unmeasured-initdata
                       use the init-data even when no expected digest is available
                       (warned at start-up and at every pull); never on a mismatch
  --initdata-dir DIR   where the verified document and its cdh.toml, aa.toml, policy.rego
                       are written (default ${DEFAULT_INITDATA_DIR})
  --initdata-max-bytes N
                       largest init-data document, and device payload, accepted
                       (default: 4 MiB document, 1 MiB device payload)

Without --initdata and without an [image] table in the configuration, the kernel command line
parameters agent.https_proxy, agent.http_proxy, agent.no_proxy and agent.image_registry_auth
apply, each with a warning (the host controls them). Proxy environment variables are never read.`;

const BUNDLE_ROOT = `  --bundle-root DIR    accept only bundle paths below DIR; repeatable (any of them).
                       DIR must exist; symlinks in it are resolved at start-up. A path
                       outside every root is refused (PERMISSION_DENIED). Production
                       setting in a kata guest: --bundle-root /run/kata-containers.
                       Without it any absolute bundle path is accepted. Either way a
                       bundle path through a symlink, or with '..', is refused`;

export const SERVE_HELP = `Usage: guestpull serve [--initdata PATH|auto [--initdata-digest V] | --config CDH_TOML]
                      [--listen ADDR] [--work-dir DIR] [--bundle-root DIR]... [--log-level LEVEL]

Serve api.ImagePullService/PullImage and grpc.health.v1.Health over gRPC. The other confidential
data hub services answer UNIMPLEMENTED. SIGTERM or SIGINT stops the daemon: running pulls get
10 s to finish, then they are aborted.

Options:
${COMMON_OPTIONS}
  --listen ADDR        unix:///path/to.sock, host:port or [ipv6]:port
                       (default: socket from cdh.toml, else ${DEFAULT_SOCKET})
${BUNDLE_ROOT}
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent
                       (default: [log] level from cdh.toml, else info)
  -h, --help           show this help

Logs are JSON lines on stderr.

${EXIT_CODES_HELP}`;

export const PULL_HELP = `Usage: guestpull pull IMAGE BUNDLE_DIR [--initdata PATH|auto [--initdata-digest V] | --config CDH_TOML]
                      [--work-dir DIR] [--bundle-root DIR]... [--log-level LEVEL]

Pull IMAGE once, the same way the daemon does, into BUNDLE_DIR/rootfs and BUNDLE_DIR/config.json.
Prints the manifest digest on stdout. On failure prints one line on stderr,
'guestpull: <CODE>: <message>', and exits with the code below.

Options:
${COMMON_OPTIONS}
${BUNDLE_ROOT}
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent (default warn;
                       [log] level in cdh.toml is for the daemon and is not used here)
  -h, --help           show this help

${EXIT_CODES_HELP}`;

export const GC_HELP = `Usage: guestpull gc [--work-dir DIR] [--config CDH_TOML] [--drop-unused] [--log-level LEVEL]

Garbage-collect the work dir (the layer store), also while a daemon is using it. Always removed:
what killed or crashed guestpull processes left (staging directories, build mounts), layers
without a complete record, and the records (with upper and work directories) of overlay bundles
that are no longer mounted at their rootfs, e.g. because the runtime unmounted them. Layers a
live bundle or a running pull uses are never removed. Prints one summary line.

Options:
  -c, --config FILE    cdh.toml whose [image] work_dir to clean
  --work-dir DIR       the work dir to clean; overrides [image] work_dir
                       (default ${DEFAULT_WORK_DIR})
  --drop-unused        also remove every layer and cached image config that no mounted
                       (or still being pulled) bundle uses; later pulls download them again
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent (default warn)
  -h, --help           show this help

${EXIT_CODES_HELP}`;

export const FSCK_HELP = `Usage: guestpull fsck [--work-dir DIR] [--config CDH_TOML] [--deep] [--repair] [--json]
                     [--log-level LEVEL]

Check the work dir (the layer store), also while a daemon is using it (they share the work dir
mutex). Every layer directory must hold a valid record naming it, whose chain ID follows from its
parent's and its diff ID, whose parent is in the store, and whose tree still matches the summary
recorded when it was published (paths, types, modes, owners, sizes, link targets, devices,
xattrs). Reported as problems: leftovers of killed processes (staging directories, incomplete
layers, temp files), unknown names, bundle records naming missing layers, bundle directories
without records, bundle records whose overlay is no longer mounted, half-made bundles, cached
image configs that do not match their digest. Layers recorded by older versions, without a tree
summary, are reported as unverifiable: a notice, not a problem.

A summary goes to stderr: one headline, then one line per problem or notice.

Options:
  -c, --config FILE    cdh.toml whose [image] work_dir to check
  --work-dir DIR       the work dir to check; overrides [image] work_dir
                       (default ${DEFAULT_WORK_DIR})
  --deep               also hash every file's content, compared where the layer's record has
                       a content digest (slower: reads the whole store)
  --repair             remove what nothing can be using: staging directories of processes that
                       are gone (their mounts detached), incomplete layers, temp files, unknown
                       names under layers/ and bundles/, configs that do not match their digest.
                       Everything else is only reported
  --json               print the whole report as JSON on stdout
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent (default warn)
  -h, --help           show this help

Exit status: 0 when the store is clean (after --repair: nothing left unrepaired), 1 when problems
are left; otherwise as below.

${EXIT_CODES_HELP}`;

const PLATFORMS = `  --platform P         fit the digest to a TEE field: none (the raw digest, default),
                       snp (HOST_DATA, 32 bytes), tdx (MRCONFIGID, 48), cca (personalization
                       value, 64), se (256); longer digests are truncated, shorter ones
                       zero-padded at the end`;

const INPUT = `FILE is the init-data TOML (version = "0.1.0", algorithm = sha256|sha384|sha512, [data]);
a disk image made by 'guestpull initdata pack' is read too.`;

export const INITDATA_HELP = `Usage: guestpull initdata <digest|pack|annotation|check> FILE [options]

Host-side tooling for preparing init-data, the measured document whose cdh.toml configures
guestpull in the guest. The digest is over the raw bytes of the file, with the algorithm its
header names.

Commands:
  digest FILE [--platform P] [--encoding hex|base64]
                       print the value to bind into the TEE at launch
  pack FILE OUT.img [--force]
                       write the block-device image (the kata init-data disk layout)
  annotation FILE      print base64(gzip(FILE)) for the pod annotation
                       io.katacontainers.config.hypervisor.cc_init_data
  check FILE --digest V [--platform P]
                       exit 0 if FILE matches the TEE value V, 1 if it does not

Run 'guestpull initdata <command> --help' for details.`;

export const INITDATA_DIGEST_HELP = `Usage: guestpull initdata digest FILE [--platform P] [--encoding hex|base64]

Print the init-data digest to bind into the TEE at launch (SNP HOST_DATA, TDX MRCONFIGID, ...):
the hash named by the document's algorithm over the file's raw bytes, fitted to the platform's
field. The whole document is validated first.

${INPUT}

Options:
${PLATFORMS}
  --encoding E         hex (default, lowercase) or base64
  -h, --help           show this help

${EXIT_CODES_HELP}`;

export const INITDATA_PACK_HELP = `Usage: guestpull initdata pack FILE OUT.img [--force]

Write FILE as a kata init-data disk image: the ASCII magic "initdata", the payload length as a
little-endian u64, gzip(FILE), zero-padded to a multiple of 512 bytes. Attach it to the VM as a
raw virtio-blk disk; 'guestpull serve --initdata auto' finds it. The document is validated first.

${INPUT}

Options:
  --force              overwrite OUT.img if it exists (refused otherwise)
  -h, --help           show this help

${EXIT_CODES_HELP}`;

export const INITDATA_ANNOTATION_HELP = `Usage: guestpull initdata annotation FILE

Print base64(gzip(FILE)) on one line: the value of the pod annotation
io.katacontainers.config.hypervisor.cc_init_data. The document is validated first.

${INPUT}

Options:
  -h, --help           show this help

${EXIT_CODES_HELP}`;

export const INITDATA_CHECK_HELP = `Usage: guestpull initdata check FILE --digest V [--platform P]

Check FILE against V, the value bound into the TEE (hex or base64), as the daemon does before it
uses init-data: only the header is read, then the digest over the raw bytes is compared over the
whole value. Prints one line saying whether it matches; exits 0 on a match, 1 on a mismatch (other
failures, such as an unreadable file or a bad header, exit as below).

${INPUT}

Options:
  --digest V           the expected value, hex or base64 (required)
${PLATFORMS}
                       (without --platform, V may be the raw digest or a value fitted to any
                       of the fields above)
  -h, --help           show this help

${EXIT_CODES_HELP}`;
