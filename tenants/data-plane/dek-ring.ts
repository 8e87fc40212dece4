/**
 * A tenant's DEK versions: random 256-bit keys, stored only wrapped by the region's key
 * provider (`dek_versions`), unwrapped on demand into the handle's in-memory cache. Every
 * create, unwrap and destroy is an audit event in the tenant's chain.
 */
import type { KeyObject } from 'node:crypto';
import { UniqueConstraintError } from 'sequelize';
import type { Transaction } from 'sequelize';
import { appendAudit, appendAuditInTx } from './audit-chain.ts';
import { KeyUnavailableError } from './errors.ts';
import { TABLES } from './models.ts';
import type { DekRow } from './models.ts';
import { generateDataKey } from './record-cipher.ts';
import { usageByVersion } from './record-heads.ts';
import type { SealingKey } from './record-cipher.ts';
import type { PrimaryDek, StoreHandle } from './store-backend.ts';
import type { DekStatus, DekVersionInfo, KeyProvider } from './types.ts';
import type { WrapLimits } from './wrap-limit.ts';

/** What DEK operations need from the region. */
export interface KeyContext {
  provider: KeyProvider;
  now: () => Date;
  /** The wrap limits of DEK versions (wrap-limit.ts); DEFAULT_WRAP_LIMITS if absent. */
  wrapLimits?: WrapLimits;
}

/** The AAD bound into a wrapped DEK: region, tenant and version. */
export function dekAad(region: string, tenant: string, version: number): string {
  return `${region}|${tenant}|dek|${version}`;
}

const pendingUnwraps = new WeakMap<StoreHandle, Map<number, Promise<KeyObject>>>();

/**
 * Which DEK row each plaintext key came from: the row's `created_at` (see PrimaryDek). A
 * version number alone does not name a key: numbers start again at 1 after a deprovision +
 * re-provision, and a restore + rotation makes another key under a number another process may
 * still hold in its cache (or parked, region-stores.ts). Kept beside the key object, so it
 * travels with it wherever the key is cached.
 */
const dekIdentity = new WeakMap<KeyObject, string>();

/** A DEK ready for sealing, with the identity of the row it came from. */
export interface IdentifiedKey extends SealingKey {
  /** `created_at` of the DEK row the key was unwrapped from (or created as). */
  createdAt: string;
}

/** Caches a DEK that was just created (it is the row's key by construction). */
export function rememberDek(h: StoreHandle, version: number, key: KeyObject, createdAt: string) {
  dekIdentity.set(key, createdAt);
  h.deks.set(version, key);
}

/** Drops `key` from the handle's cache if it is still the one cached for `version`. */
export function forgetDek(h: StoreHandle, version: number, key: KeyObject): void {
  if (h.deks.get(version) === key) {
    h.deks.delete(version);
  }
}

/**
 * Drops the cached `key` of `version` if it is not the key of the store's current row of that
 * version (another one under a reused number, or a version destroyed meanwhile). Returns true
 * if it was dropped: a record that failed to open with it may open with the row's own key.
 */
export async function dropIfStale(
  h: StoreHandle,
  version: number,
  key: KeyObject,
): Promise<boolean> {
  const row = await h.models.Dek.findByPk(version, { raw: true });
  if (row && row.wrapped !== null && row.createdAt === dekIdentity.get(key)) {
    return false;
  }
  forgetDek(h, version, key);
  return true;
}

/**
 * Gives a store with no DEK its provider key (if missing) and DEK version 1 (primary).
 * @throws KeyUnavailableError('tenant_key_destroyed') for a deprovisioned tenant.
 */
export async function ensureInitialDek(
  h: StoreHandle,
  ctx: KeyContext,
  opts: { recreate?: boolean } = {},
): Promise<void> {
  if ((await h.models.Dek.count()) > 0) {
    return;
  }
  await ctx.provider.createTenantKey(h.tenant, opts);
  const dek = generateDataKey();
  const wrapped = await ctx.provider.wrapDek(h.tenant, dek, dekAad(h.region, h.tenant, 1));
  const create = h.writeTx(async (t) => {
    if ((await h.models.Dek.count({ transaction: t })) > 0) {
      return undefined;
    }
    const at = ctx.now();
    await h.models.Dek.create(
      {
        version: 1,
        status: 'primary',
        wrapped: wrapped.wrapped,
        kekVersion: wrapped.kekVersion,
        compromised: 0,
        createdAt: at.toISOString(),
        retiredAt: null,
        destroyedAt: null,
        wrapCount: 0,
      },
      { transaction: t },
    );
    await appendAuditInTx(
      h,
      t,
      {
        type: 'key.create',
        outcome: 'success',
        detail: { version: 1, kekVersion: wrapped.kekVersion },
      },
      at,
    );
    return at.toISOString();
  });
  let created: string | undefined;
  try {
    created = await create;
  } catch (err) {
    // Another replica inserted v1 between this one's count and its insert (PostgreSQL, READ
    // COMMITTED): theirs stands, this one's key is dropped unused, and v1 is unwrapped from the
    // store when first needed.
    if (err instanceof UniqueConstraintError && (await h.models.Dek.count()) > 0) {
      return;
    }
    throw err;
  }
  if (created) {
    rememberDek(h, 1, dek, created);
  }
}

/**
 * The primary DEK version's row (number and identity), unlocked: a write checks it again.
 * @throws KeyUnavailableError('dek_destroyed') if the store has none (all destroyed).
 */
export async function primaryDek(h: StoreHandle, t?: Transaction): Promise<PrimaryDek> {
  const row = await h.models.Dek.findOne({
    where: { status: 'primary' },
    raw: true,
    ...(t ? { transaction: t } : {}),
  });
  if (!row) {
    throw new KeyUnavailableError('dek_destroyed', `tenant ${h.tenant} has no primary DEK`);
  }
  return { version: row.version, createdAt: row.createdAt, wrapCount: Number(row.wrapCount) };
}

/**
 * The primary DEK version.
 * @throws KeyUnavailableError('dek_destroyed') if the store has none (all destroyed).
 */
export async function primaryVersion(h: StoreHandle, t?: Transaction): Promise<number> {
  return (await primaryDek(h, t)).version;
}

/** Does `key` (sealed under `version`) belong to the primary row `locked`? */
export function isKeyOf(
  locked: PrimaryDek | undefined,
  key: { version: number; createdAt: string },
): boolean {
  return locked?.version === key.version && locked.createdAt === key.createdAt;
}

/**
 * PostgreSQL: locks the primary DEK row FOR UPDATE, the first lock of a transaction that
 * changes DEK rows (WriteOptions: the primary row first, then anything else). Waits for every
 * write that checked the primary version (FOR NO KEY UPDATE) to commit. SQLite: the write lock does it.
 */
export async function lockPrimaryForUpdate(h: StoreHandle, t: Transaction): Promise<void> {
  if (h.dialect === 'postgres') {
    await h.raw(
      t,
      `SELECT version FROM ${h.qualified(TABLES.deks)} WHERE status = 'primary' FOR UPDATE`,
      [],
    );
  }
}

/**
 * The plaintext DEK of `version` (cached, or unwrapped by the provider and audited).
 * Never call it while holding the store's write queue (the audit append needs it).
 * @throws KeyUnavailableError (destroyed version, destroyed tenant key, unwrap failure).
 */
export function getDek(h: StoreHandle, ctx: KeyContext, version: number): Promise<KeyObject> {
  const cached = h.deks.get(version);
  if (cached) {
    return Promise.resolve(cached);
  }
  let pending = pendingUnwraps.get(h);
  if (!pending) {
    pending = new Map();
    pendingUnwraps.set(h, pending);
  }
  const inFlight = pending.get(version);
  if (inFlight) {
    return inFlight;
  }
  const map = pending;
  const run = unwrapVersion(h, ctx, version).finally(() => map.delete(version));
  map.set(version, run);
  return run;
}

async function unwrapVersion(h: StoreHandle, ctx: KeyContext, version: number): Promise<KeyObject> {
  const row = await h.models.Dek.findByPk(version, { raw: true });
  if (!row || row.status === 'destroyed' || row.wrapped === null) {
    throw new KeyUnavailableError(
      'dek_destroyed',
      `DEK version ${version} of ${h.tenant} is destroyed or unknown`,
    );
  }
  let key: KeyObject;
  try {
    key = await ctx.provider.unwrapDek(h.tenant, row.wrapped, dekAad(h.region, h.tenant, version));
  } catch (err) {
    const reason = err instanceof KeyUnavailableError ? err.reason : 'provider';
    await appendAudit(
      h,
      { type: 'key.unwrap', outcome: 'failure', detail: { version, reason } },
      ctx.now,
    ).catch(() => undefined);
    throw err;
  }
  await appendAudit(
    h,
    {
      type: 'key.unwrap',
      outcome: 'success',
      detail: { version, kekVersion: row.kekVersion ?? 0 },
    },
    ctx.now,
  );
  rememberDek(h, version, key, row.createdAt);
  return key;
}

/**
 * The key of the DEK row `row` names: the cached one if it came from that row, else the cached
 * one is dropped and the row's key unwrapped. The result's `createdAt` is the identity of the
 * key returned (the store's row may have changed again meanwhile: the write checks it).
 * @throws KeyUnavailableError as getDek.
 */
export async function dekOfRow(
  h: StoreHandle,
  ctx: KeyContext,
  row: PrimaryDek,
): Promise<IdentifiedKey> {
  const cached = h.deks.get(row.version);
  if (cached && dekIdentity.get(cached) === row.createdAt) {
    return { version: row.version, key: cached, createdAt: row.createdAt };
  }
  if (cached) {
    forgetDek(h, row.version, cached); // another key under the same number: never seal with it
  }
  return identified(h, ctx, row.version);
}

/** The DEK of `version` (cached or unwrapped) with the identity of the row it came from. */
export async function identified(
  h: StoreHandle,
  ctx: KeyContext,
  version: number,
): Promise<IdentifiedKey> {
  const key = await getDek(h, ctx, version);
  // Every key cached comes with its identity (rememberDek); '' matches no row.
  return { version, key, createdAt: dekIdentity.get(key) ?? '' };
}

/** The primary DEK, ready for sealing: the key of the store's primary row, not just its number. */
export async function primarySealingKey(h: StoreHandle, ctx: KeyContext): Promise<IdentifiedKey> {
  return dekOfRow(h, ctx, await primaryDek(h));
}

/**
 * Erases a DEK version inside the caller's transaction (wrapped key set to NULL) and audits
 * it. The caller drops the cached plaintext (`h.deks`) once the transaction has committed.
 */
export async function destroyDekInTx(
  h: StoreHandle,
  t: Transaction,
  version: number,
  reason: string,
  at: Date,
): Promise<void> {
  await h.models.Dek.update(
    { status: 'destroyed', wrapped: null, kekVersion: null, destroyedAt: at.toISOString() },
    { where: { version }, transaction: t },
  );
  await appendAuditInTx(
    h,
    t,
    { type: 'key.destroy', outcome: 'success', detail: { version, reason } },
    at,
  );
}

/** All DEK versions with their record counts, ascending. */
export async function dekVersions(h: StoreHandle): Promise<DekVersionInfo[]> {
  const rows = await h.models.Dek.findAll({ order: [['version', 'ASC']], raw: true });
  // Current versions: a record whose head a scheduled rotation moved counts under its head's.
  const usage = await h.readTx((t) => usageByVersion(h, t));
  return rows.map((r: DekRow) => ({
    version: r.version,
    status: r.status as DekStatus,
    kekVersion: r.kekVersion,
    compromised: r.compromised === 1,
    createdAt: r.createdAt,
    ...(r.retiredAt !== null ? { retiredAt: r.retiredAt } : {}),
    ...(r.destroyedAt !== null ? { destroyedAt: r.destroyedAt } : {}),
    records: usage.get(r.version) ?? 0,
    wraps: Number(r.wrapCount),
  }));
}

/**
 * Re-wraps every live DEK not under the provider's primary KEK (KEK rotation); records are
 * untouched. Returns how many were re-wrapped.
 */
export async function rewrapDeksToPrimaryKek(
  h: StoreHandle,
  ctx: KeyContext,
  actor?: string,
): Promise<number> {
  const primaryKek = (await ctx.provider.describe()).primaryKekVersion;
  return h.writeTx(
    async (t) => {
      await lockPrimaryForUpdate(h, t); // lock order: the primary row first (WriteOptions)
      const rows = await h.models.Dek.findAll({ transaction: t, raw: true });
      let n = 0;
      for (const row of rows) {
        if (row.wrapped === null || row.kekVersion === primaryKek) {
          continue;
        }
        const next = await ctx.provider.rewrapDek(
          h.tenant,
          row.wrapped,
          dekAad(h.region, h.tenant, row.version),
        );
        await h.models.Dek.update(
          { wrapped: next.wrapped, kekVersion: next.kekVersion },
          { where: { version: row.version }, transaction: t },
        );
        n += 1;
      }
      if (n > 0) {
        await appendAuditInTx(
          h,
          t,
          {
            type: 'key.kek.rewrap',
            outcome: 'success',
            ...(actor !== undefined ? { actor } : {}),
            detail: { deks: n, kekVersion: primaryKek },
          },
          ctx.now(),
        );
      }
      return n;
    },
    { alone: true },
  );
}
