/**
 * Admin authorization policy: one table, consulted by every admin route and CLI command.
 *
 * - platform-operator: everything except `records:read` (operators run the platform; they do
 *   not read patients' data).
 * - rule-author: `pack:upload`, `pack:read`, `pack:rollout` (move the pinned version and canary
 *   of a pack a tenant already subscribes to; adding or dropping a pack is `tenant:subscriptions`).
 * - tenant-admin: its own tenant only: read it, set its subscriptions, read its audit trail and
 *   records, issue auditor tokens for it (see `authorizeTokenIssue`), list its tokens, and
 *   revoke its auditor tokens and its own token, never another tenant-admin's (see
 *   `authorizeTokenRevoke`).
 * - auditor: its own tenant only: read it, its audit trail and its records.
 */
import { ForbiddenError } from './errors.ts';
import type { AdminAction, Principal, Role } from './types.ts';

type Scope = 'global' | 'own-tenant';

/** Every action the policy knows (a refusal's audited reason is one of these). */
export const ADMIN_ACTIONS: readonly AdminAction[] = Object.freeze([
  'tenant:create',
  'tenant:list',
  'tenant:read',
  'tenant:update',
  'tenant:delete',
  'tenant:subscriptions',
  'token:issue',
  'token:list',
  'token:revoke',
  'pack:upload',
  'pack:read',
  'pack:rollout',
  'audit:read',
  'records:read',
]);

const POLICY: Readonly<Record<Role, Readonly<Partial<Record<AdminAction, Scope>>>>> = {
  'platform-operator': {
    'tenant:create': 'global',
    'tenant:list': 'global',
    'tenant:read': 'global',
    'tenant:update': 'global',
    'tenant:delete': 'global',
    'tenant:subscriptions': 'global',
    'token:issue': 'global',
    'token:list': 'global',
    'token:revoke': 'global',
    'pack:upload': 'global',
    'pack:read': 'global',
    'pack:rollout': 'global',
    'audit:read': 'global',
  },
  'rule-author': {
    'pack:upload': 'global',
    'pack:read': 'global',
    'pack:rollout': 'global',
  },
  'tenant-admin': {
    'tenant:read': 'own-tenant',
    'tenant:subscriptions': 'own-tenant',
    'token:issue': 'own-tenant',
    'token:list': 'own-tenant',
    'token:revoke': 'own-tenant',
    'audit:read': 'own-tenant',
    'records:read': 'own-tenant',
  },
  auditor: {
    'tenant:read': 'own-tenant',
    'audit:read': 'own-tenant',
    'records:read': 'own-tenant',
  },
};

/**
 * Refuses `action` to a role that may never take it, whatever it concerns (checked before
 * looking the concerned thing up, so that the answer does not depend on whether it exists).
 * @throws ForbiddenError (HTTP 403).
 */
export function authorizeRole(principal: Principal, action: AdminAction): Scope {
  const scope = Object.hasOwn(POLICY, principal.role) ? POLICY[principal.role][action] : undefined;
  if (scope === undefined) {
    throw new ForbiddenError(`role ${principal.role} may not ${action}`, { action });
  }
  return scope;
}

/** The token a `token:revoke` concerns. */
export interface RevokeTarget {
  tokenId: string;
  role: Role;
}

/**
 * Allows or refuses `action` for `principal`, on `tenantId` when the action concerns one tenant.
 * Tenant-scoped roles must name their own tenant: a missing `tenantId` is refused for them.
 * `token:revoke` also needs the token revoked (`target`): see {@link authorizeTokenRevoke}.
 * @throws ForbiddenError (HTTP 403) when the policy does not allow it.
 */
export function authorize(
  principal: Principal,
  action: AdminAction,
  tenantId?: string,
  target?: RevokeTarget,
): void {
  if (authorizeRole(principal, action) === 'own-tenant') {
    if (principal.tenant === undefined || tenantId === undefined || tenantId !== principal.tenant) {
      throw new ForbiddenError(`role ${principal.role} may ${action} only for its own tenant`, {
        action,
      });
    }
  }
  if (action === 'token:revoke' && principal.role === 'tenant-admin') {
    // A tenant-admin's peers are the operator's to revoke: otherwise one stolen tenant-admin
    // token could lock every other tenant-admin of its tenant out. Without a target: refused.
    if (
      target === undefined ||
      (target.role !== 'auditor' && target.tokenId !== principal.tokenId)
    ) {
      throw new ForbiddenError('a tenant-admin may revoke only auditor tokens and its own token', {
        action,
      });
    }
  }
}

/**
 * Authorizes revoking `target`, a token of `tenantId` (undefined for global roles' tokens):
 * `token:revoke` on that tenant, and for a tenant-admin only its tenant's auditor tokens and
 * its own token.
 * @throws ForbiddenError (HTTP 403).
 */
export function authorizeTokenRevoke(
  principal: Principal,
  target: RevokeTarget,
  tenantId?: string,
): void {
  authorize(principal, 'token:revoke', tenantId, target);
}

/**
 * Authorizes issuing a token of `role` (for `tenantId`): `token:issue` plus the role rule that a
 * tenant-admin may only issue auditor tokens for its own tenant.
 * @throws ForbiddenError (HTTP 403).
 */
export function authorizeTokenIssue(principal: Principal, role: Role, tenantId?: string): void {
  authorize(principal, 'token:issue', tenantId);
  if (principal.role === 'tenant-admin' && role !== 'auditor') {
    throw new ForbiddenError('a tenant-admin may issue only auditor tokens', {
      action: 'token:issue',
    });
  }
}
