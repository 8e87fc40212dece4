/**
 * The control plane on PostgreSQL: one schema shared by every replica (docs/operations.md,
 * "Scale-out"). What SQLite gets from its single writer and `PRAGMA data_version`, this module
 * builds from a transaction-scoped advisory lock and a generation counter kept by triggers.
 */
import { QueryTypes, Sequelize, Transaction } from 'sequelize';
import { defineControlPlaneModels } from './control-plane-models.ts';
import type { ControlPlaneModels, WriteTx } from './control-plane-models.ts';
import { InvalidInputError } from './errors.ts';

/** Where the control plane lives on PostgreSQL, and its bounded waits. */
export interface PostgresControlPlaneOptions {
  /** `postgres://` or `postgresql://` URL. Never logged or put in an error message. */
  postgresUrl: string;
  /** Schema holding the tables (created if missing); default `cellcds_control`. */
  schema?: string;
  /** Each statement's `statement_timeout` in ms (0: none); default 5000. */
  statementTimeoutMs?: number;
  /** Longest wait for a pooled connection, opening one included (ms); default 5000. */
  acquireTimeoutMs?: number;
  /** Pooled connections of this process; default 10. */
  poolMax?: number;
  /**
   * Each connection's `idle_in_transaction_session_timeout` in ms (0: none); default
   * `idleInTransactionTimeoutFor(statementTimeoutMs)`. A replica cut off in the middle of a write
   * (its host gone, the network silent) would otherwise hold the write lock until TCP keepalive
   * notices, about two hours by default, and every other replica's writes would fail meanwhile.
   */
  idleInTransactionTimeoutMs?: number;
}

/**
 * The default `idle_in_transaction_session_timeout` of cellcds's PostgreSQL connections (control
 * plane and tenant stores): twice the statement timeout, at least 10 s. PostgreSQL ends a session
 * that stays that long inside a transaction without running a statement, releasing its locks
 * (the advisory write lock, row locks); cellcds's transactions never wait that long between
 * statements (no network call is made inside one). A URL parameter of the same name overrides it.
 */
export function idleInTransactionTimeoutFor(statementTimeoutMs: number): number {
  return Math.max(2 * statementTimeoutMs, 10_000);
}

/**
 * The control plane's schema is missing its generation row (deleted by hand): the caches of
 * `findByIssuer` and the FHIR allowlist could not tell a change, so lookups are refused until
 * it is back (503 at the HTTP edge, as a database that cannot serve; a restart recreates it).
 */
export class ControlPlaneUnavailableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ControlPlaneUnavailableError';
  }
}

/** The schema used when none is given. */
export const DEFAULT_CONTROL_PLANE_SCHEMA = 'cellcds_control';

/** A PostgreSQL identifier cellcds creates without quoting surprises. */
export const CONTROL_PLANE_SCHEMA_PATTERN = /^[a-z_][a-z0-9_]{0,62}$/;

/** The backend-specific pieces `openControlPlane` wires the repositories onto. */
export interface PostgresEngine {
  sequelize: Sequelize;
  models: ControlPlaneModels;
  writeTx: WriteTx;
  /** Changes whenever tenants or their issuers changed (any replica, any connection). */
  readGeneration: () => Promise<string>;
  ping: () => Promise<void>;
  close: () => Promise<void>;
}

/** A postgres:// or postgresql:// URL naming a host. */
export function isPostgresUrl(value: string): boolean {
  try {
    const url = new URL(value);
    return (url.protocol === 'postgres:' || url.protocol === 'postgresql:') && url.host !== '';
  } catch {
    return false;
  }
}

/**
 * Schema objects beyond the models, created under the creation lock. PostgreSQL 14 or later
 * (CREATE OR REPLACE TRIGGER), as the data plane requires.
 *
 * - audit_events is append-only: UPDATE, DELETE and TRUNCATE raise (the hash chain detects
 *   what a superuser does with the triggers dropped).
 * - control_generation is a one-row counter bumped by every statement that writes tenants or
 *   tenant_issuers, in the writing transaction: it changes exactly when a commit may change
 *   what `findByIssuer` and `activeFhirServers` answer, whoever wrote (a replica, the CLI, psql).
 */
function schemaObjects(schema: string): string[] {
  const q = `"${schema}"`;
  return [
    `CREATE TABLE IF NOT EXISTS ${q}.control_generation (
       id INTEGER PRIMARY KEY CHECK (id = 1), value BIGINT NOT NULL)`,
    // Seeded from the clock: a row deleted by hand and recreated here never repeats a value a
    // replica cached its lookups under.
    `INSERT INTO ${q}.control_generation (id, value)
       VALUES (1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
       ON CONFLICT (id) DO NOTHING`,
    `CREATE OR REPLACE FUNCTION ${q}.cellcds_append_only() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN RAISE EXCEPTION 'audit_events is append-only'; END $$`,
    `CREATE OR REPLACE TRIGGER audit_events_no_update BEFORE UPDATE ON ${q}.audit_events
     FOR EACH ROW EXECUTE FUNCTION ${q}.cellcds_append_only()`,
    `CREATE OR REPLACE TRIGGER audit_events_no_delete BEFORE DELETE ON ${q}.audit_events
     FOR EACH ROW EXECUTE FUNCTION ${q}.cellcds_append_only()`,
    `CREATE OR REPLACE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON ${q}.audit_events
     FOR EACH STATEMENT EXECUTE FUNCTION ${q}.cellcds_append_only()`,
    `CREATE OR REPLACE FUNCTION ${q}.cellcds_bump_generation() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN
       EXECUTE format('UPDATE %I.control_generation SET value = value + 1 WHERE id = 1',
         TG_TABLE_SCHEMA);
       RETURN NULL;
     END $$`,
    ...['tenants', 'tenant_issuers'].map(
      (table) => `CREATE OR REPLACE TRIGGER ${table}_bump_generation
       AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON ${q}.${table}
       FOR EACH STATEMENT EXECUTE FUNCTION ${q}.cellcds_bump_generation()`,
    ),
  ];
}

/**
 * Connects, creates the schema if needed, and returns the PostgreSQL pieces of a control plane.
 * @throws InvalidInputError for a bad URL or schema name (the URL is not quoted); the driver's
 *   error if PostgreSQL refuses or the schema cannot be created.
 */
export async function openPostgresEngine(
  opts: PostgresControlPlaneOptions,
): Promise<PostgresEngine> {
  if (typeof opts.postgresUrl !== 'string' || !isPostgresUrl(opts.postgresUrl)) {
    throw new InvalidInputError('postgresUrl', 'must be a postgres:// or postgresql:// URL');
  }
  const schema = opts.schema ?? DEFAULT_CONTROL_PLANE_SCHEMA;
  if (typeof schema !== 'string' || !CONTROL_PLANE_SCHEMA_PATTERN.test(schema)) {
    throw new InvalidInputError(
      'schema',
      'must be lower-case letters, digits and _, not starting with a digit (at most 63)',
    );
  }
  const statementTimeoutMs = opts.statementTimeoutMs ?? 5_000;
  const acquireTimeoutMs = opts.acquireTimeoutMs ?? 5_000;
  const idleInTransactionMs =
    opts.idleInTransactionTimeoutMs ?? idleInTransactionTimeoutFor(statementTimeoutMs);
  // Every call is bounded, as the data plane's are (store-backend.ts): a stalled database fails
  // a lookup within about these times instead of hanging the hook call.
  const sequelize = new Sequelize(opts.postgresUrl, {
    dialect: 'postgres',
    logging: false,
    dialectOptions: {
      connectionTimeoutMillis: acquireTimeoutMs,
      keepAlive: true,
      ...(statementTimeoutMs > 0
        ? { statement_timeout: statementTimeoutMs, query_timeout: statementTimeoutMs + 1_000 }
        : {}),
      // A session silent inside a transaction (its replica cut off mid-write) is ended by the
      // server, and its advisory write lock released, instead of after TCP keepalive (~2 h).
      ...(idleInTransactionMs > 0
        ? { idle_in_transaction_session_timeout: idleInTransactionMs }
        : {}),
    },
    pool: { max: opts.poolMax ?? 10, min: 0, idle: 10_000, acquire: acquireTimeoutMs },
  });
  // Lock, then check, then write: the checks must see every commit made before the lock was
  // granted, which READ COMMITTED gives (each statement takes a new snapshot) and REPEATABLE READ
  // or SERIALIZABLE do not (one snapshot, possibly from before the lock). Forced, whatever the
  // database's or role's default_transaction_isolation.
  const lockedTx = <T>(fn: (t: Transaction) => Promise<T>): Promise<T> =>
    sequelize.transaction({ isolationLevel: Transaction.ISOLATION_LEVELS.READ_COMMITTED }, fn);
  const lock = (key: string, t: Transaction) =>
    sequelize.query('SELECT pg_advisory_xact_lock(hashtext(:key))', {
      transaction: t,
      type: QueryTypes.SELECT,
      replacements: { key },
    });
  try {
    const models = defineControlPlaneModels(sequelize, schema);
    // Replicas starting at once on an empty database: CREATE SCHEMA / TABLE IF NOT EXISTS race
    // in PostgreSQL's catalog (unique violations). One advisory lock serializes them, and the
    // schema, tables, indexes and triggers commit together: nobody sees a half-made schema.
    await lockedTx(async (t) => {
      await lock(`cellcds.control.setup.${schema}`, t);
      await sequelize.query(`CREATE SCHEMA IF NOT EXISTS "${schema}"`, { transaction: t });
      // Model.sync hands its options to every statement it runs, so the tables are made in `t`.
      await sequelize.sync({ transaction: t } as Parameters<Sequelize['sync']>[0]);
      for (const sql of schemaObjects(schema)) {
        await sequelize.query(sql, { transaction: t });
      }
    });
    // This process's writes queue here, so it waits on the advisory lock with one connection
    // and leaves the rest of the pool to the hook path's reads.
    let tail: Promise<unknown> = Promise.resolve();
    const writeKey = `cellcds.control.write.${schema}`;
    const writeTx: WriteTx = (fn) => {
      // One writer across replicas: the repositories check then write (tenant exists? pack
      // version stored? audit head?) and READ COMMITTED reads after the lock see every commit
      // made before it, so the checks hold and the audit chain never forks.
      const write = () =>
        lockedTx(async (t) => {
          await lock(writeKey, t);
          return fn(t);
        });
      const run = tail.then(write, write);
      tail = run.catch(() => undefined);
      return run;
    };
    const generationSql = `SELECT value FROM "${schema}".control_generation WHERE id = 1`;
    return {
      sequelize,
      models,
      writeTx,
      async readGeneration() {
        const [row] = await sequelize.query<{ value: string }>(generationSql, {
          type: QueryTypes.SELECT,
        });
        if (row === undefined) {
          // A constant would never move again: every cached lookup would be served forever.
          throw new ControlPlaneUnavailableError(
            `the control plane's generation row is missing (schema ${schema}); restart a replica to recreate it`,
          );
        }
        return `pg:${row.value}`;
      },
      async ping() {
        await sequelize.query('SELECT 1', { type: QueryTypes.SELECT });
      },
      close: () => sequelize.close(),
    };
  } catch (err) {
    await sequelize.close().catch(() => undefined);
    throw err;
  }
}
