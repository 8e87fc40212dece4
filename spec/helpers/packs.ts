/**
 * Small packs for server specs: fast to validate, each rule easy to trigger from a request.
 */

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';

/** A pack with one order-sign and one patient-view service. */
export function tinyPack(
  id = 'tiny',
  version = '1.0.0',
  summary = 'Warfarin with an NSAID draft',
): Record<string, unknown> {
  return {
    id,
    version,
    title: `Tiny pack ${id}`,
    publisher: 'cellcds specs',
    description: 'A small pack for server specs.',
    services: [
      {
        id: `${id}-order-sign`,
        hook: 'order-sign',
        title: 'Tiny order-sign',
        description: 'Fires on an NSAID draft when warfarin is active.',
        prefetch: { meds: 'MedicationRequest?patient={{context.patientId}}&status=active' },
      },
      {
        id: `${id}-patient-view`,
        hook: 'patient-view',
        title: 'Tiny patient-view',
        description: 'Says hello.',
        prefetch: { patient: 'Patient/{{context.patientId}}' },
      },
    ],
    valueSets: {
      nsaids: {
        codes: [
          { system: RXNORM, code: '310965' },
          { system: RXNORM, code: '834022' },
        ],
      },
      warfarin: { codes: [{ system: RXNORM, code: '855332' }] },
    },
    rules: [
      {
        id: 'warfarin-nsaid',
        service: `${id}-order-sign`,
        when: "%draftOrders.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).coding.where(inValueSet('nsaids')).exists() and %prefetch.meds.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).coding.where(inValueSet('warfarin')).exists()",
        card: {
          summary,
          detail: 'Consider **acetaminophen** instead.',
          indicator: 'warning',
          source: { label: 'cellcds specs', url: 'https://example.org/specs' },
          overrideReasons: [
            {
              system: 'http://example.org/override',
              code: 'benefit',
              display: 'Benefit outweighs risk',
            },
          ],
          suggestions: [
            {
              label: 'Cancel the NSAID order',
              actions: [
                {
                  type: 'delete',
                  description: 'Remove the draft NSAID',
                  resourceId: 'MedicationRequest/draft-1',
                },
              ],
            },
          ],
        },
      },
      {
        id: 'hello',
        service: `${id}-patient-view`,
        when: '%patient.exists()',
        card: {
          summary: 'Hello from the tiny pack',
          indicator: 'info',
          source: { label: 'cellcds specs' },
        },
      },
    ],
  };
}

/** An order-sign request that fires `warfarin-nsaid` (prefetch sent inline, no FHIR server). */
export function warfarinNsaidRequest(hookInstance?: string): Record<string, unknown> {
  return {
    hook: 'order-sign',
    hookInstance: hookInstance ?? crypto.randomUUID(),
    context: {
      userId: 'Practitioner/example',
      patientId: 'pat-1',
      draftOrders: {
        resourceType: 'Bundle',
        type: 'collection',
        entry: [
          {
            resource: {
              resourceType: 'MedicationRequest',
              id: 'draft-1',
              status: 'draft',
              intent: 'order',
              subject: { reference: 'Patient/pat-1' },
              medicationCodeableConcept: {
                coding: [
                  { system: RXNORM, code: '310965', display: 'Ibuprofen 200 MG Oral Tablet' },
                ],
              },
            },
          },
        ],
      },
    },
    prefetch: {
      meds: {
        resourceType: 'Bundle',
        type: 'searchset',
        entry: [
          {
            resource: {
              resourceType: 'MedicationRequest',
              id: 'warf-1',
              status: 'active',
              intent: 'order',
              subject: { reference: 'Patient/pat-1' },
              medicationCodeableConcept: {
                coding: [
                  { system: RXNORM, code: '855332', display: 'Warfarin Sodium 5 MG Oral Tablet' },
                ],
              },
            },
          },
        ],
      },
    },
  };
}

/** A patient-view request with the patient sent inline. */
export function patientViewRequest(patientName = 'Planted Patient'): Record<string, unknown> {
  return {
    hook: 'patient-view',
    hookInstance: crypto.randomUUID(),
    context: { userId: 'Practitioner/example', patientId: 'pat-1' },
    prefetch: {
      patient: { resourceType: 'Patient', id: 'pat-1', name: [{ text: patientName }] },
    },
  };
}

/** The part of a CDS Hooks request a pack test keeps (no hookInstance: the test picks one). */
function testRequest(req: Record<string, unknown>): Record<string, unknown> {
  const { hookInstance: _ignored, ...rest } = req;
  return rest;
}

/**
 * {@link tinyPack} with tests in which each of its rules fires (`warfarin-nsaid` on the
 * order-sign request, `hello` on patient-view), plus a negative control: a pack that passes
 * the test coverage check (CELLCDS_PACK_TEST_COVERAGE=required).
 */
export function coveredTinyPack(id = 'tiny', version = '1.0.0'): Record<string, unknown> {
  return {
    ...tinyPack(id, version),
    tests: [
      {
        name: 'warfarin patient gets an NSAID',
        service: `${id}-order-sign`,
        now: '2021-03-01T12:00:00Z',
        request: testRequest(warfarinNsaidRequest()),
        expect: { fire: ['warfarin-nsaid'] },
      },
      {
        name: 'no warfarin, no card',
        service: `${id}-order-sign`,
        now: '2021-03-01T12:00:00Z',
        request: { ...testRequest(warfarinNsaidRequest()), prefetch: { meds: null } },
        expect: { notFire: ['warfarin-nsaid'] },
      },
      {
        name: 'patient view says hello',
        service: `${id}-patient-view`,
        now: '2021-03-01T12:00:00Z',
        request: testRequest(patientViewRequest()),
        expect: { fire: ['hello'] },
      },
    ],
  };
}
