/**
 * The TenantStore facade: invocation records, feedback, the audit chain and key management of
 * one tenant. Every method borrows the tenant's handle from the region's LRU for the duration
 * of the call, so a facade stays valid across handle evictions.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { Op, UniqueConstraintError } from 'sequelize';
import type { Transaction, WhereOptions } from 'sequelize';
import { ConflictError, InvalidInputError, NotFoundError } from '../errors.ts';
import { appendAudit, appendAuditInTx, auditHead, listAudit, verifyAudit } from './audit-chain.ts';
import {
  dekVersions,
  dropIfStale,
  getDek,
  identified,
  isKeyOf,
  primaryDek,
  primarySealingKey,
} from './dek-ring.ts';
import type { IdentifiedKey, KeyContext } from './dek-ring.ts';
import { KeyUnavailableError, RecordOpenError, WrapLimitError } from './errors.ts';
import { canonicalJson, GENESIS_HASH } from './hash-chain.ts';
import type { ChainVerification } from './hash-chain.ts';
import { RECORD_ID_PATTERN } from './ids.ts';
import { createJobOwnerId } from './job-lease.ts';
import { HEAD_TABLES, TABLES } from './models.ts';
import type { FeedbackRow, InvocationRow, SealedTable } from './models.ts';
import { openRecord, sealRecordAs } from './record-cipher.ts';
import type { Envelope } from './record-cipher.ts';
import { currentVersions, readCurrentSealed } from './record-heads.ts';
import type { CurrentSealed } from './record-heads.ts';
import type { PrimaryDek, StoreHandle } from './store-backend.ts';
import type {
  FeedbackInput,
  FeedbackRecord,
  FeedbackRefusal,
  FeedbackSummary,
  FeedbackSummaryQuery,
  FeedbackSummaryRow,
  InvocationRecord,
  InvocationSecret,
  InvocationSummary,
  JobInfo,
  PurgeOptions,
  PurgeProgress,
  PurgeResult,
  SaveFeedbackResult,
  TenantStore,
} from './types.ts';
import { instant, validateFeedback, validateInvocation, validateQuery } from './validation.ts';
import type { ValidInvocation } from './validation.ts';
import { DEFAULT_WRAP_LIMITS, reserveWraps } from './wrap-limit.ts';
import type { WrapLimits } from './wrap-limit.ts';

/** What a facade needs from its region. */
export interface RegionContext extends KeyContext {
  region: string;
  /** Borrows the tenant's open handle (opening, and with provision creating, it) for `fn`. */
  use<T>(
    tenant: string,
    fn: (h: StoreHandle) => Promise<T>,
    opts?: { provision?: boolean },
  ): Promise<T>;
  rotateDek(
    tenant: string,
    opts: {
      emergency: boolean;
      actor?: string;
      /** Recorded in `key.rotate` (`wrap_limit`: started at the soft wrap limit). */
      reason?: 'wrap_limit';
      /** Refuse (ConflictError) unless this version is still the primary one. */
      onlyIfPrimary?: number;
    },
  ): Promise<JobInfo>;
  /**
   * After a committed write that sealed under `key` (its number and DEK row `created_at`), its
   * wrap count (wrap-limit.ts).
   */
  wrapsCommitted?: (
    tenant: string,
    key: { version: number; createdAt: string },
    count: number,
  ) => void;
  /** A write was refused at the hard wrap limit. */
  wrapsRefused?: (tenant: string, err: WrapLimitError) => void;
  /** Told each committed record write's seconds from the call to the commit (never throws). */
  recordWritten?: (record: 'invocation' | 'feedback', seconds: number) => void;
  /** The region's job lease (`jobLeaseMs`), the least a purge batch's lease lasts. */
  leaseMs?: number;
}

const MAX_RETRIES = 5;

/** `keyVersion`: the version the record is under now, if a head row says other than the row. */
function toSummary(row: InvocationRow, keyVersion = row.keyVersion): InvocationSummary {
  return {
    id: row.id,
    time: row.time,
    service: row.service,
    hook: row.hook,
    hookInstance: row.hookInstance,
    pack: { id: row.packId, version: row.packVersion, hash: row.packHash },
    cardUuids: JSON.parse(row.cardUuids) as string[],
    suggestionUuids: JSON.parse(row.suggestionUuids) as string[],
    keyVersion,
  };
}

/**
 * A stored JSON list of ids (suggestion uuids). Written by this store, so anything else is a
 * damaged row: refused (the feedback is not checked against a list it cannot read).
 */
function storedIds(json: string): string[] {
  const ids: unknown = JSON.parse(json);
  if (!Array.isArray(ids) || !ids.every((x): x is string => typeof x === 'string')) {
    throw new Error('a stored suggestion list is not a JSON array of ids');
  }
  return ids;
}

/** What identifies a feedback report, apart from its override reason. */
function feedbackIdentity(item: FeedbackInput): Record<string, unknown> {
  return {
    card: item.card,
    outcome: item.outcome,
    outcomeTimestamp: instant(item.outcomeTimestamp, 'outcomeTimestamp'),
    // A set: the order in which the EHR lists the accepted suggestions says nothing.
    suggestions: [...new Set((item.acceptedSuggestions ?? []).map((s) => s.id))].sort(),
  };
}

/**
 * Reports with one identity (card, outcome, instant, accepted suggestions) but different
 * override reasons a store keeps apart; a further different one is taken for a repeat.
 */
const MAX_REASON_VARIANTS = 16;

const sha256Hex = (value: unknown) =>
  crypto.createHash('sha256').update(canonicalJson(value)).digest('hex');

/**
 * The ids a feedback report may be stored under, in order: the id of its identity (the one
 * every release has used: a report with no other of its identity stored keeps it, so replicas
 * of an older release still see its repeats), then one per further report of that identity
 * with another override reason. The reason is never hashed into an id: ids are stored in
 * clear and the reason only sealed (its hash could be checked against the card's few offered
 * reasons). Which id a report has is decided by opening the stored ones (saveFeedback).
 */
function feedbackIdChain(item: FeedbackInput): string[] {
  const identity = feedbackIdentity(item);
  return Array.from({ length: MAX_REASON_VARIANTS }, (_, k) =>
    sha256Hex(k === 0 ? identity : { ...identity, variant: k + 1 }),
  );
}

/**
 * The override reason code of `item` to store in clear (`system|code`): only when it overrides
 * with a code its card offered, which is pack metadata. Anything else the EHR sent (another
 * code, a display, a comment) may be the clinician's own words: sealed only, never in clear.
 */
function offeredReasonCode(
  item: FeedbackInput,
  offered: ReadonlySet<string> | undefined,
): string | null {
  const reason = item.overrideReason?.reason;
  if (item.outcome !== 'overridden' || reason === undefined) {
    return null;
  }
  const code = `${reason.system}|${reason.code}`;
  return offered?.has(code) === true ? code : null;
}

/** An override reason (or none) compared as canonical JSON. */
function reasonKey(item: FeedbackInput): string {
  return canonicalJson(item.overrideReason ?? null);
}

/**
 * Opens a record (its current envelope, record-heads.ts). If the record's DEK version was
 * destroyed between reading it and unwrapping (a rewrap finished meanwhile), the record is read
 * again: it is under a newer version. If it fails authentication with a cached key that is not
 * the key of its version's current row (another process re-created that version number: a
 * deprovision + re-provision, a restore + rotation), the stale key is dropped and the record
 * opened once more with the row's own. Returns the plaintext and the version that opened it.
 */
async function openCurrent(
  h: StoreHandle,
  ctx: KeyContext,
  table: SealedTable,
  row: CurrentSealed,
): Promise<{ plain: Buffer; keyVersion: number }> {
  let current = row;
  let checkedCache = false;
  for (let attempt = 0; ; attempt += 1) {
    let used: { version: number; key: KeyObject } | undefined;
    try {
      const plain = await openRecord(
        current.sealed,
        { tenant: h.tenant, table, recordId: current.id },
        async (v) => {
          const key = await getDek(h, ctx, v);
          used = { version: v, key };
          return key;
        },
      );
      return { plain, keyVersion: current.keyVersion };
    } catch (err) {
      if (
        err instanceof RecordOpenError &&
        err.reason === 'authentication_failed' &&
        used &&
        !checkedCache
      ) {
        checkedCache = true; // one SELECT, and an unwrap only if the cached key was stale
        if (await dropIfStale(h, used.version, used.key)) {
          continue;
        }
      }
      const retry =
        err instanceof RecordOpenError &&
        err.reason === 'key_unavailable' &&
        err.cause instanceof KeyUnavailableError &&
        err.cause.reason === 'dek_destroyed' &&
        attempt < 2;
      if (!retry) {
        throw err;
      }
      const seq = current.seq;
      const [again] = await h.readTx((t) => readCurrentSealed(h, t, table, 'r.seq = ?', [seq]));
      if (!again || again.keyVersion === current.keyVersion) {
        throw err;
      }
      current = again;
    }
  }
}

function parseJson(buf: Buffer, table: SealedTable, id: string): unknown {
  try {
    return JSON.parse(buf.toString('utf8'));
  } catch (err) {
    throw new RecordOpenError('malformed', table, id, err);
  } finally {
    buf.fill(0);
  }
}

/**
 * The primary DEK version each open handle last saw: the hook path seals under it without a
 * SELECT first. It is only a hint: the write checks the version AND the identity of the key
 * used (the DEK row's created_at, dek-ring.ts), and a stale one costs a re-seal under a key
 * read from the primary row again (primarySealingKey drops a cached key of the same number
 * that is not that row's). Rotation is rare.
 */
const primaryHint = new WeakMap<StoreHandle, number>();

async function sealingKeyFor(h: StoreHandle, ctx: KeyContext): Promise<IdentifiedKey> {
  const hinted = primaryHint.get(h);
  if (hinted !== undefined) {
    try {
      return await identified(h, ctx, hinted);
    } catch (err) {
      if (!(err instanceof KeyUnavailableError)) {
        throw err;
      }
      primaryHint.delete(h); // destroyed meanwhile: ask the store
    }
  }
  const key = await primarySealingKey(h, ctx);
  primaryHint.set(h, key.version);
  return key;
}

/** An invocation row sealed and waiting for its batch. */
interface PendingInvocation {
  row: Omit<InvocationRow, 'seq'>;
  /** The identity (DEK row created_at) of the key `row` is sealed with. */
  keyCreatedAt: string;
  cardUuids: readonly string[];
  /** Each card's suggestion uuids, in the order of `cardUuids`; undefined: not known. */
  cardSuggestionUuids: ReadonlyArray<readonly string[]> | undefined;
  /** Each card's rule and offered override codes, in the order of `cardUuids`; or undefined. */
  cardRules: ValidInvocation['cardRules'];
  resolve: (outcome: Written) => void;
  reject: (err: unknown) => void;
}

/**
 * A row's batch outcome: `saved` with the primary version's wrap count after the batch (or a
 * lower value: SQLite reads it per row), or `stale` (sealed under a key that is not the primary
 * row's, or, SQLite, refused because the batch would pass the hard wrap limit).
 */
type Written = { outcome: 'saved'; wraps: number } | { outcome: 'stale'; batch: number };
const STALE: Written = { outcome: 'stale', batch: 1 };

/**
 * Most rows per batch: 16 parameters each (SQLite: the 15 columns and the key's identity), and
 * 2 more, stays far below every driver's limit and within a kept statement's budget (1,024).
 */
const MAX_BATCH = 63;
/** Card links per INSERT on PostgreSQL: 7 parameters each, 63,000 in all (the limit: 65,535). */
const LINKS_PER_INSERT = 9000;

/** In the order of invocationParams. */
const INVOCATION_COLUMN_NAMES = [
  'id',
  'time',
  'service',
  'hook',
  'hook_instance',
  'pack_id',
  'pack_version',
  'pack_hash',
  'card_uuids',
  'suggestion_uuids',
  'card_suggestion_uuids',
  'card_rules',
  'key_version',
  'sealed',
  'created_at',
] as const;
const INVOCATION_COLUMNS = `(${INVOCATION_COLUMN_NAMES.join(', ')})`;
const INVOCATION_PLACEHOLDERS = `(${INVOCATION_COLUMN_NAMES.map(() => '?').join(', ')})`;
/**
 * SQLite names the columns of `VALUES` column1, column2, ...: the 15 columns, then the identity
 * of the key the row is sealed with (not inserted, compared with the primary row's).
 */
const VALUES_COLUMNS = INVOCATION_COLUMN_NAMES.map((_, i) => `column${String(i + 1)}`).join(', ');
const VALUES_KEY_VERSION = `column${String(INVOCATION_COLUMN_NAMES.indexOf('key_version') + 1)}`;
const VALUES_KEY_CREATED_AT = `column${String(INVOCATION_COLUMN_NAMES.length + 1)}`;
const VALUES_PLACEHOLDERS = `(${[...INVOCATION_COLUMN_NAMES, 'identity'].map(() => '?').join(', ')})`;

function invocationParams(row: Omit<InvocationRow, 'seq'>): unknown[] {
  return [
    row.id,
    row.time,
    row.service,
    row.hook,
    row.hookInstance,
    row.packId,
    row.packVersion,
    row.packHash,
    row.cardUuids,
    row.suggestionUuids,
    row.cardSuggestionUuids,
    row.cardRules,
    row.keyVersion,
    row.sealed,
    row.createdAt,
  ];
}

/** Is `p` sealed with the key of the primary row `locked`? */
function isSealedUnder(locked: PrimaryDek | undefined, p: PendingInvocation): boolean {
  return isKeyOf(locked, { version: p.row.keyVersion, createdAt: p.keyCreatedAt });
}

/**
 * PostgreSQL: inserts `rows` in `t` after checking the primary DEK row (number and identity),
 * read and locked FOR NO KEY UPDATE at the start of the transaction (writeTx `{ primary: true }`, one
 * SELECT per transaction): rows sealed under another version or another key of that number
 * are left out and reported stale (their callers seal again), and a rotation by another
 * replica waits for this COMMIT. Raw statements, one multi-row INSERT per table
 * (see StoreHandle.raw).
 */
async function insertInvocations(
  h: StoreHandle,
  limits: WrapLimits,
  t: Transaction,
  rows: readonly PendingInvocation[],
): Promise<Written[]> {
  const locked = h.lockedPrimary(t);
  const fresh = rows.filter((p) => isSealedUnder(locked, p));
  let wraps = 0;
  if (fresh.length > 0) {
    // The primary row is locked: the count read with it is exact (wrap-limit.ts).
    wraps = reserveWraps(h, limits, t, fresh.length)?.count ?? 0;
    await h.raw(
      t,
      `INSERT INTO ${h.qualified(TABLES.invocations)} ${INVOCATION_COLUMNS} VALUES ${fresh
        .map(() => INVOCATION_PLACEHOLDERS)
        .join(', ')}`,
      fresh.flatMap((p) => invocationParams(p.row)),
    );
    // Each link with its card's own suggestions, rule and offered override codes (null: not
    // known) and the pack version, as SQLite's link trigger.
    const links = fresh.flatMap((p) =>
      p.cardUuids.map((c, i) => {
        const own = p.cardSuggestionUuids?.[i];
        const rule = p.cardRules?.[i];
        return [
          c,
          p.row.id,
          own ? JSON.stringify(own) : null,
          rule?.ruleId ?? null,
          p.row.packId,
          p.row.packVersion,
          rule?.overrideReasons ? JSON.stringify(rule.overrideReasons) : null,
        ];
      }),
    );
    // In statements of LINKS_PER_INSERT at most: PostgreSQL binds at most 65,535 parameters
    // per statement, and a batch of 63 calls may carry thousands of cards.
    for (let i = 0; i < links.length; i += LINKS_PER_INSERT) {
      const chunk = links.slice(i, i + LINKS_PER_INSERT);
      await h.raw(
        t,
        `INSERT INTO ${h.qualified(TABLES.invocationCards)} (card_uuid, invocation_id, suggestion_uuids, rule_id, pack_id, pack_version, override_codes) VALUES ${chunk
          .map(() => '(?, ?, ?, ?, ?, ?, ?)')
          .join(', ')}`,
        chunk.flat(),
      );
    }
  }
  return rows.map((p) => (isSealedUnder(locked, p) ? { outcome: 'saved', wraps } : STALE));
}

/**
 * SQLite: the batch as one autocommit statement on the store's writer (StoreHandle.
 * writeStatement), one thread-pool trip instead of five (BEGIN, the primary version, two
 * INSERTs, COMMIT; each trip waits for a free thread and then for the event loop, 2.5-3 ms
 * apiece under load). Rows sealed with the primary DEK row's key (its version and identity)
 * are inserted, the writer's TEMP trigger links their card uuids, RETURNING names them; the
 * others are reported stale. One statement is atomic under SQLite's single-writer lock (in
 * every process on the file): no rotation can commit between the check and the insert.
 */
async function insertInvocationsAutocommit(
  h: StoreHandle,
  limits: WrapLimits,
  write: NonNullable<StoreHandle['writeStatement']>,
  rows: readonly PendingInvocation[],
): Promise<Written[]> {
  // The primary row must also have room for the batch below the hard wrap limit (else the
  // rows come back stale and saveInvocation finds why). The store's trigger counts each row;
  // RETURNING reads the count before the row's own increment, hence + 1.
  const deks = h.qualified(TABLES.deks);
  const stored = await write<{ id: string; wraps: number | string }>(
    `INSERT INTO ${h.qualified(TABLES.invocations)} ${INVOCATION_COLUMNS}
     SELECT ${VALUES_COLUMNS} FROM (VALUES ${rows.map(() => VALUES_PLACEHOLDERS).join(', ')})
     WHERE (${VALUES_KEY_VERSION}, ${VALUES_KEY_CREATED_AT}) = (SELECT version, created_at
       FROM ${deks} WHERE status = 'primary' AND wrap_count + ? <= ?)
     RETURNING id, (SELECT wrap_count FROM ${deks} WHERE version = key_version) + 1 AS wraps`,
    [
      ...rows.flatMap((p) => [...invocationParams(p.row), p.keyCreatedAt]),
      rows.length,
      limits.hard,
    ],
  );
  const wraps = Math.max(0, ...stored.map((r) => Number(r.wraps)));
  const saved = new Set(stored.map((r) => r.id));
  const stale: Written = { outcome: 'stale', batch: rows.length };
  return rows.map((p): Written => (saved.has(p.row.id) ? { outcome: 'saved', wraps } : stale));
}

/**
 * Hook-path record writes of one open store, batched: rows that arrive while a batch is being
 * written go together in the next one (one statement on SQLite, one transaction with one
 * multi-row INSERT per table on PostgreSQL), so the cost per record stops growing with the
 * statements' round trips. Every caller still waits for the commit of its own row. A batch
 * refused by a unique constraint is rolled back and its rows written one at a time, so only
 * the duplicate fails.
 */
function createInvocationBatcher(
  h: StoreHandle,
  limits: WrapLimits,
): (p: PendingInvocation) => void {
  const pending: PendingInvocation[] = [];
  let writing = false;
  const { writeStatement } = h;
  const write = (group: readonly PendingInvocation[]): Promise<Written[]> =>
    writeStatement
      ? insertInvocationsAutocommit(h, limits, writeStatement, group)
      : h.writeTx((t) => insertInvocations(h, limits, t, group), { primary: true });

  const settle = (group: readonly PendingInvocation[], outcomes: readonly Written[]): void => {
    group.forEach((p, k) => {
      p.resolve(outcomes[k] ?? STALE);
    });
  };

  async function writeOneByOne(group: readonly PendingInvocation[]): Promise<void> {
    for (const p of group) {
      try {
        const [outcome] = await write([p]);
        p.resolve(outcome ?? STALE);
      } catch (err) {
        p.reject(
          err instanceof UniqueConstraintError
            ? new ConflictError(`invocation ${p.row.id} or one of its card uuids is already stored`)
            : err,
        );
      }
    }
  }

  async function drain(): Promise<void> {
    writing = true;
    while (pending.length > 0) {
      const group = pending.splice(0, MAX_BATCH);
      try {
        settle(group, await write(group));
      } catch (err) {
        if (err instanceof UniqueConstraintError) {
          await writeOneByOne(group);
        } else {
          group.forEach((p) => {
            p.reject(err);
          });
        }
      }
    }
    writing = false;
  }

  return (p) => {
    pending.push(p);
    if (!writing) {
      void drain();
    }
  };
}

const batchers = new WeakMap<StoreHandle, (p: PendingInvocation) => void>();

function batcherOf(h: StoreHandle, limits: WrapLimits): (p: PendingInvocation) => void {
  let batcher = batchers.get(h);
  if (!batcher) {
    batcher = createInvocationBatcher(h, limits);
    batchers.set(h, batcher);
  }
  return batcher;
}

/**
 * The key a write of this store last found at its hard wrap limit (number and identity). Later
 * writes sealed under that key read the primary row first (one SELECT): still that key, still
 * without room, they are refused before sealing, so a refused write makes no encryption under
 * the exhausted DEK. Never trusted alone: the primary row says whether it still is.
 */
const exhausted = new WeakMap<StoreHandle, PrimaryDek>();

/** Remembers the key of a write refused at the hard wrap limit. */
function noteExhausted(h: StoreHandle, err: unknown): void {
  if (err instanceof WrapLimitError && err.createdAt !== undefined) {
    exhausted.set(h, { version: err.version, createdAt: err.createdAt });
  }
}

/** Whether `key` is the key a write of this store last found at its hard wrap limit. */
function isExhaustedKey(h: StoreHandle, key: IdentifiedKey): boolean {
  return isKeyOf(exhausted.get(h), key);
}

/**
 * Before sealing `n` records under `key` (the wraps the call needs): if it is the key found
 * exhausted, checks the primary row. A call that seals nothing (n = 0: a retry made only of
 * duplicates) is never refused here. Room for `n` does not clear the mark: the key is still
 * near its limit, and a larger call after this one checks again.
 * @returns true if the primary changed meanwhile (seal under the new one instead).
 * @throws WrapLimitError if the key is still the primary one and has no room for `n`.
 */
async function refuseIfExhausted(
  h: StoreHandle,
  key: IdentifiedKey,
  n: number,
  limits: WrapLimits,
): Promise<boolean> {
  if (!isExhaustedKey(h, key) || n === 0) {
    return false;
  }
  const primary = await primaryDek(h);
  if (isKeyOf(primary, key)) {
    const count = primary.wrapCount ?? 0;
    if (count + n > limits.hard) {
      throw new WrapLimitError(h.tenant, primary.version, count, limits.hard, primary.createdAt);
    }
    return false; // room for this write: it checks again when it writes
  }
  exhausted.delete(h);
  primaryHint.delete(h);
  return true;
}

async function saveInvocation(
  h: StoreHandle,
  ctx: RegionContext,
  v: Omit<ValidInvocation, 'secretJson'>,
  plaintext: Buffer,
): Promise<InvocationSummary> {
  const limits = ctx.wrapLimits ?? DEFAULT_WRAP_LIMITS;
  for (let attempt = 0; attempt < MAX_RETRIES; attempt += 1) {
    const key = await sealingKeyFor(h, ctx);
    if (await refuseIfExhausted(h, key, 1, limits)) {
      continue;
    }
    const row = {
      id: v.id,
      time: v.time,
      service: v.service,
      hook: v.hook,
      hookInstance: v.hookInstance,
      packId: v.pack.id,
      packVersion: v.pack.version,
      packHash: v.pack.hash,
      cardUuids: JSON.stringify(v.cardUuids),
      suggestionUuids: JSON.stringify(v.suggestionUuids),
      cardSuggestionUuids:
        v.cardSuggestionUuids !== undefined ? JSON.stringify(v.cardSuggestionUuids) : null,
      // Short member names: the SQLite link trigger reads them per card (`$[i].r`, `$[i].o`).
      cardRules:
        v.cardRules !== undefined
          ? JSON.stringify(
              v.cardRules.map((r) => ({
                r: r.ruleId,
                ...(r.overrideReasons && r.overrideReasons.length > 0
                  ? { o: r.overrideReasons }
                  : {}),
              })),
            )
          : null,
      keyVersion: key.version,
      sealed: sealRecordAs(
        h.envelopeForm,
        key,
        { tenant: h.tenant, table: 'invocations', recordId: v.id },
        plaintext,
      ),
      createdAt: ctx.now().toISOString(),
    };
    const written = await new Promise<Written>((resolve, reject) => {
      batcherOf(
        h,
        limits,
      )({
        row,
        keyCreatedAt: key.createdAt,
        cardUuids: v.cardUuids,
        cardSuggestionUuids: v.cardSuggestionUuids,
        cardRules: v.cardRules,
        resolve,
        reject,
      });
    });
    if (written.outcome === 'saved') {
      ctx.wrapsCommitted?.(
        h.tenant,
        { version: key.version, createdAt: key.createdAt },
        written.wraps,
      );
      return toSummary({ ...row, seq: 0 });
    }
    // Rotated meanwhile, or the key was another of the same version number: seal again under
    // the key of the primary row, read again (primarySealingKey drops a stale cached key).
    // SQLite also answers stale when the primary has no room left for the batch below its
    // hard wrap limit: sealed under the primary's own key, yet refused. A batch that would
    // pass the limit is refused whole (PostgreSQL: reserveWraps throws for it).
    primaryHint.delete(h);
    if (h.writeStatement) {
      const primary = await primaryDek(h);
      const count = primary.wrapCount ?? 0;
      if (isKeyOf(primary, key) && count + written.batch > limits.hard) {
        throw new WrapLimitError(h.tenant, primary.version, count, limits.hard, primary.createdAt);
      }
    }
  }
  throw new KeyUnavailableError('dek_destroyed', 'the primary DEK kept changing; try again');
}

async function readInvocation(
  h: StoreHandle,
  ctx: KeyContext,
  id: string,
  actor: string | undefined,
): Promise<InvocationRecord> {
  const row = await h.models.Invocation.findOne({
    where: { id },
    attributes: { exclude: ['sealed'] },
    raw: true,
  });
  if (!row) {
    throw new NotFoundError('invocation');
  }
  const audit = (
    outcome: 'success' | 'failure',
    detail: Record<string, string | number | boolean>,
  ) =>
    appendAudit(
      h,
      {
        type: 'record.read',
        outcome,
        ...(actor !== undefined ? { actor } : {}),
        detail: { invocation: id, ...detail },
      },
      ctx.now,
    );
  try {
    // The record and its feedback as they are now, heads applied, in one snapshot.
    const { sealedRow, feedbackRows, sealedFeedback } = await h.readTx(async (t) => ({
      sealedRow: await readCurrentSealed(h, t, 'invocations', 'r.seq = ?', [row.seq]),
      feedbackRows: await h.models.Feedback.findAll({
        where: { invocationId: id },
        attributes: { exclude: ['sealed'] },
        order: [['seq', 'ASC']],
        raw: true,
        transaction: t,
      }),
      sealedFeedback: await readCurrentSealed(h, t, 'feedback', 'r.invocation_id = ?', [id]),
    }));
    const current = sealedRow[0];
    if (!current) {
      throw new NotFoundError('invocation');
    }
    const opened = await openCurrent(h, ctx, 'invocations', current);
    const secret = parseJson(opened.plain, 'invocations', row.id) as InvocationSecret;
    const sealedBySeq = new Map(sealedFeedback.map((f) => [f.seq, f]));
    const feedback: FeedbackRecord[] = [];
    for (const f of feedbackRows) {
      const sealed = sealedBySeq.get(f.seq);
      if (!sealed) {
        throw new Error('a feedback row without its sealed part in the same snapshot');
      }
      const item = await openCurrent(h, ctx, 'feedback', sealed);
      feedback.push(
        toFeedbackRecord(
          f,
          parseJson(item.plain, 'feedback', f.id) as FeedbackInput,
          item.keyVersion,
        ),
      );
    }
    await audit('success', { feedback: feedback.length });
    return { ...toSummary(row, opened.keyVersion), secret, feedback };
  } catch (err) {
    const reason = err instanceof RecordOpenError ? err.reason : 'error';
    await audit('failure', { reason }).catch(() => undefined);
    throw err;
  }
}

function toFeedbackRecord(
  row: FeedbackRow,
  item: FeedbackInput,
  keyVersion = row.keyVersion,
): FeedbackRecord {
  return {
    id: row.id,
    invocationId: row.invocationId,
    service: row.service,
    card: row.cardUuid,
    outcome: row.outcome as FeedbackRecord['outcome'],
    receivedAt: row.receivedAt,
    keyVersion,
    item,
  };
}

/**
 * Checks each item against this tenant's cards of `service` in `t`: the id of the invocation
 * that sent its card, or why it is refused (a card never sent by this service to this tenant,
 * or an accepted suggestion the card never offered). With `offered`, fills it with the override
 * reason codes each known card offered (schema 6; none for links written before).
 */
async function checkFeedbackCards(
  h: StoreHandle,
  t: Transaction,
  items: readonly FeedbackInput[],
  service: string,
  offered?: Map<string, ReadonlySet<string>>,
): Promise<Array<string | FeedbackRefusal>> {
  const known = new Map<string, { invocation: string; suggestions: ReadonlySet<string> }>();
  for (const card of new Set(items.map((i) => i.card))) {
    const link = await h.models.InvocationCard.findByPk(card, { transaction: t, raw: true });
    const inv = link
      ? await h.models.Invocation.findOne({
          where: { id: link.invocationId },
          attributes: ['id', 'service', 'suggestionUuids'],
          transaction: t,
          raw: true,
        })
      : null;
    // Another tenant's card is not in this store: refused as one never sent (nothing leaks).
    if (link && inv && inv.service === service) {
      known.set(card, {
        invocation: inv.id,
        // The card's own suggestions (CDS Hooks 2.0: acceptedSuggestions are suggestions of
        // that card). A link written before schema 5 does not know them: the invocation's.
        suggestions: new Set(storedIds(link.suggestionUuids ?? inv.suggestionUuids)),
      });
      offered?.set(card, new Set(link.overrideCodes !== null ? storedIds(link.overrideCodes) : []));
    }
  }
  return items.map((item, index): string | FeedbackRefusal => {
    const card = known.get(item.card);
    if (!card) {
      return { index, what: 'card' };
    }
    const j = (item.acceptedSuggestions ?? []).findIndex((s) => !card.suggestions.has(s.id));
    return j >= 0 ? { index, what: 'suggestion', suggestion: j } : card.invocation;
  });
}

async function saveFeedback(
  h: StoreHandle,
  ctx: RegionContext,
  items: FeedbackInput[],
  service: string,
  partial: boolean,
): Promise<SaveFeedbackResult> {
  const limits = ctx.wrapLimits ?? DEFAULT_WRAP_LIMITS;
  const chains = items.map(feedbackIdChain);
  const reasons = items.map(reasonKey);
  for (let attempt = 0; attempt < MAX_RETRIES; attempt += 1) {
    const key = await primarySealingKey(h, ctx);
    // Which items are refused and which stored already, in one snapshot: only the others are
    // sealed (each sealing is an encryption under the DEK, counted only when its row is
    // written), and the check under a key found exhausted asks room for them all (a retry
    // made only of repeats needs none). The write checks it all again.
    const before = await h.readTx(async (t) => {
      const verdicts = await checkFeedbackCards(h, t, items, service);
      const candidates = [
        ...new Set(chains.flatMap((chain, i) => (typeof verdicts[i] === 'string' ? chain : []))),
      ];
      const sealed =
        candidates.length === 0
          ? []
          : await readCurrentSealed(
              h,
              t,
              'feedback',
              `r.id IN (${candidates.map(() => '?').join(', ')})`,
              candidates,
            );
      return { verdicts, sealed };
    });
    const firstRefused = before.verdicts.find((v) => typeof v !== 'string');
    if (!partial && firstRefused !== undefined) {
      throw new NotFoundError(firstRefused.what);
    }
    // The override reason of each stored report of these identities (opened: it is sealed).
    const storedReason = new Map<string, string>();
    for (const row of before.sealed) {
      const opened = await openCurrent(h, ctx, 'feedback', row);
      storedReason.set(
        row.id,
        reasonKey(parseJson(opened.plain, 'feedback', row.id) as FeedbackInput),
      );
    }
    // The id each item is (or will be) stored under: a stored report of its identity with the
    // same reason (a repeat), else the first id of its chain that no other report holds.
    const claimed = new Map<string, string>();
    const effective = items.map((_, i) => {
      const chain = chains[i] ?? [];
      const reason = reasons[i] ?? '';
      for (const fid of chain) {
        const holder = storedReason.get(fid) ?? claimed.get(fid);
        if (holder === undefined) {
          claimed.set(fid, reason);
          return fid;
        }
        if (holder === reason) {
          return fid;
        }
      }
      return chain[0] ?? ''; // MAX_REASON_VARIANTS reasons stored already: a repeat
    });
    const present = new Set(storedReason.keys());
    const have = new Set(effective.filter((fid) => present.has(fid)));
    const fresh = new Set(
      effective.filter((fid, i) => !have.has(fid) && typeof before.verdicts[i] === 'string'),
    );
    if (await refuseIfExhausted(h, key, fresh.size, limits)) {
      continue;
    }
    const sealedById = new Map<string, Envelope>();
    items.forEach((item, i) => {
      const fid = effective[i] ?? '';
      if (!sealedById.has(fid) && fresh.has(fid)) {
        const plaintext = Buffer.from(JSON.stringify(item), 'utf8');
        sealedById.set(
          fid,
          sealRecordAs(
            h.envelopeForm,
            key,
            { tenant: h.tenant, table: 'feedback', recordId: fid },
            plaintext,
          ),
        );
        plaintext.fill(0);
      }
    });
    // The primary row is locked for the transaction (WriteOptions.primary): a rotation by
    // another process waits for this COMMIT. Another version, or another key of this number
    // (primarySealingKey re-reads it on the next attempt): seal again.
    const result = await h.writeTx(
      async (t) => {
        if (!isKeyOf(h.lockedPrimary(t), key)) {
          return undefined;
        }
        // Items left unsealed as stored when looked up, gone since: seal again (nothing
        // written yet). One count for them all.
        if (
          have.size > 0 &&
          (await h.models.Feedback.count({ where: { id: [...have] }, transaction: t })) !==
            have.size
        ) {
          return undefined;
        }
        const offered = new Map<string, ReadonlySet<string>>();
        const verdicts = await checkFeedbackCards(h, t, items, service, offered);
        const refused = verdicts.filter((v): v is FeedbackRefusal => typeof v !== 'string');
        if (!partial && refused[0] !== undefined) {
          throw new NotFoundError(refused[0].what);
        }
        // Decide every item before writing any: a write that must be sealed again returns
        // with nothing written.
        const toWrite: Array<{ fid: string; invocation: string; item: FeedbackInput }> = [];
        let duplicates = 0;
        const seen = new Set<string>();
        for (const [i, item] of items.entries()) {
          const invocation = verdicts[i];
          if (typeof invocation !== 'string') {
            continue;
          }
          const fid = effective[i] ?? '';
          // `have` was counted present above.
          if (seen.has(fid) || have.has(fid)) {
            duplicates += 1;
            continue;
          }
          // Refused when looked up, not now (a restore meanwhile); or written since by another
          // call, maybe with another reason: look again (nothing written yet).
          if (
            !sealedById.has(fid) ||
            (await h.models.Feedback.count({ where: { id: fid }, transaction: t })) > 0
          ) {
            return undefined;
          }
          seen.add(fid);
          toWrite.push({ fid, invocation, item });
        }
        let wraps = 0;
        const receivedAt = ctx.now().toISOString();
        for (const { fid, invocation, item } of toWrite) {
          wraps = reserveWraps(h, limits, t, 1)?.count ?? wraps;
          await h.models.Feedback.create(
            {
              id: fid,
              invocationId: invocation,
              cardUuid: item.card,
              service,
              outcome: item.outcome,
              receivedAt,
              reasonCode: offeredReasonCode(item, offered.get(item.card)),
              keyVersion: key.version,
              sealed: sealedById.get(fid) ?? '',
            },
            { transaction: t },
          );
        }
        return { stored: toWrite.length, duplicates, refused, wraps };
      },
      { primary: true },
    );
    if (result) {
      if (result.stored > 0) {
        ctx.wrapsCommitted?.(
          h.tenant,
          { version: key.version, createdAt: key.createdAt },
          result.wraps,
        );
      }
      return {
        stored: result.stored,
        duplicates: result.duplicates,
        ...(partial ? { refused: result.refused } : {}),
        ids: effective,
      };
    }
  }
  throw new KeyUnavailableError('dek_destroyed', 'the primary DEK kept changing; try again');
}

// ---------------------------------------------------------------------------------------------
// Retention: purging records older than a cutoff ("Retention" in DATA-PLANE.md)
// ---------------------------------------------------------------------------------------------

/** Invocation records per purge batch (one write transaction each), by default and at most. */
export const DEFAULT_PURGE_BATCH = 200;
const MAX_PURGE_BATCH = 1000;
/**
 * How long a purge run's claim on the tenant holds without renewal, by default (the region's
 * `jobLeaseMs`). Every batch renews it from its own end, for at least twice the batch's length
 * (`purgeLeaseMs`): a run that died is taken over by the next run after this.
 */
export const PURGE_LEASE_MS = 60_000;
/** The longest lease a batch leaves (a dead run's tenant waits at most this long). */
const MAX_PURGE_LEASE_MS = 3_600_000;

/**
 * The lease a purge batch leaves, counted from its commit: `baseMs`, or twice the batch's own
 * length when that is longer (a store slow enough for a batch to outlast the lease is slow
 * between batches too), at most an hour. A lease counted from the batch's start used to be
 * over when a batch of more than `baseMs` committed: another replica waiting on the primary
 * row took over the live run and purged beside it.
 */
function purgeLeaseMs(baseMs: number, batchMs: number): number {
  return Math.min(MAX_PURGE_LEASE_MS, Math.max(baseMs, 2 * Math.max(0, batchMs)));
}
/** The `meta` row of the purge run in progress: its owner, lease and counts so far. */
const PURGE_META_KEY = 'purge.run';
/** Ids in one `IN (...)` list. */
const IN_CHUNK = 500;

/** The purge run in progress, as kept in `meta` (ids and counts only). */
interface PurgeRun {
  owner: string;
  /** The database's clock (ms) until which the owner holds the run. */
  untilMs: number;
  cutoff: string;
  invocations: number;
  feedback: number;
  batches: number;
}

/** The database's clock in milliseconds since the epoch (the same clock as job leases). */
function dbNowSql(h: StoreHandle): string {
  return h.dialect === 'postgres'
    ? `SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS "nowMs"`
    : `SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) AS "nowMs"`;
}

function parsePurgeRun(value: string | undefined): PurgeRun | undefined {
  if (value === undefined) {
    return undefined;
  }
  try {
    const run = JSON.parse(value) as Partial<PurgeRun>;
    const count = (n: unknown) =>
      typeof n === 'number' && Number.isSafeInteger(n) && n >= 0 ? n : 0;
    return {
      owner: typeof run.owner === 'string' ? run.owner : '',
      untilMs: typeof run.untilMs === 'number' ? run.untilMs : 0,
      cutoff: typeof run.cutoff === 'string' ? run.cutoff : '',
      invocations: count(run.invocations),
      feedback: count(run.feedback),
      batches: count(run.batches),
    };
  } catch {
    return undefined; // a damaged row: taken over as if expired, with no counts to carry
  }
}

async function runInChunks<T>(
  items: readonly T[],
  fn: (chunk: readonly T[]) => Promise<unknown>,
): Promise<void> {
  for (let i = 0; i < items.length; i += IN_CHUNK) {
    await fn(items.slice(i, i + IN_CHUNK));
  }
}

const marks = (n: number) => Array.from({ length: n }, () => '?').join(', ');

/** What one purge batch did. */
type PurgeBatch =
  | { kind: 'held' }
  | {
      kind: 'deleted';
      /** Invocation records this batch deleted. */
      deleted: number;
      /** The run's totals so far (with a carried run's). */
      invocations: number;
      feedback: number;
      done: boolean;
      carried?: PurgeRun;
    };

/**
 * One purge batch in its own write transaction, in the lock order of every write (primary DEK
 * row first: on PostgreSQL `FOR NO KEY UPDATE`, which a rewrap batch, a feedback write and
 * another replica's purge batch also take, so they take turns with this one; then `meta`, the
 * records and the audit head). Claims or renews the run's lease; deletes up to `limit` of the
 * oldest invocation records before the cutoff, with their feedback, card links and head rows;
 * when none is left, appends `records.purged` (if the run deleted anything) and ends the run.
 */
async function purgeBatch(
  h: StoreHandle,
  ctx: RegionContext,
  run: { owner: string; cutoff: string; limit: number; actor: string; retentionDays?: number },
): Promise<PurgeBatch> {
  return h.writeTx(
    async (t) => {
      const [clock] = await h.raw<{ nowMs: number | string }>(t, dbNowSql(h), []);
      const nowMs = Number(clock?.nowMs ?? 0);
      const [meta] = await h.raw<{ value: string }>(
        t,
        `SELECT value FROM ${h.qualified(TABLES.meta)} WHERE "key" = ?`,
        [PURGE_META_KEY],
      );
      const found = parsePurgeRun(meta?.value);
      if (found && found.owner !== run.owner && found.untilMs > nowMs) {
        return { kind: 'held' };
      }
      // Another run's counts that never reached the chain (it stopped, its lease expired).
      const carried = found && found.owner !== run.owner ? found : undefined;
      const mine = found && found.owner === run.owner ? found : undefined;
      const before = mine ?? {
        owner: run.owner,
        untilMs: 0,
        cutoff: run.cutoff,
        invocations: carried?.invocations ?? 0,
        feedback: carried?.feedback ?? 0,
        batches: carried?.batches ?? 0,
      };
      const victims = await h.raw<{ seq: number; id: string }>(
        t,
        `SELECT seq, id FROM ${h.qualified(TABLES.invocations)} WHERE time < ?
         ORDER BY time, seq LIMIT ?`,
        [run.cutoff, run.limit],
      );
      const seqs = victims.map((v) => v.seq);
      const ids = victims.map((v) => v.id);
      const feedbackSeqs: number[] = [];
      await runInChunks(ids, async (chunk) => {
        const rows = await h.raw<{ seq: number }>(
          t,
          `SELECT seq FROM ${h.qualified(TABLES.feedback)} WHERE invocation_id IN (${marks(chunk.length)})`,
          chunk,
        );
        feedbackSeqs.push(...rows.map((r) => r.seq));
      });
      // Heads first (a head never outlives its record), then the records and the card links.
      const remove = (table: string, column: string, values: readonly unknown[]) =>
        runInChunks(values, (chunk) =>
          h.raw(
            t,
            `DELETE FROM ${h.qualified(table)} WHERE ${column} IN (${marks(chunk.length)})`,
            chunk,
          ),
        );
      await remove(HEAD_TABLES.feedback, 'seq', feedbackSeqs);
      await remove(TABLES.feedback, 'seq', feedbackSeqs);
      await remove(HEAD_TABLES.invocations, 'seq', seqs);
      await remove(TABLES.invocationCards, 'invocation_id', ids);
      await remove(TABLES.invocations, 'seq', seqs);
      // The lease runs from now, the batch's end (see purgeLeaseMs), not from its start.
      const [end] = await h.raw<{ nowMs: number | string }>(t, dbNowSql(h), []);
      const endMs = Number(end?.nowMs ?? nowMs);
      const total: PurgeRun = {
        ...before,
        untilMs: endMs + purgeLeaseMs(ctx.leaseMs ?? PURGE_LEASE_MS, endMs - nowMs),
        invocations: before.invocations + seqs.length,
        feedback: before.feedback + feedbackSeqs.length,
        batches: before.batches + (seqs.length > 0 ? 1 : 0),
      };
      // A closing batch (limit 0, the run was stopped) deletes nothing and ends the run.
      const done = run.limit === 0 || seqs.length < run.limit;
      if (done) {
        if (total.invocations + total.feedback > 0) {
          await appendAuditInTx(
            h,
            t,
            {
              type: 'records.purged',
              outcome: 'success',
              actor: run.actor,
              detail: {
                cutoff: run.cutoff,
                invocations: total.invocations,
                feedback: total.feedback,
                batches: total.batches,
                ...(run.retentionDays !== undefined ? { retentionDays: run.retentionDays } : {}),
                ...(carried && carried.invocations + carried.feedback > 0
                  ? {
                      resumedInvocations: carried.invocations,
                      resumedFeedback: carried.feedback,
                    }
                  : {}),
              },
            },
            ctx.now(),
          );
        }
        if (meta !== undefined) {
          await h.raw(t, `DELETE FROM ${h.qualified(TABLES.meta)} WHERE "key" = ?`, [
            PURGE_META_KEY,
          ]);
        }
      } else {
        await h.raw(
          t,
          `INSERT INTO ${h.qualified(TABLES.meta)} ("key", value) VALUES (?, ?)
           ON CONFLICT ("key") DO UPDATE SET value = excluded.value`,
          [PURGE_META_KEY, JSON.stringify(total)],
        );
      }
      return {
        kind: 'deleted',
        deleted: seqs.length,
        invocations: total.invocations,
        feedback: total.feedback,
        done,
        ...(carried ? { carried } : {}),
      };
    },
    // Alone: after the primary row, this locks `meta` and then the audit head; in a group an
    // earlier write could hold the audit head first.
    { primary: true, alone: true },
  );
}

/** What a purge run would delete: invocation records before the cutoff and their feedback. */
async function countPurgeable(h: StoreHandle, cutoff: string): Promise<PurgeProgress> {
  return h.readTx(async (t) => {
    const [inv] = await h.raw<{ n: number | string }>(
      t,
      `SELECT COUNT(*) AS n FROM ${h.qualified(TABLES.invocations)} WHERE time < ?`,
      [cutoff],
    );
    const [fb] = await h.raw<{ n: number | string }>(
      t,
      `SELECT COUNT(*) AS n FROM ${h.qualified(TABLES.feedback)} f
       WHERE f.invocation_id IN (SELECT id FROM ${h.qualified(TABLES.invocations)} WHERE time < ?)`,
      [cutoff],
    );
    return { invocations: Number(inv?.n ?? 0), feedback: Number(fb?.n ?? 0), batches: 0 };
  });
}

function validatePurge(opts: PurgeOptions): { cutoff: string; limit: number } {
  if (typeof opts !== 'object' || (opts as unknown) === null) {
    throw new InvalidInputError('options', 'must be an object');
  }
  const cutoff = instant(opts.before, 'before');
  const limit = opts.batchSize ?? DEFAULT_PURGE_BATCH;
  if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PURGE_BATCH) {
    throw new InvalidInputError(
      'batchSize',
      `must be an integer from 1 to ${String(MAX_PURGE_BATCH)}`,
    );
  }
  return { cutoff, limit };
}

async function purgeRecords(
  h: StoreHandle,
  ctx: RegionContext,
  opts: PurgeOptions,
  valid: { cutoff: string; limit: number },
): Promise<PurgeResult> {
  const base = { tenant: h.tenant, cutoff: valid.cutoff };
  if (opts.dryRun === true) {
    return { ...base, dryRun: true, ...(await countPurgeable(h, valid.cutoff)) };
  }
  // One owner per run: two runs of one process exclude each other as two replicas' do.
  const run = {
    owner: createJobOwnerId(),
    cutoff: valid.cutoff,
    limit: valid.limit,
    actor: opts.actor ?? 'system',
    ...(opts.retentionDays !== undefined ? { retentionDays: opts.retentionDays } : {}),
  };
  let resumed: PurgeRun | undefined;
  let batches = 0;
  for (;;) {
    const stopping = opts.signal?.aborted === true;
    const batch = await purgeBatch(h, ctx, stopping ? { ...run, limit: 0 } : run);
    if (batch.kind === 'held') {
      return {
        ...base,
        dryRun: false,
        invocations: 0,
        feedback: 0,
        batches: 0,
        skipped: 'running_elsewhere',
      };
    }
    resumed ??= batch.carried;
    batches += batch.deleted > 0 ? 1 : 0;
    const progress: PurgeProgress = {
      invocations: batch.invocations - (resumed?.invocations ?? 0),
      feedback: batch.feedback - (resumed?.feedback ?? 0),
      batches,
    };
    if (batch.done) {
      return {
        ...base,
        dryRun: false,
        ...progress,
        ...(stopping ? { stopped: true } : {}),
        ...(resumed && resumed.invocations + resumed.feedback > 0
          ? { resumed: { invocations: resumed.invocations, feedback: resumed.feedback } }
          : {}),
      };
    }
    try {
      opts.onProgress?.(progress);
    } catch {
      // a progress listener's fault is not the purge's
    }
    // Hook-path writes queued behind this batch go first.
    await new Promise<void>((resolve) => {
      setImmediate(resolve);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Override rates: a report over clear columns only (no record opened, no key used)
// ---------------------------------------------------------------------------------------------

/** The window of `feedbackSummary` when none is given. */
const SUMMARY_DEFAULT_DAYS = 30;

/** @throws InvalidInputError naming `since` or `until`. */
function validateSummaryQuery(
  query: FeedbackSummaryQuery,
  now: Date,
): { since: string; until: string } {
  const raw: unknown = query;
  if (typeof raw !== 'object' || raw === null) {
    throw new InvalidInputError('query', 'must be an object');
  }
  const until = query.until !== undefined ? instant(query.until, 'until') : now.toISOString();
  const since =
    query.since !== undefined
      ? instant(query.since, 'since')
      : new Date(Date.parse(until) - SUMMARY_DEFAULT_DAYS * 86_400_000).toISOString();
  if (since >= until) {
    throw new InvalidInputError('since', 'must be before until');
  }
  return { since, until };
}

/**
 * Cards shown from `since` (inclusive) to `until` (exclusive), by their invocation's time, per
 * pack, version and rule (links written before schema 6: the invocation's pack version and no
 * rule), with the cards that got accepted and overridden feedback and the overridden ones per
 * offered reason code. Three aggregate SELECTs in one snapshot over clear columns: no `sealed`
 * column is read and no key is touched.
 */
async function feedbackSummary(
  h: StoreHandle,
  window: { since: string; until: string },
): Promise<FeedbackSummary> {
  const inv = h.qualified(TABLES.invocations);
  const cards = h.qualified(TABLES.invocationCards);
  const fb = h.qualified(TABLES.feedback);
  const group = `COALESCE(c.pack_id, i.pack_id) AS "packId",
    COALESCE(c.pack_version, i.pack_version) AS "packVersion", c.rule_id AS "ruleId"`;
  const from = `FROM ${inv} i JOIN ${cards} c ON c.invocation_id = i.id`;
  const withFeedback = `${from} JOIN ${fb} f ON f.invocation_id = i.id AND f.card_uuid = c.card_uuid`;
  const inWindow = 'i.time >= ? AND i.time < ?';
  const params = [window.since, window.until];
  type Key = { packId: string; packVersion: string; ruleId: string | null };
  type Counted = Key & { n: number | string };
  const { shown, outcomes, reasons } = await h.readTx(async (t) => ({
    shown: await h.raw<Counted>(
      t,
      `SELECT ${group}, COUNT(*) AS n ${from} WHERE ${inWindow} GROUP BY 1, 2, 3`,
      params,
    ),
    outcomes: await h.raw<Counted & { outcome: string }>(
      t,
      `SELECT ${group}, f.outcome AS outcome, COUNT(DISTINCT c.card_uuid) AS n ${withFeedback}
       WHERE ${inWindow} GROUP BY 1, 2, 3, 4`,
      params,
    ),
    reasons: await h.raw<Counted & { code: string }>(
      t,
      `SELECT ${group}, f.reason_code AS code, COUNT(DISTINCT c.card_uuid) AS n ${withFeedback}
       WHERE ${inWindow} AND f.outcome = 'overridden' AND f.reason_code IS NOT NULL
       GROUP BY 1, 2, 3, 4`,
      params,
    ),
  }));
  const keyOf = (k: Key) => JSON.stringify([k.packId, k.packVersion, k.ruleId]);
  const rows = new Map<string, FeedbackSummaryRow>();
  const rowOf = (k: Key): FeedbackSummaryRow => {
    let row = rows.get(keyOf(k));
    if (!row) {
      row = {
        packId: k.packId,
        packVersion: k.packVersion,
        ruleId: k.ruleId,
        shown: 0,
        accepted: 0,
        overridden: 0,
        overrideRate: null,
        // Keys are pack metadata, yet never a prototype's member.
        reasons: Object.create(null) as Record<string, number>,
      };
      rows.set(keyOf(k), row);
    }
    return row;
  };
  for (const r of shown) {
    rowOf(r).shown = Number(r.n);
  }
  for (const r of outcomes) {
    const row = rowOf(r);
    if (r.outcome === 'accepted') {
      row.accepted = Number(r.n);
    } else if (r.outcome === 'overridden') {
      row.overridden = Number(r.n);
    }
  }
  for (const r of reasons) {
    rowOf(r).reasons[r.code] = Number(r.n);
  }
  for (const row of rows.values()) {
    const answered = row.accepted + row.overridden;
    row.overrideRate = answered > 0 ? row.overridden / answered : null;
  }
  const order = (a: FeedbackSummaryRow, b: FeedbackSummaryRow) =>
    a.packId.localeCompare(b.packId) ||
    a.packVersion.localeCompare(b.packVersion) ||
    (a.ruleId ?? '\uffff').localeCompare(b.ruleId ?? '\uffff');
  return { tenant: h.tenant, ...window, rows: [...rows.values()].sort(order) };
}

/** Creates the facade of `tenant` over the region context. */
export function createTenantStore(ctx: RegionContext, tenant: string): TenantStore {
  /** A write refused at the hard wrap limit is reported (and the rotation tried again). */
  const refusedAtWrapLimit = (err: unknown): unknown => {
    if (err instanceof WrapLimitError) {
      ctx.wrapsRefused?.(tenant, err);
    }
    return err;
  };
  /**
   * A read never creates the tenant's store (nor its first DEK, nor a `key.create` event): on a
   * tenant with no store in this region (no call yet, or a region that may serve it and never
   * did) it answers `empty`, as the store it would have made would.
   */
  const read = <T>(fn: (h: StoreHandle) => Promise<T>, empty: () => T): Promise<T> =>
    ctx.use(tenant, fn, { provision: false }).catch((err: unknown) => {
      if (err instanceof NotFoundError) {
        return empty();
      }
      throw err;
    });
  return {
    tenant,
    region: ctx.region,

    saveInvocation(input) {
      // Not async, on purpose: V8 keeps an async function's parameters and locals alive across
      // its awaits, and the write is most of a hook call's wait. Past this point the secret is
      // held only as bytes outside V8's heap, not as a string every scavenge would copy.
      let meta: Omit<ValidInvocation, 'secretJson'>;
      let plaintext: Buffer;
      try {
        const { secretJson, ...rest } = validateInvocation(input);
        meta = rest;
        plaintext = Buffer.from(secretJson, 'utf8');
      } catch (err) {
        return Promise.reject(err instanceof Error ? err : new Error(String(err)));
      }
      const started = performance.now();
      return ctx
        .use(tenant, (h) =>
          saveInvocation(h, ctx, meta, plaintext).catch((err: unknown) => {
            noteExhausted(h, err);
            throw err;
          }),
        )
        .then((summary) => {
          ctx.recordWritten?.('invocation', (performance.now() - started) / 1000);
          return summary;
        })
        .catch((err: unknown) => {
          throw refusedAtWrapLimit(err);
        })
        .finally(() => plaintext.fill(0));
    },

    async listInvocations(query = {}) {
      const q = validateQuery(query);
      return read(
        async (h) => {
          const where: WhereOptions<InvocationRow> = {};
          const time: Record<symbol, string> = {};
          if (q.from !== undefined) {
            time[Op.gte] = q.from;
          }
          if (q.to !== undefined) {
            time[Op.lt] = q.to;
          }
          if (q.from !== undefined || q.to !== undefined) {
            Object.assign(where, { time });
          }
          if (q.hook !== undefined) {
            Object.assign(where, { hook: q.hook });
          }
          // Metadata only (the sealed column stays on disk); the key version each record is
          // under now, which a scheduled rotation keeps in the record's head row.
          const { rows, versions } = await h.readTx(async (t) => {
            const found = await h.models.Invocation.findAll({
              where,
              attributes: { exclude: ['sealed'] },
              order: [
                ['time', 'ASC'],
                ['seq', 'ASC'],
              ],
              limit: q.limit,
              raw: true,
              transaction: t,
            });
            const seqs = found.map((r) => r.seq);
            return { rows: found, versions: await currentVersions(h, t, 'invocations', seqs) };
          });
          return rows.map((r) => toSummary(r, versions.get(r.seq)));
        },
        () => [],
      );
    },

    async readInvocation(id, opts = {}) {
      if (typeof id !== 'string' || !RECORD_ID_PATTERN.test(id)) {
        throw new InvalidInputError('id', 'must be an invocation id');
      }
      // No store: no such record (not a new empty store).
      return ctx.use(tenant, (h) => readInvocation(h, ctx, id, opts.actor), { provision: false });
    },

    async findCard(cardUuid) {
      if (typeof cardUuid !== 'string' || !RECORD_ID_PATTERN.test(cardUuid)) {
        return undefined;
      }
      return read(
        async (h) => {
          const link = await h.models.InvocationCard.findByPk(cardUuid, { raw: true });
          return link?.invocationId;
        },
        () => undefined,
      );
    },

    async saveFeedback(items, opts) {
      const valid = validateFeedback(items, opts.service);
      const started = performance.now();
      const result = await ctx
        .use(tenant, (h) =>
          saveFeedback(h, ctx, valid, opts.service, opts.partial === true).catch((err: unknown) => {
            noteExhausted(h, err);
            throw err;
          }),
        )
        .catch((err: unknown) => {
          throw refusedAtWrapLimit(err);
        });
      // A partial batch refused whole wrote nothing: no record write to time.
      if (result.stored + result.duplicates > 0) {
        ctx.recordWritten?.('feedback', (performance.now() - started) / 1000);
      }
      return result;
    },

    async purgeRecords(opts) {
      const valid = validatePurge(opts);
      return ctx.use(tenant, (h) => purgeRecords(h, ctx, opts, valid), { provision: false });
    },

    async feedbackSummary(query = {}) {
      const window = validateSummaryQuery(query, ctx.now());
      // No store yet: no card shown.
      return read(
        (h) => feedbackSummary(h, window),
        () => ({ tenant, ...window, rows: [] }),
      );
    },

    audit: {
      append: (event) => ctx.use(tenant, (h) => appendAudit(h, event, ctx.now)),
      list: (opts) =>
        read(
          (h) => listAudit(h, opts),
          () => [],
        ),
      verify: () =>
        read(
          (h) => verifyAudit(h),
          (): ChainVerification => ({ ok: true, count: 0 }),
        ),
      head: () =>
        read(
          (h) => auditHead(h),
          () => ({ seq: 0, hash: GENESIS_HASH }),
        ),
    },

    keys: {
      status: () =>
        ctx.use(tenant, async (h) => {
          const versions = await dekVersions(h);
          const running = (await h.models.Job.findOne({ where: { status: 'running' }, raw: true }))
            ?.id;
          return {
            tenant,
            primary: versions.find((v) => v.status === 'primary')?.version ?? 0,
            versions,
            wrapLimits: { ...(ctx.wrapLimits ?? DEFAULT_WRAP_LIMITS) },
            ...(running !== undefined ? { runningJob: running } : {}),
          };
        }),
      rotate: (opts = {}) =>
        ctx.rotateDek(tenant, {
          emergency: opts.emergency === true,
          ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
        }),
    },
  };
}
