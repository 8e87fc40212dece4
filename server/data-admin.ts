/**
 * Admin operations on the region's data plane: reading invocation records back (the tenant's
 * own tenant-admin and auditor only), "why did this card fire" replays, key rotation and jobs,
 * deprovisioning (crypto-shredding), backups and restores, audit-chain verification. Shared by
 * the admin API and the CLI; every call is authorized and audited.
 */
import path from 'node:path';
import { finalizeCards } from '../hooks/index.ts';
import { answerCards } from '../rules/index.ts';
import type { Evaluator } from '../rules/index.ts';
import {
  authorize,
  BackupError,
  ConflictError,
  InvalidInputError,
  mayBackupTo,
  mayServe,
  NotFoundError,
  readBackupManifest,
  RegionMismatchError,
  ResidencyError,
} from '../tenants/index.ts';
import { actorOf } from './admin-service.ts';
import { tenantChain, verificationDetail, withKeptAnchors } from './audit-anchors.ts';
import type { ExportedHead } from './audit-anchors.ts';
import type { Deps } from './context.ts';
import type { ServiceDirectory } from './service-directory.ts';
import type {
  AuditEvent,
  BackupResult,
  ChainHead,
  ChainVerification,
  ControlPlane,
  DeprovisionResult,
  FeedbackSummary,
  InvocationRecord,
  InvocationSummary,
  JobInfo,
  KeyStatus,
  Principal,
  RegionInfo,
  RegionStores,
  RestoreResult,
  Tenant,
} from '../tenants/index.ts';

export interface DataAdminDeps {
  controlPlane: ControlPlane;
  stores: RegionStores;
  evaluator: Evaluator;
  /** Compiled pack versions, shared with the hook path. */
  directory: ServiceDirectory;
  backupDir: string;
  /** The region matrix (which region may serve which tenant, failovers). */
  regions: readonly RegionInfo[];
}

/** A deprovisioning's outcome in this region; `registryRemoved` once the tenant is gone. */
export interface DeprovisionOutcome extends DeprovisionResult {
  /**
   * True when this was the home region's plane and the tenant left the registry. False on a
   * standby's plane: that region's data is shredded, the tenant stays registered until its
   * home region's plane deletes it.
   */
  registryRemoved: boolean;
}

export interface ReplayResult {
  invocation: string;
  pack: { id: string; version: string; hash: string };
  /** True when the replayed cards equal the stored ones (ignoring the per-call uuids). */
  matches: boolean;
  cards: unknown[];
  storedCards: unknown[];
  trace: unknown[];
}

/** A record id as the service makes them (crypto.randomUUID). */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * The record id a request asked for, as an audit event may name it: a uuid as it is; anything
 * else (the caller's text, which may be an MRN or a name) only by its length. Not by a digest:
 * an MRN has so few possible values that an unkeyed hash of it is reversed by trying them all
 * (a 7-digit MRN in seconds), and the control-plane trail is read by platform operators.
 */
function requestedId(id: string): { invocation: string } | { invocationLength: number } {
  return UUID.test(id) ? { invocation: id } : { invocationLength: id.length };
}

/** Cards without their per-call uuids, for comparing a replay with the record. */
function withoutUuids(cards: unknown): unknown {
  if (Array.isArray(cards)) {
    return cards.map(withoutUuids);
  }
  if (cards !== null && typeof cards === 'object') {
    return Object.fromEntries(
      Object.entries(cards)
        .filter(([k]) => k !== 'uuid')
        .map(([k, v]) => [k, k === 'resource' ? v : withoutUuids(v)]),
    );
  }
  return cards;
}

export class DataAdmin {
  constructor(private readonly deps: DataAdminDeps) {}

  /** The DataAdmin of a process's dependencies (the server's, or a local CLI command's). */
  static of(
    deps: Pick<
      Deps,
      'controlPlane' | 'stores' | 'evaluator' | 'directory' | 'backupDir' | 'matrix'
    >,
  ): DataAdmin {
    return new DataAdmin({
      controlPlane: deps.controlPlane,
      stores: deps.stores,
      evaluator: deps.evaluator,
      directory: deps.directory,
      backupDir: deps.backupDir,
      regions: deps.matrix.regions,
    });
  }

  private async audit(principal: Principal, event: Omit<AuditEvent, 'actor'>): Promise<void> {
    await this.deps.controlPlane.audit.record({ ...event, actor: actorOf(principal) });
  }

  /**
   * The tenant must exist in the registry (so a typo is a 404, not a new empty store), and this
   * region must be one that may hold its data: one that may serve it (home, declared failover),
   * or one that still holds a store of it (a former failover standby, until it is shredded).
   * Anywhere else nothing is opened or created: the refusal is audited
   * (`residency.misdirected`) and thrown as RegionMismatchError (421).
   */
  private async tenant(principal: Principal, id: string, action: string): Promise<Tenant> {
    const tenant = await this.deps.controlPlane.tenants.get(id);
    const region = this.deps.stores.region;
    if (
      mayServe(tenant, region, this.deps.regions) ||
      (await this.deps.stores.listTenants()).includes(id)
    ) {
      return tenant;
    }
    await this.audit(principal, {
      type: 'residency.misdirected',
      outcome: 'failure',
      tenant: id,
      detail: { region, action },
    });
    throw new RegionMismatchError(region);
  }

  async listInvocations(
    principal: Principal,
    tenantId: string,
    query: { from?: string; to?: string; hook?: string; limit?: number },
  ): Promise<InvocationSummary[]> {
    authorize(principal, 'records:read', tenantId);
    await this.tenant(principal, tenantId, 'records.list');
    for (const k of ['from', 'to'] as const) {
      const v = query[k];
      if (v !== undefined && Number.isNaN(Date.parse(v))) {
        throw new InvalidInputError(k, 'must be an ISO 8601 date-time');
      }
    }
    const list = await this.deps.stores.store(tenantId).listInvocations(query);
    await this.audit(principal, {
      type: 'records.list',
      outcome: 'success',
      tenant: tenantId,
      detail: { count: list.length },
    });
    return list;
  }

  /**
   * The tenant's override-rate report (TenantStore.feedbackSummary): counts per pack, version
   * and rule over a window, from clear columns only (no record opened, no key used). Allowed as
   * the tenant's audit trail is (`audit:read`: the platform operator, and the tenant's own
   * tenant-admin and auditor), since it is PHI-free metadata of the same kind; a rule-author is
   * refused (its role is global over packs, with no tenant or pack ownership to scope rows by).
   * Audited `feedback.summary` (actor, tenant, window, row count).
   * @throws ForbiddenError (403), NotFoundError (404: no such tenant), InvalidInputError (400:
   *   `since`/`until`), RegionMismatchError (421).
   */
  async feedbackSummary(
    principal: Principal,
    tenantId: string,
    query: { since?: string; until?: string },
  ): Promise<FeedbackSummary> {
    authorize(principal, 'audit:read', tenantId);
    await this.tenant(principal, tenantId, 'feedback.summary');
    const summary = await this.deps.stores.store(tenantId).feedbackSummary(query);
    await this.audit(principal, {
      type: 'feedback.summary',
      outcome: 'success',
      tenant: tenantId,
      detail: { since: summary.since, until: summary.until, rows: summary.rows.length },
    });
    return summary;
  }

  /**
   * One invocation record, decrypted (the tenant's own tenant-admin and auditor only), audited
   * `records.read`. A read that finds nothing is audited too, as a failure (see `readRecord`).
   * @throws ForbiddenError (403), NotFoundError (404), InvalidInputError (400: not a record id).
   */
  async readInvocation(
    principal: Principal,
    tenantId: string,
    id: string,
  ): Promise<InvocationRecord> {
    return this.readRecord(principal, tenantId, id, 'records.read');
  }

  /**
   * Reads a record for `action` (a read, or the read a replay starts with). The record is the
   * store's; a read that finds none (404) or names no record id (400) probes the tenant's
   * records, so it is audited as `action` with outcome failure, the actor, the tenant, the
   * reason (`not_found`, `invalid_id`) and the id asked for: a uuid (the ids the service
   * makes) as it is, any other text (the caller's: it may be an MRN) only by its length. A
   * found record is audited `records.read` (a replay adds `records.replay`).
   */
  private async readRecord(
    principal: Principal,
    tenantId: string,
    id: string,
    action: 'records.read' | 'records.replay',
  ): Promise<InvocationRecord> {
    authorize(principal, 'records:read', tenantId);
    await this.tenant(principal, tenantId, action);
    let record: InvocationRecord;
    try {
      record = await this.deps.stores
        .store(tenantId)
        .readInvocation(id, { actor: actorOf(principal) });
    } catch (err) {
      const reason =
        err instanceof NotFoundError
          ? 'not_found'
          : err instanceof InvalidInputError && err.field === 'id'
            ? 'invalid_id'
            : undefined;
      if (reason !== undefined) {
        // Fails closed: an attempt that cannot be audited is answered 500, as a read would be.
        await this.audit(principal, {
          type: action,
          outcome: 'failure',
          tenant: tenantId,
          detail: { reason, ...requestedId(id) },
        });
      }
      throw err;
    }
    await this.audit(principal, {
      type: 'records.read',
      outcome: 'success',
      tenant: tenantId,
      detail: { invocation: id },
    });
    return record;
  }

  /**
   * Re-evaluates a stored invocation's inputs with the pack version it was answered with, at
   * the instant it was answered, and says whether the cards match.
   */
  async replay(principal: Principal, tenantId: string, id: string): Promise<ReplayResult> {
    const record = await this.readRecord(principal, tenantId, id, 'records.replay');
    // The version as this process compiled it for calls (cached): reading, parsing and hashing
    // the stored pack again on the main thread cost every tenant's calls ~30 ms a replay.
    const compiled = await this.deps.directory.pack(record.pack.id, record.pack.version);
    if (compiled.hash !== record.pack.hash) {
      throw new ConflictError(
        `pack ${record.pack.id}@${record.pack.version} no longer has hash ${record.pack.hash}`,
      );
    }
    const secret = record.secret as {
      context: Record<string, unknown>;
      prefetch: Record<string, unknown>;
      cards: unknown[];
    };
    const result = await this.deps.evaluator.evaluate(compiled, record.service, {
      hook: record.hook,
      hookInstance: record.hookInstance,
      context: secret.context,
      prefetch: secret.prefetch,
      now: new Date(record.time),
    });
    const cards = finalizeCards(answerCards(compiled, result), undefined, result.trace);
    const matches =
      JSON.stringify(withoutUuids(cards)) === JSON.stringify(withoutUuids(secret.cards));
    await this.audit(principal, {
      type: 'records.replay',
      outcome: 'success',
      tenant: tenantId,
      detail: { invocation: id, matches },
    });
    return {
      invocation: id,
      pack: record.pack,
      matches,
      cards,
      storedCards: secret.cards,
      trace: result.trace,
    };
  }

  async keyStatus(principal: Principal, tenantId: string): Promise<KeyStatus> {
    authorize(principal, 'tenant:read', tenantId);
    await this.tenant(principal, tenantId, 'keys.status');
    return this.deps.stores.store(tenantId).keys.status();
  }

  /** Scheduled or emergency DEK rotation: the new version is primary at once; a job rewraps. */
  async rotateTenantKey(
    principal: Principal,
    tenantId: string,
    emergency: boolean,
  ): Promise<JobInfo> {
    authorize(principal, 'tenant:update', tenantId);
    await this.tenant(principal, tenantId, 'key.rotate');
    const job = await this.deps.stores
      .store(tenantId)
      .keys.rotate({ emergency, actor: actorOf(principal) });
    await this.audit(principal, {
      type: emergency ? 'key.rotate.emergency' : 'key.rotate',
      outcome: 'success',
      tenant: tenantId,
      detail: { job: job.id, total: job.total },
    });
    return job;
  }

  /** Rotates this region's master key; a job rewraps every tenant's DEKs (records untouched). */
  async rotateKek(principal: Principal, region: string): Promise<JobInfo> {
    authorize(principal, 'tenant:update');
    if (region !== this.deps.stores.region) {
      throw new NotFoundError(`region ${region} on this plane`);
    }
    const job = await this.deps.stores.rotateKek({ actor: actorOf(principal) });
    await this.audit(principal, {
      type: 'key.kek.rotate',
      outcome: 'success',
      detail: { region, job: job.id },
    });
    return job;
  }

  async job(principal: Principal, id: string): Promise<JobInfo> {
    const job = await this.deps.stores.findJob(id);
    authorize(principal, 'tenant:read', job?.tenant);
    if (!job) {
      throw new NotFoundError('job');
    }
    return job;
  }

  /**
   * Crypto-shreds the tenant in this region (keys first, then the store). On its home region's
   * plane, then removes it from the registry, but only once no failover standby may still hold
   * its data: every region it ever failed over to must have been shredded first (a DELETE on
   * that region's plane, audited `tenant.shred.region`), else 409 naming them. On a standby's
   * plane: shreds that region's data and keeps the registry entry. Refused (409) while a
   * failover is declared, and on a plane of a region holding none of the tenant's data.
   */
  async deprovision(principal: Principal, tenantId: string): Promise<DeprovisionOutcome> {
    authorize(principal, 'tenant:delete', tenantId);
    const tenant = await this.deps.controlPlane.tenants.get(tenantId);
    const region = this.deps.stores.region;
    if (tenant.failover) {
      throw new ConflictError(
        `tenant ${tenantId} has a failover to ${tenant.failover.region} declared: clear it first`,
      );
    }
    if (region !== tenant.region) {
      return this.shredStandby(principal, tenant, region);
    }
    const pending = await this.standbysNotShredded(tenant);
    if (pending.length > 0) {
      throw new ConflictError(
        `tenant ${tenantId} failed over to ${pending.join(', ')}, which may still hold its data: delete it on that region's plane first, then here`,
      );
    }
    const result = await this.deps.stores.deprovisionTenant(tenantId);
    await this.deps.controlPlane.tenants.remove(tenantId);
    await this.audit(principal, {
      type: 'tenant.deprovision',
      outcome: 'success',
      tenant: tenantId,
      detail: {
        region,
        tenantKeyDestroyed: result.tenantKeyDestroyed,
        dekVersionsDestroyed: result.dekVersionsDestroyed,
        storeDeleted: result.storeDeleted,
      },
    });
    return { ...result, registryRemoved: true };
  }

  /** A DELETE on the plane of a region that is not the tenant's home. */
  private async shredStandby(
    principal: Principal,
    tenant: Tenant,
    region: string,
  ): Promise<DeprovisionOutcome> {
    const holds = (await this.deps.stores.listTenants()).includes(tenant.id);
    if (!holds && !(await this.failoverRegions(tenant.id)).has(region)) {
      throw new ConflictError(
        `region ${region} holds no data of tenant ${tenant.id}: delete it on its home region's plane (${tenant.region})`,
      );
    }
    const result = await this.deps.stores.deprovisionTenant(tenant.id);
    await this.audit(principal, {
      type: 'tenant.shred.region',
      outcome: 'success',
      tenant: tenant.id,
      detail: {
        region,
        tenantKeyDestroyed: result.tenantKeyDestroyed,
        dekVersionsDestroyed: result.dekVersionsDestroyed,
        storeDeleted: result.storeDeleted,
      },
    });
    return { ...result, registryRemoved: false };
  }

  /** Every region the tenant was ever declared to fail over to, with the last declaration's seq. */
  private async failoverRegions(tenantId: string): Promise<Map<string, number>> {
    const declared = new Map<string, number>();
    const events = await this.deps.controlPlane.audit.list({
      tenant: tenantId,
      type: 'residency.failover.declared',
    });
    for (const event of events) {
      const target = event.detail?.['target'];
      if (typeof target === 'string') {
        declared.set(target, event.seq);
      }
    }
    return declared;
  }

  /** Failover regions (not the home) with no `tenant.shred.region` since their last declaration. */
  private async standbysNotShredded(tenant: Tenant): Promise<string[]> {
    const declared = await this.failoverRegions(tenant.id);
    const shredded = new Map<string, number>();
    for (const event of await this.deps.controlPlane.audit.list({
      tenant: tenant.id,
      type: 'tenant.shred.region',
    })) {
      const region = event.detail?.['region'];
      if (typeof region === 'string') {
        shredded.set(region, event.seq);
      }
    }
    return [...declared]
      .filter(([region, seq]) => region !== tenant.region && (shredded.get(region) ?? -1) < seq)
      .map(([region]) => region)
      .sort();
  }

  async backup(principal: Principal, tenantId: string): Promise<BackupResult> {
    authorize(principal, 'tenant:update', tenantId);
    const tenant = await this.tenant(principal, tenantId, 'backup');
    const region = this.deps.stores.region;
    // A backup lands in this plane's backupDir, in this region: the policy must allow that.
    if (!mayBackupTo(tenant, region)) {
      await this.audit(principal, {
        type: 'residency.refused',
        outcome: 'failure',
        tenant: tenantId,
        detail: { region, action: 'backup' },
      });
      throw new ResidencyError([
        {
          path: 'residency.backupRegions',
          reason: 'not_backup_region',
          message: `backups of this tenant may not be written in region ${region}`,
        },
      ]);
    }
    const result = await this.deps.stores.backupTenant(tenantId, this.deps.backupDir);
    await this.audit(principal, {
      type: 'backup.create',
      outcome: 'success',
      tenant: tenantId,
      detail: { path: path.basename(result.path), invocations: result.counts.invocations },
    });
    return result;
  }

  /**
   * Restores one tenant from a backup folder inside this region's backup directory. A backup
   * whose manifest cannot be authenticated (format 1, or a crypto-shredded tenant's) restores
   * only with `allowUnauthenticated`, recorded in the audit event and the result.
   */
  async restore(
    principal: Principal,
    backup: string,
    tenantId?: string,
    opts: { allowUnauthenticated?: boolean } = {},
  ): Promise<RestoreResult> {
    const allowUnauthenticated = opts.allowUnauthenticated === true;
    authorize(principal, 'tenant:update', tenantId);
    const root = path.resolve(this.deps.backupDir);
    const target = path.resolve(root, backup);
    if (target !== root && !target.startsWith(`${root}${path.sep}`)) {
      throw new InvalidInputError('backup', `must be a backup folder under ${root}`);
    }
    try {
      const restoring = tenantId ?? readBackupManifest(target).tenant;
      await this.registeredForRestore(restoring);
      // Only in a region that may hold the tenant's data (as every data route): nothing written.
      await this.tenant(principal, restoring, 'restore.tenant');
      const result = await this.deps.stores.restoreTenant(target, {
        region: this.deps.stores.region,
        ...(tenantId !== undefined ? { tenant: tenantId } : {}),
        allowUnauthenticated,
      });
      await this.audit(principal, {
        type: 'restore.tenant',
        outcome: 'success',
        tenant: result.tenant,
        detail: {
          backupCreatedAt: result.backupCreatedAt,
          keyAvailable: result.keyAvailable,
          authenticated: result.authenticated,
          ...(allowUnauthenticated ? { allowUnauthenticated } : {}),
        },
      });
      return result;
    } catch (err) {
      await this.audit(principal, {
        type: 'restore.tenant',
        outcome: 'failure',
        ...(tenantId !== undefined ? { tenant: tenantId } : {}),
        // The operator's text: bounded, so the audit store takes it and the original error
        // is the one thrown. The refusal's reason is a closed set of codes.
        detail: {
          backup: path.basename(target).slice(0, 200),
          ...(err instanceof BackupError ? { reason: err.reason } : {}),
          ...(allowUnauthenticated ? { allowUnauthenticated } : {}),
        },
      });
      throw err;
    }
  }

  /**
   * A restore writes a store only for a registered tenant: one deprovisioned (its id retired,
   * never registered again) or never registered would get a store nothing serves or shreds.
   * @throws ConflictError (409) for a retired id, NotFoundError (404) for an unknown one.
   */
  private async registeredForRestore(tenantId: string): Promise<void> {
    const tenants = this.deps.controlPlane.tenants;
    try {
      await tenants.get(tenantId);
    } catch (err) {
      if (!(err instanceof NotFoundError)) {
        throw err;
      }
      const retiredAt = await tenants.retiredAt?.(tenantId);
      if (retiredAt !== undefined) {
        throw new ConflictError(
          `tenant ${tenantId} was deprovisioned on ${retiredAt} (crypto-shredded, its id retired): its backups are not restored; nothing was written`,
        );
      }
      throw Object.assign(new NotFoundError('tenant'), {
        message: `tenant ${tenantId} is not registered: a backup is restored only for a registered tenant (register it first); nothing was written`,
      });
    }
  }

  /**
   * Verifies the tenant's audit chain (edited, deleted or reordered events, by someone who did
   * not recompute the chain) and, against `kept` anchors (heads taken earlier, see
   * server/audit-anchors.ts), a recomputed one. Audited `audit.verify` (`count`, `anchors`).
   * @throws ForbiddenError (403); RegionMismatchError (421).
   */
  async verifyAudit(
    principal: Principal,
    tenantId: string,
    kept: readonly ChainHead[] = [],
  ): Promise<ChainVerification> {
    authorize(principal, 'audit:read', tenantId);
    await this.tenant(principal, tenantId, 'audit.verify');
    const audit = this.deps.stores.store(tenantId).audit;
    const result = await withKeptAnchors(await audit.verify(), kept, async (seq) => {
      const [entry] = await audit.list({ afterSeq: seq - 1, limit: 1 });
      return entry?.seq === seq ? entry.hash : undefined;
    });
    await this.audit(principal, {
      type: 'audit.verify',
      outcome: result.ok ? 'success' : 'failure',
      tenant: tenantId,
      detail: verificationDetail(result, kept),
    });
    return result;
  }

  /**
   * The tenant's audit chain head, to keep out of the operator's reach (same roles as
   * `verifyAudit`). Audited `audit.head` (in the control plane).
   * @throws ForbiddenError (403); RegionMismatchError (421).
   */
  async auditHead(principal: Principal, tenantId: string): Promise<ExportedHead> {
    authorize(principal, 'audit:read', tenantId);
    await this.tenant(principal, tenantId, 'audit.head');
    const head = await this.deps.stores.store(tenantId).audit.head();
    const at = new Date().toISOString();
    await this.audit(principal, {
      type: 'audit.head',
      outcome: 'success',
      tenant: tenantId,
      detail: { chain: tenantChain(tenantId), seq: head.seq },
    });
    return { chain: tenantChain(tenantId), seq: head.seq, hash: head.hash, at };
  }
}
