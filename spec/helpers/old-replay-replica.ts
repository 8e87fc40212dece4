/**
 * A replica of the version before the replay cache was keyed by tenant, for the rolling-upgrade
 * specs: it records and checks `(iss, jti)` in Redis exactly as that version did (its script and
 * key shapes, copied from tenants/redis-replay-cache.ts as of commit f4d4635).
 */
import crypto from 'node:crypto';
import type { Redis } from 'ioredis';

/** The old script, verbatim: KEYS pair, issuer's count, whole cache's count. */
const OLD_REMEMBER_SCRIPT = `
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local exp = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local share = tonumber(ARGV[3])
local size = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local total = redis.call('ZCARD', KEYS[3])
if total >= size then return -2 end
if total >= size - share and redis.call('ZCARD', KEYS[2]) >= share then return -1 end
redis.call('SET', KEYS[1], '1', 'PXAT', ARGV[1])
for i = 2, 3 do
  redis.call('ZADD', KEYS[i], ARGV[1], ARGV[5])
  if redis.call('PTTL', KEYS[i]) < exp - now then redis.call('PEXPIREAT', KEYS[i], ARGV[1]) end
end
return 1
`;

const sha256 = (text: string): string => crypto.createHash('sha256').update(text).digest('hex');

/** The old key of a pair: `prefix` + sha256 of `[iss, jti]` (no tenant). */
export function oldPairKey(prefix: string, iss: string, jti: string): string {
  return prefix + sha256(JSON.stringify([iss, jti]));
}

/**
 * `remember(iss, jti, exp)` of the old version, with its default sizes: 1 for a first use
 * (then recorded under the old key), 0 for a replay, -1 / -2 for its quota and full refusals.
 */
export async function rememberAsOldReplica(
  redis: Redis,
  prefix: string,
  iss: string,
  jti: string,
  expSeconds: number,
): Promise<number> {
  const pair = sha256(JSON.stringify([iss, jti]));
  const at = Date.now();
  return (await redis.eval(
    OLD_REMEMBER_SCRIPT,
    3,
    prefix + pair,
    `${prefix}iss:${sha256(iss)}`,
    `${prefix}all`,
    Math.max(expSeconds * 1000, at + 1000),
    at,
    25_000,
    1_000_000,
    pair.slice(0, 32),
  )) as number;
}
