/**
 * The JWT mechanics shared by the two bearer-token verifiers: `verify-client-token.ts` (CDS
 * client JWTs) and `verify-id-token.ts` (SMART launch id_tokens). Each step is a small function
 * that either returns what the next step needs or throws AuthError(reason); the verifiers keep
 * their own policy (which `typ`, whether a `jku` may be followed, audience, replay, tenant
 * choice) and call these in their documented order.
 *
 * Never exported from `tenants/index.ts`: callers outside tenants/ use the verifiers.
 */
import crypto from 'node:crypto';
import { compactVerify, createLocalJWKSet, decodeJwt, decodeProtectedHeader } from 'jose';
import type { JWK } from 'jose';
import { AuthError, JwksFetchError } from './errors.ts';
import { LruCache } from './lru-cache.ts';
import type { AuthFailureReason, Jwks, JwksFetcher, Tenant, TrustedIssuer } from './types.ts';

/** Algorithms a verifier can ever be configured with: asymmetric signatures only. */
export const ASYMMETRIC_ALGORITHMS: readonly string[] = [
  'ES256',
  'ES384',
  'ES512',
  'RS256',
  'RS384',
  'RS512',
  'PS256',
  'PS384',
  'PS512',
];

/** The verifiers' default `alg` allowlist. */
export const DEFAULT_ALGORITHMS: readonly string[] = ['ES384', 'RS384', 'ES256', 'RS256'];

/** Longest Authorization header value considered (a CDS client JWT is well under 2 KiB). */
export const MAX_TOKEN_LENGTH = 16 * 1024;
/** Longest `iss` (or other untrusted value) passed to `onFailure`. */
const MAX_INFO_LENGTH = 256;
/**
 * `Bearer <compact JWS>`, the scheme in any case (RFC 7235 §2.1: auth schemes are
 * case-insensitive; RFC 6750 writes `Bearer`), one space, one token; the signature part may be
 * empty only where the caller allows it.
 */
const BEARER = /^[Bb][Ee][Aa][Rr][Ee][Rr] ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)$/;
/** JWK members that only private or symmetric keys have. */
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];
/**
 * Inline key sets a verifier keeps (least recently used dropped first): at least every tenant
 * of a large deployment (issue 6 benches 10,000), each a few KB.
 */
const MAX_INLINE_KEYSTORES = 10_000;

/** Longest untrusted value (a `kid`, an `aud`, a URL) named in a refusal's audit detail. */
const MAX_DETAIL_VALUE_LENGTH = 200;
/** Most `aud` values a refusal's audit detail names (`aud1` to `aud5`). */
const MAX_DETAIL_AUDIENCES = 5;

/** A decoded JOSE header or JWT claims set. */
export type Claims = Record<string, unknown>;
/** The usable public EC/RSA keys (with a `kid`) of one JWK Set, ready to verify with. */
export interface KeyStore {
  readonly kids: ReadonlySet<string>;
  /** jose's key selection for a JWS header (it imports each key once per `alg` and keeps it). */
  readonly select: ReturnType<typeof createLocalJWKSet>;
}
/** What a verifier tells `onFailure` about a refused token (never the token itself). */
export interface FailureInfo {
  iss?: string;
  tenant?: string;
}

/** An untrusted value, capped for a refusal's audit detail. */
function detailValue(value: string): string {
  return capped(value, MAX_DETAIL_VALUE_LENGTH);
}

/** `value`, cut to `max` characters. */
function capped(value: string, max: number): string {
  return value.length > max ? value.slice(0, max) : value;
}

/** `missing_claim`, naming the claim (`jti`, `iat`, `exp`, `iss`, `aud`, ...). */
export function missingClaim(claim: string): AuthError {
  return new AuthError('missing_claim', claim, undefined, { claim });
}

/** A `kid` as key ids are written (JWK thumbprints, uuids, names with dots and colons). */
const PLAIN_KID = /^[A-Za-z0-9._:+/=-]{1,200}$/;

/**
 * A `kid` the key set does not hold (`unknown_kid`), naming it. The header is read before any
 * signature check, so anyone who knows a registered `iss` chooses it: one in the usual key id
 * characters is named; any other text is never written to the audit (its length and a short
 * sha256 prefix are, enough to match it with what the EHR team sent).
 */
export function unknownKid(kid: string): AuthError {
  return new AuthError(
    'unknown_kid',
    undefined,
    undefined,
    PLAIN_KID.test(kid)
      ? { kid }
      : {
          kidLength: kid.length,
          kidSha256: crypto.createHash('sha256').update(kid).digest('hex').slice(0, 12),
        },
  );
}

/**
 * `bad_aud`, naming what the token sent (`audCount`, the first five values as `aud1`...`aud5`,
 * 200 characters each; a value that is not a string as `(not a string)`) and, when the verifier
 * knows it, the exact URL it expected (`expectedAud`).
 */
export function badAudience(aud: unknown, expected?: string, message?: string): AuthError {
  const list: unknown[] = Array.isArray(aud) ? aud : [aud];
  const facts: Record<string, string | number> = { audCount: list.length };
  list.slice(0, MAX_DETAIL_AUDIENCES).forEach((value, i) => {
    facts[`aud${String(i + 1)}`] =
      typeof value === 'string' ? detailValue(value) : '(not a string)';
  });
  if (expected !== undefined) {
    facts.expectedAud = detailValue(expected);
  }
  return new AuthError('bad_aud', message, undefined, facts);
}

/**
 * Copies the requested `alg` allowlist (default {@link DEFAULT_ALGORITHMS}).
 * @throws Error (at verifier creation) if it is empty or holds anything but
 *   {@link ASYMMETRIC_ALGORITHMS}; the message starts with `label`.
 */
export function resolveAlgorithms(
  requested: readonly string[] | undefined,
  label: string,
): string[] {
  const algorithms = [...(requested ?? DEFAULT_ALGORITHMS)];
  if (algorithms.length === 0 || algorithms.some((a) => !ASYMMETRIC_ALGORITHMS.includes(a))) {
    throw new Error(
      `${label}: algorithms must be asymmetric signature algorithms (${ASYMMETRIC_ALGORITHMS.join(', ')})`,
    );
  }
  return algorithms;
}

/**
 * Extracts the compact JWS from `Authorization: Bearer <jws>`: the scheme in any case
 * (`bearer`, `BEARER`), then exactly one space and one token (size-capped).
 * `allowEmptySignature` lets an unsigned (`alg: none`) token through to the header check, so
 * it is refused as `bad_alg` rather than `malformed`.
 * @throws AuthError `missing` (absent or empty header) or `malformed`.
 */
export function parseBearer(
  authorization: string | undefined,
  opts: { allowEmptySignature: boolean },
): string {
  if (authorization === undefined || authorization === '') {
    throw new AuthError('missing');
  }
  if (typeof authorization !== 'string' || authorization.length > MAX_TOKEN_LENGTH) {
    throw new AuthError('malformed');
  }
  const jwt = BEARER.exec(authorization)?.[1];
  if (jwt === undefined || (!opts.allowEmptySignature && jwt.endsWith('.'))) {
    throw new AuthError('malformed', 'expected "Bearer <compact JWS>"');
  }
  return jwt;
}

/**
 * Decodes the protected header and payload WITHOUT verifying anything: the result may only
 * choose the issuer, tenant and keys, never be trusted as claims.
 * @throws AuthError `malformed` if either part is not base64url JSON.
 */
export function decodeUnverified(jwt: string): { header: Claims; payload: Claims } {
  try {
    return { header: decodeProtectedHeader(jwt), payload: decodeJwt(jwt) };
  } catch {
    throw new AuthError('malformed');
  }
}

/** What a verifier accepts in the (unverified) protected header. */
export interface HeaderPolicy {
  /** The `alg` allowlist (from {@link resolveAlgorithms}). */
  algorithms: readonly string[];
  /** Whether the `typ` value (`undefined` when absent) is acceptable. */
  isTypAllowed: (typ: unknown) => boolean;
  /** Refuse `jku`, `x5u` and `jwk` outright: keys come from the issuer registration only. */
  refuseKeyLocators: boolean;
}

/**
 * Checks the unverified header, in this order: `alg`, `typ`, no `crit`/`b64`, key locators
 * (when refused), `kid` present.
 * @returns the `kid`.
 * @throws AuthError `bad_alg`, `bad_typ`, `malformed`, `bad_jku` or `missing_kid`.
 */
export function checkHeader(header: Claims, policy: HeaderPolicy): string {
  if (typeof header.alg !== 'string' || !policy.algorithms.includes(header.alg)) {
    throw new AuthError('bad_alg');
  }
  if (!policy.isTypAllowed(header.typ)) {
    throw new AuthError('bad_typ');
  }
  if (header.crit !== undefined || header.b64 !== undefined) {
    throw new AuthError('malformed', 'crit/b64 extensions are not supported');
  }
  if (
    policy.refuseKeyLocators &&
    (header.jku !== undefined || header.x5u !== undefined || header.jwk !== undefined)
  ) {
    throw new AuthError('bad_jku', 'id_token keys come from the issuer registration only');
  }
  const kid = header.kid;
  if (typeof kid !== 'string' || kid.length === 0) {
    throw new AuthError('missing_kid', 'kid is required');
  }
  return kid;
}

/**
 * The unverified `iss`, which only selects the issuer registration.
 * @throws AuthError `missing_claim` (`iss`).
 */
export function unverifiedIssuer(payload: Claims): string {
  const iss = payload.iss;
  if (typeof iss !== 'string' || iss.length === 0) {
    throw missingClaim('iss');
  }
  return iss;
}

/**
 * After the issuer lookup: the tenant `choose` picks among the issuer's `candidates` (from the
 * token's claims), which must be active, and its registration of `iss`. Sets `info.tenant`
 * once the tenant is known (a later refusal is then reported for it).
 * @throws AuthError `unknown_issuer`, `suspended`, or what `choose` throws.
 */
export function registrationOf(
  candidates: readonly Tenant[],
  iss: string,
  choose: (candidates: readonly Tenant[]) => Tenant,
  info?: FailureInfo,
): { tenant: Tenant; registration: TrustedIssuer } {
  if (candidates.length === 0) {
    throw new AuthError('unknown_issuer');
  }
  const tenant = choose(candidates);
  if (info) {
    info.tenant = tenant.id;
  }
  if (tenant.status !== 'active') {
    throw new AuthError('suspended');
  }
  const registration = tenant.issuers.find((i) => i.iss === iss);
  if (!registration) {
    throw new AuthError('unknown_issuer');
  }
  return { tenant, registration };
}

/** Caps an untrusted value before it goes to `onFailure` (and from there to logs). */
export function truncateInfo(value: string): string {
  return capped(value, MAX_INFO_LENGTH);
}

/**
 * Builds a key store from a JWK Set, keeping only public EC/RSA keys with a `kid` that Node's
 * crypto accepts: a set that (wrongly) publishes private or symmetric keys never makes them
 * usable for verification, and an unusable key is simply absent (a token naming it fails as
 * unknown_kid).
 */
export function toKeyStore(jwks: Jwks): Promise<KeyStore> {
  const usable: JWK[] = [];
  for (const key of jwks.keys) {
    if ((key.kty !== 'EC' && key.kty !== 'RSA') || typeof key.kid !== 'string') {
      continue;
    }
    if (PRIVATE_JWK_MEMBERS.some((m) => Object.hasOwn(key, m))) {
      continue;
    }
    try {
      crypto.createPublicKey({ key, format: 'jwk' });
      usable.push(key);
    } catch {
      // An unusable key is simply not there; a token naming it fails as unknown_kid.
    }
  }
  return Promise.resolve({
    kids: new Set(usable.map((k) => k.kid ?? '')),
    select: createLocalJWKSet({ keys: usable }),
  });
}

function hasKid(store: KeyStore, kid: string): boolean {
  return store.kids.has(kid);
}

/** `keysFor(..., { cachedOnly: true })` would have had to fetch: not a verdict on the token. */
export class KeysNotCachedError extends Error {
  constructor() {
    super('key set not cached');
    this.name = new.target.name;
  }
}

/** The key stores of issuer registrations, cached; see {@link createIssuerKeys}. */
export interface IssuerKeys {
  /**
   * The key store to verify a token of `registration` whose header names `kid`: the header's
   * `jku` only when the registration allowlists it, else the inline `jwks`, else `jwksUri`.
   * An unknown `kid` on a URL-backed set triggers one forced refetch (the fetcher's cooldown
   * bounds how often); an inline set is never refetched.
   * `cachedOnly` (the check ahead of the issuer lookup, on a registration that may just have
   * been replaced): no request at all; a URL-backed set the fetcher does not hold fresh, or one
   * without `kid` (which would refetch), throws KeysNotCachedError instead.
   * @throws AuthError `bad_jku`, `jwks_unavailable` or `unknown_kid`.
   */
  keysFor(
    registration: TrustedIssuer,
    header: Claims,
    kid: string,
    opts?: { cachedOnly?: boolean },
  ): Promise<KeyStore>;
  /** Counters for tests: inline key stores built so far, and kept now. */
  stats(): { inlineBuilt: number; inlineKept: number };
}

/**
 * Creates one verifier's key-store cache: inline sets keyed by their JSON (least recently used
 * dropped beyond `maxInlineStores`, default 10,000), fetched sets by object identity (so they
 * follow the fetcher's own cache).
 */
export function createIssuerKeys(opts: {
  fetcher: JwksFetcher;
  maxInlineStores?: number;
}): IssuerKeys {
  const { fetcher } = opts;
  const inlineStores = new LruCache<Promise<KeyStore>>(
    opts.maxInlineStores ?? MAX_INLINE_KEYSTORES,
  );
  const fetchedStores = new WeakMap<Jwks, Promise<KeyStore>>();
  let inlineBuilt = 0;

  function inlineStore(jwks: Jwks): Promise<KeyStore> {
    const key = JSON.stringify(jwks);
    let store = inlineStores.get(key);
    if (!store) {
      store = toKeyStore(jwks);
      inlineBuilt++;
      inlineStores.set(key, store);
    }
    return store;
  }

  async function fetchStore(url: string, forceRefresh: boolean): Promise<KeyStore> {
    let jwks: Jwks;
    try {
      jwks = await fetcher.get(url, { forceRefresh });
    } catch (err) {
      // The fetcher's own fixed text (`jwks: timeout`, `jwks: HTTP 503`...), never a response
      // body; and the URL, one the operator registered (or allowlisted as a `jku`).
      throw new AuthError('jwks_unavailable', undefined, undefined, {
        jwksError: detailValue(err instanceof JwksFetchError ? err.message : 'fetch failed'),
        jwksUrl: detailValue(url),
      });
    }
    return storeOf(jwks);
  }

  function storeOf(jwks: Jwks): Promise<KeyStore> {
    let store = fetchedStores.get(jwks);
    if (!store) {
      store = toKeyStore(jwks);
      fetchedStores.set(jwks, store);
    }
    return store;
  }

  return {
    stats() {
      return { inlineBuilt, inlineKept: inlineStores.size };
    },
    async keysFor(registration, header, kid, keysOpts = {}) {
      let url: string | undefined;
      if (header.jku !== undefined) {
        // Allowlisted: a registered `jku`, or the issuer's own registered `jwksUri` (clients that
        // always name their key set send it). Anything else is refused, never fetched.
        if (
          typeof header.jku !== 'string' ||
          !((registration.jku ?? []).includes(header.jku) || header.jku === registration.jwksUri)
        ) {
          throw new AuthError('bad_jku');
        }
        url = header.jku;
      } else if (registration.jwks) {
        const store = await inlineStore(registration.jwks);
        if (!hasKid(store, kid)) {
          throw unknownKid(kid);
        }
        return store;
      } else {
        url = registration.jwksUri;
      }
      if (url === undefined) {
        throw new AuthError('jwks_unavailable', undefined, undefined, {
          jwksError: 'the issuer registration names no key set',
        });
      }
      if (keysOpts.cachedOnly === true) {
        const cached = fetcher.peek(url);
        const store = cached === undefined ? undefined : await storeOf(cached);
        if (!store || !hasKid(store, kid)) {
          throw new KeysNotCachedError();
        }
        return store;
      }
      let store = await fetchStore(url, false);
      if (!hasKid(store, kid)) {
        // Key rotation: refetch once; the fetcher's cooldown bounds how often this can happen.
        store = await fetchStore(url, true);
        if (!hasKid(store, kid)) {
          throw unknownKid(kid);
        }
      }
      return store;
    },
  };
}

/**
 * Verifies the JWS with jose against `keystore` and the `alg` allowlist (the signature check
 * runs in Node's WebCrypto, off the event loop), requires the header's `kid` to be the key
 * that verified it, and parses the VERIFIED payload.
 * @returns the verified claims (a JSON object).
 * @throws AuthError `bad_signature` or `malformed` (payload not a JSON object).
 */
export async function verifySignature(
  jwt: string,
  keystore: KeyStore,
  opts: { algorithms: readonly string[]; kid: string },
): Promise<Claims> {
  let payload: Uint8Array;
  try {
    const verified = await compactVerify(jwt, keystore.select, {
      algorithms: [...opts.algorithms],
    });
    if (verified.protectedHeader.kid !== opts.kid) {
      throw new AuthError('bad_signature', 'verified with an unexpected key');
    }
    payload = verified.payload;
  } catch (err) {
    if (err instanceof AuthError) {
      throw err;
    }
    throw new AuthError('bad_signature');
  }
  try {
    const parsed: unknown = JSON.parse(Buffer.from(payload).toString('utf8'));
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new Error('not an object');
    }
    return parsed as Claims;
  } catch {
    throw new AuthError('malformed', 'payload is not a JSON object');
  }
}

/**
 * The `aud` claim as a non-empty list of strings (a single string counts as a list of one).
 * `expected`: the audience the verifier wants, named in a `bad_aud` refusal's audit detail.
 * @throws AuthError `missing_claim` (`aud`) or `bad_aud`.
 */
export function audienceList(claims: Claims, expected?: string): string[] {
  const aud = claims.aud;
  if (aud === undefined) {
    throw missingClaim('aud');
  }
  const list: unknown[] = Array.isArray(aud) ? aud : [aud];
  if (list.length === 0 || list.some((a) => typeof a !== 'string')) {
    throw badAudience(aud, expected);
  }
  return list as string[];
}

/** A NumericDate claim (seconds since the epoch) as a finite number, or why it is not one. */
export function numericDate(claims: Claims, name: string): number | 'missing' | 'malformed' {
  const value = claims[name];
  if (value === undefined) {
    return 'missing';
  }
  return typeof value === 'number' && Number.isFinite(value) ? value : 'malformed';
}

/**
 * Checks `exp` and `iat` (both required) and `nbf` (optional) against `now` with `leeway`
 * seconds of skew, and `exp - iat` against `maxLifetime` seconds.
 * @returns `exp`.
 * @throws AuthError `missing_claim`, `malformed`, `expired`, `future_iat`, `lifetime` or
 *   `not_yet_valid`.
 */
export function checkTimes(
  claims: Claims,
  opts: { now: Date; leeway: number; maxLifetime: number },
): number {
  const { leeway, maxLifetime } = opts;
  const at = Math.floor(opts.now.getTime() / 1000);
  const exp = numericDate(claims, 'exp');
  const iat = numericDate(claims, 'iat');
  if (exp === 'missing' || iat === 'missing') {
    throw missingClaim(exp === 'missing' ? 'exp' : 'iat');
  }
  if (exp === 'malformed' || iat === 'malformed') {
    throw new AuthError('malformed', 'exp/iat must be numbers');
  }
  if (exp <= at - leeway) {
    throw new AuthError('expired');
  }
  if (iat > at + leeway) {
    throw new AuthError('future_iat');
  }
  if (exp - iat > maxLifetime) {
    throw new AuthError('lifetime');
  }
  const nbf = numericDate(claims, 'nbf');
  if (nbf === 'malformed') {
    throw new AuthError('malformed', 'nbf must be a number');
  }
  if (nbf !== 'missing' && nbf > at + leeway) {
    throw new AuthError('not_yet_valid');
  }
  return exp;
}

/**
 * Runs one verification and, when it throws AuthError, calls `onFailure` once with the
 * reason and whatever `run` recorded in `info`; the error is rethrown unchanged (a throwing
 * `onFailure` is ignored, so reporting never turns a refusal into something else).
 */
export async function reportFailures<T>(
  run: (info: FailureInfo) => Promise<T>,
  onFailure: ((reason: AuthFailureReason, info: FailureInfo) => void) | undefined,
): Promise<T> {
  const info: FailureInfo = {};
  try {
    return await run(info);
  } catch (err) {
    if (err instanceof AuthError) {
      try {
        onFailure?.(err.reason, info);
      } catch {
        // Reporting must never turn a refusal into something else.
      }
    }
    throw err;
  }
}
