/**
 * Admin operations, shared by the admin API and the CLI (the CLI calls these same functions
 * with a local operator principal). Each one authorizes, acts, and writes an audit event.
 */
import {
  createEvaluator,
  PackCheckUnavailableError,
  PackValidationError,
  runPackTests,
  uncoveredRules,
  validatePackInWorker,
} from '../rules/index.ts';
import type {
  CompiledPack,
  Evaluator,
  EvaluatorOptions,
  PackCheckInput,
  PackCheckOptions,
  PackProblem,
  RulePack,
  Subscription,
} from '../rules/index.ts';
import {
  assertCanaryPercentAllowed,
  authorize,
  authorizeRole,
  authorizeTokenIssue,
  canaryPercentMessage,
  ConflictError,
  ForbiddenError,
  InvalidInputError,
  MAX_CANARY_PERCENT,
  MAX_SUBSCRIPTIONS,
  NotFoundError,
} from '../tenants/index.ts';
import type {
  AuditEvent,
  AuditQuery,
  ControlPlane,
  NewAdminToken,
  NewTenant,
  Principal,
  RegionInfo,
  Role,
  Tenant,
} from '../tenants/index.ts';
import { ServiceError } from './errors.ts';
import { canaryProblems } from './service-directory.ts';

/** How a principal is named in audit events and `uploadedBy` (no secret: the token id). */
export const actorOf = (p: Principal): string => `${p.role}:${p.tokenId}`;

export interface AdminServiceDeps {
  controlPlane: ControlPlane;
  /**
   * The live evaluator (hook calls). An upload's embedded tests never run on it: see
   * `uploadTests`.
   */
  evaluator: Evaluator;
  /** The region matrix: placements and failovers are checked against it (422 when forbidden). */
  regions?: readonly RegionInfo[];
  /** Limits of an upload's embedded tests (default total time: {@link UPLOAD_TEST_DEFAULTS}). */
  uploadTests?: UploadTestLimits;
  /**
   * Limits of an upload's validation worker (wall-clock time, heap, start); default
   * `PACK_CHECK_DEFAULTS` (20 s, 512 MB, 60 s). The server passes `config.packCheck`.
   */
  packCheck?: PackCheckOptions;
}

/**
 * How an upload's embedded tests run. They run on an evaluator of their own (one worker and
 * its spare, started for the upload and closed after it; one upload's tests at a time), so
 * a pack whose tests overrun never takes or replaces the live pool's workers. The tests stop
 * at the first one that runs out of budget; the number of tests is capped by the pack schema
 * (100).
 */
export interface UploadTestLimits {
  /** Time for all the tests of one upload (ms), worker start not included. */
  totalMs?: number;
  /**
   * The live call budget the tests' evaluation is held to once they pass (see
   * `runPackTests`' `liveCallBudgetMs`): default the live evaluator's (`deps.evaluator`, built
   * from CELLCDS_EVAL_BUDGET_MS), so a pack whose rules together overrun it is refused (422)
   * instead of having rules skipped on every live call.
   */
  liveCallBudgetMs?: number;
  /**
   * Budgets of the tests' evaluator. The rule budget (and heap) should stay the live ones: the
   * tests prove each rule runs within them (the rule budget defaults to the live evaluator's,
   * `deps.evaluator.budgets()`). The call budget defaults to
   * `UPLOAD_TEST_DEFAULTS.callBudgetMs`, above the live 2 s: the tests' fresh worker compiles
   * the pack inside its first call, which the live workers do ahead (warm), and on a busy host
   * that alone outlasted 2 s and refused a correct pack.
   */
  evaluator?: Pick<EvaluatorOptions, 'callBudgetMs' | 'ruleBudgetMs' | 'workerMemoryMb'>;
}

/** What an upload answers: `created` for a new version, `unchanged` for an identical re-upload. */
export interface UploadedPack {
  id: string;
  version: string;
  hash: string;
  status: 'created' | 'unchanged';
  /** E.g. a test that takes more than half the live call budget (not a reason to refuse). */
  warnings?: string[];
}

/**
 * 20 s for all the tests of one upload (the shipped pack's take about 3 s: tsx, loaded host),
 * 10 s for one test's call (its first includes compiling the pack in the tests' fresh worker).
 */
export const UPLOAD_TEST_DEFAULTS = Object.freeze({ totalMs: 20_000, callBudgetMs: 10_000 });

// The canary cap is the tenant validation's (every write path refuses above it); re-exported
// for the CLI, which refuses a bad --canary-percent before it calls the API.
export { canaryPercentMessage, MAX_CANARY_PERCENT };

const ROLES: readonly Role[] = ['platform-operator', 'tenant-admin', 'rule-author', 'auditor'];

export class AdminService {
  /** The upload tests running now: the next upload's wait for it (one evaluator at a time). */
  private uploadTestsQueue: Promise<unknown> = Promise.resolve();
  /** The upload validation running now: the next one waits for it (one worker at a time). */
  private packCheckQueue: Promise<unknown> = Promise.resolve();

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

  /**
   * Registers a tenant. `sharedIssuer: true` in the body confirms that one of its issuers may
   * become shared with another tenant (recorded in the audit detail).
   * @throws ConflictError (409: the id exists or was retired; an issuer already registered to
   *   another tenant without `sharedIssuer: true`), InvalidInputError (400), ResidencyError (422).
   */
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
      ...(body.sharedIssuer === true || tenant.retention
        ? {
            detail: {
              ...(body.sharedIssuer === true ? { sharedIssuer: true } : {}),
              // The period the customer set for its records (absent: kept forever).
              ...(tenant.retention ? { retentionDays: tenant.retention.recordDays } : {}),
            },
          }
        : {}),
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

  /**
   * Patches a tenant; `sharedIssuer: true` as in `createTenant` (a confirmation, not a field:
   * audited beside `fields`).
   * @throws ConflictError (409: an issuer already registered to another tenant without
   *   `sharedIssuer: true`), InvalidInputError (400), NotFoundError (404), ResidencyError (422).
   */
  async updateTenant(principal: Principal, id: string, patch: unknown): Promise<Tenant> {
    authorize(principal, 'tenant:update', id);
    const body = objectOf(patch, '(body)');
    const tenant = await this.deps.controlPlane.tenants.update(id, body, this.placement(principal));
    await this.audit(principal, {
      type: 'admin.tenant.update',
      outcome: 'success',
      tenant: id,
      detail: {
        fields: Object.keys(body)
          .filter((k) => k !== 'sharedIssuer')
          .sort()
          .join(','),
        ...(body.sharedIssuer === true ? { sharedIssuer: true } : {}),
        // A retention change, as it now stands: its days, or `forever` (removed).
        ...(body.retention !== undefined
          ? tenant.retention
            ? { retentionDays: tenant.retention.recordDays }
            : { retention: 'forever' }
          : {}),
      },
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
    // Before the canary check reads the catalog (each entry's versions).
    if (input.length > MAX_SUBSCRIPTIONS) {
      throw new InvalidInputError(
        'subscriptions',
        `must have at most ${MAX_SUBSCRIPTIONS} entries`,
      );
    }
    checkCanaryPercents(input);
    await this.checkCanaries(input);
    const tenant = await this.deps.controlPlane.tenants.setSubscriptions(
      id,
      input as Subscription[],
    );
    await this.audit(principal, {
      type: 'admin.tenant.subscriptions',
      outcome: 'success',
      tenant: id,
      detail: { subscriptions: subscriptionsText(tenant.subscriptions) },
    });
    return tenant;
  }

  /**
   * Sets one pack's subscription of a tenant (`{version, canary?}`: the pinned version and the
   * canary, which replace the pack's current ones; its other packs are kept). A principal with
   * `tenant:subscriptions` on the tenant (operator, its tenant-admin) may add the pack; a rule
   * author (`pack:rollout`) only moves the versions of a pack the tenant already subscribes to.
   * With `opts.existingOnly` (what `pack rollout` sends) any principal only moves versions: a
   * tenant without the pack (or that dropped it meanwhile) is 409, never given it. Audited
   * `admin.tenant.subscriptions` (with `pack`).
   * @throws ForbiddenError (403; a rule author gets it for an unknown tenant too, so that it
   *   cannot tell which tenant ids exist), NotFoundError (404 tenant), InvalidInputError (400
   *   naming the field), ServiceError 422 (a canary that cannot stand in), ConflictError (409:
   *   not subscribed with `existingOnly`, or 100 packs already).
   */
  async setSubscription(
    principal: Principal,
    id: string,
    pack: string,
    input: unknown,
    opts: { existingOnly?: boolean } = {},
  ): Promise<{ tenant: string; subscription: Subscription }> {
    const rolloutOnly = this.rolloutOnly(principal, id);
    const existingOnly = rolloutOnly || opts.existingOnly === true;
    const tenant = await this.deps.controlPlane.tenants.get(id).catch((err: unknown) => {
      if (rolloutOnly && err instanceof NotFoundError) {
        return undefined;
      }
      throw err;
    });
    const subscribed = tenant?.subscriptions.some((s) => s.pack === pack) === true;
    if (rolloutOnly && !subscribed) {
      throw new ForbiddenError(
        `a rule-author may roll out only packs a tenant subscribes to: tenant ${id} does not subscribe to ${pack} (its tenant-admin or an operator adds it)`,
        { action: 'pack:rollout' },
      );
    }
    if (existingOnly && !subscribed) {
      throw new ConflictError(
        `tenant ${id} does not subscribe to pack ${pack}: a rollout moves versions only (subscribe it with tenant subscribe / PUT without existingOnly)`,
      );
    }
    if (typeof input !== 'object' || input === null || Array.isArray(input)) {
      throw new InvalidInputError('(body)', 'must be {"version","canary"?}');
    }
    if (Object.hasOwn(input, 'pack')) {
      throw new InvalidInputError('pack', "is the URL's; leave it out of the body");
    }
    const entry = { pack, ...input };
    checkCanaryPercents([entry], () => '');
    await this.checkCanaries([entry], () => '');
    const updated = await this.deps.controlPlane.tenants.setSubscription(id, entry, {
      existingOnly,
    });
    await this.auditSubscriptions(principal, updated, pack);
    const subscription = updated.subscriptions.find((s) => s.pack === pack) as Subscription;
    return { tenant: id, subscription };
  }

  /**
   * Drops one pack from a tenant's subscriptions (`tenant:subscriptions`: operator, its
   * tenant-admin). Audited `admin.tenant.subscriptions` (with `pack`).
   * @throws ForbiddenError (403), NotFoundError (404: tenant, or a pack it does not subscribe to).
   */
  async removeSubscription(
    principal: Principal,
    id: string,
    pack: string,
  ): Promise<{ tenant: string; removed: string }> {
    try {
      authorize(principal, 'tenant:subscriptions', id);
    } catch (err) {
      // A rule author may move versions, never drop a tenant's pack: say so.
      if (err instanceof ForbiddenError && principal.role === 'rule-author') {
        throw new ForbiddenError(
          `a rule-author may not drop a tenant's pack: dropping ${pack} from tenant ${id} is for its tenant-admin or an operator`,
          { action: 'tenant:subscriptions' },
        );
      }
      throw err;
    }
    const updated = await this.deps.controlPlane.tenants.removeSubscription(id, pack);
    await this.auditSubscriptions(principal, updated, pack);
    return { tenant: id, removed: pack };
  }

  /** Who subscribes to a pack (any version): tenant, pinned version, canary. `pack:read`. */
  async packSubscriptions(
    principal: Principal,
    pack: string,
  ): Promise<Array<{ tenant: string } & Omit<Subscription, 'pack'>>> {
    authorize(principal, 'pack:read');
    if (!(await this.deps.controlPlane.packs.list()).some((p) => p.id === pack)) {
      throw new NotFoundError('pack');
    }
    const out: Array<{ tenant: string } & Omit<Subscription, 'pack'>> = [];
    for (const tenant of await this.deps.controlPlane.tenants.list()) {
      const sub = tenant.subscriptions.find((s) => s.pack === pack);
      if (sub) {
        out.push({
          tenant: tenant.id,
          version: sub.version,
          ...(sub.canary ? { canary: sub.canary } : {}),
        });
      }
    }
    return out;
  }

  /**
   * Whether `principal` may only roll out (move versions of subscribed packs) on tenant `id`:
   * false with `tenant:subscriptions` there, true with `pack:rollout` alone.
   * @throws ForbiddenError (the `tenant:subscriptions` refusal) with neither.
   */
  private rolloutOnly(principal: Principal, id: string): boolean {
    try {
      authorize(principal, 'tenant:subscriptions', id);
      return false;
    } catch (err) {
      if (!(err instanceof ForbiddenError)) {
        throw err;
      }
      try {
        authorize(principal, 'pack:rollout');
      } catch {
        throw err;
      }
      return true;
    }
  }

  private async auditSubscriptions(principal: Principal, tenant: Tenant, pack: string) {
    await this.audit(principal, {
      type: 'admin.tenant.subscriptions',
      outcome: 'success',
      tenant: tenant.id,
      detail: { subscriptions: subscriptionsText(tenant.subscriptions), pack },
    });
  }

  /**
   * Refuses a canary that cannot stand in for its pinned version: a service of both with
   * another hook or other prefetch templates (see `canaryProblems`). Checked on the pair as
   * subscribed, so a new pinned version is checked against its canary too. Entries that are
   * malformed or name a version not in the catalog are left to the subscription validation.
   * @throws ServiceError 422 `unprocessable` with `problems` naming each service.
   */
  private async checkCanaries(
    input: unknown[],
    prefix: (i: number) => string = (i) => `subscriptions[${i}].`,
  ): Promise<void> {
    // Each stored version is read at most once, however long the list.
    const cache = new Map<string, Promise<RulePack | undefined>>();
    const stored = (pack: string, version: string): Promise<RulePack | undefined> => {
      const key = `${pack}@${version}`;
      let p = cache.get(key);
      if (!p) {
        p = this.deps.controlPlane.packs.get(pack, version).then(
          (s) => s.pack,
          (err: unknown) => {
            if (err instanceof NotFoundError) {
              return undefined;
            }
            throw err;
          },
        );
        cache.set(key, p);
      }
      return p;
    };
    const problems: PackProblem[] = [];
    for (const [i, entry] of input.entries()) {
      if (!isRecord(entry) || !isRecord(entry.canary)) {
        continue;
      }
      const { pack, version } = entry;
      const canaryVersion = entry.canary.version;
      if (
        typeof pack !== 'string' ||
        typeof version !== 'string' ||
        typeof canaryVersion !== 'string' ||
        canaryVersion === version
      ) {
        continue;
      }
      const pinned = await stored(pack, version);
      const canary = await stored(pack, canaryVersion);
      if (pinned && canary) {
        for (const message of canaryProblems(pinned, canary)) {
          problems.push({ path: `${prefix(i)}canary.version`, message });
        }
      }
    }
    const first = problems[0];
    if (first) {
      const more = problems.length > 1 ? ` (and ${problems.length - 1} more)` : '';
      throw new ServiceError(422, 'unprocessable', `${first.path}: ${first.message}${more}`, {
        body: { problems },
      });
    }
  }

  /**
   * Issues a token of `role` (for `tenant`), `label`, expiring in `expiresInDays` (whole days,
   * 1 to 365, default 90; never after the issuing token's own expiry). The issuing token is
   * recorded (`issuedBy`), so revoking it revokes this one too; the bootstrap and local CLI
   * operators record none.
   */
  async issueToken(
    principal: Principal,
    input: unknown,
  ): Promise<{ id: string; token: string; role: Role; tenant?: string; expiresAt?: string }> {
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
    // The repository checks `expiresInDays` and re-reads the issuer in its write transaction
    // (tenants/admin-token-repository.ts: NewAdminTokenInput); it stores `issuedBy` only for an
    // issued token's id, not `bootstrap` or `cli`.
    const request: NewAdminToken = {
      role: role as Role,
      ...(tenant !== undefined ? { tenant } : {}),
      ...(label !== undefined ? { label } : {}),
      ...(body.expiresInDays !== undefined ? { expiresInDays: body.expiresInDays } : {}),
      issuedBy: principal.tokenId,
    };
    const issued = await this.deps.controlPlane.adminTokens.issue(request);
    await this.audit(principal, {
      type: 'admin.token.issue',
      outcome: 'success',
      ...(tenant !== undefined ? { tenant } : {}),
      detail: { tokenId: issued.id, role, expiresAt: issued.expiresAt },
    });
    return {
      id: issued.id,
      token: issued.token,
      role: role as Role,
      ...(tenant !== undefined ? { tenant } : {}),
      expiresAt: issued.expiresAt,
    };
  }

  /**
   * Tokens the principal may see (a tenant-admin: its own tenant's), with who issued each
   * (`issuedBy`), when it expires (`expiresAt`) and when it last authenticated (`lastUsedAt`,
   * to within 5 minutes; absent: no use recorded, i.e. never used or not since uses were
   * recorded). Never hashes.
   *
   * With `unusedForDays` (whole days, 1 to 3650, as a number or the query string's digits):
   * only the stale tokens at `now`: live (not revoked, not expired) and neither used nor issued
   * in the last that many days.
   * @throws InvalidInputError (`unusedForDays`).
   */
  async listTokens(
    principal: Principal,
    filter: { unusedForDays?: unknown } = {},
    now: Date = new Date(),
  ): Promise<unknown[]> {
    authorize(principal, 'token:list', principal.tenant);
    const days = filter.unusedForDays === undefined ? undefined : unusedDays(filter.unusedForDays);
    const all = await this.deps.controlPlane.adminTokens.list();
    const seen =
      principal.tenant === undefined ? all : all.filter((t) => t.tenant === principal.tenant);
    if (days === undefined) {
      return seen;
    }
    const at = now.toISOString();
    const cutoff = new Date(now.getTime() - days * DAY_MS).toISOString();
    // ISO instants of one format compare as strings (as the repository compares them).
    return seen.filter(
      (t) =>
        t.revokedAt === undefined &&
        (t.expiresAt === undefined || t.expiresAt > at) &&
        (t.lastUsedAt ?? t.createdAt) < cutoff,
    );
  }

  /**
   * Revokes a token, and with it every token it issued, transitively (one transaction). A
   * tenant-admin may revoke only its tenant's auditor tokens and its own token. Audited: one
   * event for the token (`cascaded`: how many went with it), one per token revoked with it
   * (`cascadeOf`, under that token's tenant). Returns its id and tenant (for the log line).
   */
  async revokeToken(principal: Principal, id: string): Promise<{ id: string; tenant?: string }> {
    const tokens = this.deps.controlPlane.adminTokens;
    // A role that revokes nothing is refused whatever the id (403 for known and unknown alike).
    authorizeRole(principal, 'token:revoke');
    const info = (await tokens.list()).find((t) => t.id === id);
    if (!info) {
      throw new NotFoundError('token');
    }
    try {
      authorize(principal, 'token:revoke', info.tenant, { tokenId: id, role: info.role });
    } catch (err) {
      // Another tenant's token answers like an unknown one (404): a tenant-scoped caller cannot
      // learn that an id exists. Still a refusal: audited as `admin.forbidden`.
      if (
        err instanceof ForbiddenError &&
        principal.tenant !== undefined &&
        info.tenant !== principal.tenant
      ) {
        throw new ForbiddenError(err.message, {
          hiddenAs: 'token',
          ...(err.action !== undefined ? { action: err.action } : {}),
        });
      }
      throw err;
    }
    // The descendants revoked with it, as the repository's transaction found them.
    const cascaded = await tokens.revoke(id);
    await this.audit(principal, {
      type: 'admin.token.revoke',
      outcome: 'success',
      ...(info.tenant !== undefined ? { tenant: info.tenant } : {}),
      detail: { tokenId: id, ...(cascaded.length > 0 ? { cascaded: cascaded.length } : {}) },
    });
    for (const t of cascaded) {
      await this.audit(principal, {
        type: 'admin.token.revoke',
        outcome: 'success',
        ...(t.tenant !== undefined ? { tenant: t.tenant } : {}),
        detail: {
          tokenId: t.id,
          cascadeOf: id,
          ...(t.issuedBy !== undefined ? { issuedBy: t.issuedBy } : {}),
        },
      });
    }
    return { id, ...(info.tenant !== undefined ? { tenant: info.tenant } : {}) };
  }

  /**
   * Validates (schema, FHIRPath, embedded tests) and stores a pack version. Validation and
   * compilation run in a one-off worker thread under `packCheck` limits (this thread's event
   * loop, which serves the hook calls, stays free), one upload at a time; the tests then run on
   * an evaluator of their own, under {@link UploadTestLimits}.
   * @returns `created` for a new version, `unchanged` for an identical re-upload.
   * @throws PackValidationError (422; a failed or not-run test is a problem; a PackLimitError
   *   when validation overran its time or heap limit), ConflictError (409) for different
   *   content under a stored version, ServiceError 503 if the validation worker or the tests'
   *   evaluator cannot start.
   */
  uploadPack(principal: Principal, raw: unknown): Promise<UploadedPack> {
    return this.upload(principal, { raw });
  }

  /**
   * {@link uploadPack} for the pack's text as uploaded (JSON or YAML): the text is parsed in
   * the validation worker too (a syntax error is a 422 problem at `(document)`).
   */
  uploadPackText(
    principal: Principal,
    text: string,
    format: 'json' | 'yaml',
    beforeStore?: () => Promise<void>,
  ): Promise<UploadedPack> {
    return this.upload(principal, { text, format }, beforeStore);
  }

  /**
   * Validates, tests and stores a pack. `beforeStore` runs once it is validated and tested, right
   * before it is stored (the admin API checks the uploader's token again there); if it throws,
   * nothing is stored.
   */
  private async upload(
    principal: Principal,
    input: PackCheckInput,
    beforeStore?: () => Promise<void>,
  ): Promise<UploadedPack> {
    authorize(principal, 'pack:upload');
    let compiled;
    let warnings: string[];
    try {
      compiled = await this.checkPack(input);
      warnings = await this.runUploadTests(compiled);
    } catch (err) {
      if (err instanceof PackValidationError) {
        await this.audit(principal, {
          type: 'admin.pack.upload',
          outcome: 'failure',
          detail: { problems: err.total },
        });
      }
      throw err;
    }
    await beforeStore?.();
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
    // The tests ran on an evaluator of their own: compile the pack ahead in the live workers,
    // so that its first hook calls do not pay for it out of their budget.
    this.deps.evaluator.warm(compiled);
    return {
      id: compiled.id,
      version: compiled.version,
      hash: compiled.hash,
      status,
      ...(warnings.length > 0 ? { warnings } : {}),
    };
  }

  /**
   * Validates and compiles an uploaded pack in a worker thread of its own (see
   * `validatePackInWorker`), one upload at a time: the same answer as `validatePack` without
   * tests, or a PackLimitError naming the limit it overran.
   * @throws PackValidationError (422); ServiceError 503 if the worker cannot start.
   */
  private checkPack(input: PackCheckInput): Promise<CompiledPack> {
    const limits = this.deps.packCheck ?? {};
    const run = this.packCheckQueue.then(() =>
      validatePackInWorker(input, limits).catch((err: unknown) => {
        if (err instanceof PackCheckUnavailableError) {
          throw new ServiceError(
            503,
            'unavailable',
            'the pack cannot be validated now; try again',
            {
              detail: err.message,
              cause: err,
            },
          );
        }
        throw err;
      }),
    );
    this.packCheckQueue = run.catch(() => undefined);
    return run;
  }

  /**
   * Runs a validated pack's embedded tests under {@link UploadTestLimits}, one upload at a time,
   * then holds each test's evaluation to the live call budget.
   * @returns warnings (`tests[3]: ...`), e.g. a test over half the live call budget.
   * @throws PackValidationError listing each failed or not-run test (`tests[3]: ...`), or the
   *   first test over the live call budget; ServiceError 503 if the tests' evaluator cannot start.
   */
  private runUploadTests(compiled: CompiledPack): Promise<string[]> {
    if ((compiled.pack.tests?.length ?? 0) === 0) {
      return this.testlessPack(compiled);
    }
    const run = this.uploadTestsQueue.then(() => this.runUploadTestsNow(compiled));
    this.uploadTestsQueue = run.catch(() => undefined);
    return run;
  }

  /**
   * A pack without tests (a PlanDefinition carries none) shows no rule firing: refused while
   * test coverage is required (`packCheck.requireTestCoverage`, default true). Nothing is
   * evaluated.
   * @returns no warnings. @throws PackValidationError naming each rule.
   */
  private testlessPack(compiled: CompiledPack): Promise<string[]> {
    if (this.deps.packCheck?.requireTestCoverage === false) {
      return Promise.resolve([]);
    }
    const uncovered = uncoveredRules(compiled, []);
    return uncovered.length > 0
      ? Promise.reject(new PackValidationError(uncovered))
      : Promise.resolve([]);
  }

  private async runUploadTestsNow(compiled: CompiledPack): Promise<string[]> {
    const limits = this.deps.uploadTests ?? {};
    const live = this.deps.evaluator.budgets();
    const evaluator = createEvaluator({
      callBudgetMs: UPLOAD_TEST_DEFAULTS.callBudgetMs,
      ruleBudgetMs: live.ruleBudgetMs,
      ...limits.evaluator,
      workers: 1,
      inlineSliceMs: 0,
    });
    let problems: PackProblem[];
    let warnings: string[];
    try {
      try {
        await evaluator.ready();
      } catch (err) {
        throw new ServiceError(503, 'unavailable', 'the pack tests cannot run now; try again', {
          detail: 'upload test evaluator did not start',
          cause: err,
        });
      }
      let uncovered: PackProblem[] = [];
      const results = await runPackTests(compiled, evaluator, {
        stopOnBudget: true,
        totalMs: limits.totalMs ?? UPLOAD_TEST_DEFAULTS.totalMs,
        liveCallBudgetMs: limits.liveCallBudgetMs ?? live.callBudgetMs,
        // Each rule must fire in a test: a version cannot switch a rule off unnoticed.
        ...(this.deps.packCheck?.requireTestCoverage !== false
          ? { onUncovered: (u: PackProblem[]) => (uncovered = u) }
          : {}),
      });
      problems = results.flatMap((r, i) =>
        r.failures.map((message) => ({ path: `tests[${i}]`, message })),
      );
      problems.push(...uncovered);
      warnings = results.flatMap((r, i) => (r.warnings ?? []).map((w) => `tests[${i}]: ${w}`));
    } finally {
      await evaluator.close();
    }
    if (problems.length > 0) {
      throw new PackValidationError(problems);
    }
    return warnings;
  }

  async listPacks(principal: Principal): Promise<unknown[]> {
    authorize(principal, 'pack:read');
    return this.deps.controlPlane.packs.list();
  }

  async getPack(principal: Principal, id: string, version: string): Promise<unknown> {
    authorize(principal, 'pack:read');
    return this.deps.controlPlane.packs.get(id, version);
  }

  /**
   * Control-plane audit events, by time (`from` inclusive, `to` exclusive), tenant, type and
   * request id: `requestId` keeps the events whose detail names that request (a refused call's
   * or admin access's `X-Request-Id`). A tenant-scoped principal must name its own tenant, so
   * it sees only its tenant's events, whatever else it filters by.
   * @throws ForbiddenError (403); InvalidInputError (400, naming the field) for a value that is
   *   not an instant, a tenant id, an event type or one request id.
   */
  async listAudit(
    principal: Principal,
    query: Partial<Record<'from' | 'to' | 'tenant' | 'type' | 'requestId', unknown>>,
  ): Promise<unknown[]> {
    authorize(principal, 'audit:read', typeof query.tenant === 'string' ? query.tenant : undefined);
    // As the query string gave them: the repository refuses anything but one value each (a
    // repeated parameter is a list), 400 naming the field.
    return this.deps.controlPlane.audit.list(query as AuditQuery);
  }
}

const DAY_MS = 24 * 60 * 60 * 1000;
/** The longest `unusedForDays` a token listing takes (ten years). */
const MAX_UNUSED_DAYS = 3650;

/** `unusedForDays` of a token listing: a whole number of days (or its digits), 1 to 3650. */
function unusedDays(value: unknown): number {
  const days = typeof value === 'string' && /^[0-9]{1,4}$/.test(value) ? Number(value) : value;
  if (typeof days !== 'number' || !Number.isInteger(days) || days < 1 || days > MAX_UNUSED_DAYS) {
    throw new InvalidInputError(
      'unusedForDays',
      `must be a whole number of days from 1 to ${String(MAX_UNUSED_DAYS)}`,
    );
  }
  return days;
}

/**
 * Refuses a canary share over {@link MAX_CANARY_PERCENT} (a number; anything else is left to the
 * subscription validation): 400 naming the field, pointing to pinning the version instead.
 * @throws InvalidInputError (`subscriptions[0].canary.percent`, or `canary.percent`).
 */
function checkCanaryPercents(
  input: unknown[],
  prefix: (i: number) => string = (i) => `subscriptions[${i}].`,
): void {
  for (const [i, entry] of input.entries()) {
    assertCanaryPercentAllowed(
      isRecord(entry) ? entry.canary : undefined,
      `${prefix(i)}canary.percent`,
    );
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function objectOf(value: unknown, field: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new InvalidInputError(field, 'must be a JSON object');
  }
  return value as Record<string, unknown>;
}

/** Subscriptions as an audit event carries them: `pack@version[+canary:version:percent%],...`. */
function subscriptionsText(subscriptions: readonly Subscription[]): string {
  return subscriptions
    .map(
      (s) =>
        `${s.pack}@${s.version}${s.canary ? `+canary:${s.canary.version}:${s.canary.percent}%` : ''}`,
    )
    .join(',');
}
