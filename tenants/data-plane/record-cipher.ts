/**
 * Record encryption: AES-256-GCM (node:crypto), a random 96-bit IV per seal, a 128-bit tag,
 * and AAD `tenantId|table|recordId` so a sealed value copied to another tenant, table or
 * record fails to open.
 *
 * Records are sealed under a fresh random **record key** each; the record key is wrapped
 * (AES-256-GCM again, AAD `tenant|table|recordId|record-key|<version>`) by the tenant's DEK
 * version the envelope names. The envelope's **head** (format, DEK version, wrapped record key)
 * is all a scheduled DEK rotation has to change: `rewrapHead` moves a record to another DEK
 * version without touching its ciphertext (the **body**: IV, ciphertext, tag). Two forms:
 *
 *     text:   ccds3.<dekVersion>.<wrap b64url>.<iv b64url>.<ciphertext b64url>.<tag b64url>
 *     binary: "ccds" 0x03 | dekVersion (uint32 BE) | wrap (60) | iv (12) | ciphertext | tag (16)
 *             wrap = wrapIv (12) | wrapped record key (32) | wrapTag (16); head = first 69 bytes
 *
 * The binary form is what SQLite stores keep (a BLOB: a quarter smaller than base64 text and
 * cheaper to write and read); PostgreSQL keeps the text form in its TEXT column.
 *
 * Envelopes written before record keys, sealed directly under the DEK, still open everywhere:
 *
 *     text:   ccds1.<dekVersion>.<iv>.<ciphertext>.<tag>
 *     binary: "ccds" 0x02 | dekVersion (uint32 BE) | iv (12) | ciphertext | tag (16)
 *
 * A rotation re-seals those whole, in the current form (`sealLegacyRecord` writes them, for
 * specs of that path only).
 *
 * `openRecord` throws `RecordOpenError`; it never returns null or partial plaintext.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { KeyUnavailableError, RecordOpenError } from './errors.ts';

const IV_BYTES = 12;
const TAG_BYTES = 16;
const RECORD_KEY_BYTES = 32;
/** wrapIv | wrapped record key | wrapTag. */
const WRAP_BYTES = IV_BYTES + RECORD_KEY_BYTES + TAG_BYTES;
const B64URL = /^[A-Za-z0-9_-]*$/;
const VERSION_TEXT = /^[1-9][0-9]{0,8}$/;
const MAX_VERSION = 999_999_999;

const LEGACY_PREFIX = 'ccds1';
const PREFIX = 'ccds3';
/** "ccds" and the binary format's number: 0x02 sealed under the DEK, 0x03 under a record key. */
const LEGACY_MAGIC = Buffer.from([0x63, 0x63, 0x64, 0x73, 0x02]);
const MAGIC = Buffer.from([0x63, 0x63, 0x64, 0x73, 0x03]);
const LEGACY_HEADER = LEGACY_MAGIC.length + 4 + IV_BYTES;
/** Bytes of a binary head: magic, DEK version, wrap. */
export const BINARY_HEAD_BYTES = MAGIC.length + 4 + WRAP_BYTES;
const BINARY_HEADER = BINARY_HEAD_BYTES + IV_BYTES;
/**
 * The longest head in either form (text: `ccds3.` + 9 digits + `.` + 80 characters). Reading
 * this many leading bytes or characters of an envelope is enough for `envelopeHead`.
 */
export const HEAD_READ_LENGTH = PREFIX.length + 1 + 9 + 1 + Math.ceil((WRAP_BYTES * 4) / 3); // 96

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

/** The AAD of a record key's wrap: the record's address, and the DEK version that wraps it. */
function wrapAad(addr: RecordAddress, version: number): Buffer {
  return Buffer.from(`${recordAad(addr)}|record-key|${String(version)}`, 'utf8');
}

/** @throws TypeError unless `version` is one an envelope can name (1 to 999999999). */
function assertVersion(version: number): void {
  if (!Number.isInteger(version) || version < 1 || version > MAX_VERSION) {
    throw new TypeError('a DEK version is an integer from 1 to 999999999');
  }
}

/** AES-256-GCM of `plaintext` into `out` at `at` (ciphertext then tag), IV in `iv`. */
function gcmInto(
  key: KeyObject | Buffer,
  iv: Buffer,
  aad: Buffer,
  plaintext: Buffer,
  out: Buffer,
  at: number,
): void {
  const cipher = crypto.createCipheriv('aes-256-gcm', key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad);
  const body = cipher.update(plaintext);
  body.copy(out, at);
  const rest = cipher.final(); // empty for GCM; copied in case that ever changes
  rest.copy(out, at + body.length);
  if (body.length + rest.length !== plaintext.length) {
    throw new Error('AES-GCM ciphertext length differs from the plaintext length');
  }
  cipher.getAuthTag().copy(out, at + plaintext.length);
}

/**
 * Writes a binary head into `out` at 0: magic, `key.version`, and `recordKey` wrapped under the
 * DEK `key` for `addr` (wrapIv | wrapped | wrapTag).
 */
function writeHead(out: Buffer, key: SealingKey, addr: RecordAddress, recordKey: Buffer): void {
  MAGIC.copy(out, 0);
  out.writeUInt32BE(key.version, MAGIC.length);
  const iv = out.subarray(MAGIC.length + 4, MAGIC.length + 4 + IV_BYTES);
  crypto.randomFillSync(iv);
  gcmInto(key.key, iv, wrapAad(addr, key.version), recordKey, out, MAGIC.length + 4 + IV_BYTES);
}

/**
 * Unwraps a record key. @throws RecordOpenError('authentication_failed') for a wrong DEK, a
 * wrap moved to another record or version, or tampered bytes.
 */
function unwrapRecordKey(
  key: KeyObject,
  version: number,
  addr: RecordAddress,
  wrap: Buffer,
): Buffer {
  return gcmOpen(
    key,
    wrap.subarray(0, IV_BYTES),
    wrapAad(addr, version),
    wrap.subarray(IV_BYTES, IV_BYTES + RECORD_KEY_BYTES),
    wrap.subarray(IV_BYTES + RECORD_KEY_BYTES),
    addr,
  );
}

function gcmOpen(
  key: KeyObject | Buffer,
  iv: Buffer,
  aad: Buffer,
  ct: Buffer,
  tag: Buffer,
  addr: RecordAddress,
): Buffer {
  try {
    const decipher = crypto.createDecipheriv('aes-256-gcm', key, iv, {
      authTagLength: TAG_BYTES,
    });
    decipher.setAAD(aad);
    decipher.setAuthTag(tag);
    return Buffer.concat([decipher.update(ct), decipher.final()]);
  } catch (err) {
    throw new RecordOpenError('authentication_failed', addr.table, addr.recordId, err);
  }
}

/**
 * Seals `plaintext` for `addr` under a fresh record key wrapped by `key`, in the binary form
 * (one buffer). The record key is zeroed before returning.
 */
export function sealRecordBinary(key: SealingKey, addr: RecordAddress, plaintext: Buffer): Buffer {
  assertVersion(key.version);
  const recordKey = crypto.randomBytes(RECORD_KEY_BYTES);
  try {
    const out = Buffer.allocUnsafe(BINARY_HEADER + plaintext.length + TAG_BYTES);
    writeHead(out, key, addr, recordKey);
    const iv = out.subarray(BINARY_HEAD_BYTES, BINARY_HEADER);
    crypto.randomFillSync(iv);
    gcmInto(recordKey, iv, Buffer.from(recordAad(addr), 'utf8'), plaintext, out, BINARY_HEADER);
    return out;
  } finally {
    recordKey.fill(0);
  }
}

/** Seals `plaintext` for `addr` under a fresh record key wrapped by `key`, in the text form. */
export function sealRecord(key: SealingKey, addr: RecordAddress, plaintext: Buffer): string {
  return binaryToText(sealRecordBinary(key, addr, plaintext));
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

/** The text form of a binary (record-key) envelope. */
function binaryToText(bin: Buffer): string {
  const b64 = (from: number, to: number) => bin.subarray(from, to).toString('base64url');
  return [
    PREFIX,
    String(bin.readUInt32BE(MAGIC.length)),
    b64(MAGIC.length + 4, BINARY_HEAD_BYTES),
    b64(BINARY_HEAD_BYTES, BINARY_HEADER),
    b64(BINARY_HEADER, bin.length - TAG_BYTES),
    b64(bin.length - TAG_BYTES, bin.length),
  ].join('.');
}

/**
 * Seals the way records were sealed before record keys (directly under the DEK): what a store
 * written by an older release holds. Only for specs of the paths that read and re-seal those.
 */
export function sealLegacyRecord(
  form: EnvelopeForm,
  key: SealingKey,
  addr: RecordAddress,
  plaintext: Buffer,
): Envelope {
  assertVersion(key.version);
  const out = Buffer.allocUnsafe(LEGACY_HEADER + plaintext.length + TAG_BYTES);
  LEGACY_MAGIC.copy(out, 0);
  out.writeUInt32BE(key.version, LEGACY_MAGIC.length);
  const iv = out.subarray(LEGACY_MAGIC.length + 4, LEGACY_HEADER);
  crypto.randomFillSync(iv);
  gcmInto(key.key, iv, Buffer.from(recordAad(addr), 'utf8'), plaintext, out, LEGACY_HEADER);
  if (form === 'binary') {
    return out;
  }
  const b64 = (from: number, to: number) => out.subarray(from, to).toString('base64url');
  return [
    LEGACY_PREFIX,
    String(key.version),
    b64(LEGACY_MAGIC.length + 4, LEGACY_HEADER),
    b64(LEGACY_HEADER, out.length - TAG_BYTES),
    b64(out.length - TAG_BYTES, out.length),
  ].join('.');
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
  /** The wrapped record key (wrapIv | wrapped | wrapTag); absent in the legacy forms. */
  wrap?: Buffer;
  iv: Buffer;
  ct: Buffer;
  tag: Buffer;
}

function parseEnvelope(envelope: Envelope, addr: RecordAddress): ParsedEnvelope {
  return typeof envelope === 'string'
    ? parseTextEnvelope(envelope, addr)
    : parseBinaryEnvelope(envelope, addr);
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
}

function malformed(addr: RecordAddress): RecordOpenError {
  return new RecordOpenError('malformed', addr.table, addr.recordId);
}

/** The DEK version at `at`, or 0 if the buffer is too short or the version out of range. */
function versionAt(buf: Buffer, at: number, minLength: number): number {
  const version = buf.length >= minLength ? buf.readUInt32BE(at) : 0;
  return version >= 1 && version <= MAX_VERSION ? version : 0;
}

function parseBinaryEnvelope(envelope: Uint8Array, addr: RecordAddress): ParsedEnvelope {
  const buf = asBuffer(envelope);
  const magic = buf.subarray(0, MAGIC.length);
  if (magic.equals(MAGIC)) {
    const version = versionAt(buf, MAGIC.length, BINARY_HEADER + TAG_BYTES);
    if (version === 0) {
      throw malformed(addr);
    }
    return {
      version,
      wrap: buf.subarray(MAGIC.length + 4, BINARY_HEAD_BYTES),
      iv: buf.subarray(BINARY_HEAD_BYTES, BINARY_HEADER),
      ct: buf.subarray(BINARY_HEADER, buf.length - TAG_BYTES),
      tag: buf.subarray(buf.length - TAG_BYTES),
    };
  }
  const version = versionAt(buf, LEGACY_MAGIC.length, LEGACY_HEADER + TAG_BYTES);
  if (version === 0 || !magic.equals(LEGACY_MAGIC)) {
    throw malformed(addr);
  }
  return {
    version,
    iv: buf.subarray(LEGACY_MAGIC.length + 4, LEGACY_HEADER),
    ct: buf.subarray(LEGACY_HEADER, buf.length - TAG_BYTES),
    tag: buf.subarray(buf.length - TAG_BYTES),
  };
}

function parseTextEnvelope(envelope: string, addr: RecordAddress): ParsedEnvelope {
  const parts = envelope.split('.');
  const legacy = parts.length === 5 && parts[0] === LEGACY_PREFIX;
  if (!legacy && !(parts.length === 6 && parts[0] === PREFIX)) {
    throw malformed(addr);
  }
  const [, v, ...rest] = parts as [string, string, ...string[]];
  if (!VERSION_TEXT.test(v) || !rest.every((p) => B64URL.test(p))) {
    throw malformed(addr);
  }
  const bytes = rest.map((p) => Buffer.from(p, 'base64url'));
  const [wrap, iv, ct, tag] = legacy ? [undefined, ...bytes] : bytes;
  if (
    iv?.length !== IV_BYTES ||
    tag?.length !== TAG_BYTES ||
    ct === undefined ||
    (!legacy && wrap?.length !== WRAP_BYTES)
  ) {
    throw malformed(addr);
  }
  return { version: Number(v), ...(wrap ? { wrap } : {}), iv, ct, tag };
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
  const aad = Buffer.from(recordAad(addr), 'utf8');
  if (!env.wrap) {
    return gcmOpen(key, env.iv, aad, env.ct, env.tag, addr);
  }
  const recordKey = unwrapRecordKey(key, env.version, addr, env.wrap);
  try {
    return gcmOpen(recordKey, env.iv, aad, env.ct, env.tag, addr);
  } finally {
    recordKey.fill(0);
  }
}

// ---------------------------------------------------------------------------------------------
// Heads: what a scheduled rotation changes.
// ---------------------------------------------------------------------------------------------

/** The head of a record-key envelope: its DEK version and wrapped record key, in one form. */
export interface EnvelopeHead {
  version: number;
  /** The head as stored: the first 69 bytes (binary) or `ccds3.<v>.<wrap>` (text). */
  head: Envelope;
  /** The wrapped record key (wrapIv | wrapped | wrapTag). */
  wrap: Buffer;
}

/**
 * The head of an envelope, given the envelope or only its first `HEAD_READ_LENGTH` bytes or
 * characters; undefined for the legacy forms (sealed directly under the DEK: they have no head
 * and are re-sealed whole).
 * @throws RecordOpenError('malformed') if it starts like a record-key envelope but is not one.
 */
export function envelopeHead(prefix: Envelope, addr: RecordAddress): EnvelopeHead | undefined {
  if (typeof prefix === 'string') {
    if (!prefix.startsWith(`${PREFIX}.`)) {
      return undefined;
    }
    const [, v, wrap] = prefix.split('.');
    const bytes = wrap !== undefined && B64URL.test(wrap) ? Buffer.from(wrap, 'base64url') : null;
    if (v === undefined || !VERSION_TEXT.test(v) || bytes?.length !== WRAP_BYTES) {
      throw malformed(addr);
    }
    return { version: Number(v), head: `${PREFIX}.${v}.${wrap ?? ''}`, wrap: bytes };
  }
  const buf = asBuffer(prefix);
  if (!buf.subarray(0, MAGIC.length).equals(MAGIC)) {
    return undefined;
  }
  const version = versionAt(buf, MAGIC.length, BINARY_HEAD_BYTES);
  if (version === 0) {
    throw malformed(addr);
  }
  const head = Buffer.from(buf.subarray(0, BINARY_HEAD_BYTES));
  return { version, head, wrap: head.subarray(MAGIC.length + 4) };
}

/**
 * Moves a head from the DEK version `from` to `to`: unwraps the record key and wraps it again.
 * The record's ciphertext is untouched; the record key never leaves this function (zeroed).
 * @throws RecordOpenError: `malformed`, `key_unavailable` (the head is not under `from`), or
 *   `authentication_failed` (wrong key, a head of another record, tampered bytes).
 */
export function rewrapHead(
  head: Envelope,
  addr: RecordAddress,
  from: SealingKey,
  to: SealingKey,
): Envelope {
  assertVersion(to.version);
  const parsed = envelopeHead(head, addr);
  if (!parsed) {
    throw malformed(addr);
  }
  if (parsed.version !== from.version) {
    throw new RecordOpenError('key_unavailable', addr.table, addr.recordId);
  }
  const recordKey = unwrapRecordKey(from.key, from.version, addr, parsed.wrap);
  try {
    const out = Buffer.allocUnsafe(BINARY_HEAD_BYTES);
    writeHead(out, to, addr, recordKey);
    return typeof head === 'string'
      ? `${PREFIX}.${String(to.version)}.${out.subarray(MAGIC.length + 4).toString('base64url')}`
      : out;
  } finally {
    recordKey.fill(0);
  }
}

/**
 * The envelope with its head replaced by `head` (a head `rewrapHead` made for this record,
 * kept apart from the row; see rewrap-jobs.ts). Both must be record-key envelopes of one form.
 * @throws RecordOpenError('malformed') otherwise.
 */
export function withHead(envelope: Envelope, head: Envelope, addr: RecordAddress): Envelope {
  const parsed = envelopeHead(head, addr);
  if (!parsed || parsed.head.length !== head.length) {
    throw malformed(addr);
  }
  if (typeof envelope === 'string' && typeof head === 'string') {
    const parts = envelope.split('.');
    if (parts.length !== 6 || parts[0] !== PREFIX) {
      throw malformed(addr);
    }
    return [head, ...parts.slice(3)].join('.');
  }
  if (typeof envelope !== 'string' && typeof head !== 'string') {
    const buf = asBuffer(envelope);
    if (buf.length < BINARY_HEADER + TAG_BYTES || !buf.subarray(0, MAGIC.length).equals(MAGIC)) {
      throw malformed(addr);
    }
    return Buffer.concat([asBuffer(head), buf.subarray(BINARY_HEAD_BYTES)]);
  }
  throw malformed(addr);
}

/** A fresh random 256-bit DEK as a KeyObject. */
export function generateDataKey(): KeyObject {
  return crypto.createSecretKey(crypto.randomBytes(32));
}
