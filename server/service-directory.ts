/**
 * Which CDS services a tenant has: its pack subscriptions resolved against the catalog.
 * Stored pack versions are immutable, so compiled packs are cached by (id, version) for the
 * life of the process.
 */
import { chooseVersion, compilePack } from '../rules/index.ts';
import type {
  CompiledPack,
  Evaluator,
  PackService,
  RulePack,
  Subscription,
} from '../rules/index.ts';
import type { ControlPlane, Tenant } from '../tenants/index.ts';
import { ServiceError } from './errors.ts';

export interface ResolvedService {
  subscription: Subscription;
  /** The service as the pinned version defines it (what discovery lists). */
  service: PackService;
  pinned: CompiledPack;
}

/**
 * How `canary`'s service differs from `pinned`'s of the same id in a way that matters to a
 * call, or undefined if it may stand in for it. A call is parsed for the pinned service's hook
 * and its prefetch is resolved with the pinned service's templates (before the version is
 * chosen), so a canary serving another hook, or reading other prefetch keys or templates,
 * would see a request it was not written for (e.g. its rules reading a key never fetched
 * silently never fire).
 */
export function serviceMismatch(pinned: PackService, canary: PackService): string | undefined {
  if (canary.hook !== pinned.hook) {
    return `hook ${canary.hook}, not ${pinned.hook}`;
  }
  const want = pinned.prefetch ?? {};
  const got = canary.prefetch ?? {};
  for (const key of Object.keys(want)) {
    if (!Object.hasOwn(got, key)) {
      return `no prefetch '${key}'`;
    }
    if (got[key] !== want[key]) {
      return `another template for prefetch '${key}'`;
    }
  }
  const extra = Object.keys(got).find((key) => !Object.hasOwn(want, key));
  return extra === undefined ? undefined : `one more prefetch '${extra}'`;
}

/**
 * Why `canary` cannot be the canary of `pinned` (two versions of one pack): one text per
 * service of `pinned` that `canary` serves differently (see {@link serviceMismatch}). Services
 * the canary lacks are not listed: their calls stay on the pinned version.
 */
export function canaryProblems(pinned: RulePack, canary: RulePack): string[] {
  const out: string[] = [];
  for (const service of pinned.services) {
    const other = canary.services.find((s) => s.id === service.id);
    const why = other === undefined ? undefined : serviceMismatch(service, other);
    if (why !== undefined) {
      out.push(
        `service '${service.id}' of ${canary.id}@${canary.version} differs from ${pinned.id}@${pinned.version}: ${why} (a canary must keep each service's hook and prefetch templates)`,
      );
    }
  }
  return out;
}

export class ServiceDirectory {
  private readonly compiled = new Map<string, Promise<CompiledPack>>();

  constructor(private readonly controlPlane: ControlPlane) {}

  /** The compiled pack for an exact stored version. @throws ServiceError 500 if it vanished. */
  async pack(id: string, version: string): Promise<CompiledPack> {
    const key = `${id}@${version}`;
    let p = this.compiled.get(key);
    if (!p) {
      p = this.controlPlane.packs.get(id, version).then((stored) => compilePack(stored.pack));
      this.compiled.set(key, p);
      p.catch(() => this.compiled.delete(key));
    }
    return p;
  }

  /**
   * Compiles every pack version an active tenant is subscribed to (pinned and canary) here and
   * in the evaluation workers, ahead of the first calls: a worker compiling a pack when a call
   * arrives spends the call's budget on it (on a busy host the first calls after a restart came
   * back with their rules skipped). A version that fails to load is left to the first call,
   * which reports it. Returns the versions warmed.
   */
  async warmSubscribedPacks(evaluator: Pick<Evaluator, 'warm'>): Promise<string[]> {
    const wanted = new Set<string>();
    for (const tenant of await this.controlPlane.tenants.list()) {
      if (tenant.status !== 'active') {
        continue;
      }
      for (const s of tenant.subscriptions) {
        wanted.add(JSON.stringify([s.pack, s.version]));
        if (s.canary) {
          wanted.add(JSON.stringify([s.pack, s.canary.version]));
        }
      }
    }
    const warmed: string[] = [];
    for (const key of wanted) {
      const [id = '', version = ''] = JSON.parse(key) as string[];
      const compiled = await this.pack(id, version).catch(() => undefined);
      if (compiled) {
        evaluator.warm(compiled);
        warmed.push(`${id}@${version}`);
      }
    }
    return warmed;
  }

  /** All services of a tenant's subscriptions, by service id (pinned versions). */
  async services(tenant: Tenant): Promise<Map<string, ResolvedService>> {
    const out = new Map<string, ResolvedService>();
    for (const subscription of tenant.subscriptions) {
      const pinned = await this.pack(subscription.pack, subscription.version);
      for (const service of pinned.pack.services) {
        if (!out.has(service.id)) {
          out.set(service.id, { subscription, service, pinned });
        }
      }
    }
    return out;
  }

  /** The tenant's service `id`. @throws ServiceError 404 if the tenant has no such service. */
  async service(tenant: Tenant, id: string): Promise<ResolvedService> {
    const found = (await this.services(tenant)).get(id);
    if (!found) {
      throw new ServiceError(404, 'not_found', 'no such CDS service');
    }
    return found;
  }

  /**
   * The pack version this hook call is evaluated with: the pinned one, or the canary for a
   * stated share of hookInstances. A canary version without this service, or whose service
   * has another hook or other prefetch templates (see {@link serviceMismatch}; refused when
   * subscribing, so only a subscription stored before that check gets here), falls back to
   * the pinned version.
   */
  async packForCall(resolved: ResolvedService, hookInstance: string): Promise<CompiledPack> {
    const version = chooseVersion(resolved.subscription, hookInstance);
    if (version === resolved.pinned.version) {
      return resolved.pinned;
    }
    const canary = await this.pack(resolved.subscription.pack, version);
    const service = canary.pack.services.find((s) => s.id === resolved.service.id);
    return service !== undefined && serviceMismatch(resolved.service, service) === undefined
      ? canary
      : resolved.pinned;
  }
}
