/**
 * Per-tenant backups: a consistent snapshot of the store as stored (ciphertext and wrapped
 * DEKs only, never a plaintext key), the wrapped DEKs read from that same snapshot
 * (`deks.json`), and `manifest.json` (tenant, region, dialect, time, counts, audit head,
 * sha256 and size of every file). SQLite snapshots use `VACUUM INTO`; PostgreSQL snapshots are
 * a JSON dump of the schema's rows read in one REPEATABLE READ transaction.
 *
 * Restore validates the manifest and checksums, refuses another region, tenant or dialect,
 * checks the snapshot's own tenant/region and DEKs, stages the store next to the live one and
 * swaps it in (SQLite: rename; PostgreSQL: rename schema in one transaction).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QueryTypes, Sequelize } from 'sequelize';
import type { Transaction } from 'sequelize';
import sqlite3 from 'sqlite3';
import { z } from 'zod';
import { BackupError } from './errors.ts';
import { assertRegionId, assertTenantId } from './ids.ts';
import { TABLES, defineTenantStoreModels } from './models.ts';
import type { DekRow, TenantStoreModels } from './models.ts';
import type { StoreBackend, StoreHandle } from './store-backend.ts';
import type { BackupResult } from './types.ts';

const MANIFEST = 'manifest.json';
const DEKS = 'deks.json';
const FORMAT = 'cellcds-tenant-backup/1';
const DUMP_FORMAT = 'cellcds-store-dump/1';
const MAX_MANIFEST_BYTES = 1024 * 1024;
const HEX64 = /^[0-9a-f]{64}$/;

const countsSchema = z.strictObject({
  invocations: z.number().int().min(0),
  feedback: z.number().int().min(0),
  auditEvents: z.number().int().min(0),
});

const manifestSchema = z.strictObject({
  format: z.literal(FORMAT),
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
});

/** The manifest of a backup folder. */
export type BackupManifest = z.infer<typeof manifestSchema>;

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

function fsyncPath(p: string): void {
  const fd = fs.openSync(p, 'r');
  try {
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
  const sequelize = new Sequelize({
    dialect: 'sqlite',
    storage: file,
    logging: false,
    dialectOptions: { mode: sqlite3.OPEN_READONLY },
  });
  try {
    return await factsOf(defineTenantStoreModels(sequelize));
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
 * Writes a backup of the open store `h` into a new folder under `backupDir` (0700; files 0600).
 * @throws BackupError('snapshot') if the snapshot cannot be written.
 */
export async function writeBackup(
  h: StoreHandle,
  backupDir: string,
  now: () => Date,
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
    const manifest: BackupManifest = {
      format: FORMAT,
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
    };
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
    throw err instanceof BackupError
      ? err
      : new BackupError('snapshot', `backup of ${h.tenant} failed`, err);
  }
}

/**
 * Reads and checks a backup folder: manifest shape, file set, sizes and sha256.
 * @throws BackupError('manifest' | 'checksum').
 */
export function readBackupManifest(backupPath: string): BackupManifest {
  const folder = path.resolve(backupPath);
  const manifestFile = path.join(folder, MANIFEST);
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

function checkDeks(folder: string, m: BackupManifest, facts: SnapshotFacts): void {
  let deks: DeksFile;
  try {
    deks = JSON.parse(fs.readFileSync(path.join(folder, DEKS), 'utf8')) as DeksFile;
  } catch (err) {
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

/** A staged, validated store ready to be swapped in. */
export interface StagedRestore {
  manifest: BackupManifest;
  /** Replaces the live store with the staged one (the caller closed the live handle). */
  commit(): Promise<void>;
  /** Removes the staged copy. */
  discard(): Promise<void>;
}

/**
 * Validates `backupPath` for `region` (and `tenant`, if given) and stages it beside the live
 * store. Nothing live changes until `commit`.
 * @throws BackupError (manifest, checksum, wrong_region, wrong_tenant, wrong_dialect, snapshot).
 */
export async function stageRestore(
  backend: StoreBackend,
  backupPath: string,
  opts: { region: string; tenant?: string; stagingSuffix: string },
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
  if (backend.dialect === 'sqlite') {
    const snapshot = path.join(folder, 'store.sqlite');
    const facts = await sqliteSnapshotFacts(snapshot).catch((err: unknown) => {
      throw new BackupError('snapshot', 'store.sqlite is not a tenant store', err);
    });
    checkDeks(folder, m, facts);
    const live = backend.filePath(m.tenant);
    const staged = path.join(
      path.dirname(live),
      `.${m.tenant}.restore-${opts.stagingSuffix}.sqlite`,
    );
    fs.copyFileSync(snapshot, staged, fs.constants.COPYFILE_EXCL);
    fs.chmodSync(staged, 0o600);
    fsyncPath(staged);
    return {
      manifest: m,
      async commit() {
        await backend.remove(m.tenant);
        fs.renameSync(staged, live);
        fsyncPath(path.dirname(live));
      },
      discard() {
        fs.rmSync(staged, { force: true });
        return Promise.resolve();
      },
    };
  }
  return stagePostgres(backend, folder, m, opts.stagingSuffix);
}

async function stagePostgres(
  backend: StoreBackend,
  folder: string,
  m: BackupManifest,
  suffix: string,
): Promise<StagedRestore> {
  let dump: {
    format?: unknown;
    tenant?: unknown;
    region?: unknown;
    tables?: Record<string, unknown>;
  };
  try {
    dump = JSON.parse(fs.readFileSync(path.join(folder, 'store.json'), 'utf8')) as typeof dump;
  } catch (err) {
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
  await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
  const h = await backend.openAt({ schema: staging }, m.tenant, true);
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
      for (const table of [TABLES.invocations, TABLES.feedback]) {
        await h.sequelize.query(
          `SELECT setval(pg_get_serial_sequence('${h.qualified(table)}', 'seq'),
                  COALESCE((SELECT MAX(seq) FROM ${h.qualified(table)}), 0) + 1, false)`,
          { type: QueryTypes.SELECT, transaction: t },
        );
      }
    });
    checkDeks(folder, m, await factsOf(h.models));
  } catch (err) {
    await h.close();
    await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
    throw err instanceof BackupError
      ? err
      : new BackupError('snapshot', 'store.json could not be loaded', err);
  }
  await h.close();
  return {
    manifest: m,
    async commit() {
      await admin.transaction(async (t) => {
        await admin.query(`DROP SCHEMA IF EXISTS "${live}" CASCADE`, { transaction: t });
        await admin.query(`ALTER SCHEMA "${staging}" RENAME TO "${live}"`, { transaction: t });
      });
    },
    async discard() {
      await admin.query(`DROP SCHEMA IF EXISTS "${staging}" CASCADE`);
    },
  };
}
