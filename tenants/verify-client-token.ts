/**
 * CDS client token verification (CDS Hooks 2.0 §"Trusting CDS Clients", issue 2 item 7).
 * The one place where an EHR's JWT becomes a tenant. Order of checks:
 *
 *  1. `Authorization: Bearer <compact JWS>` exactly; size-capped.
 *  2. Unverified header and payload (jose decode) are read only to choose keys:
 *     `alg` on the asymmetric allowlist, `typ` JWT, `kid` present, no `crit`;
 *     `iss` registered; `tenant` claim one of that issuer's tenants (absent only if the issuer
 *     serves exactly one); the tenant active.
 *  3. Keys: the issuer registration's inline `jwks` or `jwksUri`, or the `jku` header only when
 *     that issuer allowlists it (otherwise refused before any fetch). An unknown `kid` on a
 *     URL-backed set triggers one refetch, rate-limited by the fetcher's cooldown.
 *  4. Signature: node-jose `JWS.createVerify(keystore, { algorithms })`.
 *  5. Claims, from the VERIFIED payload: `aud` (exact), `exp`, `iat`, `nbf`, lifetime, `jti`.
 *  6. Replay: `(iss, jti)` remembered until `exp + leeway`; a repeat is refused.
 *
 * Any failure throws AuthError(reason) and calls `onFailure`; no replay-cache entry is
 * consumed by a token that fails before step 6. Messages never contain the token.
 */
import { decodeJwt, decodeProtectedHeader } from 'jose';
import nodeJose from 'node-jose';
import { AuthError } from './errors.ts';
import { createJwksFetcher } from './jwks-fetcher.ts';
import { createMemoryReplayCache } from './replay-cache.ts';
import { TENANT_ID_PATTERN } from './tenant-validation.ts';
import type {
  AuthFailureReason,
  ClientIdentity,
  ControlPlane,
  Jwks,
  JwksFetcher,
  ReplayCache,
  Tenant,
  TokenVerifier,
  TrustedIssuer,
} from './types.ts';

/** Algorithms the verifier can ever be configured with: asymmetric signatures only. */
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

export const DEFAULT_ALGORITHMS: readonly string[] = ['ES384', 'RS384', 'ES256', 'RS256'];

export interface TokenVerifierOptions {
  controlPlane: ControlPlane;
  /** Allowed `alg` values (default ES384, RS384, ES256, RS256); `none` and HMAC are refused. */
  algorithms?: string[];
  /** Largest `exp - iat` accepted (default 3600 s). */
  maxLifetimeSeconds?: number;
  /** Clock skew tolerated on `exp`, `iat` and `nbf` (default 60 s). */
  leewaySeconds?: number;
  /** Default: an in-memory cache (one process). */
  replayCache?: ReplayCache;
  /** Default: `createJwksFetcher()`. */
  jwks?: JwksFetcher;
  now?: () => Date;
  /** Called once for every refused token (the server audits it). Never receives the token. */
  onFailure?: (reason: AuthFailureReason, info: { iss?: string; tenant?: string }) => void;
}

/** Longest Authorization header value considered (a CDS client JWT is well under 2 KiB). */
const MAX_TOKEN_LENGTH = 16 * 1024;
const MAX_JTI_LENGTH = 256;
const MAX_INFO_LENGTH = 256;
const BEARER = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)$/;
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];
const MAX_KEYSTORE_CACHE = 1000;

type KeyStore = nodeJose.JWK.KeyStore;
type Claims = Record<string, unknown>;

/**
 * Builds a node-jose key store from a JWK Set, keeping only public EC/RSA keys: a set that
 * (wrongly) publishes private or symmetric keys never makes them usable for verification.
 */
async function toKeyStore(jwks: Jwks): Promise<KeyStore> {
  const store = nodeJose.JWK.createKeyStore();
  for (const key of jwks.keys) {
    if ((key.kty !== 'EC' && key.kty !== 'RSA') || typeof key.kid !== 'string') {
      continue;
    }
    if (PRIVATE_JWK_MEMBERS.some((m) => Object.hasOwn(key, m))) {
      continue;
    }
    try {
      await store.add(key);
    } catch {
      // An unusable key is simply not there; a token naming it fails as unknown_kid.
    }
  }
  return store;
}

function hasKid(store: KeyStore, kid: string): boolean {
  return store.all({ kid }).length > 0;
}

/** Seconds since the epoch, as a finite number, or a failure reason. */
function numericDate(claims: Claims, name: string): number | 'missing' | 'malformed' {
  const value = claims[name];
  if (value === undefined) {
    return 'missing';
  }
  return typeof value === 'number' && Number.isFinite(value) ? value : 'malformed';
}

function truncate(value: string): string {
  return value.length > MAX_INFO_LENGTH ? value.slice(0, MAX_INFO_LENGTH) : value;
}

/**
 * Creates the CDS client token verifier.
 * @throws Error at creation if `algorithms` contains anything but asymmetric signature algorithms.
 * `verify` throws AuthError (HTTP 401 `invalid_token`) with a reason on any failure; other
 * errors (a control-plane database failure) propagate unchanged.
 */
export function createTokenVerifier(opts: TokenVerifierOptions): TokenVerifier {
  const algorithms = [...(opts.algorithms ?? DEFAULT_ALGORITHMS)];
  if (algorithms.length === 0 || algorithms.some((a) => !ASYMMETRIC_ALGORITHMS.includes(a))) {
    throw new Error(
      `token verifier: algorithms must be asymmetric signature algorithms (${ASYMMETRIC_ALGORITHMS.join(', ')})`,
    );
  }
  const maxLifetime = opts.maxLifetimeSeconds ?? 3600;
  const leeway = opts.leewaySeconds ?? 60;
  if (!(maxLifetime > 0) || !(leeway >= 0)) {
    throw new Error('token verifier: maxLifetimeSeconds must be > 0 and leewaySeconds >= 0');
  }
  const now = opts.now ?? (() => new Date());
  const replayCache = opts.replayCache ?? createMemoryReplayCache({ now });
  const fetcher = opts.jwks ?? createJwksFetcher({ now });
  const { controlPlane } = opts;

  /** Inline sets, keyed by their JSON; fetched sets, by object identity (the fetcher's cache). */
  const inlineStores = new Map<string, Promise<KeyStore>>();
  const fetchedStores = new WeakMap<Jwks, Promise<KeyStore>>();

  function inlineStore(jwks: Jwks): Promise<KeyStore> {
    const key = JSON.stringify(jwks);
    let store = inlineStores.get(key);
    if (!store) {
      if (inlineStores.size >= MAX_KEYSTORE_CACHE) {
        inlineStores.clear();
      }
      store = toKeyStore(jwks);
      inlineStores.set(key, store);
    }
    return store;
  }

  function fetchedStore(jwks: Jwks): Promise<KeyStore> {
    let store = fetchedStores.get(jwks);
    if (!store) {
      store = toKeyStore(jwks);
      fetchedStores.set(jwks, store);
    }
    return store;
  }

  async function fetchStore(url: string, forceRefresh: boolean): Promise<KeyStore> {
    let jwks: Jwks;
    try {
      jwks = await fetcher.get(url, { forceRefresh });
    } catch {
      throw new AuthError('jwks_unavailable');
    }
    return fetchedStore(jwks);
  }

  /** The issuer registration's keys (or its allowlisted jku), with the unknown-kid refetch. */
  async function keysFor(
    registration: TrustedIssuer,
    header: Claims,
    kid: string,
  ): Promise<KeyStore> {
    let url: string | undefined;
    if (header.jku !== undefined) {
      if (typeof header.jku !== 'string' || !(registration.jku ?? []).includes(header.jku)) {
        throw new AuthError('bad_jku');
      }
      url = header.jku;
    } else if (registration.jwks) {
      const store = await inlineStore(registration.jwks);
      if (!hasKid(store, kid)) {
        throw new AuthError('unknown_kid');
      }
      return store;
    } else {
      url = registration.jwksUri;
    }
    if (url === undefined) {
      throw new AuthError('jwks_unavailable');
    }
    let store = await fetchStore(url, false);
    if (!hasKid(store, kid)) {
      // Key rotation: refetch once; the fetcher's cooldown bounds how often this can happen.
      store = await fetchStore(url, true);
      if (!hasKid(store, kid)) {
        throw new AuthError('unknown_kid');
      }
    }
    return store;
  }

  function resolveTenant(tenants: Tenant[], claim: unknown): Tenant {
    if (claim === undefined) {
      const [only] = tenants;
      if (tenants.length === 1 && only) {
        return only;
      }
      throw new AuthError('bad_tenant', 'tenant claim required: the issuer serves several tenants');
    }
    const match = typeof claim === 'string' ? tenants.find((t) => t.id === claim) : undefined;
    if (!match) {
      throw new AuthError('bad_tenant');
    }
    return match;
  }

  function checkAudience(claims: Claims, audience: string): void {
    const aud = claims.aud;
    if (aud === undefined) {
      throw new AuthError('missing_claim', 'aud');
    }
    const list: unknown[] = Array.isArray(aud) ? aud : [aud];
    if (list.length === 0 || list.some((a) => typeof a !== 'string')) {
      throw new AuthError('bad_aud');
    }
    // Exact comparison: no case folding, no trailing-slash leniency (CDS Hooks 2.0 §8.2).
    if (!list.includes(audience)) {
      throw new AuthError('bad_aud');
    }
  }

  function checkTimes(claims: Claims): number {
    const at = Math.floor(now().getTime() / 1000);
    const exp = numericDate(claims, 'exp');
    const iat = numericDate(claims, 'iat');
    if (exp === 'missing' || iat === 'missing') {
      throw new AuthError('missing_claim', exp === 'missing' ? 'exp' : 'iat');
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

  async function run(
    authorization: string | undefined,
    audience: string,
    info: { iss?: string; tenant?: string },
  ): Promise<ClientIdentity> {
    if (authorization === undefined || authorization === '') {
      throw new AuthError('missing');
    }
    if (typeof authorization !== 'string' || authorization.length > MAX_TOKEN_LENGTH) {
      throw new AuthError('malformed');
    }
    const match = BEARER.exec(authorization);
    const jwt = match?.[1];
    if (jwt === undefined) {
      throw new AuthError('malformed', 'expected "Bearer <compact JWS>"');
    }

    // Unverified: used only to choose the issuer's keys and the tenant.
    let header: Claims;
    let unverified: Claims;
    try {
      header = decodeProtectedHeader(jwt);
      unverified = decodeJwt(jwt);
    } catch {
      throw new AuthError('malformed');
    }
    if (typeof header.alg !== 'string' || !algorithms.includes(header.alg)) {
      throw new AuthError('bad_alg');
    }
    if (header.typ !== 'JWT') {
      throw new AuthError('bad_typ');
    }
    if (header.crit !== undefined || header.b64 !== undefined) {
      throw new AuthError('malformed', 'crit/b64 extensions are not supported');
    }
    const kid = header.kid;
    if (typeof kid !== 'string' || kid.length === 0) {
      throw new AuthError('unknown_kid', 'kid is required');
    }
    const iss = unverified.iss;
    if (typeof iss !== 'string' || iss.length === 0) {
      throw new AuthError('missing_claim', 'iss');
    }
    info.iss = truncate(iss);
    if (typeof unverified.tenant === 'string' && TENANT_ID_PATTERN.test(unverified.tenant)) {
      info.tenant = unverified.tenant;
    }
    const candidates = await controlPlane.tenants.findByIssuer(iss);
    if (candidates.length === 0) {
      throw new AuthError('unknown_issuer');
    }
    const tenant = resolveTenant(candidates, unverified.tenant);
    info.tenant = tenant.id;
    if (tenant.status !== 'active') {
      throw new AuthError('suspended');
    }
    const registration = tenant.issuers.find((i) => i.iss === iss);
    if (!registration) {
      throw new AuthError('unknown_issuer');
    }

    const keystore = await keysFor(registration, header, kid);
    let verified: nodeJose.JWS.VerificationResult;
    try {
      verified = await nodeJose.JWS.createVerify(keystore, { algorithms }).verify(jwt);
    } catch {
      throw new AuthError('bad_signature');
    }
    if (verified.key.kid !== kid) {
      throw new AuthError('bad_signature', 'verified with an unexpected key');
    }

    // From here on, only the verified payload is trusted.
    let claims: Claims;
    try {
      const parsed: unknown = JSON.parse(verified.payload.toString('utf8'));
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new Error('not an object');
      }
      claims = parsed as Claims;
    } catch {
      throw new AuthError('malformed', 'payload is not a JSON object');
    }
    if (claims.iss !== iss || claims.tenant !== unverified.tenant) {
      throw new AuthError('bad_signature', 'verified claims differ from the decoded ones');
    }
    checkAudience(claims, audience);
    const exp = checkTimes(claims);
    const jti = claims.jti;
    if (jti === undefined) {
      throw new AuthError('missing_claim', 'jti');
    }
    if (typeof jti !== 'string' || jti.length === 0 || jti.length > MAX_JTI_LENGTH) {
      throw new AuthError('malformed', 'jti must be a short non-empty string');
    }

    // Remember until exp + leeway: the token is accepted that long, so it must stay unreplayable.
    let isFirstUse: boolean;
    try {
      isFirstUse = await replayCache.remember(iss, jti, exp + leeway);
    } catch {
      throw new AuthError('replay_unavailable');
    }
    if (!isFirstUse) {
      throw new AuthError('replayed');
    }
    return { tenant, iss, jti, exp, kid };
  }

  return {
    async verify(authorization, audience) {
      const info: { iss?: string; tenant?: string } = {};
      try {
        return await run(authorization, audience, info);
      } catch (err) {
        if (err instanceof AuthError) {
          try {
            opts.onFailure?.(err.reason, info);
          } catch {
            // Reporting must never turn a refusal into something else.
          }
        }
        throw err;
      }
    },
  };
}
