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
 * Writes are read-modify-write under an OS lock and replace the keyring atomically (temp file,
 * fsync, rename, fsync of the folder). Another process's changes are picked up by checking the
 * file's identity before each use.
 *
 * The lock is an exclusive SQLite transaction on `<file>.mutex`, an empty database that is never
 * written or deleted: SQLite takes a POSIX record lock (Windows: LockFileEx), which the kernel
 * drops when its holder dies, however it dies, and which excludes connections of the same process
 * too. Node has no `flock`/`fcntl` of its own; sqlite3 is already a dependency of the data plane.
 * A lock *file* (O_EXCL + the holder's pid) cannot tell a crashed holder from a live one for sure
 * (pid reuse, e.g. a restarted container's pid 1, or a holder in another PID namespace), and
 * without a compare-and-delete two processes can both "reclaim" it. Never open `<file>.mutex`
 * with `fs` in a process that uses the keyring: closing any descriptor of a file drops that
 * process's record locks on it.
 *
 * Every write happens under the lock, so whoever holds it may remove what a crashed writer left
 * (`<file>.tmp-*`: a full copy of every key; `<file>.lock` of older versions): at start and on
 * every locked mutation, so a crypto-shred also removes temp copies of the shredded key.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import nodeJose from 'node-jose';
import sqlite3 from 'sqlite3';
import { z } from 'zod';
import { KeyUnavailableError } from './errors.ts';
import { fsyncPath } from './fsync.ts';
import { assertRegionId, assertTenantId, sleep } from './ids.ts';
import type { KeyProvider, KeyProviderHealth, KeyProviderInfo, WrappedDek } from './types.ts';

const FORMAT = 'cellcds-keyring/1';
const KDF_INFO = 'cellcds/dek-wrap/1';
const KEYRING_ID_INFO = 'cellcds/keyring-id/1';
const LOCK_TIMEOUT_MS = 10_000;
const LOCK_POLL_MS = 20;
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
  /**
   * Make the keyring when its file is missing (default true). Only the server makes a region's
   * keyring: an operator command (`cellcds migrate`, `evidence`) passes false, so a wrong or
   * empty `keyDir` is refused, naming the file, instead of getting a new keyring that holds none
   * of the region's keys (and that a region no server opened yet would be bound to).
   */
  create?: boolean;
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

/**
 * The keyring's identity: 128 bits derived (HKDF-SHA256, a label of its own) from its first
 * KEK, which a keyring keeps for life (a rotation adds a version and retires older ones, never
 * removes them). Every copy of one keyring, a restored backup of it included, has the same id;
 * any other keyring, even of the same region, another. One-way: it reveals nothing of the KEK.
 */
function keyringIdOf(ring: Keyring): string {
  const first = ring.keks.reduce((a, b) => (b.version < a.version ? b : a));
  const ikm = keyBytes(first.jwk);
  try {
    const id = crypto.hkdfSync(
      'sha256',
      ikm,
      Buffer.alloc(0),
      `${KEYRING_ID_INFO}|${ring.region}`,
      16,
    );
    return `kr-${Buffer.from(id).toString('hex')}`;
  } finally {
    ikm.fill(0);
  }
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

function openLockDb(lockFile: string): Promise<sqlite3.Database> {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(
      lockFile,
      sqlite3.OPEN_READWRITE | sqlite3.OPEN_CREATE,
      (err: Error | null) => {
        if (err) {
          reject(err);
        } else {
          resolve(db);
        }
      },
    );
  });
}

function execLockDb(db: sqlite3.Database, sql: string): Promise<void> {
  return new Promise((resolve, reject) => {
    db.exec(sql, (err: Error | null) => {
      if (err) {
        reject(err);
      } else {
        resolve();
      }
    });
  });
}

/** Closing the connection rolls back its (empty) transaction, which releases the lock. */
function closeLockDb(db: sqlite3.Database): Promise<void> {
  return new Promise((resolve, reject) => {
    db.close((err: Error | null) => {
      if (err) {
        reject(err);
      } else {
        resolve();
      }
    });
  });
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
 * Opens (creating on first start, unless `create: false`) the region's local keyring and
 * returns it as a KeyProvider.
 * @throws KeyUnavailableError('provider') if the file is missing (with `create: false`),
 *   unreadable, malformed, for another region, or readable by group/others (it must be 0600).
 */
export async function createLocalKeyProvider(opts: LocalKeyProviderOptions): Promise<KeyProvider> {
  assertRegionId(opts.region);
  const region = opts.region;
  const now = opts.now ?? (() => new Date());
  const keyDir = path.resolve(opts.keyDir);
  const file = keyringPath(keyDir, region);
  const lockFile = `${file}.mutex`;
  /** What a crashed writer may leave: its temp file, or an older version's lock file. */
  const isLeftover = (name: string) =>
    name.startsWith(`${path.basename(file)}.tmp-`) || name === `${path.basename(file)}.lock`;
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
    try {
      const fd = fs.openSync(tmp, 'wx', 0o600);
      try {
        fs.writeFileSync(fd, `${JSON.stringify(ring, null, 2)}\n`);
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, file);
    } catch (err) {
      // It holds every key: never leave it behind. (Not zeroed first: the keyring's own earlier
      // versions, freed by each rename, leave the same bytes in free blocks.) If even this
      // fails, the next holder of the lock removes it.
      try {
        fs.rmSync(tmp, { force: true });
      } catch {
        // Reported below with the write error.
      }
      throw providerError('cannot write the keyring', err);
    } finally {
      cache = undefined;
    }
    try {
      fsyncPath(keyDir);
    } catch (err) {
      throw providerError('cannot sync the keyring folder', err);
    }
  }

  function leftovers(): string[] {
    try {
      return fs.readdirSync(keyDir).filter(isLeftover);
    } catch (err) {
      throw providerError('cannot list the keyring folder', err);
    }
  }

  /** Only with the lock held: then no live writer owns a temp file. */
  function removeLeftovers(): void {
    const names = leftovers();
    if (names.length === 0) {
      return;
    }
    try {
      for (const name of names) {
        fs.rmSync(path.join(keyDir, name), { force: true });
      }
      fsyncPath(keyDir);
    } catch (err) {
      // Fail closed: a temp copy that stays would outlive a crypto-shred.
      throw providerError('cannot remove a temp file left by a crashed write', err);
    }
  }

  /** Takes the OS lock (SQLite EXCLUSIVE transaction on `lockFile`), polling up to 10 s. */
  async function acquireLock(): Promise<sqlite3.Database> {
    let db: sqlite3.Database;
    try {
      db = await openLockDb(lockFile);
    } catch (err) {
      throw providerError('cannot open the lock file', err);
    }
    // SQLite creates it with 0644; it is empty, but keep the folder's files private. chmod
    // takes no descriptor (closing one would drop this process's locks on the file).
    try {
      if ((fs.statSync(lockFile).mode & 0o077) !== 0) {
        fs.chmodSync(lockFile, 0o600);
      }
    } catch (err) {
      await closeLockDb(db).catch(() => undefined);
      throw providerError('cannot secure the lock file', err);
    }
    // Poll here rather than in SQLite's busy handler, which would sleep on a libuv thread.
    db.configure('busyTimeout', 0);
    const deadline = Date.now() + LOCK_TIMEOUT_MS;
    for (;;) {
      try {
        // journal_mode OFF: nothing is written, so no -journal file may outlive a crash.
        await execLockDb(db, 'PRAGMA journal_mode = OFF; BEGIN EXCLUSIVE');
        return db;
      } catch (err) {
        const busy = (err as { code?: unknown }).code === 'SQLITE_BUSY';
        if (!busy || Date.now() > deadline) {
          await closeLockDb(db).catch(() => undefined);
          throw busy
            ? providerError('keyring is locked by another process')
            : providerError('cannot lock the keyring', err);
        }
        await sleep(LOCK_POLL_MS);
      }
    }
  }

  async function withKeyringLock<T>(fn: () => Promise<T>): Promise<T> {
    const db = await acquireLock();
    let result: T;
    try {
      removeLeftovers();
      result = await fn();
    } catch (err) {
      await closeLockDb(db).catch(() => undefined);
      throw err;
    }
    try {
      await closeLockDb(db);
    } catch (err) {
      throw providerError('cannot release the lock', err);
    }
    return result;
  }

  /** Serialises this process's mutations, then takes the keyring lock against other processes. */
  function mutate<T>(fn: (ring: Keyring) => Promise<T> | T): Promise<T> {
    const run = queue.then(() =>
      withKeyringLock(async () => {
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
    if (opts.create === false && !fs.existsSync(file)) {
      // Before anything is made: not the folder, not the lock file.
      throw providerError(
        `no keyring file at ${file}, and this command does not create one (only the server ` +
          `does: cellcds serve, npm start): a new keyring would hold none of region ${region}'s ` +
          `keys. Start the region's servers once (cellcds serve --region ${region}) with the ` +
          `region's real keyring, or point this host's keyProvider.dir for ${region} ` +
          `(CELLCDS_REGIONS_FILE; CELLCDS_DATA_DIR keys/ without one) at the folder that holds ` +
          `it. Nothing was created`,
      );
    }
    fs.mkdirSync(keyDir, { recursive: true, mode: 0o700 });
    if (fs.existsSync(file) && leftovers().length === 0) {
      readRing();
      return;
    }
    // Creates the keyring, or removes what a crashed writer left (under the lock).
    await withKeyringLock(async () => {
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

  /**
   * The tenant's key, needed to wrap or unwrap (its store exists: a new tenant gets its key from
   * `createTenantKey` first). Absent with a tombstone: crypto-shredded here. Absent without one:
   * this copy of the keyring never held it: most likely an older copy of the region's keyring
   * (another keyring is refused when the stores are opened, keyring-binding.ts). Never reported
   * as a shred.
   */
  function tenantEntry(ring: Keyring, tenant: string): Keyring['tenants'][string] {
    const entry = ring.tenants[tenant];
    if (entry) {
      return entry;
    }
    if (ring.destroyed[tenant] !== undefined) {
      throw new KeyUnavailableError(
        'tenant_key_destroyed',
        `tenant ${tenant} holds no provider key in region ${region}: destroyed at ${ring.destroyed[tenant]}`,
      );
    }
    throw new KeyUnavailableError(
      'tenant_key_missing',
      `the keyring ${file} of this replica holds no key of tenant ${tenant} and never destroyed one: ` +
        `is it an older copy of region ${region}'s keyring (restored from a backup taken before ` +
        `the tenant's key was made)? Every replica must share the region's one keyring ` +
        `(keyProvider.dir) or KMS`,
    );
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
        keyringId: keyringIdOf(ring),
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
