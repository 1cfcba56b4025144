#!/usr/bin/env node
/** Entry point of the `guestpull` command (compiled to dist/cli.js); see src/cli/main.ts. */
import { main } from './cli/main.js';

process.exitCode = await main(process.argv.slice(2));
