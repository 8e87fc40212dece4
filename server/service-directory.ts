/**
 * Which CDS services a tenant has: its pack subscriptions resolved against the catalog.
 * Stored pack versions are immutable, so compiled packs are cached by (id, version) for the
 * life of the process.
 */
import { chooseVersion, compilePack } from '../rules/index.ts';
import type { CompiledPack, PackService, Subscription } from '../rules/index.ts';
import type { ControlPlane, Tenant } from '../tenants/index.ts';
import { ServiceError } from './errors.ts';

export interface ResolvedService {
  subscription: Subscription;
  /** The service as the pinned version defines it (what discovery lists). */
  service: PackService;
  pinned: CompiledPack;
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
   * stated share of hookInstances. A canary version without this service falls back to the
   * pinned version.
   */
  async packForCall(resolved: ResolvedService, hookInstance: string): Promise<CompiledPack> {
    const version = chooseVersion(resolved.subscription, hookInstance);
    if (version === resolved.pinned.version) {
      return resolved.pinned;
    }
    const canary = await this.pack(resolved.subscription.pack, version);
    return canary.pack.services.some((s) => s.id === resolved.service.id)
      ? canary
      : resolved.pinned;
  }
}
