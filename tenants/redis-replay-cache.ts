/**
 * Replay cache shared by every replica (scale-out): `(tenant, iss, jti)` entries in Redis, each
 * kept until the token's expiry. One atomic script per token: the first replica to see a jti
 * for a tenant sets its key (`PXAT exp`), every later use (on any replica) is a replay. Tenants
 * whose EHRs use the same issuer have their own jti space. If Redis cannot answer, `remember`
 * rejects and the verifier refuses the token (fail closed).
 *
 * The cache holds at most `maxEntries` unexpired entries, and a `(tenant, iss)` holding its share
 * (`maxPerIssuer`) or more may not take the last share of places (as in the in-process cache),
 * so one tenant's EHR cannot fill the cache, or Redis's memory, and lock every tenant out, those
 * on the same issuer included. Entries are counted in sorted sets (member: the entry's hash,
 * score: its expiry), one per `(tenant, iss)` and one for the whole cache, in the same atomic
 * script that sets the entry's key.
 *
 * Keys (`prefix` is `cellcds:jti:` unless set):
 * - `<prefix>v2:<sha256(JSON ["v2", tenant, iss, jti])>`: the entry ("v2" keeps it apart from
 *   the previous version's keys, whatever the strings);
 * - `<prefix>v2:share:<sha256(JSON ["v2", tenant, iss])>`: the `(tenant, iss)` count;
 * - `<prefix>all`: the whole cache's count, shared with the previous version (so the size holds
 *   while both run).
 *
 * Rolling upgrade: the previous version keyed entries by `(iss, jti)` alone, `<prefix>` +
 * sha256(JSON `[iss, jti]`), value `1` (counted in `<prefix>iss:<sha256(iss)>` and `<prefix>all`).
 * While its replicas run beside these, the script also reads that key: present with any other
 * value than this version's mark, the jti counts as seen (for every tenant of the issuer: the
 * old key names none). And it sets that key to the mark (`v2`, until the latest expiry of the
 * tenants that used the jti), which old replicas, checking only that the key exists, read as
 * seen. So a token used on a replica of either version is a replay on every other. Old keys
 * expire with their tokens (at most `CELLCDS_JWT_MAX_LIFETIME_SECONDS` + the leeway after the
 * last old replica stopped), so both steps (`LEGACY` below) can be removed in a later release,
 * once no replica older than this one can run beside it.
 *
 * A Redis that evicts keys under memory pressure (any `maxmemory-policy` but `noeviction`; our
 * keys carry a TTL, so even the `volatile-*` policies take them) would forget a jti before
 * its token expires, and the token could be replayed. So the policy is read (`INFO`, which
 * managed Redis services allow where `CONFIG` is disabled) before the first token, again every
 * 5 s and after each reconnect; while it is not `noeviction`, every token is refused.
 *
 * The same read takes Redis's `run_id`, `uptime_in_seconds`, `evicted_keys` and `TIME`, and the
 * epoch (`<prefix>epoch`, EPOCH_SCRIPT: an id, the run_id it was written under, `since`). A new
 * run_id (restart, failover: the epoch's run_id is not INFO's), the epoch gone (restarted without
 * persistence, FLUSHDB/FLUSHALL), evicted_keys grown since the last read, or, on first sight, a
 * Redis started less than a token's lifetime + 2 leeways ago: Redis may have lost jtis, so tokens
 * issued (`iat`) before then + the leeway are refused (`RedisHistoryLostError`) for a token's
 * lifetime + 2 leeways. The first process to see a loss rewrites the epoch (atomically) with
 * `since`; every process, one started later included (after a failover), inherits it. Each token's
 * script also checks the epoch id (-3 when it changed: Redis restarted behind a connection that
 * survived, or was flushed), and the cache then reads Redis again at once. A missing epoch at a
 * process's first read is taken as a new deployment (nothing known lost), unless another process
 * saw it gone. A Redis clock more than the leeway ahead of ours gets every token refused
 * (`RedisClockSkewError`): entries expire on Redis's clock, `exp` is judged on ours, so such a
 * Redis could drop an entry while its token is still accepted (the verifier keeps entries one
 * leeway longer for the skew within it); a Redis clock behind ours only keeps entries longer.
 * Both are `ReplayBackendError`s `down` that leave `state()` alone (Redis answers), reported once
 * each through `onTrustEvent`.
 *
 * REMEMBER_SCRIPT is declared (`#!lua`, Redis 7) without `allow-oom`: over `maxmemory` under
 * `noeviction`, Redis refuses it whole, before any write (`OOM`, a full cache), where an
 * undeclared script would have its writes let through. Redis older than 7.0 is refused
 * (`RedisVersionError`), and so is one that refuses `INFO` or `TIME` (renamed, denied by an ACL)
 * or whose `INFO` lacks `redis_version`, `run_id`, `uptime_in_seconds` or `evicted_keys`
 * (`RedisUnsupportedError`): without them a loss of jtis or a skewed clock would go unseen. Both
 * leave `state()` alone (Redis answers); `health()` reports them (`unsupported`), every token is
 * refused, and Redis is read again after `evictingRecheckMs`.
 *
 * Failures are typed for the verifier: a Redis that does not answer (connection refused or lost,
 * command timeout) rejects with `ReplayBackendError` `down`, one that may evict with
 * `RedisEvictsKeysError` (a `ReplayBackendError` `evicting`), a full cache (the count, or
 * Redis's own `OOM` under `noeviction`) with `ReplayCacheFullError`.
 *
 * One state for tokens and readiness: `state()` tells, without I/O, what the last Redis command
 * found (a token's script, a policy read, or the readiness probe's PING: all go through one path),
 * `onStateChange` is called on each change (so each is logged once, whoever saw it first), and
 * `health()` (for `/readyz`) answers what `state()` says after its PING. While the state is
 * `down` and the client is not connected, commands are refused at once rather than each waiting
 * the command timeout for a connection: the client reconnects by itself (ioredis's retry
 * strategy, attempts up to ~5 s apart) and the next token after that is served. Before the first
 * answer (at boot) commands wait for the connection, within the command timeout.
 */
import crypto from 'node:crypto';
import { Redis } from 'ioredis';
import { ReplayBackendError, ReplayCacheFullError, ReplayIssuerQuotaError } from './errors.ts';
import { replayCacheSize } from './replay-cache.ts';
import type { ReplayBackendState, ReplayCache } from './types.ts';

export interface RedisReplayCacheOptions {
  /** e.g. `redis://127.0.0.1:6379` */
  url: string;
  /** Key prefix (default `cellcds:jti:`), so several deployments can share one Redis. */
  prefix?: string;
  /** Per-command timeout (default 1000 ms). */
  commandTimeoutMs?: number;
  /** Most unexpired entries in the whole cache, every replica's (default 1 000 000). */
  maxEntries?: number;
  /**
   * One `(tenant, iss)` pair's share (default 25 000): beyond it a tenant's issuer may not take
   * the cache's last `maxPerIssuer` places, kept for the pairs under their share.
   */
  maxPerIssuer?: number;
  /**
   * How long a read of the eviction policy (and of Redis's identity, evictions, clock) is trusted
   * (default 5 000 ms).
   */
  policyCheckMs?: number;
  /**
   * How long a read that found an evicting policy is trusted (default 5 000 ms, at most
   * `policyCheckMs`): every token is refused meanwhile, so a fixed policy is seen soon.
   */
  evictingRecheckMs?: number;
  /**
   * The longest token lifetime the verifier accepts (default 3600 s,
   * `CELLCDS_JWT_MAX_LIFETIME_SECONDS`): how long jtis Redis may have lost still matter.
   */
  maxTokenLifetimeSeconds?: number;
  /** The verifier's clock leeway (default 60 s, as the verifier's). */
  leewaySeconds?: number;
  /**
   * Called once per event that gets tokens refused for a while (Redis restarted or failed over,
   * evicted keys, its clock ahead of ours by more than the leeway) and when the clocks agree
   * again, e.g. to log each once. Must not throw.
   */
  onTrustEvent?: (event: ReplayTrustEvent) => void;
  /**
   * Called when `state()` changes (`previous` undefined: the first answer or failure since
   * creation), e.g. to log once per transition rather than per refused token. Must not throw.
   */
  onStateChange?: (state: ReplayBackendState, previous: ReplayBackendState | undefined) => void;
  now?: () => Date;
}

/** The Redis behind the replay cache may evict keys: a jti could be forgotten and replayed. */
export class RedisEvictsKeysError extends ReplayBackendError {
  constructor(readonly policy: string) {
    super(
      'evicting',
      `Redis maxmemory-policy is ${policy}: it may evict replay-cache keys before their tokens expire; set it to noeviction`,
    );
    this.name = 'RedisEvictsKeysError';
  }
}

/**
 * Something that makes the cache refuse tokens though Redis answers: Redis may have lost the jtis
 * of tokens issued before `since` (`restarted`: a new Redis, restarted or failed over, seen at
 * `since`; `started_recently`: Redis started at `since`, less than the longest token lifetime
 * before this process first read it; `evicted`: Redis evicted keys, seen at `since`; `flushed`:
 * the epoch key gone, flushed or lost in a restart, seen at `since`), so those
 * tokens are refused until `until`; or Redis's clock is `skewMs` ahead of this process's
 * (Redis's minus ours), more than the leeway (`clock_skew`), or no longer (`clock_ok`).
 */
export type ReplayTrustEvent =
  | {
      kind: 'reset';
      cause: 'restarted' | 'started_recently' | 'evicted' | 'flushed';
      since: Date;
      until: Date;
    }
  | { kind: 'clock_skew'; skewMs: number }
  | { kind: 'clock_ok'; skewMs: number }
  /** Redis refuses a command or lacks an INFO field the cache needs (`RedisUnsupportedError`). */
  | { kind: 'unsupported'; message: string };

/**
 * Redis may have lost the jti of this token (it restarted, failed over or evicted keys since the
 * token was issued): refused like a Redis that does not answer (503, retry with a new token).
 */
export class RedisHistoryLostError extends ReplayBackendError {
  constructor(
    readonly why: 'restarted' | 'started_recently' | 'evicted' | 'flushed',
    readonly since: Date,
  ) {
    super(
      'down',
      `replay_backend_reset: Redis may have lost the jtis of tokens issued before ${since.toISOString()} (${why}); tokens issued before then are refused until their lifetime is over`,
    );
    this.name = 'RedisHistoryLostError';
  }
}

/**
 * Redis's clock (on which entries expire) is ahead of this process's (on which `exp` is judged) by
 * more than the leeway: an entry could expire while its token is still accepted here.
 */
export class RedisClockSkewError extends ReplayBackendError {
  constructor(readonly skewMs: number) {
    super(
      'down',
      `replay_clock_skew: Redis's clock is ${String(skewMs)} ms ahead of this process's, more than the leeway`,
    );
    this.name = 'RedisClockSkewError';
  }
}

/** Redis is older than 7.0: REMEMBER_SCRIPT's flags (`#!lua`, denied when out of memory) need 7. */
export class RedisVersionError extends ReplayBackendError {
  constructor(readonly version: string) {
    super('down', `Redis ${version} is too old for the replay cache: it needs Redis 7.0 or later`);
    this.name = 'RedisVersionError';
  }
}

/**
 * Redis refuses a command the replay cache needs (`INFO`, `TIME`: renamed, or denied by an ACL),
 * or its `INFO` lacks a field it reads (`missing`: e.g. `TIME`, `INFO run_id`): a loss of jtis or
 * a skewed clock would go unseen, so every token is refused.
 */
export class RedisUnsupportedError extends ReplayBackendError {
  constructor(
    readonly missing: string,
    detail: string,
  ) {
    super(
      'down',
      `Redis does not provide ${missing}, which the replay cache needs (${detail}): allow it (rename-command, ACL) or use another Redis`,
    );
    this.name = 'RedisUnsupportedError';
  }
}

/** What a readiness probe learns of the replay cache: a short code and message when down. */
export type ReplayCacheHealth = { ok: true } | { ok: false; code: string; message: string };

/** The shared cache's default size: ~3,000 calls/s with 5-minute tokens; ~480 bytes of Redis each. */
export const DEFAULT_REDIS_REPLAY_MAX_ENTRIES = 1_000_000;

/** How long a read of the eviction policy (and of Redis's identity, evictions, clock) is trusted, unless set. */
const POLICY_CHECK_MS = 5_000;
/** How long a read that found an evicting policy is trusted, unless set. */
const EVICTING_RECHECK_MS = 5_000;

/** The value this version sets under the previous version's key of `(iss, jti)` (it set `1`). */
const LEGACY_MARK = 'v2';

/**
 * KEYS: the entry's key, the previous version's key of `(iss, jti)` (LEGACY), the `(tenant,
 * iss)` sorted set, the whole cache's sorted set. ARGV: expiry (ms since the epoch), now (ms),
 * the pair's share, the whole cache's size, the entry's hash (the sets' member), LEGACY_MARK.
 * KEYS[5] is the epoch key, ARGV[7] the epoch id this process last read: another id (or none:
 * Redis restarted without persistence, or was flushed) returns -3, writing nothing.
 * Returns 0 for a replay (this version's entry exists, or the previous version's key with
 * anything but the mark); -2 when the cache is full; -1 when the `(tenant, iss)` holds its share
 * or more and only the last share of places is free; 1 when the entry is new (then kept until its
 * expiry, and counted until then).
 *
 * LEGACY: the two steps on KEYS[2] serve rolling upgrades from the version that keyed entries by
 * `(iss, jti)` alone. Remove them (and KEYS[2]) in a later release: old keys expire with their
 * tokens, and no replica of that version may run beside the release that removes them.
 */
const REMEMBER_SCRIPT = `#!lua
if redis.call('HGET', KEYS[5], 'id') ~= ARGV[7] then return -3 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local legacy = redis.call('GET', KEYS[2])
if legacy and legacy ~= ARGV[6] then return 0 end
local exp = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local share = tonumber(ARGV[3])
local size = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local total = redis.call('ZCARD', KEYS[4])
if total >= size then return -2 end
if total >= size - share and redis.call('ZCARD', KEYS[3]) >= share then return -1 end
redis.call('SET', KEYS[1], '1', 'PXAT', ARGV[1])
if not legacy or redis.call('PTTL', KEYS[2]) < exp - now then
  redis.call('SET', KEYS[2], ARGV[6], 'PXAT', ARGV[1])
end
for i = 3, 4 do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[5])
  if redis.call('PTTL', KEYS[i]) < exp - now then redis.call('PEXPIREAT', KEYS[i], ARGV[1]) end
end
return 1
`;

/**
 * The epoch key (a hash: `id`, `run_id`, `since`, `cause`) names the Redis history the cache
 * trusts. KEYS: the epoch key. ARGV: Redis's run_id (INFO), a new epoch id, now (ms, our clock),
 * the epoch id this process last read ('' if none), the cause of a missing key ('restarted' or
 * 'flushed'). Returns the epoch as `{id, since, cause}`, rewritten (a new id) when Redis may have
 * lost jtis since: `since` is now when the key is missing and this process had read one (restarted
 * without persistence, or flushed), when its run_id is not Redis's (restarted, failed over), or
 * when it was rewritten with no loss (`since` 0) after the one this process read; a process that
 * finds no key at its first read writes one with `since` 0 (nothing known lost). Atomic, so
 * processes that see the same loss agree on one epoch.
 */
const EPOCH_SCRIPT = `#!lua flags=allow-oom
local e = redis.call('HMGET', KEYS[1], 'id', 'run_id', 'since', 'cause')
local known = ARGV[4]
if e[1] and e[2] == ARGV[1] and (known == '' or e[1] == known or e[3] ~= '0') then
  return {e[1], e[3], e[4] or 'restarted'}
end
local since = ARGV[3]
local cause = 'flushed'
if not e[1] then
  cause = ARGV[5]
  if known == '' then since = '0' end
elseif e[2] ~= ARGV[1] then
  cause = 'restarted'
end
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'run_id', ARGV[1], 'since', since, 'cause', cause)
return {ARGV[2], since, cause}
`;
const EPOCH_COMMAND = 'cellcdsReplayEpoch';

/** The name REMEMBER_SCRIPT is defined under on the client (`defineCommand`). */
const REMEMBER_COMMAND = 'cellcdsRememberJti';
/** KEYS then ARGV, as REMEMBER_SCRIPT reads them. */
type RememberScript = (...keysThenArgs: (string | number)[]) => Promise<unknown>;

/** What `health()` answers for a state (`policy`: the evicting policy the last read found). */
function healthOf(state: ReplayBackendState, policy: string | undefined): ReplayCacheHealth {
  switch (state) {
    case 'up':
      return { ok: true };
    case 'evicting':
      return {
        ok: false,
        code: 'evicts_keys',
        message: `Redis maxmemory-policy is ${policy ?? 'unknown'}, not noeviction`,
      };
    case 'down':
      return { ok: false, code: 'unreachable', message: 'Redis does not answer' };
  }
}

/**
 * A command the cache needs, refused by Redis as unknown (renamed away) or not permitted (ACL):
 * `RedisUnsupportedError`. Other failures (no answer) pass as they are.
 */
async function needed<T>(name: string, command: Promise<T>): Promise<T> {
  try {
    return await command;
  } catch (err) {
    if (err instanceof Error && /^(ERR unknown command|NOPERM)\b/.test(err.message)) {
      throw new RedisUnsupportedError(name, err.message.split('\n')[0] ?? err.message);
    }
    throw err;
  }
}

/** A field of an INFO reply (`name:value` lines). */
function infoField(info: string, name: string): string | undefined {
  return new RegExp(`^${name}:(\\S+)`, 'm').exec(info)?.[1];
}

function sha256(text: string): string {
  return crypto.createHash('sha256').update(text).digest('hex');
}

/** Creates a Redis-backed ReplayCache. Call `close()` on shutdown. */
export function createRedisReplayCache(opts: RedisReplayCacheOptions): ReplayCache & {
  /**
   * As `ReplayCache.remember`, and, given the token's `iat` (seconds), refuses (with
   * `RedisHistoryLostError`) a token issued before Redis may have lost jtis, and every token
   * (`RedisClockSkewError`) while Redis's clock is ahead of this process's by more than the leeway.
   * Without `iat`, every token is refused while Redis may have lost jtis.
   */
  remember: ReplayCache['remember'];
  ready(): Promise<void>;
  state(): ReplayBackendState;
  health(): Promise<ReplayCacheHealth>;
  durability(): Promise<{ aof: boolean }>;
  close(): Promise<void>;
} {
  const prefix = opts.prefix ?? 'cellcds:jti:';
  const now = opts.now ?? (() => new Date());
  const { maxEntries, maxPerIssuer } = replayCacheSize(opts, DEFAULT_REDIS_REPLAY_MAX_ENTRIES);
  const redis = new Redis(opts.url, {
    // Commands wait for the connection, bounded by commandTimeout (once `down` and not
    // connected, `call` refuses them at once instead).
    maxRetriesPerRequest: 1,
    commandTimeout: opts.commandTimeoutMs ?? 1000,
  });
  // Connection errors surface as rejected commands; keep them out of the process' error path.
  redis.on('error', () => undefined);
  // Sent by its SHA (EVALSHA), the script's text only when Redis does not hold it yet.
  redis.defineCommand(REMEMBER_COMMAND, { numberOfKeys: 5, lua: REMEMBER_SCRIPT });
  redis.defineCommand(EPOCH_COMMAND, { numberOfKeys: 1, lua: EPOCH_SCRIPT });
  const epochScript = (redis as unknown as Record<typeof EPOCH_COMMAND, RememberScript>)[
    EPOCH_COMMAND
  ].bind(redis);
  const epochKey = `${prefix}epoch`;
  const rememberScript = (redis as unknown as Record<typeof REMEMBER_COMMAND, RememberScript>)[
    REMEMBER_COMMAND
  ].bind(redis);

  const leewayMs = (opts.leewaySeconds ?? 60) * 1000;
  /** How long a loss of jtis matters: a token issued before it is accepted no longer than this. */
  const lostWindowMs = (opts.maxTokenLifetimeSeconds ?? 3600) * 1000 + 2 * leewayMs;
  const trustEvent = (event: ReplayTrustEvent): void => {
    try {
      opts.onTrustEvent?.(event);
    } catch {
      // A listener's fault must not change a token's verdict.
    }
  };
  /** The Redis last read (its run_id) and its evicted_keys then. */
  let seen: { runId: string; evicted: number } | undefined;
  /** Redis may have lost the jtis of tokens issued before `since` (ms, our clock). */
  let lost:
    { since: number; why: 'restarted' | 'started_recently' | 'evicted' | 'flushed' } | undefined;
  /** Redis's clock minus ours at the last read, when Redis's is ahead by more than the leeway. */
  let clockSkewMs: number | undefined;
  /** The epoch id (EPOCH_SCRIPT) the last read found. */
  let epochId: string | undefined;
  const loses = (
    since: number,
    why: 'restarted' | 'started_recently' | 'evicted' | 'flushed',
  ): void => {
    if (!lost || since > lost.since) {
      lost = { since, why };
      trustEvent({
        kind: 'reset',
        cause: why,
        since: new Date(since),
        until: new Date(since + lostWindowMs),
      });
    }
  };
  /**
   * What one read of INFO and TIME tells: a Redis too old; a new Redis (another run_id: restarted
   * or failed over) or, on first sight, one started less than a token's lifetime ago, or one that
   * evicted keys since the last read: jtis may be lost; its clock ahead of ours.
   */
  const observe = (info: string, time: unknown[], before: number, after: number): string => {
    const required = (name: string): string => {
      const value = infoField(info, name);
      if (value === undefined) {
        throw new RedisUnsupportedError(`INFO ${name}`, 'missing from the INFO reply');
      }
      return value;
    };
    const version = required('redis_version');
    if (!(Number(version.split('.')[0]) >= 7)) {
      throw new RedisVersionError(version);
    }
    const runId = required('run_id');
    const evicted = Number(required('evicted_keys'));
    const uptimeSeconds = Number(required('uptime_in_seconds'));
    if (seen === undefined) {
      const started = after - uptimeSeconds * 1000;
      if (after - started < lostWindowMs) {
        loses(started, 'started_recently');
      }
    } else if (evicted > seen.evicted) {
      loses(after, 'evicted');
    }
    // A new run_id (restarted, failed over) is seen through the epoch (`epoch` below).
    const previousRunId = seen?.runId;
    seen = { runId, evicted };
    const redisMs = Number(time[0]) * 1000 + Math.floor(Number(time[1]) / 1000);
    const skewMs = Math.round(redisMs - (before + after) / 2);
    // Only a Redis clock ahead of ours expires entries early (on our timeline); one behind keeps
    // them longer than their tokens, which is safe.
    const skewed = skewMs > leewayMs + (after - before) / 2;
    if (skewed !== (clockSkewMs !== undefined)) {
      trustEvent({ kind: skewed ? 'clock_skew' : 'clock_ok', skewMs });
    }
    clockSkewMs = skewed ? skewMs : undefined;
    return previousRunId === undefined || previousRunId === runId ? 'flushed' : 'restarted';
  };
  /**
   * Reads (and, when Redis may have lost jtis, rewrites) the epoch: a new one since the last read
   * whose loss is within the window (written by this process or another, before this one started
   * included, e.g. after a failover) gets the tokens issued before it refused.
   */
  const epoch = async (runId: string, at: number, missingCause: string): Promise<void> => {
    const reply = (await epochScript(
      epochKey,
      runId,
      crypto.randomUUID(),
      at,
      epochId ?? '',
      missingCause,
    )) as [string, string, string];
    const [id, sinceText, cause] = reply;
    if (id !== epochId) {
      epochId = id;
      const since = Number(sinceText);
      if (since > 0 && at < since + lostWindowMs) {
        loses(since, cause === 'restarted' ? 'restarted' : 'flushed');
      }
    }
  };
  /** Refuses a token while Redis's clock is ahead of ours or it may have lost its jti. */
  const trusted = (iatSeconds: number | undefined): void => {
    if (clockSkewMs !== undefined) {
      throw new RedisClockSkewError(clockSkewMs);
    }
    if (lost) {
      if (now().getTime() >= lost.since + lostWindowMs) {
        lost = undefined;
      } else if (iatSeconds === undefined || iatSeconds * 1000 < lost.since + leewayMs) {
        throw new RedisHistoryLostError(lost.why, new Date(lost.since));
      }
    }
  };

  const policyCheckMs = opts.policyCheckMs ?? POLICY_CHECK_MS;
  const evictingRecheckMs = Math.min(opts.evictingRecheckMs ?? EVICTING_RECHECK_MS, policyCheckMs);
  let current: ReplayBackendState | undefined;
  let policy: { checkedAt: number; check: Promise<void> } | undefined;
  /**
   * Connections since the first: after a reconnect, Redis is read again before the next token
   * (it may be another Redis, restarted or failed over, that lost jtis).
   */
  let connections = 0;
  redis.on('ready', () => {
    connections += 1;
    policy = undefined;
  });
  /** The policy the last read found, if it may evict keys (then Redis answering is `evicting`). */
  let evictingPolicy: string | undefined;
  /** What the last read found Redis refuses or lacks (too old, a command, an INFO field). */
  let unsupported: RedisUnsupportedError | RedisVersionError | undefined;
  const setState = (next: ReplayBackendState): void => {
    if (next !== current) {
      const previous = current;
      current = next;
      try {
        opts.onStateChange?.(next, previous);
      } catch {
        // A listener's fault must not change a token's verdict.
      }
    }
  };
  /** Redis answered a command: `up`, unless the last policy read found it may evict keys. */
  const answered = (): void => {
    setState(evictingPolicy === undefined ? 'up' : 'evicting');
  };
  /**
   * Runs one Redis call (a token's script, the policy read, the readiness PING): its failure
   * becomes a typed error (a Redis that does not answer: `ReplayBackendError` `down`; Redis's
   * memory full under noeviction: `ReplayCacheFullError`) and its outcome updates `state()`.
   * While the state is `down` and the client is not connected, it refuses at once: waiting for a
   * connection the client is still retrying would hold each call for the command timeout. Before
   * the first answer (state unset: the connection is still being opened at boot) it waits.
   */
  const call = async <T>(command: () => Promise<T>): Promise<T> => {
    if (current === 'down' && redis.status !== 'ready') {
      throw new ReplayBackendError(
        'down',
        `Redis does not answer: not connected (${redis.status})`,
      );
    }
    let result: T;
    try {
      result = await command();
    } catch (err) {
      if (err instanceof RedisUnsupportedError || err instanceof RedisVersionError) {
        // Redis answered, but lacks what the cache needs: `health()` and tokens tell.
        answered();
        throw err;
      }
      if (err instanceof ReplayBackendError) {
        setState(err.state);
        throw err;
      }
      if (err instanceof Error && /^OOM\b/.test(err.message)) {
        // Redis answered: its memory is full (noeviction refuses writes). A cache to size.
        answered();
        throw new ReplayCacheFullError();
      }
      setState('down');
      throw new ReplayBackendError(
        'down',
        `Redis does not answer: ${err instanceof Error ? err.name : typeof err}`,
        err,
      );
    }
    answered();
    return result;
  };

  /** Resolves if Redis keeps every key until its TTL; shared by concurrent callers. */
  const keepsKeys = (): Promise<void> => {
    const at = performance.now();
    // An evicting verdict refuses every token: it is read again sooner, so a fix shows soon.
    const trustedFor =
      evictingPolicy === undefined && unsupported === undefined ? policyCheckMs : evictingRecheckMs;
    if (!policy || at - policy.checkedAt > trustedFor) {
      const check = call(async () => {
        const before = now().getTime();
        // The default sections (server, memory, stats...) in one reply, and Redis's clock.
        let info: string;
        let time: unknown[];
        try {
          [info, time] = await Promise.all([
            needed('INFO', redis.info()),
            needed('TIME', redis.time()),
          ]);
          const after = now().getTime();
          const missingCause = observe(info, time, before, after);
          await epoch(infoField(info, 'run_id') ?? '', after, missingCause);
        } catch (err) {
          if (err instanceof RedisUnsupportedError || err instanceof RedisVersionError) {
            if (unsupported?.message !== err.message) {
              trustEvent({ kind: 'unsupported', message: err.message });
            }
            unsupported = err;
          }
          throw err;
        }
        unsupported = undefined;
        const found = infoField(info, 'maxmemory_policy') ?? 'unknown';
        evictingPolicy = found === 'noeviction' ? undefined : found;
        if (evictingPolicy !== undefined) {
          throw new RedisEvictsKeysError(evictingPolicy);
        }
      });
      policy = { checkedAt: at, check };
      // A failed read (Redis down) is not trusted: the next token reads again.
      check.catch((err: unknown) => {
        if (
          policy?.check === check &&
          !(err instanceof RedisEvictsKeysError) &&
          !(err instanceof RedisUnsupportedError) &&
          !(err instanceof RedisVersionError)
        ) {
          policy = undefined;
        }
      });
    }
    return policy.check;
  };

  return {
    ready: keepsKeys,
    state: () => current ?? 'down',
    /**
     * For readiness probes, the state tokens see: the eviction policy (read at most every
     * 5 s, as for tokens; a cached `evicting` verdict is the answer, as it is for tokens) then
     * a PING (bounded by the command timeout; at once while Redis is down and the client not
     * connected), both through `call`, so the probe moves `state()` as tokens do, and the answer
     * is what `state()` then says. Never rejects.
     */
    async health() {
      try {
        await keepsKeys();
        await call(() => redis.ping());
      } catch {
        // Recorded in the state by `call` (or by the policy read the verdict comes from).
      }
      if (current === 'up' && unsupported !== undefined) {
        // Every token is refused here (RedisUnsupportedError, RedisVersionError): until fixed.
        return { ok: false, code: 'unsupported', message: unsupported.message };
      }
      if (current === 'up' && clockSkewMs !== undefined) {
        // Every token is refused here (RedisClockSkewError): out of rotation until fixed.
        return {
          ok: false,
          code: 'clock_skew',
          message: `Redis's clock is ${String(clockSkewMs)} ms ahead of this process's, more than the leeway`,
        };
      }
      return healthOf(current ?? 'down', evictingPolicy);
    },
    /**
     * Whether Redis logs every write (AOF). Without it a restart forgets the jtis of tokens
     * still valid, which could then be replayed until they expire (RDB snapshots lag).
     */
    async durability() {
      const info = await call(() => redis.info('persistence'));
      return { aof: /^aof_enabled:1\b/m.test(info) };
    },
    async remember(tenant, iss, jti, expSeconds, iatSeconds?: number) {
      await keepsKeys();
      trusted(iatSeconds);
      // Hashed JSON arrays: keys have a bounded length whatever the token carries, and no two
      // triples (or a triple and an old pair, thanks to the tag) share a key.
      const entry = sha256(JSON.stringify(['v2', tenant, iss, jti]));
      let result: unknown;
      for (let attempt = 0; ; attempt++) {
        const connection = connections;
        const at = now().getTime();
        const expiresAt = Math.max(expSeconds * 1000, at + 1000);
        const expectedEpoch = epochId ?? '';
        result = await call(() =>
          rememberScript(
            `${prefix}v2:${entry}`,
            // LEGACY: the previous version's key of (iss, jti); see REMEMBER_SCRIPT.
            prefix + sha256(JSON.stringify([iss, jti])),
            `${prefix}v2:share:${sha256(JSON.stringify(['v2', tenant, iss]))}`,
            `${prefix}all`,
            epochKey,
            expiresAt,
            at,
            maxPerIssuer,
            maxEntries,
            // 128 bits of the entry's hash name it in the counts (a collision would only undercount).
            entry.slice(0, 32),
            LEGACY_MARK,
            expectedEpoch,
          ),
        );
        if (connections !== connection || result === -3) {
          // Reconnected meanwhile (the script may have run on a new Redis), or the epoch is not
          // the one last read (Redis restarted behind a connection that survived, flushed, or
          // another process saw a loss): read Redis again at once before trusting it.
          if (result === -3) {
            policy = undefined;
          }
          await keepsKeys();
          trusted(iatSeconds);
        }
        if (result !== -3) {
          break;
        }
        if (attempt >= 1) {
          throw new ReplayBackendError('down', 'Redis replay cache epoch keeps changing');
        }
      }
      if (result === -2) {
        throw new ReplayCacheFullError();
      }
      if (result === -1) {
        throw new ReplayIssuerQuotaError(maxPerIssuer);
      }
      return result === 1;
    },
    async close() {
      await redis.quit().catch(() => undefined);
    },
  };
}
