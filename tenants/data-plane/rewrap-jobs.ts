/**
 * DEK rotation and the rewrap job. Rotation makes a new DEK version primary at once (new
 * records use it immediately) and records a job row; the job then moves every record not under
 * the primary version to it, in batches. Each batch is one write transaction that writes the
 * records' new heads or envelopes AND advances the job's checkpoint and `done` counter, so a
 * crash at any point resumes after the last committed batch and counts each record exactly
 * once. Old versions keep opening records until no record uses them; only then are they
 * destroyed.
 *
 * How a record moves (record-cipher.ts has the envelope forms):
 * - **Scheduled** rotation, record sealed under a record key: only its head changes. The record
 *   key is unwrapped with the old DEK and wrapped with the primary one, and the new head is
 *   written to the table's head table (record-heads.ts); the record's row and ciphertext are not
 *   rewritten. The record's body is not read, so a scheduled rotation does not authenticate
 *   it (every read does; an emergency rotation does).
 * - **Emergency** rotation (the old key may be known to someone else, and with it the record
 *   keys it wrapped), and any record from before record keys: the record is opened and sealed
 *   again under a fresh record key, its row rewritten (which drops its head row).
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { UniqueConstraintError } from 'sequelize';
import type { Transaction } from 'sequelize';
import { ConflictError } from '../errors.ts';
import { appendAuditInTx } from './audit-chain.ts';
import {
  dekAad,
  dekOfRow,
  destroyDekInTx,
  dropIfStale,
  getDek,
  isKeyOf,
  lockPrimaryForUpdate,
  primaryDek,
  rememberDek,
} from './dek-ring.ts';
import type { KeyContext } from './dek-ring.ts';
import { RecordOpenError } from './errors.ts';
import { NO_LEASE, claimLeaseInTx, leaseHolder, newJobLease, readJob } from './job-lease.ts';
import type { JobLease } from './job-lease.ts';
import { HEAD_TABLES, SEALED_TABLES } from './models.ts';
import type { JobRow, RowModel, SealedTable } from './models.ts';
import {
  HEAD_READ_LENGTH,
  envelopeHead,
  generateDataKey,
  openRecordWithKey,
  rewrapHead,
  sealRecordAs,
  withHead,
} from './record-cipher.ts';
import type { Envelope } from './record-cipher.ts';
import { CURRENT_VERSION, countRecords, isVersionUsed, withHeads } from './record-heads.ts';
import { DEFAULT_WRAP_LIMITS, reserveWraps } from './wrap-limit.ts';
import type { StoreHandle } from './store-backend.ts';
import type { JobInfo, JobStatus } from './types.ts';

/** Job ids: `rewrap.<tenant>.<n>` (tenant ids have no dots). */
export function dekJobId(tenant: string, n: number): string {
  return `rewrap.${tenant}.${n}`;
}

/** Parses a DEK job id, or undefined. */
export function parseDekJobId(id: string): { tenant: string; n: number } | undefined {
  const m = /^rewrap\.([a-z0-9][a-z0-9-]{1,62})\.([1-9][0-9]{0,8})$/.exec(id);
  return m?.[1] !== undefined && m[2] !== undefined ? { tenant: m[1], n: Number(m[2]) } : undefined;
}

/** In-process progress of a running job, for rate and ETA. */
export interface JobSession {
  startDone: number;
  startMs: number;
}

/** A job row as the public descriptor. */
export function dekJobInfo(
  row: JobRow,
  region: string,
  tenant: string,
  session?: JobSession,
): JobInfo {
  let rate = 0;
  let etaSeconds: number | null = null;
  if (session && row.status === 'running') {
    const seconds = (performance.now() - session.startMs) / 1000;
    const moved = row.done - session.startDone;
    rate = seconds > 0 ? Math.round((moved / seconds) * 10) / 10 : 0;
    etaSeconds = rate > 0 ? Math.ceil((row.total - row.done) / rate) : null;
  }
  if (row.status === 'done') {
    etaSeconds = 0;
  }
  return {
    id: row.id,
    tenant,
    region,
    kind: 'dek-rewrap',
    status: row.status as JobStatus,
    emergency: row.emergency === 1,
    done: row.done,
    total: row.total,
    rate,
    etaSeconds,
    startedAt: row.startedAt,
    updatedAt: row.updatedAt,
    ...(row.finishedAt !== null ? { finishedAt: row.finishedAt } : {}),
    ...(row.error !== null ? { error: row.error } : {}),
    ...(row.status === 'running' && row.leaseOwner !== null
      ? { leaseOwner: row.leaseOwner, leaseExpiresAt: row.leaseUntil ?? '' }
      : {}),
  };
}

/** How a rotation runs; `lease`: the new job is held by its creator from the start. */
interface RotateOptions {
  emergency: boolean;
  actor?: string;
  lease: JobLease;
  /** Why, if not asked by someone: `wrap_limit` (the soft wrap limit, wrap-limit.ts). */
  reason?: 'wrap_limit';
  /** Refuse (ConflictError) unless this version is still primary (an automatic rotation). */
  onlyIfPrimary?: number;
}

/** Attempts of a rotation that keeps losing races with rotations of other processes. */
const ROTATE_ATTEMPTS = 8;

/**
 * Creates a new primary DEK version and the job row that moves old records to it. Its
 * transaction runs alone and first locks the primary DEK row (PostgreSQL FOR UPDATE): it waits
 * for every write that checked the old primary to commit, and a concurrent rotation (another
 * replica) waits for it, then sees the new rows and takes the next number.
 * @throws ConflictError for a scheduled rotation while a job runs, or when concurrent
 *   rotations kept taking the version this one prepared.
 */
export async function rotateDek(
  h: StoreHandle,
  ctx: KeyContext,
  opts: RotateOptions,
): Promise<JobRow> {
  for (let attempt = 0; attempt < ROTATE_ATTEMPTS; attempt += 1) {
    const rows = await h.models.Dek.findAll({ raw: true });
    const version = Math.max(0, ...rows.map((r) => r.version)) + 1;
    const dek: KeyObject = generateDataKey();
    const wrapped = await ctx.provider.wrapDek(h.tenant, dek, dekAad(h.region, h.tenant, version));
    let job: JobRow | undefined;
    try {
      job = await h.writeTx((t) => createVersion(h, ctx, t, opts, version, wrapped), {
        alone: true,
      });
    } catch (err) {
      // A rotation of another process that committed the same version or job number first
      // (possible only without a primary row to lock): take the next number.
      if (!(err instanceof UniqueConstraintError)) {
        throw err;
      }
    }
    if (job) {
      rememberDek(h, version, dek, job.startedAt); // the new row's created_at (createVersion)
      return job;
    }
  }
  throw new ConflictError('concurrent key rotations kept changing the DEK versions; try again');
}

/** The rotation's transaction: undefined if `version` is no longer the next one. */
async function createVersion(
  h: StoreHandle,
  ctx: KeyContext,
  t: Transaction,
  opts: RotateOptions,
  version: number,
  wrapped: { wrapped: string; kekVersion: number },
): Promise<JobRow | undefined> {
  await lockPrimaryForUpdate(h, t);
  // Read after the lock, in a statement of its own: on PostgreSQL (READ COMMITTED) it sees
  // what a concurrent rotation committed while this one waited.
  const current = await h.models.Dek.findAll({ transaction: t, raw: true });
  if (Math.max(0, ...current.map((r) => r.version)) + 1 !== version) {
    return undefined; // another rotation won the race: redo with the next number
  }
  const running = await h.models.Job.findOne({
    where: { status: 'running' },
    transaction: t,
    raw: true,
  });
  if (running && !opts.emergency) {
    throw new ConflictError(`rewrap job ${running.id} is still running`);
  }
  const previous = current.find((r) => r.status === 'primary');
  if (opts.onlyIfPrimary !== undefined && previous?.version !== opts.onlyIfPrimary) {
    throw new ConflictError(`DEK version ${String(opts.onlyIfPrimary)} is no longer primary`);
  }
  const at = ctx.now().toISOString();
  if (running) {
    await h.models.Job.update(
      { status: 'superseded', finishedAt: at, updatedAt: at, ...NO_LEASE },
      { where: { id: running.id }, transaction: t },
    );
  }
  if (previous) {
    await h.models.Dek.update(
      opts.emergency ? { status: 'retired', compromised: 1, retiredAt: at } : { status: 'active' },
      { where: { version: previous.version }, transaction: t },
    );
  }
  await h.models.Dek.create(
    {
      version,
      status: 'primary',
      wrapped: wrapped.wrapped,
      kekVersion: wrapped.kekVersion,
      compromised: 0,
      createdAt: at,
      retiredAt: null,
      destroyedAt: null,
      wrapCount: 0,
    },
    { transaction: t },
  );
  const n =
    ((await h.models.Job.max<number | null, RowModel<JobRow>>('n', { transaction: t })) ?? 0) + 1;
  const row: JobRow = {
    id: dekJobId(h.tenant, n),
    n,
    kind: 'dek-rewrap',
    status: 'running',
    emergency: opts.emergency ? 1 : 0,
    fromVersions: JSON.stringify(
      current.filter((r) => r.status !== 'destroyed').map((r) => r.version),
    ),
    // Every record: none can be under the version created just above.
    total: await countRecords(h, t),
    done: 0,
    checkpointTable: SEALED_TABLES[0],
    checkpointSeq: 0,
    startedAt: at,
    updatedAt: at,
    finishedAt: null,
    error: null,
    // Held by this process from the start: no other replica starts it before its first batch.
    ...(await newJobLease(h, t, opts.lease)),
  };
  await h.models.Job.create(row, { transaction: t });
  const now = ctx.now();
  await appendAuditInTx(
    h,
    t,
    {
      type: 'key.create',
      outcome: 'success',
      detail: { version, kekVersion: wrapped.kekVersion },
    },
    now,
  );
  await appendAuditInTx(
    h,
    t,
    {
      type: 'key.rotate',
      outcome: 'success',
      ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
      detail: {
        from: previous?.version ?? 0,
        to: version,
        emergency: opts.emergency,
        job: row.id,
        records: row.total,
        ...(running ? { superseded: running.id } : {}),
        ...(opts.reason !== undefined
          ? { reason: opts.reason, wraps: Number(previous?.wrapCount ?? 0) }
          : {}),
      },
    },
    now,
  );
  return row;
}

/**
 * Marks a running job failed (safe message) and clears its lease, unless another owner holds
 * the lease (that replica runs the job and meets the same failure itself). Returns whether it
 * was failed here.
 */
export async function failJob(
  h: StoreHandle,
  ctx: KeyContext,
  id: string,
  message: string,
  lease: JobLease,
): Promise<boolean> {
  // Lock order: the job row, then the audit head (job-lease.ts).
  return h.writeTx(
    async (t) => {
      const read = await readJob(h, id, t);
      if (
        read?.job.status !== 'running' ||
        leaseHolder(read.job, lease.owner, read.nowMs).kind === 'held'
      ) {
        return false;
      }
      const at = ctx.now();
      await h.models.Job.update(
        {
          status: 'failed',
          error: message.slice(0, 500),
          updatedAt: at.toISOString(),
          finishedAt: at.toISOString(),
          ...NO_LEASE,
        },
        { where: { id, status: 'running' }, transaction: t },
      );
      await appendAuditInTx(
        h,
        t,
        {
          type: 'key.rewrap',
          outcome: 'failure',
          detail: { job: id, error: message.slice(0, 200) },
        },
        at,
      );
      return true;
    },
    { alone: true },
  );
}

/** Destroys non-primary versions no record uses (`only`: restrict to these versions). */
async function destroyUnused(
  h: StoreHandle,
  t: Transaction,
  at: Date,
  reason: string,
  only?: (row: { version: number; status: string; compromised: number }) => boolean,
): Promise<number[]> {
  const rows = await h.models.Dek.findAll({ transaction: t, raw: true });
  const destroyed: number[] = [];
  for (const row of rows) {
    if (row.status === 'primary' || row.status === 'destroyed' || (only && !only(row))) {
      continue;
    }
    if (await isVersionUsed(h, t, row.version)) {
      continue;
    }
    await destroyDekInTx(h, t, row.version, reason, at);
    destroyed.push(row.version);
  }
  return destroyed;
}

/**
 * Writes a batch of re-sealed values in one statement (`CASE seq WHEN ... END`), portable to
 * SQLite and PostgreSQL: one round trip per batch instead of one per record. The store's
 * trigger drops the rows' head rows in the same statement.
 */
async function updateSealed(
  h: StoreHandle,
  t: Transaction,
  table: SealedTable,
  version: number,
  rows: ReadonlyArray<{ seq: number; sealed: Envelope }>,
): Promise<void> {
  // Bound parameters, not values spliced into the SQL text: a batch of 200 records is ~8 MB of
  // ciphertext that Sequelize's replacements escaped and SQLite then parsed as SQL.
  await h.raw(
    t,
    `UPDATE ${h.qualified(table)} SET key_version = ?,
       sealed = CASE seq ${rows.map(() => 'WHEN ? THEN ?').join(' ')} END
     WHERE seq IN (${rows.map(() => '?').join(',')})`,
    [version, ...rows.flatMap((r) => [r.seq, r.sealed]), ...rows.map((r) => r.seq)],
  );
}

/** Writes a batch of re-wrapped heads (insert or replace), one statement. */
async function upsertHeads(
  h: StoreHandle,
  t: Transaction,
  table: SealedTable,
  version: number,
  rows: ReadonlyArray<{ seq: number; head: Envelope }>,
): Promise<void> {
  await h.raw(
    t,
    `INSERT INTO ${h.qualified(HEAD_TABLES[table])} (seq, key_version, head)
     VALUES ${rows.map(() => '(?, ?, ?)').join(', ')}
     ON CONFLICT (seq) DO UPDATE SET key_version = excluded.key_version, head = excluded.head`,
    rows.flatMap((r) => [r.seq, version, r.head]),
  );
}

/** The next rows of a batch: after the checkpoint, not under the primary version, in order. */
function notUnderPrimary<R>(
  h: StoreHandle,
  t: Transaction,
  batch: { table: SealedTable; after: number; primary: number; limit: number },
  columns: string,
): Promise<R[]> {
  return h.raw<R>(
    t,
    `SELECT ${columns} FROM ${withHeads(h, batch.table)}
     WHERE r.seq > ? AND ${CURRENT_VERSION} <> ? ORDER BY r.seq LIMIT ?`,
    [batch.after, batch.primary, batch.limit],
  );
}

/**
 * Work between two turns of the event loop: 16 re-sealed records (a batch is megabytes of
 * ciphertext), or 256 re-wrapped heads.
 */
const SLICE_WORK = 256;
const RESEAL_WORK = 16;

/** Outcome of one batch. */
export interface BatchResult {
  /** The job is no longer running (done, failed, superseded, missing). */
  finished: boolean;
  /** Records moved by this batch. */
  moved: number;
  /** Versions destroyed by this batch. */
  destroyed: number[];
  /**
   * The next batch, read and re-sealed while this one was written: pass it to the next
   * `runRewrapBatch` of the same job. It is used only if the job and the primary version are
   * still where it assumed, and re-checked row by row inside the write like any batch.
   */
  next?: PreparedBatch;
  /** The job as this batch found it (absent if it was no longer running). */
  job?: { emergency: boolean; doneBefore: number };
  /** The batch was moved to a key that is not the locked primary row's: planned again. */
  stale?: boolean;
  /**
   * Another owner holds the job's lease (it runs the job): this batch did nothing. Its lease
   * expires in `waitMs` (the database's clock) unless that owner renews it.
   */
  leased?: { owner: string; until: string; waitMs: number };
}

/**
 * Records per batch: emergency rotations, and scheduled ones (shorter, hook calls come first).
 * A scheduled batch holds `scheduled` re-sealed records' worth of work, a re-wrapped head
 * counting 1/HEADS_PER_RESEAL of a re-seal: up to `scheduled * HEADS_PER_RESEAL` heads.
 */
export interface BatchSizes {
  emergency: number;
  scheduled: number;
}

/**
 * Heads re-wrapped for the cost of one record re-sealed, in a scheduled batch. Measured: a
 * batch of 200 heads took 15-20 ms, a batch of 200 re-sealed 30 KiB records ~100 ms; 4 keeps a
 * scheduled batch of heads shorter than one of re-seals.
 */
export const HEADS_PER_RESEAL = 4;

/** Where a batch reads: rows after `after` in `table` not under `primary`, `limit` of them. */
interface BatchRange {
  table: SealedTable;
  after: number;
  primary: number;
  /** The primary row's `created_at` as the batch was planned (PrimaryDek). */
  primaryCreatedAt: string;
  limit: number;
}

/** A record moved to the primary version, not yet written: a new head, or a new envelope. */
type Moved = { seq: number; keyVersion: number } & (
  { head: Envelope; sealed?: undefined } | { sealed: Envelope; head?: undefined }
);

/** A batch read and moved to the primary version, not yet written. */
export interface PreparedBatch extends BatchRange {
  job: string;
  /** The identity of the primary key the batch was moved to (checked by the write). */
  sealedUnder: string;
  /** The first rows of the range, as many as the batch's budget allowed. */
  resealed: Moved[];
  /** More rows may follow: the range was read to its limit, or the budget ended the batch. */
  full: boolean;
}

/** A row as a batch reads it: the whole envelope, or (scheduled) only its current head. */
interface BatchRow {
  seq: number;
  id: string;
  keyVersion: number;
  /** The record's envelope (emergency, legacy), its first HEAD_READ_LENGTH bytes, or null. */
  sealed: Envelope | null;
  /** The record's head row's head, if it has one. */
  head: Envelope | null;
}

/**
 * Reads the rows of `range`: an emergency batch whole; a scheduled one only the heads, and the
 * whole envelope of records from before record keys (they have no head to re-wrap).
 */
async function readBatch(
  h: StoreHandle,
  range: BatchRange,
  emergency: boolean,
): Promise<BatchRow[]> {
  const version = `${CURRENT_VERSION} AS "keyVersion"`;
  return h.readTx(async (t) => {
    if (emergency) {
      return notUnderPrimary<BatchRow>(h, t, range, `r.seq, r.id, ${version}, r.sealed, k.head`);
    }
    const rows = await notUnderPrimary<BatchRow>(
      h,
      t,
      range,
      `r.seq, r.id, ${version}, CASE WHEN k.head IS NULL
         THEN substr(r.sealed, 1, ${String(HEAD_READ_LENGTH)}) END AS sealed, k.head`,
    );
    const legacy = rows.filter(
      (r) =>
        r.head === null &&
        r.sealed !== null &&
        envelopeHead(r.sealed, { tenant: h.tenant, table: range.table, recordId: r.id }) ===
          undefined,
    );
    if (legacy.length > 0) {
      const whole = await h.raw<{ seq: number; sealed: Envelope }>(
        t,
        `SELECT seq, sealed FROM ${h.qualified(range.table)}
         WHERE seq IN (${legacy.map(() => '?').join(',')})`,
        legacy.map((r) => r.seq),
      );
      const bySeq = new Map(whole.map((w) => [w.seq, w.sealed]));
      for (const r of legacy) {
        r.sealed = bySeq.get(r.seq) ?? null;
      }
    }
    return rows;
  });
}

/**
 * Reads the rows of `range` and moves them to the primary version (new heads, or new
 * envelopes), outside the store's write queue (hook-path writes wait for that queue). Unwraps
 * (and audits) the DEKs it needs. A record that fails to open with a cached key that is not its
 * version's current row's (another key under a reused version number) is tried once more with
 * the row's own key.
 * @throws RecordOpenError if a record or head fails to open (tampered).
 */
async function prepareBatch(
  h: StoreHandle,
  ctx: KeyContext,
  job: string,
  range: BatchRange,
  emergency: boolean,
  budget: number,
): Promise<PreparedBatch> {
  const rows = await readBatch(h, range, emergency);
  const keys = new Map<number, KeyObject>();
  try {
    return await moveBatch(h, ctx, job, range, rows, keys, emergency, budget);
  } catch (err) {
    if (!(err instanceof RecordOpenError) || err.reason !== 'authentication_failed') {
      throw err;
    }
    let dropped = false;
    for (const [v, key] of keys) {
      dropped = (await dropIfStale(h, v, key)) || dropped;
    }
    if (!dropped) {
      throw err;
    }
    return moveBatch(h, ctx, job, range, rows, new Map(), emergency, budget);
  }
}

/** prepareBatch's work on rows read: `keys` collects the DEKs used. */
async function moveBatch(
  h: StoreHandle,
  ctx: KeyContext,
  job: string,
  range: BatchRange,
  rows: readonly BatchRow[],
  keys: Map<number, KeyObject>,
  emergency: boolean,
  budget: number,
): Promise<PreparedBatch> {
  const { table, primary } = range;
  // The primary's key must be the primary row's own, not a cached key of the same number.
  const to = await dekOfRow(h, ctx, { version: primary, createdAt: range.primaryCreatedAt });
  keys.set(primary, to.key);
  for (const v of new Set(rows.map((r) => r.keyVersion))) {
    if (!keys.has(v)) {
      keys.set(v, await getDek(h, ctx, v));
    }
  }
  // In slices with a turn of the event loop between them: hook calls on this process must not
  // wait behind a whole batch in one block.
  const resealed: Moved[] = [];
  let work = 0;
  // The batch's budget, in heads: a re-sealed record costs HEADS_PER_RESEAL. The first row is
  // always taken, so a batch always moves something.
  let spent = 0;
  let truncated = false;
  for (const row of rows) {
    if (work >= SLICE_WORK) {
      work = 0;
      await new Promise<void>((resolve) => {
        setImmediate(resolve);
      });
    }
    const addr = { tenant: h.tenant, table, recordId: row.id };
    const oldKey = keys.get(row.keyVersion);
    if (!oldKey) {
      throw new Error('DEK missing');
    }
    const from = { version: row.keyVersion, key: oldKey };
    const head = emergency
      ? undefined
      : (row.head ?? (row.sealed === null ? undefined : envelopeHead(row.sealed, addr)?.head));
    const cost = head !== undefined ? 1 : HEADS_PER_RESEAL;
    if (spent > 0 && spent + cost > budget) {
      truncated = true;
      break;
    }
    spent += cost;
    if (head !== undefined) {
      resealed.push({
        seq: row.seq,
        keyVersion: row.keyVersion,
        head: rewrapHead(head, addr, from, to),
      });
      work += 1;
      continue;
    }
    if (row.sealed === null) {
      throw new Error('record missing');
    }
    const envelope = row.head === null ? row.sealed : withHead(row.sealed, row.head, addr);
    const plaintext = openRecordWithKey(envelope, addr, from);
    const sealed = sealRecordAs(h.envelopeForm, to, addr, plaintext);
    plaintext.fill(0);
    resealed.push({ seq: row.seq, keyVersion: row.keyVersion, sealed });
    work += RESEAL_WORK;
  }
  return {
    ...range,
    job,
    sealedUnder: to.createdAt,
    resealed,
    full: truncated || rows.length === range.limit,
  };
}

function sameRange(a: BatchRange, b: BatchRange): boolean {
  return (
    a.table === b.table &&
    a.after === b.after &&
    a.primary === b.primary &&
    a.primaryCreatedAt === b.primaryCreatedAt &&
    a.limit === b.limit
  );
}

/**
 * Runs one batch of job `id`: moves the next records after the checkpoint that are not under
 * the primary version (`sizes`: an emergency batch's count, a scheduled batch's budget),
 * advancing the checkpoint and `done` in the same transaction. The batch is read and prepared
 * BEFORE taking the store's write queue (or was, as the previous call's `next`), and a full
 * batch's successor is read and prepared while this one is written (the write runs on SQLite's thread or PostgreSQL's server, the re-seal on this
 * thread). The write transaction re-checks the job, the primary version and each row's key
 * version, and re-plans if anything changed. An emergency job destroys compromised versions as
 * soon as nothing uses them; any job destroys unused old versions when it ends.
 *
 * Only the holder of the job's lease runs batches (job-lease.ts): the transaction claims or
 * renews it after the primary row's lock (the job row is locked next, then the audit head). If
 * another owner's lease is still valid, the batch does nothing and reports it (`leased`; also
 * checked before anything is read, so a replica watching the job does no work). An expired lease
 * is taken over (audited) and the job goes on from its checkpoint. The job's end clears it.
 * @throws RecordOpenError if a record fails to open (tampered): the caller fails the job.
 */
export async function runRewrapBatch(
  h: StoreHandle,
  ctx: KeyContext,
  id: string,
  sizes: BatchSizes,
  lease: JobLease,
  prepared?: PreparedBatch,
): Promise<BatchResult> {
  const read = await readJob(h, id);
  if (read?.job.status !== 'running') {
    return { finished: true, moved: 0, destroyed: [] };
  }
  const { job } = read;
  const holder = leaseHolder(job, lease.owner, read.nowMs);
  if (holder.kind === 'held') {
    const { owner, until, waitMs } = holder;
    return { finished: false, moved: 0, destroyed: [], leased: { owner, until, waitMs } };
  }
  const found = { emergency: job.emergency === 1, doneBefore: job.done };
  // Emergency: `emergency` records, all re-sealed. Scheduled: a budget of `scheduled`
  // re-seals, in heads (BatchSizes); as many rows are read as the budget could take.
  const budget = found.emergency ? Infinity : sizes.scheduled * HEADS_PER_RESEAL;
  const limit = found.emergency ? sizes.emergency : budget;
  const table = job.checkpointTable as SealedTable;
  const primaryRow = await primaryDek(h);
  const primary = primaryRow.version;
  const batch: BatchRange = {
    table,
    after: job.checkpointSeq,
    primary,
    primaryCreatedAt: primaryRow.createdAt,
    limit,
  };
  const prepare = (range: BatchRange) => prepareBatch(h, ctx, id, range, found.emergency, budget);
  const current =
    prepared?.job === id && sameRange(prepared, batch) ? prepared : await prepare(batch);
  const { resealed } = current;
  const last = resealed.at(-1);
  // A full batch may have a successor: read and re-seal it while this one is written. Its
  // failure (a tampered record) is not reported here: the next call prepares it again and
  // fails the job then, with that batch's own error.
  const ahead =
    last !== undefined && current.full
      ? prepare({ ...batch, after: last.seq }).catch(() => undefined)
      : undefined;
  // The primary row is locked for the transaction (WriteOptions.primary): a rotation by another
  // process waits for this batch, so nothing it moves to `primary` lands under a version that
  // stopped being primary (and was then destroyed) while the batch was in flight.
  const result = await h.writeTx(
    async (t): Promise<BatchResult> => {
      const now = ctx.now();
      const at = now.toISOString();
      // After the primary row (read first by writeTx): the job row, locked on PostgreSQL.
      const freshRead = await readJob(h, id, t);
      if (freshRead?.job.status !== 'running') {
        return { finished: true, moved: 0, destroyed: [] };
      }
      const fresh = freshRead.job;
      const claim = await claimLeaseInTx(h, t, freshRead, lease, now);
      if (claim.held) {
        const { owner, until, waitMs } = claim;
        return { finished: false, moved: 0, destroyed: [], leased: { owner, until, waitMs } };
      }
      if (!isKeyOf(h.lockedPrimary(t), { version: primary, createdAt: current.sealedUnder })) {
        return { finished: false, moved: 0, destroyed: [], stale: true }; // re-plan
      }
      if (
        fresh.checkpointTable !== job.checkpointTable ||
        fresh.checkpointSeq !== job.checkpointSeq
      ) {
        return { finished: false, moved: 0, destroyed: [] }; // moved on meanwhile: re-plan
      }
      // The rows still hold what was prepared (their key versions are unchanged), and no row
      // of the range appeared before them since the read. (A batch the budget cut short is
      // compared over its own rows: the ones after them are the next batch's.)
      const rowsNow = await notUnderPrimary<{ seq: number; keyVersion: number }>(
        h,
        t,
        resealed.length > 0 ? { ...batch, limit: resealed.length } : batch,
        `r.seq, ${CURRENT_VERSION} AS "keyVersion"`,
      );
      if (
        rowsNow.length !== resealed.length ||
        rowsNow.some((r, i) => {
          const was = resealed[i];
          return was === undefined || r.seq !== was.seq || r.keyVersion !== was.keyVersion;
        })
      ) {
        return { finished: false, moved: 0, destroyed: [] };
      }
      const emergency = fresh.emergency === 1;
      if (resealed.length === 0) {
        const nextTable = SEALED_TABLES[SEALED_TABLES.indexOf(table) + 1];
        if (nextTable !== undefined) {
          await h.models.Job.update(
            { checkpointTable: nextTable, checkpointSeq: 0, updatedAt: at },
            { where: { id }, transaction: t },
          );
          return { finished: false, moved: 0, destroyed: [] };
        }
        const destroyed = await destroyUnused(h, t, now, emergency ? 'compromised' : 'rewrapped');
        await h.models.Job.update(
          { status: 'done', updatedAt: at, finishedAt: at, ...NO_LEASE },
          { where: { id }, transaction: t },
        );
        await appendAuditInTx(
          h,
          t,
          {
            type: 'key.rewrap',
            outcome: 'success',
            detail: {
              job: id,
              done: fresh.done,
              total: fresh.total,
              destroyed: destroyed.join(','),
            },
          },
          now,
        );
        return { finished: true, moved: 0, destroyed };
      }
      const heads = resealed.filter((r): r is Moved & { head: Envelope } => r.head !== undefined);
      const envelopes = resealed.filter(
        (r): r is Moved & { sealed: Envelope } => r.sealed !== undefined,
      );
      // Each moved record is one more encryption under the primary version: a job that
      // would pass its hard limit fails (WrapLimitError) rather than over-use the key.
      reserveWraps(h, ctx.wrapLimits ?? DEFAULT_WRAP_LIMITS, t, resealed.length);
      if (heads.length > 0) {
        await upsertHeads(h, t, table, primary, heads);
      }
      if (envelopes.length > 0) {
        await updateSealed(h, t, table, primary, envelopes);
      }
      await h.models.Job.update(
        {
          done: fresh.done + resealed.length,
          checkpointSeq: last?.seq ?? fresh.checkpointSeq,
          updatedAt: at,
        },
        { where: { id }, transaction: t },
      );
      // Emergency: a compromised version goes as soon as no record uses it, mid-job.
      const destroyed = emergency
        ? await destroyUnused(h, t, now, 'compromised', (r) => r.compromised === 1)
        : [];
      return { finished: false, moved: resealed.length, destroyed };
    },
    // Alone: in a group, an earlier write could hold the audit head before this one locks the
    // job row, against the lock order (primary row, job row, audit head) another replica's
    // claim follows.
    { primary: true, alone: true },
  );
  for (const v of result.destroyed) {
    h.deks.delete(v);
  }
  const next = await ahead;
  return !result.finished && result.moved > 0 && next
    ? { ...result, job: found, next }
    : { ...result, job: found };
}

/** A random suffix for staging names. */
export function randomSuffix(): string {
  return crypto.randomBytes(4).toString('hex');
}
