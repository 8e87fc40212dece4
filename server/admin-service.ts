/**
 * Admin operations, shared by the admin API and the CLI (the CLI calls these same functions
 * with a local operator principal). Each one authorizes, acts, and writes an audit event.
 */
import { PackValidationError, validatePack } from '../rules/index.ts';
import type { Evaluator, Subscription } from '../rules/index.ts';
import {
  authorize,
  authorizeTokenIssue,
  InvalidInputError,
  NotFoundError,
} from '../tenants/index.ts';
import type {
  AuditEvent,
  ControlPlane,
  NewTenant,
  Principal,
  RegionInfo,
  Role,
  Tenant,
} from '../tenants/index.ts';

/** How a principal is named in audit events and `uploadedBy` (no secret: the token id). */
export const actorOf = (p: Principal): string => `${p.role}:${p.tokenId}`;

export interface AdminServiceDeps {
  controlPlane: ControlPlane;
  evaluator: Evaluator;
  /** The region matrix: placements and failovers are checked against it (422 when forbidden). */
  regions?: readonly RegionInfo[];
}

const ROLES: readonly Role[] = ['platform-operator', 'tenant-admin', 'rule-author', 'auditor'];

export class AdminService {
  constructor(private readonly deps: AdminServiceDeps) {}

  private async audit(principal: Principal, event: Omit<AuditEvent, 'actor'>): Promise<void> {
    await this.deps.controlPlane.audit.record({
      ...event,
      actor: actorOf(principal),
    });
  }

  private placement(principal: Principal): { regions?: readonly RegionInfo[]; actor: string } {
    return {
      ...(this.deps.regions ? { regions: this.deps.regions } : {}),
      actor: actorOf(principal),
    };
  }

  /**
   * Declares a failover: the tenant's calls may be served by `region` (a permitted standby of
   * its home region, under its DR rule). Refused with ResidencyError (422) otherwise.
   */
  async declareFailover(principal: Principal, id: string, region: unknown): Promise<Tenant> {
    authorize(principal, 'tenant:update', id);
    if (typeof region !== 'string' || region === '') {
      throw new InvalidInputError('region', 'must be a region id');
    }
    return this.deps.controlPlane.tenants.declareFailover(id, region, {
      regions: this.deps.regions ?? [],
      actor: actorOf(principal),
    });
  }

  async clearFailover(principal: Principal, id: string): Promise<Tenant> {
    authorize(principal, 'tenant:update', id);
    return this.deps.controlPlane.tenants.clearFailover(id, {
      actor: actorOf(principal),
    });
  }

  async createTenant(principal: Principal, input: unknown): Promise<Tenant> {
    authorize(principal, 'tenant:create');
    const body = objectOf(input, '(body)');
    const tenant = await this.deps.controlPlane.tenants.create(body as unknown as NewTenant, {
      ...this.placement(principal),
    });
    await this.audit(principal, {
      type: 'admin.tenant.create',
      outcome: 'success',
      tenant: tenant.id,
    });
    return tenant;
  }

  async listTenants(principal: Principal): Promise<Tenant[]> {
    if (principal.tenant === undefined) {
      authorize(principal, 'tenant:list');
    }
    const all = await this.deps.controlPlane.tenants.list();
    return all.filter((t) => {
      try {
        authorize(principal, 'tenant:read', t.id);
        return true;
      } catch {
        return false;
      }
    });
  }

  async getTenant(principal: Principal, id: string): Promise<Tenant> {
    authorize(principal, 'tenant:read', id);
    return this.deps.controlPlane.tenants.get(id);
  }

  async updateTenant(principal: Principal, id: string, patch: unknown): Promise<Tenant> {
    authorize(principal, 'tenant:update', id);
    const body = objectOf(patch, '(body)');
    const tenant = await this.deps.controlPlane.tenants.update(id, body, this.placement(principal));
    await this.audit(principal, {
      type: 'admin.tenant.update',
      outcome: 'success',
      tenant: id,
      detail: { fields: Object.keys(body).sort().join(',') },
    });
    return tenant;
  }

  async setTenantStatus(
    principal: Principal,
    id: string,
    status: 'active' | 'suspended',
  ): Promise<Tenant> {
    authorize(principal, 'tenant:update', id);
    const tenant = await this.deps.controlPlane.tenants.update(id, { status });
    await this.audit(principal, {
      type: `admin.tenant.${status === 'active' ? 'resume' : 'suspend'}`,
      outcome: 'success',
      tenant: id,
    });
    return tenant;
  }

  async setSubscriptions(principal: Principal, id: string, input: unknown): Promise<Tenant> {
    authorize(principal, 'tenant:subscriptions', id);
    if (!Array.isArray(input)) {
      throw new InvalidInputError('(body)', 'must be an array of {"pack","version","canary"?}');
    }
    const tenant = await this.deps.controlPlane.tenants.setSubscriptions(
      id,
      input as Subscription[],
    );
    await this.audit(principal, {
      type: 'admin.tenant.subscriptions',
      outcome: 'success',
      tenant: id,
      detail: {
        subscriptions: tenant.subscriptions
          .map(
            (s) =>
              `${s.pack}@${s.version}${s.canary ? `+canary:${s.canary.version}:${s.canary.percent}%` : ''}`,
          )
          .join(','),
      },
    });
    return tenant;
  }

  async issueToken(
    principal: Principal,
    input: unknown,
  ): Promise<{ id: string; token: string; role: Role; tenant?: string }> {
    const body = objectOf(input, '(body)');
    const role = body.role;
    if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role)) {
      throw new InvalidInputError('role', `must be one of ${ROLES.join(', ')}`);
    }
    const tenant = body.tenant;
    if (tenant !== undefined && typeof tenant !== 'string') {
      throw new InvalidInputError('tenant', 'must be a tenant id');
    }
    const label = body.label;
    if (label !== undefined && typeof label !== 'string') {
      throw new InvalidInputError('label', 'must be a string');
    }
    authorizeTokenIssue(principal, role as Role, tenant);
    const issued = await this.deps.controlPlane.adminTokens.issue({
      role: role as Role,
      ...(tenant !== undefined ? { tenant } : {}),
      ...(label !== undefined ? { label } : {}),
    });
    await this.audit(principal, {
      type: 'admin.token.issue',
      outcome: 'success',
      ...(tenant !== undefined ? { tenant } : {}),
      detail: { tokenId: issued.id, role },
    });
    return {
      id: issued.id,
      token: issued.token,
      role: role as Role,
      ...(tenant !== undefined ? { tenant } : {}),
    };
  }

  /** Tokens the principal may see (a tenant-admin: its own tenant's). Never hashes. */
  async listTokens(principal: Principal): Promise<unknown[]> {
    authorize(principal, 'token:list', principal.tenant);
    const all = await this.deps.controlPlane.adminTokens.list();
    return principal.tenant === undefined ? all : all.filter((t) => t.tenant === principal.tenant);
  }

  async revokeToken(principal: Principal, id: string): Promise<void> {
    const info = (await this.deps.controlPlane.adminTokens.list()).find((t) => t.id === id);
    if (!info) {
      throw new NotFoundError('token');
    }
    authorize(principal, 'token:revoke', info.tenant);
    await this.deps.controlPlane.adminTokens.revoke(id);
    await this.audit(principal, {
      type: 'admin.token.revoke',
      outcome: 'success',
      ...(info.tenant !== undefined ? { tenant: info.tenant } : {}),
      detail: { tokenId: id },
    });
  }

  /**
   * Validates (schema, FHIRPath, embedded tests) and stores a pack version.
   * @returns `created` for a new version, `unchanged` for an identical re-upload.
   * @throws PackValidationError (422), ConflictError (409) for different content under a stored version.
   */
  async uploadPack(
    principal: Principal,
    raw: unknown,
  ): Promise<{ id: string; version: string; hash: string; status: 'created' | 'unchanged' }> {
    authorize(principal, 'pack:upload');
    let compiled;
    try {
      compiled = await validatePack(raw, { runTests: true, evaluator: this.deps.evaluator });
    } catch (err) {
      if (err instanceof PackValidationError) {
        await this.audit(principal, {
          type: 'admin.pack.upload',
          outcome: 'failure',
          detail: { problems: err.problems.length },
        });
      }
      throw err;
    }
    const status = await this.deps.controlPlane.packs.put({
      id: compiled.id,
      version: compiled.version,
      hash: compiled.hash,
      pack: compiled.pack,
      uploadedBy: actorOf(principal),
    });
    await this.audit(principal, {
      type: 'admin.pack.upload',
      outcome: 'success',
      detail: { pack: compiled.id, version: compiled.version, hash: compiled.hash, status },
    });
    return { id: compiled.id, version: compiled.version, hash: compiled.hash, status };
  }

  async listPacks(principal: Principal): Promise<unknown[]> {
    authorize(principal, 'pack:read');
    return this.deps.controlPlane.packs.list();
  }

  async getPack(principal: Principal, id: string, version: string): Promise<unknown> {
    authorize(principal, 'pack:read');
    return this.deps.controlPlane.packs.get(id, version);
  }

  /** Verifies the control-plane audit chain (edited, deleted or reordered events). */
  async verifyControlPlaneAudit(
    principal: Principal,
  ): Promise<{ ok: boolean; count: number; firstBadSeq?: number; problem?: string }> {
    authorize(principal, 'audit:read');
    const result = await this.deps.controlPlane.audit.verify();
    await this.audit(principal, {
      type: 'audit.verify',
      outcome: result.ok ? 'success' : 'failure',
      detail: { count: result.count },
    });
    return result;
  }

  async listAudit(
    principal: Principal,
    query: { from?: string; to?: string; tenant?: string; type?: string },
  ): Promise<unknown[]> {
    authorize(principal, 'audit:read', query.tenant);
    return this.deps.controlPlane.audit.list(query);
  }
}

function objectOf(value: unknown, field: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new InvalidInputError(field, 'must be a JSON object');
  }
  return value as Record<string, unknown>;
}
