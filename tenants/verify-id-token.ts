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
 *  5. Verified claims: `iss` equal; `aud` names the client id of that tenant's launch (its
 *     registered `smart.clientId`, else the deployment's default; and `azp`, when present or
 *     when `aud` names several parties, is that client id); `exp`, `iat`, `nbf`
 *     with leeway; `exp - iat` at most the max lifetime; `sub` present.
 *
 * There is no replay cache: the id_token is the session credential of one launch and is
 * reused for the page's calls until it expires. Every refusal is AuthError(reason); the token
 * never appears in a message. The JWT mechanics shared with the CDS client verifier live in
 * `jwt-common.ts`; this file keeps the id_token policy.
 */
import { AuthError } from './errors.ts';
import { createJwksFetcher } from './jwks-fetcher.ts';
import {
  audienceList,
  checkHeader,
  checkTimes,
  createIssuerKeys,
  decodeUnverified,
  parseBearer,
  registrationOf,
  reportFailures,
  resolveAlgorithms,
  truncateInfo,
  unverifiedIssuer,
  verifySignature,
} from './jwt-common.ts';
import type { Claims, FailureInfo } from './jwt-common.ts';
import type { AuthFailureReason, ControlPlane, JwksFetcher, Tenant } from './types.ts';

/** Options of {@link createIdTokenVerifier}. */
export interface IdTokenVerifierOptions {
  controlPlane: ControlPlane;
  /**
   * The viewer's default OAuth client id(s), for tenants that registered no `smart.clientId`;
   * `aud` must name one. A tenant with its own client id accepts only that one.
   */
  clientIds: readonly string[];
  /**
   * Allow an empty `clientIds` (no deployment default): then only tenants with their own
   * client id can be launched, and every id_token for another tenant is refused.
   */
  allowNoDefault?: boolean;
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

/**
 * What the caller states about the launch: it chooses among the issuer's tenants, and the token
 * must then prove the choice (its client id, else its fhirUser; `checkTenantProven`).
 */
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
  /** The client id `aud` named (the tenant's own, or the default). */
  clientId: string;
  /** `exp` claim, seconds since the epoch. */
  exp: number;
}

/** Verifies SMART launch id_tokens: see `createIdTokenVerifier`. */
export interface IdTokenVerifier {
  verify(authorization: string | undefined, context: IdTokenContext): Promise<AppIdentity>;
}

const MAX_CLAIM_LENGTH = 2048;

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

/**
 * The FHIR base of an absolute `fhirUser` (`<base>/Practitioner/123` → normal form of `<base>`),
 * or undefined for a relative reference or anything else.
 */
function fhirUserBase(value: string): string | undefined {
  const m = /^(.+)\/[A-Z][A-Za-z]{1,63}\/[A-Za-z0-9\-.]{1,64}$/.exec(value);
  return m?.[1] === undefined ? undefined : normalizeBase(m[1]);
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
  const algorithms = resolveAlgorithms(opts.algorithms, 'id_token verifier');
  const clientIds = opts.clientIds.filter((c) => c.length > 0);
  if (clientIds.length === 0 && opts.allowNoDefault !== true) {
    throw new Error('id_token verifier: at least one client id is required');
  }
  const maxLifetime = opts.maxLifetimeSeconds ?? 3600;
  const leeway = opts.leewaySeconds ?? 60;
  const now = opts.now ?? (() => new Date());
  const issuerKeys = createIssuerKeys({ fetcher: opts.jwks ?? createJwksFetcher({ now }) });
  const { controlPlane } = opts;

  /** The one tenant of this issuer that allowlists the launch's FHIR server. */
  function chooseTenant(candidates: readonly Tenant[], context: IdTokenContext): Tenant {
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

  /**
   * The client id of this tenant's launches: its own registration wins over the default, so an
   * id_token minted for another tenant's (or the default) client id is refused.
   */
  function expectedClientIds(tenant: Tenant): readonly string[] {
    const own = tenant.smart?.clientId;
    return own !== undefined && own.length > 0 ? [own] : clientIds;
  }

  /**
   * The token, not the caller, must say which tenant it is for: the hint and the FHIR server
   * only choose among the issuer's tenants. When no other tenant of this issuer accepts the
   * client id `aud` named, that client id proves it. Otherwise (tenants sharing an issuer and a
   * client id: a vendor-hosted authorization server with one app registration) `fhirUser` must
   * be an absolute URL on the launch's FHIR server, and no such other tenant may allowlist that
   * server: else a clinician of one health system could act as another's.
   */
  function checkTenantProven(
    candidates: readonly Tenant[],
    tenant: Tenant,
    clientId: string,
    fhirUser: unknown,
    context: IdTokenContext,
  ): void {
    const rivals = candidates.filter(
      (t) => t.id !== tenant.id && expectedClientIds(t).includes(clientId),
    );
    if (rivals.length === 0) {
      return;
    }
    const base = normalizeBase(context.fhirServer);
    if (rivals.some((t) => t.fhirServers.some((s) => normalizeBase(s) === base))) {
      throw new AuthError(
        'bad_tenant',
        'several tenants of this issuer accept this client id on this FHIR server: give each its own SMART client id',
      );
    }
    if (typeof fhirUser !== 'string' || fhirUserBase(fhirUser) !== base) {
      throw new AuthError(
        'bad_tenant',
        "several tenants of this issuer accept this client id: the token's fhirUser must be on the launch's FHIR server",
      );
    }
  }

  function checkAudience(claims: Claims, tenant: Tenant): string {
    const expected = expectedClientIds(tenant);
    if (expected.length === 0) {
      throw new AuthError('bad_aud', 'no SMART client id is configured for this tenant');
    }
    const list = audienceList(claims);
    const clientId = expected.find((c) => list.includes(c));
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

  async function run(
    authorization: string | undefined,
    context: IdTokenContext,
    info: FailureInfo,
  ): Promise<AppIdentity> {
    const jwt = parseBearer(authorization, { allowEmptySignature: false });
    const { header, payload: unverified } = decodeUnverified(jwt);
    const kid = checkHeader(header, {
      algorithms,
      // Absent or JWT (any case): an `at+jwt` access token is refused.
      isTypAllowed: (typ) =>
        typ === undefined || (typeof typ === 'string' && typ.toUpperCase() === 'JWT'),
      refuseKeyLocators: true,
    });
    const iss = unverifiedIssuer(unverified);
    info.iss = truncateInfo(iss);
    const candidates = await controlPlane.tenants.findByIssuer(iss);
    const { tenant, registration } = registrationOf(
      candidates,
      iss,
      (candidates) => chooseTenant(candidates, context),
      info,
    );
    // The header holds no jku (refused above), so only the registration's keys are used.
    const keystore = await issuerKeys.keysFor(registration, header, kid);
    const claims = await verifySignature(jwt, keystore, { algorithms, kid });
    if (claims.iss !== iss) {
      throw new AuthError('bad_signature', 'verified claims differ from the decoded ones');
    }
    const clientId = checkAudience(claims, tenant);
    const exp = checkTimes(claims, { now: now(), leeway, maxLifetime });
    if (!shortString(claims.sub)) {
      throw new AuthError('missing_claim', 'sub');
    }
    const fhirUser = claims.fhirUser;
    if (fhirUser !== undefined && !shortString(fhirUser)) {
      throw new AuthError('malformed', 'fhirUser must be a short string');
    }
    checkTenantProven(candidates, tenant, clientId, fhirUser, context);
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
    verify(authorization, context) {
      return reportFailures((info) => run(authorization, context, info), opts.onFailure);
    },
  };
}
