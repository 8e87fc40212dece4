/**
 * Retention: purges the invocation records (and their feedback) of each tenant with a retention
 * period (`retention.recordDays`) once they are older than it, in this process's region. The
 * server runs a pass periodically (CELLCDS_RECORD_PURGE_INTERVAL_MS); `cellcds records purge`
 * runs one tenant on demand. Among replicas, each tenant's store lets one run at a time (its
 * purge lease, tenants/DATA-PLANE.md "Retention"): the others skip it. Logs carry tenant ids,
 * counts and error classes only, never PHI.
 */
import type { ControlPlane, PurgeResult, RegionStores } from '../tenants/index.ts';
import type { Logger } from './logger.ts';

const DAY_MS = 86_400_000;
/** The first periodic pass starts this long after boot (or after one interval, if shorter). */
export const FIRST_PURGE_DELAY_MS = 60_000;

/** The cutoff of a retention period: records whose invocation time is before it are purged. */
export function retentionCutoff(now: Date, recordDays: number): Date {
  return new Date(now.getTime() - recordDays * DAY_MS);
}

/** What a pass did for one tenant. */
export interface TenantPurgeOutcome {
  tenant: string;
  recordDays: number;
  result?: PurgeResult;
  /** The error's class (no message: it could name a path or a host), when the purge failed. */
  error?: string;
  /** Why the tenant was not purged in this pass, when it was left for a later one. */
  deferred?: 'migration_in_progress';
}

/** The control-plane events that start, resume and end a region migration (server/migrate.ts). */
const MIGRATION_EVENTS = [
  'migration.started',
  'migration.resumed',
  'migration.completed',
  'migration.failed',
] as const;

/**
 * Whether a region migration of `tenant` is in progress: its latest migration event in the
 * control-plane trail is `migration.started` or `migration.resumed` (a run under way, or one
 * that died and will be resumed). Read only for suspended tenants (a migration suspends its
 * tenant first).
 */
async function migrationInProgress(controlPlane: ControlPlane, tenant: string): Promise<boolean> {
  const events = (
    await Promise.all(MIGRATION_EVENTS.map((type) => controlPlane.audit.list({ tenant, type })))
  ).flat();
  const last = events.reduce<(typeof events)[number] | undefined>(
    (latest, e) => (latest === undefined || e.seq > latest.seq ? e : latest),
    undefined,
  );
  return last?.type === 'migration.started' || last?.type === 'migration.resumed';
}

export interface RecordPurgeDeps {
  controlPlane: ControlPlane;
  stores: RegionStores;
  log: Logger;
  now: () => Date;
  /** Counts what each tenant's purge deleted, or its failure (server/metrics.ts). */
  metrics?: { recordPurge(outcome: { invocations: number; feedback: number } | 'failed'): void };
}

/** A short, PHI-free name of an error: its class, and a driver code if it has one. */
function errorClass(err: unknown): { type: string; code?: string } {
  const type = err instanceof Error ? err.name : typeof err;
  const code = (err as { code?: unknown } | undefined)?.code;
  return typeof code === 'string' && /^[A-Za-z0-9_]{1,40}$/.test(code) ? { type, code } : { type };
}

/**
 * One pass: every tenant registered with a retention period whose store is in this region
 * (but one being migrated), purged up to its cutoff (now minus its period). A tenant whose purge fails is logged and
 * skipped (the next pass tries again); the others go on. Never rejects for one tenant.
 */
export async function purgeExpiredRecords(
  deps: RecordPurgeDeps,
  opts: { signal?: AbortSignal } = {},
): Promise<TenantPurgeOutcome[]> {
  const { log } = deps;
  const tenants = (await deps.controlPlane.tenants.list()).filter((t) => t.retention);
  if (tenants.length === 0) {
    return [];
  }
  const here = new Set(await deps.stores.listTenants());
  const outcomes: TenantPurgeOutcome[] = [];
  for (const tenant of tenants) {
    const recordDays = tenant.retention?.recordDays;
    if (recordDays === undefined || !here.has(tenant.id)) {
      continue;
    }
    if (opts.signal?.aborted === true) {
      break;
    }
    // A region migration suspends its tenant and needs the store unchanged from its snapshot to
    // its commit (a purge in between makes it snapshot again, on every pass for a long move):
    // while one is in progress, or was interrupted and not resumed, the tenant waits (a warn
    // line each pass). Any other suspended tenant is purged as an active one.
    if (
      tenant.status === 'suspended' &&
      (await migrationInProgress(deps.controlPlane, tenant.id))
    ) {
      outcomes.push({ tenant: tenant.id, recordDays, deferred: 'migration_in_progress' });
      log.warn(
        { tenant: tenant.id, retentionDays: recordDays },
        'record purge deferred: a region migration of the tenant is in progress (its last migration event is migration.started or migration.resumed)',
      );
      continue;
    }
    const started = performance.now();
    try {
      const result = await deps.stores.store(tenant.id).purgeRecords({
        before: retentionCutoff(deps.now(), recordDays),
        retentionDays: recordDays,
        actor: 'system',
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      outcomes.push({ tenant: tenant.id, recordDays, result });
      deps.metrics?.recordPurge({ invocations: result.invocations, feedback: result.feedback });
      const fields = {
        tenant: tenant.id,
        retentionDays: recordDays,
        cutoff: result.cutoff,
        invocations: result.invocations,
        feedback: result.feedback,
        batches: result.batches,
        ms: Math.round(performance.now() - started),
        ...(result.resumed ? { resumed: result.resumed } : {}),
        ...(result.stopped === true ? { stopped: true } : {}),
      };
      if (result.skipped) {
        log.debug({ tenant: tenant.id }, 'record purge skipped: another replica is purging');
      } else if (result.invocations + result.feedback > 0 || result.resumed) {
        log.info(fields, 'records purged (retention)');
      }
    } catch (err) {
      const error = errorClass(err);
      outcomes.push({ tenant: tenant.id, recordDays, error: error.type });
      deps.metrics?.recordPurge('failed');
      log.error(
        { tenant: tenant.id, retentionDays: recordDays, err: error },
        'record purge failed for a tenant (retried at the next pass; other tenants go on)',
      );
    }
  }
  return outcomes;
}

/** The periodic purge of a serving process. */
export interface RecordPurgeTimer {
  /** Runs a pass now (after the one in flight, if any) and resolves with it. */
  runNow(): Promise<TenantPurgeOutcome[]>;
  /** Stops the timer; a pass in flight stops after its batch (audited) and is awaited. */
  stop(): Promise<void>;
}

/**
 * Starts the periodic purge: a first pass `firstDelayMs` after start (default: a minute, or
 * one interval if shorter), then one every `intervalMs` after the previous one ended (passes
 * never overlap). Timers are unref'd: they never keep the process alive.
 */
export function startRecordPurge(
  deps: RecordPurgeDeps,
  opts: { intervalMs: number; firstDelayMs?: number },
): RecordPurgeTimer {
  const stopper = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  let current: Promise<TenantPurgeOutcome[]> = Promise.resolve([]);
  const pass = (): Promise<TenantPurgeOutcome[]> => {
    const next = current.then(() =>
      purgeExpiredRecords(deps, { signal: stopper.signal }).catch((err: unknown) => {
        // The tenant list or the region's store list could not be read: the next pass retries.
        deps.log.error({ err: errorClass(err) }, 'record purge pass failed (retried)');
        return [];
      }),
    );
    current = next;
    return next;
  };
  const schedule = (ms: number): void => {
    if (stopper.signal.aborted) {
      return;
    }
    timer = setTimeout(() => {
      void pass().then(() => {
        schedule(opts.intervalMs);
      });
    }, ms);
    timer.unref();
  };
  schedule(opts.firstDelayMs ?? Math.min(FIRST_PURGE_DELAY_MS, opts.intervalMs));
  return {
    runNow: pass,
    async stop() {
      stopper.abort();
      if (timer) {
        clearTimeout(timer);
      }
      await current;
    },
  };
}
