/**
 * `openRegionStores`: every tenant store of one region behind a bounded LRU of open handles,
 * plus the region's background jobs (DEK rewrap per tenant, KEK rewrap for the region),
 * deprovisioning (crypto-shredding), and per-tenant backup and restore.
 *
 * Handles are borrowed per operation (reference counted); only idle handles are evicted and
 * closed, so the bound can be exceeded briefly only by handles in use at the same time.
 */
import type { KeyObject } from 'node:crypto';
import path from 'node:path';
import { Op } from 'sequelize';
import { ConflictError, InvalidInputError, NotFoundError } from '../errors.ts';
import { appendAudit } from './audit-chain.ts';
import { readManifestShape, removeAbandonedRestores, stageRestore, writeBackup } from './backup.ts';
import {
  ensureInitialDek,
  getDek,
  lockPrimaryForUpdate,
  primaryVersion,
  rewrapDeksToPrimaryKek,
} from './dek-ring.ts';
import type { KeyContext } from './dek-ring.ts';
import { KeyUnavailableError, RecordOpenError, StoreBusyError } from './errors.ts';
import type { KeyUnavailableReason } from './errors.ts';
import { assertRegionId, assertTenantId, sleep } from './ids.ts';
import {
  DEFAULT_JOB_LEASE_MS,
  assertJobLeaseMs,
  createJobOwnerId,
  leaseHolder,
  readJob,
  readRunningJobs,
  releaseJobLease,
  renewJobLease,
} from './job-lease.ts';
import type { JobLease, JobRead } from './job-lease.ts';
import { bindStoresToKeyring } from './keyring-binding.ts';
import {
  dekJobInfo,
  failJob,
  parseDekJobId,
  randomSuffix,
  rotateDek,
  runRewrapBatch,
} from './rewrap-jobs.ts';
import type { BatchResult, JobSession, PreparedBatch } from './rewrap-jobs.ts';
import {
  createPostgresBackend,
  createSqliteBackend,
  isStoreUnavailableError,
} from './store-backend.ts';
import type { StoreBackend, StoreHandle } from './store-backend.ts';
import type { JobRow } from './models.ts';
import { createTenantStore } from './tenant-store.ts';
import type { RegionContext } from './tenant-store.ts';
import { createWrapLimitWatch, resolveWrapLimits } from './wrap-limit.ts';
import type {
  DeprovisionResult,
  JobInfo,
  OpenRegionStoresOptions,
  RegionStores,
  RestoreResult,
  TenantStore,
} from './types.ts';

/** Tenants whose DEKs stay parked after their handle is evicted (see parkedDeks). */
const PARKED_MAX = 10_000;
/** How long parked DEKs are kept for a tenant that is not called again. */
const PARKED_TTL_MS = 15 * 60_000;

interface Slot {
  handle?: StoreHandle;
  opening: Promise<StoreHandle>;
  refs: number;
  provisioned: boolean;
}

interface Runner {
  tenant?: string;
  stop: boolean;
  wake?: (() => void) | undefined;
  session?: JobSession;
  /** The rewrap batch read ahead by the previous one (ciphertext only, no plaintext). */
  next?: PreparedBatch | undefined;
  promise: Promise<void>;
}

function assertBatchSize(value: number, field: string): void {
  if (!Number.isInteger(value) || value < 1 || value > 10_000) {
    throw new InvalidInputError(field, 'must be an integer from 1 to 10000');
  }
}

function safeMessage(err: unknown): string {
  if (err instanceof RecordOpenError || err instanceof KeyUnavailableError) {
    return err.message;
  }
  // Driver errors may quote SQL with values: keep only the class name.
  return err instanceof Error ? `${err.name}: internal error` : 'internal error';
}

/**
 * Opens the stores of one region (SQLite files under `dataDir`, or PostgreSQL schemas).
 * Nothing is opened per tenant until first use. Call `resumePendingJobs()` after start-up.
 * @throws InvalidInputError for bad options (region, provider of another region, both or
 *   neither of dataDir/postgresUrl, maxOpen, batch size); the driver's error if PostgreSQL is
 *   unreachable; KeyUnavailableError('keyring_mismatch') for stores bound to another keyring,
 *   KeyUnavailableError('keyring_unbound') for stores not bound yet with `mayBind: false`.
 */
export async function openRegionStores(opts: OpenRegionStoresOptions): Promise<RegionStores> {
  assertRegionId(opts.region);
  const region = opts.region;
  const provider = opts.keyProvider;
  if (provider.region !== region) {
    throw new InvalidInputError('keyProvider', 'must be the key provider of this region');
  }
  if ((opts.dataDir === undefined) === (opts.postgresUrl === undefined)) {
    throw new InvalidInputError('dataDir', 'give exactly one of dataDir and postgresUrl');
  }
  const maxOpen = opts.maxOpen ?? 64;
  if (!Number.isInteger(maxOpen) || maxOpen < 1) {
    throw new InvalidInputError('maxOpen', 'must be a positive integer');
  }
  const now = opts.now ?? (() => new Date());
  const batchSize = opts.rewrap?.batchSize ?? 200;
  const throttleMs = opts.rewrap?.throttleMs ?? 50;
  const emergencyThrottleMs = opts.rewrap?.emergencyThrottleMs ?? 0;
  assertBatchSize(batchSize, 'rewrap.batchSize');
  const scheduledBatchSize = opts.rewrap?.scheduledBatchSize ?? Math.min(50, batchSize);
  assertBatchSize(scheduledBatchSize, 'rewrap.scheduledBatchSize');
  const resumeRetryMs = opts.resumeRetryMs ?? 30_000;
  if (!Number.isInteger(resumeRetryMs) || resumeRetryMs < 1) {
    throw new InvalidInputError('resumeRetryMs', 'must be a positive integer');
  }
  const jobLeaseMs = opts.jobLeaseMs ?? DEFAULT_JOB_LEASE_MS;
  assertJobLeaseMs(jobLeaseMs);
  // One owner id per instance: a restarted process is another owner, and waits for (or finds
  // released) the leases of the one before it.
  const lease: JobLease = { owner: createJobOwnerId(), ms: jobLeaseMs };
  /** A watcher wakes this long after a lease's end, so it finds the lease expired. */
  const watchMarginMs = Math.min(1_000, Math.max(20, Math.round(jobLeaseMs / 20)));

  const backend: StoreBackend =
    opts.dataDir !== undefined
      ? createSqliteBackend({ dataDir: opts.dataDir, region, now })
      : createPostgresBackend({
          url: opts.postgresUrl ?? '',
          region,
          schemaPrefix: opts.schemaPrefix ?? 'cellcds_t_',
          poolMax: opts.pgPoolMax ?? 2,
          statementTimeoutMs: opts.pgStatementTimeoutMs ?? 5_000,
          acquireTimeoutMs: opts.pgAcquireTimeoutMs ?? 60_000,
          now,
        });
  try {
    if (backend.dialect === 'postgres') {
      await backend.admin().authenticate();
    }
    // Before anything is opened or keyed: a replica on another keyring than the region's
    // refuses the region's stores (keyring-binding.ts).
    await bindStoresToKeyring(backend, provider, now, { mayBind: opts.mayBind !== false });
  } catch (err) {
    await backend.close().catch(() => undefined);
    throw err;
  }
  // A restore killed before its commit (one rename) never happened; its staged copy goes.
  const abandoned = removeAbandonedRestores(backend);
  if (abandoned.length > 0) {
    opts.onAbandonedRestores?.(abandoned);
  }

  const wrapLimits = resolveWrapLimits(opts.wrapLimits);
  const keyCtx: KeyContext = { provider, now, wrapLimits };
  const slots = new Map<string, Slot>();
  const closingHandles = new Set<Promise<void>>();
  const blocked = new Map<string, string>();
  const runners = new Map<string, Runner>();
  /** Running DEK jobs another replica holds: a timer each, to take them over if it stops. */
  const watchers = new Map<string, { tenant: string; timer: NodeJS.Timeout }>();
  let kekJob: { info: JobInfo; runner: Runner } | undefined;
  /**
   * The KEK jobs this process ran before `kekJob`, as they ended, oldest first: with `kekJob`,
   * the last KEK_JOB_HISTORY, so an older job stays findable after a newer rotation.
   */
  const kekHistory: JobInfo[] = [];
  const KEK_JOB_HISTORY = 20;
  const state = { closed: false };
  /** Read through a function: the flags change from other async paths. */
  const isStopped = (runner: Runner): boolean => runner.stop || state.closed;
  const isRegionClosed = (): boolean => state.closed;

  // ---- handle LRU --------------------------------------------------------------------------

  /**
   * The unwrapped DEKs of handles evicted from the LRU, so that reopening a store does not
   * unwrap (and audit) its keys again: with more active tenants than open handles, every call
   * would. Process memory only, like the handles' own caches; moved back into the handle when
   * the store reopens; dropped after PARKED_TTL_MS, when the tenant is quiesced (deprovision,
   * restore) and when the region closes.
   */
  const parkedDeks = new Map<string, { deks: Map<number, KeyObject>; at: number }>();

  function park(h: StoreHandle): void {
    parkedDeks.delete(h.tenant);
    if (h.deks.size === 0) {
      return;
    }
    if (parkedDeks.size >= PARKED_MAX) {
      const oldest = parkedDeks.keys().next().value;
      if (oldest !== undefined) {
        parkedDeks.delete(oldest);
      }
    }
    parkedDeks.set(h.tenant, { deks: new Map(h.deks), at: now().getTime() });
  }

  function unpark(h: StoreHandle): StoreHandle {
    const parked = parkedDeks.get(h.tenant);
    parkedDeks.delete(h.tenant);
    if (parked && now().getTime() - parked.at <= PARKED_TTL_MS) {
      for (const [version, key] of parked.deks) {
        if (!h.deks.has(version)) {
          h.deks.set(version, key);
        }
      }
    }
    return h;
  }

  async function openHandle(tenant: string, provision: boolean): Promise<StoreHandle> {
    if (!provision) {
      return unpark(await backend.open(tenant, false));
    }
    if (!(await backend.exists(tenant))) {
      // Refuses a deprovisioned tenant before anything is created for it.
      parkedDeks.delete(tenant);
      await provider.createTenantKey(tenant);
    }
    const h = unpark(await backend.open(tenant, true));
    try {
      await ensureInitialDek(h, keyCtx);
    } catch (err) {
      await h.close();
      throw err;
    }
    return h;
  }

  /** Closes an evicted handle; the region's close waits for it (closingHandles). */
  function closeHandle(h: StoreHandle): Promise<void> {
    const p = h.close().catch(() => undefined);
    closingHandles.add(p);
    void p.finally(() => closingHandles.delete(p));
    return p;
  }

  function evictIdle(): void {
    for (const [tenant, slot] of slots) {
      if (slots.size <= maxOpen) {
        return;
      }
      if (slot.refs === 0 && slot.handle) {
        slots.delete(tenant);
        park(slot.handle);
        void closeHandle(slot.handle);
      }
    }
  }

  async function acquire(tenant: string, provision: boolean): Promise<Slot> {
    let slot = slots.get(tenant);
    if (slot) {
      slots.delete(tenant);
      slots.set(tenant, slot);
    } else {
      const fresh: Slot = {
        refs: 0,
        provisioned: provision,
        opening: openHandle(tenant, provision),
      };
      fresh.opening.then(
        (h) => {
          fresh.handle = h;
        },
        () => {
          if (slots.get(tenant) === fresh) {
            slots.delete(tenant);
          }
        },
      );
      slots.set(tenant, fresh);
      slot = fresh;
    }
    slot.refs += 1;
    try {
      const h = await slot.opening;
      if (provision && !slot.provisioned) {
        await ensureInitialDek(h, keyCtx);
        slot.provisioned = true;
      }
    } catch (err) {
      slot.refs -= 1;
      throw err;
    }
    evictIdle();
    return slot;
  }

  function release(slot: Slot): void {
    slot.refs -= 1;
    if (slots.size > maxOpen) {
      evictIdle();
    }
  }

  async function use<T>(
    tenant: string,
    fn: (h: StoreHandle) => Promise<T>,
    useOpts: { provision?: boolean } = {},
  ): Promise<T> {
    assertTenantId(tenant);
    if (state.closed) {
      throw new ConflictError(`the stores of region ${region} are closed`);
    }
    const reason = blocked.get(tenant);
    if (reason !== undefined) {
      throw new StoreBusyError(tenant, reason);
    }
    const slot = await acquire(tenant, useOpts.provision ?? true);
    try {
      return await fn(slot.handle ?? (await slot.opening));
    } finally {
      release(slot);
    }
  }

  /** Blocks new use of the tenant, stops its jobs, waits for in-flight use, closes its handle. */
  async function quiesce(tenant: string, reason: string): Promise<void> {
    const already = blocked.get(tenant);
    if (already !== undefined) {
      throw new StoreBusyError(tenant, already);
    }
    blocked.set(tenant, reason);
    parkedDeks.delete(tenant);
    for (const [id, w] of watchers) {
      if (w.tenant === tenant) {
        unwatch(id);
      }
    }
    const stops: Array<Promise<void>> = [];
    for (const runner of runners.values()) {
      if (runner.tenant === tenant) {
        runner.stop = true;
        runner.wake?.();
        stops.push(runner.promise);
      }
    }
    await Promise.all(stops);
    for (;;) {
      const slot = slots.get(tenant);
      if (!slot) {
        break;
      }
      if (slot.refs === 0) {
        slots.delete(tenant);
        const h = await slot.opening.catch(() => undefined);
        await h?.close();
        break;
      }
      await sleep(5);
    }
    await Promise.all([...closingHandles]);
  }

  // ---- jobs --------------------------------------------------------------------------------

  async function pause(runner: Runner, ms: number): Promise<void> {
    if (ms <= 0 || isStopped(runner)) {
      return;
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, ms);
      runner.wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    runner.wake = undefined;
  }

  function unwatch(id: string): void {
    const w = watchers.get(id);
    if (w) {
      clearTimeout(w.timer);
      watchers.delete(id);
    }
  }

  /**
   * Another replica holds job `id`'s lease, which ends in `waitMs` unless renewed: look again
   * then, and take the job over if it was not renewed (its owner stopped or died).
   */
  function watchJob(tenant: string, id: string, waitMs: number): void {
    unwatch(id);
    if (state.closed || blocked.has(tenant)) {
      return;
    }
    const timer = setTimeout(
      () => {
        watchers.delete(id);
        startDekJob(tenant, id);
      },
      Math.max(0, waitMs) + watchMarginMs,
    );
    timer.unref();
    watchers.set(id, { tenant, timer });
  }

  /**
   * Runs (or watches) a running job that was read with the database's clock: runs it here if
   * no live replica holds its lease (none, an expired one, or this instance's), else watches.
   */
  function adoptJob(tenant: string, read: JobRead): void {
    const { job } = read;
    if (job.status !== 'running' || runners.has(job.id) || state.closed) {
      return;
    }
    const holder = leaseHolder(job, lease.owner, read.nowMs);
    if (holder.kind !== 'held') {
      startDekJob(tenant, job.id);
    } else if (!watchers.has(job.id)) {
      watchJob(tenant, job.id, holder.waitMs);
    }
  }

  /**
   * Pauses `ms` between two batches of a job this runner holds, renewing the lease at least
   * every half lease so that a throttle longer than the lease never loses it while this
   * process lives. False: the runner must stop (job ended, lease lost: then watched).
   */
  async function pauseHoldingLease(
    runner: Runner,
    tenant: string,
    id: string,
    ms: number,
  ): Promise<boolean> {
    const slice = Math.max(1, Math.floor(jobLeaseMs / 2));
    let left = ms;
    while (left > 0 && !isStopped(runner)) {
      const step = Math.min(left, slice);
      await pause(runner, step);
      left -= step;
      if (left <= 0 || isStopped(runner)) {
        break;
      }
      let claim: Awaited<ReturnType<typeof renewJobLease>>;
      try {
        claim = await use(tenant, (h) => renewJobLease(h, id, lease, now), { provision: false });
      } catch (err) {
        // Not the job's fault: it stays `running`; the retry (or, once this lease expired,
        // another replica) runs it again.
        if (!isStopped(runner) && !blocked.has(tenant)) {
          retryLater(tenant, err);
        }
        return false;
      }
      if ('finished' in claim) {
        return false;
      }
      if (claim.held) {
        watchJob(tenant, id, claim.waitMs);
        return false;
      }
    }
    return true;
  }

  /** Reports a job's start or end (`onJobStart`, `onJobEnd`): a listener's fault is ignored. */
  function tell(report: () => void): void {
    try {
      report();
    } catch {
      // The job goes on whatever a listener does.
    }
  }

  /** Reports the end of DEK job `id` as the store has it (nothing if still running or gone). */
  async function reportDekEnd(tenant: string, id: string): Promise<void> {
    if (!opts.onJobEnd) {
      return;
    }
    const read = await use(tenant, (h) => readJob(h, id), { provision: false }).catch(
      () => undefined,
    );
    if (read && read.job.status !== 'running') {
      const info = dekJobInfo(read.job, region, tenant);
      tell(() => opts.onJobEnd?.(info));
    }
  }

  /** Reports DEK job `id` resumed here, at `doneBefore` records of its total. */
  async function reportDekResumed(tenant: string, id: string, doneBefore: number): Promise<void> {
    if (!opts.onJobStart) {
      return;
    }
    const read = await use(tenant, (h) => readJob(h, id), { provision: false }).catch(
      () => undefined,
    );
    if (read) {
      const info = { ...dekJobInfo(read.job, region, tenant), done: doneBefore };
      tell(() => opts.onJobStart?.(info, 'resumed'));
    }
  }

  /**
   * Runs DEK job `id` here. `how`: `started` when the rotation was just asked here (reported by
   * the caller), else `resumed` (reported once a first batch here holds the lease).
   */
  function startDekJob(tenant: string, id: string, how: 'started' | 'resumed' = 'resumed'): void {
    unwatch(id);
    if (runners.has(id) || state.closed) {
      return;
    }
    const runner: Runner = { tenant, stop: false, promise: Promise.resolve() };
    let announced = how === 'started';
    runner.promise = (async () => {
      for (;;) {
        if (isStopped(runner)) {
          return;
        }
        let result: BatchResult;
        try {
          result = await use(
            tenant,
            async (h) => {
              const startMs = performance.now();
              const r = await runRewrapBatch(
                h,
                keyCtx,
                id,
                { emergency: batchSize, scheduled: scheduledBatchSize },
                lease,
                runner.next,
              );
              if (r.leased) {
                return r;
              }
              runner.session ??= { startDone: r.job?.doneBefore ?? 0, startMs };
              runner.next = r.next;
              if (r.destroyed.length > 0) {
                await h.compact();
              }
              return r;
            },
            { provision: false },
          );
          if (result.leased) {
            // Another replica runs it: this one stops and looks again when that lease ends.
            watchJob(tenant, id, result.leased.waitMs);
            return;
          }
          if (!announced && result.job) {
            announced = true;
            await reportDekResumed(tenant, id, result.job.doneBefore);
          }
          if (result.finished) {
            return; // done, or superseded: reported below
          }
          const ms = result.job?.emergency ? emergencyThrottleMs : throttleMs;
          if (!(await pauseHoldingLease(runner, tenant, id, ms))) {
            return;
          }
        } catch (err) {
          if (isStopped(runner) || blocked.has(tenant)) {
            return; // interrupted: the job stays `running` in the store and resumes later
          }
          if (isStoreUnavailableError(err)) {
            // The database could not serve the batch (connections, timeouts): not the job's
            // fault. It stays `running` in the store and is started again by the retry (or,
            // its lease expired, by another replica).
            retryLater(tenant, err);
            return;
          }
          const message = safeMessage(err);
          const failed = await use(tenant, (h) => failJob(h, keyCtx, id, message, lease), {
            provision: false,
          }).catch(() => false);
          const info = failed ? await findJob(id).catch(() => undefined) : undefined;
          if (info) {
            announced = true; // failed here: its end is reported below
            opts.onJobError?.(info, err);
          }
          return;
        }
      }
    })()
      .then(async () => {
        // However the runner stopped (last batch, superseded by a newer rotation, failed, lease
        // renewal finding it ended), a job it ran that no longer runs has ended: report it once.
        // One interrupted (closing, database unavailable) still runs and resumes later.
        if (announced && !state.closed && !blocked.has(tenant)) {
          await reportDekEnd(tenant, id);
        }
      })
      .finally(() => {
        runners.delete(id);
      });
    runners.set(id, runner);
  }

  function kekJobId(version: number): string {
    return `kek.${region}.${version}`;
  }

  function kekInfo(job: { info: JobInfo; runner: Runner }): JobInfo {
    const { info, runner } = job;
    const out = { ...info };
    if (info.status === 'running' && runner.session) {
      const seconds = (performance.now() - runner.session.startMs) / 1000;
      out.rate = seconds > 0 ? Math.round((info.done / seconds) * 10) / 10 : 0;
      out.etaSeconds = out.rate > 0 ? Math.ceil((info.total - info.done) / out.rate) : null;
    } else if (info.status === 'done') {
      out.etaSeconds = 0;
    }
    return out;
  }

  function startKekJob(
    primary: number,
    actor?: string,
    how: 'started' | 'resumed' = 'started',
  ): JobInfo {
    const at = now().toISOString();
    const info: JobInfo = {
      id: kekJobId(primary),
      region,
      kind: 'kek-rewrap',
      status: 'running',
      emergency: false,
      done: 0,
      total: 0,
      rate: 0,
      etaSeconds: null,
      startedAt: at,
      updatedAt: at,
    };
    const runner: Runner = {
      stop: false,
      promise: Promise.resolve(),
      session: { startDone: 0, startMs: performance.now() },
    };
    runner.promise = (async () => {
      try {
        const tenants = await backend.list();
        info.total = tenants.length;
        tell(() => opts.onJobStart?.({ ...info }, how));
        for (const tenant of tenants) {
          if (isStopped(runner)) {
            return; // the provider still says `retiring`: resumePendingJobs restarts it
          }
          if (!blocked.has(tenant) && (await provider.hasTenantKey(tenant))) {
            await use(tenant, (h) => rewrapDeksToPrimaryKek(h, keyCtx, actor), {
              provision: false,
            });
          }
          info.done += 1;
          info.updatedAt = now().toISOString();
        }
        await provider.completeKekRotation();
        info.status = 'done';
        info.finishedAt = now().toISOString();
        info.updatedAt = info.finishedAt;
        tell(() => opts.onJobEnd?.({ ...info }));
      } catch (err) {
        info.status = 'failed';
        info.error = safeMessage(err);
        info.updatedAt = now().toISOString();
        opts.onJobError?.({ ...info }, err);
        tell(() => opts.onJobEnd?.({ ...info }));
      }
    })();
    const job = { info, runner };
    if (kekJob) {
      // Not running (a rotation starts only then): kept as it ended. A job of the same KEK
      // version (resumed after it failed) replaces its earlier run.
      const ended = kekInfo(kekJob);
      const same = kekHistory.findIndex((j) => j.id === info.id);
      if (same >= 0) {
        kekHistory.splice(same, 1);
      }
      if (ended.id !== info.id) {
        kekHistory.push(ended);
      }
      kekHistory.splice(0, Math.max(0, kekHistory.length - (KEK_JOB_HISTORY - 1)));
    }
    kekJob = job;
    return kekInfo(job);
  }

  async function findJob(id: string): Promise<JobInfo | undefined> {
    const dek = parseDekJobId(id);
    if (dek) {
      if (!(await backend.exists(dek.tenant))) {
        return undefined;
      }
      const read = await use(dek.tenant, (h) => readJob(h, id), { provision: false });
      if (!read) {
        return undefined;
      }
      // A job left by a replica that stopped (its lease expired, or none) goes on here.
      adoptJob(dek.tenant, read);
      return dekJobInfo(read.job, region, dek.tenant, runners.get(id)?.session);
    }
    const kek = /^kek\.([a-z0-9-]+)\.([1-9][0-9]{0,8})$/.exec(id);
    if (kek?.[1] !== region || kek[2] === undefined) {
      return undefined;
    }
    if (kekJob?.info.id === id) {
      return kekInfo(kekJob);
    }
    const version = Number(kek[2]);
    const described = await provider.describe();
    const k = described.keks.find((x) => x.version === version);
    // The next version's rotation replaced this KEK (it could start only once this job ended).
    const next = described.keks
      .filter((x) => x.version > version)
      .reduce<number | undefined>((min, x) => Math.min(min ?? x.version, x.version), undefined);
    const superseded =
      k && k.status !== 'primary' && next !== undefined ? { supersededBy: kekJobId(next) } : {};
    const ran = kekHistory.findLast((j) => j.id === id);
    if (ran) {
      return { ...ran, ...superseded };
    }
    // Not run by this process (or no longer remembered): what the provider's KEK states say.
    if (!k) {
      return undefined;
    }
    if (k.status !== 'primary') {
      // A newer rotation rewrapped every DEK of the region: this job's work is done.
      return {
        id,
        region,
        kind: 'kek-rewrap',
        status: 'done',
        emergency: false,
        done: 0,
        total: 0,
        rate: 0,
        etaSeconds: 0,
        startedAt: k.createdAt,
        updatedAt: k.createdAt,
        ...superseded,
      };
    }
    const pending = described.keks.some((x) => x.status === 'retiring');
    return {
      id,
      region,
      kind: 'kek-rewrap',
      status: pending ? 'running' : 'done',
      emergency: false,
      done: 0,
      total: 0,
      rate: 0,
      etaSeconds: pending ? null : 0,
      startedAt: k.createdAt,
      updatedAt: k.createdAt,
    };
  }

  // ---- resuming jobs ------------------------------------------------------------------------

  /** Tenants whose pending jobs could not be read or run (database unavailable): tried again. */
  const retryTenants = new Set<string>();
  const retry: { all: boolean; timer?: NodeJS.Timeout | undefined } = { all: false };

  function scheduleRetry(): void {
    if (state.closed || retry.timer !== undefined) {
      return;
    }
    retry.timer = setTimeout(() => {
      retry.timer = undefined;
      const only = retry.all ? undefined : [...retryTenants];
      void resumeJobs(only);
    }, resumeRetryMs);
    retry.timer.unref();
  }

  function retryLater(tenant: string | undefined, err: unknown): void {
    if (tenant === undefined) {
      retry.all = true;
    } else {
      retryTenants.add(tenant);
    }
    opts.onResumeError?.(tenant, err);
    scheduleRetry();
  }

  /**
   * The tenant's `running` jobs. A store opened only for this is closed again at once unless it
   * has one: the scan visits every store of the region, and each open PostgreSQL store keeps a
   * pooled connection (two replicas booting with 140 tenants went past max_connections).
   */
  async function pendingJobRows(tenant: string): Promise<JobRow[]> {
    const wasOpen = slots.has(tenant);
    const rows = await use(
      tenant,
      (h) => h.models.Job.findAll({ where: { status: 'running' }, raw: true }),
      { provision: false },
    );
    const slot = slots.get(tenant);
    if (!wasOpen && rows.length === 0 && slot?.refs === 0 && slot.handle) {
      slots.delete(tenant);
      park(slot.handle);
      await closeHandle(slot.handle);
    }
    return rows;
  }

  /** Starts the pending jobs of `only` (default: every store of the region). Never rejects. */
  async function resumeJobs(only?: readonly string[]): Promise<JobInfo[]> {
    const started: JobInfo[] = [];
    if (state.closed) {
      return started;
    }
    let tenants: readonly string[];
    if (only === undefined) {
      try {
        tenants = await backend.list();
        retry.all = false;
      } catch (err) {
        retryLater(undefined, err);
        return started;
      }
    } else {
      tenants = only;
    }
    for (const tenant of tenants) {
      retryTenants.delete(tenant);
      if (blocked.has(tenant) || isRegionClosed()) {
        continue;
      }
      let rows: JobRow[];
      try {
        rows = await pendingJobRows(tenant);
      } catch (err) {
        if (err instanceof NotFoundError) {
          continue; // deprovisioned meanwhile
        }
        if (isStoreUnavailableError(err)) {
          retryLater(tenant, err);
        } else {
          opts.onResumeError?.(tenant, err); // e.g. a store of another tenant: not retried
        }
        continue;
      }
      for (const row of rows) {
        startDekJob(tenant, row.id);
        started.push(dekJobInfo(row, region, tenant, runners.get(row.id)?.session));
      }
    }
    return started;
  }

  const onRecordWrite = opts.onRecordWrite;
  // The soft wrap limit's rotation (wrap-limit.ts): scheduled, by `system`, once per key.
  const wrapWatch = createWrapLimitWatch({
    limits: wrapLimits,
    rotate: (tenant, version) =>
      ctx.rotateDek(tenant, {
        emergency: false,
        actor: 'system',
        reason: 'wrap_limit',
        onlyIfPrimary: version,
      }),
    tell: (event) => {
      tell(() => opts.onWrapLimit?.(event));
    },
  });
  const ctx: RegionContext = {
    region,
    provider,
    now,
    wrapLimits,
    leaseMs: jobLeaseMs,
    use,
    wrapsCommitted: (tenant, key, count) => {
      if (!state.closed) {
        wrapWatch.committed(tenant, key, count);
      }
    },
    wrapsRefused: (tenant, err) => {
      if (!state.closed) {
        wrapWatch.refused(
          tenant,
          {
            version: err.version,
            ...(err.createdAt !== undefined ? { createdAt: err.createdAt } : {}),
          },
          err.wraps,
        );
      }
    },
    ...(onRecordWrite
      ? {
          recordWritten: (record: 'invocation' | 'feedback', seconds: number) => {
            tell(() => {
              onRecordWrite(record, seconds);
            });
          },
        }
      : {}),
    async rotateDek(tenant, rotateOpts) {
      let row: JobRow;
      try {
        row = await use(tenant, (h) => rotateDek(h, keyCtx, { ...rotateOpts, lease }));
      } catch (err) {
        if (err instanceof ConflictError) {
          // Refused while a job runs: if the replica running it stopped, it goes on here.
          await use(tenant, (h) => readRunningJobs(h), { provision: false })
            .then((reads) => {
              for (const read of reads) {
                adoptJob(tenant, read);
              }
            })
            .catch(() => undefined);
        }
        throw err;
      }
      const info = dekJobInfo(row, region, tenant);
      tell(() => opts.onJobStart?.(info, 'started'));
      startDekJob(tenant, row.id, 'started');
      return dekJobInfo(row, region, tenant, runners.get(row.id)?.session);
    },
  };

  const facades = new Map<string, TenantStore>();

  return {
    region,
    jobOwner: lease.owner,

    store(tenantId) {
      assertTenantId(tenantId);
      let facade = facades.get(tenantId);
      if (!facade) {
        facade = createTenantStore(ctx, tenantId);
        if (facades.size >= 10_000) {
          facades.clear();
        }
        facades.set(tenantId, facade);
      }
      return facade;
    },

    async provisionTenant(tenantId) {
      assertTenantId(tenantId);
      const reason = blocked.get(tenantId);
      if (reason !== undefined) {
        throw new StoreBusyError(tenantId, reason);
      }
      await provider.createTenantKey(tenantId, { recreate: true });
      await use(tenantId, (h) => ensureInitialDek(h, keyCtx, { recreate: true }));
    },

    listTenants: () => backend.list(),

    findJob,

    async listJobs(tenantId) {
      assertTenantId(tenantId);
      if (!(await backend.exists(tenantId))) {
        return [];
      }
      const rows = await use(
        tenantId,
        (h) => h.models.Job.findAll({ order: [['n', 'DESC']], raw: true }),
        {
          provision: false,
        },
      );
      return rows.map((r) => dekJobInfo(r, region, tenantId, runners.get(r.id)?.session));
    },

    async waitForJob(id) {
      // findJob resumes a job left running by a crash or restart here, or watches the replica
      // that holds it.
      let info = await findJob(id);
      if (!info) {
        throw new NotFoundError('job');
      }
      const dek = parseDekJobId(id);
      if (dek) {
        const pollMs = Math.min(1_000, Math.max(10, Math.round(jobLeaseMs / 4)));
        while (info.status === 'running' && !state.closed) {
          const runner = runners.get(id);
          if (runner) {
            await runner.promise;
          } else if (watchers.has(id)) {
            await sleep(pollMs); // another replica runs it
          } else {
            break; // stopped here (closing, database unavailable): still running
          }
          info = (await findJob(id)) ?? info;
        }
        return info;
      }
      if (kekJob?.info.id === id) {
        await kekJob.runner.promise;
      }
      return (await findJob(id)) ?? info;
    },

    async resumePendingJobs() {
      const started = await resumeJobs();
      const described = await provider.describe();
      if (
        kekJob?.info.status !== 'running' &&
        described.keks.some((k) => k.status === 'retiring')
      ) {
        started.push(startKekJob(described.primaryKekVersion, undefined, 'resumed'));
      }
      return started;
    },

    async rotateKek(rotateOpts = {}) {
      if (kekJob?.info.status === 'running') {
        throw new ConflictError(`KEK rewrap job ${kekJob.info.id} is still running`);
      }
      const { primary } = await provider.rotateKek();
      return startKekJob(primary, rotateOpts.actor);
    },

    async deprovisionTenant(tenantId): Promise<DeprovisionResult> {
      assertTenantId(tenantId);
      await quiesce(tenantId, 'deprovisioned');
      try {
        // Crypto-shred first: from here on no wrapped DEK of the tenant can be unwrapped,
        // wherever a copy of it lives (store, WAL, backups).
        const tenantKeyDestroyed = await provider.destroyTenantKey(tenantId);
        let dekVersionsDestroyed = 0;
        let storeDeleted = false;
        if (await backend.exists(tenantId)) {
          try {
            const h = await backend.open(tenantId, false);
            try {
              // The primary row first, like a rotation (lock order: tenants/DATA-PLANE.md), so
              // it cannot deadlock with another replica's write or rewrap batch.
              dekVersionsDestroyed = await h.writeTx(
                async (t) => {
                  await lockPrimaryForUpdate(h, t);
                  const live = await h.models.Dek.count({
                    where: { status: { [Op.ne]: 'destroyed' } },
                    transaction: t,
                  });
                  await h.models.Dek.update(
                    {
                      status: 'destroyed',
                      wrapped: null,
                      kekVersion: null,
                      destroyedAt: now().toISOString(),
                    },
                    { where: {}, transaction: t },
                  );
                  return live;
                },
                { alone: true },
              );
              await h.compact();
            } finally {
              await h.close();
            }
          } catch (err) {
            if (!(err instanceof ConflictError) && !(err instanceof NotFoundError)) {
              throw err;
            }
            // Not this tenant's store (or not a store at all): it is deleted all the same.
          }
          await backend.remove(tenantId);
          storeDeleted = true;
        }
        // Staged copies of killed restores: ciphertext under the destroyed key, but the
        // region's folder must hold nothing of the tenant.
        removeAbandonedRestores(backend, tenantId);
        return { tenant: tenantId, region, tenantKeyDestroyed, dekVersionsDestroyed, storeDeleted };
      } finally {
        blocked.delete(tenantId);
      }
    },

    async backupTenant(tenantId, backupDir) {
      assertTenantId(tenantId);
      if (!(await backend.exists(tenantId))) {
        throw new NotFoundError(`store of tenant ${tenantId}`);
      }
      return use(
        tenantId,
        async (h) => {
          const result = await writeBackup(h, backupDir, now, provider);
          await appendAudit(
            h,
            {
              type: 'backup.created',
              outcome: 'success',
              detail: { createdAt: result.createdAt, invocations: result.counts.invocations },
            },
            now,
          );
          return result;
        },
        { provision: false },
      );
    },

    async restoreTenant(backupPath, restoreOpts = {}): Promise<RestoreResult> {
      if (restoreOpts.tenant !== undefined) {
        assertTenantId(restoreOpts.tenant);
      }
      // The tenant is blocked here from the start, not only for the swap: a record written
      // here while the copy is staged (its call answered 200) would be dropped by the swap.
      // Other replicas' writes meanwhile make the swap refuse (PostgreSQL; see stageRestore).
      const tenant = restoreOpts.tenant ?? readManifestShape(path.resolve(backupPath)).tenant;
      assertTenantId(tenant);
      await quiesce(tenant, 'restored');
      let staged: Awaited<ReturnType<typeof stageRestore>> | undefined;
      try {
        staged = await stageRestore(backend, backupPath, {
          region: restoreOpts.region ?? region,
          tenant,
          stagingSuffix: randomSuffix(),
          keyProvider: provider,
          allowUnauthenticated: restoreOpts.allowUnauthenticated === true,
        });
        await restoreOpts.onStaged?.();
        await staged.commit();
      } catch (err) {
        await staged?.discard();
        throw err;
      } finally {
        blocked.delete(tenant);
      }
      let keyUnavailable: KeyUnavailableReason | undefined;
      const keyAvailable = await use(
        tenant,
        async (h) => {
          await appendAudit(
            h,
            {
              type: 'backup.restored',
              outcome: 'success',
              detail: { createdAt: staged.manifest.createdAt, authenticated: staged.authenticated },
            },
            now,
          );
          try {
            await getDek(h, keyCtx, await primaryVersion(h));
          } catch (err) {
            if (err instanceof KeyUnavailableError) {
              keyUnavailable = err.reason;
              return false;
            }
            throw err;
          }
          // A backup taken mid-rotation carries its job: carry on with it.
          const running = await h.models.Job.findAll({ where: { status: 'running' }, raw: true });
          for (const row of running) {
            startDekJob(tenant, row.id);
          }
          return true;
        },
        { provision: false },
      );
      return {
        tenant,
        region,
        backupCreatedAt: staged.manifest.createdAt,
        counts: staged.manifest.counts,
        keyAvailable,
        ...(keyUnavailable !== undefined ? { keyUnavailableReason: keyUnavailable } : {}),
        authenticated: staged.authenticated,
      };
    },

    ping: () => backend.ping(),

    async runningJobs() {
      const dek = await Promise.all(
        [...runners.keys()].map((id) => findJob(id).catch(() => undefined)),
      );
      const all = [...dek, ...(kekJob?.info.status === 'running' ? [kekInfo(kekJob)] : [])];
      return all.filter((j): j is JobInfo => j?.status === 'running');
    },

    stats() {
      return {
        region,
        dialect: backend.dialect,
        open: slots.size,
        maxOpen,
        runningJobs: runners.size + (kekJob?.info.status === 'running' ? 1 : 0),
      };
    },

    async close() {
      if (state.closed) {
        return;
      }
      state.closed = true;
      await wrapWatch.idle();
      clearTimeout(retry.timer);
      retry.timer = undefined;
      parkedDeks.clear();
      for (const id of [...watchers.keys()]) {
        unwatch(id);
      }
      const held = [...runners.entries()].flatMap(([id, r]) =>
        r.tenant !== undefined ? [{ id, tenant: r.tenant }] : [],
      );
      const all = [...runners.values(), ...(kekJob ? [kekJob.runner] : [])];
      for (const r of all) {
        r.stop = true;
        r.wake?.();
      }
      await Promise.all(all.map((r) => r.promise));
      // Hand the jobs over now rather than when their leases expire (a restart or another
      // replica resumes them at once). Best effort: a lease not released just expires.
      for (const { id, tenant } of held) {
        const h = await slots.get(tenant)?.opening.catch(() => undefined);
        if (h) {
          await releaseJobLease(h, id, lease.owner).catch(() => undefined);
        }
      }
      for (const [tenant, slot] of [...slots]) {
        slots.delete(tenant);
        const h = await slot.opening.catch(() => undefined);
        await h?.close();
      }
      await Promise.all([...closingHandles]);
      await backend.close();
    },
  };
}
