/**
 * Discovery (`GET /cds-services`): one service entry as CDS Hooks 2.0 lists it.
 */
import type { PackService } from '../rules/index.ts';
import { stripEmpty } from './finalize-cards.ts';

/**
 * The discovery JSON of one service: `hook`, `title`, `description`, `id`, `prefetch`,
 * `usageRequirements`, with null/empty fields left out (no `"prefetch": {}`). Only these
 * fields are copied, so internal pack fields never leak into discovery.
 */
export function discoveryEntry(service: PackService): Record<string, unknown> {
  return stripEmpty({
    hook: service.hook,
    title: service.title,
    description: service.description,
    id: service.id,
    prefetch:
      service.prefetch === undefined
        ? undefined
        : Object.fromEntries(Object.entries(service.prefetch)),
    usageRequirements: service.usageRequirements,
  });
}
