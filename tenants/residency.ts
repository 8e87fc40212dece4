/**
 * Residency policy: pure functions over a tenant's policy and the region matrix (passed in as
 * data, so tenants/ never imports server/). They decide where a tenant may be placed, served,
 * failed over to, backed up and migrated. Every check fails closed: an unknown region, a
 * missing policy part or an inconsistent registration means "no".
 *
 * Two lists, two purposes:
 * - `processingRegions`: regions that may be the tenant's home (normal processing; migration
 *   targets). The home region must always be one of them.
 * - `dr`: regions that may serve the tenant during a declared failover. A failover target must
 *   also be listed in the home region's `failover` list of the matrix (operator topology).
 *
 * A standby processes and stores the tenant's calls while it serves, so `dr` may name regions
 * that are not home candidates, but never one outside the jurisdictions (the matrix's labels)
 * of the processing regions: "process in the US only" with an EU standby is a contradiction,
 * refused at placement and at failover (`dr_other_jurisdiction`). To fail over into another
 * jurisdiction, the policy must allow processing there (list a region of it).
 */
import { RegionMismatchError, ResidencyError } from './errors.ts';
import type {
  RegionInfo,
  ResidencyPolicy,
  ResidencyPolicyInput,
  ResidencyProblem,
  Tenant,
} from './types.ts';

/** The parts of a tenant the policy functions read. */
export type ResidencySubject = Pick<Tenant, 'region' | 'residency' | 'failover'>;

/**
 * Fills the defaults of a registered policy: processing and backups in `home`, no DR.
 * Omitted parts follow the home region (they move with it); explicit lists do not.
 */
export function resolveResidency(
  policy: ResidencyPolicyInput | undefined,
  home: string,
): ResidencyPolicy {
  return {
    processingRegions: [...(policy?.processingRegions ?? [home])],
    backupRegions: [...(policy?.backupRegions ?? [home])],
    dr: policy?.dr ? structuredClone(policy.dr) : { mode: 'none' },
  };
}

/** The tenant's policy with every default filled in. */
export function effectiveResidency(tenant: ResidencySubject): ResidencyPolicy {
  return resolveResidency(tenant.residency, tenant.region);
}

function regionMap(matrix: readonly RegionInfo[]): Map<string, RegionInfo> {
  return new Map(matrix.map((r) => [r.id, r]));
}

const unknown = (path: string, id: string): ResidencyProblem => ({
  path,
  reason: 'unknown_region',
  message: `unknown region '${id}'`,
});

/** The jurisdiction labels of the policy's processing regions that the matrix knows. */
function processingJurisdictions(
  policy: ResidencyPolicy,
  regions: ReadonlyMap<string, RegionInfo>,
): Set<string> {
  return new Set(
    policy.processingRegions.flatMap((id) => {
      const r = regions.get(id);
      return r ? [r.jurisdiction] : [];
    }),
  );
}

/** A DR region in no jurisdiction the tenant may be processed in. */
const drOutsideProcessing = (
  path: string,
  standby: RegionInfo,
  allowed: ReadonlySet<string>,
): ResidencyProblem => ({
  path,
  reason: 'dr_other_jurisdiction',
  message: `DR region '${standby.id}' is in jurisdiction ${standby.jurisdiction}, outside the processing regions' (${allowed.size > 0 ? [...allowed].sort().join(', ') : 'none known'}): list a processing region in ${standby.jurisdiction} to allow failover there`,
});

/**
 * Checks a placement: `home` with `policy`. With a matrix, every region named must exist in it,
 * and every DR region (`regions` mode) must lie in a jurisdiction of a processing region.
 * Without one (`undefined`), only the matrix-free rules run.
 * @returns the problems, empty when the placement is allowed.
 */
export function checkPlacement(
  policy: ResidencyPolicyInput | undefined,
  home: string,
  matrix: readonly RegionInfo[] | undefined,
): ResidencyProblem[] {
  const p = resolveResidency(policy, home);
  const problems: ResidencyProblem[] = [];
  if (matrix) {
    const regions = regionMap(matrix);
    if (!regions.has(home)) {
      problems.push(unknown('region', home));
    }
    // Only the registered lists: a defaulted part is [home], already checked above.
    (policy?.processingRegions ?? []).forEach((id, i) => {
      if (!regions.has(id)) {
        problems.push(unknown(`residency.processingRegions[${i}]`, id));
      }
    });
    (policy?.backupRegions ?? []).forEach((id, i) => {
      if (!regions.has(id)) {
        problems.push(unknown(`residency.backupRegions[${i}]`, id));
      }
    });
    if (p.dr.mode === 'regions') {
      const allowed = processingJurisdictions(p, regions);
      p.dr.regions.forEach((id, i) => {
        const standby = regions.get(id);
        if (!standby) {
          problems.push(unknown(`residency.dr.regions[${i}]`, id));
        } else if (allowed.size > 0 && !allowed.has(standby.jurisdiction)) {
          problems.push(drOutsideProcessing(`residency.dr.regions[${i}]`, standby, allowed));
        }
      });
    }
  }
  if (!p.processingRegions.includes(home)) {
    problems.push({
      path: 'region',
      reason: 'home_not_processing',
      message: `home region '${home}' is not an allowed processing region`,
    });
  }
  return problems;
}

/**
 * Checks whether `target` may serve the tenant during a failover: the target exists, is not
 * the home, is in the home region's `failover` list, and the DR rule allows it (`none`: never;
 * `jurisdiction`: same jurisdiction label as the home region; `regions`: listed, and in the
 * jurisdiction of a processing region, which a policy registered before that check may not be).
 * Does not look at an already declared failover (see `checkFailoverDeclaration`).
 * @returns the problems, empty when allowed.
 */
export function checkFailover(
  tenant: ResidencySubject,
  target: string,
  matrix: readonly RegionInfo[],
): ResidencyProblem[] {
  const regions = regionMap(matrix);
  const home = regions.get(tenant.region);
  const standby = regions.get(target);
  const problems: ResidencyProblem[] = [];
  if (!home) {
    problems.push(unknown('region', tenant.region));
  }
  if (!standby) {
    problems.push(unknown('target', target));
  }
  if (!home || !standby) {
    return problems;
  }
  if (target === tenant.region) {
    return [{ path: 'target', reason: 'same_region', message: `'${target}' is the home region` }];
  }
  if (!home.failover.includes(target)) {
    problems.push({
      path: 'target',
      reason: 'not_failover_target',
      message: `region '${home.id}' does not fail over to '${target}'`,
    });
  }
  const { dr } = effectiveResidency(tenant);
  switch (dr.mode) {
    case 'none':
      problems.push({
        path: 'residency.dr',
        reason: 'dr_none',
        message: 'the residency policy allows no failover',
      });
      break;
    case 'jurisdiction':
      if (standby.jurisdiction !== home.jurisdiction) {
        problems.push({
          path: 'residency.dr',
          reason: 'dr_other_jurisdiction',
          message: `'${target}' is in jurisdiction ${standby.jurisdiction}, the home region in ${home.jurisdiction}`,
        });
      }
      break;
    case 'regions': {
      const allowed = processingJurisdictions(effectiveResidency(tenant), regions);
      if (!dr.regions.includes(target)) {
        problems.push({
          path: 'residency.dr.regions',
          reason: 'dr_not_listed',
          message: `'${target}' is not a DR region of this tenant`,
        });
      } else if (!allowed.has(standby.jurisdiction)) {
        problems.push(drOutsideProcessing('residency.dr.regions', standby, allowed));
      }
      break;
    }
  }
  return problems;
}

/**
 * `checkFailover`, plus: another failover must not be active (clear it first).
 * @returns the problems, empty when the declaration is allowed.
 */
export function checkFailoverDeclaration(
  tenant: ResidencySubject,
  target: string,
  matrix: readonly RegionInfo[],
): ResidencyProblem[] {
  const problems = checkFailover(tenant, target, matrix);
  if (tenant.failover && tenant.failover.region !== target) {
    problems.push({
      path: 'failover',
      reason: 'failover_active',
      message: `a failover to '${tenant.failover.region}' is active; clear it first`,
    });
  }
  return problems;
}

/**
 * May `region` serve (process calls for) the tenant? Yes for the home region while it is an
 * allowed processing region, and for the declared failover region while the policy and the
 * matrix still allow that failover. Everything else: no.
 */
export function mayServe(
  tenant: ResidencySubject,
  region: string,
  matrix: readonly RegionInfo[],
): boolean {
  if (region === tenant.region) {
    return effectiveResidency(tenant).processingRegions.includes(region);
  }
  return tenant.failover?.region === region && checkFailover(tenant, region, matrix).length === 0;
}

/**
 * Fails closed for the request path: throws unless `region` may serve the tenant.
 * @throws RegionMismatchError (HTTP 421).
 */
export function assertMayServe(
  tenant: ResidencySubject,
  region: string,
  matrix: readonly RegionInfo[],
): void {
  if (!mayServe(tenant, region, matrix)) {
    throw new RegionMismatchError(region);
  }
}

/** May the tenant's backups be written to `region`'s backup location? */
export function mayBackupTo(tenant: ResidencySubject, region: string): boolean {
  return effectiveResidency(tenant).backupRegions.includes(region);
}

/**
 * Checks a migration of the home region to `target`: it must be another allowed processing
 * region (and exist, when a matrix is given), and no failover may be active.
 * @returns the problems, empty when allowed.
 */
export function checkMigration(
  tenant: ResidencySubject,
  target: string,
  matrix?: readonly RegionInfo[],
): ResidencyProblem[] {
  const problems: ResidencyProblem[] = [];
  if (matrix && !matrix.some((r) => r.id === target)) {
    problems.push(unknown('target', target));
  }
  if (target === tenant.region) {
    problems.push({
      path: 'target',
      reason: 'same_region',
      message: `'${target}' is already the home region`,
    });
  } else if (!effectiveResidency(tenant).processingRegions.includes(target)) {
    problems.push({
      path: 'target',
      reason: 'not_processing_region',
      message: `'${target}' is not an allowed processing region of this tenant`,
    });
  }
  if (tenant.failover) {
    problems.push({
      path: 'failover',
      reason: 'failover_active',
      message: `a failover to '${tenant.failover.region}' is active; clear it first`,
    });
  }
  return problems;
}

/** May the tenant's home region move to `target`? (`checkMigration` without problems.) */
export function mayMigrate(
  tenant: ResidencySubject,
  target: string,
  matrix?: readonly RegionInfo[],
): boolean {
  return checkMigration(tenant, target, matrix).length === 0;
}

/**
 * Throws when `problems` is not empty.
 * @throws ResidencyError (HTTP 422).
 */
export function assertNoResidencyProblems(problems: readonly ResidencyProblem[]): void {
  if (problems.length > 0) {
    throw new ResidencyError(problems);
  }
}
