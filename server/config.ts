/**
 * Configuration: parsed once from the environment, validated, frozen. The only module that
 * reads `process.env` (lint enforces it). Bad configuration stops the boot with a message
 * naming the setting.
 */
import path from 'node:path';
import { z } from 'zod';
import {
  ASYMMETRIC_ALGORITHMS,
  CONTROL_PLANE_SCHEMA_PATTERN,
  DEFAULT_ALGORITHMS,
  DEFAULT_CONTROL_PLANE_SCHEMA,
  DEFAULT_MEMORY_REPLAY_MAX_ENTRIES,
  DEFAULT_REDIS_REPLAY_MAX_ENTRIES,
  isPostgresUrl,
  replayCacheSize,
  TENANT_ID_PATTERN,
} from '../tenants/index.ts';

const intFrom = (min: number, max: number, dflt: number) =>
  z.coerce.number().int().min(min).max(max).default(dflt);

const Schema = z
  .object({
    PORT: intFrom(0, 65535, 8080),
    CELLCDS_DATA_DIR: z.string().min(1).default('./var'),
    CELLCDS_PUBLIC_URL: z.string().optional(),
    CELLCDS_ADMIN_TOKEN: z
      .string()
      .min(32, 'must be at least 32 characters (use a random token)')
      .optional(),
    CELLCDS_REGION: z
      .string()
      .regex(/^[a-z0-9][a-z0-9-]{0,31}$/, 'must be a lower-case region id such as us-east')
      .default('local'),
    CELLCDS_LOG_LEVEL: z
      .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('info'),
    CELLCDS_JWT_ALGORITHMS: z
      .string()
      .default(DEFAULT_ALGORITHMS.join(','))
      .transform((v) =>
        v
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean),
      )
      .refine((algs) => algs.length > 0 && algs.every((a) => ASYMMETRIC_ALGORITHMS.includes(a)), {
        error: `must be a comma-separated list of asymmetric algorithms from ${ASYMMETRIC_ALGORITHMS.join(', ')}`,
      }),
    CELLCDS_JWT_MAX_LIFETIME_SECONDS: intFrom(60, 86400, 3600),
    CELLCDS_CORS_ORIGINS: z.string().default('*'),
    CELLCDS_BODY_LIMIT_BYTES: intFrom(1024, 64 * 1024 * 1024, 5 * 1024 * 1024),
    CELLCDS_PREFETCH_TIMEOUT_MS: intFrom(100, 60000, 3000),
    CELLCDS_PREFETCH_MAX_BYTES: intFrom(1024, 256 * 1024 * 1024, 8 * 1024 * 1024),
    CELLCDS_PREFETCH_MAX_PAGES: intFrom(1, 1000, 10),
    CELLCDS_EVAL_BUDGET_MS: intFrom(10, 60000, 2000),
    CELLCDS_RULE_BUDGET_MS: intFrom(5, 60000, 500),
    CELLCDS_EVAL_WORKERS: intFrom(1, 64, 2),
    CELLCDS_EVAL_INLINE_MS: intFrom(0, 100, 5),
    CELLCDS_PACK_CHECK_TIMEOUT_MS: intFrom(100, 600_000, 20_000),
    CELLCDS_PACK_CHECK_MEMORY_MB: intFrom(16, 16_384, 512),
    CELLCDS_PACK_UPLOADS_IN_FLIGHT: intFrom(1, 64, 2),
    // 'off' only for test setups whose small packs carry no tests (spec/helpers): never a pack field.
    CELLCDS_PACK_TEST_COVERAGE: z.enum(['required', 'off']).default('required'),
    CELLCDS_MAX_OPEN_STORES: z.coerce.number().int().min(1).max(100_000).optional(),
    CELLCDS_REWRAP_BATCH: intFrom(1, 10_000, 200),
    CELLCDS_REWRAP_SCHEDULED_BATCH: intFrom(1, 10_000, 50),
    CELLCDS_REWRAP_THROTTLE_MS: intFrom(0, 60_000, 50),
    CELLCDS_JOB_LEASE_MS: intFrom(5_000, 3_600_000, 60_000),
    // 0: no periodic purge of records past a tenant's retention (`cellcds records purge` still does).
    CELLCDS_RECORD_PURGE_INTERVAL_MS: intFrom(0, 86_400_000, 3_600_000),
    CELLCDS_PG_STATEMENT_TIMEOUT_MS: intFrom(0, 600_000, 5000),
    CELLCDS_PG_ACQUIRE_TIMEOUT_MS: intFrom(100, 600_000, 5000),
    // The message never quotes the value: the URL may carry a password.
    CELLCDS_CONTROL_PLANE_URL: z
      .string()
      .refine(isPostgresUrl, 'must be a postgres:// or postgresql:// URL')
      .optional(),
    CELLCDS_CONTROL_PLANE_SCHEMA: z
      .string()
      .regex(
        CONTROL_PLANE_SCHEMA_PATTERN,
        'must be a PostgreSQL schema name: lower-case letters, digits and _ (at most 63)',
      )
      .default(DEFAULT_CONTROL_PLANE_SCHEMA),
    CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND: intFrom(1, 100_000, 100),
    CELLCDS_SHUTDOWN_GRACE_MS: intFrom(0, 600_000, 20_000),
    CELLCDS_REPLAY_CACHE_MAX_ENTRIES: z.coerce.number().int().min(1000).max(100_000_000).optional(),
    CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: z.coerce.number().int().min(1).max(10_000_000).optional(),
    CELLCDS_REDIS_URL: z
      .string()
      .regex(/^rediss?:\/\/\S+$/, 'must be a redis:// or rediss:// URL')
      .optional(),
    CELLCDS_REGIONS_FILE: z.string().min(1).optional(),
    CELLCDS_SMART_CLIENT_ID: z.string().min(1).max(256).optional(),
    CELLCDS_ANONYMOUS_DISCOVERY_TENANT: z
      .string()
      .regex(TENANT_ID_PATTERN, 'must be a tenant id (lower-case letters, digits, dashes)')
      .optional(),
    CELLCDS_SEED_DEMO: z
      .enum(['true', 'false'])
      .default('true')
      .transform((v) => v === 'true'),
  })
  .loose();

export interface Config {
  readonly port: number;
  /**
   * `CELLCDS_*` variables set but not settings of this version (a typo would otherwise be
   * ignored silently), by name, with the closest setting's name when one is close: warned about
   * at start (`serve`'s log, the CLI's stderr). Never their values.
   */
  readonly unknownSettings: ReadonlyArray<{ name: string; suggestion?: string }>;
  readonly dataDir: string;
  /** False when `dataDir` is the default `./var` of the current folder (CELLCDS_DATA_DIR unset). */
  readonly dataDirSet: boolean;
  /** What `aud` is checked against: `${publicUrl}/cds-services/...`. No trailing slash. */
  readonly publicUrl: string;
  readonly adminToken: string | undefined;
  readonly region: string;
  readonly logLevel: string;
  readonly jwtAlgorithms: readonly string[];
  readonly jwtMaxLifetimeSeconds: number;
  /** `*` or an explicit list of allowed browser origins. */
  readonly corsOrigins: '*' | readonly string[];
  readonly bodyLimitBytes: number;
  readonly prefetch: {
    readonly timeoutMs: number;
    readonly maxBytes: number;
    readonly maxPages: number;
  };
  readonly evaluation: {
    readonly callBudgetMs: number;
    readonly ruleBudgetMs: number;
    readonly workers: number;
    /** Main-thread slice for fast-path packs (ms); 0 = always in a worker. */
    readonly inlineSliceMs: number;
  };
  /**
   * A pack upload's validation worker (rules/pack-check.ts): its wall-clock time (ms, worker
   * start not included) and heap (MB); past either the upload is refused with 422 naming it.
   */
  readonly packCheck: {
    readonly timeoutMs: number;
    readonly memoryMb: number;
    /** Pack uploads one process takes at once; another is refused 503 + Retry-After. */
    readonly uploadsInFlight: number;
    /**
     * Every rule of an uploaded pack must fire in one of its tests (CELLCDS_PACK_TEST_COVERAGE,
     * default `required`); `off` only for test setups. `pack test` / `pack validate` too.
     */
    readonly requireTestCoverage: boolean;
  };
  readonly seedDemo: boolean;
  /** Shared replay cache for replicas (scale-out); unset = in-process cache. */
  readonly redisUrl: string | undefined;
  /**
   * The card viewer's default SMART client id (id_token `aud`), for tenants without their own
   * `smart.clientId`; unset = only tenants with their own client id can use the viewer.
   */
  readonly smartClientId: string | undefined;
  /**
   * The tenant whose services `GET /cds-services` lists to a request without Authorization
   * (CELLCDS_ANONYMOUS_DISCOVERY_TENANT); undefined = discovery always needs the JWT.
   */
  readonly anonymousDiscoveryTenant: string | undefined;
  /**
   * Tenant stores a region keeps open (LRU); undefined = 1024 for SQLite regions (~0.8 MB of
   * memory each), 64 for PostgreSQL regions (each open store holds its own small pool).
   */
  readonly maxOpenStores: number | undefined;
  /**
   * DEK rotation jobs (tenants/DATA-PLANE.md, "Rotation"): records per emergency batch; a
   * scheduled batch's budget in records re-sealed (a re-wrapped head counts a quarter); the
   * pause between scheduled batches.
   */
  readonly rewrap: {
    readonly batchSize: number;
    readonly scheduledBatchSize: number;
    readonly throttleMs: number;
  };
  /**
   * How long a running DEK rewrap job's owner lease holds without renewal (ms), from
   * CELLCDS_JOB_LEASE_MS (default 60000): another replica takes a job over only after its
   * owner's lease expired (tenants/DATA-PLANE.md, "Job owner and lease"). Also the least a
   * record purge run's lease lasts after each batch (tenants/DATA-PLANE.md, "Retention").
   */
  readonly jobLeaseMs: number;
  /**
   * How often the server purges invocation records past each tenant's retention period (ms),
   * from CELLCDS_RECORD_PURGE_INTERVAL_MS (default 3600000, an hour; 0: never, only
   * `cellcds records purge`). The first run starts a minute after boot (or after one interval,
   * if shorter). docs/operations.md, "Retention".
   */
  readonly recordPurgeIntervalMs: number;
  /**
   * The control plane (tenants, issuers, packs, admin token hashes, audit log): a PostgreSQL
   * schema shared by replicas on any host when CELLCDS_CONTROL_PLANE_URL is set (schema
   * CELLCDS_CONTROL_PLANE_SCHEMA, default cellcds_control; bounded by `pg`), else the SQLite
   * file `<dataDir>/control.sqlite` shared by the processes of one host (its `schema` is then the
   * one `cellcds control-plane copy` fills when given `--to URL` alone).
   */
  readonly controlPlane:
    | { readonly kind: 'sqlite'; readonly file: string; readonly schema: string }
    | { readonly kind: 'postgres'; readonly url: string; readonly schema: string };
  /**
   * PostgreSQL regions (tenant stores): `statementTimeoutMs` is each statement's
   * `statement_timeout` (the client also gives up on a reply 1 s later; 0 = no limit), from
   * CELLCDS_PG_STATEMENT_TIMEOUT_MS (default 5000); `acquireTimeoutMs` is the longest a call waits
   * for a pooled connection, opening one included, from CELLCDS_PG_ACQUIRE_TIMEOUT_MS (default
   * 5000). A call past either fails with 503 `unavailable` instead of hanging past its budget.
   */
  readonly pg: {
    readonly statementTimeoutMs: number;
    readonly acquireTimeoutMs: number;
  };
  /** Refused credentials audited one by one per second; the rest are audited as counts. */
  readonly authFailureAuditPerSecond: number;
  /**
   * On SIGTERM/SIGINT, how long calls in flight (and keep-alive connections) may take before
   * every connection is closed (ms).
   */
  readonly shutdownGraceMs: number;
  /**
   * The JWT replay cache's size: most unexpired `jti`s held (in this process, or in Redis for all
   * replicas); full means tokens are refused. Default 100,000 in process, 1,000,000 in Redis.
   */
  readonly replayCacheMaxEntries: number;
  /**
   * One `(tenant, iss)` pair's share of the replay cache: a tenant's issuer holding this many
   * unexpired `jti`s may not take the cache's last share of places, kept for the others (other
   * tenants of the same issuer too). Default 25,000, or the max entries if smaller.
   */
  readonly replayCacheMaxPerIssuer: number;
  /** Region matrix file (YAML/JSON); undefined = one embedded region `local`. */
  readonly regionsFile: string | undefined;
  /** Whether CELLCDS_REGION was given (else `npm start` runs one plane per configured region). */
  readonly regionExplicit: boolean;
}

/** Raised for bad configuration; the message names the setting. */
export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

function parsePublicUrl(raw: string, setting: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new ConfigError(
      `config: ${setting} must be an absolute http(s) URL, got ${JSON.stringify(raw)}`,
    );
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new ConfigError(`config: ${setting} must use http or https`);
  }
  if (url.search || url.hash || url.username || url.password) {
    throw new ConfigError(`config: ${setting} must not carry a query, fragment or credentials`);
  }
  return url.toString().replace(/\/+$/, '');
}

/**
 * The replay cache's size and one issuer's share, checked as the caches check them.
 * @throws ConfigError naming both settings when the share exceeds the cache.
 */
function replayCacheConfig(e: z.infer<typeof Schema>): {
  replayCacheMaxEntries: number;
  replayCacheMaxPerIssuer: number;
} {
  try {
    const { maxEntries, maxPerIssuer } = replayCacheSize(
      {
        maxEntries: e.CELLCDS_REPLAY_CACHE_MAX_ENTRIES,
        maxPerIssuer: e.CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER,
      },
      e.CELLCDS_REDIS_URL ? DEFAULT_REDIS_REPLAY_MAX_ENTRIES : DEFAULT_MEMORY_REPLAY_MAX_ENTRIES,
      {
        maxEntries: 'CELLCDS_REPLAY_CACHE_MAX_ENTRIES',
        maxPerIssuer: 'CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER',
      },
    );
    return { replayCacheMaxEntries: maxEntries, replayCacheMaxPerIssuer: maxPerIssuer };
  } catch (err) {
    throw new ConfigError(`config: ${err instanceof Error ? err.message : String(err)}`);
  }
}

/** Variables of cellcds' own specs and tools, not settings: never reported as unknown. */
const NOT_SETTINGS = /^CELLCDS_(TEST|SPEC|BENCH)_|^CELLCDS_UPDATE_DOC_IMAGES$/;

/** Levenshtein distance (names of a few dozen characters). */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(
        (prev[j] ?? 0) + 1,
        (row[j - 1] ?? 0) + 1,
        (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    prev = row;
  }
  return prev[b.length] ?? 0;
}

/**
 * The `CELLCDS_*` names among `names` that are no setting, sorted, each with the closest
 * setting (the same name without the prefix, e.g. `CELLCDS_PORT` for `PORT`, or one within a
 * few edits).
 */
function unknownSettings(names: readonly string[]): Array<{ name: string; suggestion?: string }> {
  const known = Object.keys(Schema.shape);
  return names
    .filter((n) => n.startsWith('CELLCDS_') && !known.includes(n) && !NOT_SETTINGS.test(n))
    .sort()
    .map((name) => {
      const bare = name.slice('CELLCDS_'.length);
      let best: { name: string; d: number } | undefined;
      for (const k of known) {
        const d = k === bare ? 0 : editDistance(name, k);
        if (d <= Math.max(3, Math.floor(name.length / 4)) && (best === undefined || d < best.d)) {
          best = { name: k, d };
        }
      }
      return best === undefined ? { name } : { name, suggestion: best.name };
    });
}

/**
 * Parses configuration from an environment map (tests pass their own).
 * @throws ConfigError naming the setting.
 */
export function loadConfig(
  env: Record<string, string | undefined> = process.env,
  overrides: Record<string, string> = {},
): Config {
  // An empty variable counts as unset (as in `CELLCDS_ADMIN_TOKEN= npm start`).
  const present = Object.fromEntries(
    Object.entries({ ...env, ...overrides }).filter(([, v]) => v !== undefined && v !== ''),
  );
  const r = Schema.safeParse(present);
  if (!r.success) {
    const issues = r.error.issues.map((i) => `${i.path.join('.')} ${i.message}`).join('; ');
    throw new ConfigError(`config: ${issues}`);
  }
  const e = r.data;
  const publicUrl = parsePublicUrl(
    e.CELLCDS_PUBLIC_URL ?? `http://localhost:${e.PORT}`,
    'CELLCDS_PUBLIC_URL',
  );
  const corsOrigins: Config['corsOrigins'] =
    e.CELLCDS_CORS_ORIGINS.trim() === '*'
      ? '*'
      : Object.freeze(
          e.CELLCDS_CORS_ORIGINS.split(',').map((o) =>
            parsePublicUrl(o.trim(), 'CELLCDS_CORS_ORIGINS'),
          ),
        );
  return Object.freeze({
    port: e.PORT,
    unknownSettings: Object.freeze(unknownSettings(Object.keys(present))),
    dataDir: path.resolve(e.CELLCDS_DATA_DIR),
    dataDirSet: present.CELLCDS_DATA_DIR !== undefined,
    publicUrl,
    adminToken: e.CELLCDS_ADMIN_TOKEN,
    region: e.CELLCDS_REGION,
    logLevel: e.CELLCDS_LOG_LEVEL,
    jwtAlgorithms: Object.freeze([...e.CELLCDS_JWT_ALGORITHMS]),
    jwtMaxLifetimeSeconds: e.CELLCDS_JWT_MAX_LIFETIME_SECONDS,
    corsOrigins,
    bodyLimitBytes: e.CELLCDS_BODY_LIMIT_BYTES,
    prefetch: Object.freeze({
      timeoutMs: e.CELLCDS_PREFETCH_TIMEOUT_MS,
      maxBytes: e.CELLCDS_PREFETCH_MAX_BYTES,
      maxPages: e.CELLCDS_PREFETCH_MAX_PAGES,
    }),
    evaluation: Object.freeze({
      callBudgetMs: e.CELLCDS_EVAL_BUDGET_MS,
      ruleBudgetMs: e.CELLCDS_RULE_BUDGET_MS,
      workers: e.CELLCDS_EVAL_WORKERS,
      inlineSliceMs: e.CELLCDS_EVAL_INLINE_MS,
    }),
    packCheck: Object.freeze({
      timeoutMs: e.CELLCDS_PACK_CHECK_TIMEOUT_MS,
      memoryMb: e.CELLCDS_PACK_CHECK_MEMORY_MB,
      uploadsInFlight: e.CELLCDS_PACK_UPLOADS_IN_FLIGHT,
      requireTestCoverage: e.CELLCDS_PACK_TEST_COVERAGE === 'required',
    }),
    seedDemo: e.CELLCDS_SEED_DEMO,
    redisUrl: e.CELLCDS_REDIS_URL,
    smartClientId: e.CELLCDS_SMART_CLIENT_ID,
    anonymousDiscoveryTenant: e.CELLCDS_ANONYMOUS_DISCOVERY_TENANT,
    maxOpenStores: e.CELLCDS_MAX_OPEN_STORES,
    rewrap: Object.freeze({
      batchSize: e.CELLCDS_REWRAP_BATCH,
      scheduledBatchSize: e.CELLCDS_REWRAP_SCHEDULED_BATCH,
      throttleMs: e.CELLCDS_REWRAP_THROTTLE_MS,
    }),
    jobLeaseMs: e.CELLCDS_JOB_LEASE_MS,
    recordPurgeIntervalMs: e.CELLCDS_RECORD_PURGE_INTERVAL_MS,
    pg: Object.freeze({
      statementTimeoutMs: e.CELLCDS_PG_STATEMENT_TIMEOUT_MS,
      acquireTimeoutMs: e.CELLCDS_PG_ACQUIRE_TIMEOUT_MS,
    }),
    controlPlane: Object.freeze(
      e.CELLCDS_CONTROL_PLANE_URL === undefined
        ? {
            kind: 'sqlite' as const,
            file: path.join(path.resolve(e.CELLCDS_DATA_DIR), 'control.sqlite'),
            schema: e.CELLCDS_CONTROL_PLANE_SCHEMA,
          }
        : {
            kind: 'postgres' as const,
            url: e.CELLCDS_CONTROL_PLANE_URL,
            schema: e.CELLCDS_CONTROL_PLANE_SCHEMA,
          },
    ),
    authFailureAuditPerSecond: e.CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND,
    shutdownGraceMs: e.CELLCDS_SHUTDOWN_GRACE_MS,
    ...replayCacheConfig(e),
    regionExplicit: present.CELLCDS_REGION !== undefined,
    regionsFile:
      e.CELLCDS_REGIONS_FILE === undefined ? undefined : path.resolve(e.CELLCDS_REGIONS_FILE),
  });
}

/** The environment a supervised child process inherits (the region is set per child). */
export function childEnv(): Record<string, string | undefined> {
  return { ...process.env };
}
