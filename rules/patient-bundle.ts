/**
 * Turning a FHIR patient Bundle (e.g. a Synthea transaction Bundle) into what a hook call
 * would carry: resources with `urn:uuid:` references rewritten to `Type/id`, a minimal search
 * over them, and a whole hook request (context + prefetch) built from a service's templates.
 * Used by pack tests, `cellcds pack eval`, the spec's local FHIR server and the bench.
 */
import { isR4ResourceType } from '../fhir-profiles/index.ts';
import { renderPrefetchTemplate } from './prefetch-template.ts';
import type { PackService, PackTestRequest } from './types.ts';

/** A patient's resources, references rewritten to relative `Type/id` form. */
export interface PatientRecord {
  patientId: string;
  resources: Array<Record<string, unknown>>;
}

type Json = Record<string, unknown>;

const ID_RE = /^[A-Za-z0-9\-.]{1,64}$/;

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** Rewrites every `reference` string found in `map` (fullUrl -> `Type/id`), in place. */
function rewriteReferences(node: unknown, map: ReadonlyMap<string, string>): void {
  if (Array.isArray(node)) {
    for (const item of node) {
      rewriteReferences(item, map);
    }
    return;
  }
  if (!isObject(node)) {
    return;
  }
  for (const [key, value] of Object.entries(node)) {
    if (key === 'reference' && typeof value === 'string') {
      const target = map.get(value);
      if (target !== undefined) {
        node.reference = target;
      }
    } else {
      rewriteReferences(value, map);
    }
  }
}

/** The id a `urn:uuid:<id>` fullUrl implies. */
function idFromFullUrl(fullUrl: string): string | undefined {
  const id = fullUrl.startsWith('urn:uuid:') ? fullUrl.slice('urn:uuid:'.length) : undefined;
  return id !== undefined && ID_RE.test(id) ? id : undefined;
}

/**
 * Reads a patient Bundle (any type: transaction, collection, searchset): copies its resources
 * (the input is not modified), gives an id to a resource that only has a `urn:uuid:` fullUrl,
 * and rewrites every reference to a fullUrl of the Bundle (`urn:uuid:...` or absolute) into
 * relative `Type/id`. References that name nothing in the Bundle are left as they are.
 * @throws Error if the value is not a Bundle with exactly one Patient.
 */
export function readPatientBundle(bundle: unknown): PatientRecord {
  if (!isObject(bundle) || bundle.resourceType !== 'Bundle') {
    throw new Error('patient bundle: not a FHIR Bundle');
  }
  const entries = bundle.entry ?? [];
  if (!Array.isArray(entries)) {
    throw new Error('patient bundle: Bundle.entry is not an array');
  }
  const resources: Json[] = [];
  const fullUrls = new Map<string, string>();
  entries.forEach((entry: unknown, index) => {
    if (!isObject(entry) || !isObject(entry.resource)) {
      throw new Error(`patient bundle: entry[${index}] has no resource`);
    }
    const resource = structuredClone(entry.resource);
    const type = resource.resourceType;
    if (typeof type !== 'string' || !isR4ResourceType(type)) {
      throw new Error(`patient bundle: entry[${index}] has no valid resourceType`);
    }
    const fullUrl = typeof entry.fullUrl === 'string' ? entry.fullUrl : undefined;
    if (typeof resource.id !== 'string') {
      const implied = fullUrl === undefined ? undefined : idFromFullUrl(fullUrl);
      if (implied === undefined) {
        throw new Error(`patient bundle: entry[${index}] (${type}) has no id`);
      }
      resource.id = implied;
    }
    const relative = `${type}/${String(resource.id)}`;
    if (fullUrl !== undefined) {
      fullUrls.set(fullUrl, relative);
    }
    resources.push(resource);
  });
  const patients = resources.filter((r) => r.resourceType === 'Patient');
  const patient = patients[0];
  if (patients.length !== 1 || patient === undefined) {
    throw new Error(`patient bundle: expected exactly one Patient, found ${patients.length}`);
  }
  for (const resource of resources) {
    rewriteReferences(resource, fullUrls);
  }
  return { patientId: String(patient.id), resources };
}

/** `system|code`, `|code` (no system), `system|` (any code of system) or `code` (any system). */
function tokenMatches(token: string, codings: Json[]): boolean {
  const bar = token.indexOf('|');
  if (bar < 0) {
    return codings.some((c) => c.code === token);
  }
  const system = token.slice(0, bar);
  const code = token.slice(bar + 1);
  return codings.some((c) => {
    const systemOk = system === '' ? c.system === undefined : c.system === system;
    return systemOk && (code === '' || c.code === code);
  });
}

function codingsOf(concept: unknown): Json[] {
  return isObject(concept) && Array.isArray(concept.coding) ? concept.coding.filter(isObject) : [];
}

/** The codings the `code` search parameter looks at, per resource type. */
function searchCodings(resource: Json): Json[] {
  if (
    String(resource.resourceType).startsWith('Medication') &&
    resource.resourceType !== 'Medication'
  ) {
    // MedicationRequest/Statement/Dispense/Administration: `code` = medication as a CodeableConcept.
    return codingsOf(resource.medicationCodeableConcept);
  }
  return codingsOf(resource.code);
}

/** `status` is the resource's `status`, or for Condition/AllergyIntolerance its clinicalStatus code. */
function searchStatuses(resource: Json): string[] {
  if (typeof resource.status === 'string') {
    return [resource.status];
  }
  return codingsOf(resource.clinicalStatus).flatMap((c) =>
    typeof c.code === 'string' ? [c.code] : [],
  );
}

function referenceOf(value: unknown): string | undefined {
  return isObject(value) && typeof value.reference === 'string' ? value.reference : undefined;
}

function splitList(value: string): string[] {
  return value.split(',').filter((v) => v !== '');
}

/**
 * Resources of one type matching a FHIR search query. Supported parameters: `_id`,
 * `patient`/`subject` (matched against the record's patient), `code` (token list,
 * `system|code` or `code`), `status` (list). Other parameters are ignored.
 *
 * A parameter repeated is AND-ed; comma-separated values are OR-ed (FHIR search). `patient`
 * accepts `123` or `Patient/123`; a patient other than the record's matches nothing. For
 * Medication* requests/events `code` is the medication CodeableConcept; `status` falls back
 * to `clinicalStatus` for resources without a `status` (Condition, AllergyIntolerance).
 */
export function searchRecord(
  record: PatientRecord,
  resourceType: string,
  query: URLSearchParams,
): Array<Record<string, unknown>> {
  const patientRef = `Patient/${record.patientId}`;
  const tests: Array<(r: Json) => boolean> = [];
  for (const ids of query.getAll('_id')) {
    const wanted = splitList(ids);
    tests.push((r) => wanted.includes(String(r.id)));
  }
  for (const param of ['patient', 'subject']) {
    for (const values of query.getAll(param)) {
      const wanted = splitList(values).map((v) => (v.includes('/') ? v : `Patient/${v}`));
      if (!wanted.includes(patientRef)) {
        return [];
      }
      tests.push((r) =>
        r.resourceType === 'Patient'
          ? r.id === record.patientId
          : referenceOf(r.subject) === patientRef || referenceOf(r.patient) === patientRef,
      );
    }
  }
  for (const values of query.getAll('code')) {
    const tokens = splitList(values);
    tests.push((r) => {
      const codings = searchCodings(r);
      return tokens.some((t) => tokenMatches(t, codings));
    });
  }
  for (const values of query.getAll('status')) {
    const wanted = splitList(values);
    tests.push((r) => searchStatuses(r).some((s) => wanted.includes(s)));
  }
  return record.resources.filter(
    (r) => r.resourceType === resourceType && tests.every((test) => test(r)),
  );
}

const ORDER_HOOKS: ReadonlySet<string> = new Set(['order-sign', 'order-select']);
/** Draft order types whose subject names the patient (R4). */
const SUBJECT_TYPES: ReadonlySet<string> = new Set([
  'MedicationRequest',
  'ServiceRequest',
  'DeviceRequest',
  'CommunicationRequest',
]);

/** Copies the drafts, giving each an id (`draft-<n>`) and a subject when they have none. */
function prepareDrafts(drafts: Json[], patientRef: string): Json[] {
  return drafts.map((draft, index) => {
    const copy = structuredClone(draft);
    if (typeof copy.id !== 'string') {
      copy.id = `draft-${index + 1}`;
    }
    const type = String(copy.resourceType);
    if (SUBJECT_TYPES.has(type) && copy.subject === undefined) {
      copy.subject = { reference: patientRef };
    }
    if (type === 'NutritionOrder' && copy.patient === undefined) {
      copy.patient = { reference: patientRef };
    }
    return copy;
  });
}

function latestEncounterId(record: PatientRecord): string | undefined {
  let best: { id: string; start: string } | undefined;
  for (const r of record.resources) {
    if (r.resourceType !== 'Encounter' || typeof r.id !== 'string') {
      continue;
    }
    const start = isObject(r.period) && typeof r.period.start === 'string' ? r.period.start : '';
    // ISO 8601 instants with the same offset (Synthea writes +00:00) sort as strings.
    if (best === undefined || start > best.start) {
      best = { id: r.id, start };
    }
  }
  return best?.id;
}

function defaultUserId(record: PatientRecord): string {
  const practitioner = record.resources.find(
    (r) => r.resourceType === 'Practitioner' && typeof r.id === 'string',
  );
  return practitioner ? `Practitioner/${String(practitioner.id)}` : 'Practitioner/cellcds-test';
}

/**
 * Answers a rendered relative URL from the record: a read gives the resource or null (CDS
 * Hooks: "no data"), a search gives a searchset Bundle.
 */
function answer(record: PatientRecord, url: string): unknown {
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  const slash = path.indexOf('/');
  if (slash < 0) {
    const matches = searchRecord(record, path, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)));
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      total: matches.length,
      entry: matches.map((resource) => ({ resource, search: { mode: 'match' } })),
    };
  }
  const type = path.slice(0, slash);
  const id = decodeURIComponent(path.slice(slash + 1));
  return record.resources.find((r) => r.resourceType === type && r.id === id) ?? null;
}

/**
 * Builds a hook request for `service` from a patient record: context per the hook
 * (patientId, userId, draftOrders as a collection Bundle, selections = all drafts for
 * order-select) and prefetch by rendering each template and answering it from the record
 * (`Type/{id}` -> the resource; `Type?query` -> a searchset Bundle).
 *
 * `userId` defaults to the record's first Practitioner; `encounterId` is the record's latest
 * Encounter (by period.start) when it has one. Drafts are copied; one without an id gets
 * `draft-<n>` and one without a subject gets the patient. A template whose token has no value
 * leaves its key out of the prefetch (as a client that could not fill it would).
 * @throws PackValidationError if a service template is invalid (see renderPrefetchTemplate).
 */
export function buildRequestFromRecord(opts: {
  service: PackService;
  record: PatientRecord;
  draftOrders?: Array<Record<string, unknown>>;
  userId?: string;
}): PackTestRequest {
  const { service, record } = opts;
  const patientRef = `Patient/${record.patientId}`;
  const context: Json = {
    userId: opts.userId ?? defaultUserId(record),
    patientId: record.patientId,
  };
  const encounterId = latestEncounterId(record);
  if (encounterId !== undefined) {
    context.encounterId = encounterId;
  }
  if (ORDER_HOOKS.has(service.hook)) {
    const drafts = prepareDrafts(opts.draftOrders ?? [], patientRef);
    context.draftOrders = {
      resourceType: 'Bundle',
      type: 'collection',
      entry: drafts.map((resource) => ({ resource })),
    };
    if (service.hook === 'order-select') {
      context.selections = drafts.map((d) => `${String(d.resourceType)}/${String(d.id)}`);
    }
  }
  // fromEntries defines own properties, so a key such as `__proto__` stays plain data.
  const prefetch: Json = Object.fromEntries(
    Object.entries(service.prefetch ?? {}).flatMap(([key, template]) => {
      const url = renderPrefetchTemplate(template, context);
      return url === undefined ? [] : [[key, answer(record, url)]];
    }),
  );
  return { hook: service.hook, context, prefetch };
}
