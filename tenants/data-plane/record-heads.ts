/**
 * Record heads kept apart from their records. A scheduled DEK rotation re-wraps each record's
 * record key (record-cipher.ts, `rewrapHead`) and writes the new head to the sealed table's head
 * table (`invocation_heads`, `feedback_heads`) instead of rewriting the record: the record's row,
 * its ciphertext and its `key_version` column stay as they were. A record's **current** DEK
 * version and envelope are therefore:
 *
 *     head row present:  its key_version; the record's envelope with the head row's head
 *     no head row:       the record's key_version and envelope
 *
 * Anything that rewrites a record's `sealed` (an emergency rotation, the re-seal of a record
 * from before record keys) drops its head row in the same statement: a trigger in the store
 * (store-backend.ts), so a head never outlives the ciphertext it was made for.
 *
 * Every query here reads a record and its head row in one statement (one snapshot).
 */
import type { Transaction } from 'sequelize';
import { HEAD_TABLES, SEALED_TABLES } from './models.ts';
import type { SealedTable } from './models.ts';
import { withHead } from './record-cipher.ts';
import type { Envelope } from './record-cipher.ts';
import type { StoreHandle } from './store-backend.ts';

/** `FROM <table> r LEFT JOIN <heads> k`: a record (r) and its head row (k), if any. */
export function withHeads(h: StoreHandle, table: SealedTable): string {
  return `${h.qualified(table)} r LEFT JOIN ${h.qualified(HEAD_TABLES[table])} k ON k.seq = r.seq`;
}

/** The DEK version a record is under, in a query over `withHeads`. */
export const CURRENT_VERSION = 'COALESCE(k.key_version, r.key_version)';

/** A record's current DEK version and envelope (its head row's head applied). */
export interface CurrentSealed {
  seq: number;
  id: string;
  keyVersion: number;
  sealed: Envelope;
}

/**
 * Reads records of `table` with their current version and envelope, in one statement:
 * `where` is a condition over `r` with `?` placeholders (e.g. `r.seq = ?`).
 * @throws RecordOpenError('malformed') if a head row does not fit its record.
 */
export async function readCurrentSealed(
  h: StoreHandle,
  t: Transaction,
  table: SealedTable,
  where: string,
  params: readonly unknown[],
): Promise<CurrentSealed[]> {
  const rows = await h.raw<{
    seq: number;
    id: string;
    keyVersion: number;
    sealed: Envelope;
    head: Envelope | null;
  }>(
    t,
    `SELECT r.seq, r.id, ${CURRENT_VERSION} AS "keyVersion", r.sealed, k.head
     FROM ${withHeads(h, table)} WHERE ${where} ORDER BY r.seq`,
    params,
  );
  return rows.map((r) => ({
    seq: r.seq,
    id: r.id,
    keyVersion: r.keyVersion,
    sealed:
      r.head === null
        ? r.sealed
        : withHead(r.sealed, r.head, { tenant: h.tenant, table, recordId: r.id }),
  }));
}

/** Current DEK versions of the records `seqs` of `table` (for metadata listings). */
export async function currentVersions(
  h: StoreHandle,
  t: Transaction,
  table: SealedTable,
  seqs: readonly number[],
): Promise<Map<number, number>> {
  const versions = new Map<number, number>();
  for (let i = 0; i < seqs.length; i += 500) {
    const slice = seqs.slice(i, i + 500);
    const rows = await h.raw<{ seq: number; keyVersion: number }>(
      t,
      `SELECT r.seq, ${CURRENT_VERSION} AS "keyVersion" FROM ${withHeads(h, table)}
       WHERE r.seq IN (${slice.map(() => '?').join(',')})`,
      slice,
    );
    for (const r of rows) {
      versions.set(r.seq, r.keyVersion);
    }
  }
  return versions;
}

/**
 * Records of both sealed tables: what a rotation has to move, since no record can be under the
 * version it has just created (version numbers are never reused). A plain count, no join: it
 * runs inside the rotation's write transaction.
 */
export async function countRecords(h: StoreHandle, t: Transaction): Promise<number> {
  let total = 0;
  for (const table of SEALED_TABLES) {
    const [row] = await h.raw<{ n: number | string }>(
      t,
      `SELECT COUNT(*) AS n FROM ${h.qualified(table)}`,
      [],
    );
    total += Number(row?.n ?? 0);
  }
  return total;
}

/** Is any record under `version`? (Index seeks, not counts.) */
export async function isVersionUsed(
  h: StoreHandle,
  t: Transaction,
  version: number,
): Promise<boolean> {
  for (const table of SEALED_TABLES) {
    const viaHead = await h.raw(
      t,
      `SELECT 1 AS x FROM ${h.qualified(HEAD_TABLES[table])} WHERE key_version = ? LIMIT 1`,
      [version],
    );
    if (viaHead.length > 0) {
      return true;
    }
    const own = await h.raw(
      t,
      `SELECT 1 AS x FROM ${withHeads(h, table)} WHERE r.key_version = ? AND k.seq IS NULL LIMIT 1`,
      [version],
    );
    if (own.length > 0) {
      return true;
    }
  }
  return false;
}

/** Records (invocations + feedback) per current DEK version. */
export async function usageByVersion(h: StoreHandle, t: Transaction): Promise<Map<number, number>> {
  const usage = new Map<number, number>();
  for (const table of SEALED_TABLES) {
    const rows = await h.raw<{ v: number; n: number | string }>(
      t,
      `SELECT ${CURRENT_VERSION} AS v, COUNT(*) AS n FROM ${withHeads(h, table)}
       GROUP BY ${CURRENT_VERSION}`,
      [],
    );
    for (const r of rows) {
      usage.set(r.v, (usage.get(r.v) ?? 0) + Number(r.n));
    }
  }
  return usage;
}
