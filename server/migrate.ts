/**
 * `cellcds migrate --tenant T --to REGION`: moves a tenant's home region and its store, run by
 * an operator on a host that holds both regions' data and keys (see docs/regions.md). Both
 * regions are opened locally from the region matrix; the serving planes of the tenant must be
 * stopped (the tenant is suspended for the whole move, so a plane that is still up refuses its
 * calls). The data-plane job is `migrateTenant` (tenants/); this file adds the policy check, the
 * suspension, the control-plane commit (`moveHome`) and the control-plane audit events. It never
 * makes a region's keyring or its first keyring binding: only the region's servers do.
 */
import path from 'node:path';
import {
  ConflictError,
  ResidencyError,
  checkMigration,
  createLocalKeyProvider,
  migrateTenant,
  openRegionStores,
  readMigrationState,
} from '../tenants/index.ts';
import type {
  ControlPlane,
  MigrationProgress,
  MigrationRegion,
  RegionStores,
  Tenant,
} from '../tenants/index.ts';
import type { Region, RegionMatrix } from './regions.ts';
import { selectRegion } from './regions.ts';

export interface RunMigrationOptions {
  controlPlane: ControlPlane;
  matrix: RegionMatrix;
  tenant: string;
  /** The target region id. */
  to: string;
  /** Checkpoint folder. Default `<target region backupDir>/migrations`. */
  stateDir?: string;
  /** Recorded in every audit event. Default `cli`. */
  actor?: string;
  onProgress?: (progress: MigrationProgress) => void | Promise<void>;
  now?: () => Date;
}

export interface RunMigrationResult {
  tenant: Tenant;
  migration: MigrationProgress;
}

/** The default checkpoint folder of migrations into `target`. */
export function defaultMigrationStateDir(target: Region): string {
  return path.join(target.backupDir, 'migrations');
}

/**
 * Opens a region's data plane as an operator command: never makes the region's keyring
 * (`create: false`: a missing file in `keyProvider.dir` is refused, naming it) nor its first
 * keyring binding (`mayBind: false`: a region no server opened yet is refused). Only the
 * region's servers do both, on the region's real keyring; a migration that did either would
 * bind the target to a keyring those servers do not hold, rewrap the tenant under it, and
 * lock them out.
 * @throws KeyUnavailableError('provider' | 'keyring_mismatch' | 'keyring_unbound') naming the
 *   region and keyring.
 */
async function openRegion(region: Region, now?: () => Date): Promise<MigrationRegion> {
  const keyProvider = await createLocalKeyProvider({
    keyDir: region.keyProvider.dir,
    region: region.id,
    create: false,
    ...(now ? { now } : {}),
  });
  const stores: RegionStores = await openRegionStores({
    region: region.id,
    ...(region.storage.kind === 'sqlite'
      ? { dataDir: region.storage.dataDir }
      : { postgresUrl: region.storage.postgresUrl }),
    keyProvider,
    mayBind: false,
    ...(now ? { now } : {}),
  });
  return { stores, keyProvider };
}

/** Opens both regions (see openRegion), or neither. */
async function openBoth(
  source: Region,
  target: Region,
  now?: () => Date,
): Promise<{ source: MigrationRegion; target: MigrationRegion }> {
  const opened = await openRegion(source, now);
  try {
    return { source: opened, target: await openRegion(target, now) };
  } catch (err) {
    await opened.stores.close().catch(() => undefined); // the open's error is the one to tell
    throw err;
  }
}

/**
 * Migrates (or resumes the migration of) `tenant` to region `to`: checks the residency policy
 * (`checkMigration`; a refusal is audited as `residency.refused` before anything moves),
 * suspends the tenant, runs the data-plane job, moves the home region inside it (`moveHome`,
 * audited `residency.home.moved`) and resumes the tenant if it was active. A failure leaves the
 * tenant suspended (fail closed) and a checkpoint: run the command again to resume.
 * Control-plane events: `migration.started` | `migration.resumed`, `migration.completed`,
 * `migration.failed`.
 * Both regions are opened first, as an operator command (see openRegion): a region whose
 * keyring file is missing from this host's `keyProvider.dir`, or that no server opened yet, is
 * refused before the tenant is suspended or anything is audited, written or checkpointed.
 * @throws NotFoundError (tenant), RegionConfigError (unknown region), ResidencyError (422),
 *   ConflictError (another migration pending; the source changed during the move),
 *   KeyUnavailableError (`provider`: no keyring file; `keyring_mismatch`: another keyring;
 *   `keyring_unbound`: a region no server bound yet), and the errors of `migrateTenant`.
 */
export async function runMigration(opts: RunMigrationOptions): Promise<RunMigrationResult> {
  const { controlPlane: cp, matrix, to } = opts;
  const actor = opts.actor ?? 'cli';
  const regions = matrix.regions;
  const tenant = await cp.tenants.get(opts.tenant);
  // An unknown target is a residency problem (audited below), not a configuration error.
  const known = regions.find((r) => r.id === to);
  const stateDir = opts.stateDir ?? (known ? defaultMigrationStateDir(known) : undefined);
  const pending = stateDir !== undefined ? readMigrationState(stateDir, tenant.id) : undefined;
  const resuming = pending !== undefined && pending.to === to && pending.phase !== 'done';
  if (pending && !resuming && pending.phase !== 'done') {
    throw new ConflictError(
      `a migration of tenant ${tenant.id} to ${pending.to} is pending; finish it first`,
    );
  }
  // Once the home moved (a crash after moveHome), the policy was checked and the move is
  // committed: finish it. Before that, the policy is checked on every run (it may have changed).
  const committed = resuming && tenant.region === to;
  const from = resuming ? pending.from : tenant.region;
  if (resuming && !committed && tenant.region !== pending.from) {
    throw new ConflictError(
      `the home of tenant ${tenant.id} is ${tenant.region}, the pending migration is from ${pending.from}`,
    );
  }
  if (!committed) {
    const problems = checkMigration(tenant, to, regions);
    if (problems.length > 0) {
      await cp.audit.record({
        type: 'residency.refused',
        outcome: 'failure',
        tenant: tenant.id,
        actor,
        detail: {
          action: 'migrate',
          region: tenant.region,
          target: to,
          reasons: [...new Set(problems.map((p) => p.reason))].join(','),
          problems: problems.length,
        },
      });
      throw new ResidencyError(problems);
    }
  }
  const sourceRegion = selectRegion(matrix, from);
  const targetRegion = selectRegion(matrix, to);
  // Both regions' keyrings and bindings are checked before anything is suspended, audited or
  // checkpointed: a region whose keyring this host does not hold, or that no server opened
  // yet, is refused with nothing changed (a resumed migration keeps its checkpoint).
  const { source, target } = await openBoth(sourceRegion, targetRegion, opts.now);
  let migrationFailed = false;
  try {
    // Resume the tenant at the end only if this migration suspended it (kept in the checkpoint).
    const resumeAfter = resuming
      ? pending.context?.resumeAfter === true
      : tenant.status === 'active';
    if (tenant.status !== 'suspended') {
      await cp.tenants.update(tenant.id, { status: 'suspended' }, { regions, actor });
    }
    await cp.audit.record({
      type: resuming ? 'migration.resumed' : 'migration.started',
      outcome: 'success',
      tenant: tenant.id,
      actor,
      detail: { from, to, ...(resuming ? { phase: pending.phase } : {}) },
    });

    let last: MigrationProgress | undefined;
    try {
      const migration = await migrateTenant({
        tenant: tenant.id,
        source,
        target,
        stateDir: stateDir ?? defaultMigrationStateDir(targetRegion),
        actor,
        context: { resumeAfter },
        ...(opts.now ? { now: opts.now } : {}),
        async commit() {
          // Idempotent: a resumed run after a crash right after moveHome finds it done.
          const current = await cp.tenants.get(tenant.id);
          if (current.region !== to) {
            await cp.tenants.moveHome(tenant.id, to, { regions, actor });
          }
        },
        async onProgress(p) {
          last = p;
          await opts.onProgress?.(p);
        },
      });
      let after = await cp.tenants.get(tenant.id);
      if (resumeAfter && after.status === 'suspended') {
        after = await cp.tenants.update(tenant.id, { status: 'active' }, { regions, actor });
      }
      await cp.audit.record({
        type: 'migration.completed',
        outcome: 'success',
        tenant: tenant.id,
        actor,
        detail: { from, to, records: migration.verifiedRecords ?? 0 },
      });
      return { tenant: after, migration };
    } catch (err) {
      await cp.audit
        .record({
          type: 'migration.failed',
          outcome: 'failure',
          tenant: tenant.id,
          actor,
          detail: {
            from,
            to,
            phase: last?.phase ?? pending?.phase ?? 'started',
            error: err instanceof Error ? err.name : 'error',
          },
        })
        .catch(() => undefined);
      throw err;
    }
  } catch (err) {
    migrationFailed = true;
    throw err;
  } finally {
    // Both closed whatever happens; a close that fails does not hide the migration's own error
    // (thrown by the try block, which a throw here would replace), nor leave the other open.
    const closed = await Promise.allSettled([source.stores.close(), target.stores.close()]);
    const failedClose = closed.find((c) => c.status === 'rejected');
    if (failedClose && !migrationFailed) {
      throw failedClose.reason;
    }
  }
}
