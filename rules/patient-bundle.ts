/**
 * Turning a FHIR patient Bundle (e.g. a Synthea transaction Bundle) into what a hook call
 * would carry: resources with `urn:uuid:` references rewritten to `Type/id`, a minimal search
 * over them, and a whole hook request (context + prefetch) built from a service's templates.
 * Used by pack tests, `cellcds pack eval`, the spec's local FHIR server and the bench.
 */
import type { PackService, PackTestRequest } from './types.ts';

/** A patient's resources, references rewritten to relative `Type/id` form. */
export interface PatientRecord {
  patientId: string;
  resources: Array<Record<string, unknown>>;
}

/** @throws Error if the value is not a Bundle with exactly one Patient. */
export function readPatientBundle(_bundle: unknown): PatientRecord {
  throw new Error('not implemented');
}

/**
 * Resources of one type matching a FHIR search query. Supported parameters: `_id`,
 * `patient`/`subject` (matched against the record's patient), `code` (token list,
 * `system|code` or `code`), `status` (list). Other parameters are ignored.
 */
export function searchRecord(
  _record: PatientRecord,
  _resourceType: string,
  _query: URLSearchParams,
): Array<Record<string, unknown>> {
  throw new Error('not implemented');
}

/**
 * Builds a hook request for `service` from a patient record: context per the hook
 * (patientId, userId, draftOrders as a collection Bundle, selections = all drafts for
 * order-select) and prefetch by rendering each template and answering it from the record
 * (`Type/{id}` -> the resource; `Type?query` -> a searchset Bundle).
 */
export function buildRequestFromRecord(_opts: {
  service: PackService;
  record: PatientRecord;
  draftOrders?: Array<Record<string, unknown>>;
  userId?: string;
}): PackTestRequest {
  throw new Error('not implemented');
}
