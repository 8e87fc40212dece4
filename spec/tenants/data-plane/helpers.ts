/**
 * Shared set-up of the data-plane specs: a temp dir per environment, a real local keyring,
 * and region stores on SQLite, or on the real PostgreSQL server when CELLCDS_TEST_PG_URL is
 * set (unique schema prefix per run, dropped afterwards). Raw database access lets specs
 * tamper with rows the way an attacker with file or database access would.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { QueryTypes, Sequelize } from 'sequelize';
import {
  createLocalKeyProvider,
  openRecord,
  openRegionStores,
  sealLegacyRecord,
  tenantSchemaName,
} from '../../../tenants/data-plane.ts';
import { dekAad } from '../../../tenants/data-plane/dek-ring.ts';
import type {
  EnvelopeForm,
  KeyProvider,
  NewInvocation,
  OpenRegionStoresOptions,
  RegionStores,
} from '../../../tenants/data-plane.ts';

export const PG_URL = process.env.CELLCDS_TEST_PG_URL;
export const RUN_ID = crypto.randomBytes(4).toString('hex');

export type BackendName = 'sqlite' | 'postgres';

/** One region's stores plus everything a spec needs to look underneath. */
export interface Env {
  backend: BackendName;
  region: string;
  dir: string;
  keyDir: string;
  dataDir: string;
  backupDir: string;
  schemaPrefix: string;
  provider: KeyProvider;
  stores: RegionStores;
  /** Opens another RegionStores on the same storage and keyring (a restarted process). */
  reopen(extra?: Partial<OpenRegionStoresOptions>): Promise<RegionStores>;
  /** Options a child process needs to open the same region. */
  childOptions(): ChildOptions;
  /** Raw SQL on one tenant's store (table names are qualified for you via `t(name)`). */
  raw(tenant: string): Promise<RawDb>;
  close(): Promise<void>;
}

export interface ChildOptions {
  region: string;
  keyDir: string;
  dataDir?: string;
  postgresUrl?: string;
  schemaPrefix?: string;
}

export interface RawDb {
  t(table: string): string;
  query<T extends object = Record<string, unknown>>(
    sql: string,
    replacements?: Record<string, unknown>,
  ): Promise<T[]>;
  exec(sql: string, replacements?: Record<string, unknown>): Promise<void>;
  /** Drops the append-only triggers of the audit table, as an attacker with DB access could. */
  dropAuditTriggers(): Promise<void>;
  close(): Promise<void>;
}

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
}

export async function makeEnv(
  backend: BackendName,
  opts: { region?: string; dir?: string; stores?: Partial<OpenRegionStoresOptions> } = {},
): Promise<Env> {
  const region = opts.region ?? 'eu-west';
  const dir = opts.dir ?? tmpDir();
  const keyDir = path.join(dir, 'keys');
  const dataDir = path.join(dir, 'data');
  const backupDir = path.join(dir, 'backups');
  const schemaPrefix = `cellcds_t_${RUN_ID}_${crypto.randomBytes(2).toString('hex')}_`;
  const provider = await createLocalKeyProvider({ keyDir, region });
  const base = (): OpenRegionStoresOptions => ({
    region,
    keyProvider: provider,
    ...(backend === 'sqlite' ? { dataDir } : { postgresUrl: PG_URL ?? '', schemaPrefix }),
    rewrap: { batchSize: 50, throttleMs: 0 },
    ...opts.stores,
  });
  const opened: RegionStores[] = [];
  const open = async (extra: Partial<OpenRegionStoresOptions> = {}) => {
    const s = await openRegionStores({ ...base(), ...extra });
    opened.push(s);
    return s;
  };
  const stores = await open();
  const raws: RawDb[] = [];
  return {
    backend,
    region,
    dir,
    keyDir,
    dataDir,
    backupDir,
    schemaPrefix,
    provider,
    stores,
    reopen: open,
    childOptions: () => ({
      region,
      keyDir,
      ...(backend === 'sqlite' ? { dataDir } : { postgresUrl: PG_URL ?? '', schemaPrefix }),
    }),
    raw(tenant) {
      const db =
        backend === 'sqlite'
          ? new Sequelize({
              dialect: 'sqlite',
              storage: path.join(dataDir, region, `${tenant}.sqlite`),
              logging: false,
            })
          : new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false, pool: { max: 1 } });
      const schema = backend === 'postgres' ? tenantSchemaName(schemaPrefix, tenant) : undefined;
      const t = (table: string) => (schema ? `"${schema}"."${table}"` : `"${table}"`);
      const raw: RawDb = {
        t,
        query: (sql, replacements) =>
          db.query(sql, { type: QueryTypes.SELECT, ...(replacements ? { replacements } : {}) }),
        async exec(sql, replacements) {
          await db.query(sql, replacements ? { replacements } : {});
        },
        async dropAuditTriggers() {
          if (backend === 'sqlite') {
            await db.query('DROP TRIGGER IF EXISTS audit_events_no_update');
            await db.query('DROP TRIGGER IF EXISTS audit_events_no_delete');
          } else {
            await db.query(
              `DROP TRIGGER IF EXISTS audit_events_append_only ON ${t('audit_events')}`,
            );
          }
        },
        close: () => db.close(),
      };
      raws.push(raw);
      return Promise.resolve(raw);
    },
    async close() {
      for (const r of raws) {
        await r.close().catch(() => undefined);
      }
      for (const s of opened) {
        await s.close().catch(() => undefined);
      }
      if (backend === 'postgres') {
        await dropSchemas(schemaPrefix);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Drops every schema whose name starts with `prefix` (PostgreSQL specs clean up after themselves). */
export async function dropSchemas(prefix: string): Promise<void> {
  const db = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false, pool: { max: 1 } });
  try {
    const rows = await db.query<{ schema_name: string }>(
      'SELECT schema_name FROM information_schema.schemata WHERE left(schema_name, :n) = :prefix',
      { type: QueryTypes.SELECT, replacements: { n: prefix.length, prefix } },
    );
    for (const r of rows) {
      await db.query(`DROP SCHEMA IF EXISTS "${r.schema_name}" CASCADE`);
    }
  } finally {
    await db.close();
  }
}

let pgSkipAnnounced = false;

/**
 * Runs `body` once per backend: SQLite always, PostgreSQL when CELLCDS_TEST_PG_URL is set.
 * Without it, the whole spec suite reports exactly one skipped line naming the variable.
 */
export function forEachBackend(title: string, body: (backend: BackendName) => void): void {
  describe(`${title} [sqlite]`, () => {
    body('sqlite');
  });
  if (PG_URL) {
    describe(`${title} [postgres]`, () => {
      body('postgres');
    });
  } else if (!pgSkipAnnounced) {
    pgSkipAnnounced = true;
    describe('tenants/ data plane on PostgreSQL', () => {
      it.skip('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    });
  }
}

/** A PHI-free-metadata invocation whose secret carries `marker` everywhere PHI would be. */
export function invocation(
  id: string,
  marker = 'PHI',
  extra: Partial<Omit<NewInvocation, 'secret' | 'secretJson'>> & {
    secret?: NewInvocation['secret'];
  } = {},
): NewInvocation {
  return {
    id,
    time: new Date(Date.UTC(2025, 0, 1, 12, 0, 0) + Number(id.replace(/\D/g, '') || 0) * 1000),
    service: 'med-safety',
    hook: 'order-sign',
    hookInstance: `hi-${id}`,
    pack: { id: 'medication-safety', version: '1.2.0', hash: 'a'.repeat(64) },
    cardUuids: [`card-${id}`],
    suggestionUuids: [`sugg-${id}`],
    secret: {
      context: { patientId: `${marker}-patient`, userId: 'Practitioner/1' },
      prefetch: { patient: { resourceType: 'Patient', name: [{ family: `${marker}-family` }] } },
      cards: [{ summary: `${marker}-card-summary`, uuid: `card-${id}` }],
      trace: [{ rule: 'r1', matched: `${marker}-trace` }],
    },
    ...extra,
  };
}

/** Every file under `root` (recursively) that contains `needle` (as UTF-8 bytes). */
export function filesContaining(root: string, needle: string | Buffer): string[] {
  const bytes = typeof needle === 'string' ? Buffer.from(needle, 'utf8') : needle;
  const hits: string[] = [];
  const walk = (p: string) => {
    if (!fs.existsSync(p)) {
      return;
    }
    const st = fs.statSync(p);
    if (st.isDirectory()) {
      for (const e of fs.readdirSync(p)) {
        walk(path.join(p, e));
      }
    } else if (fs.readFileSync(p).includes(bytes)) {
      hits.push(p);
    }
  };
  walk(root);
  return hits;
}

/** Narrows `err` to `cls` or fails the spec. */
export function asInstance<T extends Error>(
  err: unknown,
  cls: abstract new (...args: never[]) => T,
): T {
  if (!(err instanceof cls)) {
    throw new Error(
      `expected ${cls.name}, got ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`,
    );
  }
  return err;
}

export async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

/**
 * Rewrites a stored record the way stores sealed records before record keys (directly under
 * the DEK; `form`: text `ccds1.` or binary 0x02): what a store written by an older release
 * holds. Unwraps the record's DEK through the key provider, as the store would.
 */
export async function rewriteAsLegacy(
  env: Env,
  tenant: string,
  table: 'invocations' | 'feedback',
  id: string,
  form: EnvelopeForm,
): Promise<void> {
  const raw = await env.raw(tenant);
  const [row] = await raw.query<{ sealed: string | Buffer; key_version: number }>(
    `SELECT sealed, key_version FROM ${raw.t(table)} WHERE id = :id`,
    { id },
  );
  if (!row) {
    throw new Error(`no record ${id}`);
  }
  const [dek] = await raw.query<{ wrapped: string }>(
    `SELECT wrapped FROM ${raw.t('dek_versions')} WHERE version = :v`,
    { v: row.key_version },
  );
  const key = await env.provider.unwrapDek(
    tenant,
    dek!.wrapped,
    dekAad(env.region, tenant, row.key_version),
  );
  const addr = { tenant, table, recordId: id };
  const plain = await openRecord(row.sealed, addr, () => Promise.resolve(key));
  await raw.exec(`UPDATE ${raw.t(table)} SET sealed = :sealed WHERE id = :id`, {
    id,
    sealed: sealLegacyRecord(form, { version: row.key_version, key }, addr, plain),
  });
}

/**
 * Flips one byte of a segment (1 wrapped record key, 2 iv, 3 ciphertext, 4 tag) of an
 * envelope, in any form: text (`ccds3.` or the older `ccds1.`) or binary (0x03 or 0x02).
 */
export function flipCiphertextByte<E extends string | Uint8Array>(
  envelope: E,
  segment = 3,
  index = 0,
): E {
  if (typeof envelope !== 'string') {
    const buf = Buffer.from(envelope);
    const wrap = buf[4] === 0x03 ? 60 : 0;
    const header = 5 + 4 + wrap + 12;
    const [start, end] =
      segment === 1
        ? [9, 9 + wrap]
        : segment === 2
          ? [9 + wrap, header]
          : segment === 4
            ? [buf.length - 16, buf.length]
            : [header, buf.length - 16];
    if (end <= start) {
      throw new Error('this envelope has no such segment');
    }
    const at = start + (index % (end - start));
    buf[at] = (buf[at] ?? 0) ^ 0x01;
    return buf as unknown as E;
  }
  const parts = envelope.split('.');
  const at = parts[0] === 'ccds3' ? segment + 1 : segment;
  if (parts[0] !== 'ccds3' && segment === 1) {
    throw new Error('this envelope has no such segment');
  }
  const buf = Buffer.from(parts[at] ?? '', 'base64url');
  buf[index % buf.length] = (buf[index % buf.length] ?? 0) ^ 0x01;
  parts[at] = buf.toString('base64url');
  return parts.join('.') as E;
}
