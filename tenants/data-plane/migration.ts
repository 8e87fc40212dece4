/**
 * Tenant migration between regions (issue 5, item 4): a resumable, audited job that moves one
 * tenant's store from region A to region B and leaves nothing readable behind in A.
 *
 * Phases, each checkpointed in `<stateDir>/<tenant>.migration.json` (temp + fsync + rename):
 *
 *   started   -> frozen     `migration.started` in A's chain, then a consistent snapshot of A's
 *                           store (the backup code: ciphertext + A-wrapped DEKs), and a
 *                           fingerprint of A (audit head, record count)
 *   frozen    -> rewrapped  the snapshot's manifest MAC is verified with A's provider; B gets the
 *                           tenant key; every DEK version is unwrapped by A's provider and
 *                           wrapped by B's (plaintext only in memory); the staged copy's
 *                           `meta.region` and DEK AADs name B, its manifest is authenticated
 *                           under a MAC key B's provider wraps. Records stay byte for byte: their
 *                           AAD is `tenant|table|recordId`, not the region.
 *   rewrapped -> copied     every record of the staged copy opens with B's keys (counted), the
 *                           copy is restored into B (checksummed swap), `migration.rewrapped`
 *                           and `migration.copied` in the chain (now in B); the staged copy is
 *                           erased
 *   copied    -> committed  A is checked unchanged since the snapshot, then the caller's
 *                           `commit` moves the home region in the control plane
 *   committed -> shredded   A's tenant key destroyed (crypto-shred), A's DEK rows erased and A's
 *                           store deleted (`deprovisionTenant`); the snapshot is erased
 *   shredded  -> done       `migration.completed`
 *
 * Writes to A during the migration: the caller suspends the tenant (and stops A's plane for it)
 * before calling; the job enforces it by refusing to commit if A's audit head or record count
 * moved since the snapshot (the state goes back to `started`, so the next run re-snapshots).
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QueryTypes, Sequelize } from 'sequelize';
import sqlite3 from 'sqlite3';
import { z } from 'zod';
import { ConflictError, InvalidInputError, NotFoundError } from '../errors.ts';
import { authenticateBackupManifest, readBackupManifest, signBackupManifest } from './backup.ts';
import type { BackupManifest } from './backup.ts';
import { dekAad } from './dek-ring.ts';
import { BackupError, KeyUnavailableError } from './errors.ts';
import { fsyncPath } from './fsync.ts';
import { assertTenantId } from './ids.ts';
import { HEAD_TABLES, TABLES, defineTenantStoreModels } from './models.ts';
import type { DekRow } from './models.ts';
import { openRecord, withHead } from './record-cipher.ts';
import type { Envelope } from './record-cipher.ts';
import type { KeyProvider, RegionStores, TenantAuditInput } from './types.ts';

const STATE_FORMAT = 'cellcds-migration/1';
const DUMP_FORMAT = 'cellcds-store-dump/1';

/** The phase a migration has reached (checkpointed); `done` is final. */
export type MigrationPhase =
  'started' | 'frozen' | 'rewrapped' | 'copied' | 'committed' | 'shredded' | 'done';

const PHASES: readonly MigrationPhase[] = [
  'started',
  'frozen',
  'rewrapped',
  'copied',
  'committed',
  'shredded',
  'done',
];

/**
 * One side of a migration: a region's stores and its key provider. An operator's migration
 * opens both as `server/migrate.ts` does: `createLocalKeyProvider({ create: false })` and
 * `openRegionStores({ mayBind: false })`, so it never makes a region's keyring or first keyring
 * binding (the target is then rewrapped only under a keyring the region's servers use).
 */
export interface MigrationRegion {
  stores: RegionStores;
  keyProvider: KeyProvider;
}

type Scalar = string | number | boolean;

const scalar = z.union([z.string(), z.number(), z.boolean()]);

const stateSchema = z.strictObject({
  format: z.literal(STATE_FORMAT),
  id: z.string(),
  tenant: z.string(),
  from: z.string(),
  to: z.string(),
  phase: z.enum(PHASES as [MigrationPhase, ...MigrationPhase[]]),
  startedAt: z.string(),
  updatedAt: z.string(),
  actor: z.string().optional(),
  /** The caller's own PHI-free notes (e.g. whether to resume the tenant at the end). */
  context: z.record(z.string(), scalar).optional(),
  snapshot: z.string().optional(),
  staged: z.string().optional(),
  fingerprint: z
    .strictObject({ auditSeq: z.number(), auditHash: z.string(), records: z.number() })
    .optional(),
  counts: z
    .strictObject({ invocations: z.number(), feedback: z.number(), auditEvents: z.number() })
    .optional(),
  deks: z.number().optional(),
  kekVersion: z.number().optional(),
  verifiedRecords: z.number().optional(),
  restarts: z.number().optional(),
  shred: z
    .strictObject({
      tenantKeyDestroyed: z.boolean(),
      dekVersionsDestroyed: z.number(),
      storeDeleted: z.boolean(),
    })
    .optional(),
});

/** The checkpointed state of a migration (no PHI, no key material). */
export type MigrationState = z.infer<typeof stateSchema>;

/** What `onProgress` and `commit` see, and what `migrateTenant` returns. */
export interface MigrationProgress {
  /** `migration.<tenant>.<from>.<to>.<stamp>` */
  id: string;
  tenant: string;
  from: string;
  to: string;
  phase: MigrationPhase;
  /** True when this run picked up a checkpoint left by an earlier run. */
  resumed: boolean;
  context?: Record<string, Scalar>;
  /** Rows of the snapshot. */
  counts?: { invocations: number; feedback: number; auditEvents: number };
  /** DEK versions rewrapped under the target's KEK. */
  deks?: number;
  /** Records (invocations + feedback) that opened with the target's keys. */
  verifiedRecords?: number;
  shred?: { tenantKeyDestroyed: boolean; dekVersionsDestroyed: number; storeDeleted: boolean };
}

export interface MigrateTenantOptions {
  tenant: string;
  source: MigrationRegion;
  target: MigrationRegion;
  /**
   * Where the checkpoint and the transient snapshot live (0700). Put it on the target's side:
   * the staged copy is erased once restored, the snapshot once the source is shredded.
   */
  stateDir: string;
  /** Recorded in the audit events. */
  actor?: string;
  /**
   * The control-plane commit point, run between `copied` and `committed`: move the tenant's home
   * region (`moveHome`) with its audit event. Must be idempotent: a crash right after it and
   * before the checkpoint calls it again on resume.
   */
  commit: (progress: MigrationProgress) => Promise<void>;
  /** Called after every checkpoint. A throw stops the job there (it resumes from that phase). */
  onProgress?: (progress: MigrationProgress) => void | Promise<void>;
  /** Stored with a new migration's state and returned on every progress (PHI-free scalars). */
  context?: Record<string, Scalar>;
  now?: () => Date;
}

/** `<stateDir>/<tenant>.migration.json` */
export function migrationStatePath(stateDir: string, tenant: string): string {
  assertTenantId(tenant);
  return path.join(path.resolve(stateDir), `${tenant}.migration.json`);
}

/**
 * The checkpoint of the tenant's migration in `stateDir`, or undefined.
 * @throws InvalidInputError('state') for an unreadable or malformed state file (fail closed).
 */
export function readMigrationState(stateDir: string, tenant: string): MigrationState | undefined {
  const file = migrationStatePath(stateDir, tenant);
  if (!fs.existsSync(file)) {
    return undefined;
  }
  let raw: unknown;
  try {
    raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    throw new InvalidInputError('state', `${path.basename(file)} is not JSON`);
  }
  const parsed = stateSchema.safeParse(raw);
  if (!parsed.success || parsed.data.tenant !== tenant) {
    throw new InvalidInputError('state', `${path.basename(file)} is not a migration state`);
  }
  return parsed.data;
}

/** Atomic, durable JSON write: temp file (0600) + fsync + rename + fsync of the folder. */
function writeJsonAtomic(file: string, value: unknown): void {
  const dir = path.dirname(file);
  const tmp = path.join(
    dir,
    `.${path.basename(file)}.${crypto.randomBytes(4).toString('hex')}.tmp`,
  );
  const fd = fs.openSync(tmp, 'wx', 0o600);
  try {
    fs.writeFileSync(fd, `${JSON.stringify(value, null, 2)}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
  fsyncPath(dir);
}

function writeFileDurable(file: string, content: string): void {
  const fd = fs.openSync(file, 'w', 0o600);
  try {
    fs.writeFileSync(fd, content);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Overwrites files with zeros before unlinking (best effort against casual recovery). */
function eraseDir(dir: string): void {
  if (!fs.existsSync(dir)) {
    return;
  }
  const walk = (p: string): void => {
    const st = fs.lstatSync(p);
    if (st.isDirectory()) {
      for (const e of fs.readdirSync(p)) {
        walk(path.join(p, e));
      }
    } else if (st.isFile() && st.size > 0) {
      const fd = fs.openSync(p, 'r+');
      try {
        fs.writeSync(fd, Buffer.alloc(st.size));
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
  };
  walk(dir);
  fs.rmSync(dir, { recursive: true, force: true });
  fsyncPath(path.dirname(dir));
}

function sha256File(file: string): { sha256: string; bytes: number } {
  const data = fs.readFileSync(file);
  return { sha256: crypto.createHash('sha256').update(data).digest('hex'), bytes: data.length };
}

function stamp(d: Date): string {
  return d
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
}

// ---------------------------------------------------------------------------------------------
// The staged copy: a backup folder rewritten for the target region.
// ---------------------------------------------------------------------------------------------

interface SealedRow {
  id: string;
  sealed: Envelope;
}

/** The record's current envelope: its head row's head, if any, applied. */
function applyHead(
  row: SealedRow & { head: Envelope | null },
  table: 'invocations' | 'feedback',
): SealedRow {
  return {
    id: row.id,
    sealed:
      row.head === null
        ? row.sealed
        : // The address only names the record in an error: the staged copy has no tenant yet.
          withHead(row.sealed, row.head, { tenant: 'staged', table, recordId: row.id }),
  };
}

/** A snapshot opened for the rewrap and the verification (SQLite file or JSON dump). */
interface StagedStore {
  meta(): Promise<Map<string, string>>;
  deks(): Promise<DekRow[]>;
  /** Replaces the DEK rows' wrapped keys and the meta region (one transaction for SQLite). */
  rewrite(deks: DekRow[], region: string): Promise<void>;
  /** Calls `fn` for every sealed row of `table`, in pages. */
  eachSealed(
    table: 'invocations' | 'feedback',
    fn: (row: SealedRow) => Promise<void>,
  ): Promise<void>;
  close(): Promise<void>;
}

async function openStagedSqlite(file: string): Promise<StagedStore> {
  const sequelize = new Sequelize({
    dialect: 'sqlite',
    storage: file,
    logging: false,
    dialectOptions: { mode: sqlite3.OPEN_READWRITE },
    // One connection: the pragma below must hold for the rewrite.
    pool: { max: 1, min: 0 },
  });
  // The source-wrapped DEKs must not linger in freed pages of the copy.
  await sequelize.query('PRAGMA secure_delete=ON');
  const models = defineTenantStoreModels(sequelize);
  return {
    async meta() {
      const rows = await models.Meta.findAll({ raw: true });
      return new Map(rows.map((r) => [r.key, r.value]));
    },
    deks: () => models.Dek.findAll({ raw: true, order: [['version', 'ASC']] }),
    async rewrite(deks, region) {
      await sequelize.transaction(async (t) => {
        for (const d of deks) {
          await models.Dek.update(
            { wrapped: d.wrapped, kekVersion: d.kekVersion },
            { where: { version: d.version }, transaction: t },
          );
        }
        await models.Meta.update({ value: region }, { where: { key: 'region' }, transaction: t });
      });
      await sequelize.query('VACUUM');
    },
    async eachSealed(table, fn) {
      // Each record's current envelope: its head row's head applied (record-heads.ts). A copy
      // of a store from before head tables has none.
      const [hasHeads] = await sequelize.query<{ n: number }>(
        `SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?`,
        { replacements: [HEAD_TABLES[table]], type: QueryTypes.SELECT },
      );
      const heads = (hasHeads?.n ?? 0) > 0;
      let after = 0;
      for (;;) {
        const rows = await sequelize.query<SealedRow & { seq: number; head: Envelope | null }>(
          `SELECT r.seq, r.id, r.sealed, ${heads ? 'k.head' : 'NULL AS head'}
           FROM "${table}" r ${heads ? `LEFT JOIN "${HEAD_TABLES[table]}" k ON k.seq = r.seq` : ''}
           WHERE r.seq > ? ORDER BY r.seq LIMIT 500`,
          { replacements: [after], type: QueryTypes.SELECT },
        );
        for (const r of rows) {
          await fn(applyHead(r, table));
          after = r.seq;
        }
        if (rows.length < 500) {
          return;
        }
      }
    },
    close: () => sequelize.close(),
  };
}

interface StoreDump {
  format: string;
  tenant: string;
  region: string;
  tables: Record<string, unknown[]>;
}

function openStagedDump(file: string): StagedStore {
  let dump: StoreDump;
  try {
    dump = JSON.parse(fs.readFileSync(file, 'utf8')) as StoreDump;
  } catch {
    throw new ConflictError('the snapshot dump is not JSON');
  }
  if (dump.format !== DUMP_FORMAT || typeof dump.tables !== 'object') {
    throw new ConflictError('the snapshot is not a store dump');
  }
  const rows = <T>(table: string): T[] => (dump.tables[table] ?? []) as T[];
  return {
    meta: () =>
      Promise.resolve(
        new Map(rows<{ key: string; value: string }>(TABLES.meta).map((r) => [r.key, r.value])),
      ),
    deks: () =>
      Promise.resolve([...rows<DekRow>(TABLES.deks)].sort((a, b) => a.version - b.version)),
    rewrite(deks, region) {
      const byVersion = new Map(deks.map((d) => [d.version, d]));
      dump.tables[TABLES.deks] = rows<DekRow>(TABLES.deks).map((d) => {
        const next = byVersion.get(d.version);
        return next ? { ...d, wrapped: next.wrapped, kekVersion: next.kekVersion } : d;
      });
      dump.tables[TABLES.meta] = rows<{ key: string; value: string }>(TABLES.meta).map((m) =>
        m.key === 'region' ? { ...m, value: region } : m,
      );
      dump.region = region;
      writeFileDurable(file, JSON.stringify(dump));
      return Promise.resolve();
    },
    async eachSealed(table, fn) {
      // A dump from before head tables has none.
      const heads = new Map(
        rows<{ seq: number; head: Envelope }>(HEAD_TABLES[table]).map((k) => [k.seq, k.head]),
      );
      for (const r of rows<SealedRow & { seq: number }>(
        table === 'invocations' ? TABLES.invocations : TABLES.feedback,
      )) {
        await fn(applyHead({ ...r, head: heads.get(r.seq) ?? null }, table));
      }
    },
    close: () => Promise.resolve(),
  };
}

function openStaged(folder: string, manifest: BackupManifest): Promise<StagedStore> {
  return manifest.dialect === 'sqlite'
    ? openStagedSqlite(path.join(folder, 'store.sqlite'))
    : Promise.resolve(openStagedDump(path.join(folder, 'store.json')));
}

// ---------------------------------------------------------------------------------------------
// The job
// ---------------------------------------------------------------------------------------------

function regionOf(side: MigrationRegion, field: string): string {
  if (side.keyProvider.region !== side.stores.region) {
    throw new InvalidInputError(field, 'the key provider must be of the same region as the stores');
  }
  return side.stores.region;
}

/**
 * Moves `tenant`'s store from `source` to `target` (see the file comment for the phases), or
 * resumes the migration checkpointed in `stateDir`. A finished migration (`done`) is returned
 * as is; a finished one of another direction is archived and a new one starts.
 * @throws InvalidInputError (ids, same region, providers of other regions, SQLite <-> PostgreSQL,
 *   a malformed state file), NotFoundError (no source store on a new migration), ConflictError
 *   (another migration of the tenant is pending; the target already holds a store; the source
 *   changed after the snapshot: run again), KeyUnavailableError (a DEK does not unwrap),
 *   RecordOpenError (a record does not open with the target's keys: nothing is committed), and
 *   whatever `commit` or `onProgress` throws.
 */
export async function migrateTenant(opts: MigrateTenantOptions): Promise<MigrationProgress> {
  const { tenant, source, target } = opts;
  assertTenantId(tenant);
  const from = regionOf(source, 'source');
  const to = regionOf(target, 'target');
  if (from === to) {
    throw new InvalidInputError('target', 'must be another region than the source');
  }
  if (source.stores.stats().dialect !== target.stores.stats().dialect) {
    // TODO(#5): convert a SQLite snapshot to a store dump (and back) to migrate across backends.
    throw new InvalidInputError('target', 'both regions must use the same storage backend');
  }
  const now = opts.now ?? (() => new Date());
  const stateDir = path.resolve(opts.stateDir);
  fs.mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const stateFile = migrationStatePath(stateDir, tenant);

  let state = readMigrationState(stateDir, tenant);
  if (state?.phase === 'done' && (state.from !== from || state.to !== to)) {
    fs.renameSync(stateFile, path.join(stateDir, `${state.id}.done.json`));
    state = undefined;
  }
  if (state && (state.from !== from || state.to !== to)) {
    throw new ConflictError(
      `a migration of tenant ${tenant} from ${state.from} to ${state.to} is pending`,
    );
  }
  const resumed = state !== undefined;
  if (!state) {
    if (!(await source.stores.listTenants()).includes(tenant)) {
      throw new NotFoundError(`store of tenant ${tenant} in region ${from}`);
    }
    if ((await target.stores.listTenants()).includes(tenant)) {
      throw new ConflictError(`region ${to} already holds a store of tenant ${tenant}`);
    }
    const at = now();
    state = {
      format: STATE_FORMAT,
      id: `migration.${tenant}.${from}.${to}.${stamp(at)}`,
      tenant,
      from,
      to,
      phase: 'started',
      startedAt: at.toISOString(),
      updatedAt: at.toISOString(),
      ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
      ...(opts.context !== undefined ? { context: { ...opts.context } } : {}),
    };
    writeJsonAtomic(stateFile, state);
  }
  let s: MigrationState = state;
  const workDir = path.join(stateDir, `${tenant}.work`);
  const actor = opts.actor ?? s.actor;

  const progress = (): MigrationProgress => ({
    id: s.id,
    tenant,
    from,
    to,
    phase: s.phase,
    resumed,
    ...(s.context !== undefined ? { context: { ...s.context } } : {}),
    ...(s.counts !== undefined ? { counts: { ...s.counts } } : {}),
    ...(s.deks !== undefined ? { deks: s.deks } : {}),
    ...(s.verifiedRecords !== undefined ? { verifiedRecords: s.verifiedRecords } : {}),
    ...(s.shred !== undefined ? { shred: { ...s.shred } } : {}),
  });

  /** Saves the next phase; `afterSave` runs before the progress callback (e.g. an erase). */
  async function checkpoint(next: Partial<MigrationState>, afterSave?: () => void): Promise<void> {
    s = { ...s, ...next, updatedAt: now().toISOString() };
    writeJsonAtomic(stateFile, s);
    afterSave?.();
    await opts.onProgress?.(progress());
  }

  /** Appends a `migration.*` event once per migration id (a resumed step does not repeat it). */
  async function auditOnce(
    stores: RegionStores,
    type: string,
    detail: Record<string, Scalar> = {},
  ): Promise<void> {
    const store = stores.store(tenant);
    const head = await store.audit.head();
    const recent = await store.audit.list({ afterSeq: Math.max(0, head.seq - 200), limit: 1000 });
    if (recent.some((e) => e.type === type && e.detail?.migration === s.id)) {
      return;
    }
    const event: TenantAuditInput = {
      type,
      outcome: 'success',
      ...(actor !== undefined ? { actor } : {}),
      detail: { migration: s.id, from, to, ...detail },
    };
    await store.audit.append(event);
  }

  /** Total records of the live source store, from its key status (no decryption, no audit). */
  async function sourceFingerprint(): Promise<{
    auditSeq: number;
    auditHash: string;
    records: number;
  }> {
    const store = source.stores.store(tenant);
    const head = await store.audit.head();
    const status = await store.keys.status();
    return {
      auditSeq: head.seq,
      auditHash: head.hash,
      records: status.versions.reduce((n, v) => n + v.records, 0),
    };
  }

  function restart(reason: string): never {
    eraseDir(workDir);
    const restarts = (s.restarts ?? 0) + 1;
    s = {
      format: s.format,
      id: s.id,
      tenant,
      from,
      to,
      phase: 'started',
      startedAt: s.startedAt,
      updatedAt: now().toISOString(),
      restarts,
      ...(s.actor !== undefined ? { actor: s.actor } : {}),
      ...(s.context !== undefined ? { context: s.context } : {}),
    };
    writeJsonAtomic(stateFile, s);
    throw new ConflictError(
      `${reason}; the migration starts over from the snapshot when run again`,
    );
  }

  // ---- started -> frozen ---------------------------------------------------------------------
  if (s.phase === 'started') {
    if (!(await source.stores.listTenants()).includes(tenant)) {
      throw new NotFoundError(`store of tenant ${tenant} in region ${from}`);
    }
    await auditOnce(source.stores, 'migration.started', { restarts: s.restarts ?? 0 });
    eraseDir(workDir);
    fs.mkdirSync(workDir, { recursive: true, mode: 0o700 });
    const backup = await source.stores.backupTenant(tenant, path.join(workDir, 'source'));
    const manifest = readBackupManifest(backup.path);
    // The only event after the snapshot must be the backup's own `backup.created`.
    const after = await source.stores
      .store(tenant)
      .audit.list({ afterSeq: manifest.auditHead.seq, limit: 10 });
    if (after.length !== 1 || after[0]?.type !== 'backup.created') {
      return restart(`the store of tenant ${tenant} in ${from} changed during the snapshot`);
    }
    const fingerprint = await sourceFingerprint();
    if (fingerprint.records !== manifest.counts.invocations + manifest.counts.feedback) {
      return restart(`the store of tenant ${tenant} in ${from} changed during the snapshot`);
    }
    await checkpoint({
      phase: 'frozen',
      snapshot: backup.path,
      fingerprint,
      counts: manifest.counts,
    });
  }

  // ---- frozen -> rewrapped -------------------------------------------------------------------
  if (s.phase === 'frozen') {
    const snapshot = s.snapshot ?? '';
    const manifest = readBackupManifest(snapshot);
    // The snapshot may have waited in the work folder (a stop, a crash): only the one this
    // migration wrote, authenticated under the source region's key, is carried over. One with
    // no MAC (taken by an older release before an upgrade) is simply taken again.
    try {
      await authenticateBackupManifest(source.keyProvider, manifest);
    } catch (err) {
      if (err instanceof BackupError && err.reason === 'unauthenticated') {
        return restart('the snapshot carries no MAC (format 1)');
      }
      throw err;
    }
    await target.keyProvider.createTenantKey(tenant, { recreate: true });
    const stagedDir = path.join(workDir, 'target');
    eraseDir(stagedDir);
    fs.mkdirSync(stagedDir, { mode: 0o700 });
    const storeName = manifest.dialect === 'sqlite' ? 'store.sqlite' : 'store.json';
    fs.copyFileSync(path.join(snapshot, storeName), path.join(stagedDir, storeName));
    fs.chmodSync(path.join(stagedDir, storeName), 0o600);
    const staged = await openStaged(stagedDir, manifest);
    let rewrapped: DekRow[];
    let kekVersion = 0;
    try {
      const meta = await staged.meta();
      if (meta.get('tenant') !== tenant || meta.get('region') !== from) {
        throw new ConflictError(`the snapshot is not the store of tenant ${tenant} in ${from}`);
      }
      rewrapped = [];
      for (const row of await staged.deks()) {
        if (row.wrapped === null) {
          rewrapped.push(row); // destroyed version: nothing to carry
          continue;
        }
        // The plaintext DEK exists only in this KeyObject, for the time of the two calls.
        const dek: KeyObject = await source.keyProvider.unwrapDek(
          tenant,
          row.wrapped,
          dekAad(from, tenant, row.version),
        );
        const wrapped = await target.keyProvider.wrapDek(
          tenant,
          dek,
          dekAad(to, tenant, row.version),
        );
        kekVersion = wrapped.kekVersion;
        rewrapped.push({ ...row, wrapped: wrapped.wrapped, kekVersion: wrapped.kekVersion });
      }
      await staged.rewrite(rewrapped, to);
      rewrapped = await staged.deks();
    } finally {
      await staged.close();
    }
    writeFileDurable(
      path.join(stagedDir, 'deks.json'),
      `${JSON.stringify({ tenant, region: to, deks: rewrapped }, null, 2)}\n`,
    );
    // A manifest of the target region, authenticated under a MAC key the target's provider
    // wraps (the source's MAC key is bound to the source region: the restore would refuse it).
    const stagedManifest = await signBackupManifest(target.keyProvider, {
      tenant,
      region: to,
      dialect: manifest.dialect,
      createdAt: manifest.createdAt,
      files: [storeName, 'deks.json'].map((name) => ({
        name,
        ...sha256File(path.join(stagedDir, name)),
      })) as BackupManifest['files'],
      counts: manifest.counts,
      auditHead: manifest.auditHead,
      dekVersions: rewrapped.map((d) => ({
        version: d.version,
        status: d.status,
        kekVersion: d.kekVersion,
      })),
    });
    writeFileDurable(
      path.join(stagedDir, 'manifest.json'),
      `${JSON.stringify(stagedManifest, null, 2)}\n`,
    );
    fsyncPath(stagedDir);
    await checkpoint({
      phase: 'rewrapped',
      staged: stagedDir,
      deks: rewrapped.filter((d) => d.wrapped !== null).length,
      kekVersion,
    });
  }

  // ---- rewrapped -> copied -------------------------------------------------------------------
  if (s.phase === 'rewrapped') {
    const stagedDir = s.staged ?? '';
    const manifest = readBackupManifest(stagedDir);
    const staged = await openStaged(stagedDir, manifest);
    let verified = 0;
    try {
      const keys = new Map<number, KeyObject>();
      for (const row of await staged.deks()) {
        if (row.wrapped !== null) {
          keys.set(
            row.version,
            await target.keyProvider.unwrapDek(
              tenant,
              row.wrapped,
              dekAad(to, tenant, row.version),
            ),
          );
        }
      }
      const keyFor = (v: number): Promise<KeyObject> => {
        const k = keys.get(v);
        return k
          ? Promise.resolve(k)
          : Promise.reject(
              new KeyUnavailableError('dek_destroyed', `DEK version ${v} of ${tenant}`),
            );
      };
      for (const table of ['invocations', 'feedback'] as const) {
        await staged.eachSealed(table, async (row) => {
          // Throws RecordOpenError: nothing is restored, nothing committed.
          const plain = await openRecord(row.sealed, { tenant, table, recordId: row.id }, keyFor);
          plain.fill(0);
          verified += 1;
        });
      }
    } finally {
      await staged.close();
    }
    const expected = (s.counts?.invocations ?? 0) + (s.counts?.feedback ?? 0);
    if (verified !== expected) {
      throw new ConflictError(
        `the staged copy holds ${verified} records, the snapshot ${expected}`,
      );
    }
    const restored = await target.stores
      .restoreTenant(stagedDir, { region: to, tenant })
      .catch((err: unknown) => {
        // Staged by an older release (no MAC): nothing was restored; stage it again.
        if (err instanceof BackupError && err.reason === 'unauthenticated') {
          return restart('the staged copy carries no MAC (format 1)');
        }
        throw err;
      });
    if (!restored.keyAvailable) {
      // Its reason as the restore met it: a key destroyed in the target is a shred there; one
      // the target's keyring never held is a fault of the target (never reported as a shred).
      throw new KeyUnavailableError(
        restored.keyUnavailableReason ?? 'tenant_key_missing',
        `tenant ${tenant} has no usable key in ${to}`,
      );
    }
    const status = await target.stores.store(tenant).keys.status();
    const records = status.versions.reduce((n, v) => n + v.records, 0);
    if (records !== verified) {
      throw new ConflictError(
        `region ${to} holds ${records} records of ${tenant}, expected ${verified}`,
      );
    }
    await auditOnce(target.stores, 'migration.rewrapped', {
      deks: s.deks ?? 0,
      kekVersion: s.kekVersion ?? 0,
    });
    await auditOnce(target.stores, 'migration.copied', {
      records: verified,
      invocations: s.counts?.invocations ?? 0,
      feedback: s.counts?.feedback ?? 0,
    });
    // The staged copy opens with the target's keys: it must not outlive the restore.
    await checkpoint({ phase: 'copied', verifiedRecords: verified }, () => {
      eraseDir(stagedDir);
    });
  }

  // ---- copied -> committed -------------------------------------------------------------------
  if (s.phase === 'copied') {
    eraseDir(path.join(workDir, 'target')); // if a crash came between the checkpoint and the erase
    const was = s.fingerprint;
    const live = (await source.stores.listTenants()).includes(tenant)
      ? await sourceFingerprint()
      : undefined;
    if (
      !was ||
      !live ||
      live.auditSeq !== was.auditSeq ||
      live.auditHash !== was.auditHash ||
      live.records !== was.records
    ) {
      return restart(`the store of tenant ${tenant} in ${from} changed after the snapshot`);
    }
    await opts.commit(progress());
    await auditOnce(target.stores, 'migration.committed');
    await checkpoint({ phase: 'committed' });
  }

  // ---- committed -> shredded -----------------------------------------------------------------
  if (s.phase === 'committed') {
    // Crypto-shred first (inside deprovisionTenant): the source's tenant key, then its DEK rows,
    // then the store itself. A second run finds nothing left and reports false/0.
    const r = await source.stores.deprovisionTenant(tenant);
    if (await source.keyProvider.hasTenantKey(tenant)) {
      throw new ConflictError(`the key of tenant ${tenant} in ${from} survived the shred`);
    }
    eraseDir(workDir);
    const shred = {
      tenantKeyDestroyed: r.tenantKeyDestroyed || (s.shred?.tenantKeyDestroyed ?? false),
      dekVersionsDestroyed: r.dekVersionsDestroyed || (s.shred?.dekVersionsDestroyed ?? 0),
      storeDeleted: r.storeDeleted || (s.shred?.storeDeleted ?? false),
    };
    s = { ...s, shred };
    writeJsonAtomic(stateFile, s);
    await auditOnce(target.stores, 'migration.source_shredded', shred);
    await checkpoint({ phase: 'shredded' });
  }

  // ---- shredded -> done ----------------------------------------------------------------------
  if (s.phase === 'shredded') {
    await auditOnce(target.stores, 'migration.completed', {
      records: s.verifiedRecords ?? 0,
    });
    const rest: MigrationState = { ...s };
    delete rest.snapshot;
    delete rest.staged;
    s = rest;
    await checkpoint({ phase: 'done' });
  }
  return progress();
}
