/**
 * Per-tenant backups: a consistent snapshot of the store as stored (ciphertext and wrapped
 * DEKs only, never a plaintext key), the wrapped DEKs read from that same snapshot
 * (`deks.json`), and `manifest.json` (tenant, region, dialect, time, counts, audit head,
 * sha256 and size of every file). SQLite snapshots use `VACUUM INTO`; PostgreSQL snapshots are
 * a JSON dump of the schema's rows read in one REPEATABLE READ transaction.
 *
 * The manifest (format 2) is authenticated: a fresh random 256-bit key, wrapped by the region's
 * key provider for the tenant (AAD `cellcds-backup-mac/2|tenant|region|backupId`) and stored in
 * the manifest, keys an HMAC-SHA256 over the canonical JSON of the whole manifest but its `mac`
 * (so over every file's sha256 too). Whoever can rewrite a backup folder but cannot use the
 * provider cannot make a manifest that verifies: not for a snapshot cut short, nor for another
 * tenant or region. A genuine older backup of the same tenant still verifies (point-in-time
 * restore); the result carries its time.
 *
 * Restore validates the manifest's shape and checksums, refuses another region, tenant or
 * dialect, verifies the MAC (before anything is staged), stages the store next to the live one,
 * and checks the staged copy itself before anything live changes: its own tenant/region and
 * DEKs, its audit hash chain end to end, and that the manifest's counts, audit head and DEK
 * versions are the snapshot's. Then it swaps the copy in (SQLite: one atomic rename over the
 * live file; PostgreSQL: schema rename in one transaction), keeping the highest wrap count known
 * of each DEK version that is the same key, and refusing (`dek_compromised`) a DEK version an
 * emergency rotation has marked compromised since, checked against the live store's DEK rows and
 * its `dek_history` (reconcileDeks), which each restore writes into the copy it puts in place so
 * that it survives restores in any order. A manifest with no MAC (format 1,
 * from earlier releases) or whose MAC key no longer unwraps because the tenant's key was
 * destroyed is restored only with `allowUnauthenticated`.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QueryTypes, Sequelize, Transaction } from 'sequelize';
import sqlite3 from 'sqlite3';
import { z } from 'zod';
import { ConflictError } from '../errors.ts';
import { verifyAudit } from './audit-chain.ts';
import { BackupError, KeyUnavailableError } from './errors.ts';
import { fsyncPath } from './fsync.ts';
import { canonicalJson } from './hash-chain.ts';
import type { ChainVerification } from './hash-chain.ts';
import { assertRegionId, assertTenantId } from './ids.ts';
import { ADDED_COLUMNS, DEK_HISTORY_COLUMNS, TABLES, defineTenantStoreModels } from './models.ts';
import type { DekRow, TenantStoreModels } from './models.ts';
import { wrapCountFloorSql } from './store-backend.ts';
import type { StoreBackend, StoreHandle } from './store-backend.ts';
import type { BackupResult, KeyProvider } from './types.ts';

const MANIFEST = 'manifest.json';
const DEKS = 'deks.json';
/** Manifests written before they were authenticated (no MAC). */
const FORMAT_V1 = 'cellcds-tenant-backup/1';
const FORMAT = 'cellcds-tenant-backup/2';
/** Purpose prefix of the MAC key's wrap AAD: a DEK's wrap never opens as a MAC key's. */
const MAC_PURPOSE = 'cellcds-backup-mac/2';
const DUMP_FORMAT = 'cellcds-store-dump/1';
const MAX_MANIFEST_BYTES = 1024 * 1024;
const HEX64 = /^[0-9a-f]{64}$/;
const BACKUP_ID = /^[0-9a-f]{32}$/;

const countsSchema = z.strictObject({
  invocations: z.number().int().min(0),
  feedback: z.number().int().min(0),
  auditEvents: z.number().int().min(0),
});

const manifestBody = {
  tenant: z.string(),
  region: z.string(),
  dialect: z.enum(['sqlite', 'postgres']),
  createdAt: z.string(),
  files: z
    .array(
      z.strictObject({
        name: z.enum(['store.sqlite', 'store.json', DEKS]),
        sha256: z.string().regex(HEX64),
        bytes: z.number().int().min(0),
      }),
    )
    .length(2),
  counts: countsSchema,
  auditHead: z.strictObject({ seq: z.number().int().min(0), hash: z.string().regex(HEX64) }),
  dekVersions: z.array(
    z.strictObject({
      version: z.number().int().min(1),
      status: z.string(),
      kekVersion: z.number().int().nullable(),
    }),
  ),
};

const manifestSchema = z.discriminatedUnion('format', [
  z.strictObject({ format: z.literal(FORMAT_V1), ...manifestBody }),
  z.strictObject({
    format: z.literal(FORMAT),
    /** Random id of this backup, bound into the MAC key's wrap. */
    backupId: z.string().regex(BACKUP_ID),
    ...manifestBody,
    /** The MAC key as the provider wrapped it (opaque) and the KEK version it names. */
    macKey: z
      .strictObject({
        wrapped: z.string().min(1).max(16_384),
        kekVersion: z.number().int().min(1),
      })
      .optional(),
    /** HMAC-SHA256 (hex) over the canonical JSON of every other member. */
    mac: z.string().regex(HEX64).optional(),
  }),
]);

/**
 * The manifest of a backup folder: format 2 (authenticated; `macKey` and `mac` are optional in
 * the type only so that a stripped one is reported as unauthenticated, not as malformed) or
 * format 1 (written by earlier releases, no MAC).
 */
export type BackupManifest = z.infer<typeof manifestSchema>;

/** What `signBackupManifest` authenticates: everything but the format, id and MAC. */
export type UnsignedManifest = Omit<
  Extract<BackupManifest, { format: typeof FORMAT }>,
  'format' | 'backupId' | 'macKey' | 'mac'
>;

/** The AAD that binds a backup's MAC key wrap to its purpose, tenant, region and backup. */
function macAad(tenant: string, region: string, backupId: string): string {
  return `${MAC_PURPOSE}|${tenant}|${region}|${backupId}`;
}

/** HMAC-SHA256 over the canonical JSON of the manifest without its `mac`. */
function manifestMac(key: crypto.KeyObject, m: BackupManifest): Buffer {
  const covered: Record<string, unknown> = { ...m };
  delete covered.mac;
  return crypto.createHmac('sha256', key).update(canonicalJson(covered), 'utf8').digest();
}

/**
 * Authenticates a manifest for the region of `provider`: a fresh random 256-bit key (node:crypto)
 * is wrapped by the provider for the manifest's tenant, with an AAD naming the purpose, tenant,
 * region and a fresh backup id, and keys an HMAC-SHA256 over the canonical JSON of the whole
 * manifest but its `mac` (files' sha256 included). The plaintext key never leaves this call.
 * @throws KeyUnavailableError (no tenant key, provider down).
 */
export async function signBackupManifest(
  provider: KeyProvider,
  body: UnsignedManifest,
): Promise<BackupManifest> {
  const backupId = crypto.randomBytes(16).toString('hex');
  const key = crypto.generateKeySync('hmac', { length: 256 });
  const wrapped = await provider.wrapDek(
    body.tenant,
    key,
    macAad(body.tenant, body.region, backupId),
  );
  const unsigned: BackupManifest = {
    format: FORMAT,
    backupId,
    ...body,
    macKey: { wrapped: wrapped.wrapped, kekVersion: wrapped.kekVersion },
  };
  return { ...unsigned, mac: manifestMac(key, unsigned).toString('hex') };
}

/**
 * Checks a manifest's MAC with the key the region's provider unwraps for its tenant (with the
 * AAD its tenant, region and backup id give), compared in constant time. A manifest with no MAC,
 * or whose MAC key cannot be unwrapped because the tenant's key was destroyed or its KEK is gone,
 * cannot be authenticated: refused unless `allowUnauthenticated`. A MAC that does not verify,
 * or a MAC key that does not unwrap for this tenant, region and backup, is always refused.
 * @returns whether the manifest was authenticated (false only with `allowUnauthenticated`).
 * @throws BackupError('manifest_signature' | 'unauthenticated' | 'key_unavailable'),
 *   KeyUnavailableError('provider') (retry later).
 */
export async function authenticateBackupManifest(
  provider: KeyProvider,
  m: BackupManifest,
  opts: { allowUnauthenticated?: boolean } = {},
): Promise<boolean> {
  const allow = opts.allowUnauthenticated === true;
  if (m.format === FORMAT_V1 || m.macKey === undefined || m.mac === undefined) {
    if (allow) {
      return false;
    }
    throw new BackupError(
      'unauthenticated',
      m.format === FORMAT_V1
        ? 'the manifest is format 1 (written before backups were authenticated) and carries no MAC; restore it with allowUnauthenticated only if nobody else could write the backup folder'
        : 'the manifest carries no MAC (this release always writes one: it was removed); restore it with allowUnauthenticated only if nobody else could write the backup folder',
    );
  }
  let key: crypto.KeyObject;
  try {
    key = await provider.unwrapDek(
      m.tenant,
      m.macKey.wrapped,
      macAad(m.tenant, m.region, m.backupId),
    );
  } catch (err) {
    if (!(err instanceof KeyUnavailableError)) {
      throw err;
    }
    if (err.reason === 'provider') {
      throw err; // the provider is down: retryable, nothing was decided
    }
    if (
      err.reason === 'tenant_key_destroyed' ||
      err.reason === 'tenant_key_missing' ||
      err.reason === 'unknown_kek'
    ) {
      // Nobody can check this MAC here (crypto-shredded tenant, destroyed KEK, or a tenant key
      // this keyring never held). The tenant's records would not open either; the operator may
      // still want its audit trail.
      if (allow) {
        return false;
      }
      throw new BackupError(
        'key_unavailable',
        `the manifest's MAC cannot be checked: its key does not unwrap (${err.reason}: the tenant's key was destroyed or is not in this keyring, or the KEK that wrapped it is gone); restore it with allowUnauthenticated only if nobody else could write the backup folder`,
        err,
      );
    }
    // A wrap that does not open under this tenant's key with this manifest's tenant, region and
    // backup id: one of them (or the wrap) was changed.
    throw new BackupError(
      'manifest_signature',
      `the manifest's MAC key does not unwrap for tenant ${m.tenant} in region ${m.region}: the manifest was altered`,
      err,
    );
  }
  const expected = manifestMac(key, m);
  const given = Buffer.from(m.mac, 'hex');
  if (given.length !== expected.length || !crypto.timingSafeEqual(expected, given)) {
    throw new BackupError(
      'manifest_signature',
      'the manifest MAC does not verify: the manifest or a file it checksums was altered',
    );
  }
  return true;
}

/** The wrapped DEKs of a backup (as stored; no plaintext). */
interface DeksFile {
  tenant: string;
  region: string;
  deks: DekRow[];
}

const MODEL_TABLES: Array<[keyof TenantStoreModels, string]> = [
  ['Meta', TABLES.meta],
  ['Dek', TABLES.deks],
  ['Invocation', TABLES.invocations],
  ['InvocationCard', TABLES.invocationCards],
  ['Feedback', TABLES.feedback],
  ['InvocationHead', TABLES.invocationHeads],
  ['FeedbackHead', TABLES.feedbackHeads],
  ['AuditEvent', TABLES.auditEvents],
  ['AuditHead', TABLES.auditHead],
  ['Job', TABLES.jobs],
];

/** Tables a dump from an older store may lack. */
const OPTIONAL_TABLES: ReadonlySet<string> = new Set([
  TABLES.invocationHeads,
  TABLES.feedbackHeads,
]);

function sha256File(file: string): { sha256: string; bytes: number } {
  const data = fs.readFileSync(file);
  return { sha256: crypto.createHash('sha256').update(data).digest('hex'), bytes: data.length };
}

function writeFileDurable(file: string, content: string): void {
  const fd = fs.openSync(file, 'wx', 0o600);
  try {
    fs.writeFileSync(fd, content);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

interface SnapshotFacts {
  deks: DekRow[];
  counts: z.infer<typeof countsSchema>;
  auditHead: { seq: number; hash: string };
  meta: Map<string, string>;
}

async function factsOf(models: TenantStoreModels, t?: Transaction): Promise<SnapshotFacts> {
  const opt = t ? { transaction: t } : {};
  const head = await models.AuditHead.findByPk(1, { ...opt, raw: true });
  const meta = await models.Meta.findAll({ ...opt, raw: true });
  return {
    deks: await models.Dek.findAll({ ...opt, raw: true, order: [['version', 'ASC']] }),
    counts: {
      invocations: await models.Invocation.count(opt),
      feedback: await models.Feedback.count(opt),
      auditEvents: await models.AuditEvent.count(opt),
    },
    auditHead: { seq: head?.seq ?? 0, hash: head?.hash ?? '' },
    meta: new Map(meta.map((m) => [m.key, m.value])),
  };
}

/** Reads facts from a SQLite snapshot file opened read-only. */
async function sqliteSnapshotFacts(file: string): Promise<SnapshotFacts> {
  return (await inspectSqliteSnapshot(file)).facts;
}

/**
 * Reads facts from a SQLite snapshot file opened read-only (no journal, no side files) and, with
 * `tenant`, verifies its audit chain with the store's own verifier.
 */
async function inspectSqliteSnapshot(
  file: string,
  tenant?: string,
): Promise<{ facts: SnapshotFacts; chain?: ChainVerification }> {
  const sequelize = new Sequelize({
    dialect: 'sqlite',
    storage: file,
    logging: false,
    dialectOptions: { mode: sqlite3.OPEN_READONLY },
  });
  try {
    const models = defineTenantStoreModels(sequelize);
    const facts = await factsOf(models);
    if (tenant === undefined) {
      return { facts };
    }
    // verifyAudit reads a handle's tenant, models and read transactions only; a read-only view
    // of the snapshot is enough (a full handle would open it for writing, in WAL mode).
    const view: Pick<StoreHandle, 'tenant' | 'models' | 'readTx'> = {
      tenant,
      models,
      readTx: (fn) => sequelize.transaction({ type: Transaction.TYPES.DEFERRED }, fn),
    };
    return { facts, chain: await verifyAudit(view as StoreHandle) };
  } finally {
    await sequelize.close();
  }
}

function stamp(d: Date): string {
  return d
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
}

/**
 * Writes a backup of the open store `h` into a new folder under `backupDir` (0700; files 0600),
 * its manifest authenticated under a MAC key `provider` wraps for the tenant (format 2).
 * @throws BackupError('snapshot') if the snapshot cannot be written, KeyUnavailableError if
 *   the provider cannot wrap the MAC key (nothing is left behind).
 */
export async function writeBackup(
  h: StoreHandle,
  backupDir: string,
  now: () => Date,
  provider: KeyProvider,
): Promise<BackupResult> {
  const createdAt = now();
  const root = path.resolve(backupDir);
  fs.mkdirSync(root, { recursive: true, mode: 0o700 });
  const folder = path.join(
    root,
    `${h.tenant}.${h.region}.${stamp(createdAt)}.${crypto.randomBytes(3).toString('hex')}`,
  );
  fs.mkdirSync(folder, { mode: 0o700 });
  try {
    let facts: SnapshotFacts;
    let storeName: 'store.sqlite' | 'store.json';
    if (h.dialect === 'sqlite') {
      storeName = 'store.sqlite';
      const target = path.join(folder, storeName);
      // A consistent read snapshot of the live WAL database, written as one plain file.
      await h.sequelize.query(`VACUUM INTO ${h.sequelize.escape(target)}`);
      fs.chmodSync(target, 0o600);
      fsyncPath(target);
      facts = await sqliteSnapshotFacts(target);
    } else {
      storeName = 'store.json';
      const dump = await h.readTx(async (t) => {
        const tables: Record<string, unknown[]> = {};
        for (const [model, table] of MODEL_TABLES) {
          const m = h.models[model] as unknown as {
            findAll(o: object): Promise<unknown[]>;
          };
          tables[table] = await m.findAll({ transaction: t, raw: true });
        }
        // The key history a restore left (not a model: only restored stores have one).
        const history = h.qualified(TABLES.dekHistory);
        const [has] = await h.sequelize.query<{ ok: boolean }>(
          'SELECT to_regclass($1) IS NOT NULL AS ok',
          { bind: [history], type: QueryTypes.SELECT, transaction: t },
        );
        if (has?.ok === true) {
          tables[TABLES.dekHistory] = await h.sequelize.query(`${HISTORY_SELECT} FROM ${history}`, {
            type: QueryTypes.SELECT,
            transaction: t,
          });
        }
        return { tables, facts: await factsOf(h.models, t) };
      });
      facts = dump.facts;
      writeFileDurable(
        path.join(folder, storeName),
        JSON.stringify({
          format: DUMP_FORMAT,
          tenant: h.tenant,
          region: h.region,
          tables: dump.tables,
        }),
      );
    }
    const deks: DeksFile = { tenant: h.tenant, region: h.region, deks: facts.deks };
    writeFileDurable(path.join(folder, DEKS), `${JSON.stringify(deks, null, 2)}\n`);
    const manifest = await signBackupManifest(provider, {
      tenant: h.tenant,
      region: h.region,
      dialect: h.dialect,
      createdAt: createdAt.toISOString(),
      files: [storeName, DEKS].map((name) => ({
        name,
        ...sha256File(path.join(folder, name)),
      })) as BackupManifest['files'],
      counts: facts.counts,
      auditHead: facts.auditHead,
      dekVersions: facts.deks.map((d) => ({
        version: d.version,
        status: d.status,
        kekVersion: d.kekVersion,
      })),
    });
    writeFileDurable(path.join(folder, MANIFEST), `${JSON.stringify(manifest, null, 2)}\n`);
    fsyncPath(folder);
    fsyncPath(root);
    return {
      path: folder,
      tenant: h.tenant,
      region: h.region,
      createdAt: manifest.createdAt,
      counts: facts.counts,
    };
  } catch (err) {
    fs.rmSync(folder, { recursive: true, force: true });
    throw err instanceof BackupError || err instanceof KeyUnavailableError
      ? err
      : new BackupError('snapshot', `backup of ${h.tenant} failed`, err);
  }
}

/**
 * Reads a backup folder's manifest and checks its shape (schema, tenant and region ids), not
 * its files: what a listing shows, and which tenant a restore is about before it reads the
 * snapshot. `readBackupManifest` also checks the files.
 * @throws BackupError('manifest').
 */
export function readManifestShape(backupPath: string): BackupManifest {
  const folder = path.resolve(backupPath);
  const manifestFile = path.join(folder, MANIFEST);
  if (!fs.existsSync(folder)) {
    throw new BackupError(
      'manifest',
      `no backup ${path.basename(folder)} in this region's backup folder (a backup is named <tenant>.<region>.<stamp>.<id>, as the backup command printed it)`,
    );
  }
  let raw: unknown;
  try {
    const st = fs.statSync(manifestFile);
    if (!st.isFile() || st.size > MAX_MANIFEST_BYTES) {
      throw new Error('not a small file');
    }
    raw = JSON.parse(fs.readFileSync(manifestFile, 'utf8'));
  } catch (err) {
    throw new BackupError('manifest', 'manifest.json is missing or not JSON', err);
  }
  const parsed = manifestSchema.safeParse(raw);
  if (!parsed.success) {
    const where = parsed.error.issues.map((i) => i.path.join('.')).join(', ');
    throw new BackupError('manifest', `manifest.json is invalid at ${where}`);
  }
  const m = parsed.data;
  try {
    assertTenantId(m.tenant);
    assertRegionId(m.region);
  } catch (err) {
    throw new BackupError('manifest', 'manifest names an invalid tenant or region', err);
  }
  return m;
}

/** A manifest written before backups were authenticated (format 1, no MAC). */
export function isFormat1(m: BackupManifest): boolean {
  return m.format === FORMAT_V1;
}

/**
 * Reads and checks a backup folder: manifest shape, file set, sizes and sha256. It does not
 * authenticate the manifest: `authenticateBackupManifest` does (restore calls both).
 * @throws BackupError('manifest' | 'checksum').
 */
export function readBackupManifest(backupPath: string): BackupManifest {
  const folder = path.resolve(backupPath);
  const m = readManifestShape(folder);
  const storeName = m.dialect === 'sqlite' ? 'store.sqlite' : 'store.json';
  const names = m.files.map((f) => f.name).sort();
  if (names.join(',') !== [DEKS, storeName].sort().join(',')) {
    throw new BackupError('manifest', `manifest must list ${storeName} and ${DEKS}`);
  }
  for (const f of m.files) {
    let actual: { sha256: string; bytes: number };
    try {
      actual = sha256File(path.join(folder, f.name));
    } catch (err) {
      throw new BackupError('checksum', `${f.name} is missing`, err);
    }
    if (actual.bytes !== f.bytes || actual.sha256 !== f.sha256) {
      throw new BackupError('checksum', `${f.name} does not match its checksum`);
    }
  }
  return m;
}

/**
 * Reads one file of the backup and checks it against the manifest's sha256 and size again: the
 * bytes restore uses are the bytes the (authenticated) manifest describes, even if the file was
 * replaced after `readBackupManifest` checked it.
 * @throws BackupError('checksum').
 */
function readChecked(folder: string, m: BackupManifest, name: string): Buffer {
  const expected = m.files.find((f) => f.name === name);
  let data: Buffer;
  try {
    data = fs.readFileSync(path.join(folder, name));
  } catch (err) {
    throw new BackupError('checksum', `${name} is missing`, err);
  }
  const sha256 = crypto.createHash('sha256').update(data).digest('hex');
  if (expected?.sha256 !== sha256 || expected.bytes !== data.length) {
    throw new BackupError('checksum', `${name} changed after it was checked`);
  }
  return data;
}

function checkDeks(folder: string, m: BackupManifest, facts: SnapshotFacts): void {
  let deks: DeksFile;
  try {
    deks = JSON.parse(readChecked(folder, m, DEKS).toString('utf8')) as DeksFile;
  } catch (err) {
    if (err instanceof BackupError) {
      throw err;
    }
    throw new BackupError('snapshot', `${DEKS} is not JSON`, err);
  }
  const norm = (rows: DekRow[]) =>
    JSON.stringify(
      rows
        .map((r) => [r.version, r.status, r.wrapped, r.kekVersion])
        .sort((a, b) => Number(a[0]) - Number(b[0])),
    );
  if (
    deks.tenant !== m.tenant ||
    deks.region !== m.region ||
    norm(deks.deks) !== norm(facts.deks)
  ) {
    throw new BackupError('snapshot', `${DEKS} does not match the snapshot`);
  }
  if (facts.meta.get('tenant') !== m.tenant) {
    throw new BackupError(
      'wrong_tenant',
      'the snapshot belongs to another tenant than its manifest',
    );
  }
  if (facts.meta.get('region') !== m.region) {
    throw new BackupError(
      'wrong_region',
      'the snapshot belongs to another region than its manifest',
    );
  }
}

/**
 * Checks what the manifest cannot vouch for by itself, on the staged copy: its audit chain
 * verifies end to end (links, hashes, `seq` continuity, head anchor), and the manifest's counts,
 * audit head and DEK versions are the snapshot's own (a snapshot cut short, with its checksums
 * recomputed, no longer matches the manifest that was written with it).
 * @throws BackupError('audit_chain' | 'manifest_mismatch').
 */
function checkSnapshot(m: BackupManifest, facts: SnapshotFacts, chain: ChainVerification): void {
  if (!chain.ok || chain.count !== facts.counts.auditEvents) {
    throw new BackupError(
      'audit_chain',
      `the snapshot's audit chain does not verify (${chain.problem ?? 'count'} at seq ${String(
        chain.firstBadSeq ?? chain.count,
      )})`,
    );
  }
  const diffs: string[] = [];
  for (const key of ['invocations', 'feedback', 'auditEvents'] as const) {
    if (m.counts[key] !== facts.counts[key]) {
      diffs.push(
        `${key} ${String(m.counts[key])} in the manifest, ${String(facts.counts[key])} in the snapshot`,
      );
    }
  }
  if (m.auditHead.seq !== facts.auditHead.seq) {
    diffs.push(
      `audit head seq ${String(m.auditHead.seq)} in the manifest, ${String(facts.auditHead.seq)} in the snapshot`,
    );
  } else if (m.auditHead.hash !== facts.auditHead.hash) {
    diffs.push('audit head hash differs');
  }
  const versions = (rows: Array<Pick<DekRow, 'version' | 'status' | 'kekVersion'>>) =>
    JSON.stringify(
      rows
        .map((r) => [r.version, r.status, r.kekVersion])
        .sort((a, b) => Number(a[0]) - Number(b[0])),
    );
  if (versions(m.dekVersions) !== versions(facts.deks)) {
    diffs.push('DEK versions differ');
  }
  if (diffs.length > 0) {
    throw new BackupError(
      'manifest_mismatch',
      `the manifest does not describe the snapshot: ${diffs.join('; ')}`,
    );
  }
}

/** A staged, validated store ready to be swapped in. */
export interface StagedRestore {
  /**
   * The backup's manifest, checked against the staged copy: its counts are those of the store
   * that `commit` puts in place.
   */
  manifest: BackupManifest;
  /** Whether the manifest's MAC verified (false only with `allowUnauthenticated`). */
  authenticated: boolean;
  /**
   * Replaces the live store with the staged one (the caller closed the live handle). SQLite: a
   * crash at any point leaves either the old store, whole, or the restored one (never none).
   * @throws ConflictError if another process holds the live SQLite store open.
   */
  commit(): Promise<void>;
  /** Removes the staged copy. */
  discard(): Promise<void>;
}

const STAGED_PATTERN = /^\.([a-z0-9-]+)\.restore-[A-Za-z0-9]+\.sqlite(?:-wal|-shm|-journal)?$/;

function removeSqliteFiles(file: string): void {
  for (const suffix of ['', '-wal', '-shm', '-journal']) {
    fs.rmSync(`${file}${suffix}`, { force: true });
  }
}

/**
 * Removes the staged copies (`.<tenant>.restore-<id>.sqlite`) that restores killed before
 * their commit left in a SQLite region's folder, of `tenant` or of every tenant. Such a restore
 * never happened (the swap is one rename): the tenant still has its old store, or none if it
 * had none, and the restore must be run again. Call it when nothing restores in the region (at
 * start-up) or with the tenant quiesced. PostgreSQL: nothing to do (the swap is one
 * transaction; an abandoned `_r<id>` staging schema is not listed as a store).
 * @returns the names of the removed files (ids only; log them).
 */
export function removeAbandonedRestores(backend: StoreBackend, tenant?: string): string[] {
  if (backend.dialect !== 'sqlite') {
    return [];
  }
  if (tenant !== undefined) {
    assertTenantId(tenant);
  }
  // The region's folder, named through any valid tenant id.
  const dir = path.dirname(backend.filePath(tenant ?? 'x'));
  const removed: string[] = [];
  for (const name of fs.readdirSync(dir)) {
    const hit = STAGED_PATTERN.exec(name);
    if (hit && (tenant === undefined || hit[1] === tenant)) {
      fs.rmSync(path.join(dir, name), { force: true });
      removed.push(name);
    }
  }
  if (removed.length > 0) {
    fsyncPath(dir);
  }
  return removed;
}

function sqliteCall(
  db: sqlite3.Database,
  sql: string,
  params: unknown[] = [],
): Promise<Array<Record<string, unknown>>> {
  return new Promise((resolve, reject) => {
    db.all(sql, params, (err: Error | null, rows: Array<Record<string, unknown>>) => {
      if (err) {
        reject(err);
      } else {
        resolve(rows);
      }
    });
  });
}

/**
 * What a store knows of one DEK version (a key: its number and `created_at`): a row of its DEK
 * table or of its `dek_history` (models.ts), as a restore reconciles the snapshot's keys with it.
 */
interface KnownDek {
  version: number;
  createdAt: string;
  /** The highest count seen; undefined: none known (schema 3, or a count that is not a number). */
  wrapCount?: number;
  /** Marked compromised by an emergency rotation. */
  compromised: boolean;
  destroyed: boolean;
  destroyedAt: string | null;
}

/** A wrap count as stored (a BIGINT may come back as a string): undefined unless a safe integer ≥ 0. */
function countOf(v: unknown): number | undefined {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
  return Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}

/** A DEK row (live, or the snapshot's) as what the store knows of that key. */
function knownOfRow(r: Record<string, unknown>): KnownDek | undefined {
  const version = Number(r.version);
  if (!Number.isSafeInteger(version) || typeof r.createdAt !== 'string') {
    return undefined;
  }
  const wrapCount = countOf(r.wrapCount);
  return {
    version,
    createdAt: r.createdAt,
    ...(wrapCount !== undefined ? { wrapCount } : {}),
    compromised: Number(r.compromised) === 1,
    destroyed: r.status === 'destroyed' || Number(r.destroyed) === 1,
    destroyedAt: typeof r.destroyedAt === 'string' ? r.destroyedAt : null,
  };
}

function knownOfRows(rows: ReadonlyArray<Record<string, unknown>>): KnownDek[] {
  return rows.flatMap((r) => knownOfRow(r) ?? []);
}

/** The union of what several stores know: highest count, compromised and destroyed sticky. */
function mergeKnown(...lists: ReadonlyArray<readonly KnownDek[]>): KnownDek[] {
  const byKey = new Map<string, KnownDek>();
  for (const d of lists.flat()) {
    const id = `${String(d.version)}|${d.createdAt}`;
    const had = byKey.get(id);
    if (!had) {
      byKey.set(id, { ...d });
      continue;
    }
    const counts = [had.wrapCount, d.wrapCount].filter((c): c is number => c !== undefined);
    byKey.set(id, {
      version: d.version,
      createdAt: d.createdAt,
      ...(counts.length > 0 ? { wrapCount: Math.max(...counts) } : {}),
      compromised: had.compromised || d.compromised,
      destroyed: had.destroyed || d.destroyed,
      destroyedAt: had.destroyedAt ?? d.destroyedAt,
    });
  }
  return [...byKey.values()].sort(
    (a, b) => a.version - b.version || a.createdAt.localeCompare(b.createdAt),
  );
}

/** The `dek_history` rows to write (parameters of one INSERT each). */
function historyParams(known: readonly KnownDek[]): unknown[][] {
  return known.map((d) => [
    d.version,
    d.createdAt,
    d.wrapCount ?? 0,
    d.compromised ? 1 : 0,
    d.destroyed ? 1 : 0,
    d.destroyedAt,
  ]);
}

const HISTORY_SELECT = `SELECT version, created_at AS "createdAt", wrap_count AS "wrapCount",
  compromised, destroyed, destroyed_at AS "destroyedAt"`;

/**
 * What a restore keeps of the keys the live store knows (the same key: same number and
 * `created_at`, which a KEK rewrap keeps and a re-provision changes): its DEK rows and its
 * `dek_history`, which holds what earlier restores erased (a version made after the backup that
 * an earlier restore put in place). Each of the snapshot's versions keeps the highest count known,
 * destroyed versions included (a destroyed row keeps its final count), so restoring backups, in
 * any order, never lowers the count of a key (restoring one backup again and again would
 * otherwise give its keys unbounded encryptions). A version a scheduled rotation destroyed since
 * comes back with the backup's records under it (point-in-time restore); one an emergency
 * rotation marked compromised never does: the restore is refused.
 * @returns the counts to raise the snapshot's versions to (version → count).
 * @throws BackupError('dek_compromised').
 */
function reconcileDeks(
  tenant: string,
  snapshot: ReadonlyArray<{ version: number; createdAt: string; status: string }>,
  known: readonly KnownDek[],
): Map<number, number> {
  const raise = new Map<number, number>();
  for (const s of snapshot) {
    const l = known.find((d) => d.version === s.version && d.createdAt === s.createdAt);
    if (l === undefined) {
      continue;
    }
    if (l.compromised && s.status !== 'destroyed') {
      throw new BackupError(
        'dek_compromised',
        `the backup holds DEK version ${String(s.version)} of tenant ${tenant}, which an emergency rotation has marked compromised since: restoring it would bring that key back; restore a backup taken after that rotation finished`,
      );
    }
    if (l.wrapCount !== undefined) {
      raise.set(s.version, l.wrapCount);
    }
  }
  return raise;
}

/**
 * Folds the live store's WAL into its main file and lets SQLite delete it, so that the file
 * alone is the old store: a crash before the swap's rename then leaves it whole. A live store
 * SQLite cannot read (the reason to restore, perhaps) has nothing to keep; its WAL is removed
 * by the caller all the same, so it is never applied to the restored file.
 * @returns what the live store knows of its keys: DEK rows and history (none if there is no
 *   live store or it cannot be read).
 * @throws ConflictError if another connection keeps the WAL from being checkpointed.
 */
async function checkpointLive(file: string, tenant: string): Promise<KnownDek[]> {
  if (!fs.existsSync(file)) {
    return [];
  }
  const db = await new Promise<sqlite3.Database>((resolve, reject) => {
    const d = new sqlite3.Database(file, sqlite3.OPEN_READWRITE, (err) => {
      if (err) {
        reject(err);
      } else {
        resolve(d);
      }
    });
  }).catch(() => undefined);
  if (!db) {
    return [];
  }
  let busy = false;
  let deks: KnownDek[] = [];
  try {
    // Waits like the store's own connections (an evicted handle may still be closing).
    await sqliteCall(db, 'PRAGMA synchronous=FULL');
    await sqliteCall(db, 'PRAGMA busy_timeout=5000');
    const [row] = await sqliteCall(db, 'PRAGMA wal_checkpoint(TRUNCATE)');
    busy = row?.busy !== undefined && row.busy !== 0;
    deks = await readKnownDeksSqlite(db);
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    busy = code === 'SQLITE_BUSY' || code === 'SQLITE_LOCKED';
  } finally {
    await new Promise<void>((resolve) => {
      db.close(() => {
        resolve();
      });
    });
  }
  if (busy) {
    throw new ConflictError(`the store of tenant ${tenant} is in use by another process`);
  }
  return deks;
}

/** Whether a SQLite database has `table`. */
async function sqliteHasTable(db: sqlite3.Database, table: string): Promise<boolean> {
  const rows = await sqliteCall(
    db,
    `SELECT 1 AS ok FROM sqlite_master WHERE type = 'table' AND name = ?`,
    [table],
  );
  return rows.length > 0;
}

/** What a SQLite store knows of its keys: its DEK rows, then its history (if it has one). */
async function readKnownDeksSqlite(db: sqlite3.Database): Promise<KnownDek[]> {
  const columns = await sqliteCall(db, `SELECT name FROM pragma_table_info('${TABLES.deks}')`);
  const counted = columns.some((c) => c.name === 'wrap_count');
  const rows = await sqliteCall(
    db,
    `SELECT version, created_at AS createdAt, status, compromised, destroyed_at AS destroyedAt${counted ? ', wrap_count AS wrapCount' : ''}
     FROM ${TABLES.deks}`,
  ).catch(() => []);
  return mergeKnown(knownOfRows(rows), await readHistorySqlite(db));
}

/** The `dek_history` rows of a SQLite store (none if it has no such table, or it is unreadable). */
async function readHistorySqlite(db: sqlite3.Database): Promise<KnownDek[]> {
  if (!(await sqliteHasTable(db, TABLES.dekHistory).catch(() => false))) {
    return [];
  }
  const rows = await sqliteCall(db, `${HISTORY_SELECT} FROM ${TABLES.dekHistory}`).catch(() => []);
  return knownOfRows(rows);
}

/**
 * Reconciles the staged SQLite copy with what the live store knows of its keys (`live`: DEK rows
 * and history), before the swap puts it in place (nothing serves from it yet): refuses a
 * compromised key (reconcileDeks), raises the copy's wrap counts, and writes into its
 * `dek_history` (created if the snapshot predates it) the union of the live store's knowledge,
 * the copy's own history and the copy's DEK rows.
 * @throws BackupError('dek_compromised') (nothing changed).
 */
async function reconcileStagedSqlite(
  staged: string,
  tenant: string,
  snapshot: readonly DekRow[],
  live: readonly KnownDek[],
): Promise<void> {
  const db = await new Promise<sqlite3.Database>((resolve, reject) => {
    const d = new sqlite3.Database(staged, sqlite3.OPEN_READWRITE, (err) => {
      if (err) {
        reject(err);
      } else {
        resolve(d);
      }
    });
  });
  try {
    await sqliteCall(db, 'PRAGMA synchronous=FULL');
    await sqliteCall(db, 'BEGIN IMMEDIATE');
    try {
      const known = mergeKnown(live, await readHistorySqlite(db));
      const raise = reconcileDeks(tenant, snapshot, known);
      // A snapshot from before the counts (schema 3): the column first; the upgrade when the
      // store opens raises each count to the lower bound it sets.
      const columns = await sqliteCall(db, `SELECT name FROM pragma_table_info('${TABLES.deks}')`);
      const added = ADDED_COLUMNS.find((c) => c.table === TABLES.deks && c.column === 'wrap_count');
      if (!columns.some((c) => c.name === 'wrap_count') && added) {
        await sqliteCall(db, `ALTER TABLE ${TABLES.deks} ADD COLUMN "wrap_count" ${added.type}`);
      }
      for (const [version, count] of raise) {
        await sqliteCall(
          db,
          `UPDATE ${TABLES.deks} SET wrap_count = max(wrap_count, ?) WHERE version = ?`,
          [count, version],
        );
      }
      // A snapshot from before the history: the table first.
      await sqliteCall(
        db,
        `CREATE TABLE IF NOT EXISTS ${TABLES.dekHistory} ${DEK_HISTORY_COLUMNS}`,
      );
      await sqliteCall(db, `DELETE FROM ${TABLES.dekHistory}`);
      const history = mergeKnown(
        known,
        knownOfRows(snapshot as unknown as Array<Record<string, unknown>>),
      );
      for (const params of historyParams(history)) {
        await sqliteCall(
          db,
          `INSERT INTO ${TABLES.dekHistory}
           (version, created_at, wrap_count, compromised, destroyed, destroyed_at)
           VALUES (?, ?, ?, ?, ?, ?)`,
          params,
        );
      }
      await sqliteCall(db, 'COMMIT');
    } catch (err) {
      await sqliteCall(db, 'ROLLBACK').catch(() => undefined);
      throw err;
    }
    // The copy alone in its file before the rename (a WAL left beside it would not follow it).
    await sqliteCall(db, 'PRAGMA wal_checkpoint(TRUNCATE)');
  } finally {
    await new Promise<void>((resolve) => {
      db.close(() => {
        resolve();
      });
    });
  }
  for (const suffix of ['-wal', '-journal']) {
    if (fs.existsSync(`${staged}${suffix}`) && fs.statSync(`${staged}${suffix}`).size > 0) {
      throw new Error(`the staged copy kept a ${suffix} file`);
    }
  }
  for (const suffix of ['-wal', '-shm', '-journal']) {
    fs.rmSync(`${staged}${suffix}`, { force: true });
  }
  fsyncPath(staged);
}

/**
 * Validates `backupPath` for `region` (and `tenant`, if given), authenticates its manifest with
 * `keyProvider` (the region's) before anything is staged, and stages it beside the live store.
 * Nothing live changes until `commit`.
 * @throws BackupError (manifest, checksum, wrong_region, wrong_tenant, wrong_dialect,
 *   manifest_signature, unauthenticated, key_unavailable, snapshot, audit_chain,
 *   manifest_mismatch), KeyUnavailableError('provider').
 */
export async function stageRestore(
  backend: StoreBackend,
  backupPath: string,
  opts: {
    region: string;
    tenant?: string;
    stagingSuffix: string;
    keyProvider: KeyProvider;
    allowUnauthenticated?: boolean;
  },
): Promise<StagedRestore> {
  const folder = path.resolve(backupPath);
  const m = readBackupManifest(folder);
  if (m.region !== opts.region || backend.region !== opts.region) {
    throw new BackupError(
      'wrong_region',
      `the backup is of region ${m.region}, not ${backend.region}`,
    );
  }
  if (opts.tenant !== undefined && m.tenant !== opts.tenant) {
    throw new BackupError('wrong_tenant', `the backup is of another tenant than ${opts.tenant}`);
  }
  if (m.dialect !== backend.dialect) {
    throw new BackupError(
      'wrong_dialect',
      `the backup is a ${m.dialect} snapshot; this region uses ${backend.dialect}`,
    );
  }
  // Before anything is staged: a manifest that does not verify never reaches the database.
  const authenticated = await authenticateBackupManifest(opts.keyProvider, m, {
    allowUnauthenticated: opts.allowUnauthenticated === true,
  });
  const staged =
    backend.dialect === 'sqlite'
      ? await stageSqlite(backend, folder, m, opts.stagingSuffix)
      : await stagePostgres(backend, folder, m, opts.stagingSuffix);
  return { ...staged, authenticated };
}

async function stageSqlite(
  backend: StoreBackend,
  folder: string,
  m: BackupManifest,
  suffix: string,
): Promise<Omit<StagedRestore, 'authenticated'>> {
  const snapshot = path.join(folder, 'store.sqlite');
  const live = backend.filePath(m.tenant);
  const dir = path.dirname(live);
  const staged = path.join(dir, `.${m.tenant}.restore-${suffix}.sqlite`);
  try {
    fs.copyFileSync(snapshot, staged, fs.constants.COPYFILE_EXCL);
  } catch (err) {
    throw new BackupError('snapshot', 'store.sqlite could not be staged', err);
  }
  let facts: SnapshotFacts;
  try {
    fs.chmodSync(staged, 0o600);
    fsyncPath(staged);
    // Everything below reads the staged copy, the bytes the swap puts in place.
    const expected = m.files.find((f) => f.name === 'store.sqlite');
    const actual = sha256File(staged);
    if (actual.sha256 !== expected?.sha256 || actual.bytes !== expected.bytes) {
      throw new BackupError('checksum', 'store.sqlite changed while it was staged');
    }
    const inspected = await inspectSqliteSnapshot(staged, m.tenant).catch((err: unknown) => {
      throw new BackupError('snapshot', 'store.sqlite is not a tenant store', err);
    });
    facts = inspected.facts;
    checkDeks(folder, m, facts);
    checkSnapshot(m, facts, inspected.chain ?? { ok: false, count: 0 });
  } catch (err) {
    removeSqliteFiles(staged);
    throw err;
  }
  return {
    manifest: { ...m, counts: facts.counts },
    async commit() {
      // 1. The old store alone in its file (its WAL folded in): whole if we die before 4.
      const liveDeks = await checkpointLive(live, m.tenant);
      // 1b. The keys the live store knows (rows and history): none compromised comes back, no
      //     count goes down (the caller quiesced the tenant: the live counts are final), and
      //     the copy keeps that knowledge for the next restore.
      await reconcileStagedSqlite(staged, m.tenant, facts.deks, liveDeks);
      // 2. The old store's side files go before the new file arrives: a WAL or rollback journal
      //    left beside the restored file would be replayed into it by the next open.
      for (const suffix of ['-wal', '-shm', '-journal']) {
        fs.rmSync(`${live}${suffix}`, { force: true });
      }
      // 3. Those removals are durable before the rename can be.
      fsyncPath(dir);
      // 4. One atomic rename replaces the old file (rename(2)): old store or restored, never none.
      fs.renameSync(staged, live);
      fsyncPath(dir);
      // 5. Copies staged by restores of this tenant that died before their rename. Best effort:
      //    the restore is done, and a failure here must not report it as failed.
      try {
        removeAbandonedRestores(backend, m.tenant);
      } catch {
        // Left for the next restore of this tenant (or a start-up sweep).
      }
    },
    discard() {
      removeSqliteFiles(staged);
      return Promise.resolve();
    },
  };
}

async function stagePostgres(
  backend: StoreBackend,
  folder: string,
  m: BackupManifest,
  suffix: string,
): Promise<Omit<StagedRestore, 'authenticated'>> {
  let dump: {
    format?: unknown;
    tenant?: unknown;
    region?: unknown;
    tables?: Record<string, unknown>;
  };
  try {
    dump = JSON.parse(readChecked(folder, m, 'store.json').toString('utf8')) as typeof dump;
  } catch (err) {
    if (err instanceof BackupError) {
      throw err;
    }
    throw new BackupError('snapshot', 'store.json is not JSON', err);
  }
  if (dump.format !== DUMP_FORMAT || !dump.tables) {
    throw new BackupError('snapshot', 'store.json is not a store dump');
  }
  if (dump.tenant !== m.tenant) {
    throw new BackupError(
      'wrong_tenant',
      'the snapshot belongs to another tenant than its manifest',
    );
  }
  if (dump.region !== m.region) {
    throw new BackupError(
      'wrong_region',
      'the snapshot belongs to another region than its manifest',
    );
  }
  const tables = dump.tables;
  const live = backend.schemaName(m.tenant);
  const staging = `${live.slice(0, 40)}_r${suffix}`;
  const admin = backend.admin();
  // What the live store holds as the restore begins: other replicas keep writing to it (the
  // restoring process blocks the tenant only for itself), and the swap would drop what they
  // write meanwhile; the swap compares (see liveWritesSince).
  const liveAtStart = await liveMarks(admin, live);
  await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
  const h = await backend.openAt({ schema: staging }, m.tenant, true);
  let facts: SnapshotFacts;
  try {
    await h.sequelize.transaction(async (t) => {
      await h.models.Meta.destroy({ where: {}, transaction: t });
      await h.models.AuditHead.destroy({ where: {}, transaction: t });
      for (const [model, table] of MODEL_TABLES) {
        // Dumps made before head tables existed have none (nothing was ever rewrapped by head).
        const rows = OPTIONAL_TABLES.has(table) ? (tables[table] ?? []) : tables[table];
        if (!Array.isArray(rows)) {
          throw new BackupError('snapshot', `store.json has no table ${table}`);
        }
        const target = h.models[model] as unknown as {
          bulkCreate(rows: unknown[], o: object): Promise<unknown>;
        };
        for (let i = 0; i < rows.length; i += 500) {
          await target.bulkCreate(rows.slice(i, i + 500), { transaction: t, validate: false });
        }
      }
      // Loading the records ran the store's wrap-counting triggers (store-backend.ts): put
      // each version's count back to the snapshot's, or, in a dump from before the counts
      // (schema 4), to the lower bound an upgrade sets.
      const deks = h.qualified(TABLES.deks);
      for (const row of tables[TABLES.deks] as Array<{ version: number; wrapCount?: unknown }>) {
        await h.sequelize.query(
          `UPDATE ${deks} SET wrap_count = GREATEST($1::bigint,
             ${wrapCountFloorSql((table) => h.qualified(table), '$2::integer')})
           WHERE version = $2::integer`,
          { bind: [Number(row.wrapCount ?? 0), row.version], transaction: t },
        );
      }
      // The key history of a store restored before this backup (dumps without one have none;
      // the swap writes it in any case).
      const history = tables[TABLES.dekHistory];
      if (history !== undefined) {
        if (!Array.isArray(history)) {
          throw new BackupError('snapshot', `store.json has a malformed ${TABLES.dekHistory}`);
        }
        const qh = h.qualified(TABLES.dekHistory);
        await h.sequelize.query(`CREATE TABLE IF NOT EXISTS ${qh} ${DEK_HISTORY_COLUMNS}`, {
          transaction: t,
        });
        for (const bind of historyParams(knownOfRows(history as Array<Record<string, unknown>>))) {
          await h.sequelize.query(
            `INSERT INTO ${qh} (version, created_at, wrap_count, compromised, destroyed, destroyed_at)
             VALUES ($1::integer, $2, $3::bigint, $4::integer, $5::integer, $6)
             ON CONFLICT (version, created_at) DO NOTHING`,
            { bind, transaction: t },
          );
        }
      }
      for (const table of [TABLES.invocations, TABLES.feedback]) {
        await h.sequelize.query(
          `SELECT setval(pg_get_serial_sequence('${h.qualified(table)}', 'seq'),
                  COALESCE((SELECT MAX(seq) FROM ${h.qualified(table)}), 0) + 1, false)`,
          { type: QueryTypes.SELECT, transaction: t },
        );
      }
    });
    facts = await factsOf(h.models);
    checkDeks(folder, m, facts);
    checkSnapshot(m, facts, await verifyAudit(h));
  } catch (err) {
    await h.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
    throw err instanceof BackupError
      ? err
      : new BackupError('snapshot', 'store.json could not be loaded', err);
  }
  await h.close();
  return {
    manifest: { ...m, counts: facts.counts },
    async commit() {
      await admin.transaction(async (t) => {
        // The live store's keys: none compromised comes back, no count goes down. Its DEK
        // table is locked EXCLUSIVE from here on: no write of any replica runs until COMMIT.
        await reconcilePostgres(admin, t, { live, staging }, m.tenant, facts.deks);
        const written = liveWritesSince(liveAtStart, await liveMarks(admin, live, t));
        if (written.length > 0) {
          throw new ConflictError(
            `tenant ${m.tenant}: ${written.join(', ')} written while the restore ran (calls answered on another replica); the restore would drop them, so nothing was replaced: suspend the tenant (npx cellcds tenant suspend ${m.tenant}: every replica refuses its calls), restore again, then resume it`,
          );
        }
        await admin.query(`DROP SCHEMA IF EXISTS "${live}" CASCADE`, { transaction: t });
        await admin.query(`ALTER SCHEMA "${staging}" RENAME TO "${live}"`, { transaction: t });
      });
    },
    async discard() {
      await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
    },
  };
}

/** The highest `seq` of each table a write appends to (undefined: no such table). */
type LiveMarks = Readonly<Record<string, number>> | undefined;

const APPENDED_TABLES = [TABLES.invocations, TABLES.feedback, TABLES.auditEvents] as const;

/** Whether a (qualified, quoted) table exists in the PostgreSQL database. */
async function tableExists(admin: Sequelize, name: string, t?: Transaction): Promise<boolean> {
  const [row] = await admin.query<{ ok: boolean }>('SELECT to_regclass($1) IS NOT NULL AS ok', {
    bind: [name],
    type: QueryTypes.SELECT,
    ...(t ? { transaction: t } : {}),
  });
  return row?.ok === true;
}

/** The live schema's marks: undefined when it has no store (never provisioned, deprovisioned). */
async function liveMarks(admin: Sequelize, schema: string, t?: Transaction): Promise<LiveMarks> {
  const marks: Record<string, number> = {};
  for (const table of APPENDED_TABLES) {
    const name = `"${schema}"."${table}"`;
    if (!(await tableExists(admin, name, t))) {
      return undefined;
    }
    const [row] = await admin.query<{ seq: string | number | null }>(
      `SELECT MAX(seq) AS seq FROM ${name}`,
      { type: QueryTypes.SELECT, ...(t ? { transaction: t } : {}) },
    );
    marks[table] = Number(row?.seq ?? 0);
  }
  return marks;
}

/** What was appended between two marks, as `N invocation(s)`-like texts (none: empty). */
function liveWritesSince(before: LiveMarks, after: LiveMarks): string[] {
  if (after === undefined) {
    return [];
  }
  const names: Record<string, string> = {
    [TABLES.invocations]: 'invocation record(s)',
    [TABLES.feedback]: 'feedback record(s)',
    [TABLES.auditEvents]: 'audit event(s)',
  };
  return APPENDED_TABLES.flatMap((table) => {
    const added = (after[table] ?? 0) - (before?.[table] ?? 0);
    return added > 0 ? [`${String(added)} ${names[table] ?? table}`] : [];
  });
}

/**
 * PostgreSQL: in the swap's transaction, before the live schema is dropped, reconciles the
 * staged copy with what the live store knows of its keys, its DEK rows and its `dek_history`
 * (reconcileDeks), and writes into the copy's `dek_history` (created if the dump predates it)
 * the union of that, the copy's own history and the copy's DEK rows. The live DEK table is
 * locked EXCLUSIVE first: every write (of any replica) locks its primary row and its triggers
 * add to it, so the counts read after the lock are final until the swap commits.
 * @throws BackupError('dek_compromised').
 */
async function reconcilePostgres(
  admin: Sequelize,
  t: Transaction,
  schemas: { live: string; staging: string },
  tenant: string,
  snapshot: readonly DekRow[],
): Promise<void> {
  const q = (schema: string, table: string) => `"${schema}"."${table}"`;
  const exists = (name: string) => tableExists(admin, name, t);
  const readHistory = async (schema: string): Promise<KnownDek[]> =>
    (await exists(q(schema, TABLES.dekHistory)))
      ? knownOfRows(
          await admin.query<Record<string, unknown>>(
            `${HISTORY_SELECT} FROM ${q(schema, TABLES.dekHistory)}`,
            { type: QueryTypes.SELECT, transaction: t },
          ),
        )
      : [];
  let live: KnownDek[] = [];
  const liveDeks = q(schemas.live, TABLES.deks);
  // No live store: never provisioned here, or deprovisioned (nothing of it to keep).
  if (await exists(liveDeks)) {
    await admin.query(`LOCK TABLE ${liveDeks} IN EXCLUSIVE MODE`, { transaction: t });
    const columns = await admin.query<{ name: string }>(
      `SELECT column_name AS name FROM information_schema.columns
       WHERE table_schema = $1 AND table_name = $2 AND column_name = 'wrap_count'`,
      { bind: [schemas.live, TABLES.deks], type: QueryTypes.SELECT, transaction: t },
    );
    const counted = columns.length > 0;
    const rows = await admin.query<Record<string, unknown>>(
      `SELECT version, created_at AS "createdAt", status, compromised,
              destroyed_at AS "destroyedAt"${counted ? ', wrap_count AS "wrapCount"' : ''}
       FROM ${liveDeks}`,
      { type: QueryTypes.SELECT, transaction: t },
    );
    live = mergeKnown(knownOfRows(rows), await readHistory(schemas.live));
  }
  const known = mergeKnown(live, await readHistory(schemas.staging));
  const raise = reconcileDeks(tenant, snapshot, known);
  for (const [version, count] of raise) {
    await admin.query(
      `UPDATE ${q(schemas.staging, TABLES.deks)} SET wrap_count = GREATEST(wrap_count, $1::bigint)
       WHERE version = $2::integer`,
      { bind: [count, version], transaction: t },
    );
  }
  const history = q(schemas.staging, TABLES.dekHistory);
  await admin.query(`CREATE TABLE IF NOT EXISTS ${history} ${DEK_HISTORY_COLUMNS}`, {
    transaction: t,
  });
  await admin.query(`DELETE FROM ${history}`, { transaction: t });
  const all = mergeKnown(known, knownOfRows(snapshot as unknown as Array<Record<string, unknown>>));
  for (const bind of historyParams(all)) {
    await admin.query(
      `INSERT INTO ${history} (version, created_at, wrap_count, compromised, destroyed, destroyed_at)
       VALUES ($1::integer, $2, $3::bigint, $4::integer, $5::integer, $6)`,
      { bind, transaction: t },
    );
  }
}
