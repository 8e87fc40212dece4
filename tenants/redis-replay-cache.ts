/**
 * Replay cache shared by every replica (scale-out): `(iss, jti)` pairs in Redis, each kept
 * until the token's expiry. One atomic `SET key 1 NX PXAT exp` per token: the first replica
 * to see a jti wins, every later use (on any replica) is a replay. If Redis cannot answer,
 * `remember` rejects and the verifier refuses the token (fail closed).
 *
 * A Redis that evicts keys under memory pressure (any `maxmemory-policy` but `noeviction`; our
 * keys carry a TTL, so even the `volatile-*` policies take them) would forget a jti before
 * its token expires, and the token could be replayed. So the policy is read (`INFO memory`,
 * which managed Redis services allow where `CONFIG` is disabled) before the first token and
 * again every minute; while it is not `noeviction`, every token is refused.
 */
import crypto from 'node:crypto';
import { Redis } from 'ioredis';
import type { ReplayCache } from './types.ts';

export interface RedisReplayCacheOptions {
  /** e.g. `redis://127.0.0.1:6379` */
  url: string;
  /** Key prefix (default `cellcds:jti:`), so several deployments can share one Redis. */
  prefix?: string;
  /** Per-command timeout (default 1000 ms). */
  commandTimeoutMs?: number;
  now?: () => Date;
}

/** The Redis behind the replay cache may evict keys: a jti could be forgotten and replayed. */
export class RedisEvictsKeysError extends Error {
  constructor(readonly policy: string) {
    super(
      `Redis maxmemory-policy is ${policy}: it may evict replay-cache keys before their tokens expire; set it to noeviction`,
    );
    this.name = 'RedisEvictsKeysError';
  }
}

/** How long a read of the eviction policy is trusted. */
const POLICY_CHECK_MS = 60_000;

/** Creates a Redis-backed ReplayCache. Call `close()` on shutdown. */
export function createRedisReplayCache(
  opts: RedisReplayCacheOptions,
): ReplayCache & { ready(): Promise<void>; close(): Promise<void> } {
  const prefix = opts.prefix ?? 'cellcds:jti:';
  const now = opts.now ?? (() => new Date());
  const redis = new Redis(opts.url, {
    // Commands wait for the connection, bounded by commandTimeout: a down Redis refuses fast.
    maxRetriesPerRequest: 1,
    commandTimeout: opts.commandTimeoutMs ?? 1000,
  });
  // Connection errors surface as rejected commands; keep them out of the process' error path.
  redis.on('error', () => undefined);

  let policy: { checkedAt: number; check: Promise<void> } | undefined;
  /** Resolves if Redis keeps every key until its TTL; shared by concurrent callers. */
  const keepsKeys = (): Promise<void> => {
    const at = performance.now();
    if (!policy || at - policy.checkedAt > POLICY_CHECK_MS) {
      const check = redis.info('memory').then((info) => {
        const found = /^maxmemory_policy:(\S+)/m.exec(info)?.[1] ?? 'unknown';
        if (found !== 'noeviction') {
          throw new RedisEvictsKeysError(found);
        }
      });
      policy = { checkedAt: at, check };
      // A failed read (Redis down) is not trusted for a minute: the next token reads again.
      check.catch((err: unknown) => {
        if (policy?.check === check && !(err instanceof RedisEvictsKeysError)) {
          policy = undefined;
        }
      });
    }
    return policy.check;
  };

  return {
    ready: keepsKeys,
    async remember(iss, jti, expSeconds) {
      await keepsKeys();
      // Hash the pair: keys have a bounded length whatever the token carries.
      const key =
        prefix +
        crypto
          .createHash('sha256')
          .update(JSON.stringify([iss, jti]))
          .digest('hex');
      const expiresAt = Math.max(expSeconds * 1000, now().getTime() + 1000);
      const result = await redis.set(key, '1', 'PXAT', expiresAt, 'NX');
      return result === 'OK';
    },
    async close() {
      await redis.quit().catch(() => undefined);
    },
  };
}
