/**
 * Where a region's tenant stores live and how one is opened: a SQLite file per tenant
 * (`<dataDir>/<region>/<tenant>.sqlite`, WAL, `synchronous=FULL` and `secure_delete` on every
 * connection) or a PostgreSQL schema per tenant (`<prefix><tenant>`). A handle is one Sequelize
 * instance with the models, a write queue (one writer per store in this process) and the
 * tenant's plaintext DEK cache (process memory only, dropped when the handle closes).
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {
  ConnectionError,
  DatabaseError,
  QueryTypes,
  Sequelize,
  TimeoutError,
  Transaction,
  UniqueConstraintError,
} from 'sequelize';
import type { SyncOptions } from 'sequelize';
import sqlite3 from 'sqlite3';
import { z } from 'zod';
import {
  ControlPlaneUnavailableError,
  idleInTransactionTimeoutFor,
} from '../control-plane-postgres.ts';
import { ConflictError, NotFoundError } from '../errors.ts';
import {
  execSql,
  keepStatements,
  querySql,
  releaseStatements,
  withPragmas,
} from '../sqlite-connections.ts';
import type { SqliteConnection } from '../sqlite-connections.ts';
import { fsyncPath } from './fsync.ts';
import { GENESIS_HASH } from './hash-chain.ts';
import {
  ADDED_COLUMNS,
  HEAD_TABLES,
  SEALED_TABLES,
  STORE_SCHEMA_VERSION,
  TABLES,
  defineTenantStoreModels,
} from './models.ts';
import type { TenantStoreModels } from './models.ts';
import type { EnvelopeForm } from './record-cipher.ts';

export type Dialect = 'sqlite' | 'postgres';

/**
 * The primary DEK version's row, as a write checks it: the number and the row's `created_at`,
 * which tells a version apart from an earlier one of the same number (numbers start again at 1
 * after a deprovision + re-provision, and a restore + rotation creates another key under a
 * number a process may have cached). Set once when the version is created; a KEK rewrap keeps
 * it, a backup restores it with the row.
 */
export interface PrimaryDek {
  version: number;
  createdAt: string;
  /**
   * The version's wrap count as the transaction read it (wrap-limit.ts). Only rows read by a
   * write transaction (`lockedPrimary`) carry it.
   */
  wrapCount?: number;
}

/** How `writeTx` runs `fn`. */
export interface WriteOptions {
  /**
   * `fn` checks the primary DEK with `lockedPrimary(t)`. The primary row is read once at the
   * start of the (group's) transaction, before any other statement of it, and on PostgreSQL
   * locked `FOR NO KEY UPDATE` until COMMIT (the write's triggers add to the row's wrap count,
   * so writes of several replicas take turns on it; a shared lock that each then upgraded would
   * deadlock): a rotation (which locks that row `FOR UPDATE` first) waits
   * for this transaction, so nothing this transaction seals under the version it checked can
   * commit after the version stopped being primary (and the rewrap job then destroyed it while
   * the write was in flight). Lock order in every transaction: the primary DEK row first, then
   * anything else (the audit head, records), so no two transactions wait for each other.
   */
  primary?: boolean;
  /**
   * `fn` locks or changes DEK rows (a rotation, a KEK rewrap): it runs in a transaction of its
   * own, never after other writes of a group (which may hold the audit head while the primary
   * row's lock waits for another replica that waits for that head).
   */
  alone?: boolean;
}

/** An open tenant store. */
export interface StoreHandle {
  readonly tenant: string;
  readonly region: string;
  readonly dialect: Dialect;
  /**
   * The envelope form new and rewrapped records are sealed in: binary (a BLOB) on SQLite, text
   * on PostgreSQL (a TEXT column). Reads accept both.
   */
  readonly envelopeForm: EnvelopeForm;
  readonly sequelize: Sequelize;
  readonly models: TenantStoreModels;
  /** Plaintext DEKs by version: process memory only, never persisted or returned. */
  readonly deks: Map<number, KeyObject>;
  /**
   * Runs `fn` in a write transaction, after this process's other writes to this store
   * (possibly sharing one COMMIT with writes queued meanwhile; see createGroupCommit). Settles
   * after the commit. Never call it from inside `fn` (it would wait for itself).
   */
  writeTx<T>(fn: (t: Transaction) => Promise<T>, opts?: WriteOptions): Promise<T>;
  /**
   * The primary DEK row read at the start of `t`'s write transaction (held `FOR NO KEY UPDATE`
   * on PostgreSQL, under SQLite's write lock), or undefined if the store has none. Only for a
   * `writeTx` run with `{ primary: true }`. @throws Error otherwise (a bug, not a state).
   */
  lockedPrimary(t: Transaction): PrimaryDek | undefined;
  /** Runs `fn` in a read transaction that sees one consistent snapshot. */
  readTx<T>(fn: (t: Transaction) => Promise<T>): Promise<T>;
  /** `"table"` or `"schema"."table"` for raw statements. */
  qualified(table: string): string;
  /**
   * Runs one raw statement with `?` placeholders inside `t` (SQLite: straight on the
   * transaction's connection, without Sequelize's per-query work, which scans the SQL text with
   * regular expressions and captures a stack; PostgreSQL: through Sequelize with bind
   * parameters). Returns the rows of a SELECT. A unique or primary-key violation becomes
   * Sequelize's UniqueConstraintError on both.
   */
  raw<R = unknown>(t: Transaction, sql: string, params: readonly unknown[]): Promise<R[]>;
  /**
   * SQLite only (undefined on PostgreSQL): runs one statement on the store's writer
   * connection, after this process's other writes to this store, in SQLite's autocommit mode:
   * the statement is its own transaction (write lock taken when it starts, rolled back whole if
   * it fails, durable when it settles). One trip through the thread pool where `writeTx` takes
   * at least three (BEGIN IMMEDIATE, the statement, COMMIT). The writer connection carries the
   * TEMP triggers of INVOCATION_CARD_LINKS_SQLITE. Constraint violations as for `raw`.
   */
  readonly writeStatement?: <R = unknown>(sql: string, params: readonly unknown[]) => Promise<R[]>;
  /** SQLite: checkpoint and truncate the WAL (drops old page images); PostgreSQL: no-op. */
  compact(): Promise<void>;
  close(): Promise<void>;
}

/** The keyring a region's stores are bound to (`KeyProviderInfo.keyringId`), and since when. */
export interface KeyringBinding {
  keyringId: string;
  boundAt: string;
}

const keyringBindingSchema = z.strictObject({
  keyringId: z.string().regex(/^[A-Za-z0-9._:-]{1,200}$/),
  boundAt: z.string().max(64),
});

/** A region's storage: SQLite files or PostgreSQL schemas. */
export interface StoreBackend {
  readonly dialect: Dialect;
  readonly region: string;
  exists(tenant: string): Promise<boolean>;
  /** Tenants with a store. */
  list(): Promise<string[]>;
  /** Opens (with `create`, creating) the tenant's store. @throws NotFoundError without create. */
  open(tenant: string, create: boolean): Promise<StoreHandle>;
  /** Deletes the store (files incl. WAL/SHM, or the schema). */
  remove(tenant: string): Promise<void>;
  /** Whether the storage answers (RegionStores.ping). Never rejects. */
  ping(): Promise<{ ok: boolean; error?: string; code?: string }>;
  close(): Promise<void>;
  /** SQLite only: the store file. */
  filePath(tenant: string): string;
  /** PostgreSQL only: the schema name. */
  schemaName(tenant: string): string;
  /** PostgreSQL only: a connection for region-level statements. */
  admin(): Sequelize;
  /**
   * The keyring the region's stores are bound to (`keyring-binding.ts`), if one was bound.
   * Rejects only if the storage cannot be read.
   */
  keyringBinding(): Promise<KeyringBinding | undefined>;
  /**
   * Binds the region's stores to `binding` unless they are bound already; atomic across
   * replicas. Returns the binding that holds: `binding`, or the one made first.
   */
  bindKeyring(binding: KeyringBinding): Promise<KeyringBinding>;
  /** Opens a handle on an arbitrary SQLite file or PostgreSQL schema (restore staging). */
  openAt(
    target: { file?: string; schema?: string },
    tenant: string,
    create: boolean,
  ): Promise<StoreHandle>;
}

/** The driver error under a Sequelize error (`parent`), or the error itself. */
function driverError(err: unknown): { code?: unknown; message?: unknown } | undefined {
  if (typeof err !== 'object' || err === null) {
    return undefined;
  }
  const parent = (err as { parent?: unknown }).parent;
  return typeof parent === 'object' && parent !== null ? parent : err;
}

/**
 * Whether `err` says a store's table does not exist (PostgreSQL 42P01 undefined_table; SQLite
 * "no such table"): a schema or file without a store in it. Anything else (a refused
 * connection, a timeout, `too many clients`) is not "no store" and must not be read as one.
 */
export function isMissingTableError(err: unknown): boolean {
  const d = driverError(err);
  if (d?.code === '42P01') {
    return true;
  }
  // sqlite3 reports this one only in its message (code SQLITE_ERROR, as for any bad statement).
  return d?.code === 'SQLITE_ERROR' && typeof d.message === 'string'
    ? d.message.includes('no such table')
    : false;
}

/** Isolation of PostgreSQL write transactions (lock, then read what is committed). */
const READ_COMMITTED = Transaction.ISOLATION_LEVELS.READ_COMMITTED;

/**
 * node-postgres refusing a query on a client whose connection already failed or was closed (the
 * server restarted, or terminated the session, between two statements of a transaction).
 */
const PG_NOT_QUERYABLE =
  /^Client (has encountered a connection error|was closed) and is not queryable$/;

/** PostgreSQL SQLSTATEs of a server that cannot serve now (connections, shutdown, timeouts). */
const PG_UNAVAILABLE = new Set([
  '53300', // too_many_connections
  '53400', // configuration_limit_exceeded
  '57014', // query_canceled: statement_timeout
  '57P01', // admin_shutdown
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '55P03', // lock_not_available: lock_timeout
]);

/**
 * Whether `err` means the store's database could not serve the call right now (connection
 * refused, lost or not acquired in time; too many clients; a statement or lock timeout; SQLite
 * busy past busy_timeout) rather than that the call or the data is wrong. Such a failure is
 * retryable: a job is not failed for it, and the HTTP edge answers 503.
 */
export function isStoreUnavailableError(err: unknown): boolean {
  if (
    err instanceof ConnectionError ||
    err instanceof TimeoutError ||
    err instanceof ControlPlaneUnavailableError
  ) {
    return true;
  }
  const d = driverError(err);
  if (typeof d?.code === 'string' && (PG_UNAVAILABLE.has(d.code) || d.code.startsWith('08'))) {
    return true;
  }
  if (err instanceof DatabaseError && d !== undefined && d.code === undefined) {
    // node-postgres reports a connection lost mid-query, and its own read timeout, without a
    // code (Sequelize marks the connection invalid for the latter).
    const m = typeof d.message === 'string' ? d.message : '';
    return (
      m === 'Query read timeout' ||
      m.startsWith('Connection terminated') ||
      PG_NOT_QUERYABLE.test(m)
    );
  }
  return (
    typeof d?.code === 'string' &&
    (['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE'].includes(d.code) ||
      STORAGE_FAILURE.test(d.code))
  );
}

/**
 * The storage under a SQLite store cannot take writes now: the disk or a quota is full, the
 * file system is read-only, or the OS failed an I/O (SQLITE_IOERR_* extended codes included).
 * Retryable once an operator frees space or remounts: 503 at the HTTP edge, not 500.
 */
const STORAGE_FAILURE =
  /^(SQLITE_FULL|SQLITE_IOERR(_\w+)?|SQLITE_READONLY(_\w+)?|ENOSPC|EROFS|EDQUOT)$/;

/** How long a successful write probe of a SQLite region's folder is trusted (ms). */
const WRITE_PROBE_MS = 2000;

/**
 * Readiness of a SQLite region's folder: creates, writes, fsyncs and removes a small file, so a
 * full disk or a read-only mount is seen (a permission check alone is not enough). A dot name
 * that no tenant id, store or staged restore can have.
 */
async function writeProbe(dir: string): Promise<{ ok: boolean; error?: string; code?: string }> {
  const file = path.join(
    dir,
    `.ready-probe-${String(process.pid)}-${crypto.randomBytes(4).toString('hex')}`,
  );
  let handle: fs.promises.FileHandle | undefined;
  try {
    handle = await fs.promises.open(file, 'wx', 0o600);
    await handle.writeFile(Buffer.alloc(4096, 0x2e));
    await handle.sync();
    return { ok: true };
  } catch (err) {
    const raw = (err as { code?: unknown }).code;
    const code = typeof raw === 'string' && /^E[A-Z]+$/.test(raw) ? raw : 'error';
    return { ok: false, code, error: `data folder not writable (${code})` };
  } finally {
    await handle?.close().catch(() => undefined);
    await fs.promises.rm(file, { force: true }).catch(() => undefined);
  }
}

/** A raw statement on a SQLite connection; constraint violations as UniqueConstraintError. */
async function sqliteRaw<R>(
  db: SqliteConnection,
  sql: string,
  params: readonly unknown[],
): Promise<R[]> {
  try {
    return await querySql<R>(db, sql, params);
  } catch (err) {
    if (
      err instanceof Error &&
      (err as Error & { code?: string }).code === 'SQLITE_CONSTRAINT' &&
      /UNIQUE|PRIMARY KEY/.test(err.message)
    ) {
      throw new UniqueConstraintError({
        message: err.message,
        parent: Object.assign(err, { sql }),
      });
    }
    throw err;
  }
}

/** `?` placeholders as PostgreSQL's `$1, $2, ...` (our statements hold no literal `?`). */
function dollarParams(sql: string): string {
  let n = 0;
  return sql.replace(/\?/g, () => `$${String(++n)}`);
}

function createQueue(): <T>(fn: () => Promise<T>) => Promise<T> {
  let tail: Promise<unknown> = Promise.resolve();
  return <T>(fn: () => Promise<T>): Promise<T> => {
    const run = tail.then(fn, fn);
    tail = run.catch(() => undefined);
    return run;
  };
}

const MAX_GROUP = 64;

interface PendingWrite {
  fn: (t: Transaction) => Promise<unknown>;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
  primary: boolean;
  alone: boolean;
}

/** The next group: one `alone` write, or up to MAX_GROUP others in queue order. */
function nextGroup(pending: PendingWrite[]): PendingWrite[] {
  if (pending[0]?.alone === true) {
    return pending.splice(0, 1);
  }
  let n = 0;
  while (n < pending.length && n < MAX_GROUP && pending[n]?.alone === false) {
    n += 1;
  }
  return pending.splice(0, n);
}

/**
 * Group commit: writes queued while a transaction runs are committed together in the next
 * one, each inside its own SAVEPOINT (a failing write rolls back alone and rejects only its
 * caller). Every caller's promise settles only after the shared COMMIT, so "resolved" still
 * means durable; under load one fsync serves many hook calls instead of one each. If a write
 * of the group checks the primary DEK (WriteOptions.primary), its row is read (and locked)
 * first, once for the group; `alone` writes get a transaction of their own.
 */
function createGroupCommit(
  sequelize: Sequelize,
  run: (fn: (t: Transaction) => Promise<void>) => Promise<void>,
  readPrimary: (t: Transaction) => Promise<PrimaryDek | undefined>,
  primaries: WeakMap<Transaction, PrimaryDek | null>,
): <T>(fn: (t: Transaction) => Promise<T>, opts?: WriteOptions) => Promise<T> {
  const pending: PendingWrite[] = [];
  let draining = false;

  async function drain(): Promise<void> {
    draining = true;
    while (pending.length > 0) {
      const group = nextGroup(pending);
      const outcomes: Array<{ ok: true; value: unknown } | { ok: false; error: unknown }> = [];
      try {
        await run(async (t) => {
          const primary = group.some((job) => job.primary)
            ? ((await readPrimary(t)) ?? null)
            : undefined;
          if (primary !== undefined) {
            primaries.set(t, primary);
          }
          if (group.length === 1 && group[0]) {
            outcomes.push({ ok: true, value: await group[0].fn(t) });
            return;
          }
          for (const job of group) {
            try {
              const value = await sequelize.transaction({ transaction: t }, (sp) => {
                if (primary !== undefined) {
                  primaries.set(sp, primary);
                }
                return job.fn(sp);
              });
              outcomes.push({ ok: true, value });
            } catch (error) {
              outcomes.push({ ok: false, error });
            }
          }
        });
        group.forEach((job, i) => {
          const o = outcomes[i];
          if (o?.ok) {
            job.resolve(o.value);
          } else {
            job.reject(o?.error);
          }
        });
      } catch (err) {
        group.forEach((job, i) => {
          const o = outcomes[i];
          job.reject(o && !o.ok ? o.error : err);
        });
      }
    }
    draining = false;
  }

  return <T>(fn: (t: Transaction) => Promise<T>, opts: WriteOptions = {}): Promise<T> =>
    new Promise<T>((resolve, reject) => {
      pending.push({
        fn,
        resolve: resolve as (v: unknown) => void,
        reject,
        primary: opts.primary === true,
        alone: opts.alone === true,
      });
      if (!draining) {
        void drain();
      }
    });
}

const WRITER_UUID = 'cellcds-writer';

/**
 * Every SQLite connection Sequelize opens (the default one and one per read transaction) gets
 * the durability and hygiene pragmas before first use. `synchronous` cannot be changed inside a
 * transaction, hence a connection hook rather than a statement in each transaction.
 *
 * Write transactions (`beginWrite`) run on one long-lived writer connection instead, with
 * BEGIN IMMEDIATE and COMMIT issued on it directly: Sequelize opens a new SQLite connection for
 * every transaction and closes it afterwards (file open, pragmas, schema parse each time), and
 * each of its statements scans the SQL text and captures a stack. Writes are serialized per
 * store by the write queue, so one writer connection is enough; read transactions keep their
 * own connections and see committed data (WAL). Models work unchanged inside `fn`: the
 * Transaction object handed to it is Sequelize's own, bound to the writer connection, and
 * nested `sequelize.transaction({ transaction: t })` calls become SAVEPOINTs on it.
 */
function configureSqliteConnections(sequelize: Sequelize): {
  beginWrite: <T>(fn: (t: Transaction) => Promise<T>) => Promise<T>;
  /** One statement on the writer connection in autocommit mode (StoreHandle.writeStatement). */
  writeStatement: <R>(sql: string, params: readonly unknown[]) => Promise<R[]>;
  /**
   * Closes the writer connection, alone: SQLite checkpoints and removes the WAL only when the
   * last connection closes, and two connections closing at the same moment can each see the
   * other and both skip it (leaving the data in the -wal file).
   */
  closeWriter: () => Promise<void>;
} {
  const cm = withPragmas(
    sequelize,
    'PRAGMA synchronous=FULL; PRAGMA secure_delete=ON; PRAGMA busy_timeout=5000; PRAGMA cache_size=-256;',
  );
  let writer: Promise<SqliteConnection> | undefined;

  /** Forgets the writer (a new one is opened on next use) and closes it. */
  const closeWriter = async (): Promise<void> => {
    const current = writer;
    writer = undefined;
    const db = await current?.catch(() => undefined);
    if (db) {
      Reflect.deleteProperty(cm.connections, WRITER_UUID);
      await releaseStatements(db);
      await new Promise<void>((resolve) => {
        db.close(() => {
          resolve();
        });
      });
    }
  };

  const writerConnection = (): Promise<SqliteConnection> => {
    // Registered under its own key, so Sequelize's close() would close it with the others.
    writer ??= cm.getConnection({ uuid: WRITER_UUID }).then(async (db) => {
      keepStatements(db); // the hook path's statements: one thread-pool trip each
      await execSql(db, INVOCATION_CARD_LINKS_SQLITE);
      return db;
    });
    return writer;
  };

  return {
    closeWriter,
    writeStatement: async <R>(sql: string, params: readonly unknown[]): Promise<R[]> => {
      const db = await writerConnection();
      try {
        return await sqliteRaw<R>(db, sql, params);
      } catch (err) {
        if (!(err instanceof UniqueConstraintError)) {
          // SQLite rolls a failed autocommit statement back; whatever else went wrong (I/O,
          // a lock held past busy_timeout), the next write starts on a fresh connection.
          await closeWriter().catch(() => undefined);
        }
        throw err;
      }
    },
    beginWrite: async <T>(fn: (t: Transaction) => Promise<T>): Promise<T> => {
      const db = await writerConnection();
      const t = new Transaction(sequelize, { type: Transaction.TYPES.IMMEDIATE });
      (t as unknown as { connection: SqliteConnection }).connection = db;
      await execSql(db, 'BEGIN IMMEDIATE');
      let result: T;
      try {
        result = await fn(t);
      } catch (err) {
        // A ROLLBACK that fails leaves the connection in an unknown state: start afresh.
        await execSql(db, 'ROLLBACK').catch(closeWriter);
        throw err;
      }
      try {
        await execSql(db, 'COMMIT');
      } catch (err) {
        await execSql(db, 'ROLLBACK').catch(() => undefined);
        await closeWriter();
        throw err;
      }
      return result;
    },
  };
}

/**
 * Every statement that writes a new encryption under a DEK version: a record sealed (its record
 * key wrapped, or a legacy record sealed directly), a record re-sealed (emergency rotation), a
 * head written or rewritten (scheduled rotation). Each adds 1 to the version's `wrap_count` in
 * the same statement (wrap-limit.ts), whichever path or process wrote it.
 */
const WRAP_COUNTING: ReadonlyArray<{ table: string; event: string; name: string }> = [
  ...SEALED_TABLES.flatMap((table) => [
    { table, event: 'INSERT', name: `${table}_counts_wrap` },
    { table, event: 'UPDATE OF sealed', name: `${table}_reseal_counts_wrap` },
  ]),
  ...SEALED_TABLES.flatMap((table) => [
    { table: HEAD_TABLES[table], event: 'INSERT', name: `${HEAD_TABLES[table]}_counts_wrap` },
    {
      table: HEAD_TABLES[table],
      event: 'UPDATE OF head',
      name: `${HEAD_TABLES[table]}_rewrap_counts_wrap`,
    },
  ]),
];

/**
 * The wraps a store can tell were made under version `?` (bound once): its records whose own
 * row is under it (each was sealed under it once) plus the heads under it (each was wrapped
 * under it once). A lower bound: wraps of records since deleted, of heads since replaced, and
 * of writes by older cellcds versions are not known. Set when a store is upgraded to schema 4
 * and after a PostgreSQL restore (whose loading would otherwise count its rows again).
 */
export function wrapCountFloorSql(qualified: (table: string) => string, version: string): string {
  return [...SEALED_TABLES, ...SEALED_TABLES.map((t) => HEAD_TABLES[t])]
    .map((table) => `(SELECT count(*) FROM ${qualified(table)} WHERE key_version = ${version})`)
    .join(' + ');
}

/**
 * Triggers in the store itself (so backups, restores and every connection have them): the audit
 * chain is append-only, rewriting a record's `sealed` drops the record's head row (a head
 * belongs to the ciphertext it was made for; see models.ts, RecordHeadRow), and every new
 * encryption under a DEK version counts in its row (WRAP_COUNTING).
 */
const STORE_TRIGGERS_SQLITE = [
  `CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON ${TABLES.auditEvents}
   BEGIN SELECT RAISE(ABORT, 'audit chain is append-only'); END`,
  `CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON ${TABLES.auditEvents}
   BEGIN SELECT RAISE(ABORT, 'audit chain is append-only'); END`,
  ...SEALED_TABLES.map(
    (table) => `CREATE TRIGGER IF NOT EXISTS ${table}_sealed_drops_head
   AFTER UPDATE OF sealed ON ${table}
   BEGIN DELETE FROM ${HEAD_TABLES[table]} WHERE seq = NEW.seq; END`,
  ),
  ...WRAP_COUNTING.map(
    ({ table, event, name }) => `CREATE TRIGGER IF NOT EXISTS ${name}
   AFTER ${event} ON ${table}
   BEGIN UPDATE ${TABLES.deks} SET wrap_count = wrap_count + 1
     WHERE version = NEW.key_version; END`,
  ),
];

/**
 * On each SQLite writer connection (TEMP: it lives in that connection only, so the store file,
 * its backups, other connections and older cellcds versions never see it): an invocation row
 * inserted there links its card uuids (`card_uuids`, a JSON array) in the same statement, each
 * with its own suggestion uuids (the element of `card_suggestion_uuids` at the card's index; NULL
 * when the row has none) and, schema 6, its rule and offered override codes (the element of
 * `card_rules`; NULL when the row has none) and the row's pack id and version. The hook path's
 * batch of records is then one INSERT, one thread-pool trip, and a duplicate card uuid still
 * fails the whole statement (the links' primary key). The only INSERT into the invocations table
 * on a SQLite writer is that batch (tenant-store.ts); PostgreSQL inserts the links itself.
 */
const INVOCATION_CARD_LINKS_SQLITE = `CREATE TEMP TRIGGER IF NOT EXISTS cellcds_invocation_card_links
  AFTER INSERT ON main.${TABLES.invocations}
  BEGIN INSERT INTO main.${TABLES.invocationCards}
      (card_uuid, invocation_id, suggestion_uuids, rule_id, pack_id, pack_version, override_codes)
    SELECT c.value, NEW.id, json_extract(NEW.card_suggestion_uuids, '$[' || c.key || ']'),
      json_extract(NEW.card_rules, '$[' || c.key || '].r'),
      NEW.pack_id, NEW.pack_version,
      json_extract(NEW.card_rules, '$[' || c.key || '].o')
    FROM json_each(NEW.card_uuids) AS c; END`;

/** STORE_TRIGGERS_SQLITE for a PostgreSQL schema. */
function storeTriggersPostgres(schema: string): string[] {
  const q = `"${schema}"`;
  return [
    `CREATE OR REPLACE FUNCTION ${q}.cellcds_append_only() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN RAISE EXCEPTION 'audit chain is append-only'; END $$`,
    `CREATE OR REPLACE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE
     ON ${q}.${TABLES.auditEvents} FOR EACH ROW EXECUTE FUNCTION ${q}.cellcds_append_only()`,
    `CREATE OR REPLACE FUNCTION ${q}.cellcds_drop_head() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN
       EXECUTE format('DELETE FROM %I.%I WHERE seq = $1', TG_TABLE_SCHEMA, TG_ARGV[0])
         USING NEW.seq;
       RETURN NULL;
     END $$`,
    ...SEALED_TABLES.map(
      (table) => `CREATE OR REPLACE TRIGGER ${table}_sealed_drops_head
       AFTER UPDATE OF sealed ON ${q}.${table}
       FOR EACH ROW EXECUTE FUNCTION ${q}.cellcds_drop_head('${HEAD_TABLES[table]}')`,
    ),
    // The schema is the trigger's own (TG_TABLE_SCHEMA), never a name spliced in here: a
    // restore renames its staging schema to the live one.
    `CREATE OR REPLACE FUNCTION ${q}.cellcds_count_wrap() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN
       EXECUTE format('UPDATE %I.%I SET wrap_count = wrap_count + 1 WHERE version = $1',
         TG_TABLE_SCHEMA, '${TABLES.deks}') USING NEW.key_version;
       RETURN NULL;
     END $$`,
    ...WRAP_COUNTING.map(
      ({ table, event, name }) => `CREATE OR REPLACE TRIGGER ${name}
       AFTER ${event} ON ${q}.${table}
       FOR EACH ROW EXECUTE FUNCTION ${q}.cellcds_count_wrap()`,
    ),
  ];
}

interface HandleParts {
  tenant: string;
  region: string;
  dialect: Dialect;
  sequelize: Sequelize;
  schema?: string;
  now: () => Date;
  create: boolean;
  /** SQLite: write transactions on the long-lived writer connection. */
  beginWrite?: <T>(fn: (t: Transaction) => Promise<T>) => Promise<T>;
  /** SQLite: one autocommit statement on the writer connection. */
  writeStatement?: <R>(sql: string, params: readonly unknown[]) => Promise<R[]>;
  /** SQLite: closes the writer connection (before the others). */
  closeWriter?: () => Promise<void>;
  /**
   * PostgreSQL: runs the store's creation or upgrade in one transaction holding the schema's
   * creation lock (replicas creating the same store at once take turns; the later ones find it
   * made).
   */
  lockedSetUp?: <T>(fn: (t: Transaction) => Promise<T>) => Promise<T>;
}

async function initialiseHandle(parts: HandleParts): Promise<StoreHandle> {
  const { sequelize, dialect, schema, tenant, region } = parts;
  const models = defineTenantStoreModels(sequelize, schema);
  const qualified = (table: string) => (schema ? `"${schema}"."${table}"` : `"${table}"`);
  const queue = createQueue();

  const readMeta = async (t?: Transaction): Promise<Map<string, string> | undefined> => {
    const select = (tx?: Transaction) =>
      sequelize.query<{ key: string; value: string }>(
        `SELECT key, value FROM ${qualified(TABLES.meta)}`,
        { type: QueryTypes.SELECT, ...(tx ? { transaction: tx } : {}) },
      );
    try {
      // Inside a PostgreSQL transaction, in a SAVEPOINT: a missing table must not abort it.
      const rows = t ? await sequelize.transaction({ transaction: t }, select) : await select();
      return new Map(rows.map((r) => [r.key, r.value]));
    } catch (err) {
      // Only "no meta table" means "no store here": any other failure (a refused connection,
      // `too many clients`, a timeout) is the caller's error, never a NotFoundError.
      if (isMissingTableError(err)) {
        return undefined;
      }
      throw err;
    }
  };

  /** Creates or upgrades the store's tables, triggers and meta (in `t` if given). */
  const setUp = async (t: Transaction | undefined): Promise<Map<string, string> | undefined> => {
    const current = await readMeta(t);
    if (current?.get('schema') === STORE_SCHEMA_VERSION) {
      return current; // another replica created or upgraded it while this one waited
    }
    if (!parts.create && current === undefined) {
      throw new NotFoundError(`store of tenant ${tenant}`);
    }
    const inTx = t ? { transaction: t } : {};
    // Model.sync hands its options to every statement it runs (tableExists, CREATE TABLE,
    // indexes), so the tables are created in `t`; SyncOptions does not declare it.
    const syncOpts: SyncOptions & { transaction?: Transaction } = inTx;
    await sequelize.sync(syncOpts);
    for (const sql of dialect === 'sqlite'
      ? STORE_TRIGGERS_SQLITE
      : storeTriggersPostgres(schema ?? '')) {
      await sequelize.query(sql, inTx);
    }
    const writeMeta = async (tx: Transaction): Promise<void> => {
      const existing = await models.Meta.findAll({ transaction: tx, raw: true });
      const have = new Set(existing.map((r) => r.key));
      const wanted: Array<[string, string]> = [
        ['tenant', tenant],
        ['region', region],
        ['createdAt', parts.now().toISOString()],
      ];
      for (const [key, value] of wanted) {
        if (!have.has(key)) {
          await models.Meta.create({ key, value }, { transaction: tx });
        }
      }
      if ((await models.AuditHead.count({ transaction: tx })) === 0) {
        await models.AuditHead.create({ id: 1, seq: 0, hash: GENESIS_HASH }, { transaction: tx });
      }
      await models.Meta.upsert({ key: 'schema', value: STORE_SCHEMA_VERSION }, { transaction: tx });
    };
    // Columns that tables of an older store lack (sync() creates tables, never columns).
    // PostgreSQL: in the creation lock's transaction. SQLite has no ADD COLUMN IF NOT EXISTS:
    // the columns are read first, in the same IMMEDIATE transaction as the ALTER, so two
    // processes opening an older file at once take turns and the second finds them added.
    const addColumns = async (tx: Transaction): Promise<void> => {
      for (const { table, column, type } of ADDED_COLUMNS) {
        if (dialect === 'sqlite') {
          const have = await sequelize.query<{ name: string }>(
            `SELECT name FROM pragma_table_info('${table}')`,
            { type: QueryTypes.SELECT, transaction: tx },
          );
          if (have.some((c) => c.name === column)) {
            continue;
          }
        }
        await sequelize.query(
          `ALTER TABLE ${qualified(table)} ADD COLUMN${dialect === 'postgres' ? ' IF NOT EXISTS' : ''} "${column}" ${type}`,
          { transaction: tx },
        );
      }
    };
    // Schema 4: the wrap counts of a store that had none start at what the store can tell (a
    // lower bound; GREATEST/max: an upgrade run again, e.g. after an older replica rewrote the
    // schema number, never lowers a count).
    const floorWrapCounts = async (tx: Transaction): Promise<void> => {
      const d = qualified(TABLES.deks);
      await sequelize.query(
        `UPDATE ${d} SET wrap_count = ${dialect === 'postgres' ? 'GREATEST' : 'max'}(wrap_count,
           ${wrapCountFloorSql(qualified, `${d}.version`)})`,
        { transaction: tx },
      );
    };
    const upgrade = async (tx: Transaction): Promise<void> => {
      await addColumns(tx);
      if (current?.get('schema') !== undefined) {
        await floorWrapCounts(tx);
      }
      await writeMeta(tx);
    };
    if (t) {
      await upgrade(t);
    } else {
      await sequelize.transaction({ type: Transaction.TYPES.IMMEDIATE }, upgrade);
    }
    return readMeta(t);
  };

  let meta = await readMeta();
  if (meta?.get('schema') !== STORE_SCHEMA_VERSION) {
    if (!parts.create && meta === undefined) {
      throw new NotFoundError(`store of tenant ${tenant}`);
    }
    meta = parts.lockedSetUp ? await parts.lockedSetUp(setUp) : await setUp(undefined);
  }
  // A store file or schema renamed or copied to another tenant or region is refused.
  if (meta?.get('tenant') !== tenant || meta.get('region') !== region) {
    throw new ConflictError(`the store at this location does not belong to tenant ${tenant}`);
  }

  let closed = false;
  const deks = new Map<number, KeyObject>();
  const begin = <T>(fn: (t: Transaction) => Promise<T>): Promise<T> =>
    parts.beginWrite
      ? parts.beginWrite(fn)
      : dialect === 'sqlite'
        ? sequelize.transaction({ type: Transaction.TYPES.IMMEDIATE }, fn)
        : // Lock, then read (the primary DEK row FOR NO KEY UPDATE, a job row, the audit head):
          // READ COMMITTED, whatever the database's default_transaction_isolation, so a row
          // another replica committed meanwhile is read, not a serialization failure (40001).
          sequelize.transaction({ isolationLevel: READ_COMMITTED }, fn);
  const raw = <R>(t: Transaction, sql: string, params: readonly unknown[]): Promise<R[]> => {
    if (dialect === 'sqlite') {
      const db = (t as unknown as { connection?: SqliteConnection }).connection;
      if (!db) {
        throw new Error('raw: the transaction has no connection');
      }
      return sqliteRaw<R>(db, sql, params);
    }
    return sequelize
      .query(dollarParams(sql), {
        bind: [...params],
        transaction: t,
        type: QueryTypes.RAW,
        raw: true,
      })
      .then(([rows]) => rows as R[]);
  };
  // PostgreSQL: FOR NO KEY UPDATE (the group's triggers add to the row's wrap count). If a
  // rotation holds the row, this waits for its COMMIT and then finds no primary (READ COMMITTED
  // re-checks the row, which is no longer primary, and the new one is not in this statement's
  // snapshot): the writes of the group see "stale" and seal again.
  const readPrimary = async (t: Transaction): Promise<PrimaryDek | undefined> => {
    const [row] = await raw<{ version: number; createdAt: string; wrapCount: number | string }>(
      t,
      `SELECT version, created_at AS "createdAt", wrap_count AS "wrapCount"
       FROM ${qualified(TABLES.deks)}
       WHERE status = 'primary'${dialect === 'postgres' ? ' FOR NO KEY UPDATE' : ''}`,
      [],
    );
    return row
      ? { version: row.version, createdAt: row.createdAt, wrapCount: Number(row.wrapCount) }
      : undefined;
  };
  const primaries = new WeakMap<Transaction, PrimaryDek | null>();
  const writeTx = createGroupCommit(
    sequelize,
    (fn) => queue(() => begin(fn)),
    readPrimary,
    primaries,
  );
  const { writeStatement } = parts;
  return {
    tenant,
    region,
    dialect,
    envelopeForm: dialect === 'sqlite' ? 'binary' : 'text',
    sequelize,
    models,
    deks,
    writeTx,
    lockedPrimary(t) {
      const primary = primaries.get(t);
      if (primary === undefined) {
        throw new Error('lockedPrimary: the write was not queued with { primary: true }');
      }
      return primary ?? undefined;
    },
    readTx: (fn) =>
      dialect === 'sqlite'
        ? sequelize.transaction({ type: Transaction.TYPES.DEFERRED }, fn)
        : sequelize.transaction(
            { isolationLevel: Transaction.ISOLATION_LEVELS.REPEATABLE_READ },
            fn,
          ),
    qualified,
    ...(writeStatement
      ? {
          writeStatement: <R>(sql: string, params: readonly unknown[]) =>
            queue(() => writeStatement<R>(sql, params)),
        }
      : {}),
    raw,
    async compact() {
      if (dialect === 'sqlite') {
        // Best effort: readers may keep the WAL from being truncated right now.
        await queue(() => sequelize.query('PRAGMA wal_checkpoint(TRUNCATE)')).catch(
          () => undefined,
        );
      }
    },
    async close() {
      if (!closed) {
        closed = true;
        deks.clear();
        await parts.closeWriter?.();
        await sequelize.close();
      }
    },
  };
}

/** SQLite: `<dataDir>/<region>/<tenant>.sqlite`. */
export function createSqliteBackend(opts: {
  dataDir: string;
  region: string;
  now: () => Date;
}): StoreBackend {
  const dir = path.join(path.resolve(opts.dataDir), opts.region);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const filePath = (tenant: string) => path.join(dir, `${tenant}.sqlite`);
  // A dot file: never listed as a store, and no tenant id starts with a dot.
  const bindingFile = path.join(dir, '.keyring-binding.json');
  let lastProbeOk: number | undefined;

  function readBinding(): KeyringBinding | undefined {
    let text: string;
    try {
      text = fs.readFileSync(bindingFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        return undefined;
      }
      throw err;
    }
    return parseKeyringBinding(text, bindingFile);
  }

  function bindOnce(binding: KeyringBinding): KeyringBinding {
    // Written whole to a temp file, then linked into place: link fails if the name exists, so
    // of two processes binding at once exactly one wins, and no reader sees half a file.
    const tmp = `${bindingFile}.tmp-${crypto.randomBytes(6).toString('hex')}`;
    fs.writeFileSync(tmp, JSON.stringify(keyringBindingSchema.parse(binding)), {
      mode: 0o600,
      flush: true,
    });
    try {
      fs.linkSync(tmp, bindingFile);
      fsyncPath(dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw err;
      }
    } finally {
      fs.rmSync(tmp, { force: true });
    }
    const bound = readBinding();
    if (!bound) {
      throw new Error(`${bindingFile} vanished while it was written`);
    }
    return bound;
  }

  async function openFile(file: string, tenant: string, create: boolean): Promise<StoreHandle> {
    if (!fs.existsSync(file)) {
      if (!create) {
        throw new NotFoundError(`store of tenant ${tenant}`);
      }
      // Created 0600 before SQLite opens it: its -wal and -shm files inherit the mode.
      fs.closeSync(fs.openSync(file, 'wx', 0o600));
    }
    const sequelize = new Sequelize({
      dialect: 'sqlite',
      storage: file,
      logging: false,
      dialectOptions: { mode: sqlite3.OPEN_READWRITE | sqlite3.OPEN_CREATE },
    });
    const { beginWrite, writeStatement, closeWriter } = configureSqliteConnections(sequelize);
    try {
      await sequelize.query('PRAGMA journal_mode=WAL');
      return await initialiseHandle({
        tenant,
        region: opts.region,
        dialect: 'sqlite',
        sequelize,
        now: opts.now,
        create,
        beginWrite,
        writeStatement,
        closeWriter,
      });
    } catch (err) {
      await closeWriter().catch(() => undefined);
      await sequelize.close().catch(() => undefined);
      throw err;
    }
  }

  return {
    dialect: 'sqlite',
    region: opts.region,
    exists: (tenant) => Promise.resolve(fs.existsSync(filePath(tenant))),
    list() {
      const tenants = fs
        .readdirSync(dir)
        .filter((f) => f.endsWith('.sqlite') && !f.startsWith('.'))
        .map((f) => f.slice(0, -'.sqlite'.length));
      return Promise.resolve(tenants.sort());
    },
    keyringBinding: () => Promise.resolve(readBinding()),
    bindKeyring: (binding) => Promise.resolve(bindOnce(binding)),
    open: (tenant, create) => openFile(filePath(tenant), tenant, create),
    openAt(target, tenant, create) {
      if (target.file === undefined) {
        throw new TypeError('openAt: a SQLite backend needs a file');
      }
      return openFile(target.file, tenant, create);
    },
    remove(tenant) {
      const file = filePath(tenant);
      for (const suffix of ['', '-wal', '-shm', '-journal']) {
        fs.rmSync(`${file}${suffix}`, { force: true });
      }
      fsyncPath(dir);
      return Promise.resolve();
    },
    async ping() {
      // A success is trusted for WRITE_PROBE_MS (probes stay cheap); a failure is probed again.
      const at = performance.now();
      if (lastProbeOk !== undefined && at - lastProbeOk < WRITE_PROBE_MS) {
        return { ok: true };
      }
      const result = await writeProbe(dir);
      lastProbeOk = result.ok ? at : undefined;
      return result;
    },
    close: () => Promise.resolve(),
    filePath,
    schemaName() {
      throw new TypeError('schemaName: not a PostgreSQL backend');
    },
    admin() {
      throw new TypeError('admin: not a PostgreSQL backend');
    },
  };
}

/** @throws Error naming `where` if `text` is not a keyring binding. */
function parseKeyringBinding(text: string, where: string): KeyringBinding {
  try {
    return keyringBindingSchema.parse(JSON.parse(text));
  } catch {
    throw new Error(
      `${where} is not a keyring binding (damaged?): restore it or see docs/operations.md`,
    );
  }
}

const SCHEMA_PREFIX_PATTERN = /^[a-z][a-z0-9_]{0,39}$/;
const PG_IDENT_MAX = 63;

/**
 * The schema of a tenant: `<prefix><tenant with - as _>`, or, when that exceeds PostgreSQL's
 * 63-byte identifiers, a truncated id plus 12 hex digits of its sha256.
 */
export function tenantSchemaName(prefix: string, tenant: string): string {
  const plain = `${prefix}${tenant.replace(/-/g, '_')}`;
  if (plain.length <= PG_IDENT_MAX) {
    return plain;
  }
  const digest = crypto.createHash('sha256').update(tenant).digest('hex').slice(0, 12);
  const room = PG_IDENT_MAX - prefix.length - digest.length - 1;
  return `${prefix}${tenant.slice(0, room).replace(/-/g, '_')}_${digest}`;
}

/** PostgreSQL: one schema per tenant in the region's database. */
export function createPostgresBackend(opts: {
  url: string;
  region: string;
  schemaPrefix: string;
  poolMax: number;
  /** `statement_timeout` (0: none); the client waits for a reply 1 s longer. */
  statementTimeoutMs: number;
  /** Waiting for a pooled connection, opening one included. */
  acquireTimeoutMs: number;
  now: () => Date;
}): StoreBackend {
  if (!SCHEMA_PREFIX_PATTERN.test(opts.schemaPrefix)) {
    throw new TypeError('schemaPrefix must be lower-case letters, digits and _');
  }
  for (const [name, v] of [
    ['statementTimeoutMs', opts.statementTimeoutMs],
    ['acquireTimeoutMs', opts.acquireTimeoutMs],
  ] as const) {
    if (!Number.isInteger(v) || v < (name === 'acquireTimeoutMs' ? 1 : 0)) {
      throw new TypeError(`${name} must be a non-negative integer`);
    }
  }
  // Every call is bounded: a server that refuses, a pool that is exhausted, a statement that
  // waits on a lock or a network that stopped answering fails within about these times
  // (isStoreUnavailableError; 503 at the HTTP edge) instead of hanging past the hook's budget.
  const dialectOptions = {
    connectionTimeoutMillis: opts.acquireTimeoutMs,
    keepAlive: true,
    ...(opts.statementTimeoutMs > 0
      ? {
          statement_timeout: opts.statementTimeoutMs,
          // node-postgres gives up on the reply 1 s later (the server may never have seen the
          // statement); Sequelize then drops that connection from the pool.
          query_timeout: opts.statementTimeoutMs + 1_000,
        }
      : {}),
    // A session silent inside a transaction (its replica cut off mid-write) is ended by the
    // server and its row locks released (the primary DEK's, a job's), instead of blocking the
    // other replicas' writes to the store until TCP keepalive notices (~2 h).
    idle_in_transaction_session_timeout: idleInTransactionTimeoutFor(opts.statementTimeoutMs),
  };
  const poolTimeouts = { acquire: opts.acquireTimeoutMs };
  const admin = new Sequelize(opts.url, {
    dialect: 'postgres',
    logging: false,
    dialectOptions,
    pool: { max: 1, min: 0, idle: 5_000, ...poolTimeouts },
  });
  const schemaName = (tenant: string) => tenantSchemaName(opts.schemaPrefix, tenant);
  // Region-level state (the keyring binding). A tenant id starts with a letter or digit, so
  // no tenant's schema is `<prefix>_…`; `list` skips it (it holds no store).
  const regionSchema = `${opts.schemaPrefix}_region`;

  async function schemaExists(schema: string): Promise<boolean> {
    const rows = await admin.query<{ n: string }>(
      'SELECT count(*) AS n FROM information_schema.schemata WHERE schema_name = :schema',
      { type: QueryTypes.SELECT, replacements: { schema } },
    );
    return Number(rows[0]?.n ?? 0) > 0;
  }

  async function readBinding(): Promise<KeyringBinding | undefined> {
    try {
      const rows = await admin.query<{ keyring_id: string; bound_at: string }>(
        `SELECT keyring_id, bound_at FROM "${regionSchema}".keyring WHERE region = :region`,
        { type: QueryTypes.SELECT, replacements: { region: opts.region } },
      );
      const row = rows[0];
      return row ? { keyringId: row.keyring_id, boundAt: row.bound_at } : undefined;
    } catch (err) {
      if (isMissingTableError(err)) {
        return undefined;
      }
      throw err;
    }
  }

  async function bindOnce(binding: KeyringBinding): Promise<KeyringBinding> {
    keyringBindingSchema.parse(binding);
    await admin.transaction({ isolationLevel: READ_COMMITTED }, async (t) => {
      // CREATE ... IF NOT EXISTS races between replicas (catalog unique violations): one
      // advisory lock serializes them, as for a tenant's store.
      await admin.query('SELECT pg_advisory_xact_lock(hashtext(:key))', {
        transaction: t,
        type: QueryTypes.SELECT,
        replacements: { key: `cellcds.region.${regionSchema}` },
      });
      await admin.query(`CREATE SCHEMA IF NOT EXISTS "${regionSchema}"`, { transaction: t });
      await admin.query(
        `CREATE TABLE IF NOT EXISTS "${regionSchema}".keyring (
           region text PRIMARY KEY, keyring_id text NOT NULL, bound_at text NOT NULL)`,
        { transaction: t },
      );
      await admin.query(
        `INSERT INTO "${regionSchema}".keyring (region, keyring_id, bound_at)
         VALUES (:region, :id, :at) ON CONFLICT (region) DO NOTHING`,
        {
          transaction: t,
          replacements: { region: opts.region, id: binding.keyringId, at: binding.boundAt },
        },
      );
    });
    const bound = await readBinding();
    if (!bound) {
      throw new Error(`"${regionSchema}".keyring holds no row of region ${opts.region}`);
    }
    return bound;
  }

  async function openSchema(schema: string, tenant: string, create: boolean): Promise<StoreHandle> {
    if (!create && !(await schemaExists(schema))) {
      throw new NotFoundError(`store of tenant ${tenant}`);
    }
    const sequelize = new Sequelize(opts.url, {
      dialect: 'postgres',
      logging: false,
      dialectOptions,
      pool: { max: opts.poolMax, min: 0, idle: 10_000, ...poolTimeouts },
    });
    try {
      return await initialiseHandle({
        tenant,
        region: opts.region,
        dialect: 'postgres',
        sequelize,
        schema,
        now: opts.now,
        create,
        // Replicas creating (or upgrading) the same store at once: `CREATE SCHEMA IF NOT
        // EXISTS` and `CREATE TABLE IF NOT EXISTS` race in PostgreSQL (unique violations in
        // its catalog). One transaction-scoped advisory lock per schema serializes them, and
        // the schema, tables, triggers and meta commit together: a store is never seen half
        // made. The lock is taken on the store's own connection, before anything else.
        lockedSetUp: (fn) =>
          sequelize.transaction({ isolationLevel: READ_COMMITTED }, async (t) => {
            await sequelize.query('SELECT pg_advisory_xact_lock(hashtext(:key))', {
              transaction: t,
              type: QueryTypes.SELECT,
              replacements: { key: `cellcds.store.${schema}` },
            });
            if (create) {
              await sequelize.query(`CREATE SCHEMA IF NOT EXISTS "${schema}"`, { transaction: t });
            }
            return fn(t);
          }),
      });
    } catch (err) {
      await sequelize.close().catch(() => undefined);
      throw err;
    }
  }

  return {
    dialect: 'postgres',
    region: opts.region,
    exists: (tenant) => schemaExists(schemaName(tenant)),
    async list() {
      const schemas = await admin.query<{ schema_name: string }>(
        `SELECT schema_name FROM information_schema.schemata
         WHERE left(schema_name, :n) = :prefix ORDER BY schema_name`,
        {
          type: QueryTypes.SELECT,
          replacements: { n: opts.schemaPrefix.length, prefix: opts.schemaPrefix },
        },
      );
      const tenants: string[] = [];
      for (const { schema_name: schema } of schemas) {
        // Schema names are not reversible for long ids: the tenant id is read from the store.
        try {
          const rows = await admin.query<{ value: string }>(
            `SELECT value FROM "${schema}"."${TABLES.meta}" WHERE key = 'tenant'`,
            { type: QueryTypes.SELECT },
          );
          const tenant = rows[0]?.value;
          if (tenant !== undefined && schemaName(tenant) === schema) {
            tenants.push(tenant);
          }
        } catch {
          // A schema with the prefix but no store tables (e.g. a restore in progress): skip.
        }
      }
      return tenants.sort();
    },
    keyringBinding: readBinding,
    bindKeyring: bindOnce,
    open: (tenant, create) => openSchema(schemaName(tenant), tenant, create),
    openAt(target, tenant, create) {
      if (target.schema === undefined) {
        throw new TypeError('openAt: a PostgreSQL backend needs a schema');
      }
      return openSchema(target.schema, tenant, create);
    },
    async remove(tenant) {
      await admin.query(`DROP SCHEMA IF EXISTS "${schemaName(tenant)}" CASCADE`);
    },
    async ping() {
      try {
        await admin.query('SELECT 1', { type: QueryTypes.SELECT });
        return { ok: true };
      } catch (err) {
        // The class only: a driver message may quote the host or the statement.
        const name = err instanceof Error ? err.name : 'error';
        return { ok: false, code: name, error: `database does not answer (${name})` };
      }
    },
    close: () => admin.close(),
    filePath() {
      throw new TypeError('filePath: not a SQLite backend');
    },
    schemaName,
    admin: () => admin,
  };
}
