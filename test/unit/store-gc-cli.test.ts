/**
 * `guestpull gc`: its flags, and one run on a work dir with a stray layer and a dead process's
 * staging directory (the summary line, what is left).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { parseGcArgs, runGc } from '../../src/cli/gc.js';
import { GuestpullError } from '../../src/errors.js';
import { Layout } from '../../src/pull/store/layout.js';

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'guestpull-gc-cli-'));
});
afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

function capture(): { stream: Writable; text: () => string } {
  let out = '';
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      out += chunk.toString('utf8');
      cb();
    },
  });
  return { stream, text: () => out };
}

describe('guestpull gc', () => {
  it('parses its flags and refuses others', () => {
    expect(parseGcArgs(['--work-dir', 'w', '--drop-unused'])).toMatchObject({ workDir: path.resolve('w'), dropUnused: true, help: false });
    expect(parseGcArgs([])).toMatchObject({ dropUnused: false });
    expect(parseGcArgs(['-h']).help).toBe(true);
    expect(() => parseGcArgs(['extra'])).toThrow(GuestpullError);
    expect(() => parseGcArgs(['--initdata', 'x'])).toThrow(/Unknown option/);
  });

  it('cleans a work dir and prints one summary line', async () => {
    const work = path.join(tmp, 'work');
    const l = new Layout(work);
    fs.mkdirSync(l.layerDiff('a'.repeat(64)), { recursive: true });
    fs.mkdirSync(path.join(l.stagingDir, '4199999999-1-0123456789abcdef'), { recursive: true }); // a pid beyond pid_max: gone
    fs.mkdirSync(l.bundlesDir, { recursive: true });
    fs.writeFileSync(path.join(l.bundlesDir, 'junk'), '');
    const out = capture();
    expect(await runGc(parseGcArgs(['--work-dir', work, '--drop-unused']), out.stream)).toBe(0);
    expect(out.text()).toBe(
      `work dir ${work}: removed 1 staging, 1 incomplete layers, 0 dead bundle records, 0 unused layers, 0 unused configs, 1 stray files; kept 0 layers, 0 live bundles\n`,
    );
    expect(fs.readdirSync(l.layersDir)).toEqual([]);
    expect(fs.readdirSync(l.stagingDir)).toEqual([]);
    expect(fs.existsSync(l.lockFile)).toBe(false);
  });
});
