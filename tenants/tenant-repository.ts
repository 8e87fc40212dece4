/**
 * Tenant registry on the control-plane database. Returns plain `Tenant` objects; the
 * `tenant_issuers` index is kept in step with each tenant's issuers in the same transaction.
 */
import { Op, UniqueConstraintError } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { Subscription } from '../rules/index.ts';
import type { ControlPlaneModels, TenantRow, WriteTx } from './control-plane-models.ts';
import { ConflictError, NotFoundError } from './errors.ts';
import {
  validateNewTenant,
  validateSubscriptions,
  validateTenantPatch,
} from './tenant-validation.ts';
import type {
  Tenant,
  TenantPatch,
  TenantRepository,
  TenantStatus,
  TrustedIssuer,
} from './types.ts';

function toTenant(row: TenantRow): Tenant {
  return {
    id: row.id,
    name: row.name,
    region: row.region,
    status: row.status as TenantStatus,
    issuers: JSON.parse(row.issuers) as TrustedIssuer[],
    fhirServers: JSON.parse(row.fhirServers) as string[],
    subscriptions: JSON.parse(row.subscriptions) as Subscription[],
    createdAt: row.createdAt,
    updatedAt: row.updatedAt,
  };
}

export interface TenantRepositoryDeps {
  writeTx: WriteTx;
  models: ControlPlaneModels;
  now: () => Date;
  /** Whether a pack version is in the catalog (subscriptions are validated against it). */
  packExists: (pack: string, version: string) => Promise<boolean>;
  /** Revokes the tenant-scoped admin tokens of a removed tenant. */
  revokeTenantTokens: (tenantId: string, t: Transaction) => Promise<void>;
}

/** Creates the tenant repository over the given models. */
export function createTenantRepository(deps: TenantRepositoryDeps): TenantRepository {
  const { models, now } = deps;
  const { Tenant: TenantModel, TenantIssuer } = models;
  const immediate = deps.writeTx;

  async function load(id: string, t?: Transaction): Promise<TenantRow> {
    const row = await TenantModel.findByPk(id, { raw: true, ...(t ? { transaction: t } : {}) });
    if (!row) {
      throw new NotFoundError('tenant');
    }
    return row as unknown as TenantRow;
  }

  async function indexIssuers(
    tenantId: string,
    issuers: TrustedIssuer[],
    t: Transaction,
  ): Promise<void> {
    await TenantIssuer.destroy({ where: { tenantId }, transaction: t });
    await TenantIssuer.bulkCreate(
      issuers.map((i) => ({ iss: i.iss, tenantId })),
      { transaction: t },
    );
  }

  return {
    async create(input) {
      const tenant = await validateNewTenant(input);
      const at = now().toISOString();
      const row: TenantRow = {
        id: tenant.id,
        name: tenant.name,
        region: tenant.region,
        status: 'active',
        issuers: JSON.stringify(tenant.issuers),
        fhirServers: JSON.stringify(tenant.fhirServers),
        subscriptions: '[]',
        createdAt: at,
        updatedAt: at,
      };
      try {
        await immediate(async (t) => {
          if (await TenantModel.findByPk(tenant.id, { transaction: t })) {
            throw new ConflictError('a tenant with this id already exists');
          }
          await TenantModel.create(row, { transaction: t });
          await indexIssuers(tenant.id, tenant.issuers, t);
        });
      } catch (err) {
        if (err instanceof UniqueConstraintError) {
          throw new ConflictError('a tenant with this id already exists');
        }
        throw err;
      }
      return toTenant(row);
    },

    async get(id) {
      if (typeof id !== 'string') {
        throw new NotFoundError('tenant');
      }
      return toTenant(await load(id));
    },

    async list() {
      const rows = await TenantModel.findAll({ raw: true, order: [['id', 'ASC']] });
      return (rows as unknown as TenantRow[]).map(toTenant);
    },

    async update(id, patch: TenantPatch) {
      const valid = await validateTenantPatch(patch);
      return immediate(async (t) => {
        const row = await load(id, t);
        const next: TenantRow = {
          ...row,
          ...(valid.name !== undefined ? { name: valid.name } : {}),
          ...(valid.status !== undefined ? { status: valid.status } : {}),
          ...(valid.issuers !== undefined ? { issuers: JSON.stringify(valid.issuers) } : {}),
          ...(valid.fhirServers !== undefined
            ? { fhirServers: JSON.stringify(valid.fhirServers) }
            : {}),
          updatedAt: now().toISOString(),
        };
        await TenantModel.update(next, { where: { id }, transaction: t });
        if (valid.issuers !== undefined) {
          await indexIssuers(id, valid.issuers, t);
        }
        return toTenant(next);
      });
    },

    async setSubscriptions(id, subscriptions) {
      await load(id);
      const valid = await validateSubscriptions(subscriptions, deps.packExists);
      return immediate(async (t) => {
        const row = await load(id, t);
        const next: TenantRow = {
          ...row,
          subscriptions: JSON.stringify(valid),
          updatedAt: now().toISOString(),
        };
        await TenantModel.update(next, { where: { id }, transaction: t });
        return toTenant(next);
      });
    },

    async findByIssuer(iss) {
      if (typeof iss !== 'string' || iss.length === 0) {
        return [];
      }
      const links = await TenantIssuer.findAll({ where: { iss }, raw: true });
      if (links.length === 0) {
        return [];
      }
      const ids = (links as unknown as Array<{ tenantId: string }>).map((l) => l.tenantId);
      const rows = await TenantModel.findAll({
        where: { id: { [Op.in]: ids } },
        raw: true,
        order: [['id', 'ASC']],
      });
      return (rows as unknown as TenantRow[]).map(toTenant);
    },

    async remove(id) {
      await immediate(async (t) => {
        await load(id, t);
        await TenantIssuer.destroy({ where: { tenantId: id }, transaction: t });
        await TenantModel.destroy({ where: { id }, transaction: t });
        await deps.revokeTenantTokens(id, t);
      });
    },
  };
}
