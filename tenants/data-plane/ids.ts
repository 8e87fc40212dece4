/**
 * Identifier checks shared by the data plane. Tenant and region ids become file names,
 * schema names and AAD parts, so they are checked before any use.
 */
import { InvalidInputError } from '../errors.ts';
import { TENANT_ID_PATTERN } from '../tenant-validation.ts';

/** Region ids: lower-case letters, digits and dashes, 1..63 characters. */
export const REGION_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;

/** Record ids (invocation ids, card and suggestion uuids): no `|`, no path characters. */
export const RECORD_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

/** @throws InvalidInputError('tenant') unless `id` is a valid tenant id. */
export function assertTenantId(id: unknown): asserts id is string {
  if (typeof id !== 'string' || !TENANT_ID_PATTERN.test(id)) {
    throw new InvalidInputError(
      'tenant',
      'must be a tenant id (lower-case letters, digits, dashes)',
    );
  }
}

/** @throws InvalidInputError('region') unless `id` is a valid region id. */
export function assertRegionId(id: unknown): asserts id is string {
  if (typeof id !== 'string' || !REGION_ID_PATTERN.test(id)) {
    throw new InvalidInputError(
      'region',
      'must be a region id (lower-case letters, digits, dashes)',
    );
  }
}

/** Promise-based sleep. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
