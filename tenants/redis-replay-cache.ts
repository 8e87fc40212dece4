/**
 * Replay cache shared by every replica (scale-out): `(iss, jti)` pairs in Redis, each kept
 * until the token's expiry. One atomic `SET key 1 NX PXAT exp` per token: the first replica
 * to see a jti wins, every later use (on any replica) is a replay. If Redis cannot answer,
 * `remember` rejects and the verifier refuses the token (fail closed).
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

/** Creates a Redis-backed ReplayCache. Call `close()` on shutdown. */
export function createRedisReplayCache(opts: RedisReplayCacheOptions): ReplayCache {
  const prefix = opts.prefix ?? 'cellcds:jti:';
  const now = opts.now ?? (() => new Date());
  const redis = new Redis(opts.url, {
    // Commands wait for the connection, bounded by commandTimeout: a down Redis refuses fast.
    maxRetriesPerRequest: 1,
    commandTimeout: opts.commandTimeoutMs ?? 1000,
  });
  // Connection errors surface as rejected commands; keep them out of the process' error path.
  redis.on('error', () => undefined);

  return {
    async remember(iss, jti, expSeconds) {
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
