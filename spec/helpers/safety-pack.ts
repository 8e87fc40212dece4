/**
 * A small order-sign pack for the "no safety card lost silently" specs: a critical
 * warfarin + NSAID rule whose summary interpolates the NSAID draft's display text and which
 * suggests acetaminophen instead, a warning rule that fails (a singleton error) whenever the
 * patient has more than one active prescription, and an info rule that always fires.
 */
import type { EvaluationInput, PackRule, RulePack } from '../../rules/index.ts';

const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
export const SAFETY_SERVICE = 'safety-order-sign';

/** The NSAID draft's display text, as the summary reads it. */
const DRAFT_NAME =
  "%draftOrders.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).where(coding.where(inValueSet('nsaids')).exists()).select(text | coding.display).first()";

export const WARFARIN_NSAID: PackRule = {
  id: 'warfarin-nsaid',
  service: SAFETY_SERVICE,
  title: 'Warfarin with an NSAID',
  when: "%draftOrders.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).coding.where(inValueSet('nsaids')).exists() and %prefetch.meds.entry.resource.ofType(MedicationRequest).medication.ofType(CodeableConcept).coding.where(inValueSet('warfarin')).exists()",
  card: {
    summary: `Warfarin + {{ ${DRAFT_NAME} }}: increased risk of bleeding`,
    detail: 'Consider **acetaminophen** instead.',
    indicator: 'critical',
    source: { label: 'cellcds specs' },
    suggestions: [
      {
        label: 'Replace with acetaminophen',
        isRecommended: true,
        actions: [
          {
            type: 'delete',
            description: 'Remove the NSAID draft',
            resourceId: 'MedicationRequest/draft-1',
          },
          {
            type: 'create',
            description: 'Order acetaminophen',
            resource: {
              resourceType: 'MedicationRequest',
              status: 'draft',
              intent: 'order',
              subject: { reference: 'Patient/{{ %context.patientId }}' },
              medicationCodeableConcept: {
                coding: [{ system: RXNORM, code: '313782', display: 'Acetaminophen 325 MG' }],
              },
            },
          },
        ],
      },
    ],
  },
};

/** Fails with a singleton error when the patient has more than one active prescription. */
export const RECENT_MEDS: PackRule = {
  id: 'recent-meds',
  service: SAFETY_SERVICE,
  title: 'Recently prescribed medications',
  when: '%prefetch.meds.entry.resource.ofType(MedicationRequest).authoredOn > @2000-01-01',
  card: {
    summary: 'Recent prescriptions',
    indicator: 'warning',
    source: { label: 'cellcds specs' },
  },
};

export const ALWAYS: PackRule = {
  id: 'always',
  service: SAFETY_SERVICE,
  when: 'true',
  card: { summary: 'Order checks ran', indicator: 'info', source: { label: 'cellcds specs' } },
};

/** The pack; with `id`, its service is `<id>-order-sign` (a second pack for the same tenant). */
export function safetyPack(rules: PackRule[] = [WARFARIN_NSAID, ALWAYS], id = 'safety'): RulePack {
  const service = id === 'safety' ? SAFETY_SERVICE : `${id}-order-sign`;
  return {
    id,
    version: '1.0.0',
    title: 'Safety pack',
    publisher: 'cellcds specs',
    description: 'Safety cards that must not be lost.',
    services: [
      {
        id: service,
        hook: 'order-sign',
        description: 'Order checks.',
        prefetch: { meds: 'MedicationRequest?patient={{context.patientId}}&status=active' },
      },
    ],
    valueSets: {
      nsaids: { codes: [{ system: RXNORM, code: '310965' }] },
      warfarin: { codes: [{ system: RXNORM, code: '855332' }] },
    },
    rules: rules.map((r) => ({ ...r, service })),
  };
}

function medication(id: string, code: string, display: string, authoredOn: string): object {
  return {
    resourceType: 'MedicationRequest',
    id,
    status: 'active',
    intent: 'order',
    subject: { reference: 'Patient/pat-1' },
    authoredOn,
    medicationCodeableConcept: { coding: [{ system: RXNORM, code, display }] },
  };
}

/**
 * An order-sign request: an ibuprofen draft whose display is `draftDisplay`, on a patient
 * whose active prescriptions are warfarin (and, with `secondMed`, a second one).
 */
export function safetyRequest(
  draftDisplay = 'Ibuprofen 200 MG Oral Tablet',
  secondMed = false,
): Pick<EvaluationInput, 'hook' | 'hookInstance' | 'context' | 'prefetch'> {
  const meds = [medication('warf-1', '855332', 'Warfarin Sodium 5 MG Oral Tablet', '2020-01-01')];
  if (secondMed) {
    meds.push(medication('aml-1', '197361', 'Amlodipine 5 MG Oral Tablet', '2020-02-01'));
  }
  return {
    hook: 'order-sign',
    hookInstance: 'b2a0a54e-6a8a-4c0e-8a57-1f0d7f3e2c11',
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
                text: draftDisplay,
                coding: [{ system: RXNORM, code: '310965', display: draftDisplay }],
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
        entry: meds.map((resource) => ({ resource })),
      },
    },
  };
}
