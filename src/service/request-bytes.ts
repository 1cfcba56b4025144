/**
 * A look at a request's raw protobuf bytes before protobufjs decodes them. protobufjs decodes a
 * `string` field that is not valid UTF-8 with U+FFFD replacement characters (Node's Buffer#utf8Slice)
 * and cannot tell the caller; a throwing deserializer makes grpc-js answer a bare INTERNAL. So the
 * wrapped deserializer never throws: it returns a MalformedRequest saying what is wrong (bad UTF-8
 * in a named string field, or bytes that are not a protobuf message at all) and the handler answers
 * INVALID_ARGUMENT with that.
 */
import { isUtf8 } from 'node:buffer';

export class MalformedRequest {
  constructor(readonly problem: string) {}
}

/** Thrown inside scan(): the bytes are not a well-formed protobuf message. */
class WireError extends Error {}

function readVarint(buf: Buffer, pos: number): [value: number, next: number] {
  let value = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    if (pos + i >= buf.length) throw new WireError(`truncated varint at byte ${pos}`);
    const b = buf[pos + i]!;
    // Values beyond 2^53 lose precision; they only ever matter here as lengths, which then fail the bounds check.
    value += (b & 0x7f) * mul;
    mul *= 128;
    if ((b & 0x80) === 0) return [value, pos + i + 1];
  }
  throw new WireError(`varint longer than 10 bytes at byte ${pos}`);
}

/**
 * The names (from `stringFields`, by field number) of the length-delimited fields whose bytes are
 * not valid UTF-8, in wire order; throws WireError when the bytes are not a protobuf message.
 */
export function invalidUtf8Fields(buf: Buffer, stringFields: ReadonlyMap<number, string>): string[] {
  const bad: string[] = [];
  let pos = 0;
  while (pos < buf.length) {
    const [tag, afterTag] = readVarint(buf, pos);
    const field = Math.floor(tag / 8);
    const wireType = tag % 8;
    if (field === 0) throw new WireError(`field number 0 at byte ${pos}`);
    pos = afterTag;
    switch (wireType) {
      case 0:
        pos = readVarint(buf, pos)[1];
        break;
      case 1:
        pos += 8;
        break;
      case 5:
        pos += 4;
        break;
      case 2: {
        const [len, start] = readVarint(buf, pos);
        if (start + len > buf.length) throw new WireError(`field ${field} claims ${len} bytes at byte ${start}, past the end`);
        const name = stringFields.get(field);
        if (name !== undefined && !isUtf8(buf.subarray(start, start + len)) && !bad.includes(name)) bad.push(name);
        pos = start + len;
        break;
      }
      default:
        throw new WireError(`unsupported wire type ${wireType} for field ${field}`);
    }
    if (pos > buf.length) throw new WireError(`field ${field} runs past the end of the message`);
  }
  return bad;
}

/**
 * `decode` guarded: invalid UTF-8 in one of `stringFields`, malformed wire bytes, or a decode
 * failure give a MalformedRequest instead of a decoded value or a throw.
 */
export function guardedDeserializer(decode: (buf: Buffer) => unknown, stringFields: ReadonlyMap<number, string>): (buf: Buffer) => unknown {
  return (buf: Buffer) => {
    try {
      const bad = invalidUtf8Fields(buf, stringFields);
      if (bad.length > 0) return new MalformedRequest(`${bad.join(' and ')} ${bad.length > 1 ? 'are' : 'is'} not valid UTF-8`);
    } catch (e) {
      if (e instanceof WireError) return new MalformedRequest(`the request is not a well-formed protobuf message: ${e.message}`);
      throw e;
    }
    try {
      return decode(buf);
    } catch (e) {
      return new MalformedRequest(`the request could not be decoded: ${(e as Error).message}`);
    }
  };
}
