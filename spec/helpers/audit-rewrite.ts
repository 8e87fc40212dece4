/**
 * The insider's rewrite of an audit chain, on the real SQLite file: what someone with write
 * access to the database can do to a plain hash chain (no secret), for the specs of kept
 * anchors (server/audit-anchors.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import sqlite3 from 'sqlite3';
import { chainHash, GENESIS_HASH } from '../../tenants/index.ts';

export interface EventRow {
  seq: number;
  at: string;
  type: string;
  outcome: string;
  tenant?: string | null;
  actor: string | null;
  detail: string | null;
}

function allRows(file: string, sql: string): Promise<EventRow[]> {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(file);
    db.all(sql, (err, rows) => {
      db.close(() => {
        err ? reject(err) : resolve(rows as EventRow[]);
      });
    });
  });
}

function run(file: string, statements: Array<[string, unknown[]]>): Promise<void> {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(file);
    db.serialize(() => {
      for (const [sql, params] of statements) {
        db.run(sql, params);
      }
    });
    db.close((err) => {
      err ? reject(err) : resolve();
    });
  });
}

/**
 * The insider's rewrite: drops the append-only triggers, deletes the event at `dropSeq`,
 * renumbers the rest, recomputes every link with the chain's hash function, moves the head.
 */
export async function rewriteChain(
  file: string,
  dropSeq: number,
  columns: string,
  hashed: (row: EventRow) => unknown,
): Promise<void> {
  const rows = await allRows(file, `SELECT seq, ${columns} FROM audit_events ORDER BY seq`);
  expect(rows.some((r) => r.seq === dropSeq)).to.equal(true);
  const statements: Array<[string, unknown[]]> = [
    ['DROP TRIGGER IF EXISTS audit_events_no_update', []],
    ['DROP TRIGGER IF EXISTS audit_events_no_delete', []],
    ['DELETE FROM audit_events', []],
  ];
  let prev = GENESIS_HASH;
  let seq = 0;
  const names = ['seq', ...columns.split(',').map((c) => c.trim()), 'prev_hash', 'hash'];
  for (const row of rows.filter((r) => r.seq !== dropSeq)) {
    seq += 1;
    const hash = chainHash(prev, seq, hashed(row));
    const values = [
      seq,
      ...columns.split(',').map((c) => (row as unknown as Record<string, unknown>)[c.trim()]),
      prev,
      hash,
    ];
    statements.push([
      `INSERT INTO audit_events (${names.join(', ')}) VALUES (${names.map(() => '?').join(', ')})`,
      values,
    ]);
    prev = hash;
  }
  statements.push(['UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1', [seq, prev]]);
  await run(file, statements);
}

/** What the tenant chain hashes (tenants/data-plane/audit-chain.ts). */
export const tenantEvent = (tenant: string) => (row: EventRow) => ({
  tenant,
  at: row.at,
  type: row.type,
  outcome: row.outcome,
  ...(row.actor !== null ? { actor: row.actor } : {}),
  ...(row.detail !== null ? { detail: JSON.parse(row.detail) as unknown } : {}),
});

/** What the control-plane chain hashes (tenants/audit-repository.ts). */
export const controlPlaneEvent = (row: EventRow) => ({
  at: row.at,
  type: row.type,
  outcome: row.outcome,
  tenant: row.tenant,
  actor: row.actor,
  detail: row.detail,
});

export function findFile(dir: string, name: string): string {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile() && entry.name === name) {
      return path.join(entry.parentPath, entry.name);
    }
  }
  throw new Error(`${name} not found under ${dir}`);
}
