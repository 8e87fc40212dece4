/**
 * Which CDS services a tenant has: its pack subscriptions resolved against the catalog.
 * Stored pack versions are immutable, so compiled packs are cached by (id, version): those an
 * active tenant subscribes to for as long as they are subscribed, any other one (a replay of an
 * old record, a version unsubscribed since) until it has not been used for `idleEvictMs`
 * (dropped by the subscription watcher's look). A version is compiled here in slices (compilePackInSlices), never in
 * one block: a big pack holds the event loop 0.1-0.5 s, and the first call for a version
 * subscribed on another replica would otherwise stall every call in flight on this one.
 */
import { chooseVersion, compilePackInSlices } from '../rules/index.ts';
import type {
  CompiledPack,
  Evaluator,
  PackService,
  RulePack,
  Subscription,
} from '../rules/index.ts';
import type { ControlPlane, Tenant } from '../tenants/index.ts';
import { ServiceError } from './errors.ts';
import type { Logger } from './logger.ts';

export interface ServiceDirectoryOptions {
  /**
   * Called with each version this process loads (e.g. `evaluator.warm`, so that the evaluation
   * workers compile it ahead of the calls that need it).
   */
  warm?: (pack: CompiledPack) => void;
  /**
   * A compiled version no active tenant subscribes to is dropped once unused for this long (ms;
   * default {@link IDLE_EVICT_MS}); checked by `watchSubscriptions`' looks.
   */
  idleEvictMs?: number;
}

/** How long a compiled version nobody subscribes to stays cached after its last use (ms). */
export const IDLE_EVICT_MS = 10 * 60_000;

/** How often `watchSubscriptions` looks for newly subscribed versions (ms). */
export const SUBSCRIPTION_WATCH_MS = 5000;
/** At most this many new versions are loaded per look: a flood of changes waits its turn. */
const WATCH_MAX_PER_PASS = 2;
/** A version that failed to load in the background is not tried again for this long (ms). */
export const WATCH_RETRY_MS = 300_000;

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

/**
 * An error as the watcher logs it: its name only (its message may quote a pack row). An
 * object, as the logger's `error` serializer reads it (a bare string would log as
 * `{"type":"string"}`).
 */
function errorName(err: unknown): { type: string } {
  return { type: err instanceof Error ? err.name : 'unknown' };
}

export class ServiceDirectory {
  private readonly compiled = new Map<string, Promise<CompiledPack>>();
  /** When each cached version was last asked for (Date.now()). */
  private readonly lastUsed = new Map<string, number>();

  constructor(
    private readonly controlPlane: ControlPlane,
    private readonly opts: ServiceDirectoryOptions = {},
  ) {}

  /** The compiled pack for an exact stored version. @throws ServiceError 500 if it vanished. */
  async pack(id: string, version: string): Promise<CompiledPack> {
    const key = `${id}@${version}`;
    this.lastUsed.set(key, Date.now());
    let p = this.compiled.get(key);
    if (!p) {
      p = this.controlPlane.packs.get(id, version).then(async (stored) => {
        // The stored pack was just parsed: compiled in place, without a copy.
        const compiled = await compilePackInSlices(stored.pack);
        this.opts.warm?.(compiled);
        return compiled;
      });
      this.compiled.set(key, p);
      p.catch(() => {
        this.compiled.delete(key);
        this.lastUsed.delete(key);
      });
    }
    return p;
  }

  /**
   * Drops the compiled versions not in `subscribed` (`id@version`) and not used for the idle
   * time: a later call or replay of one compiles it again. Returns how many were dropped.
   */
  private evictIdle(subscribed: ReadonlySet<string>, now: number): number {
    const idleMs = this.opts.idleEvictMs ?? IDLE_EVICT_MS;
    let dropped = 0;
    for (const key of [...this.compiled.keys()]) {
      if (!subscribed.has(key) && now - (this.lastUsed.get(key) ?? 0) >= idleMs) {
        this.compiled.delete(key);
        this.lastUsed.delete(key);
        dropped += 1;
      }
    }
    return dropped;
  }

  /** Whether this process has loaded (or is loading) the version. */
  private isLoaded(id: string, version: string): boolean {
    return this.compiled.has(`${id}@${version}`);
  }

  /**
   * Pinned and canary versions of active tenants' subscriptions, each once: cached by the
   * repository per control-plane generation, so the watcher's look every few seconds reads the
   * generation, not every tenant (10,000 tenants' rows parsed every 5 s on the main thread).
   */
  private subscribedVersions(): Promise<readonly (readonly [string, string])[]> {
    return this.controlPlane.tenants.subscribedVersions();
  }

  /**
   * Compiles every pack version an active tenant is subscribed to (pinned and canary) here and
   * in the evaluation workers, ahead of the first calls: a worker compiling a pack when a call
   * arrives spends the call's budget on it (on a busy host the first calls after a restart came
   * back with their rules skipped). A version that fails to load is left to the first call,
   * which reports it. Returns the versions warmed.
   */
  async warmSubscribedPacks(evaluator: Pick<Evaluator, 'warm'>): Promise<string[]> {
    const warmed: string[] = [];
    for (const [id, version] of await this.subscribedVersions()) {
      const compiled = await this.pack(id, version).catch(() => undefined);
      if (compiled) {
        evaluator.warm(compiled);
        warmed.push(`${id}@${version}`);
      }
    }
    return warmed;
  }

  /**
   * Loads, in the background, the versions subscribed since this process started (on this
   * replica or another one sharing the control plane: PUT /admin/tenants/{id}/subscriptions, a
   * canary), so that their first calls find them compiled here and in the workers. Every
   * `intervalMs` it lists the subscribed versions and loads at most a couple it has not loaded
   * yet, one at a time; one look at a time. Logs `pack warmed in background` or `background
   * pack warm failed` (pack id and version, never call data; the error's name only). A version
   * that failed is not tried again for `retryMs`. Returns a function that stops it: no look
   * starts after it, and a look in flight stops at its next step (it warms and logs nothing
   * more); the function's promise resolves once that look is over (it never rejects), so
   * that a shutdown can wait for it before closing what the look reads.
   */
  watchSubscriptions(
    evaluator: Pick<Evaluator, 'warm'>,
    log: Logger,
    intervalMs = SUBSCRIPTION_WATCH_MS,
    retryMs = WATCH_RETRY_MS,
  ): () => Promise<void> {
    const failedAt = new Map<string, number>();
    /** The look in flight, if any: one at a time. */
    let running: Promise<void> | undefined;
    let stopped = false;
    /** Read afresh after each wait (a function: the compiler would keep its value narrowed). */
    const isStopped = () => stopped;
    const look = async (): Promise<void> => {
      const now = Date.now();
      const subscribed = await this.subscribedVersions();
      const dropped = this.evictIdle(new Set(subscribed.map(([id, v]) => `${id}@${v}`)), now);
      if (dropped > 0) {
        log.info({ packVersions: dropped }, 'idle pack versions dropped');
      }
      const fresh = subscribed.filter(([id, version]) => {
        const failed = failedAt.get(`${id}@${version}`);
        return !this.isLoaded(id, version) && (failed === undefined || now - failed > retryMs);
      });
      for (const [id, version] of fresh.slice(0, WATCH_MAX_PER_PASS)) {
        // Checked after every wait: stop() may have come meanwhile.
        if (isStopped()) {
          return;
        }
        const pack = `${id}@${version}`;
        // Id and version apart in log lines (an `id@1.3.0-rc.beta1` is e-mail shaped: censored).
        const named = { pack: id, packVersion: version };
        const started = performance.now();
        try {
          const compiled = await this.pack(id, version);
          if (isStopped()) {
            return;
          }
          evaluator.warm(compiled);
          failedAt.delete(pack);
          log.info(
            { ...named, ms: Math.round(performance.now() - started) },
            'pack warmed in background',
          );
        } catch (err) {
          if (isStopped()) {
            return;
          }
          failedAt.set(pack, Date.now());
          log.warn({ ...named, error: errorName(err) }, 'background pack warm failed');
        }
      }
      // Bounded: only versions still subscribed are remembered.
      if (failedAt.size > 1000) {
        failedAt.clear();
      }
    };
    const timer = setInterval(() => {
      if (running || stopped) {
        return;
      }
      running = look()
        .catch((err: unknown) => {
          if (!stopped) {
            log.warn(
              { error: errorName(err) },
              'background pack warm failed: cannot list the subscriptions',
            );
          }
        })
        .finally(() => {
          running = undefined;
        });
    }, intervalMs);
    timer.unref();
    return () => {
      stopped = true;
      clearInterval(timer);
      return running ?? Promise.resolve();
    };
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
