/**
 * Fetches issuers' JWK Sets by URL, for `jwksUri` registrations and allowlisted `jku` values.
 * Only URLs an operator registered reach this module (the verifier checks the allowlist first);
 * it still refuses non-https URLs (http only to loopback), redirects, slow and large answers.
 */
import { JwksFetchError } from './errors.ts';
import type { Jwks, JwksFetcher } from './types.ts';
import { keyUrlProblem } from './url-policy.ts';

export interface JwksFetcherOptions {
  /** Whole-request timeout, headers and body (default 3000 ms). */
  timeoutMs?: number;
  /** Body size cap, enforced while streaming (default 64 KiB). */
  maxBytes?: number;
  /** How long a fetched set is served from cache (default 300 s). */
  cacheSeconds?: number;
  /** Cooldown: no URL is fetched more often than this, forced or failed (default 30 s). */
  minRefetchSeconds?: number;
  /** Most URLs cached at once (default 1000; the oldest is dropped). */
  maxUrls?: number;
  fetchImpl?: typeof fetch;
  now?: () => Date;
}

interface Entry {
  jwks?: Jwks;
  fetchedAt: number;
  lastAttempt: number;
  error?: JwksFetchError;
  inflight?: Promise<Jwks>;
}

async function readCapped(res: Response, maxBytes: number): Promise<string> {
  const declared = res.headers.get('content-length');
  if (declared !== null && Number(declared) > maxBytes) {
    await res.body?.cancel().catch(() => undefined);
    throw new JwksFetchError('response too large');
  }
  if (!res.body) {
    return '';
  }
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = (await reader.read()) as { done: boolean; value?: Uint8Array };
    if (done) {
      break;
    }
    if (value) {
      total += value.byteLength;
      if (total > maxBytes) {
        await reader.cancel().catch(() => undefined);
        throw new JwksFetchError('response too large');
      }
      chunks.push(value);
    }
  }
  return Buffer.concat(chunks).toString('utf8');
}

function parseJwks(text: string): Jwks {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (err) {
    throw new JwksFetchError('response is not JSON', err);
  }
  if (
    typeof body !== 'object' ||
    body === null ||
    !Array.isArray((body as { keys?: unknown }).keys)
  ) {
    throw new JwksFetchError('response has no keys array');
  }
  const keys = (body as { keys: unknown[] }).keys.filter(
    (k): k is Record<string, unknown> => typeof k === 'object' && k !== null && !Array.isArray(k),
  );
  return { keys };
}

/**
 * Creates a JWKS fetcher with a per-URL cache, a refetch cooldown (bounding how often an
 * unknown `kid` can make us fetch), de-duplicated concurrent fetches, and negative caching
 * of failures for the cooldown.
 * @throws JwksFetchError from `get` (bad URL, timeout, status other than 200, redirect,
 *   oversize body, not a JWK Set).
 */
export function createJwksFetcher(opts: JwksFetcherOptions = {}): JwksFetcher {
  const timeoutMs = opts.timeoutMs ?? 3000;
  const maxBytes = opts.maxBytes ?? 64 * 1024;
  const cacheMs = (opts.cacheSeconds ?? 300) * 1000;
  const cooldownMs = (opts.minRefetchSeconds ?? 30) * 1000;
  const maxUrls = opts.maxUrls ?? 1000;
  const fetchImpl = opts.fetchImpl ?? fetch;
  const now = opts.now ?? (() => new Date());
  const cache = new Map<string, Entry>();

  async function fetchOnce(url: string): Promise<Jwks> {
    const controller = new AbortController();
    const timer = setTimeout(() => {
      controller.abort();
    }, timeoutMs);
    try {
      const res = await fetchImpl(url, {
        method: 'GET',
        redirect: 'manual',
        signal: controller.signal,
        headers: { accept: 'application/jwk-set+json, application/json' },
      });
      if (res.status !== 200) {
        await res.body?.cancel().catch(() => undefined);
        throw new JwksFetchError(
          res.status >= 300 && res.status < 400
            ? 'redirects are not followed'
            : `HTTP ${res.status}`,
        );
      }
      return parseJwks(await readCapped(res, maxBytes));
    } catch (err) {
      if (err instanceof JwksFetchError) {
        throw err;
      }
      throw new JwksFetchError(controller.signal.aborted ? 'timeout' : 'fetch failed', err);
    } finally {
      clearTimeout(timer);
    }
  }

  function entryFor(url: string): Entry {
    let entry = cache.get(url);
    if (!entry) {
      if (cache.size >= maxUrls) {
        const oldest = cache.keys().next();
        if (!oldest.done) {
          cache.delete(oldest.value);
        }
      }
      entry = { fetchedAt: 0, lastAttempt: Number.NEGATIVE_INFINITY };
      cache.set(url, entry);
    }
    return entry;
  }

  return {
    peek(url) {
      const entry = cache.get(url);
      const cached = entry?.jwks;
      return entry && cached !== undefined && now().getTime() - entry.fetchedAt < cacheMs
        ? cached
        : undefined;
    },
    get(url, getOpts = {}) {
      const problem = keyUrlProblem(url);
      if (problem) {
        return Promise.reject(new JwksFetchError(`url ${problem}`));
      }
      const entry = entryFor(url);
      if (entry.inflight) {
        return entry.inflight;
      }
      const at = now().getTime();
      const cached = entry.jwks;
      const isFresh = cached !== undefined && at - entry.fetchedAt < cacheMs;
      const inCooldown = at - entry.lastAttempt < cooldownMs;
      if (isFresh && (getOpts.forceRefresh !== true || inCooldown)) {
        return Promise.resolve(cached);
      }
      if (!isFresh && entry.error && inCooldown) {
        return Promise.reject(entry.error);
      }
      entry.lastAttempt = at;
      const inflight = fetchOnce(url).then(
        (jwks) => {
          entry.jwks = jwks;
          entry.fetchedAt = now().getTime();
          delete entry.error;
          return jwks;
        },
        (err: unknown) => {
          const error =
            err instanceof JwksFetchError ? err : new JwksFetchError('fetch failed', err);
          entry.error = error;
          // A failed forced refresh keeps serving the still-fresh set; an expired one fails closed.
          if (isFresh) {
            return cached;
          }
          throw error;
        },
      );
      entry.inflight = inflight.finally(() => {
        delete entry.inflight;
      });
      return entry.inflight;
    },
  };
}
