/**
 * OpenID Connect id_token verification for the SMART card viewer (issue 7). A clinician
 * launches the viewer from the EHR; the EHR's authorization server signs an id_token for the
 * viewer's client id. cellcds accepts that id_token as the viewer's credential only when:
 *
 *  1. `Authorization: Bearer <compact JWS>` exactly; size-capped.
 *  2. Unverified header (read only to pick keys): `alg` on the asymmetric allowlist, `typ`
 *     absent or `JWT` (so an `at+jwt` access token is refused), `kid` present, no `crit`, no
 *     `jku` (an id_token's keys come from the registration only).
 *  3. Unverified `iss` is a registered issuer; among its tenants, exactly one (after the
 *     optional `tenant` hint) allowlists the launch's FHIR server; that tenant is active.
 *  4. Signature checked with node-jose against that tenant's registration of `iss` (inline
 *     `jwks` or `jwksUri`, one refetch on an unknown `kid`).
 *  5. Verified claims: `iss` equal; `aud` names the viewer's client id (and `azp`, when
 *     present or when `aud` names several parties, is that client id); `exp`, `iat`, `nbf`
 *     with leeway; `exp - iat` at most the max lifetime; `sub` present.
 *
 * There is no replay cache: the id_token is the session credential of one launch and is
 * reused for the page's calls until it expires. Every refusal is AuthError(reason); the token
 * never appears in a message.
 */
import { decodeJwt, decodeProtectedHeader } from 'jose';
import nodeJose from 'node-jose';
import { AuthError } from './errors.ts';
import { createJwksFetcher } from './jwks-fetcher.ts';
import { ASYMMETRIC_ALGORITHMS, DEFAULT_ALGORITHMS } from './verify-client-token.ts';
import type {
  AuthFailureReason,
  ControlPlane,
  Jwks,
  JwksFetcher,
  Tenant,
  TrustedIssuer,
} from './types.ts';

/** Options of {@link createIdTokenVerifier}. */
export interface IdTokenVerifierOptions {
  controlPlane: ControlPlane;
  /** The viewer's OAuth client id(s) at the EHRs' authorization servers; `aud` must name one. */
  clientIds: readonly string[];
  /** Allowed `alg` values (default ES384, RS384, ES256, RS256); `none` and HMAC are refused. */
  algorithms?: string[];
  /** Largest `exp - iat` accepted (default 3600 s). */
  maxLifetimeSeconds?: number;
  /** Clock skew tolerated on `exp`, `iat` and `nbf` (default 60 s). */
  leewaySeconds?: number;
  /** Default: `createJwksFetcher()`. */
  jwks?: JwksFetcher;
  now?: () => Date;
  /** Called once for every refused token. Never receives the token. */
  onFailure?: (reason: AuthFailureReason, info: { iss?: string; tenant?: string }) => void;
}

/** What the caller states about the launch; used to choose the tenant, never trusted alone. */
export interface IdTokenContext {
  /** The FHIR server of the launch (SMART `iss` launch parameter). */
  fhirServer: string;
  /** Optional tenant id, needed only when several tenants share the issuer and FHIR server. */
  tenant?: string;
}

/** Who a verified id_token speaks for. */
export interface AppIdentity {
  tenant: Tenant;
  iss: string;
  sub: string;
  /** The `fhirUser` claim (a FHIR resource URL), when present. */
  fhirUser?: string;
  /** The client id `aud` named. */
  clientId: string;
  /** `exp` claim, seconds since the epoch. */
  exp: number;
}

/** Verifies SMART launch id_tokens: see `createIdTokenVerifier`. */
export interface IdTokenVerifier {
  verify(authorization: string | undefined, context: IdTokenContext): Promise<AppIdentity>;
}

const MAX_TOKEN_LENGTH = 16 * 1024;
const MAX_CLAIM_LENGTH = 2048;
const MAX_INFO_LENGTH = 256;
const BEARER = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$/;
const PRIVATE_JWK_MEMBERS = ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k', 'oth'];
const MAX_KEYSTORE_CACHE = 1000;

type KeyStore = nodeJose.JWK.KeyStore;
type Claims = Record<string, unknown>;

/** Public EC/RSA keys with a kid only (as the CDS client verifier does). */
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
      // An unusable key is simply absent; a token naming it fails as unknown_kid.
    }
  }
  return store;
}

/** Normal form of a FHIR base URL for comparison (scheme, host, port, path without trailing /). */
function normalizeBase(value: string): string | undefined {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return undefined;
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    return undefined;
  }
  if (url.username !== '' || url.password !== '' || url.search !== '' || url.hash !== '') {
    return undefined;
  }
  return `${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, '')}`;
}

function numericDate(claims: Claims, name: string): number | 'missing' | 'malformed' {
  const value = claims[name];
  if (value === undefined) {
    return 'missing';
  }
  return typeof value === 'number' && Number.isFinite(value) ? value : 'malformed';
}

function shortString(value: unknown): value is string {
  return typeof value === 'string' && value.length > 0 && value.length <= MAX_CLAIM_LENGTH;
}

/**
 * Creates the id_token verifier for SMART launches of the card viewer.
 * @throws Error at creation if `clientIds` is empty or `algorithms` holds a non-asymmetric one.
 * `verify` throws AuthError (HTTP 401 `invalid_token`) with a reason on any failure; other
 * errors (a control-plane database failure) propagate unchanged.
 */
export function createIdTokenVerifier(opts: IdTokenVerifierOptions): IdTokenVerifier {
  const algorithms = [...(opts.algorithms ?? DEFAULT_ALGORITHMS)];
  if (algorithms.length === 0 || algorithms.some((a) => !ASYMMETRIC_ALGORITHMS.includes(a))) {
    throw new Error('id_token verifier: algorithms must be asymmetric signature algorithms');
  }
  const clientIds = opts.clientIds.filter((c) => c.length > 0);
  if (clientIds.length === 0) {
    throw new Error('id_token verifier: at least one client id is required');
  }
  const maxLifetime = opts.maxLifetimeSeconds ?? 3600;
  const leeway = opts.leewaySeconds ?? 60;
  const now = opts.now ?? (() => new Date());
  const fetcher = opts.jwks ?? createJwksFetcher({ now });
  const { controlPlane } = opts;
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

  async function fetchStore(url: string, forceRefresh: boolean): Promise<KeyStore> {
    let jwks: Jwks;
    try {
      jwks = await fetcher.get(url, { forceRefresh });
    } catch {
      throw new AuthError('jwks_unavailable');
    }
    let store = fetchedStores.get(jwks);
    if (!store) {
      store = toKeyStore(jwks);
      fetchedStores.set(jwks, store);
    }
    return store;
  }

  async function keysFor(registration: TrustedIssuer, kid: string): Promise<KeyStore> {
    if (registration.jwks) {
      const store = await inlineStore(registration.jwks);
      if (store.all({ kid }).length === 0) {
        throw new AuthError('unknown_kid');
      }
      return store;
    }
    const url = registration.jwksUri;
    if (url === undefined) {
      throw new AuthError('jwks_unavailable');
    }
    let store = await fetchStore(url, false);
    if (store.all({ kid }).length === 0) {
      store = await fetchStore(url, true);
      if (store.all({ kid }).length === 0) {
        throw new AuthError('unknown_kid');
      }
    }
    return store;
  }

  /** The one tenant of this issuer that allowlists the launch's FHIR server. */
  function chooseTenant(candidates: Tenant[], context: IdTokenContext): Tenant {
    const base =
      typeof context.fhirServer === 'string' ? normalizeBase(context.fhirServer) : undefined;
    if (base === undefined) {
      throw new AuthError('bad_tenant', 'fhirServer is not an absolute http(s) base URL');
    }
    const named =
      context.tenant === undefined ? candidates : candidates.filter((t) => t.id === context.tenant);
    const allowing = named.filter((t) => t.fhirServers.some((s) => normalizeBase(s) === base));
    const [only] = allowing;
    if (allowing.length !== 1 || only === undefined) {
      throw new AuthError(
        'bad_tenant',
        allowing.length === 0
          ? 'no tenant of this issuer allowlists the FHIR server'
          : 'several tenants match: a tenant hint is required',
      );
    }
    return only;
  }

  function checkAudience(claims: Claims): string {
    const aud = claims.aud;
    if (aud === undefined) {
      throw new AuthError('missing_claim', 'aud');
    }
    const list: unknown[] = Array.isArray(aud) ? aud : [aud];
    if (list.length === 0 || list.some((a) => typeof a !== 'string')) {
      throw new AuthError('bad_aud');
    }
    const clientId = clientIds.find((c) => list.includes(c));
    if (clientId === undefined) {
      throw new AuthError('bad_aud');
    }
    // OIDC Core §3.1.3.7: with several audiences, azp must be present and be our client id.
    const azp = claims.azp;
    if ((list.length > 1 || azp !== undefined) && azp !== clientId) {
      throw new AuthError('bad_aud', 'azp is not the client id');
    }
    return clientId;
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
    context: IdTokenContext,
    info: { iss?: string; tenant?: string },
  ): Promise<AppIdentity> {
    if (authorization === undefined || authorization === '') {
      throw new AuthError('missing');
    }
    if (typeof authorization !== 'string' || authorization.length > MAX_TOKEN_LENGTH) {
      throw new AuthError('malformed');
    }
    const jwt = BEARER.exec(authorization)?.[1];
    if (jwt === undefined) {
      throw new AuthError('malformed', 'expected "Bearer <compact JWS>"');
    }
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
    if (
      header.typ !== undefined &&
      (typeof header.typ !== 'string' || header.typ.toUpperCase() !== 'JWT')
    ) {
      throw new AuthError('bad_typ');
    }
    if (header.crit !== undefined || header.b64 !== undefined) {
      throw new AuthError('malformed', 'crit/b64 extensions are not supported');
    }
    if (header.jku !== undefined || header.x5u !== undefined || header.jwk !== undefined) {
      throw new AuthError('bad_jku', 'id_token keys come from the issuer registration only');
    }
    const kid = header.kid;
    if (typeof kid !== 'string' || kid.length === 0) {
      throw new AuthError('unknown_kid', 'kid is required');
    }
    const iss = unverified.iss;
    if (typeof iss !== 'string' || iss.length === 0) {
      throw new AuthError('missing_claim', 'iss');
    }
    info.iss = iss.length > MAX_INFO_LENGTH ? iss.slice(0, MAX_INFO_LENGTH) : iss;
    const candidates = await controlPlane.tenants.findByIssuer(iss);
    if (candidates.length === 0) {
      throw new AuthError('unknown_issuer');
    }
    const tenant = chooseTenant(candidates, context);
    info.tenant = tenant.id;
    if (tenant.status !== 'active') {
      throw new AuthError('suspended');
    }
    const registration = tenant.issuers.find((i) => i.iss === iss);
    if (!registration) {
      throw new AuthError('unknown_issuer');
    }
    const keystore = await keysFor(registration, kid);
    let verified: nodeJose.JWS.VerificationResult;
    try {
      verified = await nodeJose.JWS.createVerify(keystore, { algorithms }).verify(jwt);
    } catch {
      throw new AuthError('bad_signature');
    }
    if (verified.key.kid !== kid) {
      throw new AuthError('bad_signature', 'verified with an unexpected key');
    }
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
    if (claims.iss !== iss) {
      throw new AuthError('bad_signature', 'verified claims differ from the decoded ones');
    }
    const clientId = checkAudience(claims);
    const exp = checkTimes(claims);
    if (!shortString(claims.sub)) {
      throw new AuthError('missing_claim', 'sub');
    }
    const fhirUser = claims.fhirUser;
    if (fhirUser !== undefined && !shortString(fhirUser)) {
      throw new AuthError('malformed', 'fhirUser must be a short string');
    }
    return {
      tenant,
      iss,
      sub: claims.sub,
      ...(fhirUser === undefined ? {} : { fhirUser }),
      clientId,
      exp,
    };
  }

  return {
    async verify(authorization, context) {
      const info: { iss?: string; tenant?: string } = {};
      try {
        return await run(authorization, context, info);
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
