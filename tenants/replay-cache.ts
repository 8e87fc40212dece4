/**
 * In-memory replay cache for one process (embedded mode). Scale-out uses a shared cache
 * (Redis) behind the same `ReplayCache` interface.
 */
import { ReplayCacheFullError } from './errors.ts';
import type { ReplayCache } from './types.ts';

export interface MemoryReplayCacheOptions {
  now?: () => Date;
  /** Most `(iss, jti)` pairs held at once (default 100 000). */
  maxEntries?: number;
}

/**
 * Creates an in-memory ReplayCache. Entries live until their expiry; expired ones are pruned.
 * When full of unexpired entries it refuses new ones (throws) rather than forgetting any:
 * forgetting would let a captured token be replayed.
 * @throws ReplayCacheFullError from `remember` when full (the verifier then refuses the token).
 */
export function createMemoryReplayCache(
  opts: MemoryReplayCacheOptions = {},
): ReplayCache & { size(): number } {
  const now = opts.now ?? (() => new Date());
  const maxEntries = opts.maxEntries ?? 100_000;
  if (!Number.isInteger(maxEntries) || maxEntries < 1) {
    throw new RangeError('maxEntries must be a positive integer');
  }
  /** key -> expiry in ms since the epoch */
  const entries = new Map<string, number>();
  let insertsSincePrune = 0;
  const pruneEvery = Math.max(1, Math.min(1000, Math.floor(maxEntries / 10)));

  function prune(at: number): void {
    for (const [key, exp] of entries) {
      if (exp <= at) {
        entries.delete(key);
      }
    }
    insertsSincePrune = 0;
  }

  return {
    remember(iss, jti, expSeconds) {
      const at = now().getTime();
      const key = JSON.stringify([iss, jti]);
      const existing = entries.get(key);
      if (existing !== undefined && existing > at) {
        return Promise.resolve(false);
      }
      if (insertsSincePrune >= pruneEvery || entries.size >= maxEntries) {
        prune(at);
      }
      if (entries.size >= maxEntries && !entries.has(key)) {
        return Promise.reject(new ReplayCacheFullError());
      }
      entries.set(key, expSeconds * 1000);
      insertsSincePrune++;
      return Promise.resolve(true);
    },
    size() {
      return entries.size;
    },
    close() {
      entries.clear();
      return Promise.resolve();
    },
  };
}
