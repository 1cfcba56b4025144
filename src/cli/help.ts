/** Help texts for every command. */
import { DEFAULT_SOCKET, DEFAULT_WORK_DIR } from '../config/index.js';
import { EXIT_CODES_HELP } from './exit-codes.js';

export const MAIN_HELP = `Usage: guestpull <command> [options]

Pulls container images inside confidential VM guests: serves the confidential data hub's
api.ImagePullService/PullImage over gRPC, or pulls one image from the command line.

Commands:
  serve              run the gRPC daemon (ImagePullService + grpc.health.v1)
  pull IMAGE BUNDLE  pull one image into BUNDLE/rootfs + BUNDLE/config.json, print its digest
  help [COMMAND]     show help

Options:
  -h, --help         show help
  --version          print the version

Run 'guestpull <command> --help' for the options of a command.`;

const COMMON_OPTIONS = `  -c, --config FILE    cdh.toml to read (the confidential data hub configuration)
  --work-dir DIR       layer store and staging directory; overrides [image] work_dir
                       (default ${DEFAULT_WORK_DIR})`;

export const SERVE_HELP = `Usage: guestpull serve [--config CDH_TOML] [--listen ADDR] [--work-dir DIR] [--log-level LEVEL]

Serve api.ImagePullService/PullImage and grpc.health.v1.Health over gRPC. The other confidential
data hub services answer UNIMPLEMENTED. SIGTERM or SIGINT stops the daemon: running pulls get
10 s to finish, then they are aborted.

Options:
${COMMON_OPTIONS}
  --listen ADDR        unix:///path/to.sock, host:port or [ipv6]:port
                       (default: socket from cdh.toml, else ${DEFAULT_SOCKET})
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent
                       (default: [log] level from cdh.toml, else info)
  -h, --help           show this help

Logs are JSON lines on stderr.

${EXIT_CODES_HELP}`;

export const PULL_HELP = `Usage: guestpull pull IMAGE BUNDLE_DIR [--config CDH_TOML] [--work-dir DIR] [--log-level LEVEL]

Pull IMAGE once, the same way the daemon does, into BUNDLE_DIR/rootfs and BUNDLE_DIR/config.json.
Prints the manifest digest on stdout. On failure prints one line on stderr,
'guestpull: <CODE>: <message>', and exits with the code below.

Options:
${COMMON_OPTIONS}
  --log-level LEVEL    trace, debug, info, warn, error, fatal or silent (default warn;
                       [log] level in cdh.toml is for the daemon and is not used here)
  -h, --help           show this help

${EXIT_CODES_HELP}`;
