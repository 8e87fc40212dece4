/**
 * A tenant's DEK versions: random 256-bit keys, stored only wrapped by the region's key
 * provider (`dek_versions`), unwrapped on demand into the handle's in-memory cache. Every
 * create, unwrap and destroy is an audit event in the tenant's chain.
 */
import type { KeyObject } from 'node:crypto';
import type { Transaction } from 'sequelize';
import { appendAudit, appendAuditInTx } from './audit-chain.ts';
import { KeyUnavailableError } from './errors.ts';
import type { DekRow } from './models.ts';
import { generateDataKey } from './record-cipher.ts';
import { usageByVersion } from './record-heads.ts';
import type { SealingKey } from './record-cipher.ts';
import type { StoreHandle } from './store-backend.ts';
import type { DekStatus, DekVersionInfo, KeyProvider } from './types.ts';

/** What DEK operations need from the region. */
export interface KeyContext {
  provider: KeyProvider;
  now: () => Date;
}

/** The AAD bound into a wrapped DEK: region, tenant and version. */
export function dekAad(region: string, tenant: string, version: number): string {
  return `${region}|${tenant}|dek|${version}`;
}

const pendingUnwraps = new WeakMap<StoreHandle, Map<number, Promise<KeyObject>>>();

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
  const created = await h.writeTx(async (t) => {
    if ((await h.models.Dek.count({ transaction: t })) > 0) {
      return false;
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
    return true;
  });
  if (created) {
    h.deks.set(1, dek);
  }
}

/**
 * The primary DEK version.
 * @throws KeyUnavailableError('dek_destroyed') if the store has none (all destroyed).
 */
export async function primaryVersion(h: StoreHandle, t?: Transaction): Promise<number> {
  const row = await h.models.Dek.findOne({
    where: { status: 'primary' },
    raw: true,
    ...(t ? { transaction: t } : {}),
  });
  if (!row) {
    throw new KeyUnavailableError('dek_destroyed', `tenant ${h.tenant} has no primary DEK`);
  }
  return row.version;
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
  h.deks.set(version, key);
  return key;
}

/** The primary DEK, ready for sealing. */
export async function primarySealingKey(h: StoreHandle, ctx: KeyContext): Promise<SealingKey> {
  const version = await primaryVersion(h);
  return { version, key: await getDek(h, ctx, version) };
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
  return h.writeTx(async (t) => {
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
  });
}
