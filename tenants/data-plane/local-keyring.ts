/**
 * The default key provider: one local keyring file per region, `<keyDir>/<region>.keyring.json`
 * (directory 0700, file 0600, created on first start, kept outside the tenant stores).
 *
 * It holds versioned KEKs and one random provider key per tenant, all as `oct` JWKs. A tenant's
 * DEK-wrapping key is derived, never stored:
 *
 *     wrapKey(tenant, v) = HKDF-SHA256(ikm = KEK_v, salt = tenantKey, info = "cellcds/dek-wrap/1|region|tenant|v")
 *
 * and a DEK is wrapped as a JWE (compact; `A256KW` + `A256GCM`, node-jose) whose protected
 * header names the KEK (`kid`), the tenant key id (`ccds.tk`) and the caller's AAD
 * (`ccds.aad`). Destroying the tenant key (crypto-shredding) makes every wrap of that tenant,
 * including those in old backups, impossible to unwrap even with every KEK.
 *
 * Writes are read-modify-write under an exclusive lock file and replace the keyring atomically
 * (temp file, fsync, rename, fsync of the folder). Another process's changes are picked up by
 * checking the file's identity before each use.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import nodeJose from 'node-jose';
import { z } from 'zod';
import { KeyUnavailableError } from './errors.ts';
import { assertRegionId, assertTenantId, sleep } from './ids.ts';
import type { KeyProvider, KeyProviderHealth, KeyProviderInfo, WrappedDek } from './types.ts';

const FORMAT = 'cellcds-keyring/1';
const KDF_INFO = 'cellcds/dek-wrap/1';
const LOCK_TIMEOUT_MS = 10_000;
const B64URL_256 = /^[A-Za-z0-9_-]{43}$/;

const jwkSchema = z.strictObject({
  kty: z.literal('oct'),
  kid: z.string().min(1).max(100),
  k: z.string().regex(B64URL_256, 'must be a 256-bit base64url key'),
  use: z.literal('enc').optional(),
  alg: z.string().optional(),
});

const keyringSchema = z.strictObject({
  format: z.literal(FORMAT),
  region: z.string(),
  createdAt: z.string(),
  keks: z
    .array(
      z.strictObject({
        version: z.number().int().min(1),
        status: z.enum(['primary', 'retiring', 'retired']),
        createdAt: z.string(),
        jwk: jwkSchema,
      }),
    )
    .min(1),
  tenants: z.record(
    z.string(),
    z.strictObject({ keyId: z.string().min(1).max(100), createdAt: z.string(), jwk: jwkSchema }),
  ),
  destroyed: z.record(z.string(), z.string()),
});

type Keyring = z.infer<typeof keyringSchema>;
type Jwk = z.infer<typeof jwkSchema>;

/** Options of `createLocalKeyProvider`. */
export interface LocalKeyProviderOptions {
  /** Folder of the keyring files (created 0700). Keep it outside the tenant store folders. */
  keyDir: string;
  region: string;
  now?: () => Date;
}

/** The keyring file of a region. */
export function keyringPath(keyDir: string, region: string): string {
  return path.join(keyDir, `${region}.keyring.json`);
}

async function newOctJwk(kid: string): Promise<Jwk> {
  const key = await nodeJose.JWK.createKey('oct', 256, { kid, use: 'enc' });
  const json = key.toJSON(true) as Record<string, unknown>;
  return jwkSchema.parse({ kty: 'oct', kid, k: json.k, use: 'enc' });
}

function keyBytes(jwk: Jwk): Buffer {
  return Buffer.from(jwk.k, 'base64url');
}

/** Rebuilds the tenant maps with a null prototype (tenant ids such as `constructor` are valid). */
function normalise(ring: Keyring): Keyring {
  const tenants: Keyring['tenants'] = Object.create(null) as Keyring['tenants'];
  for (const [t, entry] of Object.entries(ring.tenants)) {
    assertTenantId(t);
    tenants[t] = entry;
  }
  const destroyed: Keyring['destroyed'] = Object.create(null) as Keyring['destroyed'];
  for (const [t, at] of Object.entries(ring.destroyed)) {
    assertTenantId(t);
    destroyed[t] = at;
  }
  return { ...ring, tenants, destroyed };
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

interface ProtectedHeader {
  kekVersion: number;
  tenantKeyId: string;
  aad: string;
}

function parseProtectedHeader(wrapped: string, tenant: string): ProtectedHeader {
  const bad = () => new KeyUnavailableError('unwrap_failed', `malformed wrapped DEK of ${tenant}`);
  const parts = wrapped.split('.');
  if (parts.length !== 5 || parts[0] === undefined) {
    throw bad();
  }
  let header: unknown;
  try {
    header = JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8'));
  } catch {
    throw bad();
  }
  const h = header as Record<string, unknown>;
  const kid = typeof h.kid === 'string' ? /^kek-([1-9][0-9]{0,8})$/.exec(h.kid) : null;
  if (
    h.alg !== 'A256KW' ||
    h.enc !== 'A256GCM' ||
    h.zip !== undefined ||
    kid?.[1] === undefined ||
    typeof h['ccds.tk'] !== 'string' ||
    typeof h['ccds.aad'] !== 'string'
  ) {
    throw bad();
  }
  return { kekVersion: Number(kid[1]), tenantKeyId: h['ccds.tk'], aad: h['ccds.aad'] };
}

/**
 * Opens (creating on first start) the region's local keyring and returns it as a KeyProvider.
 * @throws KeyUnavailableError('provider') if the file is unreadable, malformed, for another
 *   region, or readable by group/others (it must be 0600).
 */
export async function createLocalKeyProvider(opts: LocalKeyProviderOptions): Promise<KeyProvider> {
  assertRegionId(opts.region);
  const region = opts.region;
  const now = opts.now ?? (() => new Date());
  const keyDir = path.resolve(opts.keyDir);
  const file = keyringPath(keyDir, region);
  const lockFile = `${file}.lock`;
  let cache: { ring: Keyring; id: string } | undefined;
  /** Derived wrapping keys: `tenant|keyId|kekVersion` -> node-jose key. */
  const wrapKeys = new Map<string, nodeJose.JWK.Key>();
  let queue: Promise<unknown> = Promise.resolve();

  const providerError = (detail: string, cause?: unknown) =>
    new KeyUnavailableError('provider', `keyring ${region}: ${detail}`, cause);

  function fileIdentity(st: fs.Stats): string {
    return `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
  }

  function readRing(): Keyring {
    let st: fs.Stats;
    try {
      st = fs.statSync(file);
    } catch (err) {
      throw providerError('file is missing', err);
    }
    if ((st.mode & 0o077) !== 0) {
      throw providerError('file must not be readable by group or others (chmod 600)');
    }
    const id = fileIdentity(st);
    if (cache?.id === id) {
      return cache.ring;
    }
    let ring: Keyring;
    try {
      const parsed = keyringSchema.safeParse(JSON.parse(fs.readFileSync(file, 'utf8')));
      if (!parsed.success) {
        throw new Error(parsed.error.issues.map((i) => i.path.join('.')).join(', '));
      }
      ring = parsed.data;
    } catch (err) {
      throw providerError('file is malformed', err);
    }
    if (ring.region !== region) {
      throw providerError('file belongs to another region');
    }
    if (ring.keks.filter((k) => k.status === 'primary').length !== 1) {
      throw providerError('file must have exactly one primary KEK');
    }
    ring = normalise(ring);
    cache = { ring, id };
    return ring;
  }

  function writeRing(ring: Keyring): void {
    const tmp = `${file}.tmp-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
    const fd = fs.openSync(tmp, 'wx', 0o600);
    try {
      fs.writeFileSync(fd, `${JSON.stringify(ring, null, 2)}\n`);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    fsyncDir(keyDir);
    cache = undefined;
  }

  async function withFileLock<T>(fn: () => Promise<T>): Promise<T> {
    const deadline = Date.now() + LOCK_TIMEOUT_MS;
    for (;;) {
      try {
        const fd = fs.openSync(lockFile, 'wx', 0o600);
        fs.writeSync(fd, String(process.pid));
        fs.closeSync(fd);
        break;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw providerError('cannot create lock file', err);
        }
        let holder = NaN;
        try {
          holder = Number(fs.readFileSync(lockFile, 'utf8'));
        } catch {
          // The holder just released it: retry.
        }
        if (Number.isInteger(holder) && holder > 0 && !isAlive(holder)) {
          fs.rmSync(lockFile, { force: true });
          continue;
        }
        if (Date.now() > deadline) {
          throw providerError('keyring is locked by another process');
        }
        await sleep(20);
      }
    }
    try {
      return await fn();
    } finally {
      fs.rmSync(lockFile, { force: true });
    }
  }

  /** Serialises this process's mutations, then locks the file against other processes. */
  function mutate<T>(fn: (ring: Keyring) => Promise<T> | T): Promise<T> {
    const run = queue.then(() =>
      withFileLock(async () => {
        cache = undefined;
        const ring = normalise(structuredClone(readRing()));
        const result = await fn(ring);
        writeRing(ring);
        return result;
      }),
    );
    queue = run.catch(() => undefined);
    return run;
  }

  async function initialise(): Promise<void> {
    fs.mkdirSync(keyDir, { recursive: true, mode: 0o700 });
    if (fs.existsSync(file)) {
      readRing();
      return;
    }
    await withFileLock(async () => {
      if (fs.existsSync(file)) {
        return;
      }
      const at = now().toISOString();
      writeRing({
        format: FORMAT,
        region,
        createdAt: at,
        keks: [{ version: 1, status: 'primary', createdAt: at, jwk: await newOctJwk('kek-1') }],
        tenants: {},
        destroyed: {},
      });
    });
    readRing();
  }

  function primaryKek(ring: Keyring): Keyring['keks'][number] {
    const kek = ring.keks.find((k) => k.status === 'primary');
    if (!kek) {
      throw providerError('no primary KEK');
    }
    return kek;
  }

  function tenantEntry(ring: Keyring, tenant: string): Keyring['tenants'][string] {
    const entry = ring.tenants[tenant];
    if (!entry) {
      throw new KeyUnavailableError(
        'tenant_key_destroyed',
        `tenant ${tenant} holds no provider key in region ${region}`,
      );
    }
    return entry;
  }

  async function wrapKeyFor(
    tenant: string,
    entry: Keyring['tenants'][string],
    kek: Keyring['keks'][number],
  ): Promise<nodeJose.JWK.Key> {
    const cacheKey = `${tenant}|${entry.keyId}|${kek.version}`;
    const cached = wrapKeys.get(cacheKey);
    if (cached) {
      return cached;
    }
    const derived = Buffer.from(
      crypto.hkdfSync(
        'sha256',
        keyBytes(kek.jwk),
        keyBytes(entry.jwk),
        `${KDF_INFO}|${region}|${tenant}|${kek.version}`,
        32,
      ),
    );
    const key = await nodeJose.JWK.asKey({
      kty: 'oct',
      kid: `kek-${kek.version}`,
      alg: 'A256KW',
      k: derived.toString('base64url'),
    });
    derived.fill(0);
    wrapKeys.set(cacheKey, key);
    return key;
  }

  function forgetWrapKeys(tenant: string): void {
    for (const k of [...wrapKeys.keys()]) {
      if (k.startsWith(`${tenant}|`)) {
        wrapKeys.delete(k);
      }
    }
  }

  async function wrapRaw(tenant: string, raw: Buffer, aad: string): Promise<WrappedDek> {
    const ring = readRing();
    const entry = tenantEntry(ring, tenant);
    const kek = primaryKek(ring);
    const key = await wrapKeyFor(tenant, entry, kek);
    const jwe = await nodeJose.JWE.createEncrypt(
      {
        format: 'compact',
        contentAlg: 'A256GCM',
        fields: {
          alg: 'A256KW',
          kid: `kek-${kek.version}`,
          'ccds.tk': entry.keyId,
          'ccds.aad': aad,
        },
      },
      key,
    )
      .update(raw)
      .final();
    return { wrapped: jwe, kekVersion: kek.version };
  }

  async function unwrapRaw(tenant: string, wrapped: string, aad: string): Promise<Buffer> {
    const header = parseProtectedHeader(wrapped, tenant);
    const ring = readRing();
    const entry = tenantEntry(ring, tenant);
    if (header.aad !== aad) {
      // Another tenant's, region's or version's wrap copied here.
      throw new KeyUnavailableError('unwrap_failed', `wrapped DEK of ${tenant} is bound elsewhere`);
    }
    if (header.tenantKeyId !== entry.keyId) {
      // Wrapped under an earlier (destroyed) key of this tenant id, e.g. a pre-deprovision
      // backup; or under another tenant's key.
      if (ring.destroyed[tenant] !== undefined) {
        throw new KeyUnavailableError(
          'tenant_key_destroyed',
          `DEK of ${tenant} was wrapped under a destroyed tenant key`,
        );
      }
      throw new KeyUnavailableError(
        'unwrap_failed',
        `wrapped DEK of ${tenant} names another tenant key`,
      );
    }
    const kek = ring.keks.find((k) => k.version === header.kekVersion);
    if (!kek) {
      throw new KeyUnavailableError('unknown_kek', `KEK version ${header.kekVersion} is unknown`);
    }
    const key = await wrapKeyFor(tenant, entry, kek);
    let result: nodeJose.JWE.DecryptResult;
    try {
      result = await nodeJose.JWE.createDecrypt(key, { algorithms: ['A256KW', 'A256GCM'] }).decrypt(
        wrapped,
      );
    } catch (err) {
      throw new KeyUnavailableError(
        'unwrap_failed',
        `wrapped DEK of ${tenant} failed to open`,
        err,
      );
    }
    const h = result.header as Record<string, unknown>;
    if (h['ccds.aad'] !== aad || h['ccds.tk'] !== entry.keyId || result.plaintext.length !== 32) {
      result.plaintext.fill(0);
      throw new KeyUnavailableError('unwrap_failed', `wrapped DEK of ${tenant} is bound elsewhere`);
    }
    return result.plaintext;
  }

  await initialise();

  return {
    region,

    describe(): Promise<KeyProviderInfo> {
      const ring = readRing();
      return Promise.resolve({
        kind: 'local-keyring',
        region,
        location: file,
        primaryKekVersion: primaryKek(ring).version,
        keks: ring.keks.map((k) => ({
          version: k.version,
          status: k.status,
          createdAt: k.createdAt,
        })),
        tenantKeys: Object.keys(ring.tenants).length,
      });
    },

    async health(): Promise<KeyProviderHealth> {
      try {
        const ring = readRing();
        const kek = primaryKek(ring);
        // Round-trip a throwaway key under a throwaway tenant key: proves KEK + JWE work.
        const probe = { keyId: 'probe', createdAt: '', jwk: await newOctJwk('probe') };
        const key = await wrapKeyFor('health-probe', probe, kek);
        forgetWrapKeys('health-probe');
        const secret = crypto.randomBytes(32);
        const jwe = await nodeJose.JWE.createEncrypt(
          { format: 'compact', contentAlg: 'A256GCM', fields: { alg: 'A256KW' } },
          key,
        )
          .update(secret)
          .final();
        const back = await nodeJose.JWE.createDecrypt(key).decrypt(jwe);
        const ok = crypto.timingSafeEqual(back.plaintext, secret);
        return ok
          ? { ok, kind: 'local-keyring' }
          : { ok, kind: 'local-keyring', detail: 'round trip' };
      } catch (err) {
        const detail = err instanceof KeyUnavailableError ? err.message : 'keyring unusable';
        return { ok: false, kind: 'local-keyring', detail };
      }
    },

    async createTenantKey(tenant, createOpts = {}) {
      assertTenantId(tenant);
      if (readRing().tenants[tenant]) {
        return 'exists';
      }
      const jwk = await newOctJwk(`tk-${crypto.randomUUID()}`);
      return mutate((ring) => {
        if (ring.tenants[tenant]) {
          return 'exists' as const;
        }
        if (ring.destroyed[tenant] !== undefined && createOpts.recreate !== true) {
          throw new KeyUnavailableError(
            'tenant_key_destroyed',
            `tenant ${tenant} was deprovisioned in region ${region}; provision it again explicitly`,
          );
        }
        // The tombstone stays: it tells wraps under the destroyed key apart from foreign ones.
        ring.tenants[tenant] = { keyId: jwk.kid, createdAt: now().toISOString(), jwk };
        return 'created' as const;
      });
    },

    hasTenantKey(tenant) {
      assertTenantId(tenant);
      return Promise.resolve(readRing().tenants[tenant] !== undefined);
    },

    async wrapDek(tenant: string, dek: KeyObject, aad: string) {
      assertTenantId(tenant);
      const raw = dek.export();
      try {
        return await wrapRaw(tenant, raw, aad);
      } finally {
        raw.fill(0);
      }
    },

    async unwrapDek(tenant, wrapped, aad) {
      assertTenantId(tenant);
      const raw = await unwrapRaw(tenant, wrapped, aad);
      try {
        return crypto.createSecretKey(raw);
      } finally {
        raw.fill(0);
      }
    },

    async rewrapDek(tenant, wrapped, aad) {
      assertTenantId(tenant);
      const raw = await unwrapRaw(tenant, wrapped, aad);
      try {
        return await wrapRaw(tenant, raw, aad);
      } finally {
        raw.fill(0);
      }
    },

    async destroyTenantKey(tenant) {
      assertTenantId(tenant);
      const existed = await mutate((ring) => {
        const had = ring.tenants[tenant] !== undefined;
        // eslint-disable-next-line @typescript-eslint/no-dynamic-delete -- null-prototype map
        delete ring.tenants[tenant];
        ring.destroyed[tenant] = now().toISOString();
        return had;
      });
      forgetWrapKeys(tenant);
      return existed;
    },

    async rotateKek() {
      const guess = Math.max(...readRing().keks.map((k) => k.version)) + 1;
      const prepared = await newOctJwk(`kek-${guess}`);
      const fresh = async (version: number) =>
        version === guess ? prepared : newOctJwk(`kek-${version}`);
      return mutate(async (ring) => {
        const version = Math.max(...ring.keks.map((k) => k.version)) + 1;
        const jwk = await fresh(version);
        const retiring: number[] = [];
        for (const k of ring.keks) {
          if (k.status !== 'retired') {
            k.status = 'retiring';
            retiring.push(k.version);
          }
        }
        ring.keks.push({ version, status: 'primary', createdAt: now().toISOString(), jwk });
        return { primary: version, retiring };
      });
    },

    async completeKekRotation() {
      await mutate((ring) => {
        for (const k of ring.keks) {
          if (k.status === 'retiring') {
            k.status = 'retired';
          }
        }
      });
    },
  };
}
