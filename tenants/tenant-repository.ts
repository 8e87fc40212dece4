/**
 * Tenant registry on the control-plane database. Returns plain `Tenant` objects; the
 * `tenant_issuers` index is kept in step with each tenant's issuers in the same transaction.
 */
import { Op, UniqueConstraintError } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { Subscription } from '../rules/index.ts';
import { appendAuditEvent } from './audit-repository.ts';
import type { ControlPlaneModels, TenantRow, WriteTx } from './control-plane-models.ts';
import { ConflictError, NotFoundError, ResidencyError } from './errors.ts';
import { LruCache } from './lru-cache.ts';
import {
  checkFailover,
  checkFailoverDeclaration,
  checkMigration,
  checkPlacement,
} from './residency.ts';
import {
  MAX_SUBSCRIPTIONS,
  validateNewTenant,
  validateRegion,
  validateSubscription,
  validateSubscriptions,
  validateTenantPatch,
} from './tenant-validation.ts';
import type {
  ActiveFailover,
  AuditEvent,
  ResidencyPolicyInput,
  ResidencyProblem,
  SmartLaunchTarget,
  Tenant,
  TenantPatch,
  TenantRepository,
  TenantRetention,
  TenantSmart,
  TenantStatus,
  TrustedIssuer,
} from './types.ts';

function toTenant(row: TenantRow): Tenant {
  // Older rows (and rows read before the columns were added) carry no residency columns.
  const residency = row.residency ?? null;
  const failover = row.failover ?? null;
  const smart = row.smart ?? null;
  const retention = row.retention ?? null;
  return {
    id: row.id,
    name: row.name,
    region: row.region,
    status: row.status as TenantStatus,
    issuers: JSON.parse(row.issuers) as TrustedIssuer[],
    fhirServers: JSON.parse(row.fhirServers) as string[],
    subscriptions: JSON.parse(row.subscriptions) as Subscription[],
    ...(residency !== null ? { residency: JSON.parse(residency) as ResidencyPolicyInput } : {}),
    ...(failover !== null ? { failover: JSON.parse(failover) as ActiveFailover } : {}),
    ...(smart !== null ? { smart: JSON.parse(smart) as TenantSmart } : {}),
    ...(retention !== null ? { retention: JSON.parse(retention) as TenantRetention } : {}),
    createdAt: row.createdAt,
    updatedAt: row.updatedAt,
  };
}

type ResidencyAction = 'create' | 'update' | 'failover' | 'migrate';

/** What a residency write transaction ends with: the new tenant, or a refusal to record. */
type Outcome =
  { refused?: undefined; tenant: Tenant } | { refused: AuditEvent; problems: ResidencyProblem[] };

/** A PHI-free audit event for a refused residency action (ids, regions and reasons only). */
function refusalEvent(
  action: ResidencyAction,
  tenant: string,
  region: string,
  problems: readonly ResidencyProblem[],
  actor: string | undefined,
  target?: string,
): AuditEvent {
  return {
    type: 'residency.refused',
    outcome: 'failure',
    tenant,
    ...(actor !== undefined ? { actor } : {}),
    detail: {
      action,
      region,
      ...(target !== undefined ? { target } : {}),
      reasons: [...new Set(problems.map((p) => p.reason))].join(','),
      problems: problems.length,
    },
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
  /**
   * Records an audit event outside any transaction (the audit repository's `record`). When
   * absent, events are inserted into the audit table directly, through the same write queue.
   */
  recordAudit?: (event: AuditEvent) => Promise<unknown>;
  /**
   * Changes whenever the control plane may have changed (a write by this process or a commit
   * by any other connection): `findByIssuer` answers from its cache while it stays the same.
   * Without it, nothing is cached.
   */
  generation?: () => Promise<string>;
  /** Issuers whose answers are kept (least recently used out first); default 10,000. */
  maxIssuerCache?: number;
}

/**
 * Issuers whose `findByIssuer` answers are kept per control-plane generation, least recently
 * used out first (dropping them all at the bound made every call miss once more issuers than
 * that were calling).
 */
const MAX_ISSUER_CACHE = 10_000;

function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) {
      deepFreeze(v);
    }
  }
  return value;
}

/** The refusal of a retired id: when, and why ids are never reused. */
export function retiredMessage(id: string, retiredAt: string): string {
  return `tenant id ${id} was deprovisioned on ${retiredAt}; ids are never reused (its audit history and crypto-shredded data stay unambiguous): choose another id`;
}

/** An issuer a write would make shared, and the one tenant registered on it until now. */
interface IssuerSharing {
  iss: string;
  tenant: string;
}

/**
 * The refusal of a write that would make issuers shared without `sharedIssuer: true`: which
 * issuers, who is on them, what sharing changes for their EHRs, and how to go ahead.
 */
function sharedIssuerMessage(tenantId: string, sharing: readonly IssuerSharing[]): string {
  const [only] = sharing;
  const one = sharing.length === 1 && only !== undefined;
  const which = one
    ? `issuer ${only.iss} is already registered to tenant ${only.tenant}`
    : `issuers ${sharing.map((s) => `${s.iss} (tenant ${s.tenant})`).join(', ')} are already registered to other tenants`;
  const others = [...new Set(sharing.map((s) => `tenant ${s.tenant}`))].join(', ');
  return (
    `${which}. Registering tenant ${tenantId} on ${one ? 'it' : 'them'} too makes ` +
    `${one ? 'it a shared issuer' : 'them shared issuers'}: from then on every token of ` +
    `${one ? 'that issuer' : 'those issuers'} must carry a "tenant" claim equal to the cellcds ` +
    `tenant id, and tokens without one are refused (401), those of the EHR of ${others} ` +
    `included. Once the EHR sends "tenant" in every token, repeat the request with ` +
    `"sharedIssuer": true (CLI: tenant add --shared-issuer).`
  );
}

/** Creates the tenant repository over the given models. */
export function createTenantRepository(deps: TenantRepositoryDeps): TenantRepository {
  const { models, now } = deps;
  const { Tenant: TenantModel, TenantIssuer, RetiredTenant, Audit } = models;
  const immediate = deps.writeTx;
  const maxIssuerCache = deps.maxIssuerCache ?? MAX_ISSUER_CACHE;
  /** findByIssuer answers (frozen) of one control-plane generation. */
  let issuerCache = {
    generation: '',
    byIssuer: new LruCache<readonly Tenant[]>(maxIssuerCache),
  };

  /** activeFhirServers' answer of one control-plane generation. */
  let fhirServersCache: { generation: string; servers: readonly string[] } | undefined;

  async function readActiveFhirServers(): Promise<readonly string[]> {
    const rows = await TenantModel.findAll({
      where: { status: 'active' },
      attributes: ['fhirServers'],
      raw: true,
    });
    const servers = new Set<string>();
    for (const row of rows as unknown as Array<Pick<TenantRow, 'fhirServers'>>) {
      for (const url of JSON.parse(row.fhirServers) as string[]) {
        servers.add(url);
      }
    }
    return Object.freeze([...servers]);
  }

  /** subscribedVersions' answer of one control-plane generation. */
  let versionsCache:
    { generation: string; versions: readonly (readonly [string, string])[] } | undefined;

  async function readSubscribedVersions(): Promise<readonly (readonly [string, string])[]> {
    const rows = await TenantModel.findAll({
      where: { status: 'active' },
      attributes: ['subscriptions'],
      raw: true,
    });
    const wanted = new Map<string, readonly [string, string]>();
    const add = (pack: string, version: string) => {
      wanted.set(JSON.stringify([pack, version]), Object.freeze([pack, version] as const));
    };
    for (const row of rows as unknown as Array<Pick<TenantRow, 'subscriptions'>>) {
      for (const s of JSON.parse(row.subscriptions) as Subscription[]) {
        add(s.pack, s.version);
        if (s.canary) {
          add(s.pack, s.canary.version);
        }
      }
    }
    return Object.freeze([...wanted.values()]);
  }

  /** smartLaunchTargets' answer of one control-plane generation. */
  let launchTargetsCache: { generation: string; targets: readonly SmartLaunchTarget[] } | undefined;

  async function readSmartLaunchTargets(): Promise<readonly SmartLaunchTarget[]> {
    const rows = await TenantModel.findAll({
      where: { status: 'active' },
      attributes: ['id', 'fhirServers', 'smart'],
      raw: true,
      order: [['id', 'ASC']],
    });
    const targets = (rows as unknown as Array<Pick<TenantRow, 'id' | 'fhirServers' | 'smart'>>).map(
      (row): SmartLaunchTarget => {
        const smart = row.smart === null ? undefined : (JSON.parse(row.smart) as TenantSmart);
        return {
          tenant: row.id,
          fhirServers: JSON.parse(row.fhirServers) as string[],
          ...(smart === undefined ? {} : { clientId: smart.clientId }),
        };
      },
    );
    return deepFreeze(targets);
  }

  async function lookUpIssuer(iss: string): Promise<Tenant[]> {
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
  }

  /** Inserts an audit row in `t` (residency changes are audited atomically with the change). */
  async function auditInTx(event: AuditEvent, t: Transaction): Promise<void> {
    await appendAuditEvent(models, now().toISOString(), event, t);
  }

  /** Records the refusal, then throws it: a refused residency action is always audited. */
  async function refuse(event: AuditEvent, problems: readonly ResidencyProblem[]): Promise<never> {
    if (deps.recordAudit) {
      await deps.recordAudit(event);
    } else {
      await immediate((t) => auditInTx(event, t));
    }
    throw new ResidencyError(problems);
  }

  async function load(id: string, t?: Transaction): Promise<TenantRow> {
    const row = await TenantModel.findByPk(id, { raw: true, ...(t ? { transaction: t } : {}) });
    if (!row) {
      throw new NotFoundError('tenant');
    }
    return row as unknown as TenantRow;
  }

  /**
   * Refuses, in the write transaction `t` (so that two registrations at once cannot both pass),
   * to put tenant `tenantId` on an issuer exactly one other tenant is on: that issuer would
   * become shared, and that tenant's tokens without `tenant` refused (verify-client-token.ts).
   * An issuer already shared (two tenants or more) needs no confirmation: its EHR sends `tenant`.
   * @throws ConflictError unless `confirmed` (the request's `sharedIssuer: true`).
   */
  async function checkIssuerSharing(
    tenantId: string,
    issuers: readonly TrustedIssuer[],
    confirmed: boolean,
    t: Transaction,
  ): Promise<void> {
    if (confirmed || issuers.length === 0) {
      return;
    }
    const links = (await TenantIssuer.findAll({
      where: { iss: { [Op.in]: issuers.map((i) => i.iss) } },
      raw: true,
      transaction: t,
    })) as unknown as Array<{ iss: string; tenantId: string }>;
    const sharing: IssuerSharing[] = [];
    for (const { iss } of issuers) {
      const on = links.filter((l) => l.iss === iss).map((l) => l.tenantId);
      const [only] = on;
      if (on.length === 1 && only !== undefined && only !== tenantId) {
        sharing.push({ iss, tenant: only });
      }
    }
    if (sharing.length > 0) {
      throw new ConflictError(sharedIssuerMessage(tenantId, sharing));
    }
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

  /** Writes a tenant's (validated) subscriptions in `t`; the tenant as it now is. */
  async function saveSubscriptions(
    row: TenantRow,
    subscriptions: readonly Subscription[],
    t: Transaction,
  ): Promise<Tenant> {
    const next: TenantRow = {
      ...row,
      subscriptions: JSON.stringify(subscriptions),
      updatedAt: now().toISOString(),
    };
    await TenantModel.update(next, { where: { id: row.id }, transaction: t });
    return toTenant(next);
  }

  /**
   * When `id`, not registered, was retired (deprovisioned), or undefined; read in `t` when given.
   * A control plane older than `retired_tenants` recorded a deprovisioning only in its audit
   * trail: the last successful `tenant.deprovision` of the id counts too (the callers ask only
   * for ids not registered, so one registered again since is not caught by an old event).
   */
  async function retiredAt(id: string, t?: Transaction): Promise<string | undefined> {
    const opts = t ? { transaction: t } : {};
    const row = (await RetiredTenant.findByPk(id, { raw: true, ...opts })) as {
      retiredAt: string;
    } | null;
    if (row) {
      return row.retiredAt;
    }
    const event = (await Audit.findOne({
      where: { tenant: id, type: 'tenant.deprovision', outcome: 'success' },
      order: [['seq', 'DESC']],
      attributes: ['at'],
      raw: true,
      ...opts,
    })) as { at: string } | null;
    return event?.at;
  }

  return {
    async create(input, opts = {}) {
      const tenant = await validateNewTenant(input);
      const problems = checkPlacement(tenant.residency, tenant.region, opts.regions);
      if (problems.length > 0) {
        return refuse(
          refusalEvent('create', tenant.id, tenant.region, problems, opts.actor),
          problems,
        );
      }
      const at = now().toISOString();
      const row: TenantRow = {
        id: tenant.id,
        name: tenant.name,
        region: tenant.region,
        status: 'active',
        issuers: JSON.stringify(tenant.issuers),
        fhirServers: JSON.stringify(tenant.fhirServers),
        subscriptions: '[]',
        residency: tenant.residency ? JSON.stringify(tenant.residency) : null,
        failover: null,
        smart: tenant.smart ? JSON.stringify(tenant.smart) : null,
        retention: tenant.retention ? JSON.stringify(tenant.retention) : null,
        createdAt: at,
        updatedAt: at,
      };
      try {
        await immediate(async (t) => {
          if (await TenantModel.findByPk(tenant.id, { transaction: t })) {
            throw new ConflictError('a tenant with this id already exists');
          }
          // Checked in the write transaction, as deprovisioning records it in its own.
          const retired = await retiredAt(tenant.id, t);
          if (retired !== undefined) {
            throw new ConflictError(retiredMessage(tenant.id, retired));
          }
          await checkIssuerSharing(tenant.id, tenant.issuers, tenant.sharedIssuer, t);
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

    async update(id, patch: TenantPatch, opts = {}) {
      const valid = await validateTenantPatch(patch);
      const outcome = await immediate<Outcome>(async (t) => {
        const row = await load(id, t);
        if (valid.issuers !== undefined) {
          await checkIssuerSharing(id, valid.issuers, valid.sharedIssuer, t);
        }
        if (valid.residency !== undefined) {
          const current = toTenant(row);
          const policy = valid.residency ?? undefined;
          const problems = checkPlacement(policy, current.region, opts.regions);
          if (current.failover && opts.regions) {
            // The new policy must keep the active failover allowed (or clear it first).
            const candidate = { ...current, residency: policy };
            if (checkFailover(candidate, current.failover.region, opts.regions).length > 0) {
              problems.push({
                path: 'residency.dr',
                reason: 'failover_not_allowed',
                message: `the active failover to '${current.failover.region}' would not be allowed`,
              });
            }
          } else if (current.failover) {
            problems.push({
              path: 'failover',
              reason: 'failover_active',
              message: `a failover to '${current.failover.region}' is active; clear it first`,
            });
          }
          if (problems.length > 0) {
            return {
              refused: refusalEvent('update', id, row.region, problems, opts.actor),
              problems,
            };
          }
        }
        const next: TenantRow = {
          ...row,
          ...(valid.name !== undefined ? { name: valid.name } : {}),
          ...(valid.status !== undefined ? { status: valid.status } : {}),
          ...(valid.issuers !== undefined ? { issuers: JSON.stringify(valid.issuers) } : {}),
          ...(valid.fhirServers !== undefined
            ? { fhirServers: JSON.stringify(valid.fhirServers) }
            : {}),
          ...(valid.residency !== undefined
            ? { residency: valid.residency === null ? null : JSON.stringify(valid.residency) }
            : {}),
          ...(valid.smart !== undefined
            ? { smart: valid.smart === null ? null : JSON.stringify(valid.smart) }
            : {}),
          ...(valid.retention !== undefined
            ? {
                retention: valid.retention === null ? null : JSON.stringify(valid.retention),
              }
            : {}),
          updatedAt: now().toISOString(),
        };
        await TenantModel.update(next, { where: { id }, transaction: t });
        if (valid.issuers !== undefined) {
          await indexIssuers(id, valid.issuers, t);
        }
        return { tenant: toTenant(next) };
      });
      return outcome.refused ? refuse(outcome.refused, outcome.problems) : outcome.tenant;
    },

    async declareFailover(id, target, opts) {
      validateRegion(target, 'target');
      const outcome = await immediate<Outcome>(async (t) => {
        const row = await load(id, t);
        const current = toTenant(row);
        const problems = checkFailoverDeclaration(current, target, opts.regions);
        if (problems.length > 0) {
          return {
            refused: refusalEvent('failover', id, row.region, problems, opts.actor, target),
            problems,
          };
        }
        if (current.failover?.region === target) {
          return { tenant: current };
        }
        const failover: ActiveFailover = {
          region: target,
          declaredAt: now().toISOString(),
          by: opts.actor ?? 'unknown',
        };
        const next: TenantRow = {
          ...row,
          failover: JSON.stringify(failover),
          updatedAt: failover.declaredAt,
        };
        await TenantModel.update(next, { where: { id }, transaction: t });
        await auditInTx(
          {
            type: 'residency.failover.declared',
            outcome: 'success',
            tenant: id,
            ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
            detail: { region: row.region, target },
          },
          t,
        );
        return { tenant: toTenant(next) };
      });
      return outcome.refused ? refuse(outcome.refused, outcome.problems) : outcome.tenant;
    },

    async clearFailover(id, opts = {}) {
      return immediate(async (t) => {
        const row = await load(id, t);
        const current = toTenant(row);
        if (!current.failover) {
          return current;
        }
        const next: TenantRow = { ...row, failover: null, updatedAt: now().toISOString() };
        await TenantModel.update(next, { where: { id }, transaction: t });
        await auditInTx(
          {
            type: 'residency.failover.cleared',
            outcome: 'success',
            tenant: id,
            ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
            detail: { region: row.region, target: current.failover.region },
          },
          t,
        );
        return toTenant(next);
      });
    },

    async moveHome(id, target, opts) {
      validateRegion(target, 'target');
      const outcome = await immediate<Outcome>(async (t) => {
        const row = await load(id, t);
        const current = toTenant(row);
        const problems = checkMigration(current, target, opts.regions);
        if (problems.length > 0) {
          return {
            refused: refusalEvent('migrate', id, row.region, problems, opts.actor, target),
            problems,
          };
        }
        const next: TenantRow = { ...row, region: target, updatedAt: now().toISOString() };
        await TenantModel.update(next, { where: { id }, transaction: t });
        await auditInTx(
          {
            type: 'residency.home.moved',
            outcome: 'success',
            tenant: id,
            ...(opts.actor !== undefined ? { actor: opts.actor } : {}),
            detail: { from: row.region, to: target },
          },
          t,
        );
        return { tenant: toTenant(next) };
      });
      return outcome.refused ? refuse(outcome.refused, outcome.problems) : outcome.tenant;
    },

    async setSubscriptions(id, subscriptions) {
      await load(id);
      const valid = await validateSubscriptions(subscriptions, deps.packExists);
      return immediate(async (t) => saveSubscriptions(await load(id, t), valid, t));
    },

    async setSubscription(id, subscription, opts = {}) {
      await load(id);
      // One entry, not a list: its fields are named as sent (`version`, `canary.percent`).
      const valid = await validateSubscription(subscription, deps.packExists, '');
      return immediate(async (t) => {
        const row = await load(id, t);
        const current = JSON.parse(row.subscriptions) as Subscription[];
        const at = current.findIndex((s) => s.pack === valid.pack);
        if (at < 0 && opts.existingOnly === true) {
          throw new ConflictError(`tenant ${id} does not subscribe to pack ${valid.pack}`);
        }
        if (at < 0 && current.length >= MAX_SUBSCRIPTIONS) {
          throw new ConflictError(
            `tenant ${id} already subscribes to ${MAX_SUBSCRIPTIONS} packs, the most it may`,
          );
        }
        const list = at < 0 ? [...current, valid] : current.map((s, i) => (i === at ? valid : s));
        return saveSubscriptions(row, list, t);
      });
    },

    async removeSubscription(id, pack) {
      return immediate(async (t) => {
        const row = await load(id, t);
        const current = JSON.parse(row.subscriptions) as Subscription[];
        const list = current.filter((s) => s.pack !== pack);
        if (list.length === current.length) {
          throw new NotFoundError('subscription');
        }
        return saveSubscriptions(row, list, t);
      });
    },

    async findByIssuer(iss) {
      if (typeof iss !== 'string' || iss.length === 0) {
        return [];
      }
      if (!deps.generation) {
        return lookUpIssuer(iss);
      }
      // The hook path asks on every call: answer from memory while nothing has changed. The
      // generation is read BEFORE the lookup, so a write committed meanwhile makes the entry
      // stale at once rather than hiding behind it.
      const generation = await deps.generation();
      if (issuerCache.generation !== generation) {
        issuerCache = { generation, byIssuer: new LruCache(maxIssuerCache) };
      }
      const cache = issuerCache;
      const hit = cache.byIssuer.get(iss);
      if (hit) {
        return [...hit];
      }
      const found = deepFreeze(await lookUpIssuer(iss));
      cache.byIssuer.set(iss, found);
      return [...found];
    },

    async activeFhirServers() {
      if (!deps.generation) {
        return readActiveFhirServers();
      }
      // Read before the lookup (as findByIssuer): a write committed meanwhile makes it stale.
      const generation = await deps.generation();
      if (fhirServersCache?.generation !== generation) {
        fhirServersCache = { generation, servers: await readActiveFhirServers() };
      }
      return fhirServersCache.servers;
    },

    async subscribedVersions() {
      if (!deps.generation) {
        return readSubscribedVersions();
      }
      // Read before the lookup (as findByIssuer): a write committed meanwhile makes it stale.
      const generation = await deps.generation();
      if (versionsCache?.generation !== generation) {
        versionsCache = { generation, versions: await readSubscribedVersions() };
      }
      return versionsCache.versions;
    },

    async smartLaunchTargets() {
      if (!deps.generation) {
        return readSmartLaunchTargets();
      }
      // Read before the lookup (as findByIssuer): a write committed meanwhile makes it stale.
      const generation = await deps.generation();
      if (launchTargetsCache?.generation !== generation) {
        launchTargetsCache = { generation, targets: await readSmartLaunchTargets() };
      }
      return launchTargetsCache.targets;
    },

    peekIssuer(iss) {
      return issuerCache.byIssuer.peek(iss);
    },

    async remove(id) {
      await immediate(async (t) => {
        await load(id, t);
        await TenantIssuer.destroy({ where: { tenantId: id }, transaction: t });
        await TenantModel.destroy({ where: { id }, transaction: t });
        // The id is retired in the same transaction: never registered again (a new tenant
        // under it would inherit the shredded key's tombstone and the old audit history).
        if ((await retiredAt(id, t)) === undefined) {
          await RetiredTenant.create({ id, retiredAt: now().toISOString() }, { transaction: t });
        }
        await deps.revokeTenantTokens(id, t);
      });
    },

    retiredAt(id) {
      return typeof id === 'string' ? retiredAt(id) : Promise.resolve(undefined);
    },
  };
}
