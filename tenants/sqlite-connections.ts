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
  close(cb?: (err: Error | null) => void): void;
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

/** Runs one statement with `?` parameters on a connection and returns its rows. */
export function querySql<R>(
  db: SqliteConnection,
  sql: string,
  params: readonly unknown[] = [],
): Promise<R[]> {
  return new Promise<R[]>((resolve, reject) => {
    db.all(sql, [...params], (err, rows) => {
      if (err) {
        reject(err);
      } else {
        resolve(rows as R[]);
      }
    });
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
