/**
 * Record encryption: AES-256-GCM (node:crypto), a random 96-bit IV per seal, a 128-bit tag,
 * and AAD `tenantId|table|recordId` so a sealed value copied to another tenant, table or
 * record fails to open. The envelope names its DEK version:
 *
 *     ccds1.<keyVersion>.<iv b64url>.<ciphertext b64url>.<tag b64url>
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

/** Seals `plaintext` under `key` for `addr`. */
export function sealRecord(key: SealingKey, addr: RecordAddress, plaintext: Buffer): string {
  const iv = crypto.randomBytes(IV_BYTES);
  const cipher = crypto.createCipheriv('aes-256-gcm', key.key, iv, { authTagLength: TAG_BYTES });
  cipher.setAAD(Buffer.from(recordAad(addr), 'utf8'));
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

/**
 * The DEK version an envelope names.
 * @throws RecordOpenError('malformed') if it is not a well-formed envelope.
 */
export function envelopeVersion(envelope: string, addr: RecordAddress): number {
  return parseEnvelope(envelope, addr).version;
}

interface ParsedEnvelope {
  version: number;
  iv: Buffer;
  ct: Buffer;
  tag: Buffer;
}

function parseEnvelope(envelope: string, addr: RecordAddress): ParsedEnvelope {
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
  envelope: string,
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
export function openRecordWithKey(envelope: string, addr: RecordAddress, key: SealingKey): Buffer {
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
