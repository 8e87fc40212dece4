/**
 * Canary routing of hook calls between a tenant's pinned pack version and a newer one.
 */
import { createHash } from 'node:crypto';
import type { Subscription } from './types.ts';

/** Buckets per 100 %: a percent is honoured to two decimals. */
const BUCKETS = 10_000;

/** The bucket (0..9999) of a hook instance for a pack: sha256(`pack|hookInstance`). */
export function canaryBucket(pack: string, hookInstance: string): number {
  const digest = createHash('sha256').update(`${pack}|${hookInstance}`, 'utf8').digest();
  return digest.readUInt32BE(0) % BUCKETS;
}

/**
 * The pack version a call is evaluated with: `sub.canary.version` for the calls whose bucket
 * falls under `percent` (deterministic by hookInstance, so a retried call stays on the same
 * version), else `sub.version`. Percent 0 (or not a number) never, 100 always routes to the
 * canary.
 */
export function chooseVersion(sub: Subscription, hookInstance: string): string {
  const canary = sub.canary;
  if (!canary || !Number.isFinite(canary.percent) || canary.percent <= 0) {
    return sub.version;
  }
  if (canary.percent >= 100) {
    return canary.version;
  }
  return canaryBucket(sub.pack, hookInstance) < Math.round(canary.percent * 100)
    ? canary.version
    : sub.version;
}
