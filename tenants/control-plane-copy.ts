/**
 * `cellcds control-plane copy`: moves a SQLite control plane (`control.sqlite`) into an empty
 * PostgreSQL schema, so a deployment scales out without registering everything again
 * (docs/operations.md, "Scale-out").
 *
 *   snapshot   the source is opened read-only; one read transaction sees every table; its
 *              columns must be exactly this version's; its audit chain must verify (copying a
 *              tampered chain would launder it)
 *   copying    one PostgreSQL transaction holding the control plane's write advisory lock (a
 *              replica writing meanwhile waits): the target must be empty (two control planes
 *              are never merged); every row is inserted as stored (token hashes, audit seq, at,
 *              prevHash and hash, the head); a digest of every table is compared with the
 *              source's; the generation counter moves; `control-plane.copied` is appended to
 *              the chain; the audit seq sequence is moved past the last event
 *   committed  only if the source did not change since the snapshot (SQLite `data_version`),
 *              else rolled back: nothing written
 *   verified   the target is opened as a replica would open it: row counts per table, the audit
 *              chain verifies, the source head is the link before the copy event
 *
 * The source file is never written. The PostgreSQL URL is never put in a message.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QueryTypes, Sequelize } from 'sequelize';
import type { Transaction } from 'sequelize';
import sqlite3 from 'sqlite3';
import { appendAuditEvent, chainedEvent } from './audit-repository.ts';
import { openControlPlane } from './control-plane.ts';
import { defineControlPlaneModels } from './control-plane-models.ts';
import type { AuditRow, ControlPlaneModels } from './control-plane-models.ts';
import { DEFAULT_CONTROL_PLANE_SCHEMA, openPostgresEngine } from './control-plane-postgres.ts';
import type { PostgresControlPlaneOptions, PostgresEngine } from './control-plane-postgres.ts';
import { canonicalJson, createChainVerifier, GENESIS_HASH } from './data-plane/hash-chain.ts';
import type { ChainHead } from './data-plane/hash-chain.ts';

/** Why a copy was refused (nothing written) or ended badly (`source_changed_after_commit`). */
export type ControlPlaneCopyRefusal =
  | 'source_missing'
  | 'source_invalid'
  | 'source_chain_broken'
  | 'source_changed'
  | 'target_not_empty'
  | 'verification_failed'
  | 'source_changed_after_commit';

/** A copy refused or failed its checks; `message` is safe to print (no URL, no secret). */
export class ControlPlaneCopyError extends Error {
  constructor(
    readonly reason: ControlPlaneCopyRefusal,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** The tables copied, in insert order (tenants before the issuers that reference them). */
export const COPIED_TABLES = [
  'tenants',
  'tenant_issuers',
  'packs',
  'admin_tokens',
  'audit_events',
  'audit_head',
  'retired_tenants',
] as const;
export type CopiedTable = (typeof COPIED_TABLES)[number];

const MODEL_OF: Record<CopiedTable, keyof ControlPlaneModels> = {
  tenants: 'Tenant',
  tenant_issuers: 'TenantIssuer',
  packs: 'Pack',
  admin_tokens: 'AdminToken',
  audit_events: 'Audit',
  audit_head: 'AuditHead',
  retired_tenants: 'RetiredTenant',
};

/** Rows per read and per INSERT (packs are large: fewer). */
const PAGE: Record<CopiedTable, number> = {
  tenants: 500,
  tenant_issuers: 1000,
  packs: 50,
  admin_tokens: 1000,
  audit_events: 1000,
  audit_head: 1,
  retired_tenants: 1000,
};

export interface CopyProgress {
  phase: 'snapshot' | 'source-verified' | 'copying' | 'committed' | 'verified';
  table?: CopiedTable;
  done?: number;
  total?: number;
}

export interface CopyControlPlaneOptions extends PostgresControlPlaneOptions {
  /** The source SQLite file (`$CELLCDS_DATA_DIR/control.sqlite`). */
  from: string;
  /** Recorded in the `control-plane.copied` event. Default `cli`. */
  actor?: string;
  now?: () => Date;
  onProgress?: (progress: CopyProgress) => void | Promise<void>;
}

export interface CopyControlPlaneResult {
  schema: string;
  /** Rows copied per table (the source's counts). */
  counts: Record<CopiedTable, number>;
  /** The source chain's head: on the target, the link just before the copy event. */
  sourceHead: ChainHead;
  /** The target chain's head after the copy: the `control-plane.copied` event. */
  targetHead: ChainHead;
}

type Row = Record<string, unknown>;

interface TableShape {
  table: CopiedTable;
  /** Column names, in attribute order. */
  columns: string[];
  /** Primary-key columns: the order rows are read, inserted and digested in. */
  key: string[];
}

/** The tables' columns as this version's models define them (no database is opened). */
async function tableShapes(): Promise<TableShape[]> {
  const meta = new Sequelize({ dialect: 'sqlite', storage: ':memory:', logging: false });
  try {
    const models = defineControlPlaneModels(meta);
    return COPIED_TABLES.map((table) => {
      const model = models[MODEL_OF[table]] as unknown as {
        rawAttributes: Record<string, { field?: string }>;
        primaryKeyAttributes: string[];
      };
      const attributes = model.rawAttributes;
      const field = (name: string) => attributes[name]?.field ?? name;
      return {
        table,
        columns: Object.keys(attributes).map(field),
        key: model.primaryKeyAttributes.map(field),
      };
    });
  } finally {
    await meta.close();
  }
}

const quote = (name: string) => `"${name}"`;

// ---------------------------------------------------------------------------- source (SQLite)

interface Source {
  all(sql: string, params?: unknown[]): Promise<Row[]>;
  close(): Promise<void>;
}

function openSource(file: string): Promise<Source> {
  return new Promise((resolve, reject) => {
    // Read-only: the source stays exactly as it was, the fallback if PostgreSQL goes wrong.
    const db = new sqlite3.Database(file, sqlite3.OPEN_READONLY, (err) => {
      if (err) {
        reject(err);
        return;
      }
      resolve({
        all: (sql, params = []) =>
          new Promise((ok, ko) => {
            db.all(sql, params, (e: Error | null, rows: Row[]) => {
              if (e) {
                ko(e);
              } else {
                ok(rows);
              }
            });
          }),
        close: () =>
          new Promise((ok) => {
            db.close(() => {
              ok();
            });
          }),
      });
    });
  });
}

async function dataVersion(source: Source): Promise<number> {
  const [row] = await source.all('PRAGMA data_version');
  return Number(row?.data_version);
}

/**
 * Checks that the source holds exactly this version's tables and columns: a column the models
 * lack would be dropped silently, one they have that the file lacks is from an older version.
 */
async function checkSourceShape(source: Source, shapes: TableShape[], file: string): Promise<void> {
  for (const shape of shapes) {
    const info = await source.all(`PRAGMA table_info(${quote(shape.table)})`);
    if (info.length === 0) {
      throw new ControlPlaneCopyError(
        'source_invalid',
        `${file} is not a cellcds control plane (no table ${shape.table})`,
      );
    }
    const have = new Set(info.map((c) => String(c.name)));
    const missing = shape.columns.filter((c) => !have.has(c));
    if (missing.length > 0) {
      throw new ControlPlaneCopyError(
        'source_invalid',
        `${file}: table ${shape.table} lacks ${missing.join(', ')} (written by an older version): open it once with this version (e.g. npx cellcds tenant list) and copy again`,
      );
    }
    const extra = [...have].filter((c) => !shape.columns.includes(c));
    if (extra.length > 0) {
      throw new ControlPlaneCopyError(
        'source_invalid',
        `${file}: table ${shape.table} has columns this version does not know (${extra.join(', ')}): copy with the version that wrote it`,
      );
    }
  }
}

/** Reads `shape`'s rows in key order, a page at a time (inside the caller's read transaction). */
async function* sourcePages(source: Source, shape: TableShape): AsyncGenerator<Row[]> {
  const cols = shape.columns.map(quote).join(', ');
  const order = shape.key.map(quote).join(', ');
  const size = PAGE[shape.table];
  for (let offset = 0; ; offset += size) {
    const rows = await source.all(
      `SELECT ${cols} FROM ${quote(shape.table)} ORDER BY ${order} LIMIT ? OFFSET ?`,
      [size, offset],
    );
    if (rows.length === 0) {
      return;
    }
    yield rows;
    if (rows.length < size) {
      return;
    }
  }
}

function auditRow(row: Row): AuditRow {
  return {
    seq: Number(row.seq),
    at: row.at as string,
    type: row.type as string,
    outcome: row.outcome as string,
    tenant: row.tenant as string | null,
    actor: row.actor as string | null,
    detail: row.detail as string | null,
    prevHash: row.prev_hash as string,
    hash: row.hash as string,
  };
}

/** Verifies the source chain and its head anchor, as `audit verify` does. */
async function verifySourceChain(
  source: Source,
  shapes: TableShape[],
  file: string,
): Promise<ChainHead> {
  const shape = shapes.find((s) => s.table === 'audit_events') as TableShape;
  const verifier = createChainVerifier();
  let going = true;
  for await (const page of sourcePages(source, shape)) {
    for (const raw of page) {
      const r = auditRow(raw);
      going = verifier.push({
        seq: r.seq,
        prevHash: r.prevHash,
        hash: r.hash,
        event: chainedEvent(r),
      });
      if (!going) {
        break;
      }
    }
    if (!going) {
      break;
    }
  }
  const [head] = await source.all('SELECT seq, hash FROM audit_head WHERE id = 1');
  const anchor: ChainHead = head
    ? { seq: Number(head.seq), hash: String(head.hash) }
    : { seq: 0, hash: GENESIS_HASH };
  const result = verifier.finish(anchor);
  if (!result.ok) {
    throw new ControlPlaneCopyError(
      'source_chain_broken',
      `${file}: the audit chain does not verify (${String(result.problem)} at seq ${String(result.firstBadSeq)}); copying it would launder the tampering: investigate first (docs/operations.md, "Audit trails"), nothing was copied`,
    );
  }
  return anchor;
}

// ---------------------------------------------------------------------------- digests

/** sha256 over the rows' values in column order, rows in key order. */
function createDigest(): { add(rows: Row[], columns: string[]): void; hex(): string } {
  const hash = crypto.createHash('sha256');
  return {
    add(rows, columns) {
      for (const row of rows) {
        hash.update(canonicalJson(columns.map((c) => row[c] ?? null)));
        hash.update('\n');
      }
    },
    hex: () => hash.digest('hex'),
  };
}

// ---------------------------------------------------------------------------- the copy

function redact(message: string, url: string): string {
  const secrets = [url];
  try {
    const u = new URL(url);
    if (u.password) {
      secrets.push(u.password, decodeURIComponent(u.password));
    }
  } catch {
    // not a URL: openPostgresEngine refuses it without quoting it
  }
  let out = message;
  for (const s of secrets.filter((v) => v.length > 0)) {
    out = out.split(s).join('***');
  }
  return out;
}

/**
 * Copies the SQLite control plane `from` into the (empty) PostgreSQL schema, audits the copy in
 * the target's chain (`control-plane.copied`) and verifies the target (module comment).
 * @throws ControlPlaneCopyError: a refusal (nothing written) or a failed check after the
 *   commit (`verification_failed`, `source_changed_after_commit`: the message says what to
 *   do); InvalidInputError for a bad URL or schema; the drivers' errors, the URL redacted.
 */
export async function copyControlPlane(
  opts: CopyControlPlaneOptions,
): Promise<CopyControlPlaneResult> {
  try {
    return await copy(opts);
  } catch (err) {
    if (err instanceof ControlPlaneCopyError || !(err instanceof Error)) {
      throw err;
    }
    const safe = new Error(redact(err.message, opts.postgresUrl));
    safe.name = err.name;
    throw safe;
  }
}

async function copy(opts: CopyControlPlaneOptions): Promise<CopyControlPlaneResult> {
  const file = path.resolve(opts.from);
  const now = opts.now ?? (() => new Date());
  const progress = async (p: CopyProgress) => {
    await opts.onProgress?.(p);
  };
  const stat = fs.statSync(file, { throwIfNoEntry: false });
  if (!stat?.isFile()) {
    throw new ControlPlaneCopyError(
      'source_missing',
      `${file}: no such file (pass --from, or set CELLCDS_DATA_DIR to the data directory holding control.sqlite)`,
    );
  }
  const shapes = await tableShapes();
  let source: Source;
  try {
    source = await openSource(file);
  } catch (err) {
    throw new ControlPlaneCopyError(
      'source_invalid',
      `${file} cannot be opened: ${err instanceof Error ? err.message : String(err)}`,
    );
  }
  let engine: PostgresEngine | undefined;
  let inRead = false;
  try {
    let before: number;
    try {
      before = await dataVersion(source);
      await checkSourceShape(source, shapes, file);
    } catch (err) {
      if (err instanceof ControlPlaneCopyError) {
        throw err;
      }
      throw new ControlPlaneCopyError(
        'source_invalid',
        `${file} is not a SQLite control plane: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
    // One read transaction: every page below reads the same snapshot, whatever commits meanwhile.
    await source.all('BEGIN');
    inRead = true;
    const counts = Object.create(null) as Record<CopiedTable, number>;
    for (const shape of shapes) {
      const [row] = await source.all(`SELECT count(*) AS n FROM ${quote(shape.table)}`);
      counts[shape.table] = Number(row?.n);
    }
    await progress({ phase: 'snapshot' });
    const sourceHead = await verifySourceChain(source, shapes, file);
    await progress({ phase: 'source-verified' });

    engine = await openPostgresEngine(opts);
    const pg = engine;
    const schema = opts.schema ?? DEFAULT_CONTROL_PLANE_SCHEMA;
    const target = (table: string) => `${quote(schema)}.${quote(table)}`;
    const select = <T extends object = Row>(sql: string, t?: Transaction) =>
      pg.sequelize.query<T>(sql, { type: QueryTypes.SELECT, ...(t ? { transaction: t } : {}) });

    const targetHead = await pg.writeTx(async (t) => {
      // Under the write lock: a replica that wrote before it is seen here, one writing after
      // waits for the commit.
      const held: string[] = [];
      for (const table of COPIED_TABLES) {
        const [row] = await select<{ n: string }>(`SELECT count(*) AS n FROM ${target(table)}`, t);
        if (Number(row?.n) > 0) {
          held.push(`${table} ${String(row?.n)}`);
        }
      }
      if (held.length > 0) {
        throw new ControlPlaneCopyError(
          'target_not_empty',
          `PostgreSQL schema ${schema} already holds a control plane (${held.join(', ')}): the copy never merges two control planes; give an empty schema (--schema), or drop this one if it is a failed earlier copy; nothing was written`,
        );
      }
      for (const shape of shapes) {
        const cols = shape.columns.map(quote).join(', ');
        const sourceDigest = createDigest();
        let done = 0;
        for await (const page of sourcePages(source, shape)) {
          const bind: unknown[] = [];
          const tuples = page.map((row) => {
            const slots = shape.columns.map((c) => {
              bind.push(row[c] ?? null);
              return `$${String(bind.length)}`;
            });
            return `(${slots.join(', ')})`;
          });
          await pg.sequelize.query(
            `INSERT INTO ${target(shape.table)} (${cols}) VALUES ${tuples.join(', ')}`,
            { bind, transaction: t },
          );
          sourceDigest.add(page, shape.columns);
          done += page.length;
          await progress({
            phase: 'copying',
            table: shape.table,
            done,
            total: counts[shape.table],
          });
        }
        // Read back in the same order: the target holds exactly the source's values.
        const targetDigest = createDigest();
        const order = shape.key.map(quote).join(', ');
        const size = PAGE[shape.table];
        for (let offset = 0; ; offset += size) {
          const rows = await select(
            `SELECT ${cols} FROM ${target(shape.table)} ORDER BY ${order} LIMIT ${String(size)} OFFSET ${String(offset)}`,
            t,
          );
          targetDigest.add(rows, shape.columns);
          if (rows.length < size) {
            break;
          }
        }
        if (done !== counts[shape.table] || sourceDigest.hex() !== targetDigest.hex()) {
          throw new ControlPlaneCopyError(
            'verification_failed',
            `table ${shape.table} reads back differently on PostgreSQL (${String(done)} of ${String(counts[shape.table])} rows): rolled back, nothing was written`,
          );
        }
      }
      // Replicas drop their cached tenant lookups (the triggers moved it already when tenants
      // were copied; an empty registry moves it too).
      await pg.sequelize.query(
        `UPDATE ${target('control_generation')} SET value = value + 1 WHERE id = 1`,
        { transaction: t },
      );
      const event = await appendAuditEvent(
        pg.models,
        now().toISOString(),
        {
          type: 'control-plane.copied',
          outcome: 'success',
          actor: opts.actor ?? 'cli',
          detail: {
            source: 'sqlite',
            file: path.basename(file),
            tenants: counts.tenants,
            tenantIssuers: counts.tenant_issuers,
            packs: counts.packs,
            adminTokens: counts.admin_tokens,
            auditEvents: counts.audit_events,
            retiredTenants: counts.retired_tenants,
            sourceHeadSeq: sourceHead.seq,
            sourceHeadHash: sourceHead.hash,
          },
        },
        t,
      );
      // appendAuditEvent gives seq itself; an insert relying on the serial default continues.
      await select(
        `SELECT setval(pg_get_serial_sequence('${target('audit_events')}', 'seq'), ${String(event.seq)}, true)`,
        t,
      );
      // Last: a source written since the snapshot (a server still running) is not copied.
      await source.all('COMMIT');
      inRead = false;
      if ((await dataVersion(source)) !== before) {
        throw new ControlPlaneCopyError(
          'source_changed',
          `${file} changed during the copy (a server or the CLI wrote to it): rolled back, nothing was written; stop every server using it and copy again`,
        );
      }
      return { seq: event.seq, hash: event.hash };
    });
    const changedAfter = (await dataVersion(source)) !== before;
    await progress({ phase: 'committed' });
    await verifyTarget(opts, pg, schema, counts, sourceHead, targetHead);
    await progress({ phase: 'verified' });
    if (changedAfter) {
      throw new ControlPlaneCopyError(
        'source_changed_after_commit',
        `${file} changed just after the copy committed: PostgreSQL schema ${schema} misses that change. Stop every server using the file, drop the schema (DROP SCHEMA ${schema} CASCADE) and copy again`,
      );
    }
    return { schema, counts, sourceHead, targetHead };
  } finally {
    if (inRead) {
      await source.all('ROLLBACK').catch(() => undefined);
    }
    await source.close();
    await engine?.close();
  }
}

/** Opens the target as a replica would and checks counts, chain and head. */
async function verifyTarget(
  opts: CopyControlPlaneOptions,
  pg: PostgresEngine,
  schema: string,
  counts: Record<CopiedTable, number>,
  sourceHead: ChainHead,
  targetHead: ChainHead,
): Promise<void> {
  const problems: string[] = [];
  for (const table of COPIED_TABLES) {
    const [row] = await pg.sequelize.query<{ n: string }>(
      `SELECT count(*) AS n FROM ${quote(schema)}.${quote(table)}`,
      { type: QueryTypes.SELECT },
    );
    // The copy event is one more audit event; the head is one row either way.
    const expected =
      table === 'audit_events' ? counts[table] + 1 : table === 'audit_head' ? 1 : counts[table];
    if (Number(row?.n) !== expected) {
      problems.push(`${table}: ${String(row?.n)} rows, expected ${String(expected)}`);
    }
  }
  const [link] = await pg.sequelize.query<{ seq: number; prev_hash: string }>(
    `SELECT seq, prev_hash FROM ${quote(schema)}.audit_events WHERE seq = ${String(targetHead.seq)}`,
    { type: QueryTypes.SELECT },
  );
  if (link?.prev_hash !== sourceHead.hash || targetHead.seq !== sourceHead.seq + 1) {
    problems.push('the copy event does not follow the source head');
  }
  const cp = await openControlPlane({
    postgresUrl: opts.postgresUrl,
    schema,
    ...(opts.statementTimeoutMs !== undefined
      ? { statementTimeoutMs: opts.statementTimeoutMs }
      : {}),
    ...(opts.acquireTimeoutMs !== undefined ? { acquireTimeoutMs: opts.acquireTimeoutMs } : {}),
    poolMax: 2,
  });
  try {
    const verified = await cp.audit.verify();
    if (!verified.ok) {
      problems.push(
        `the audit chain does not verify (${String(verified.problem)} at seq ${String(verified.firstBadSeq)})`,
      );
    }
  } finally {
    await cp.close();
  }
  if (problems.length > 0) {
    throw new ControlPlaneCopyError(
      'verification_failed',
      `the copy committed but PostgreSQL schema ${schema} does not check out: ${problems.join('; ')}. Keep the servers on the SQLite file (untouched); drop the schema and copy again with every server stopped`,
    );
  }
}
