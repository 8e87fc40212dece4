/**
 * In-memory replay cache for one process (embedded mode). Scale-out uses a shared cache
 * (Redis) behind the same `ReplayCache` interface. Entries and shares are keyed by tenant and
 * issuer: tenants whose EHRs use the same issuer have their own jti space and their own share.
 */
import { ReplayCacheFullError, ReplayIssuerQuotaError } from './errors.ts';
import type { ReplayCache } from './types.ts';

export interface MemoryReplayCacheOptions {
  now?: () => Date;
  /** Most `(tenant, iss, jti)` entries held at once (default 100 000). */
  maxEntries?: number;
  /**
   * One issuer's share for one tenant, i.e. per `(tenant, iss)` (default: 25 000, or
   * `maxEntries` if smaller). Beyond it a tenant's issuer may still use free room, but never the
   * last `maxPerIssuer` places: those stay for the pairs under their share, so one tenant's EHR
   * cannot fill the cache and get every tenant refused, even a tenant on the same issuer.
   */
  maxPerIssuer?: number;
}

/** The in-process cache's default size. */
export const DEFAULT_MEMORY_REPLAY_MAX_ENTRIES = 100_000;

/** The default share of one `(tenant, iss)` (a quarter of the in-process cache's default size). */
export const DEFAULT_REPLAY_MAX_PER_ISSUER = 25_000;

/**
 * A replay cache's size and one `(tenant, iss)` pair's share, defaults applied (the share:
 * 25,000, or the whole cache if smaller). Shared by the in-process and the Redis cache and the configuration.
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

/** The unexpired entries of one `(tenant, iss)`; one object per pair, shared by its entries. */
interface Share {
  /** Its key in the shares map. */
  readonly key: string;
  held: number;
}

/** A binary min-heap of (expiry, key, share), so expired entries are found without a scan. */
class ExpiryHeap {
  private readonly exp: number[] = [];
  private readonly key: string[] = [];
  /** The entry's share object (a reference: no string per entry). */
  private readonly share: Share[] = [];

  /** The earliest expiry, or Infinity when empty. */
  peek(): number {
    return this.exp[0] ?? Number.POSITIVE_INFINITY;
  }

  push(exp: number, key: string, share: Share): void {
    this.exp.push(exp);
    this.key.push(key);
    this.share.push(share);
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

  /** Removes the earliest (expiry, key, share). @throws RangeError when empty. */
  pop(): [number, string, Share] {
    const topShare = this.share[0];
    if (this.exp.length === 0 || !topShare) {
      throw new RangeError('the heap is empty');
    }
    const top: [number, string, Share] = [this.exp[0] ?? 0, this.key[0] ?? '', topShare];
    const lastExp = this.exp.pop() ?? 0;
    const lastKey = this.key.pop() ?? '';
    const lastShare = this.share.pop() ?? topShare;
    if (this.exp.length > 0) {
      this.exp[0] = lastExp;
      this.key[0] = lastKey;
      this.share[0] = lastShare;
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
    this.share.length = 0;
  }

  private swap(a: number, b: number): void {
    const e = this.exp[a] ?? 0;
    this.exp[a] = this.exp[b] ?? 0;
    this.exp[b] = e;
    const k = this.key[a] ?? '';
    this.key[a] = this.key[b] ?? '';
    this.key[b] = k;
    const s = this.share[a];
    const t = this.share[b];
    if (s && t) {
      this.share[a] = t;
      this.share[b] = s;
    }
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
 * Entries are `(tenant, iss, jti)`: a jti used for one tenant is new for another tenant on the
 * same issuer. Each `(tenant, iss)` has a share, `maxPerIssuer`. A pair holding its share or
 * more may go on only while more than `maxPerIssuer` places are free: the last ones are kept for
 * the pairs under their share. So a busy tenant alone may use all but one share of the cache,
 * and a tenant's EHR minting tokens fast or with long lifetimes, alone or with others, cannot
 * lock out the tenants that hold less, those on the same issuer included: while it is refused,
 * they still have a share's room. Shares are counted only while they hold entries, so the
 * counts take no more room than the entries.
 * @throws ReplayIssuerQuotaError from `remember` when the token's `(tenant, iss)` holds its
 * share and only the last share of places is free, and
 * ReplayCacheFullError when the whole cache is full (the verifier then refuses the token).
 */
export function createMemoryReplayCache(
  opts: MemoryReplayCacheOptions = {},
): ReplayCache & { size(): number } {
  const now = opts.now ?? (() => new Date());
  const { maxEntries, maxPerIssuer } = replayCacheSize(opts, DEFAULT_MEMORY_REPLAY_MAX_ENTRIES);
  /** key of `[tenant, iss, jti]` -> expiry in ms since the epoch */
  const entries = new Map<string, number>();
  /** key of `[tenant, iss]` -> its unexpired entries (pairs with none are not kept) */
  const shares = new Map<string, Share>();
  /**
   * The expiry of every entry, with its key. A key is set again only once its entry expired,
   * and prune() runs first, so each entry has one node; the check below is a second guard.
   */
  const expiries = new ExpiryHeap();

  function prune(at: number): void {
    while (expiries.peek() <= at) {
      const [exp, key, share] = expiries.pop();
      if (entries.get(key) === exp) {
        entries.delete(key);
        share.held -= 1;
        if (share.held <= 0) {
          shares.delete(share.key);
        }
      }
    }
  }

  return {
    remember(tenant, iss, jti, expSeconds) {
      const at = now().getTime();
      // JSON arrays: no two (tenant, iss, jti) triples share a key, however their parts read.
      const key = JSON.stringify([tenant, iss, jti]);
      const existing = entries.get(key);
      if (existing !== undefined && existing > at) {
        return Promise.resolve(false);
      }
      prune(at);
      // An expired entry was pruned above: the key is new here, and counts against both limits.
      if (entries.size >= maxEntries) {
        return Promise.reject(new ReplayCacheFullError());
      }
      const shareKey = JSON.stringify([tenant, iss]);
      const share = shares.get(shareKey);
      if (share && share.held >= maxPerIssuer && entries.size >= maxEntries - maxPerIssuer) {
        return Promise.reject(new ReplayIssuerQuotaError(maxPerIssuer));
      }
      const exp = expSeconds * 1000;
      let counted = share;
      if (!counted) {
        counted = { key: shareKey, held: 0 };
        shares.set(shareKey, counted);
      }
      counted.held += 1;
      entries.set(key, exp);
      expiries.push(exp, key, counted);
      return Promise.resolve(true);
    },
    size() {
      return entries.size;
    },
    /** In process: nothing to be down. */
    state: () => 'up',
    close() {
      entries.clear();
      shares.clear();
      expiries.clear();
      return Promise.resolve();
    },
  };
}
