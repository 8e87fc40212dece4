/**
 * Opens the control-plane database (SQLite, or PostgreSQL shared by replicas, through
 * Sequelize) and wires its repositories. It holds no PHI: tenants, issuers, FHIR server
 * allowlists, subscriptions, the pack catalog, admin token hashes and the control-plane audit
 * log. PostgreSQL's pieces live in control-plane-postgres.ts.
 */
import fs from 'node:fs';
import { Sequelize, Transaction } from 'sequelize';
import { keepStatements, querySql, releaseStatements, withPragmas } from './sqlite-connections.ts';
import { createAdminTokenRepository } from './admin-token-repository.ts';
import { createAuditRepository } from './audit-repository.ts';
import { defineControlPlaneModels } from './control-plane-models.ts';
import { InvalidInputError } from './errors.ts';
import { openPostgresEngine } from './control-plane-postgres.ts';
import type { PostgresControlPlaneOptions } from './control-plane-postgres.ts';
import { createPackRepository } from './pack-repository.ts';
import { createTenantRepository } from './tenant-repository.ts';
import type { ControlPlaneModels, WriteTx } from './control-plane-models.ts';
import type { ControlPlane } from './types.ts';

interface CommonOptions {
  /** Clock for createdAt/updatedAt/audit times (tests inject it). */
  now?: () => Date;
  /** SQL logging is always off (statements would carry token hashes); kept for the contract. */
  logging?: false;
  /** Issuers whose `findByIssuer` answers are kept (least recently used out first); default 10,000. */
  maxIssuerCache?: number;
  /**
   * Told when an admin token's `lastUsedAt` write failed (the request was served): its id and
   * the error, never the token. Default: a process warning.
   */
  onAdminTokenUseNotRecorded?: (tokenId: string, err: unknown) => void;
}

/** A SQLite control plane: one file shared by the processes of one host. */
export interface SqliteControlPlaneOptions extends CommonOptions {
  /** SQLite file path, or ':memory:'. */
  storage: string;
  postgresUrl?: undefined;
}

/** A PostgreSQL control plane: one schema shared by every replica. */
export interface PostgresOpenOptions extends CommonOptions, PostgresControlPlaneOptions {
  storage?: undefined;
}

export type OpenControlPlaneOptions = SqliteControlPlaneOptions | PostgresOpenOptions;

const APPEND_ONLY_TRIGGERS = [
  `CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
   BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END`,
  `CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
   BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END`,
];

/** Runs write operations one at a time (SQLite has a single writer; see `WriteLock`). */
function createWriteLock(): <T>(fn: () => Promise<T>) => Promise<T> {
  let tail: Promise<unknown> = Promise.resolve();
  return <T>(fn: () => Promise<T>): Promise<T> => {
    const run = tail.then(fn, fn);
    tail = run.catch(() => undefined);
    return run;
  };
}

/**
 * Creates the tables and indexes that are missing. Processes that open a new control plane at
 * the same moment (one per region under `npm start`) race: Sequelize checks what exists, then
 * creates, so the loser of a race sees "already exists" for what the other just made. The
 * schema is then there: sync again, which creates nothing more.
 */
async function createSchema(sequelize: Sequelize): Promise<void> {
  for (let attempt = 1; ; attempt += 1) {
    try {
      await sequelize.sync();
      return;
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      if (attempt >= 5 || !/already exists/.test(message)) {
        throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, 20 * attempt));
    }
  }
}

/**
 * Shares one read among concurrent callers, each getting a value read after it called: a caller
 * arriving while a read runs (which may have started before it came) waits for the next read,
 * which then serves everyone who arrived meanwhile. The hook path reads the control plane's
 * `data_version` on every call through one kept statement, and node-sqlite3 runs a statement's
 * calls one after another, each a thread-pool trip that waits its turn under load: 16 calls in
 * flight queued there for 14 ms (p50) at half of cellcds' maximum rate. Shared, the reads run
 * at most two deep.
 */
export function coalesceReads<T>(read: () => Promise<T>): () => Promise<T> {
  let running: Promise<T> | undefined;
  let next: Promise<T> | undefined;
  const start = (): Promise<T> => {
    const current = read().finally(() => {
      running = undefined;
    });
    running = current;
    return current;
  };
  return () => {
    if (!running) {
      return start();
    }
    const again = (): Promise<T> => {
      next = undefined;
      return start();
    };
    next ??= running.then(again, again);
    return next;
  };
}

/** What a backend gives the repositories. */
interface Engine {
  models: ControlPlaneModels;
  writeTx: WriteTx;
  generation: () => Promise<string>;
  ping: () => Promise<void>;
  close: () => Promise<void>;
}

/** Wires the repositories onto a backend's models, write transactions and generation. */
function wireControlPlane(engine: Engine, opts: CommonOptions): ControlPlane {
  const now = opts.now ?? (() => new Date());
  const { models, writeTx, generation } = engine;
  const packs = createPackRepository({ writeTx, models, now });
  const adminTokens = createAdminTokenRepository({
    models,
    now,
    writeTx,
    tenantExists: async (id, t) =>
      (await models.Tenant.count({ where: { id }, transaction: t })) > 0,
    ...(opts.onAdminTokenUseNotRecorded
      ? { onUseNotRecorded: opts.onAdminTokenUseNotRecorded }
      : {}),
  });
  const tenants = createTenantRepository({
    writeTx,
    models,
    now,
    packExists: async (pack, version) =>
      (await models.Pack.count({ where: { id: pack, version } })) > 0,
    revokeTenantTokens: (tenantId, t) => adminTokens.revokeForTenant(tenantId, t),
    generation,
    ...(opts.maxIssuerCache !== undefined ? { maxIssuerCache: opts.maxIssuerCache } : {}),
  });
  const audit = createAuditRepository({ models, now, writeTx });
  return {
    tenants,
    packs,
    adminTokens: {
      issue: (input) => adminTokens.issue(input),
      authenticate: (token) => adminTokens.authenticate(token),
      check: (token) => adminTokens.check(token),
      revoke: (id) => adminTokens.revoke(id),
      list: () => adminTokens.list(),
    },
    audit,
    ping: engine.ping,
    // The last `lastUsedAt` writes finish first, rather than fail on a closed connection.
    close: async () => {
      await adminTokens.settled();
      await engine.close();
    },
  };
}

/**
 * Opens (creating if needed) the control-plane database: a SQLite file (`storage`; file
 * databases use WAL mode) or a PostgreSQL schema (`postgresUrl`, `schema`).
 * @throws InvalidInputError for a bad PostgreSQL URL or schema name; the driver's error if the
 *   database cannot be opened or the schema cannot be created.
 */
export async function openControlPlane(opts: OpenControlPlaneOptions): Promise<ControlPlane> {
  const raw = opts as { storage?: unknown; postgresUrl?: unknown };
  if ((raw.storage === undefined) === (raw.postgresUrl === undefined)) {
    throw new InvalidInputError('storage', 'give exactly one of storage and postgresUrl');
  }
  if (opts.postgresUrl !== undefined) {
    const engine = await openPostgresEngine(opts);
    return wireControlPlane({ ...engine, generation: coalesceReads(engine.readGeneration) }, opts);
  }
  return openSqliteControlPlane(opts);
}

/**
 * The control plane's SQLite file is 0600, like the tenant stores and the keyring: it holds
 * admin token hashes, the audit trail and the tenants' configuration. A new file is created
 * 0600 before SQLite opens it, so the -wal and -shm files SQLite makes take that mode (SQLite
 * gives them the main file's). An existing file (and -wal/-shm) of this process's user that
 * group or others may access, as earlier versions made it (0644 under the usual umask), loses
 * those bits. The directory is left alone: cellcds makes the data directory 0700, and one the
 * operator made is the operator's.
 */
function protectSqliteFile(file: string): void {
  if (file === ':memory:' || file === '' || file.startsWith('file:')) {
    return;
  }
  try {
    fs.closeSync(fs.openSync(file, 'wx', 0o600));
    return;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
      // No folder, no permission: SQLite's open fails on it and says so, as before.
      return;
    }
  }
  const uid = process.getuid?.();
  for (const f of [file, `${file}-wal`, `${file}-shm`]) {
    let stat: fs.Stats;
    try {
      stat = fs.statSync(f);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        continue;
      }
      throw err;
    }
    // Another user's file keeps the mode that user gave it (chmod would fail anyway).
    if (stat.isFile() && (stat.mode & 0o077) !== 0 && (uid === undefined || stat.uid === uid)) {
      fs.chmodSync(f, stat.mode & 0o700);
    }
  }
}

async function openSqliteControlPlane(opts: SqliteControlPlaneOptions): Promise<ControlPlane> {
  protectSqliteFile(opts.storage);
  const sequelize = new Sequelize({ dialect: 'sqlite', storage: opts.storage, logging: false });
  // Several processes share the file (one per region under `npm start`, the CLI): a writer that
  // finds it locked waits for its turn instead of failing at once with SQLITE_BUSY. Set on
  // every connection Sequelize opens (one per transaction).
  const connections = withPragmas(sequelize, 'PRAGMA busy_timeout=5000;');
  try {
    await sequelize.authenticate();
    if (opts.storage !== ':memory:') {
      await sequelize.query('PRAGMA journal_mode=WAL');
    }
    const models = defineControlPlaneModels(sequelize);
    // SQLite allows one writer. Sequelize opens a connection per transaction for a file database
    // and shares one for ':memory:'; either way, concurrent write transactions from this process
    // would fail (BUSY, or nested BEGIN). So this process queues its writes.
    const locked = createWriteLock();
    // Counts this process's writes; with SQLite's data_version (which changes when another
    // connection or process commits) it tells readers whether a cached read is still current.
    let localWrites = 0;
    const write = <T>(fn: () => Promise<T>): Promise<T> =>
      locked(fn).finally(() => {
        localWrites += 1;
      });
    // Straight on Sequelize's default connection, its statement kept prepared (one thread-pool
    // trip, not two): this runs on every hook call, and a Sequelize query scans its SQL and
    // captures a stack.
    const lookupDb = await connections.getConnection();
    keepStatements(lookupDb);
    const readGeneration = async (): Promise<string> => {
      const before = localWrites;
      const [row] = await querySql<{ data_version: number }>(lookupDb, 'PRAGMA data_version');
      const version = row?.data_version;
      return `${String(version)}:${String(before)}`;
    };
    const generation = coalesceReads(readGeneration);
    const writeTx: WriteTx = (fn) =>
      write(() => sequelize.transaction({ type: Transaction.TYPES.IMMEDIATE }, fn));
    await createSchema(sequelize);
    for (const sql of APPEND_ONLY_TRIGGERS) {
      await sequelize.query(sql);
    }
    return wireControlPlane(
      {
        models,
        writeTx,
        generation,
        // Readiness: one kept statement on the lookup connection, never a table read.
        ping: async () => {
          await querySql(lookupDb, 'SELECT 1');
        },
        close: async () => {
          // SQLite does not close a connection with prepared statements left open.
          await releaseStatements(lookupDb);
          await sequelize.close();
        },
      },
      opts,
    );
  } catch (err) {
    await sequelize.close().catch(() => undefined);
    throw err;
  }
}
