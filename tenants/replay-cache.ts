/**
 * In-memory replay cache for one process (embedded mode). Scale-out uses a shared cache
 * (Redis) behind the same `ReplayCache` interface.
 */
import { ReplayCacheFullError, ReplayIssuerQuotaError } from './errors.ts';
import type { ReplayCache } from './types.ts';

export interface MemoryReplayCacheOptions {
  now?: () => Date;
  /** Most `(iss, jti)` pairs held at once (default 100 000). */
  maxEntries?: number;
  /**
   * One issuer's share (default: 25 000, or `maxEntries` if smaller). Beyond it an issuer may
   * still use free room, but never the last `maxPerIssuer` places: those stay for issuers under
   * their share, so one tenant's EHR cannot fill the cache and get every tenant refused.
   */
  maxPerIssuer?: number;
}

/** The in-process cache's default size. */
export const DEFAULT_MEMORY_REPLAY_MAX_ENTRIES = 100_000;

/** The default share of one issuer (a quarter of the in-process cache's default size). */
export const DEFAULT_REPLAY_MAX_PER_ISSUER = 25_000;

/**
 * A replay cache's size and one issuer's share, defaults applied (the share: 25,000, or the
 * whole cache if smaller). Shared by the in-process and the Redis cache and the configuration.
 * @throws RangeError if either is not a positive integer, or the share exceeds the cache.
 */
export function replayCacheSize(
  opts: { maxEntries?: number | undefined; maxPerIssuer?: number | undefined },
  defaultMaxEntries: number,
  /** How errors name the two settings (the configuration names its environment variables). */
  names: { maxEntries: string; maxPerIssuer: string } = {
    maxEntries: 'maxEntries',
    maxPerIssuer: 'maxPerIssuer',
  },
): { maxEntries: number; maxPerIssuer: number } {
  const maxEntries = opts.maxEntries ?? defaultMaxEntries;
  const maxPerIssuer = opts.maxPerIssuer ?? Math.min(DEFAULT_REPLAY_MAX_PER_ISSUER, maxEntries);
  for (const [name, n] of [
    [names.maxEntries, maxEntries],
    [names.maxPerIssuer, maxPerIssuer],
  ] as const) {
    if (!Number.isInteger(n) || n < 1) {
      throw new RangeError(`${name} must be a positive integer`);
    }
  }
  if (maxPerIssuer > maxEntries) {
    throw new RangeError(
      `${names.maxPerIssuer} (${String(maxPerIssuer)}) exceeds ${names.maxEntries} (${String(maxEntries)}): one issuer's share cannot be larger than the whole cache`,
    );
  }
  return { maxEntries, maxPerIssuer };
}

/** A binary min-heap of (expiry, key, issuer), so expired entries are found without a scan. */
class ExpiryHeap {
  private readonly exp: number[] = [];
  private readonly key: string[] = [];
  private readonly iss: string[] = [];

  /** The earliest expiry, or Infinity when empty. */
  peek(): number {
    return this.exp[0] ?? Number.POSITIVE_INFINITY;
  }

  push(exp: number, key: string, iss: string): void {
    this.exp.push(exp);
    this.key.push(key);
    this.iss.push(iss);
    let i = this.exp.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if ((this.exp[parent] ?? 0) <= exp) {
        break;
      }
      this.swap(i, parent);
      i = parent;
    }
  }

  /** Removes the earliest (expiry, key, issuer). @throws RangeError when empty. */
  pop(): [number, string, string] {
    const top: [number, string, string] | undefined =
      this.exp.length > 0 ? [this.exp[0] ?? 0, this.key[0] ?? '', this.iss[0] ?? ''] : undefined;
    if (!top) {
      throw new RangeError('the heap is empty');
    }
    const lastExp = this.exp.pop() ?? 0;
    const lastKey = this.key.pop() ?? '';
    const lastIss = this.iss.pop() ?? '';
    if (this.exp.length > 0) {
      this.exp[0] = lastExp;
      this.key[0] = lastKey;
      this.iss[0] = lastIss;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let least = i;
        if (l < this.exp.length && (this.exp[l] ?? 0) < (this.exp[least] ?? 0)) {
          least = l;
        }
        if (r < this.exp.length && (this.exp[r] ?? 0) < (this.exp[least] ?? 0)) {
          least = r;
        }
        if (least === i) {
          break;
        }
        this.swap(i, least);
        i = least;
      }
    }
    return top;
  }

  clear(): void {
    this.exp.length = 0;
    this.key.length = 0;
    this.iss.length = 0;
  }

  private swap(a: number, b: number): void {
    const e = this.exp[a] ?? 0;
    this.exp[a] = this.exp[b] ?? 0;
    this.exp[b] = e;
    const k = this.key[a] ?? '';
    this.key[a] = this.key[b] ?? '';
    this.key[b] = k;
    const i = this.iss[a] ?? '';
    this.iss[a] = this.iss[b] ?? '';
    this.iss[b] = i;
  }
}

/**
 * Creates an in-memory ReplayCache. Entries live until their expiry; expired ones are dropped
 * as new ones come in, earliest expiry first (a heap: no scan of the whole cache, which at
 * 100,000 entries stalled the event loop for ~10 ms). When full of unexpired entries it
 * refuses new ones (throws) rather than forgetting any: forgetting would let a captured token
 * be replayed. Size it for the peak rate of calls times the longest token lifetime plus the
 * leeway (`CELLCDS_REPLAY_CACHE_MAX_ENTRIES`); replicas share Redis instead.
 *
 * Each issuer has a share, `maxPerIssuer`. An issuer holding its share or more may go on only
 * while more than `maxPerIssuer` places are free: the last ones are kept for issuers under
 * their share. So a busy tenant alone may use all but one share of the cache, and
 * an issuer minting tokens fast or with long lifetimes, alone or with others, cannot lock out
 * the tenants that hold less: while it is refused, they still have a share's room.
 * @throws ReplayIssuerQuotaError from `remember` when the issuer holds its share and only the
 * last share of places is free, and
 * ReplayCacheFullError when the whole cache is full (the verifier then refuses the token).
 */
export function createMemoryReplayCache(
  opts: MemoryReplayCacheOptions = {},
): ReplayCache & { size(): number } {
  const now = opts.now ?? (() => new Date());
  const { maxEntries, maxPerIssuer } = replayCacheSize(opts, DEFAULT_MEMORY_REPLAY_MAX_ENTRIES);
  /** key -> expiry in ms since the epoch */
  const entries = new Map<string, number>();
  /** issuer -> its unexpired entries (issuers with none are not kept) */
  const perIssuer = new Map<string, number>();
  /**
   * The expiry of every entry, with its key. A pair is set again only once its entry expired,
   * and prune() runs first, so each entry has one node; the check below is a second guard.
   */
  const expiries = new ExpiryHeap();

  function prune(at: number): void {
    while (expiries.peek() <= at) {
      const [exp, key, iss] = expiries.pop();
      if (entries.get(key) === exp) {
        entries.delete(key);
        const held = (perIssuer.get(iss) ?? 1) - 1;
        if (held > 0) {
          perIssuer.set(iss, held);
        } else {
          perIssuer.delete(iss);
        }
      }
    }
  }

  return {
    remember(iss, jti, expSeconds) {
      const at = now().getTime();
      const key = JSON.stringify([iss, jti]);
      const existing = entries.get(key);
      if (existing !== undefined && existing > at) {
        return Promise.resolve(false);
      }
      prune(at);
      // An expired pair was pruned above: the key is new here, and counts against both limits.
      if (entries.size >= maxEntries) {
        return Promise.reject(new ReplayCacheFullError());
      }
      const held = perIssuer.get(iss) ?? 0;
      if (held >= maxPerIssuer && entries.size >= maxEntries - maxPerIssuer) {
        return Promise.reject(new ReplayIssuerQuotaError(maxPerIssuer));
      }
      const exp = expSeconds * 1000;
      entries.set(key, exp);
      perIssuer.set(iss, held + 1);
      expiries.push(exp, key, iss);
      return Promise.resolve(true);
    },
    size() {
      return entries.size;
    },
    close() {
      entries.clear();
      perIssuer.clear();
      expiries.clear();
      return Promise.resolve();
    },
  };
}
