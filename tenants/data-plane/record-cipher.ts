/**
 * Record encryption: AES-256-GCM (node:crypto), a random 96-bit IV per seal, a 128-bit tag,
 * and AAD `tenantId|table|recordId` so a sealed value copied to another tenant, table or
 * record fails to open. The envelope names its DEK version, in one of two forms:
 *
 *     text:   ccds1.<keyVersion>.<iv b64url>.<ciphertext b64url>.<tag b64url>
 *     binary: "ccds" 0x02 | keyVersion (uint32 BE) | iv (12) | ciphertext | tag (16)
 *
 * The binary form is what SQLite stores keep (a BLOB: a quarter smaller than base64 text and
 * cheaper to write, read and rewrap); PostgreSQL keeps the text form in its TEXT column. Both
 * open everywhere, so a store holding text envelopes from before keeps working, and a rewrap
 * writes whichever form its store keeps.
 *
 * `openRecord` throws `RecordOpenError`; it never returns null or partial plaintext.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { KeyUnavailableError, RecordOpenError } from './errors.ts';

const PREFIX = 'ccds1';
const IV_BYTES = 12;
const TAG_BYTES = 16;
const B64URL = /^[A-Za-z0-9_-]*$/;
/** "ccds" and the binary format's number. */
const BINARY_MAGIC = Buffer.from([0x63, 0x63, 0x64, 0x73, 0x02]);
const BINARY_HEADER = BINARY_MAGIC.length + 4 + IV_BYTES;
const MAX_VERSION = 999_999_999;

/** A sealed value as stored: the text form (a string) or the binary form (bytes). */
export type Envelope = string | Uint8Array;

/** Which envelope form a store keeps. */
export type EnvelopeForm = 'text' | 'binary';

/** Where a sealed value lives: bound into the AAD. No part may contain `|`. */
export interface RecordAddress {
  tenant: string;
  table: string;
  recordId: string;
}

/** A DEK version usable for sealing (plaintext key material stays in this KeyObject). */
export interface SealingKey {
  version: number;
  key: KeyObject;
}

/** The AAD string `tenant|table|recordId`. @throws TypeError if a part contains `|` or is empty. */
export function recordAad(addr: RecordAddress): string {
  for (const part of [addr.tenant, addr.table, addr.recordId]) {
    if (part.length === 0 || part.includes('|')) {
      throw new TypeError('record address parts must be non-empty and must not contain "|"');
    }
  }
  return `${addr.tenant}|${addr.table}|${addr.recordId}`;
}

/** @throws TypeError unless `version` is one an envelope can name (1 to 999999999). */
function assertVersion(version: number): void {
  if (!Number.isInteger(version) || version < 1 || version > MAX_VERSION) {
    throw new TypeError('a DEK version is an integer from 1 to 999999999');
  }
}

/** An AES-256-GCM cipher for `addr` under `key`, its AAD set. */
function encrypt(key: SealingKey, addr: RecordAddress, iv: Buffer): crypto.CipherGCM {
  const cipher = crypto.createCipheriv('aes-256-gcm', key.key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(Buffer.from(recordAad(addr), 'utf8'));
  return cipher;
}

/** Seals `plaintext` under `key` for `addr`, in the text form. */
export function sealRecord(key: SealingKey, addr: RecordAddress, plaintext: Buffer): string {
  assertVersion(key.version);
  const iv = crypto.randomBytes(IV_BYTES);
  const cipher = encrypt(key, addr, iv);
  const ct = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  const tag = cipher.getAuthTag();
  return [
    PREFIX,
    String(key.version),
    iv.toString('base64url'),
    ct.toString('base64url'),
    tag.toString('base64url'),
  ].join('.');
}

/** Seals `plaintext` under `key` for `addr`, in the binary form (one buffer, no copies). */
export function sealRecordBinary(key: SealingKey, addr: RecordAddress, plaintext: Buffer): Buffer {
  assertVersion(key.version);
  const out = Buffer.allocUnsafe(BINARY_HEADER + plaintext.length + TAG_BYTES);
  BINARY_MAGIC.copy(out, 0);
  out.writeUInt32BE(key.version, BINARY_MAGIC.length);
  const iv = out.subarray(BINARY_MAGIC.length + 4, BINARY_HEADER);
  crypto.randomFillSync(iv);
  const cipher = encrypt(key, addr, iv);
  const body = cipher.update(plaintext);
  body.copy(out, BINARY_HEADER);
  const rest = cipher.final(); // empty for GCM; copied in case that ever changes
  rest.copy(out, BINARY_HEADER + body.length);
  if (body.length + rest.length !== plaintext.length) {
    throw new Error('AES-GCM ciphertext length differs from the plaintext length');
  }
  cipher.getAuthTag().copy(out, BINARY_HEADER + plaintext.length);
  return out;
}

/** Seals `plaintext` in the given form. */
export function sealRecordAs(
  form: EnvelopeForm,
  key: SealingKey,
  addr: RecordAddress,
  plaintext: Buffer,
): Envelope {
  return form === 'binary'
    ? sealRecordBinary(key, addr, plaintext)
    : sealRecord(key, addr, plaintext);
}

/**
 * The DEK version an envelope names.
 * @throws RecordOpenError('malformed') if it is not a well-formed envelope.
 */
export function envelopeVersion(envelope: Envelope, addr: RecordAddress): number {
  return parseEnvelope(envelope, addr).version;
}

interface ParsedEnvelope {
  version: number;
  iv: Buffer;
  ct: Buffer;
  tag: Buffer;
}

function parseEnvelope(envelope: Envelope, addr: RecordAddress): ParsedEnvelope {
  return typeof envelope === 'string'
    ? parseTextEnvelope(envelope, addr)
    : parseBinaryEnvelope(envelope, addr);
}

function parseBinaryEnvelope(envelope: Uint8Array, addr: RecordAddress): ParsedEnvelope {
  const buf = Buffer.from(envelope.buffer, envelope.byteOffset, envelope.byteLength);
  const version =
    buf.length >= BINARY_HEADER + TAG_BYTES ? buf.readUInt32BE(BINARY_MAGIC.length) : 0;
  if (
    version < 1 ||
    version > MAX_VERSION ||
    !buf.subarray(0, BINARY_MAGIC.length).equals(BINARY_MAGIC)
  ) {
    throw new RecordOpenError('malformed', addr.table, addr.recordId);
  }
  return {
    version,
    iv: buf.subarray(BINARY_MAGIC.length + 4, BINARY_HEADER),
    ct: buf.subarray(BINARY_HEADER, buf.length - TAG_BYTES),
    tag: buf.subarray(buf.length - TAG_BYTES),
  };
}

function parseTextEnvelope(envelope: string, addr: RecordAddress): ParsedEnvelope {
  const malformed = () => new RecordOpenError('malformed', addr.table, addr.recordId);
  const parts = envelope.split('.');
  if (parts.length !== 5 || parts[0] !== PREFIX) {
    throw malformed();
  }
  const [, v, iv, ct, tag] = parts as [string, string, string, string, string];
  if (!/^[1-9][0-9]{0,8}$/.test(v) || ![iv, ct, tag].every((p) => B64URL.test(p))) {
    throw malformed();
  }
  const parsed = {
    version: Number(v),
    iv: Buffer.from(iv, 'base64url'),
    ct: Buffer.from(ct, 'base64url'),
    tag: Buffer.from(tag, 'base64url'),
  };
  if (parsed.iv.length !== IV_BYTES || parsed.tag.length !== TAG_BYTES) {
    throw malformed();
  }
  return parsed;
}

/**
 * Opens an envelope sealed for `addr`. `keyFor(version)` returns the DEK of that version.
 * @throws RecordOpenError: `malformed`, `authentication_failed` (tampered bytes, wrong tenant,
 *   table or record, wrong key), or `key_unavailable` (destroyed or unknown version; the
 *   KeyUnavailableError is the cause).
 */
export async function openRecord(
  envelope: Envelope,
  addr: RecordAddress,
  keyFor: (version: number) => Promise<KeyObject>,
): Promise<Buffer> {
  const env = parseEnvelope(envelope, addr);
  let key: KeyObject;
  try {
    key = await keyFor(env.version);
  } catch (err) {
    if (err instanceof KeyUnavailableError) {
      throw new RecordOpenError('key_unavailable', addr.table, addr.recordId, err);
    }
    throw err;
  }
  return openWithKey(env, key, addr);
}

/** Synchronous variant when the caller already holds the key of the envelope's version. */
export function openRecordWithKey(
  envelope: Envelope,
  addr: RecordAddress,
  key: SealingKey,
): Buffer {
  const env = parseEnvelope(envelope, addr);
  if (env.version !== key.version) {
    throw new RecordOpenError('key_unavailable', addr.table, addr.recordId);
  }
  return openWithKey(env, key.key, addr);
}

function openWithKey(env: ParsedEnvelope, key: KeyObject, addr: RecordAddress): Buffer {
  try {
    const decipher = crypto.createDecipheriv('aes-256-gcm', key, env.iv, {
      authTagLength: TAG_BYTES,
    });
    decipher.setAAD(Buffer.from(recordAad(addr), 'utf8'));
    decipher.setAuthTag(env.tag);
    return Buffer.concat([decipher.update(env.ct), decipher.final()]);
  } catch (err) {
    throw new RecordOpenError('authentication_failed', addr.table, addr.recordId, err);
  }
}

/** A fresh random 256-bit DEK as a KeyObject. */
export function generateDataKey(): KeyObject {
  return crypto.createSecretKey(crypto.randomBytes(32));
}
