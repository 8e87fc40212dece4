/**
 * The checks every authenticated surface (CDS Hooks, SMART app API) runs around its token
 * verification, in one place so the surfaces cannot drift apart.
 */
import { AuthError, InvalidInputError, mayServe, RegionMismatchError } from '../tenants/index.ts';
import type { AuditEvent, Tenant } from '../tenants/index.ts';
import { ID_PATTERN } from '../rules/index.ts';
import type { Deps } from './context.ts';
import type { AuthSurface } from './metrics.ts';

/**
 * Where a request was refused, as its audit event names it. `endpoint` is a route the server
 * defines (see {@link serviceEndpoint} for one with a client-chosen id); `idLength` is set when a
 * client-chosen id was left out.
 */
export interface RefusalSite {
  endpoint: string;
  requestId: string;
  idLength?: number;
}

/** What an audited endpoint may look like: a short path of route characters. */
const SAFE_ENDPOINT = /^\/[A-Za-z0-9/:._-]{0,199}$/;
/** The audited endpoint of a site that is not {@link SAFE_ENDPOINT} (a bug in a caller). */
const UNNAMED_ENDPOINT = '(unnamed)';

/**
 * The audited endpoint of a route under `/cds-services/:id`. The id is the client's text (any
 * length, any characters once decoded) and the audit store refuses long detail strings, so it is
 * kept only when it has a service id's syntax; otherwise the route pattern is audited with the
 * id's length. Either way the refusal is audited and the detail stays small and free of
 * whatever a client put in its path.
 */
export function serviceEndpoint(
  id: string,
  suffix: '' | '/feedback',
): { endpoint: string; idLength?: number } {
  return ID_PATTERN.test(id)
    ? { endpoint: `/cds-services/${id}${suffix}` }
    : { endpoint: `/cds-services/:id${suffix}`, idLength: id.length };
}

/** The site as audit detail, bounded whatever a caller passed. */
function siteDetail(site: RefusalSite): Record<string, string | number> {
  const safe = SAFE_ENDPOINT.test(site.endpoint);
  return {
    endpoint: safe ? site.endpoint : UNNAMED_ENDPOINT,
    requestId: site.requestId.slice(0, 64),
    ...(site.idLength !== undefined ? { idLength: site.idLength } : {}),
    ...(!safe && site.idLength === undefined ? { endpointLength: site.endpoint.length } : {}),
  };
}

/**
 * Writes the audit event of a refusal. The refusal stands whatever happens here: a failed write
 * (a store error, an event the store refuses) must not turn a 401 or 421 into another answer,
 * which would tell a client something and hide the refusal. So it is caught and logged loudly
 * instead, with the event type, the request id and the error's class: no tenant (a plane's log
 * carries none for a tenant it may not serve), no detail, no error text (a store's message may
 * echo what it was given).
 */
export async function auditRefusal<E extends AuditEvent>(
  deps: Deps,
  requestId: string,
  event: E,
  write: (event: E) => Promise<unknown>,
): Promise<void> {
  try {
    await write(event);
  } catch (err: unknown) {
    deps.metrics.auditWriteFailure(event.type);
    deps.log.error(
      {
        auditEvent: event.type,
        requestId,
        err: {
          name: err instanceof Error ? err.name : typeof err,
          ...(err instanceof InvalidInputError ? { field: err.field } : {}),
        },
      },
      'refusal not audited',
    );
  }
}

/** Detail keys the site and reason own: a refusal's facts never overwrite them. */
const RESERVED_KEYS = new Set(['reason', 'endpoint', 'requestId', 'idLength', 'endpointLength']);

/** A refusal's facts (AuthError.facts: bounded by the verifier) minus the reserved keys. */
function factsOf(err: AuthError): Record<string, string | number> {
  return Object.fromEntries(Object.entries(err.facts).filter(([key]) => !RESERVED_KEYS.has(key)));
}

/**
 * Counts and audits a refused token (never the token: its reason, what the operator needs to
 * tell the integrator what to fix, e.g. the missing claim's name, the `kid`, the `aud` sent and
 * the URL expected, and the site; within the audit budget per second, beyond it as counts by
 * reason), then rethrows. A failed audit write is logged and the refusal rethrown all the same.
 * Anything that is not an AuthError is rethrown untouched.
 */
export async function recordAuthFailure(
  deps: Deps,
  err: unknown,
  surface: AuthSurface,
  where: RefusalSite,
): Promise<never> {
  if (err instanceof AuthError) {
    deps.metrics.authFailure(err.reason, surface);
    await auditRefusal(
      deps,
      where.requestId,
      {
        type: 'auth.failure',
        outcome: 'failure',
        // A tenant only when the token's signature proved it (replay_quota).
        ...(err.tenant !== undefined ? { tenant: err.tenant } : {}),
        detail: { reason: err.reason, ...factsOf(err), ...siteDetail(where) },
      },
      (event) => deps.failureAudit.record(event),
    );
  }
  throw err;
}

/**
 * Residency: this region's plane serves only tenants whose policy allows processing here (home
 * region, or a declared and permitted failover). Called right after authentication, before
 * anything of the payload is evaluated, decrypted or stored; audited in the control plane,
 * while the plane's own log line and metrics carry no tenant. A failed audit write is logged
 * and the call refused all the same.
 * @throws RegionMismatchError (421).
 */
export async function assertServedHere(
  deps: Deps,
  tenant: Tenant,
  where: RefusalSite,
): Promise<void> {
  if (mayServe(tenant, deps.region.id, deps.matrix.regions)) {
    return;
  }
  await auditRefusal(
    deps,
    where.requestId,
    {
      type: 'residency.misdirected',
      outcome: 'failure',
      tenant: tenant.id,
      detail: { region: deps.region.id, ...siteDetail(where) },
    },
    (event) => deps.controlPlane.audit.record(event),
  );
  throw new RegionMismatchError(deps.region.id);
}
