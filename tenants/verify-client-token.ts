/**
 * CDS client token verification (CDS Hooks 2.0 §"Trusting CDS Clients", issue 2 item 7).
 * The one place where an EHR's JWT becomes a tenant. Order of checks:
 *
 *  1. `Authorization: Bearer <compact JWS>` (the scheme in any case, RFC 7235), one space, one
 *     token; size-capped.
 *  2. Unverified header and payload (jose decode) are read only to choose keys:
 *     `alg` on the asymmetric allowlist, `typ` JWT, `kid` present, no `crit`;
 *     `iss` registered; `tenant` claim one of that issuer's tenants (absent only if the issuer
 *     serves exactly one); the tenant active.
 *  3. Keys: the issuer registration's inline `jwks` or `jwksUri`, or the `jku` header only when
 *     that issuer allowlists it (otherwise refused before any fetch). An unknown `kid` on a
 *     URL-backed set triggers one refetch, rate-limited by the fetcher's cooldown.
 *  4. Signature: jose's `compactVerify` against the key store and the `alg` allowlist. It runs
 *     alongside step 2's lookup when that lookup is answered from memory (see checkAhead); its
 *     result counts only if the lookup then returns the very same registration.
 *  5. Claims, from the VERIFIED payload: `aud` (exact), `exp`, `iat`, `nbf`, lifetime, `jti`.
 *  6. Replay: `(tenant, iss, jti)` remembered until `ceil(exp + 2 x leeway)` (one leeway for
 *     `exp`, one for the cache's clock, e.g. Redis's, against ours); a repeat is refused, and
 *     so is a token whose `(tenant, iss)` already holds its share of the replay cache
 *     (`replay_quota`). Keyed by the verified tenant: tenants whose EHRs use the same issuer
 *     neither spend each other's jtis nor each other's share.
 *
 * Any failure throws AuthError(reason) (with `facts` where the audit names more: the missing
 * claim, the kid, the aud sent and expected, why the key set could not be fetched)
 * and calls `onFailure`; no replay-cache entry is consumed by a token that fails before
 * step 6. Messages never contain the token. The JWT
 * mechanics shared with the id_token verifier (bearer parsing, key stores, signature, times)
 * live in `jwt-common.ts`; this file keeps the CDS client policy.
 */
import {
  AuthError,
  ReplayBackendError,
  ReplayCacheFullError,
  ReplayIssuerQuotaError,
} from './errors.ts';
import { createJwksFetcher } from './jwks-fetcher.ts';
import {
  audienceList,
  badAudience,
  checkHeader,
  checkTimes,
  createIssuerKeys,
  KeysNotCachedError,
  decodeUnverified,
  missingClaim,
  parseBearer,
  registrationOf,
  reportFailures,
  resolveAlgorithms,
  truncateInfo,
  unverifiedIssuer,
  verifySignature,
} from './jwt-common.ts';
import type { Claims, FailureInfo } from './jwt-common.ts';
import {
  RedisClockSkewError,
  RedisHistoryLostError,
  RedisUnsupportedError,
  RedisVersionError,
} from './redis-replay-cache.ts';
import { createMemoryReplayCache } from './replay-cache.ts';
import { TENANT_ID_PATTERN } from './tenant-validation.ts';
import type {
  AuthFailureReason,
  ClientIdentity,
  ControlPlane,
  JwksFetcher,
  ReplayCache,
  Tenant,
  TokenVerifier,
  TrustedIssuer,
} from './types.ts';

export { ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS } from './jwt-common.ts';

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

const MAX_JTI_LENGTH = 256;

/**
 * Creates the CDS client token verifier.
 * @throws Error at creation if `algorithms` contains anything but asymmetric signature algorithms.
 * `verify` throws AuthError (HTTP 401 `invalid_token`) with a reason on any failure; other
 * errors (a control-plane database failure) propagate unchanged.
 */
export function createTokenVerifier(opts: TokenVerifierOptions): TokenVerifier {
  const algorithms = resolveAlgorithms(opts.algorithms, 'token verifier');
  const maxLifetime = opts.maxLifetimeSeconds ?? 3600;
  const leeway = opts.leewaySeconds ?? 60;
  if (!(maxLifetime > 0) || !(leeway >= 0)) {
    throw new Error('token verifier: maxLifetimeSeconds must be > 0 and leewaySeconds >= 0');
  }
  const now = opts.now ?? (() => new Date());
  const replayCache = opts.replayCache ?? createMemoryReplayCache({ now });
  const issuerKeys = createIssuerKeys({ fetcher: opts.jwks ?? createJwksFetcher({ now }) });
  const { controlPlane } = opts;

  function resolveTenant(tenants: readonly Tenant[], claim: unknown): Tenant {
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
    // Exact comparison: no case folding, no trailing-slash leniency (CDS Hooks 2.0 §8.2).
    if (!audienceList(claims, audience).includes(audience)) {
      throw badAudience(claims.aud, audience);
    }
  }

  /**
   * Keys of `registration` (which may fetch, unless `cachedOnly`), then the signature against
   * them.
   */
  async function signatureOf(
    jwt: string,
    header: Claims,
    kid: string,
    registration: TrustedIssuer,
    cachedOnly = false,
  ): Promise<Claims> {
    const keystore = await issuerKeys.keysFor(registration, header, kid, { cachedOnly });
    return verifySignature(jwt, keystore, { algorithms, kid });
  }

  /**
   * Starts the signature check ahead of the tenant lookup, against the registration the last
   * lookup of `iss` returned, when one is remembered and would pass step 2 (tenant resolved,
   * active). The lookup reads the control plane's data_version first (a thread-pool trip that
   * waited ~4 ms under load, about as long as the signature check), so the two overlap. The
   * result is used only when the lookup returns the very same registration object, i.e. the
   * control plane did not change meanwhile: the check then ran on exactly the inputs it would
   * run on now. Otherwise it is dropped (a failure too) and the check runs again. It makes no
   * request: the remembered registration may just have been replaced (a key set URL or `jku`
   * the tenant no longer trusts), so it uses only key sets already cached, and a set that is
   * not (or an unknown `kid`, KeysNotCachedError) leaves the check to the confirmed registration.
   */
  function checkAhead(
    iss: string,
    tenantClaim: unknown,
    check: (registration: TrustedIssuer) => Promise<Claims>,
  ): { registration: TrustedIssuer; claims: Promise<Claims> } | undefined {
    const known = controlPlane.tenants.peekIssuer?.(iss);
    if (!known) {
      return undefined;
    }
    let registration: TrustedIssuer;
    try {
      ({ registration } = registrationOf(known, iss, (c) => resolveTenant(c, tenantClaim)));
    } catch {
      return undefined; // the lookup will refuse it (or, if it changed, judge it anew)
    }
    const claims = check(registration);
    claims.catch(() => undefined); // dropped unless confirmed (then awaited, and thrown)
    return { registration, claims };
  }

  async function run(
    authorization: string | undefined,
    audience: string,
    info: FailureInfo,
  ): Promise<ClientIdentity> {
    // An unsigned token passes the shape check so that it is refused as bad_alg.
    const jwt = parseBearer(authorization, { allowEmptySignature: true });

    // Unverified: used only to choose the issuer's keys and the tenant.
    const { header, payload: unverified } = decodeUnverified(jwt);
    const kid = checkHeader(header, {
      algorithms,
      // CDS Hooks: `JWT`; RFC 7515 compares `typ` case-insensitively.
      isTypAllowed: (typ) => typeof typ === 'string' && typ.toUpperCase() === 'JWT',
      refuseKeyLocators: false,
    });
    const iss = unverifiedIssuer(unverified);
    info.iss = truncateInfo(iss);
    if (typeof unverified.tenant === 'string' && TENANT_ID_PATTERN.test(unverified.tenant)) {
      info.tenant = unverified.tenant;
    }
    const lookup = controlPlane.tenants.findByIssuer(iss);
    const ahead = checkAhead(iss, unverified.tenant, (registration) =>
      signatureOf(jwt, header, kid, registration, true),
    );
    const { tenant, registration } = registrationOf(
      await lookup,
      iss,
      (candidates) => resolveTenant(candidates, unverified.tenant),
      info,
    );

    // From here on, only the verified payload is trusted. A check ahead that would have had to
    // fetch is no verdict: the confirmed registration's check runs (and fetches) instead.
    const full = () => signatureOf(jwt, header, kid, registration);
    const claims = await (ahead?.registration === registration
      ? ahead.claims.catch((err: unknown) => {
          if (err instanceof KeysNotCachedError) {
            return full();
          }
          throw err;
        })
      : full());
    if (claims.iss !== iss || claims.tenant !== unverified.tenant) {
      throw new AuthError('bad_signature', 'verified claims differ from the decoded ones');
    }
    checkAudience(claims, audience);
    const exp = checkTimes(claims, { now: now(), leeway, maxLifetime });
    const jti = claims.jti;
    if (jti === undefined) {
      throw missingClaim('jti');
    }
    if (typeof jti !== 'string' || jti.length === 0 || jti.length > MAX_JTI_LENGTH) {
      throw new AuthError('malformed', 'jti must be a short non-empty string');
    }

    // Remember as long as the token is accepted, so it stays unreplayable: checkTimes compares
    // whole seconds (now rounded down), so a fractional exp (allowed by RFC 7519) is accepted
    // until ceil(exp + leeway), not exp + leeway; and one more leeway, as the cache's clock
    // (Redis's, on which its entries expire) may be up to a leeway ahead of ours (the Redis cache
    // refuses tokens beyond). The token's iat lets a cache that may have lost jtis (a Redis
    // restarted or evicting) refuse the tokens issued before.
    let isFirstUse: boolean;
    try {
      isFirstUse = await replayCache.remember(
        tenant.id,
        iss,
        jti,
        Math.ceil(exp + 2 * leeway),
        typeof claims.iat === 'number' ? claims.iat : undefined,
      );
    } catch (err) {
      // A tenant's issuer at its share is refused alone (audited and counted as replay_quota); a full
      // cache refuses everyone (replay_unavailable); so does a backend that does not answer or
      // may evict keys, with its own reason (answered 503: the token may be valid, retry).
      throw replayRefusal(err, tenant.id);
    }
    if (!isFirstUse) {
      throw new AuthError('replayed');
    }
    return { tenant, iss, jti, exp, kid };
  }

  return {
    verify(authorization, audience) {
      return reportFailures((info) => run(authorization, audience, info), opts.onFailure);
    },
  };
}

/** The AuthError of a token the replay cache could not remember (`err`: what it threw). */
function replayRefusal(err: unknown, tenant: string): AuthError {
  if (err instanceof ReplayIssuerQuotaError) {
    return new AuthError('replay_quota', err.message, tenant);
  }
  if (err instanceof ReplayCacheFullError) {
    return new AuthError('replay_unavailable');
  }
  if (err instanceof ReplayBackendError && err.state === 'evicting') {
    return new AuthError('replay_policy_evicts');
  }
  if (err instanceof RedisHistoryLostError) {
    // Answering, but it may have lost this token's jti (restarted, failed over, evicted).
    return new AuthError('replay_backend_reset', err.message);
  }
  if (err instanceof RedisClockSkewError) {
    return new AuthError('replay_clock_skew', err.message);
  }
  if (err instanceof RedisUnsupportedError || err instanceof RedisVersionError) {
    return new AuthError('replay_backend_unsupported', err.message);
  }
  if (err instanceof ReplayBackendError) {
    return new AuthError('replay_backend_down', err.message);
  }
  // Anything else a cache threw: its backend did not answer.
  return new AuthError('replay_backend_down');
}
