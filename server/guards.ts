/**
 * The checks every authenticated surface (CDS Hooks, SMART app API) runs around its token
 * verification, in one place so the surfaces cannot drift apart.
 */
import { AuthError, mayServe, RegionMismatchError } from '../tenants/index.ts';
import type { Tenant } from '../tenants/index.ts';
import type { Deps } from './context.ts';
import type { AuthSurface } from './metrics.ts';

/**
 * Counts and audits a refused token (the reason only, never the token; within the audit budget
 * per second, beyond it as counts), then rethrows.
 * Anything that is not an AuthError is rethrown untouched.
 */
export async function recordAuthFailure(
  deps: Deps,
  err: unknown,
  surface: AuthSurface,
  where: { endpoint: string; requestId: string },
): Promise<never> {
  if (err instanceof AuthError) {
    deps.metrics.authFailure(err.reason, surface);
    await deps.failureAudit.record({
      type: 'auth.failure',
      outcome: 'failure',
      // A tenant only when the token's signature proved it (replay_quota).
      ...(err.tenant !== undefined ? { tenant: err.tenant } : {}),
      detail: { reason: err.reason, ...where },
    });
  }
  throw err;
}

/**
 * Residency: this region's plane serves only tenants whose policy allows processing here (home
 * region, or a declared and permitted failover). Called right after authentication, before
 * anything of the payload is evaluated, decrypted or stored; audited in the control plane,
 * while the plane's own log line and metrics carry no tenant.
 * @throws RegionMismatchError (421).
 */
export async function assertServedHere(
  deps: Deps,
  tenant: Tenant,
  where: { endpoint: string; requestId: string },
): Promise<void> {
  if (mayServe(tenant, deps.region.id, deps.matrix.regions)) {
    return;
  }
  await deps.controlPlane.audit.record({
    type: 'residency.misdirected',
    outcome: 'failure',
    tenant: tenant.id,
    detail: { region: deps.region.id, ...where },
  });
  throw new RegionMismatchError(deps.region.id);
}
