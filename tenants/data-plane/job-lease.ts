/**
 * The owner and lease of a running DEK rewrap job. Replicas sharing PostgreSQL stores (or
 * processes sharing a SQLite file) each find a `running` job when they resume jobs; only the
 * holder of the job row's lease runs its batches. Every batch claims or renews the lease in
 * its own write transaction (rewrap-jobs.ts): primary DEK row first, then the job row (on
 * PostgreSQL `FOR UPDATE`, so two replicas' claims take turns), then the audit head. A lease
 * that expired without renewal (its owner stopped or died) is taken over, with a
 * `key.rewrap.takeover` audit event, and the job goes on from its checkpoint.
 *
 * Times are read from the database's clock in the statement that reads the job row (PostgreSQL
 * `clock_timestamp()`; SQLite's `'now'`, the clock of the machine that holds the file), so
 * replicas compare leases against one clock and their own clocks' skew does not matter.
 */
import crypto from 'node:crypto';
import os from 'node:os';
import { QueryTypes } from 'sequelize';
import type { Transaction } from 'sequelize';
import { InvalidInputError } from '../errors.ts';
import { appendAuditInTx } from './audit-chain.ts';
import { TABLES } from './models.ts';
import type { JobRow } from './models.ts';
import type { Dialect, StoreHandle } from './store-backend.ts';

/** Default lease of a running job: renewed by every batch, and at least twice per lease. */
export const DEFAULT_JOB_LEASE_MS = 60_000;
const MIN_JOB_LEASE_MS = 100;
const MAX_JOB_LEASE_MS = 3_600_000;

/** Who runs jobs in this process, and for how long a claim holds. */
export interface JobLease {
  /** `hostname:pid:random`: unique per RegionStores instance, no PHI. */
  owner: string;
  ms: number;
}

/** @throws InvalidInputError('jobLeaseMs') unless an integer from 100 to 3600000. */
export function assertJobLeaseMs(value: number): void {
  if (!Number.isInteger(value) || value < MIN_JOB_LEASE_MS || value > MAX_JOB_LEASE_MS) {
    throw new InvalidInputError(
      'jobLeaseMs',
      `must be an integer from ${String(MIN_JOB_LEASE_MS)} to ${String(MAX_JOB_LEASE_MS)}`,
    );
  }
}

/** A new owner id: `hostname:pid:random` (the host name cut to 64 safe characters). */
export function createJobOwnerId(): string {
  const host =
    os
      .hostname()
      .replace(/[^A-Za-z0-9._-]/g, '_')
      .slice(0, 64) || 'host';
  return `${host}:${String(process.pid)}:${crypto.randomBytes(6).toString('hex')}`;
}

/** The database's clock in milliseconds since the epoch, as a SELECT expression. */
function dbNowMs(dialect: Dialect): string {
  return dialect === 'postgres'
    ? `(extract(epoch FROM clock_timestamp()) * 1000)::float8`
    : `CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)`;
}

const JOB_COLUMNS = `id, n, kind, status, emergency, from_versions AS "fromVersions", total, done,
  checkpoint_table AS "checkpointTable", checkpoint_seq AS "checkpointSeq",
  started_at AS "startedAt", updated_at AS "updatedAt", finished_at AS "finishedAt", error,
  lease_owner AS "leaseOwner", lease_until AS "leaseUntil"`;

/** A job row and the database's clock when it was read. */
export interface JobRead {
  job: JobRow;
  nowMs: number;
}

async function selectJobs(
  h: StoreHandle,
  where: string,
  params: readonly unknown[],
  t?: Transaction,
): Promise<JobRead[]> {
  // Inside a write transaction on PostgreSQL the row is locked FOR UPDATE: a second replica's
  // claim waits for this transaction and then sees the lease it wrote.
  const sql = `SELECT ${JOB_COLUMNS}, ${dbNowMs(h.dialect)} AS "nowMs"
    FROM ${h.qualified(TABLES.jobs)} WHERE ${where}${t && h.dialect === 'postgres' ? ' FOR UPDATE' : ''}`;
  const rows = t
    ? await h.raw<JobRow & { nowMs: number | string }>(t, sql, params)
    : await h.sequelize.query<JobRow & { nowMs: number | string }>(sql, {
        type: QueryTypes.SELECT,
        replacements: [...params],
      });
  return rows.map(({ nowMs, ...job }) => ({ job, nowMs: Number(nowMs) }));
}

/**
 * Reads job `id` with the database's clock; in `t` (a write transaction), locked for the rest
 * of it on PostgreSQL (SQLite: the transaction holds the store's write lock already).
 */
export async function readJob(
  h: StoreHandle,
  id: string,
  t?: Transaction,
): Promise<JobRead | undefined> {
  const [read] = await selectJobs(h, 'id = ?', [id], t);
  return read;
}

/** The store's `running` jobs with the database's clock (not locked). */
export function readRunningJobs(h: StoreHandle): Promise<JobRead[]> {
  return selectJobs(h, 'status = ?', ['running']);
}

/** Who holds a job's lease, seen from `owner` at the database's time `nowMs`. */
export type LeaseHolder =
  /** No owner: a new job of an older version, or one whose owner released it (closed). */
  | { kind: 'free' }
  | { kind: 'mine' }
  /** Another owner's lease that was not renewed in time: it stopped or died. */
  | { kind: 'expired'; owner: string }
  /** Another owner runs it: `waitMs` until its lease expires unless renewed. */
  | { kind: 'held'; owner: string; until: string; waitMs: number };

export function leaseHolder(
  job: Pick<JobRow, 'leaseOwner' | 'leaseUntil'>,
  owner: string,
  nowMs: number,
): LeaseHolder {
  if (job.leaseOwner === null) {
    return { kind: 'free' };
  }
  if (job.leaseOwner === owner) {
    return { kind: 'mine' };
  }
  // An unreadable expiry counts as expired: a lease is for liveness, and a job nobody may
  // claim would never end.
  const until = job.leaseUntil === null ? Number.NaN : Date.parse(job.leaseUntil);
  if (job.leaseUntil === null || !Number.isFinite(until) || until <= nowMs) {
    return { kind: 'expired', owner: job.leaseOwner };
  }
  return { kind: 'held', owner: job.leaseOwner, until: job.leaseUntil, waitMs: until - nowMs };
}

/** What a claim found: the lease is now ours, or another owner holds it. */
export type LeaseClaim =
  | { held: false; takenOverFrom?: string }
  | { held: true; owner: string; until: string; waitMs: number };

/**
 * Claims or renews the lease of `read.job` (read with `readJob(h, id, t)` in `t`) for
 * `lease.owner` until the database's time + `lease.ms`. Another owner's unexpired lease is
 * left alone (`held: true`); an expired one is taken over, audited as `key.rewrap.takeover`
 * (job id, owner ids, progress: no PHI).
 */
export async function claimLeaseInTx(
  h: StoreHandle,
  t: Transaction,
  read: JobRead,
  lease: JobLease,
  at: Date,
): Promise<LeaseClaim> {
  const { job, nowMs } = read;
  const holder = leaseHolder(job, lease.owner, nowMs);
  if (holder.kind === 'held') {
    return { held: true, owner: holder.owner, until: holder.until, waitMs: holder.waitMs };
  }
  await h.models.Job.update(
    { leaseOwner: lease.owner, leaseUntil: new Date(nowMs + lease.ms).toISOString() },
    { where: { id: job.id }, transaction: t },
  );
  if (holder.kind !== 'expired') {
    return { held: false };
  }
  await appendAuditInTx(
    h,
    t,
    {
      type: 'key.rewrap.takeover',
      outcome: 'success',
      detail: {
        job: job.id,
        from: holder.owner,
        to: lease.owner,
        leaseExpiredAt: job.leaseUntil ?? '',
        done: job.done,
        total: job.total,
      },
    },
    at,
  );
  return { held: false, takenOverFrom: holder.owner };
}

/** The lease columns of a job created by `lease.owner` in `t` (a rotation): held from the start. */
export async function newJobLease(
  h: StoreHandle,
  t: Transaction,
  lease: JobLease,
): Promise<{ leaseOwner: string; leaseUntil: string }> {
  const [row] = await h.raw<{ nowMs: number }>(t, `SELECT ${dbNowMs(h.dialect)} AS "nowMs"`, []);
  const nowMs = Number(row?.nowMs);
  if (!Number.isFinite(nowMs)) {
    throw new Error('the database did not report its time');
  }
  return { leaseOwner: lease.owner, leaseUntil: new Date(nowMs + lease.ms).toISOString() };
}

/** The lease columns of a job that stopped running (done, failed, superseded) or was released. */
export const NO_LEASE = { leaseOwner: null, leaseUntil: null } as const;

/**
 * Renews (or claims) job `id`'s lease without running a batch: a runner pausing longer than
 * half its lease calls this between slices of the pause. `finished`: the job no longer runs.
 */
export function renewJobLease(
  h: StoreHandle,
  id: string,
  lease: JobLease,
  now: () => Date,
): Promise<LeaseClaim | { finished: true }> {
  // Lock order: the job row, then (a takeover) the audit head; never the primary DEK row after.
  return h.writeTx(
    async (t) => {
      const read = await readJob(h, id, t);
      if (read?.job.status !== 'running') {
        return { finished: true as const };
      }
      return claimLeaseInTx(h, t, read, lease, now());
    },
    { alone: true },
  );
}

/** Gives up `owner`'s lease of job `id` (a closing region): another replica may take it now. */
export async function releaseJobLease(h: StoreHandle, id: string, owner: string): Promise<void> {
  await h.writeTx(
    async (t) => {
      await h.models.Job.update(NO_LEASE, {
        where: { id, status: 'running', leaseOwner: owner },
        transaction: t,
      });
    },
    { alone: true },
  );
}
