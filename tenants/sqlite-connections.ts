/**
 * The SQLite connections behind a Sequelize instance, shared by the control plane and the
 * tenant stores: pragmas applied once to every connection Sequelize opens, and the few calls
 * cellcds makes on a connection directly (where Sequelize's per-query work would cost more than
 * the statement on a hot path).
 */
import type { Sequelize } from 'sequelize';

/** A sqlite3 Database as Sequelize hands it out: the calls cellcds makes on it directly. */
export interface SqliteConnection {
  exec(sql: string, cb: (err: Error | null) => void): void;
  all(sql: string, params: unknown[], cb: (err: Error | null, rows: unknown[]) => void): void;
  prepare(sql: string, cb: (err: Error | null) => void): SqliteStatement;
  close(cb?: (err: Error | null) => void): void;
}

/** A prepared sqlite3 Statement. */
export interface SqliteStatement {
  all(params: unknown[], cb: (err: Error | null, rows: unknown[]) => void): void;
  finalize(cb?: (err: Error | null) => void): void;
}

/**
 * What is kept prepared, at most. A prepared statement's memory grows with its `?` parameters:
 * measured over 200 tenant stores, ~0.5 KiB per parameter of the multi-row INSERTs of
 * invocation records (a store that had kept 1,024 parameters' worth held ~530 KiB more). So a
 * connection keeps at most 32 statements and 1,024 parameters, and the process at most 131,072
 * parameters in all (~64 MiB at that rate), least recently used first out, whichever
 * connection they are on. That leaves room for a region's 1,024 open stores to keep their
 * one-record statements (a few dozen parameters each, audit appends included) while busy ones
 * keep multi-row ones too: with a quarter of it, calls spread round-robin over 1,000 stores
 * evicted exactly the statements the next call needed (the bench's spread: 0.66-0.78 against
 * 0.76-0.88 without a process-wide cap). A statement with more parameters than a connection may
 * keep is not kept.
 */
const KEPT_STATEMENTS = 32;
const KEPT_PARAMETERS = 1024;
const KEPT_PARAMETERS_IN_ALL = 131_072;

interface Kept {
  db: SqliteConnection;
  sql: string;
  statement: Promise<SqliteStatement>;
  params: number;
}

/** Connections that keep their statements prepared: SQL text -> statement, in LRU order. */
const keptStatements = new WeakMap<SqliteConnection, Map<string, Kept>>();
/** Every kept statement of every connection, least recently used first. */
const keptInOrder = new Set<Kept>();
let keptParameters = 0;

/** Our statements hold no literal `?`, so this counts their parameters. */
function parameterCount(sql: string): number {
  let n = 0;
  for (let i = sql.indexOf('?'); i !== -1; i = sql.indexOf('?', i + 1)) {
    n += 1;
  }
  return n;
}

function finalize(statement: Promise<SqliteStatement>): Promise<void> {
  return statement.then(
    (s) =>
      new Promise<void>((resolve) => {
        s.finalize(() => {
          resolve();
        });
      }),
    () => undefined, // never prepared: nothing to finalize
  );
}

/** Stops keeping `entry` (if still kept) and finalizes it. */
function drop(entry: Kept): Promise<void> {
  if (keptInOrder.delete(entry)) {
    keptParameters -= entry.params;
    const kept = keptStatements.get(entry.db);
    if (kept?.get(entry.sql) === entry) {
      kept.delete(entry.sql);
    }
  }
  return finalize(entry.statement);
}

/**
 * Makes {@link querySql} on `db` keep its statements prepared. `db.all(sql)` costs two trips
 * through the thread pool (prepare, then bind and step; each waits for a free turn of the
 * event loop to schedule the next), a kept statement one. For long-lived connections on hot
 * paths only (a store's writer, the control plane's lookups): call {@link releaseStatements}
 * before closing `db`, since SQLite does not close a connection with statements left open.
 */
export function keepStatements(db: SqliteConnection): void {
  if (!keptStatements.has(db)) {
    keptStatements.set(db, new Map());
  }
}

/** Finalizes the statements `db` keeps and stops keeping them: before `db.close()`. */
export async function releaseStatements(db: SqliteConnection): Promise<void> {
  const kept = keptStatements.get(db);
  keptStatements.delete(db);
  if (kept) {
    await Promise.all(
      [...kept.values()].map((entry) => {
        kept.delete(entry.sql);
        return drop(entry);
      }),
    );
  }
}

function prepare(db: SqliteConnection, sql: string): Promise<SqliteStatement> {
  return new Promise<SqliteStatement>((resolve, reject) => {
    const s = db.prepare(sql, (err) => {
      if (err) {
        reject(err);
      } else {
        resolve(s);
      }
    });
  });
}

/**
 * The kept statement for `sql` on `db`, prepared on first use (a statement that does not
 * prepare rejects and is not kept), or undefined if `db` keeps none or `sql` is too large to.
 */
function keptStatement(db: SqliteConnection, sql: string): Promise<SqliteStatement> | undefined {
  const kept = keptStatements.get(db);
  if (!kept) {
    return undefined;
  }
  const hit = kept.get(sql);
  if (hit) {
    kept.delete(sql); // most recently used last, here and in the process-wide order
    kept.set(sql, hit);
    keptInOrder.delete(hit);
    keptInOrder.add(hit);
    return hit.statement;
  }
  const params = parameterCount(sql);
  if (params > KEPT_PARAMETERS) {
    return undefined;
  }
  const entry: Kept = { db, sql, statement: prepare(db, sql), params };
  entry.statement.catch(() => {
    void drop(entry);
  });
  let onThis = params;
  for (const k of kept.values()) {
    onThis += k.params;
  }
  for (const old of kept.values()) {
    if (kept.size < KEPT_STATEMENTS && onThis <= KEPT_PARAMETERS) {
      break;
    }
    onThis -= old.params;
    void drop(old);
  }
  for (const old of keptInOrder) {
    if (keptParameters + params <= KEPT_PARAMETERS_IN_ALL) {
      break;
    }
    void drop(old);
  }
  kept.set(sql, entry);
  keptInOrder.add(entry);
  keptParameters += params;
  return entry.statement;
}

/** Runs SQL without results on a connection. */
export function execSql(db: SqliteConnection, sql: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    db.exec(sql, (err) => {
      if (err) {
        reject(err);
      } else {
        resolve();
      }
    });
  });
}

/**
 * Runs one statement with `?` parameters on a connection and returns its rows (on a statement
 * kept prepared if `db` keeps them: {@link keepStatements}).
 */
export function querySql<R>(
  db: SqliteConnection,
  sql: string,
  params: readonly unknown[] = [],
): Promise<R[]> {
  const statement = keptStatement(db, sql);
  return new Promise<R[]>((resolve, reject) => {
    const done = (err: Error | null, rows: unknown[]) => {
      if (err) {
        reject(err);
      } else {
        resolve(rows as R[]);
      }
    };
    if (statement) {
      statement.then((s) => {
        s.all([...params], done);
      }, reject);
    } else {
      db.all(sql, [...params], done);
    }
  });
}

/** The connection manager of a Sequelize SQLite instance, after {@link withPragmas}. */
export interface SqliteConnections {
  /** A connection (`uuid` names a long-lived one, as Sequelize keys them), pragmas applied. */
  getConnection(opts?: { uuid?: string }): Promise<SqliteConnection>;
  /** Sequelize's open connections by key (its `close()` closes every one). */
  readonly connections: Record<string, SqliteConnection | undefined>;
}

/**
 * Makes every connection `sequelize` opens (the default one, one per transaction, and any the
 * caller asks for) run `pragmas` once before first use. Connection-scoped settings such as
 * `busy_timeout` or `synchronous` cannot be set inside a transaction, hence a hook on the
 * connection manager rather than a statement in each transaction.
 */
export function withPragmas(sequelize: Sequelize, pragmas: string): SqliteConnections {
  const cm = sequelize.connectionManager as unknown as SqliteConnections;
  const original = cm.getConnection.bind(cm);
  const configured = new WeakSet<object>();
  cm.getConnection = async (opts?: { uuid?: string }) => {
    const db = await original(opts);
    if (!configured.has(db)) {
      await execSql(db, pragmas);
      configured.add(db);
    }
    return db;
  };
  return cm;
}
