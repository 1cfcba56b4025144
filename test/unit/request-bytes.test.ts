import { describe, expect, it } from 'vitest';
import { MalformedRequest, guardedDeserializer, invalidUtf8Fields } from '../../src/service/request-bytes.js';
import { SERVICE_NAMES, serviceDefinition } from '../../src/service/protos.js';

const FIELDS = new Map([
  [1, 'image_url'],
  [2, 'bundle_path'],
]);

function varint(n: number): Buffer {
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 128) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}

function lenField(field: number, bytes: Buffer): Buffer {
  return Buffer.concat([varint(field * 8 + 2), varint(bytes.length), bytes]);
}

const utf8 = (s: string): Buffer => Buffer.from(s, 'utf8');
const BAD = Buffer.from([0x72, 0x65, 0x67, 0xff, 0xfe, 0x2f, 0x61]); // "reg\xff\xfe/a"

describe('invalidUtf8Fields', () => {
  it('accepts valid UTF-8, multi-byte included, and an explicit U+FFFD', () => {
    const msg = Buffer.concat([lenField(1, utf8('reg/ü/ok:1')), lenField(2, utf8('/run/x\u{fffd}'))]);
    expect(invalidUtf8Fields(msg, FIELDS)).toEqual([]);
    expect(invalidUtf8Fields(Buffer.alloc(0), FIELDS)).toEqual([]);
  });

  it('names each field whose bytes are not UTF-8, once, in wire order', () => {
    expect(invalidUtf8Fields(Buffer.concat([lenField(1, utf8('ok')), lenField(2, BAD)]), FIELDS)).toEqual(['bundle_path']);
    expect(invalidUtf8Fields(Buffer.concat([lenField(2, BAD), lenField(1, BAD), lenField(1, BAD)]), FIELDS)).toEqual(['bundle_path', 'image_url']);
    // a truncated multi-byte sequence and an overlong encoding of '/'
    expect(invalidUtf8Fields(lenField(1, Buffer.from([0x61, 0xc3])), FIELDS)).toEqual(['image_url']);
    expect(invalidUtf8Fields(lenField(1, Buffer.from([0xc0, 0xaf])), FIELDS)).toEqual(['image_url']);
    // a UTF-16 surrogate encoded in UTF-8 (CESU) is not UTF-8 either
    expect(invalidUtf8Fields(lenField(1, Buffer.from([0xed, 0xa0, 0x80])), FIELDS)).toEqual(['image_url']);
  });

  it('skips unknown fields of every wire type, ignoring their bytes', () => {
    const msg = Buffer.concat([
      varint(3 * 8 + 0), varint(300),
      varint(4 * 8 + 1), Buffer.alloc(8, 0xff),
      varint(5 * 8 + 5), Buffer.alloc(4, 0xff),
      lenField(6, BAD),
      lenField(1, utf8('fine')),
    ]);
    expect(invalidUtf8Fields(msg, FIELDS)).toEqual([]);
  });

  it('throws on bytes that are not a protobuf message', () => {
    expect(() => invalidUtf8Fields(Buffer.from([0x0a, 0x05, 0x61]), FIELDS)).toThrow(/past the end/);
    expect(() => invalidUtf8Fields(Buffer.from([0x0a]), FIELDS)).toThrow(/truncated varint/);
    expect(() => invalidUtf8Fields(Buffer.from([0x0b]), FIELDS)).toThrow(/wire type 3/);
    expect(() => invalidUtf8Fields(Buffer.from([0x02, 0x00]), FIELDS)).toThrow(/field number 0/);
    expect(() => invalidUtf8Fields(Buffer.from([0x19, 1, 2, 3]), FIELDS)).toThrow(/past the end/);
    expect(() => invalidUtf8Fields(Buffer.alloc(11, 0x80), FIELDS)).toThrow(/varint/);
  });
});

describe('guardedDeserializer with the real PullImage decoder', () => {
  const method = serviceDefinition(SERVICE_NAMES.imagePull)['PullImage']!;
  const decode = guardedDeserializer((b) => method.requestDeserialize(b) as unknown, FIELDS);

  it('decodes a good request exactly as protobufjs does', () => {
    const bytes = method.requestSerialize({ image_url: 'reg.example/app:1', bundle_path: '/run/kata-containers/c1' });
    expect(decode(bytes)).toEqual({ image_url: 'reg.example/app:1', bundle_path: '/run/kata-containers/c1' });
  });

  it('protobufjs alone turns invalid UTF-8 into U+FFFD; the guard reports the field instead', () => {
    const bytes = Buffer.concat([lenField(1, BAD), lenField(2, utf8('/run/kata-containers/c1'))]);
    const plain = method.requestDeserialize(bytes) as { image_url: string };
    expect(plain.image_url).toContain('\u{fffd}');
    const guarded = decode(bytes);
    expect(guarded).toBeInstanceOf(MalformedRequest);
    expect((guarded as MalformedRequest).problem).toBe('image_url is not valid UTF-8');
  });

  it('reports both fields, and garbage bytes, without throwing', () => {
    expect((decode(Buffer.concat([lenField(1, BAD), lenField(2, BAD)])) as MalformedRequest).problem).toBe('image_url and bundle_path are not valid UTF-8');
    const garbage = decode(Buffer.from([0xff, 0xff, 0xff]));
    expect(garbage).toBeInstanceOf(MalformedRequest);
    expect((garbage as MalformedRequest).problem).toMatch(/not a well-formed protobuf message/);
  });

  it('turns a decoder throw into a MalformedRequest', () => {
    const throwing = guardedDeserializer(() => {
      throw new Error('index out of range');
    }, FIELDS);
    expect((throwing(Buffer.alloc(0)) as MalformedRequest).problem).toBe('the request could not be decoded: index out of range');
  });
});
