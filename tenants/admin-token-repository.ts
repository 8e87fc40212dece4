/**
 * Admin bearer tokens. A token is `ccds_` + 32 random bytes (base64url); only its sha256 is
 * stored, and it is returned once, by `issue`. `authenticate` looks the hash up and confirms it
 * with a timing-safe comparison; revoked tokens authenticate as nobody.
 */
import crypto from 'node:crypto';
import { Op } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { AdminTokenRow, ControlPlaneModels, WriteTx } from './control-plane-models.ts';
import { InvalidInputError, NotFoundError } from './errors.ts';
import type { AdminTokenInfo, AdminTokenRepository, Principal, Role } from './types.ts';

/** Every admin token starts with this, so secret scanners and humans recognise it. */
export const ADMIN_TOKEN_PREFIX = 'ccds_';
const TOKEN_PATTERN = /^ccds_[A-Za-z0-9_-]{43}$/;
const ROLES: readonly Role[] = ['platform-operator', 'tenant-admin', 'rule-author', 'auditor'];
const TENANT_ROLES: readonly Role[] = ['tenant-admin', 'auditor'];

/** sha256 (hex) of an admin token: what the control plane stores. */
export function hashAdminToken(token: string): string {
  return crypto.createHash('sha256').update(token, 'utf8').digest('hex');
}

function toInfo(row: AdminTokenRow): AdminTokenInfo {
  return {
    id: row.id,
    role: row.role as Role,
    ...(row.tenantId !== null ? { tenant: row.tenantId } : {}),
    ...(row.label !== null ? { label: row.label } : {}),
    createdAt: row.createdAt,
    ...(row.revokedAt !== null ? { revokedAt: row.revokedAt } : {}),
  };
}

export interface AdminTokenRepositoryDeps {
  models: ControlPlaneModels;
  now: () => Date;
  writeTx: WriteTx;
  /** Whether the tenant exists, read in the write transaction `t`. */
  tenantExists: (id: string, t: Transaction) => Promise<boolean>;
}

/** Creates the admin token repository. */
export function createAdminTokenRepository(deps: AdminTokenRepositoryDeps): AdminTokenRepository & {
  revokeForTenant(tenantId: string, t: Transaction): Promise<void>;
} {
  const { AdminToken } = deps.models;

  return {
    async issue(input) {
      const raw = input as unknown as Record<string, unknown>;
      const role = raw.role;
      if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role)) {
        throw new InvalidInputError('role', `must be one of ${ROLES.join(', ')}`);
      }
      const tenant = raw.tenant;
      const isTenantRole = (TENANT_ROLES as readonly string[]).includes(role);
      const refuseTenant = () =>
        new InvalidInputError('tenant', `is required for ${role} and must be an existing tenant`);
      if (isTenantRole) {
        if (typeof tenant !== 'string') {
          throw refuseTenant();
        }
      } else if (tenant !== undefined) {
        throw new InvalidInputError('tenant', `must not be set for ${role}`);
      }
      const label = raw.label;
      if (label !== undefined && (typeof label !== 'string' || label.length > 200)) {
        throw new InvalidInputError('label', 'must be a string of at most 200 characters');
      }
      const token = ADMIN_TOKEN_PREFIX + crypto.randomBytes(32).toString('base64url');
      const id = `tok_${crypto.randomBytes(12).toString('hex')}`;
      // The tenant is checked in the write transaction: a replica removing it at the same time
      // either runs first (refused here) or after (and revokes this token with the tenant's).
      await deps.writeTx(async (t) => {
        if (isTenantRole && !(await deps.tenantExists(tenant as string, t))) {
          throw refuseTenant();
        }
        await AdminToken.create(
          {
            id,
            role,
            tenantId: typeof tenant === 'string' ? tenant : null,
            label: typeof label === 'string' ? label : null,
            tokenHash: hashAdminToken(token),
            createdAt: deps.now().toISOString(),
            revokedAt: null,
          },
          { transaction: t },
        );
      });
      return { id, token };
    },

    async authenticate(token) {
      if (typeof token !== 'string' || !TOKEN_PATTERN.test(token)) {
        return undefined;
      }
      const hash = hashAdminToken(token);
      const row = (await AdminToken.findOne({
        where: { tokenHash: hash },
        raw: true,
      })) as unknown as AdminTokenRow | null;
      if (!row) {
        return undefined;
      }
      // The lookup is by hash; confirm in constant time so no comparison here leaks timing.
      const stored = Buffer.from(row.tokenHash, 'hex');
      const given = Buffer.from(hash, 'hex');
      if (stored.length !== given.length || !crypto.timingSafeEqual(stored, given)) {
        return undefined;
      }
      if (row.revokedAt !== null) {
        return undefined;
      }
      const principal: Principal = { tokenId: row.id, role: row.role as Role };
      if (row.tenantId !== null) {
        principal.tenant = row.tenantId;
      }
      return principal;
    },

    async revoke(id) {
      const row = typeof id === 'string' ? await AdminToken.findByPk(id, { raw: true }) : null;
      if (!row) {
        throw new NotFoundError('admin token');
      }
      await deps.writeTx((t) =>
        AdminToken.update(
          { revokedAt: deps.now().toISOString() },
          { where: { id, revokedAt: { [Op.is]: null } }, transaction: t },
        ),
      );
    },

    async list() {
      const rows = await AdminToken.findAll({
        attributes: ['id', 'role', 'tenantId', 'label', 'createdAt', 'revokedAt'],
        raw: true,
        order: [
          ['createdAt', 'ASC'],
          ['id', 'ASC'],
        ],
      });
      return (rows as unknown as AdminTokenRow[]).map(toInfo);
    },

    async revokeForTenant(tenantId, t) {
      await AdminToken.update(
        { revokedAt: deps.now().toISOString() },
        { where: { tenantId, revokedAt: { [Op.is]: null } }, transaction: t },
      );
    },
  };
}
