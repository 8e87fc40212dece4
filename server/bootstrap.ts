/**
 * Builds the service's dependencies from configuration: data directory, control plane,
 * evaluator, token verifier, bootstrap operator token, demo seed. Used by main.ts (serve)
 * and by CLI commands that work on the local data directory.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { createEvaluator } from '../rules/index.ts';
import {
  KeyUnavailableError,
  createLocalKeyProvider,
  createMemoryReplayCache,
  createRedisReplayCache,
  createTokenVerifier,
  openControlPlane,
  openRegionStores,
  RedisEvictsKeysError,
  RedisUnsupportedError,
  RedisVersionError,
} from '../tenants/index.ts';
import type {
  ControlPlane,
  JobInfo,
  ReplayBackendState,
  ReplayCache,
  ReplayTrustEvent,
  WrapLimitEvent,
} from '../tenants/index.ts';
import { hashToken } from './admin-routes.ts';
import { asBootError, bootStep } from './boot-failure.ts';
import { createFailureAuditor } from './failure-audit.ts';
import { ConfigError } from './config.ts';
import type { Config } from './config.ts';
import type { Deps } from './context.ts';
import type { Logger } from './logger.ts';
import { Metrics } from './metrics.ts';
import { loadRegionMatrix, selectRegion } from './regions.ts';
import { startRecordPurge } from './retention.ts';
import { ServiceDirectory } from './service-directory.ts';

export const ADMIN_TOKEN_FILE = 'admin-token';

/**
 * How a wrap-limit event is logged: a rotation another process is running is expected (replicas
 * crossing the soft limit together rotate once), not a failure.
 */
const WRAP_LIMIT_LOG: Record<
  WrapLimitEvent['outcome'],
  readonly ['info' | 'warn' | 'error', string]
> = {
  rotation_started: ['warn', 'DEK version reached its soft wrap limit: rotation started'],
  rotation_running: [
    'info',
    'DEK version reached its soft wrap limit: a rotation is already running or done (retried if not)',
  ],
  rotation_failed: [
    'error',
    'DEK version reached its soft wrap limit: rotation could not start (retried)',
  ],
  refused: ['error', 'DEK version at its hard wrap limit: write refused (rotate the tenant keys)'],
};

/**
 * Creates the data directory (0700) if needed. One that group or others may read (made by the
 * operator, 0755 under the usual umask) is left as it is but warned about: its files are 0600,
 * yet anyone on the host could list the tenant stores' names and the backups.
 */
export function ensureDataDir(dataDir: string, log?: Logger): void {
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const mode = fs.statSync(dataDir).mode & 0o777;
  if (log && (mode & 0o077) !== 0) {
    log.warn(
      { dataDir, mode: mode.toString(8), fix: `chmod 700 ${dataDir}` },
      'data directory is accessible to group or others',
    );
  }
}

/**
 * The bootstrap operator token: CELLCDS_ADMIN_TOKEN if set; otherwise read from, or
 * generated into, `<data>/admin-token` (mode 0600). Never logged.
 */
export function ensureAdminToken(config: Config): {
  hash: Buffer;
  source: 'env' | 'file' | 'generated';
  file?: string;
} {
  if (config.adminToken) {
    return { hash: hashToken(config.adminToken), source: 'env' };
  }
  const file = path.join(config.dataDir, ADMIN_TOKEN_FILE);
  if (fs.existsSync(file)) {
    const token = fs.readFileSync(file, 'utf8').trim();
    return { hash: hashToken(token), source: 'file', file };
  }
  const token = `ccds_op_${crypto.randomBytes(32).toString('base64url')}`;
  fs.writeFileSync(file, `${token}\n`, { mode: 0o600, flag: 'wx' });
  return { hash: hashToken(token), source: 'generated', file };
}

/**
 * Opens the configured control plane: the PostgreSQL schema of CELLCDS_CONTROL_PLANE_URL (shared
 * by replicas on any host), else `<data>/control.sqlite`. A failure names the setting, never the
 * URL (it may carry a password).
 * @throws BootError naming CELLCDS_CONTROL_PLANE_URL or CELLCDS_DATA_DIR.
 */
export function openConfiguredControlPlane(config: Config, log?: Logger): Promise<ControlPlane> {
  const cp = config.controlPlane;
  // Without a logger (a CLI command), a failed write is a process warning on stderr.
  const tokenUse = log
    ? {
        onAdminTokenUseNotRecorded: (tokenId: string, err: unknown) => {
          log.warn({ tokenId, err }, 'admin token: last use not recorded');
        },
      }
    : {};
  if (cp.kind === 'postgres') {
    return bootStep(
      `control plane (PostgreSQL schema ${cp.schema})`,
      'CELLCDS_CONTROL_PLANE_URL',
      () =>
        openControlPlane({
          postgresUrl: cp.url,
          schema: cp.schema,
          statementTimeoutMs: config.pg.statementTimeoutMs,
          acquireTimeoutMs: config.pg.acquireTimeoutMs,
          ...tokenUse,
        }),
    );
  }
  return bootStep('control plane', 'CELLCDS_DATA_DIR (control.sqlite)', () =>
    openControlPlane({ storage: cp.file, ...tokenUse }),
  );
}

/** Reads the operator token for CLI calls to a running server (env, then the data dir). */
export function readAdminToken(config: Config): string | undefined {
  if (config.adminToken) {
    return config.adminToken;
  }
  const file = path.join(config.dataDir, ADMIN_TOKEN_FILE);
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').trim() : undefined;
}

/**
 * The replicas' shared replay cache. A Redis that may evict keys (maxmemory-policy other than
 * noeviction) stops the boot: it could forget a jti and let its token be replayed. A Redis
 * that does not answer yet does not: tokens are refused until it does (fail closed), and its
 * policy is read before the first token it remembers.
 * @throws ConfigError naming CELLCDS_REDIS_URL when Redis may evict keys, is older than 7.0, or
 *   refuses or lacks what the cache reads (INFO, TIME, INFO fields).
 */
async function sharedReplayCache(
  url: string,
  size: { maxEntries: number; maxPerIssuer: number },
  maxTokenLifetimeSeconds: number,
  log: Logger,
): Promise<ReturnType<typeof createRedisReplayCache>> {
  const cache = createRedisReplayCache({
    url,
    ...size,
    maxTokenLifetimeSeconds,
    onStateChange: replayStateLogger(log),
    onTrustEvent: replayTrustLogger(log),
  });
  try {
    await cache.ready();
    if (!(await cache.durability()).aof) {
      log.warn(
        'the replay cache (Redis) runs without AOF (appendonly no): a Redis restart forgets the jti of every token still valid (tokens issued before it are then refused with 503 for a token lifetime) and the cache counts (docs/operations.md, Scale-out)',
      );
    }
  } catch (err) {
    if (
      err instanceof RedisEvictsKeysError ||
      err instanceof RedisVersionError ||
      err instanceof RedisUnsupportedError
    ) {
      await cache.close();
      throw new ConfigError(`CELLCDS_REDIS_URL: ${err.message}`);
    }
    if (cache.state() !== 'down') {
      // Not a Redis that does not answer (that one is logged by replayStateLogger, as any
      // later outage is): still refused until the cache's next answer says otherwise.
      log.warn(
        { err, replayCache: cache.state() },
        'the replay cache (Redis) failed its boot check: CDS client tokens are refused until it answers',
      );
    }
  }
  return cache;
}

/**
 * Logs, once each, what gets CDS client tokens refused (503) though Redis answers: Redis may have
 * lost jtis (restarted, failed over, evicted keys: tokens issued before are refused until their
 * lifetime is over), its clock is ahead of ours by more than the leeway (every token refused),
 * it refuses or lacks a command or INFO field the cache needs (every token refused); info when the
 * clocks agree again.
 */
export function replayTrustLogger(log: Logger): (event: ReplayTrustEvent) => void {
  return (event) => {
    if (event.kind === 'reset') {
      log.warn(
        {
          replayCache: 'reset',
          cause: event.cause,
          since: event.since.toISOString(),
          until: event.until.toISOString(),
        },
        'the replay cache (Redis) may have lost jtis (restarted, failed over, flushed or evicted keys): CDS client tokens issued before `since` are refused with 503 (replay_backend_reset) until `until`',
      );
    } else if (event.kind === 'unsupported') {
      log.warn(
        { replayCache: 'unsupported' },
        `the replay cache (Redis) lacks what it needs: CDS client tokens are refused with 503 (replay_backend_unsupported) until fixed: ${event.message}`,
      );
    } else if (event.kind === 'clock_skew') {
      log.warn(
        { replayCache: 'clock_skew', skewMs: event.skewMs },
        "the replay cache (Redis)'s clock is ahead of this replica's by more than the JWT leeway: CDS client tokens are refused with 503 (replay_clock_skew) until they agree; fix NTP",
      );
    } else {
      log.info(
        { replayCache: 'clock_ok', skewMs: event.skewMs },
        "the replay cache (Redis)'s clock and this replica's agree again: tokens accepted",
      );
    }
  };
}

/**
 * Logs the replay cache backend's changes, once each (tokens refused meanwhile log only their
 * own `request refused` info lines): warn when Redis stops answering or may evict keys (CDS
 * client tokens get 503 until it is fixed), info when it is back. Of the first state seen at
 * boot only `down` is logged, with the same line and `replayCache: "down"` as a later outage
 * (on-call alerts on it); a Redis that evicts stops the boot, and `up` is no news.
 */
export function replayStateLogger(
  log: Logger,
): (state: ReplayBackendState, previous: ReplayBackendState | undefined) => void {
  return (state, previous) => {
    if (previous === undefined && state !== 'down') {
      return;
    }
    if (state === 'down') {
      log.warn(
        { replayCache: state, previous },
        'the replay cache (Redis) does not answer: CDS client tokens are refused with 503 until it does',
      );
    } else if (state === 'evicting') {
      log.warn(
        { replayCache: state, previous },
        'the replay cache (Redis) may evict keys (maxmemory-policy is not noeviction): CDS client tokens are refused with 503 until it is',
      );
    } else {
      log.info(
        { replayCache: state, previous },
        'the replay cache (Redis) is back: tokens accepted',
      );
    }
  };
}

/**
 * Key jobs' lifecycle: logs (info) each job this process starts, resumes (after a restart, or
 * taken over from a replica whose lease expired) and ends (done, failed with its safe error,
 * superseded), with the job id, tenant id, kind and progress, and counts each end once in
 * `cellcds_rewrap_jobs_finished_total` once metrics exist (a job resumed at boot may end
 * before). No PHI: ids, counts and the job's safe error only.
 */
export function jobObserver(log: Logger): {
  onJobStart: (job: JobInfo, how: 'started' | 'resumed') => void;
  onJobEnd: (job: JobInfo) => void;
  attach: (metrics: Metrics) => void;
} {
  let target: Metrics | undefined;
  const pending: JobInfo[] = [];
  const fields = (job: JobInfo) => ({
    jobId: job.id,
    ...(job.tenant !== undefined ? { tenant: job.tenant } : {}),
    kind: job.kind,
    done: job.done,
    total: job.total,
  });
  return {
    onJobStart(job, how) {
      log.info({ ...fields(job), emergency: job.emergency }, `key job ${how}`);
    },
    onJobEnd(job) {
      log.info(
        {
          ...fields(job),
          status: job.status,
          ...(job.error !== undefined ? { error: job.error } : {}),
        },
        'key job ended',
      );
      if (target) {
        target.jobProgress(job);
      } else {
        pending.push(job);
      }
    },
    attach(metrics) {
      target = metrics;
      for (const job of pending.splice(0)) {
        metrics.jobProgress(job);
      }
    },
  };
}

/** Opens everything the app needs. Call `close` on shutdown. */
export async function buildDeps(
  config: Config,
  log: Logger,
  opts: {
    /**
     * Resume key jobs left running (the serving process does; a CLI process on the same data
     * directory must not, or two processes would rewrap the same records).
     */
    resumeJobs?: boolean;
    /**
     * An operator command (`cellcds evidence`), not the server: never make the region's keyring
     * (a missing keyring file is refused) nor its first keyring binding (a region no server
     * opened yet is refused). Only the server does both, on the region's real keyring.
     */
    operator?: boolean;
  } = {},
): Promise<Deps & { close(): Promise<void> }> {
  ensureDataDir(config.dataDir, log);
  // Replicas behind a load balancer must share one replay cache, or a jti could be replayed
  // against another replica: Redis when configured, else this process' memory.
  const sharedCache = config.redisUrl
    ? await sharedReplayCache(
        config.redisUrl,
        { maxEntries: config.replayCacheMaxEntries, maxPerIssuer: config.replayCacheMaxPerIssuer },
        config.jwtMaxLifetimeSeconds,
        log,
      )
    : undefined;
  const replayCache: ReplayCache =
    sharedCache ??
    createMemoryReplayCache({
      maxEntries: config.replayCacheMaxEntries,
      maxPerIssuer: config.replayCacheMaxPerIssuer,
    });
  const controlPlane = await openConfiguredControlPlane(config, log);
  const evaluator = createEvaluator(config.evaluation);
  // Start the evaluation workers before serving, so the first calls' budgets are not spent
  // waiting for a worker to boot.
  await evaluator.ready();
  const bootstrap = ensureAdminToken(config);
  const verifier = createTokenVerifier({
    controlPlane,
    replayCache,
    algorithms: [...config.jwtAlgorithms],
    maxLifetimeSeconds: config.jwtMaxLifetimeSeconds,
  });
  // Each version loaded is compiled ahead in the workers too (its first calls go there while
  // this thread compiles it in slices, or when they hand off).
  const directory = new ServiceDirectory(controlPlane, {
    warm: (pack) => {
      evaluator.warm(pack);
    },
  });
  // The region's data plane: its key provider (local keyring outside the tenant stores) and
  // one encrypted store per tenant under <data>/<region>/.
  const matrix = loadRegionMatrix(config.regionsFile, {
    dataDir: config.dataDir,
    publicUrl: config.publicUrl,
  });
  // This plane serves exactly one region: it opens that region's stores and keys, no other.
  const region = selectRegion(matrix, config.region);
  const keyringSetting = config.regionsFile
    ? 'CELLCDS_REGIONS_FILE keyProvider.dir'
    : 'CELLCDS_DATA_DIR (keys/)';
  const keyProvider = await bootStep(
    `key provider (keyring ${region.keyProvider.dir})`,
    keyringSetting,
    () =>
      createLocalKeyProvider({
        keyDir: region.keyProvider.dir,
        region: region.id,
        create: opts.operator !== true,
      }),
  );
  const dataPlaneSetting =
    region.storage.kind === 'postgres'
      ? 'CELLCDS_REGIONS_FILE storage.postgresUrl'
      : config.regionsFile
        ? 'CELLCDS_REGIONS_FILE storage.dataDir'
        : 'CELLCDS_DATA_DIR';
  const jobs = jobObserver(log);
  // Store write latency goes to the metrics made below (no record is written before them).
  const storeMetrics: { target?: Metrics } = {};
  const stores = await openRegionStores({
    region: region.id,
    ...(region.storage.kind === 'sqlite'
      ? { dataDir: region.storage.dataDir }
      : { postgresUrl: region.storage.postgresUrl }),
    keyProvider,
    mayBind: opts.operator !== true,
    // Round-robin calls over more tenants than this reopen a store (and unwrap its DEK) each
    // time: size it to the tenants a region serves actively (docs/operations.md).
    maxOpen: config.maxOpenStores ?? (region.storage.kind === 'sqlite' ? 1024 : 64),
    rewrap: config.rewrap,
    // A job left by a replica that stopped is taken over once its lease expires.
    jobLeaseMs: config.jobLeaseMs,
    // Bounded waits on PostgreSQL: a stalled or saturated database fails calls with 503 within
    // about these times instead of hanging them (docs/operations.md, Scale-out).
    pgStatementTimeoutMs: config.pg.statementTimeoutMs,
    pgAcquireTimeoutMs: config.pg.acquireTimeoutMs,
    onJobStart: jobs.onJobStart,
    onJobEnd: jobs.onJobEnd,
    // A DEK version at its soft wrap limit (rotated automatically) or hard limit (writes
    // refused until a rotation): tenant id, version and counts only.
    onWrapLimit: (event) => {
      const [level, msg] = WRAP_LIMIT_LOG[event.outcome];
      log[level]({ ...event }, msg);
    },
    onRecordWrite: (record, seconds) => {
      storeMetrics.target?.storeWrite(record, seconds);
    },
    onJobError: (job, err) => {
      log.error(
        {
          jobId: job.id,
          tenant: job.tenant,
          err: { message: err instanceof Error ? err.message : String(err) },
        },
        'key job failed',
      );
    },
    onResumeError: (tenant, err) => {
      // The scan goes on; stores the database could not serve are tried again later.
      log.error(
        {
          tenant,
          err: { type: err instanceof Error ? err.name : typeof err },
        },
        'pending key jobs of a store could not be resumed (retried if the database was unavailable)',
      );
    },
    onAbandonedRestores: (files) => {
      log.warn(
        { files },
        'removed the staged copies of restores killed before their commit: run those restores again',
      );
    },
  }).catch((err: unknown) => {
    // Stores bound to another keyring, or (an operator command) not bound yet: the keyring
    // setting is the one to check.
    if (
      err instanceof KeyUnavailableError &&
      (err.reason === 'keyring_mismatch' || err.reason === 'keyring_unbound')
    ) {
      throw asBootError(`key provider (keyring ${region.keyProvider.dir})`, keyringSetting, err);
    }
    throw asBootError(`region ${region.id} data plane`, dataPlaneSetting, err);
  });
  // Rotations interrupted by a crash or restart go on from their checkpoints.
  if (opts.resumeJobs !== false) {
    await bootStep(`region ${region.id} data plane`, dataPlaneSetting, () =>
      stores.resumePendingJobs(),
    );
  }
  const metrics = new Metrics({
    region: region.id,
    evaluations: () => evaluator.stats(),
    // Read on each scrape: nothing is added to the hook path.
    workerPool: () => evaluator.stats(),
    openStores: () => stores.stats().open,
    // The jobs this process runs: listing every tenant's would open every store per scrape.
    jobs: () => stores.runningJobs(),
  });
  jobs.attach(metrics);
  storeMetrics.target = metrics;
  const reportAuditError = (err: unknown): void => {
    log.error(
      { err: { message: err instanceof Error ? err.message : String(err) } },
      'suppressed auth failures not audited',
    );
  };
  const failureAudit = createFailureAuditor({
    audit: (event) => controlPlane.audit.record(event),
    perSecond: config.authFailureAuditPerSecond,
    onError: reportAuditError,
  });
  // Records past each tenant's retention period, purged periodically by the serving process
  // (a CLI process on the same data directory does not; `cellcds records purge` runs one).
  const now = () => new Date();
  const recordPurge =
    opts.resumeJobs !== false && config.recordPurgeIntervalMs > 0
      ? startRecordPurge(
          { controlPlane, stores, log, now, metrics },
          { intervalMs: config.recordPurgeIntervalMs },
        )
      : undefined;
  return {
    config,
    log,
    controlPlane,
    verifier,
    evaluator,
    directory,
    stores,
    keyProvider,
    matrix,
    region,
    metrics,
    backupDir: region.backupDir,
    bootstrapTokenHash: bootstrap.hash,
    failureAudit,
    // Readiness (/readyz `replayCache`): only a shared (Redis) cache can be down.
    ...(sharedCache ? { replayCacheHealth: () => sharedCache.health() } : {}),
    now,
    async close() {
      await failureAudit.flush().catch(reportAuditError);
      // Before the stores close: a pass in flight stops after its batch (audited).
      await recordPurge?.stop();
      await stores.close();
      await evaluator.close();
      await replayCache.close?.();
      await controlPlane.close();
    },
  };
}
